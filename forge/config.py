"""Settings: defaults, then ``forge.toml``, then ``FORGE_*`` variables, into a frozen ``Settings``.

``forge.toml`` is found by walking up from the current directory, or named by ``FORGE_CONFIG``.
Every effective value remembers where it came from, for ``forge config:show``.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forge.durations import parse_duration
from forge.errors import ConfigError, UsageError

CONFIG_NAME = "forge.toml"
QUEUE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


#: Queue names that passed ``validate_queue_name`` (each dispatch and claim checks its queues:
#: a name is matched once per process; at most this many are remembered).
_valid_queue_names: set[str] = set()
_VALID_QUEUE_NAMES_KEPT = 1024


def validate_queue_name(name: object) -> str:
    """Return ``name`` if it is a safe queue name, else raise :class:`UsageError`."""
    if type(name) is str and name in _valid_queue_names:
        return name
    if (
        not isinstance(name, str)
        or not QUEUE_NAME_RE.fullmatch(name)
        or ".." in name
        or name.startswith(".")
    ):
        raise UsageError(
            f"Invalid queue name {name!r}: use 1-64 of A-Z a-z 0-9 _ . - (no '..', not starting with '.')."
        )
    if type(name) is str and len(_valid_queue_names) < _VALID_QUEUE_NAMES_KEPT:
        _valid_queue_names.add(name)
    return name


def _whole_number(value: Any) -> int:
    """An attempt count from forge.toml (an integer) or the environment (its digits)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
        return int(value)
    raise ValueError(f"expected a whole number such as 3, not {value!r}.")


@dataclass(frozen=True)
class Connection:
    """One named queue connection: ``driver`` is ``file`` or ``redis``.

    In ``Settings.connections`` a file connection's ``path`` may be ``None`` (the per-project
    default); ``Settings.connection_config`` always fills it in.
    """

    name: str
    driver: str
    path: Path | None = None
    url: str | None = None
    prefix: str = "forge"
    connect_timeout: float = 5.0
    password_env: str | None = None
    lock: str = "flock"
    lease: float = 30.0  # Redis: how long a claim lives without a renewal

    def where(self) -> str:
        """Where the jobs are, for people: the queue directory, or the Redis URL (password
        masked) and prefix."""
        if self.driver == "file":
            return str(self.path)
        return f"{mask_url(self.url or '')} prefix {self.prefix}"


