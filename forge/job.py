"""The job record and its versioned JSON form.

A job file is JSON lines: the first line is the job (immutable once dispatched), every
further line an event appended as the job moves (claimed, released, failed, done). A
truncated last line (a crash mid-append) is ignored; anything else that does not validate
is a :class:`CorruptJob` and the backend quarantines it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from forge.errors import CorruptJob, UsageError

if TYPE_CHECKING:  # imported when a record has them: a plain dispatch needs neither
    from forge.retry.backoff import Backoff
    from forge.retry.bounds import RetryRules

FORMAT_VERSION = 1
MAX_PAYLOAD_BYTES = 64 * 1024      # a dispatched job (command, args, metadata)
MAX_FILE_BYTES = 4 * 1024 * 1024   # a job file with its event history
MAX_OUTPUT_TAIL = 2048             # characters of output kept in a failure event
#: Deepest nesting of a job's metadata: every process must decode a stored job, whatever the
#: depth of its stack when it does (a worker's is deeper than a dispatcher's).
MAX_JSON_DEPTH = 64
#: A job must be due before this (2286-11-20T00:00:00Z): the file backend names a waiting job
#: by its due time in 16 digits of microseconds, which end at 2286-11-20T17:46:39Z (a retry
#: due later is filed at that last key). Redis scores (doubles of microseconds) reach further.
LATEST_DUE = 9_999_936_000.0
ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class State(StrEnum):
    """A job's place in its queue: waiting (pending, or delayed until ``available_at``), claimed
    by a worker (reserved), or finished (done, failed)."""

    PENDING = "pending"
    DELAYED = "delayed"
    RESERVED = "reserved"
    DONE = "done"
    FAILED = "failed"


class Reason(StrEnum):
    """Why an attempt did not succeed."""

    EXCEPTION = "exception"
    EXIT_CODE = "exit_code"
    TIMEOUT = "timeout"
    ABANDONED = "abandoned"
    UNKNOWN_COMMAND = "unknown_command"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"  # queue:cancel: taken off the queue, or killed with --running
    RETRY_LATER = "retry_later"  # exit 75 / forge.Retry: released, the attempt not counted
    NO_RETRY = "no_retry"  # exit 65 / forge.Fail: failed at once
    RETRY_UNTIL = "retry_until"  # the retry-until deadline passed: no retry starts
    MAX_EXCEPTIONS = "max_exceptions"  # max_exceptions attempts ended in an exception or exit
    MAX_RELEASES = "max_releases"  # retry-later releases used up


#: ASCII-only output: faster to encode, and text that is not valid Unicode (lone surrogates)
#: is escaped rather than failing to encode.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_quote = json.encoder.encode_basestring_ascii  # the C function _ENCODER uses for strings


def new_id() -> str:
    """A random (version 4) UUID string; what ``str(uuid.uuid4())`` gives, built faster."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}

#: Longest idempotency key, in characters (it is hashed; the cap only keeps records small).
MAX_IDEMPOTENCY_KEY = 1024


