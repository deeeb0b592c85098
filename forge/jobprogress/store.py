"""Where a job's progress record lives: ``progress/<id>.json`` in a job-file directory
(replaced atomically), ``<prefix>:progress:<id>`` on Redis. Either way it is kept for
``TTL`` after its last update (or, on the file backend, until its job is deleted)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from forge.job import valid_id

if TYPE_CHECKING:
    from forge.backends.base import Backend
    from forge.job import JobInfo

#: How long a progress record outlives its last update (seconds).
TTL = 7 * 86400.0


def _is_redis(backend: Any) -> bool:
    return getattr(backend, "driver", "") == "redis"


def _dir(backend: Any) -> str:
    from forge.backends.file.fsio import private_dir

    path = f"{backend.layout.path}/progress"
    if not getattr(backend, "_forge_progress_dir", False):
        os.close(private_dir(path, backend.uid, name="progress"))
        backend._forge_progress_dir = True
    return path


def put_progress(backend: Backend, job_id: str, record: dict[str, Any]) -> None:
    """Replace ``job_id``'s progress record (the supervisor's; nobody else writes it)."""
    if not valid_id(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    data = json.dumps(record, separators=(",", ":")).encode()
    b: Any = backend
    if _is_redis(b):
        with b.server.io():
            b.server.c.call("SET", b.server.key("progress", job_id), data, "EX", int(TTL))  # the worker's own client
        return
    path = _dir(b)
    tmp = f"{path}/.{job_id}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.rename(tmp, f"{path}/{job_id}.json")


def _decode(data: bytes | None) -> dict[str, Any] | None:
    if not data:
        return None
    try:
        d = json.loads(data)
    except ValueError:
        return None
    if not isinstance(d, dict) or not isinstance(d.get("percent"), int | float):
        return None
    return d


def get_progress(backend: Backend, job_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The progress records of these jobs (those that have one), by id."""
    ids = [i for i in job_ids if valid_id(i)]
    if not ids:
        return {}
    b: Any = backend
    out: dict[str, dict[str, Any]] = {}
    if _is_redis(b):
        with b.server.io():
            values = b.server.r.mget([b.server.key("progress", i) for i in ids])
        for i, v in zip(ids, values, strict=True):
            d = _decode(v)
            if d is not None:
                out[i] = d
        return out
    from forge.backends.file.fsio import distrust

    path = f"{b.layout.path}/progress"
    now = time.time()
    for i in ids:
        try:
            fd = os.open(f"{path}/{i}.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if distrust(st, b.uid) is not None or now - st.st_mtime > TTL:
                continue
            d = _decode(os.read(fd, 1 << 16))
        finally:
            os.close(fd)
        if d is not None:
            out[i] = d
    return out


def with_progress(backend: Backend, infos: Iterable[JobInfo]) -> list[JobInfo]:
    """``infos`` with their ``progress`` filled in (one read for them all on Redis)."""
    from dataclasses import replace

    items = list(infos)
    found = get_progress(backend, [i.id for i in items]) if items else {}
    return [replace(i, progress=found[i.id]) if i.id in found and _current(found[i.id], i) else i
            for i in items]


def _current(record: dict[str, Any], info: JobInfo) -> bool:
    """Whether ``record`` is of the job's latest claim: a retry running (and silent so far)
    must not show the last attempt's 90% and its ETA. Attempt numbers cannot tell
    (``queue:retry`` starts them again at 1); the claim's time can: ``claimed_at`` is on the
    store's clock, as the ``claimed`` events are (a ``retried`` event is on the clock of
    whoever retried, so it is not compared: a retried job waiting shows its last progress)."""
    claimed = record.get("claimed_at")
    if not isinstance(claimed, int | float):
        return True
    return not any(e.event == "claimed" and e.at > claimed + 0.001 for e in info.events)


def sweep(backend: Backend, limit: int = 1000) -> int:
    """File backend: delete progress records past the TTL, or whose job is gone. Returns how many."""
    b: Any = backend
    if _is_redis(b):
        return 0  # keys expire by themselves
    path = f"{b.layout.path}/progress"
    try:
        names = os.listdir(path)
    except FileNotFoundError:
        return 0
    now, removed = time.time(), 0
    for name in names[:limit]:
        full = f"{path}/{name}"
        try:
            st = os.stat(full, follow_symlinks=False)
        except OSError:
            continue
        job_id = name[:-5] if name.endswith(".json") else ""
        stale = now - st.st_mtime > TTL or (name.startswith(".") and now - st.st_mtime > 3600)
        if not stale and now - st.st_mtime > 60 and valid_id(job_id):
            stale = backend.find(job_id) is None
        if stale:
            with contextlib.suppress(OSError):
                os.unlink(full)
                removed += 1
    return removed