@dataclass(frozen=True)
class Settings:
    """The effective settings of one project, frozen. ``sources`` says where each value came from
    (``default``, the forge.toml path, or ``env NAME``), for ``forge config:show``."""
    root: Path
    config_file: Path | None
    command_paths: tuple[Path, ...]
    plugins: bool
    connection: str
    default_queue: str
    tries: int
    timeout: float
    backoff: Any  # forge.retry.backoff.Backoff: seconds per retry, or exponential
    done_retention: float
    connections: Mapping[str, Connection]
    sources: Mapping[str, str] = field(default_factory=dict, compare=False)
    #: ``[forge] name``: the project's identity for its default queue directory.
    name: str | None = None
    #: The project folder as it was reached (symlinks kept: ``/srv/app/current``), which
    #: stays the same across releases; ``root`` is the resolved folder of this release.
    project_path: Path | None = None
    #: Where forge looked for forge.toml when it found none (the current folder and its parents).
    searched: tuple[Path, ...] = ()
    #: Whether forge.toml has [[listeners]] (``forge.events``): a dispatch without them pays nothing.
    listeners: bool = False
    #: Whether forge.toml has an [events] table or a ``listeners`` key that ``listeners`` does not
    #: count (``[listeners]``, ``listeners = false``: not [[listeners]] tables, refused). Both are
    #: parsed by ``forge.events.config``, not here: whatever raises events checks them before
    #: it writes (``forge.events.config.check``).
    events: bool = False

    def connection_config(self, name: str | None = None) -> Connection:
        """The named connection (default: ``queue.connection``), its file path resolved."""
        if name == "":
            raise ConfigError("--connection must not be empty. Leave it out for queue.connection, or name a"
                              f" connection (configured: {', '.join(sorted(self.connections)) or 'none'}).")
        name = name or self.connection
        try:
            conn = self.connections[name]
        except KeyError:
            known = ", ".join(sorted(self.connections)) or "none"
            raise ConfigError(
                f'Unknown connection "{name}" (configured: {known}).',
                hint=f"Add a [connections.{name}] table to forge.toml.",
            ) from None
        if conn.driver == "file" and conn.path is None:
            # Resolved here, not in load_settings: platformdirs and hashlib cost every command
            # several milliseconds, and most commands never touch the queue.
            conn = _replace(conn, path=default_queue_dir(self.project_path or self.root, self.name))
            _warn_if_moved(conn.path, self.root)
        return conn

    def no_config_note(self) -> str | None:
        """"No forge.toml found (looked in ...)" when none was, else None."""
        if self.config_file is not None:
            return None
        looked = [str(p) for p in self.searched] or [str(self.root)]
        where = ", ".join(looked[:3]) + (f" and {len(looked) - 3} more parent folders" if len(looked) > 3 else "")
        return (f"No forge.toml found (looked in {where}); using {self.root} as the project."
                " cd into the project first, or set FORGE_CONFIG.")

    def as_dict(self) -> dict[str, Any]:
        """Effective settings as plain data (secrets in URLs masked)."""
        conns = {}
        for c in map(self.connection_config, self.connections):
            d: dict[str, Any] = {"driver": c.driver}
            if c.driver == "file":
                d["path"] = str(c.path)
                d["lock"] = c.lock
            else:
                d.update(url=mask_url(c.url or ""), prefix=c.prefix, connect_timeout=c.connect_timeout)
                if c.password_env:
                    d["password_env"] = c.password_env
            conns[c.name] = d
        return {
            "config_file": str(self.config_file) if self.config_file else None,
            "root": str(self.root),
            "forge.name": self.name,
            "forge.commands": [str(p) for p in self.command_paths],
            "forge.plugins": self.plugins,
            "queue.connection": self.connection,
            "queue.default": self.default_queue,
            "queue.tries": self.tries,
            "queue.timeout": self.timeout,
            "queue.backoff": _backoff_json(self.backoff),
            "queue.done_retention": self.done_retention,
            "connections": conns,
        }


