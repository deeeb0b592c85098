"""Small-file I/O helpers shared by every part of the file backend (``file`` and its mixins):
whole-file reads of job files, exclusive creation of
new files, the microsecond unit of job-file keys, and the flags and limits every part of the
file backend uses.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path

from ..errors import QueueUnavailable
from ..job import MAX_FILE_BYTES

LOG_CAP = 1024 * 1024
TMP_MAX_AGE = 3600.0
UNIQUE_INFLIGHT = 60.0
O_READ = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Why opening an existing job file failed, when the reason is the file itself (a symlink, a
#: directory, a FIFO, another user's file): it is quarantined. Any other error (a read-only
#: disk, I/O, out of descriptors) is the directory's or the process's, and the file is left.
FILE_ERRNOS = frozenset({errno.ELOOP, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO,
                         errno.ENODEV, errno.ETXTBSY, errno.EOVERFLOW})


def micros(t: float) -> int:
    """Unix seconds as whole microseconds (the unit of job-file keys)."""
    return int(t * 1_000_000)


def read_whole(fd: int, size: int | None = None) -> bytes:
    """The whole file (a job file is never over the cap; if it is, enough to tell so).

    Sized by its length (``size``, else fstat): ``pread(fd, MAX_FILE_BYTES + 1)`` would
    allocate 4 MiB for every read."""
    size = min(os.fstat(fd).st_size if size is None else size, MAX_FILE_BYTES) + 1
    data = os.pread(fd, size, 0)
    if len(data) == size:  # it grew meanwhile, or is over the cap
        data = os.pread(fd, MAX_FILE_BYTES + 1, 0)
    return data


def open_error(exc: OSError) -> str:
    """Why a job file could not be opened, as a quarantine reason."""
    return "symbolic link" if exc.errno == errno.ELOOP else f"cannot open: {exc.strerror}"


def unusable(exc: OSError, where: str, doing: str) -> QueueUnavailable:
    """The error for a queue directory forge cannot write (permissions, a read-only disk, I/O):
    it names the directory, the OS error and what to check."""
    return QueueUnavailable(
        f"Cannot {doing} {where}: {exc.strerror or exc}.",
        hint=f"forge must be able to write there: check its owner and mode (ls -ld {where})"
             " and that the disk is mounted read-write.",
    )


def first_unwritable(*dirs: str) -> str:
    """The first of ``dirs`` this process cannot write (the one to name in an error), else the
    first. Only called once something failed."""
    return next((d for d in dirs if not os.access(d, os.W_OK)), dirs[0])


def write_new(path: str | Path, data: bytes, *, sync: bool = False) -> None:
    """Create ``path`` (0600, never following a symlink, never overwriting) holding ``data``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    os.close(fd)


def read_json(path: Path) -> dict | None:
    """A small JSON object file (a unique-key holder), or None if missing or not an object."""
    try:
        with open(path, "rb") as fh:
            data = json.loads(fh.read(65536))
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None
