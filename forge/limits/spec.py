"""Limits as data: rates, a job's own limits, the ``[limits]`` table, and the holds a job needs.

A job may start only when it can take every *hold* it needs, all at once:

- a **slot** of a scope with ``max`` slots (per-queue parallelism, per-key concurrency, an
  isolation lock, which is a scope of one slot); a slot is held for as long as the run lives;
- a **token** of a rate (``100/m``): a rate is a token bucket of ``burst`` tokens (1 unless
  configured) refilled one token every ``period / count`` seconds, kept as the one number
  GCRA needs (the theoretical arrival time), so "100/m" starts at most one job every 0.6 s
  and never more than ``count`` in any window of ``period`` (plus ``burst - 1``).

Scopes are strings: ``p:<queue>`` (parallel), ``pr:<queue>`` (the queue's rate),
``c:<key>`` (concurrency), ``r:<key>`` (a key's rate), ``i:<key>`` (isolation).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from forge.durations import parse_duration
from forge.errors import ConfigError, UsageError

_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*([0-9.]*)\s*([a-z]*)\s*$")
_UNIT_WORDS = {"ms": "ms", "s": "s", "sec": "s", "second": "s", "m": "m", "min": "m", "minute": "m", "h": "h",
               "hour": "h", "d": "d", "day": "d"}
#: A limit key: printable ASCII without spaces, like a queue name but with ``:``, ``/``, ``@``.
KEY_RE = re.compile(r"^[!-~]{1,200}$")
MAX_SLOTS = 10_000


@dataclass(frozen=True)
class Rate:
    """``count`` starts per ``period`` seconds, with up to ``burst`` at once after a quiet spell."""

    count: int
    period: float
    burst: int = 1
    text: str = ""

    @property
    def interval(self) -> float:
        """The seconds between two starts at the steady rate: ``period / count``."""
        return self.period / self.count

    def __str__(self) -> str:
        return self.text or f"{self.count}/{self.period:g}s"


def parse_rate(value: Any, *, what: str = "rate", burst: Any = None) -> Rate:
    """``"100/m"``, ``"20/s"``, ``"5/10s"``, ``"1000/hour"`` -> a :class:`Rate`."""
    if not isinstance(value, str):
        raise UsageError(f"Invalid {what} {value!r}: use COUNT/PERIOD, e.g. 100/m, 20/s or 5/10s.")
    m = _RATE_RE.match(value.lower())
    if m is None:
        raise UsageError(f"Invalid {what} {value!r}: use COUNT/PERIOD, e.g. 100/m, 20/s or 5/10s.")
    count_s, num, unit = m.groups()
    unit = _UNIT_WORDS.get(unit.rstrip("s") if unit not in _UNIT_WORDS else unit, unit)
    try:
        period = parse_duration(f"{num or 1}{unit or 's'}", what=what)
    except UsageError:
        raise UsageError(f"Invalid {what} {value!r}: the period must be a duration, e.g. 100/m or 5/10s.") from None
    count = int(count_s)
    if count < 1 or period <= 0:
        raise UsageError(f"Invalid {what} {value!r}: both the count and the period must be more than 0.")
    b = 1 if burst is None else burst
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_SLOTS:
        raise UsageError(f"Invalid burst {burst!r} for {what} {value!r}: a whole number from 1 to {MAX_SLOTS}.")
    return Rate(count, period, b, value.strip())


def check_key(key: Any, what: str) -> str:
    """``key`` if it is a valid limit key (1-200 printable characters, no spaces); UsageError
    naming ``what`` otherwise."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        shown = repr(key) if not isinstance(key, str) or len(key) <= 80 else f"{key[:60]!r}... ({len(key)} characters)"
        raise UsageError(f"Invalid {what} {shown}: 1-200 printable characters without spaces, e.g. tenant:42.")
    return key