def mask_url(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``: never print a password."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def find_config(start: Path, env: Mapping[str, str]) -> Path | None:
    """The forge.toml to use: the file ``FORGE_CONFIG`` names (``ConfigError`` if it is not a
    file), else the nearest one in ``start`` or a parent folder, else None."""
    explicit = env.get("FORGE_CONFIG")
    if explicit:
        path = Path(os.path.abspath(Path(explicit).expanduser()))
        if not path.is_file():
            raise ConfigError(f"FORGE_CONFIG names {path}, which is not a file.")
        return path
    for directory in (start, *start.parents):
        candidate = directory / CONFIG_NAME
        if candidate.is_file():
            return candidate
    return None


def default_queue_dir(project: Path, name: str | None = None) -> Path:
    """Per user and per project, so two projects never share a queue, and the same for one
    project wherever and however it runs.

    ``~/.local/share/forge/queues/<key>``, where ``~`` is the account's home directory in the
    user database (not ``$HOME`` or ``$XDG_DATA_HOME``, which ``sudo -u``, cron and login shells
    set differently), and the key is ``[forge] name`` if set, else the project folder's name and
    a hash of its path as reached, symlinks kept (``/srv/app/current``, not the release it points
    to, so a symlink-swap deploy keeps its queue).
    """
    return queues_base() / (name or project_digest(project))


def queues_base() -> Path:
    """Where default queue directories live: under the account's home, whatever the environment."""
    if sys.platform.startswith("linux"):
        return Path(account_home()) / ".local" / "share" / "forge" / "queues"
    return user_dir("data") / "queues"  # pragma: no cover - other platforms


def account_home() -> str:
    """The effective user's home directory from the user database; ``$HOME`` only for an
    account that has none (a container's arbitrary uid, a system user's ``/nonexistent``)."""
    import pwd

    try:
        home = pwd.getpwuid(os.geteuid()).pw_dir
    except KeyError:
        home = ""
    if os.path.isabs(home) and os.path.isdir(home):
        return home
    return _home()


def _warn_if_moved(path: Path | None, root: Path) -> None:
    """Point at a queue left where forge before 0.x kept it ($XDG_DATA_HOME or $HOME, keyed by
    the resolved project path), once, while the new location does not exist yet."""
    if path is None or os.path.lexists(path):
        return
    try:
        old = user_dir("data") / "queues" / project_digest(root)
    except ConfigError:
        return
    if old != path and os.path.isdir(old / "q"):
        import warnings

        warnings.warn(f"A queue directory from an older forge exists at {old}; this project's queue is now "
                      f"{path} (stable across releases and environments). With no worker running: mv {old} {path}",
                      stacklevel=3)


def project_digest(root: Path) -> str:
    """``<folder name>-<12 hex digits of sha256(root)>``: a stable, safe file name per project."""
    try:  # CPython's built-in sha256 (3.11; ``_sha2`` from 3.12): hashlib loads OpenSSL, 2 ms a run
        from _sha256 import sha256  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - other Pythons
        try:
            from _sha2 import sha256  # type: ignore[import-not-found]
        except ImportError:
            from hashlib import sha256
    digest = sha256(str(root).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", root.name) or "project"
    return f"{name}-{digest}"


def _home() -> str:
    """$HOME when it is an absolute path, else the account's home directory (as platformdirs)."""
    home = os.environ.get("HOME", "")
    if not os.path.isabs(home):
        import pwd

        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = ""
        if not os.path.isabs(home):
            raise ConfigError("Cannot tell your home directory: set HOME to an absolute path.")
    return home


def user_dir(kind: str) -> Path:
    """forge's per-user ``data`` or ``cache`` directory, as platformdirs defines them.

    On Linux the XDG rule is applied here (``$XDG_DATA_HOME`` / ``$XDG_CACHE_HOME`` when absolute,
    else ``~/.local/share`` / ``~/.cache``): importing platformdirs costs about 10 ms, a sixth of
    a ``queue:dispatch``. A test checks both against platformdirs.
    """
    if sys.platform.startswith("linux"):
        var, default = {"data": ("XDG_DATA_HOME", ".local/share"), "cache": ("XDG_CACHE_HOME", ".cache")}[kind]
        base = os.environ.get(var, "")
        return Path(base if os.path.isabs(base) else os.path.join(_home(), default)) / "forge"
    import platformdirs  # pragma: no cover - other platforms

    find = platformdirs.user_data_path if kind == "data" else platformdirs.user_cache_path
    return find("forge", appauthor=False)  # pragma: no cover


_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "forge": {"commands": list, "plugins": bool, "name": str},
    "queue": {
        "connection": str,
        "default": str,
        "tries": int,
        "timeout": (int, float, str),
        "backoff": (int, float, str, list),
        "done_retention": (int, float, str),
    },
}
_CONN_KEYS: dict[str, type | tuple[type, ...]] = {
    "driver": str,
    "path": str,
    "url": str,
    "prefix": str,
    "connect_timeout": (int, float, str),
    "password_env": str,
    "lock": str,
    "lease": (int, float, str),
}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "true or false", list: "a list"}


def _type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_TYPE_NAMES.get(x, x.__name__) for x in t)
    return _TYPE_NAMES.get(t, t.__name__)


def _check(key: str, value: Any, expected: type | tuple[type, ...], where: str) -> None:
    types = expected if isinstance(expected, tuple) else (expected,)
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise ConfigError(f"{where}: {key} must be {_type_name(expected)}, not {value!r}.")


#: Parsed forge.toml files by (path, mtime, size): the scheduler reads [[schedule]] from the
#: same file, and a schedule of 1,000 entries takes 130 ms to parse.
_parsed: dict[tuple[str, int, int], dict[str, Any]] = {}
#: A forge.toml at least this large is parsed once per content: its parse is kept as JSON in the
#: user's cache directory under the SHA-256 of its bytes (a schedule:run every minute need not
#: parse 1,000 [[schedule]] tables every minute). Smaller files parse faster than a cache reads.
PARSE_CACHE_MIN = 32 * 1024


def _read_toml(path: Path) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            key = (str(path), st.st_mtime_ns, st.st_size)
            if key not in _parsed:
                _parsed.clear()
                raw = fh.read()
                _parsed[key] = _parse_cached(raw) if len(raw) >= PARSE_CACHE_MIN else tomllib.loads(raw.decode())
            return _parsed[key]
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}.") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}.") from None


