"""Reading a file only if forge can trust it: written once, for every reader that needs it.

A file forge trusts (a cache, a job file, a unique-key holder) is a regular file owned by the
running user, opened without following a symbolic link (and without blocking on a FIFO), and,
unless the caller says otherwise, not writable by group or others. The checks are made on the
open descriptor (``fstat``), never on the path looked up again, so nothing can be swapped in
between the check and the read. Standard library only: the dispatch fast path imports it.
"""

from __future__ import annotations

import os
import stat

#: How forge opens a file it only reads: never through a symlink, never blocking on a FIFO.
O_PEEK = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def trusted_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory (not a symlink to one) of the running user that group
    and others cannot write; False if it is missing or cannot be looked at."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def read_upto(fd: int, size: int, cap: int) -> bytes:
    """The contents of the open file ``fd`` of ``size`` bytes (its ``fstat`` size), at most
    ``cap + 1`` bytes: a file that grew past ``size`` is read again up to that, so a caller
    can tell a file over ``cap`` by the length. The buffer is sized by ``size``, not ``cap``."""
    want = min(size, cap) + 1
    data = os.pread(fd, want, 0)
    if len(data) == want:  # it grew meanwhile, or is over the cap
        data = os.pread(fd, cap + 1, 0)
    return data


def read_trusted(path: str | os.PathLike[str], cap: int, *, uid: int | None = None,
                 writable_by_others: bool = False) -> bytes | None:
    """The bytes of ``path`` if it is a regular file owned by ``uid`` (default: the running
    user), at most ``cap`` bytes long when opened, and (unless ``writable_by_others``) not
    writable by group or others; None if it is missing, unreadable or fails a check. Opened
    with ``O_PEEK``; checked on the open descriptor. Never raises ``OSError``."""
    try:
        fd = os.open(path, O_PEEK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_uid != (os.getuid() if uid is None else uid)
                or (not writable_by_others and st.st_mode & 0o022) or st.st_size > cap):
            return None
        return read_upto(fd, st.st_size, cap)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_private(path: str | os.PathLike[str], cap: int) -> bytes | None:
    """``read_trusted(path, cap)``, but only in a ``trusted_dir``: a file of the user's that
    nobody else can write or replace (a cache). None otherwise; never raises ``OSError``."""
    if not trusted_dir(os.path.dirname(os.fspath(path)) or "."):
        return None
    return read_trusted(path, cap)