def idempotent_id(key: str) -> str:
    """The job id of a dispatch with idempotency key ``key``: the same on every host and backend.

    A UUID of version 8 (RFC 9562, custom) made of the key's SHA-256, so it can never equal an
    id from :func:`new_id` (version 4), and :func:`is_idempotent_id` tells the two apart.
    """
    import hashlib  # here: OpenSSL costs a dispatch without a key 2 ms

    h = hashlib.sha256(b"forge idempotency key\0" + key.encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-8{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def is_idempotent_id(job_id: str) -> bool:
    """Whether ``job_id`` was derived from an idempotency key (version 8) rather than random."""
    return len(job_id) == 36 and job_id[14] == "8"


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply ``value`` nests lists and dicts (a scalar: 0), found without recursion;
    counting stops past ``limit``, so a value that contains itself is ``limit + 1`` deep
    instead of endless. Each level visits a container once, however often it is shared."""
    depth, level = 0, [value]
    while True:
        containers = list({id(x): x for x in level if isinstance(x, list | dict)}.values())
        if not containers:
            return depth
        depth += 1
        if depth > limit:
            return depth
        level = [v for x in containers for v in (x.values() if isinstance(x, dict) else x)]


def valid_id(job_id: object) -> bool:
    """Whether ``job_id`` is a job id as forge makes them: a lower-case UUID string; never
    raises."""
    return isinstance(job_id, str) and bool(ID_RE.fullmatch(job_id))


@dataclass(frozen=True)
class Job:
    """A dispatched command. Times are Unix seconds (float).

    ``max_attempts``, ``timeout`` and ``backoff`` are ``None`` when the job leaves them to
    the worker (its options, else the configured defaults). ``retry`` holds the bounds on its
    retries besides attempts (``forge.retry.bounds``); the record has the key only when set.
    """

    id: str
    command: str
    args: tuple[str, ...]
    queue: str
    max_attempts: int | None
    timeout: float | None
    backoff: Backoff | None
    metadata: Mapping[str, Any]
    dispatched_at: float
    available_at: float
    unique_key: str | None = None
    unique_ttl: float | None = None
    retry: RetryRules | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON-ready dict, tagged with the format version; ``retry`` is present
        only when set. ``from_dict`` reads it back to an equal job."""
        d = {
            "v": FORMAT_VERSION,
            "id": self.id,
            "command": self.command,
            "args": list(self.args),
            "queue": self.queue,
            "max_attempts": self.max_attempts,
            "timeout": self.timeout,
            "backoff": _backoff_json(self.backoff),
            "metadata": dict(self.metadata),
            "dispatched_at": self.dispatched_at,
            "available_at": self.available_at,
            "unique_key": self.unique_key,
            "unique_ttl": self.unique_ttl,
        }
        if self.retry:
            d["retry"] = self.retry.to_json()
        return d

    def to_json(self) -> bytes:
        """One line of compact JSON, newline-terminated (computed once per record)."""
        blob = self.__dict__.get("_json")
        if blob is None:
            blob = _ENCODER.encode(self.to_dict()).encode() + b"\n"
            object.__setattr__(self, "_json", blob)  # a cache, not a field: eq/repr ignore it
        return blob

    @classmethod
    def from_dict(cls, d: Any) -> Job:
        """The job of a record ``to_dict`` wrote. Raises :class:`CorruptJob`, naming the field,
        for anything else (another version, a missing or mistyped field)."""
        fast = _from_v1_dict(cls, d) if type(d) is dict and d.keys() == _FIELDS else None
        return fast if fast is not None else cls._from_dict_checked(d)

    @classmethod
    def _from_dict_checked(cls, d: Any) -> Job:
        """``from_dict`` for any input: every check, with a message naming what is wrong."""
        if not isinstance(d, dict):
            raise CorruptJob("job record is not a JSON object")
        if d.get("v") != FORMAT_VERSION:
            raise CorruptJob(f"unsupported job format version {d.get('v')!r}")
        unknown = d.keys() - _FIELDS - {"retry"}
        if unknown:  # a newer format bumps "v"; v1 records hold exactly these fields
            raise CorruptJob(f"unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        try:
            job = cls(
                id=_typed(d, "id", str),
                command=_typed(d, "command", str),
                args=tuple(_str_list(d, "args")),
                queue=_typed(d, "queue", str),
                max_attempts=_opt(d, "max_attempts", int),
                timeout=_opt_num(d, "timeout"),
                backoff=_backoff_of(d),
                metadata=_typed(d, "metadata", dict),
                dispatched_at=_num(d, "dispatched_at"),
                available_at=_num(d, "available_at"),
                unique_key=_opt(d, "unique_key", str),
                unique_ttl=_opt_num(d, "unique_ttl"),
                retry=_retry_of(d),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptJob(f"invalid job record: {exc}") from None
        if not valid_id(job.id):
            raise CorruptJob(f"invalid job id {job.id!r}")
        if job.max_attempts is not None and job.max_attempts < 1:
            raise CorruptJob("max_attempts must be at least 1")
        return job


_FIELDS = frozenset(("v", "id", "command", "args", "queue", "max_attempts", "timeout", "backoff",
                     "metadata", "dispatched_at", "available_at", "unique_key", "unique_ttl"))


_NUMBER = (int, float)  # exact JSON types: bool is neither


def _from_v1_dict(cls: type[Job], d: dict[str, Any]) -> Job | None:
    """The common case of ``Job.from_dict``, a record exactly as ``to_dict`` writes it,
    checked in one expression (a worker decodes one per claim). None: take the slow path,
    which rejects the record with a precise message (or accepts a looser valid one)."""
    args, backoff, ma = d["args"], d["backoff"], d["max_attempts"]
    if not (d["v"] == FORMAT_VERSION and valid_id(d["id"]) and type(d["command"]) is str
            and type(args) is list and all(type(a) is str for a in args) and type(d["queue"]) is str
            and (ma is None or (type(ma) is int and ma >= 1))
            and (d["timeout"] is None or type(d["timeout"]) in _NUMBER)
            and (backoff is None or (type(backoff) is list and backoff
                                     and all(type(b) in _NUMBER for b in backoff)))
            and type(d["metadata"]) is dict
            and type(d["dispatched_at"]) in _NUMBER and type(d["available_at"]) in _NUMBER
            and (d["unique_key"] is None or type(d["unique_key"]) is str)
            and (d["unique_ttl"] is None or type(d["unique_ttl"]) in _NUMBER)):
        return None
    job = object.__new__(cls)
    # Frozen: fill the instance dict directly, as the generated __init__ would, minus twelve
    # object.__setattr__ calls.
    job.__dict__.update(
        id=d["id"], command=d["command"], args=tuple(args), queue=d["queue"], max_attempts=ma,
        timeout=None if d["timeout"] is None else float(d["timeout"]),
        backoff=None if backoff is None else tuple(float(b) for b in backoff),
        metadata=d["metadata"], dispatched_at=float(d["dispatched_at"]),
        available_at=float(d["available_at"]), unique_key=d["unique_key"],
        unique_ttl=None if d["unique_ttl"] is None else float(d["unique_ttl"]),
    )
    return job


def _backoff_json(backoff: Any) -> Any:
    """A list of seconds, or an exponential backoff's object."""
    if backoff is None:
        return None
    return backoff.to_json() if hasattr(backoff, "to_json") else list(backoff)


def _retry_of(d: Mapping[str, Any]) -> RetryRules | None:
    if d.get("retry") is None:
        return None
    from forge.retry.bounds import RetryRules

    try:
        return RetryRules.from_json(d["retry"])
    except UsageError as exc:
        raise ValueError(exc.message) from None


def _backoff_of(d: Mapping[str, Any]) -> Backoff | None:
    value = d.get("backoff")
    if value is None:
        return None
    if isinstance(value, dict):
        from forge.retry.backoff import Exponential

        try:
            return Exponential.from_json(value)
        except UsageError as exc:
            raise ValueError(exc.message) from None
    return tuple(_num_list(d, "backoff"))


def _typed(d: Mapping[str, Any], key: str, t: type) -> Any:
    value = d[key]
    if not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise TypeError(f"{key} must be {t.__name__}")
    return value


def _opt(d: Mapping[str, Any], key: str, t: type) -> Any:
    return None if d.get(key) is None else _typed(d, key, t)


def _num(d: Mapping[str, Any], key: str) -> float:
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{key} must be a number")
    return float(value)


def _opt_num(d: Mapping[str, Any], key: str) -> float | None:
    return None if d.get(key) is None else _num(d, key)


def _str_list(d: Mapping[str, Any], key: str) -> list[str]:
    value = _typed(d, key, list)
    if not all(isinstance(v, str) for v in value):
        raise TypeError(f"{key} must be a list of strings")
    return value


def _num_list(d: Mapping[str, Any], key: str) -> list[float]:
    value = _typed(d, key, list)
    if not value or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise TypeError(f"{key} must be a non-empty list of numbers")
    return [float(v) for v in value]


@dataclass(frozen=True)
class Event:
    """One line of a job's history: claimed, released, failed, done, retried."""

    event: str
    attempt: int
    at: float
    worker: str | None = None
    reason: str | None = None
    error: str | None = None
    exit_code: int | None = None
    duration: float | None = None
    output_tail: str | None = None
    deadline: float | None = None
    #: On a ``claimed`` event: the size of the job's log (bytes) when the attempt started, so
    #: ``queue:show`` can tell one attempt's output from the next.
    log_offset: int | None = None
    #: On the event that ends an attempt: how many attempts the job may make, as its worker
    #: counted them (the job's own tries, else the worker's), for "attempt 2 of 3".
    tries: int | None = None

    def to_json(self) -> bytes:
        """One line of compact ASCII JSON (an output tail holding lone surrogates still
        encodes), the fields that are set in field order: what ``_ENCODER`` writes for
        ``to_dict()``, built directly for the usual strings, ints and finite floats."""
        parts = []
        for key, value in self.__dict__.items():
            if value is None:
                continue
            kind = type(value)
            if kind is int:
                parts.append(f'"{key}":{value}')
            elif kind is float and value - value == 0.0:  # finite (nan and inf must raise)
                parts.append(f'"{key}":{value!r}')
            elif isinstance(value, str):
                parts.append(f'"{key}":{_quote(value)}')
            else:
                return _ENCODER.encode(self.to_dict()).encode() + b"\n"
        return ("{" + ",".join(parts) + "}\n").encode()

    @classmethod
    def from_dict(cls, d: Any) -> Event | None:
        """The event of a record ``to_dict`` wrote, or None when ``d`` is not an event record
        (not an object, no ``event`` name, unknown fields): a bad event line is skipped, never
        fatal."""
        if not isinstance(d, dict) or not isinstance(d.get("event"), str):
            return None
        try:
            return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]
        except TypeError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """The event's fields that are set (None fields are left out)."""
        return {k: v for k, v in self.__dict__.items() if v is not None}


def decode_file(data: bytes) -> tuple[Job, list[Event]]:
    """Parse a job file (the job line, then event lines). Raises :class:`CorruptJob`."""
    job, rest = _decode_head(data)
    events: list[Event] = []
    for line in rest.split("\n"):
        if not line:
            continue
        try:
            ev = Event.from_dict(json.loads(line))
        except (ValueError, RecursionError):
            continue  # a torn last append; the job itself is intact
        if ev is not None:
            events.append(ev)
    return job, events


def decode_job(data: bytes) -> Job:
    """The job of a job file, without its history; corrupt exactly when ``decode_file`` is."""
    return _decode_head(data)[0]


def _decode_head(data: bytes) -> tuple[Job, str]:
    if not data:
        raise CorruptJob("empty file")
    if len(data) > MAX_FILE_BYTES:
        raise CorruptJob(f"file is {len(data)} bytes, over the {MAX_FILE_BYTES}-byte cap")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptJob("not valid UTF-8") from None
    head, _, rest = text.partition("\n")
    if len(head) > MAX_PAYLOAD_BYTES // 4 and len(head.encode()) > MAX_PAYLOAD_BYTES:
        raise CorruptJob("job record over the payload size cap")
    try:
        record = json.loads(head)
    except (ValueError, RecursionError) as exc:
        raise CorruptJob(f"invalid JSON: {exc}") from None
    return Job.from_dict(record), rest


@dataclass(frozen=True)
class JobInfo:
    """A job as a user sees it: the record, its state, attempts made and its history."""

    job: Job
    state: State
    attempts: int
    events: Sequence[Event] = field(default_factory=tuple)
    updated_at: float | None = None
    #: The latest progress the job reported (``forge.jobprogress``), when it was read with it.
    progress: Mapping[str, Any] | None = None

    @property
    def id(self) -> str:
        """The job's id."""
        return self.job.id

    @property
    def last_event(self) -> Event | None:
        """The latest event of its history, or None if it has none."""
        return self.events[-1] if self.events else None

    @property
    def failure(self) -> Event | None:
        """The latest ``failed`` event (its reason and error), or None if no attempt failed."""
        for ev in reversed(self.events):
            if ev.event == "failed":
                return ev
        return None

    def to_dict(self) -> dict[str, Any]:
        """The job record (without its format version) with the state, attempts, last update,
        history and progress, as ``queue:show --json`` prints it."""
        d = self.job.to_dict()
        del d["v"]
        d.update(state=str(self.state), attempts=self.attempts, updated_at=self.updated_at,
                 events=[e.to_dict() for e in self.events],
                 progress=dict(self.progress) if self.progress is not None else None)
        return d