def _parse_cached(raw: bytes) -> dict[str, Any]:
    """``tomllib.loads(raw)``, from the parse cache when it holds this content (see
    ``PARSE_CACHE_MIN``). Only a parse that JSON keeps exactly is cached (no dates or times),
    only in a directory and file of the user's that nobody else can write, and the file must
    name the content it was parsed from; anything else is parsed afresh."""
    import hashlib
    import json
    import tomllib

    from forge.privatefile import read_private, trusted_dir

    digest = hashlib.sha256(raw).hexdigest()
    folder = user_dir("cache") / "toml"
    path = folder / f"{digest}.json"
    cached = read_private(path, 4 << 20)  # 4 MiB, the command cache's cap
    if cached is not None:
        try:
            doc = json.loads(cached)
            if isinstance(doc, dict) and doc.get("sha256") == digest and isinstance(doc.get("data"), dict):
                data: dict[str, Any] = doc["data"]
                return data
        except (ValueError, RecursionError):
            pass
    data = tomllib.loads(raw.decode())
    try:
        blob = json.dumps({"sha256": digest, "data": data}, allow_nan=False)
        if json.loads(blob)["data"] != data:
            return data
    except (TypeError, ValueError, RecursionError):
        return data  # dates, times, inf or nan: not kept
    tmp = folder / f".{digest}.{os.getpid()}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not trusted_dir(folder):
            return data
        for old in folder.glob("*.json"):  # one project's config changes now and then: keep few
            if old != path and len(old.name) == 69:
                with _suppress_os():
                    if old.stat().st_mtime < _now() - 7 * 86400:
                        old.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(blob.encode())
        os.replace(tmp, path)
    except OSError:
        with _suppress_os():
            os.unlink(tmp)
    return data


def _suppress_os() -> Any:
    import contextlib

    return contextlib.suppress(OSError)


def _now() -> float:
    import time

    return time.time()


