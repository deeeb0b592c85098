"""Property tests where the input space is large: job JSON, durations, queue names, argv."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forge.config import validate_queue_name
from forge.durations import parse_duration
from forge.errors import CorruptJob, UsageError
from forge.job import Event, decode_file, decode_job
from forge.queue import QueuedCommand

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20) | st.floats(
    allow_nan=False, allow_infinity=False
)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
argv = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30), max_size=8)


@settings(max_examples=200, deadline=None)
@given(args=argv, metadata=st.dictionaries(st.text(max_size=10), json_values, max_size=4),
       attempts=st.none() | st.integers(1, 100), delay=st.floats(0, 1e6),
       queue=st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True))
def test_job_json_round_trip(args: list[str], metadata: dict, attempts: int | None, delay: float, queue: str) -> None:
    cmd = QueuedCommand("email:send").with_args(args).with_delay(delay)
    for key, value in metadata.items():
        cmd = cmd.with_metadata(key, value)
    if attempts is not None:
        cmd = cmd.with_max_attempts(attempts)
    job = cmd.to_job(queue)
    event = Event("claimed", 1, 1.5, worker="host:1", deadline=2.5)
    decoded, events = decode_file(job.to_json() + event.to_json())
    assert decoded == job
    assert list(decoded.args) == args  # each argument arrives exactly as given: an argv list, no shell
    assert events == [event]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    """Any bytes decode or raise CorruptJob (never another exception), and the job-only
    decoder agrees: corrupt exactly when the whole-file decoder is, the same job when not."""
    try:
        job, events = decode_file(data)
    except CorruptJob as exc:
        assert str(exc)
        with pytest.raises(CorruptJob):
            decode_job(data)
        return
    assert decode_job(data) == job and all(isinstance(e, Event) for e in events)


@given(h=st.integers(0, 99), m=st.integers(0, 59), s=st.integers(0, 59))
def test_durations_with_units(h: int, m: int, s: int) -> None:
    text = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")
    assert parse_duration(text) == h * 3600 + m * 60 + s
    assert parse_duration(str(h * 3600 + m * 60 + s)) == h * 3600 + m * 60 + s


@given(st.text(max_size=12))
def test_bad_durations_are_usage_errors(text: str) -> None:
    """Any text is a usage error or a finite duration in range: never another exception, a
    negative, an infinity or a NaN (each of which broke a dispatch after its write once)."""
    import math

    from forge.durations import MAX_SECONDS

    try:
        value = parse_duration(text)
    except UsageError as exc:
        assert exc.message and "\n" not in exc.message
        return
    assert math.isfinite(value) and 0 <= value <= MAX_SECONDS


@given(st.text(max_size=80))
def test_queue_names_never_escape_their_directory(name: str) -> None:
    try:
        validate_queue_name(name)
    except UsageError:
        return
    assert re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name)
    assert ".." not in name and "/" not in name and not name.startswith(".")


@pytest.mark.parametrize("name", ["..", "../etc", "a/b", ".hidden", "", "x" * 65, "a\x00b", "é"])
def test_known_bad_queue_names(name: str) -> None:
    with pytest.raises(UsageError):
        validate_queue_name(name)
