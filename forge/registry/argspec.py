"""A command's arguments as plain data, and a parser for them that needs neither Typer nor Click.

``forge queue:dispatch`` checks a job's arguments against its command before queueing it.
Doing that with Click means importing Typer and the project's command files: most of a
dispatch's 100 ms. :func:`describe` turns a Click command into a JSON-able spec once (the
command cache stores it), and :func:`accepts` checks an argument list against that spec.

The parser is a strict subset of Click's: it answers ``True`` only for argument lists it is
sure Click accepts (long and short options given whole, ``--opt=value``, flags, positional
arguments, the parameter types Typer uses for ``str``, ``int``, ``float``, ranges, enums and
paths). Anything else, including every error, answers ``False`` and the caller asks Click,
which gives the exact error message. So a wrong answer here can only cost time, never let a
bad argument list through that Click would refuse (the test suite checks this against Click).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from typing import Any

VERSION = 2
_INVALID = object()


def describe(cmd: Any) -> dict[str, Any] | None:
    """The spec of a Click command, or None when it uses anything :func:`accepts` does not model."""
    settings = dict(cmd.context_settings or {})
    settings.pop("help_option_names", None)
    interspersed = settings.pop("allow_interspersed_args", cmd.allow_interspersed_args)
    if settings or cmd.allow_extra_args or cmd.ignore_unknown_options or getattr(cmd, "deprecated", False):
        return None
    options: list[dict[str, Any]] = []
    arguments: list[dict[str, Any]] = []
    for p in cmd.params:
        if (p.callback is not None or p.envvar or not p.expose_value or p.is_eager
                or getattr(p, "deprecated", False) or getattr(p, "prompt", None)):
            return None
        kind = _describe_type(p.type)
        if kind is None:
            return None
        paths = _default_paths(p, kind)
        if paths is None:
            return None
        if p.param_type_name == "argument":
            if p.nargs not in (1, -1) or (arguments and arguments[-1]["many"]):
                return None  # only the last argument may take many values
            arguments.append({"name": p.name, "required": bool(p.required), "many": p.nargs == -1,
                              "type": kind, "default_paths": paths})
        elif p.param_type_name == "option":
            opts = [*p.opts, *p.secondary_opts]
            if (p.nargs != 1 or getattr(p, "count", False) or getattr(p, "is_flag", False) != (kind["kind"] == "bool")
                    or any(not o.startswith("-") or o in ("-", "--") for o in opts)):
                return None
            if kind["kind"] == "bool" and (not getattr(p, "is_bool_flag", False) or p.multiple):
                return None
            options.append({"name": p.name, "opts": list(p.opts), "off": list(p.secondary_opts),
                            "required": bool(p.required), "multiple": bool(p.multiple), "type": kind,
                            "default_paths": paths})
        else:
            return None
    if any(a["many"] for a in arguments) and not interspersed:
        return None
    return {"v": VERSION, "interspersed": bool(interspersed), "options": options, "arguments": arguments}


def _default_paths(p: Any, kind: dict[str, Any]) -> list[str] | None:
    """Check the default Click would use when the parameter is not given, as Click does.

    Returns the default path(s) for a path type, which must be checked against the disk at
    dispatch time; ``[]`` when there is nothing left to check; None when the default is
    computed (a callable) or Click would refuse it (an out-of-range number, a stale choice).
    """
    default = p.default
    if callable(default):
        return None
    if default is None or p.required:
        return []
    values = list(default) if (p.multiple or p.nargs == -1) and isinstance(default, (list, tuple)) else [default]
    if kind["kind"] == "path":
        out = []
        for value in values:
            if not isinstance(value, (str, os.PathLike)):
                return None
            out.append(os.fspath(value))
        return out if all(isinstance(v, str) for v in out) else None
    try:
        for value in values:
            p.type.convert(value, p, None)
    except Exception:  # noqa: BLE001 - Click would refuse it: leave the command to Click
        return None
    return []


def _describe_type(t: Any) -> dict[str, Any] | None:
    cls = type(t).__name__
    module = type(t).__module__
    if not module.startswith("typer"):
        return None
    if cls == "StringParamType":
        return {"kind": "str"}
    if cls == "BoolParamType":
        return {"kind": "bool"}
    if cls in ("IntParamType", "FloatParamType"):
        return {"kind": "int" if cls == "IntParamType" else "float"}
    if cls in ("IntRange", "FloatRange"):
        if t.clamp:
            return None
        return {"kind": "int" if cls == "IntRange" else "float", "min": t.min, "max": t.max,
                "min_open": bool(t.min_open), "max_open": bool(t.max_open)}
    if cls == "TyperChoice":
        return {"kind": "choice", "choices": [t.normalize_choice(c, None) for c in t.choices],
                "case_sensitive": bool(t.case_sensitive)}
    if cls == "TyperPath":
        return {"kind": "path", "exists": bool(t.exists), "file_okay": bool(t.file_okay),
                "dir_okay": bool(t.dir_okay), "readable": bool(t.readable), "writable": bool(t.writable),
                "resolve": bool(t.resolve_path)}
    return None


def accepts(spec: dict[str, Any], args: Sequence[str]) -> bool:
    """True only if Click would parse ``args`` against the command ``spec`` describes."""
    if spec.get("v") != VERSION:
        return False
    by_opt = spec.get("_by_opt")
    if by_opt is None:  # an index of the option names, built once per spec (not saved)
        by_opt = {}
        for o in spec["options"]:
            for name in o["opts"]:
                by_opt[name] = (o, True)
            for name in o["off"]:
                by_opt[name] = (o, False)
        spec["_by_opt"] = by_opt
    seen: set[str] = set()
    positionals: list[str] = []
    i, n = 0, len(args)
    while i < n:
        tok = args[i]
        i += 1
        if not tok.startswith("-"):
            positionals.append(tok)
            continue
        if positionals and not spec["interspersed"]:
            return False
        name, eq, value = tok.partition("=") if tok.startswith("--") else (tok, "", "")
        found = by_opt.get(name)
        if found is None:
            return False
        o, on = found
        if o["type"]["kind"] == "bool":
            if eq:
                return False
        else:
            if not on:
                return False
            if not eq:
                if i >= n or args[i].startswith("-"):
                    return False
                value = args[i]
                i += 1
            if not _valid(o["type"], value):
                return False
        seen.add(o["name"])
    for o in spec["options"]:
        if o["name"] not in seen and (o["required"] or not _defaults_valid(o)):
            return False
    arguments = spec["arguments"]
    for pos, a in enumerate(arguments):
        given = positionals[pos:] if a["many"] else positionals[pos:pos + 1]
        if not given:
            if a["required"] or not _defaults_valid(a):
                return False
            continue
        if not all(_valid(a["type"], v) for v in given):
            return False
    return len(positionals) <= len(arguments) or bool(arguments and arguments[-1]["many"])


def _defaults_valid(param: dict[str, Any]) -> bool:
    """A path default is checked against the disk, as Click checks it when the parameter is absent."""
    return all(_valid_path(param["type"], path) for path in param["default_paths"])


def _valid(kind: dict[str, Any], value: str) -> bool:
    k = kind["kind"]
    if k == "str":
        return True
    if k in ("int", "float"):
        try:
            number = int(value) if k == "int" else float(value)
        except ValueError:
            return False
        lo, hi = kind.get("min"), kind.get("max")
        if lo is not None and (number <= lo if kind["min_open"] else number < lo):
            return False
        return not (hi is not None and (number >= hi if kind["max_open"] else number > hi))
    if k == "choice":
        normed = value if kind["case_sensitive"] else value.casefold()
        return normed in kind["choices"]
    if k == "path":
        return _valid_path(kind, value)
    return False


def _valid_path(kind: dict[str, Any], value: str) -> bool:
    try:
        path = os.path.realpath(value) if kind["resolve"] else value
        st = os.stat(path)
    except (OSError, ValueError):
        return not kind["exists"] and "\0" not in value
    if not kind["file_okay"] and stat.S_ISREG(st.st_mode):
        return False
    if not kind["dir_okay"] and stat.S_ISDIR(st.st_mode):
        return False
    if kind["readable"] and not os.access(path, os.R_OK):
        return False
    return not (kind["writable"] and not os.access(path, os.W_OK))