def load_settings(
    cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build the effective settings for the project around ``cwd`` (default: the current
    folder as the shell reached it) from the defaults, its forge.toml and ``env`` (default:
    ``os.environ``). Raises ``ConfigError`` naming the first bad value and where it came from."""
    env = os.environ if env is None else env
    start = Path(os.path.abspath(cwd)) if cwd is not None else logical_cwd(env)
    config_file = find_config(start, env)
    data: dict[str, Any] = _read_toml(config_file) if config_file else {}
    project_path = config_file.parent if config_file else start
    root = project_path.resolve()
    if config_file is not None:
        config_file = config_file.resolve()
    where = str(config_file)
    _check_sections(data, where)  # [[listeners]] and [events]: forge.events.config.check, before a write
    values = _Values(data, env, where)
    command_paths, plugins, project_name = _forge_section(values, root, where)
    connection, default_queue, tries, timeout, backoff, retention = _queue_section(values)
    connections = _env_connections(_connections(data, root, where, values.sources), env, values.sources)
    if connection not in connections:
        raise ConfigError(
            f'queue.connection ({values.sources["queue.connection"]}) names "{connection}", which is not'
            f" configured (known: {', '.join(sorted(connections))})."
        )
    return Settings(
        root=root,
        config_file=config_file,
        command_paths=command_paths,
        plugins=plugins,
        connection=connection,
        default_queue=default_queue,
        tries=tries,
        timeout=timeout,
        backoff=backoff,
        done_retention=retention,
        connections=connections,
        sources=values.sources,
        name=project_name,
        project_path=project_path,
        searched=() if config_file else (start, *start.parents),
        listeners=bool(data.get("listeners")),
        events="events" in data or ("listeners" in data and not data["listeners"]),
    )


#: The sections of forge.toml that other modules read and check.
_OTHER_SECTIONS = {
    "schedule": "forge.scheduler.load",  # [[schedule]] tables
    "listeners": "forge.events.config",
    "events": "forge.events.config",
    "limits": "forge.limits.spec",
}


def _check_sections(data: Mapping[str, Any], where: str) -> None:
    """Every section and key of forge.toml is known and of its type (``ConfigError`` if not);
    [connections] is a table (its tables are checked by :func:`_connections`)."""
    for section, table in data.items():
        if section == "connections":
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: [connections] must be a table of tables.")
            continue
        if section in _OTHER_SECTIONS:
            continue
        if section not in _SCHEMA:
            raise ConfigError(
                f"{where}: unknown section [{section}] (known: forge, queue, connections, schedule, listeners, events, limits)."
            )
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: {section} must be a table.")
        for key, value in table.items():
            if key not in _SCHEMA[section]:
                known = ", ".join(_SCHEMA[section])
                raise ConfigError(f"{where}: unknown key {section}.{key} (known: {known}).")
            _check(f"{section}.{key}", value, _SCHEMA[section][key], where)


class _Values:
    """Picks each setting from the environment, else forge.toml, else its default, and
    records in ``sources`` where each came from."""

    def __init__(self, data: Mapping[str, Any], env: Mapping[str, str], where: str) -> None:
        self.data, self.env, self.where = data, env, where
        self.sources: dict[str, str] = {}

    def pick(self, section: str, key: str, default: Any, env_name: str | None = None) -> Any:
        full = f"{section}.{key}"
        if env_name and self.env.get(env_name) not in (None, ""):
            self.sources[full] = f"env {env_name}"
            return self.env[env_name]
        table = self.data.get(section, {})
        if key in table:
            self.sources[full] = self.where
            return table[key]
        self.sources[full] = "default"
        return default

    def convert(self, full: str, fn: Any, value: Any) -> Any:
        try:
            return fn(value)
        except (UsageError, ValueError) as exc:
            raise ConfigError(f"{full} ({self.sources[full]}): {exc}") from None


def _forge_section(values: _Values, root: Path, where: str) -> tuple[tuple[Path, ...], bool, str | None]:
    """[forge]: the command folders (resolved under ``root``), whether plugins load, the project name."""
    commands = values.pick("forge", "commands", ["commands"], "FORGE_COMMANDS")
    if isinstance(commands, str):
        commands = [c for c in commands.split(os.pathsep) if c]
    for c in commands:
        if not isinstance(c, str):
            raise ConfigError(f"{where}: forge.commands must be a list of folder names.")
    command_paths = tuple((root / c).resolve() for c in commands)
    plugins = values.pick("forge", "plugins", True)
    project_name = values.pick("forge", "name", None)
    if project_name is not None and (not QUEUE_NAME_RE.fullmatch(project_name) or project_name.startswith(".")):
        raise ConfigError(f"{where}: forge.name must be 1-64 of A-Z a-z 0-9 _ . - (not starting with '.'),"
                          f" not {project_name!r}.")
    if values.env.get("FORGE_NO_PLUGINS", "") not in ("", "0"):
        plugins, values.sources["forge.plugins"] = False, "env FORGE_NO_PLUGINS"
    return command_paths, bool(plugins), project_name


def _queue_section(values: _Values) -> tuple[str, str, int, float, Any, float]:
    """[queue]: the connection's name, the default queue, tries, timeout, backoff and the
    retention of finished jobs, each converted and checked."""
    connection = values.pick("queue", "connection", "file", "FORGE_QUEUE_CONNECTION")
    default_queue = values.convert(
        "queue.default", validate_queue_name, values.pick("queue", "default", "default", "FORGE_QUEUE_DEFAULT")
    )
    tries = values.convert("queue.tries", _whole_number, values.pick("queue", "tries", 1, "FORGE_QUEUE_TRIES"))
    if tries < 1:
        raise ConfigError(f"queue.tries ({values.sources['queue.tries']}) must be at least 1, not {tries}.")
    timeout = values.convert(
        "queue.timeout", lambda v: parse_duration(v, what="timeout"),
        values.pick("queue", "timeout", 60, "FORGE_QUEUE_TIMEOUT"),
    )
    raw_backoff = values.pick("queue", "backoff", None, "FORGE_QUEUE_BACKOFF")
    backoff: Any = (0.0,)  # the default: retry at once (forge.retry.backoff is imported only when one is set)
    if raw_backoff is not None:
        from forge.retry.backoff import parse as parse_backoff

        backoff = values.convert("queue.backoff", parse_backoff, raw_backoff)
    retention = values.convert(
        "queue.done_retention", lambda v: parse_duration(v, what="retention"),
        values.pick("queue", "done_retention", "1h", "FORGE_QUEUE_DONE_RETENTION"),
    )
    return connection, default_queue, tries, timeout, backoff, retention


def _connections(data: Mapping[str, Any], root: Path, where: str, sources: dict[str, str]) -> dict[str, Connection]:
    """The [connections.NAME] tables, checked, plus the default ``file`` and ``redis`` ones."""
    connections: dict[str, Connection] = {}
    for name, table in data.get("connections", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: [connections.{name}] must be a table.")
        for key, value in table.items():
            if key not in _CONN_KEYS:
                known = ", ".join(_CONN_KEYS)
                raise ConfigError(f"{where}: unknown key connections.{name}.{key} (known: {known}).")
            _check(f"connections.{name}.{key}", value, _CONN_KEYS[key], where)
            sources[f"connections.{name}.{key}"] = where
        connections[name] = _connection(name, table, root, where)
    if "file" not in connections:
        connections["file"] = Connection("file", "file")
    if "redis" not in connections:
        connections["redis"] = Connection("redis", "redis", url="redis://127.0.0.1:6379/0")
    return connections


def _env_connections(connections: Mapping[str, Connection], env: Mapping[str, str],
                     sources: dict[str, str]) -> dict[str, Connection]:
    """FORGE_QUEUE_DIR and FORGE_REDIS_URL override the path / url of every connection of that driver."""
    final: dict[str, Connection] = {}
    for name, conn in connections.items():
        if conn.driver == "file":
            if env.get("FORGE_QUEUE_DIR"):
                conn = _replace(conn, path=Path(env["FORGE_QUEUE_DIR"]).expanduser().resolve())
                sources[f"connections.{name}.path"] = "env FORGE_QUEUE_DIR"
            elif conn.path is None:
                sources[f"connections.{name}.path"] = "default"
        elif conn.driver == "redis" and env.get("FORGE_REDIS_URL"):
            conn = _replace(conn, url=env["FORGE_REDIS_URL"])
            sources[f"connections.{name}.url"] = "env FORGE_REDIS_URL"
        final[name] = conn
    return final


def logical_cwd(env: Mapping[str, str]) -> Path:
    """The current folder as the shell reached it (``$PWD``, symlinks kept, as ``pwd -L``
    prints it) when ``$PWD`` names this folder; else the resolved one."""
    physical = os.getcwd()
    logical = env.get("PWD", "")
    if os.path.isabs(logical) and logical != physical:
        try:
            if os.path.samestat(os.stat(logical), os.stat(physical)):
                return Path(os.path.normpath(logical))
        except OSError:
            pass
    return Path(physical)


def _replace(conn: Connection, **changes: Any) -> Connection:
    from dataclasses import replace

    return replace(conn, **changes)


def _connection(name: str, table: Mapping[str, Any], root: Path, where: str) -> Connection:
    driver = table.get("driver", name if name in ("file", "redis") else None)
    if driver not in ("file", "redis"):
        raise ConfigError(f'{where}: connections.{name}.driver must be "file" or "redis", not {driver!r}.')
    try:
        timeout = parse_duration(table.get("connect_timeout", 5), what="connect_timeout")
        lease = parse_duration(table.get("lease", 30), what="lease")
    except UsageError as exc:
        raise ConfigError(f"{where}: connections.{name}: {exc}") from None
    if not 10.0 <= lease <= 3600.0:
        raise ConfigError(f"{where}: connections.{name}.lease must be between 10s and 1h, not {lease:g} s.")
    lock = table.get("lock", "flock")
    if lock not in ("flock", "lease"):
        raise ConfigError(f'{where}: connections.{name}.lock must be "flock" or "lease", not {lock!r}.')
    path = table.get("path")
    url = table.get("url")
    if driver == "redis":
        url = url or "redis://127.0.0.1:6379/0"
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"{where}: connections.{name}.url must start with redis:// or rediss://.")
    return Connection(
        name=name,
        driver=driver,
        path=(root / Path(path).expanduser()).resolve() if path else None,
        url=url,
        prefix=table.get("prefix", "forge"),
        connect_timeout=timeout,
        password_env=table.get("password_env"),
        lock=lock,
        lease=lease,
    )


def _backoff_json(backoff: Any) -> Any:
    from forge.retry.backoff import to_json

    return to_json(backoff)
