"""``QueuedCommand``: a command to run later, with the options of its job (the guide's builders).

A value object: every builder returns a new ``QueuedCommand``; ``CommandQueue`` (``forge.queue.manager``)
validates it against the registry and stores it as a ``Job``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from forge.config import validate_queue_name
from forge.durations import MAX_SECONDS, parse_duration
from forge.errors import InvalidCommand, UsageError
from forge.job import (
    LATEST_DUE,
    MAX_IDEMPOTENCY_KEY,
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    Job,
    idempotent_id,
    json_depth,
    new_id,
)

if TYPE_CHECKING:
    from forge.retry.backoff import Backoff, Exponential
    from forge.retry.rules import JobDefaults


def queue_name(name: object) -> str:
    """``name`` if it is a valid queue name, else :class:`InvalidCommand`."""
    try:
        return validate_queue_name(name)
    except UsageError as exc:
        raise InvalidCommand(exc.message) from None


def batch_key(batch_id: str, n: int) -> str:
    """The idempotency key of item ``n`` of batch ``batch_id`` (``dispatch_many(batch_id=...)``
    numbers from 0, ``--from-file`` by line, from 1): one rule, so a batch sent again, or
    resumed after a kill, stores only its missing items."""
    return f"batch:{batch_id}:{n}"


def _seconds(value: float | int | timedelta, what: str) -> float:
    try:
        return parse_duration(value, what=what)
    except UsageError as exc:
        raise InvalidCommand(exc.message) from None


@dataclass(frozen=True)
class QueuedCommand:
    """A command to run later. Builders return new values; fields are readable."""

    command: str
    args: tuple[str, ...] = ()
    delay: float = 0.0
    run_at: datetime | None = None
    max_attempts: int | None = None
    queue: str | None = None
    timeout: float | None = None
    backoff: Backoff | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    unique_key: str | None = None
    unique_ttl: float | None = None
    idempotency_key: str | None = None
    #: No retry starts after this: seconds after dispatch, or a datetime (``with_retry_until``).
    retry_until: float | datetime | None = None
    max_exceptions: int | None = None
    max_releases: int | None = None

    @classmethod
    def new(cls, command: str) -> QueuedCommand:
        """A QueuedCommand for ``command`` with no arguments or options (as ``QueuedCommand(command)``)."""
        return cls(command)

    def with_args(self, args: Iterable[str]) -> QueuedCommand:
        """Replace the arguments (an argv list: each item is passed as one argument)."""
        if isinstance(args, str):
            raise InvalidCommand("with_args takes a list of arguments, not one string; use with_arg.")
        return replace(self, args=tuple(args))

    def with_arg(self, arg: str) -> QueuedCommand:
        """Append one argument."""
        return replace(self, args=(*self.args, arg))

    def with_delay(self, delay: float | int | timedelta) -> QueuedCommand:
        """Run no earlier than ``delay`` (seconds or timedelta) after dispatch."""
        return replace(self, delay=_seconds(delay, "delay"), run_at=None)

    def at(self, when: datetime) -> QueuedCommand:
        """Run no earlier than ``when`` (naive datetimes are local time)."""
        if not isinstance(when, datetime):
            raise InvalidCommand(f"at() takes a datetime, not {type(when).__name__}.")
        return replace(self, run_at=when, delay=0.0)

    def with_max_attempts(self, attempts: int) -> QueuedCommand:
        """Allow this many attempts before the job fails (checked when it is dispatched: at least 1)."""
        return replace(self, max_attempts=attempts)

    def on_queue(self, queue: str) -> QueuedCommand:
        """Declare the queue this command belongs on: dispatching it through a ``CommandQueue`` of
        another name raises ``InvalidCommand``."""
        return replace(self, queue=queue)

    def with_timeout(self, timeout: float | int | timedelta) -> QueuedCommand:
        """Kill an attempt that runs longer than ``timeout`` (seconds or timedelta)."""
        return replace(self, timeout=_seconds(timeout, "timeout"))

    def with_backoff(self, backoff: float | int | str | timedelta | Sequence[float | int] | Exponential,
                     ) -> QueuedCommand:
        """Seconds before each retry: ``[1, 5, 10]`` waits 1 s, then 5 s, then 10 s thereafter;
        ``"exp:2s..10m,jitter=full"`` doubles from 2 s up to 10 m, with full jitter
        (``forge.retry.backoff``)."""
        try:
            if isinstance(backoff, timedelta):
                return replace(self, backoff=(backoff.total_seconds(),))
            from forge.retry.backoff import parse

            return replace(self, backoff=parse(backoff))
        except UsageError as exc:
            raise InvalidCommand(exc.message) from None

    def with_retry_until(self, until: float | int | str | timedelta | datetime) -> QueuedCommand:
        """Start no retry after this: a duration after dispatch (``"2h"``) or a datetime. With
        it and no max attempts (here or declared), attempts are not limited: the deadline is."""
        from forge.retry.rules import deadline

        try:
            at = deadline(until, time.time())  # validated now: a bad value fails here, not at dispatch
        except UsageError as exc:
            raise InvalidCommand(exc.message) from None
        if at <= time.time():  # a deadline (a date/time) already past: no retry could ever start
            raise InvalidCommand(f"Invalid retry-until {until!s}: it is in the past; give a later time or"
                                 " a duration after dispatch, e.g. 2h.")
        if not isinstance(until, datetime):
            if isinstance(until, str) and ("-" in until or "T" in until):
                until = datetime.fromisoformat(until)
            else:
                until = parse_duration(until, what="retry-until")
        return replace(self, retry_until=until)

    def with_max_exceptions(self, count: int) -> QueuedCommand:
        """Fail once this many attempts ended in an exception or a failing exit, tries left or not."""
        return replace(self, max_exceptions=count)

    def with_max_releases(self, count: int) -> QueuedCommand:
        """Allow this many retry-later releases (exit 75, ``forge.Retry``); default 100."""
        return replace(self, max_releases=count)

    def with_defaults(self, defaults: JobDefaults | None) -> QueuedCommand:
        """Fill what this command leaves unset from its command's declared defaults."""
        if not defaults:
            return self
        d = defaults
        return replace(
            self,
            max_attempts=self.max_attempts if self.max_attempts is not None else d.tries,
            timeout=self.timeout if self.timeout is not None else d.timeout,
            backoff=self.backoff if self.backoff is not None else d.backoff,
            retry_until=self.retry_until if self.retry_until is not None else d.retry_until,
            max_exceptions=self.max_exceptions if self.max_exceptions is not None else d.max_exceptions,
            max_releases=self.max_releases if self.max_releases is not None else d.max_releases,
        )

    def with_metadata(self, key: str, value: Any) -> QueuedCommand:
        """Attach a JSON value under ``key`` (checked at dispatch)."""
        return replace(self, metadata={**self.metadata, key: value})

    def with_unique_key(self, key: str, ttl: float | int | timedelta | None = None) -> QueuedCommand:
        """Refuse to dispatch while a job with this key is pending, delayed or running."""
        return replace(self, unique_key=key, unique_ttl=None if ttl is None else _seconds(ttl, "ttl"))

    def with_limits(self, *, concurrency_key: str | None = None, concurrency: int | None = None,
                    rate_key: str | None = None, rate: str | None = None, burst: int | None = None,
                    isolated: bool = False, on_busy: str | None = None) -> QueuedCommand:
        """Run under limits of its own (``forge.limits``): at most ``concurrency`` jobs with
        ``concurrency_key`` at once, ``rate`` (``"100/m"``) starts for ``rate_key``, or the
        command's isolation lock (``on_busy``: ``"wait"`` or ``"drop"``); a key without its
        number takes it from ``[limits.keys]``. Checked here and at dispatch."""
        from forge.limits.isolation import options_meta

        try:
            meta = options_meta({"concurrency_key": concurrency_key, "concurrency": concurrency,
                                 "rate_key": rate_key, "rate": rate, "burst": burst,
                                 "isolated": isolated or None, "on_busy": on_busy})
        except UsageError as exc:
            raise InvalidCommand(f"{self.command}: {exc.message}") from None
        return self if meta is None else self.with_metadata("forge.limits", meta)

    def with_idempotency_key(self, key: str) -> QueuedCommand:
        """Dispatch this at most once per ``key``: the job's id is derived from the key
        (``forge.job.idempotent_id``), and a dispatch whose key names a job that is still kept,
        in any state, stores nothing and answers with that job (``JobDispatch.created`` False).
        The key frees when that job is deleted (done jobs after the retention, failed ones when
        flushed or forgotten, waiting ones when cleared)."""
        return replace(self, idempotency_key=key)

    def is_delayed(self) -> bool:
        """True if the job would not be due yet if it were dispatched now (a delay, or a time to come)."""
        if self.run_at is not None:
            return self.run_at.timestamp() > time.time()
        return self.delay > 0

    def _due(self, now: float) -> float:
        """When the job becomes due (Unix time), refused unless both backends can store it."""
        try:
            due = self.run_at.timestamp() if self.run_at is not None else now + self.delay
        except (OverflowError, OSError, ValueError):
            due = math.inf
        latest = min(now + MAX_SECONDS, LATEST_DUE)
        if due > latest:
            when = self.run_at.isoformat() if self.run_at is not None else f"in {self.delay:g} s"
            limit = datetime.fromtimestamp(latest, UTC).strftime("%Y-%m-%d %H:%M UTC")
            raise InvalidCommand(f"{self.command}: it would be due {when}, out of range: a job can be"
                                 f" scheduled at most 100 years ahead (no later than {limit}).")
        return due

    def to_job(self, queue: str, *, now: float | None = None) -> Job:
        """Validate and build the job record (raises :class:`InvalidCommand`)."""
        now = time.time() if now is None else now
        if not isinstance(self.command, str) or not self.command.strip():
            raise InvalidCommand("The command name is empty.")
        for a in self.args:
            if not isinstance(a, str):
                raise InvalidCommand(f"{self.command}: arguments must be strings, got {list(self.args)!r}.")
            try:
                a.encode()
            except UnicodeEncodeError:
                raise InvalidCommand(f"{self.command}: argument {a!r} is not valid Unicode text.") from None
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1
        ):
            raise InvalidCommand(f"{self.command}: max attempts must be at least 1, not {self.max_attempts!r}.")
        if self.queue is not None and self.queue != queue:
            raise InvalidCommand(
                f'{self.command}: on_queue("{self.queue}") contradicts the queue "{queue}" it is dispatched to.'
            )
        spans = [("delay", self.delay), ("timeout", self.timeout), ("unique key ttl", self.unique_ttl),
                 *(("backoff", b) for b in (self.backoff if isinstance(self.backoff, tuple) else ()))]
        for what, value in spans:
            if value is not None and (not isinstance(value, int | float) or not math.isfinite(value) or value < 0):
                raise InvalidCommand(f"{self.command}: {what} must not be negative, not {value!r}.")
            if value is not None and value > MAX_SECONDS:
                raise InvalidCommand(f"{self.command}: {what} of {value:g} s is longer than 100 years,"
                                     " the longest forge accepts.")
        if self.timeout == 0:
            raise InvalidCommand(f"{self.command}: timeout must be more than 0 seconds.")
        if self.metadata and not all(isinstance(k, str) for k in self.metadata):
            raise InvalidCommand(f"{self.command}: metadata keys must be strings.")
        if self.metadata and json_depth(dict(self.metadata)) > MAX_JSON_DEPTH:
            raise InvalidCommand(f"{self.command}: metadata nests deeper than {MAX_JSON_DEPTH} levels (or"
                                 " contains itself); flatten it or pass it by reference.")
        if self.unique_key is not None and (not isinstance(self.unique_key, str) or not self.unique_key):
            raise InvalidCommand(f"{self.command}: the unique key must be a non-empty string.")
        key = self.idempotency_key
        if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_IDEMPOTENCY_KEY):
            raise InvalidCommand(f"{self.command}: the idempotency key must be a string of 1 to"
                                 f" {MAX_IDEMPOTENCY_KEY} characters.")
        available = self._due(now)
        rules = None
        if self.retry_until is not None or self.max_exceptions is not None or self.max_releases is not None:
            from forge.retry.rules import RetryRules, deadline

            try:
                rules = RetryRules(
                    until=None if self.retry_until is None else deadline(self.retry_until, now),
                    max_exceptions=self.max_exceptions, max_releases=self.max_releases)
            except UsageError as exc:
                raise InvalidCommand(f"{self.command}: {exc.message}") from None
        try:
            job_id = new_id() if key is None else idempotent_id(key)
        except UnicodeEncodeError:
            raise InvalidCommand(f"{self.command}: idempotency key {key!r} is not valid Unicode text.") from None
        job = Job(
            id=job_id,
            command=self.command,
            args=tuple(self.args),
            queue=queue_name(queue),
            max_attempts=self.max_attempts,
            timeout=self.timeout,
            backoff=self.backoff,
            metadata=dict(self.metadata),
            dispatched_at=now,
            available_at=max(available, now),
            unique_key=self.unique_key,
            unique_ttl=self.unique_ttl,
            retry=rules or None,
        )
        try:
            size = len(job.to_json())  # encoded once here; the backend stores these bytes
        except (TypeError, ValueError, RecursionError) as exc:
            raise InvalidCommand(f"{self.command}: metadata must be JSON values: {exc}.") from None
        if size > MAX_PAYLOAD_BYTES:
            raise InvalidCommand(
                f"{self.command}: the job is {size} bytes, over the {MAX_PAYLOAD_BYTES}-byte cap;"
                " pass large data by reference (a file path or an id)."
            )
        return job