def check_count(value: Any, what: str) -> int:
    """``value`` if it is a whole number from 1 to ``MAX_SLOTS``; UsageError naming ``what``
    otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SLOTS:
        raise UsageError(f"Invalid {what} {value!r}: a whole number from 1 to {MAX_SLOTS}.")
    return value


@dataclass(frozen=True)
class JobLimits:
    """A job's own limits (``queue:dispatch --concurrency-key ... --rate-key ... --isolated``),
    stored in its metadata under ``forge.limits`` as :meth:`to_dict` writes it."""

    concurrency_key: str | None = None
    concurrency: int | None = None
    rate_key: str | None = None
    rate: Rate | None = None
    isolation: str | None = None
    on_busy: str = "wait"

    def to_dict(self) -> dict[str, Any]:
        """The ``forge.limits`` metadata record: only the keys that are set; a rate also as its
        burst and its interval in microseconds (what the Redis script reads). ``from_dict`` reads
        it back."""
        d: dict[str, Any] = {}
        if self.concurrency_key is not None:
            d["concurrency_key"] = self.concurrency_key
            if self.concurrency is not None:
                d["concurrency"] = self.concurrency
        if self.rate_key is not None:
            d["rate_key"] = self.rate_key
            if self.rate is not None:
                d["rate"] = str(self.rate)
                d["burst"] = self.rate.burst
                d["rate_us"] = round(self.rate.interval * 1_000_000)
        if self.isolation is not None:
            d["isolation"] = self.isolation
            d["on_busy"] = self.on_busy
        return d

    @classmethod
    def from_dict(cls, d: Any) -> JobLimits:
        """Raises UsageError for a record that is not one forge wrote."""
        if not isinstance(d, Mapping):
            raise UsageError("forge.limits must be a JSON object")
        ck = d.get("concurrency_key")
        rk = d.get("rate_key")
        iso = d.get("isolation")
        rate = None
        if rk is not None and d.get("rate") is not None:
            rate = parse_rate(d["rate"], what="rate", burst=d.get("burst"))
        on_busy = d.get("on_busy", "wait")
        if on_busy not in ("wait", "drop"):
            raise UsageError(f"Invalid on_busy {on_busy!r}: wait or drop.")
        return cls(
            concurrency_key=None if ck is None else check_key(ck, "concurrency key"),
            concurrency=None if d.get("concurrency") is None else check_count(d["concurrency"], "concurrency"),
            rate_key=None if rk is None else check_key(rk, "rate key"),
            rate=rate,
            isolation=None if iso is None else check_key(iso, "isolation key"),
            on_busy=on_busy,
        )

    def __bool__(self) -> bool:
        return bool(self.concurrency_key or self.rate_key or self.isolation)


@dataclass(frozen=True)
class QueueLimits:
    """The limits of one queue (``[limits.queues.<name>]``): at most ``parallel`` jobs running at
    once, and starts at most at ``rate``; None is no limit."""

    parallel: int | None = None
    rate: Rate | None = None


@dataclass(frozen=True)
class KeyLimits:
    """The limits of one key or key pattern (``[limits.keys.<key>]``): at most ``concurrency``
    runs holding it at once, and starts at most at ``rate``; None is no limit."""

    concurrency: int | None = None
    rate: Rate | None = None


@dataclass(frozen=True)
class Need:
    """One hold a job needs: a slot of ``scope`` (of ``max``), or a token of ``rate``."""

    kind: str  # "slot" or "rate"
    scope: str
    label: str  # for people: "concurrency tenant:42", "rate emails", "isolation import:acme"
    max: int = 1
    rate: Rate | None = None
    drop: bool = False  # an isolation lock held by another run drops this job instead


@dataclass(frozen=True)
class LimitsConfig:
    """The ``[limits]`` table: ``queues.<name>`` (parallel, rate, burst) and ``keys.<key>``
    (concurrency, rate, burst; a key may be a pattern with ``*``, as ``tenant:*``, which gives
    each matching key its own limit)."""

    queues: Mapping[str, QueueLimits] = field(default_factory=dict)
    keys: Mapping[str, KeyLimits] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.queues or self.keys)

    def key(self, key: str) -> KeyLimits | None:
        """The limits of ``key``: its own entry, else the first pattern with ``*`` that matches
        it, else None."""
        found = self.keys.get(key)
        if found is not None:
            return found
        for pattern, limits in self.keys.items():
            if "*" in pattern and _glob_re(pattern).match(key):
                return limits
        return None

    def needs(self, queue: str, own: JobLimits | None) -> list[Need]:
        """The holds a job of ``queue`` with limits ``own`` needs, slots first, sorted."""
        out: list[Need] = []
        ql = self.queues.get(queue)
        if ql is not None:
            if ql.parallel is not None:
                out.append(Need("slot", f"p:{queue}", f"parallel {queue}", ql.parallel))
            if ql.rate is not None:
                out.append(Need("rate", f"pr:{queue}", f"rate {queue}", rate=ql.rate))
        if own:
            if own.concurrency_key is not None:
                n = own.concurrency
                if n is None:
                    kl = self.key(own.concurrency_key)
                    n = kl.concurrency if kl is not None else None
                if n is not None:
                    out.append(Need("slot", f"c:{own.concurrency_key}", f"concurrency {own.concurrency_key}", n))
            if own.rate_key is not None:
                rate = own.rate
                if rate is None:
                    kl = self.key(own.rate_key)
                    rate = kl.rate if kl is not None else None
                if rate is not None:
                    out.append(Need("rate", f"r:{own.rate_key}", f"rate {own.rate_key}", rate=rate))
            if own.isolation is not None:
                out.append(Need("slot", f"i:{own.isolation}", f"isolation {own.isolation}", 1,
                                drop=own.on_busy == "drop"))
        out.sort(key=lambda n: (n.kind != "slot", n.scope))
        return out

    def to_wire(self) -> dict[str, Any]:
        """The table for the Redis claim script: numbers only, patterns as Lua patterns."""
        def rate(r: Rate | None) -> dict[str, Any]:
            return {} if r is None else {"ri": round(r.interval * 1_000_000), "rb": r.burst, "rt": str(r)}

        queues = {q: {**({"p": v.parallel} if v.parallel else {}), **rate(v.rate)} for q, v in self.queues.items()}
        keys: dict[str, Any] = {}
        patterns: list[Any] = []
        for k, v in self.keys.items():
            entry = {**({"c": v.concurrency} if v.concurrency else {}), **rate(v.rate)}
            if "*" in k:
                patterns.append([lua_pattern(k), entry])
            else:
                keys[k] = entry
        return {"q": queues, "k": keys, "pat": patterns}


@functools.lru_cache(maxsize=256)
def _glob_re(glob: str) -> re.Pattern[str]:
    """A ``*`` glob as the Redis script reads it (:func:`lua_pattern`): only ``*`` is special,
    so ``?`` and ``[...]`` match themselves on both backends (``fnmatch`` would read them)."""
    return re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in glob) + r"\Z", re.DOTALL)


def lua_pattern(glob: str) -> str:
    """A ``*`` glob as an anchored Lua pattern (every other character literal)."""
    out = []
    for ch in glob:
        if ch == "*":
            out.append(".*")
        elif ch in "^$()%.[]+-?":
            out.append("%" + ch)
        else:
            out.append(ch)
    return "^" + "".join(out) + "$"


def job_limits(metadata: Mapping[str, Any]) -> JobLimits | None:
    """The job's own limits, or None (none, or a record forge did not write: then it has none)."""
    from forge.limits import LIMITS_KEY

    d = metadata.get(LIMITS_KEY)
    if d is None:
        return None
    try:
        return JobLimits.from_dict(d) or None
    except UsageError:
        return None


def parse_table(table: Any, where: str) -> LimitsConfig:
    """``[limits]`` from forge.toml; ConfigError naming the key on a bad value."""
    if table is None:
        return LimitsConfig()
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: [limits] must be a table with queues and keys tables.")
    unknown = set(table) - {"queues", "keys"}
    if unknown:
        raise ConfigError(f"{where}: unknown key limits.{sorted(unknown)[0]} (known: queues, keys).")
    queues: dict[str, QueueLimits] = {}
    keys: dict[str, KeyLimits] = {}
    from forge.config import validate_queue_name

    for name, t in _tables(table.get("queues"), "limits.queues", where).items():
        full = f"limits.queues.{name}"
        try:
            validate_queue_name(name)
        except UsageError as exc:
            raise ConfigError(f"{where}: [{full}]: {exc.message}") from None
        _only(t, ("parallel", "rate", "burst"), full, where)
        queues[name] = QueueLimits(
            _count(t, "parallel", full, where),
            _rate(t, full, where),
        )
    for name, t in _tables(table.get("keys"), "limits.keys", where).items():
        full = f'limits.keys."{name}"'
        try:
            check_key(name, "limit key")
        except UsageError as exc:
            raise ConfigError(f"{where}: [{full}]: {exc.message}") from None
        _only(t, ("concurrency", "rate", "burst"), full, where)
        keys[name] = KeyLimits(_count(t, "concurrency", full, where), _rate(t, full, where))
    return LimitsConfig(queues, keys)


def _tables(value: Any, full: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise ConfigError(f"{where}: [{full}] must hold one table per name, e.g. [{full}.emails].")
    return dict(value)


def _only(t: Mapping[str, Any], known: tuple[str, ...], full: str, where: str) -> None:
    for key in t:
        if key not in known:
            raise ConfigError(f"{where}: unknown key {full}.{key} (known: {', '.join(known)}).")
    if not any(k in t for k in known if k != "burst"):
        raise ConfigError(f"{where}: [{full}] sets no limit: give {' or '.join(k for k in known if k != 'burst')}.")
    if "burst" in t and "rate" not in t:
        raise ConfigError(f"{where}: {full}.burst needs {full}.rate.")


def _count(t: Mapping[str, Any], key: str, full: str, where: str) -> int | None:
    if key not in t:
        return None
    try:
        return check_count(t[key], f"{full}.{key}")
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def _rate(t: Mapping[str, Any], full: str, where: str) -> Rate | None:
    if "rate" not in t:
        return None
    try:
        return parse_rate(t["rate"], what=f"{full}.rate", burst=t.get("burst"))
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc.message}") from None


def load(settings: Any) -> LimitsConfig:
    """The ``[limits]`` table of the project's forge.toml (empty without one)."""
    path = getattr(settings, "config_file", None)
    if path is None:
        return LimitsConfig()
    from forge.config import _read_toml

    return parse_table(_read_toml(path).get("limits"), str(path))
