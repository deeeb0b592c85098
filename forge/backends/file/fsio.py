"""Small-file I/O helpers shared by every part of the file backend (the façade and its parts):
whole-file reads of job files, exclusive creation of
new files, the microsecond unit of job-file keys, the flags and limits every part of the
file backend uses, and the checks that keep the directory tree its owner's alone.

Trust is decided on descriptors, never on a path looked up again: a directory is opened
without following a symlink and then ``fstat``ed (``private_dir``), a file is opened the same
way and its status checked (``distrust``) before a byte of it is read or written. A directory
of the tree that another user owns is refused (``QueueUnavailable``, exit code 6); one of ours
that others can reach is closed (mode 700) with a warning. Once every directory of a path is
ours and closed to others, nobody else can add, replace or move an entry in it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any

from forge.errors import QueueUnavailable
from forge.job import MAX_FILE_BYTES
from forge.privatefile import O_PEEK as O_PEEK  # a small file forge only reads: a marker
from forge.privatefile import read_trusted, read_upto

TMP_MAX_AGE = 3600.0
UNIQUE_INFLIGHT = 60.0
O_READ = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PRIVATE_DIR = O_DIR | os.O_NOFOLLOW
#: Why opening an existing job file failed, when the reason is the file itself (a symlink, a
#: directory, a FIFO, another user's file): it is quarantined. Any other error (a read-only
#: disk, I/O, out of descriptors) is the directory's or the process's, and the file is left.
FILE_ERRNOS = frozenset({errno.ELOOP, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENXIO,
                         errno.ENODEV, errno.ETXTBSY, errno.EOVERFLOW})


def micros(t: float) -> int:
    """Unix seconds as whole microseconds (the unit of job-file keys)."""
    return int(t * 1_000_000)


def read_whole(fd: int, size: int | None = None) -> bytes:
    """The whole job file open at ``fd`` (a job file is never over the cap; if it is, enough to
    tell so): ``forge.privatefile.read_upto``, sized by its length (``size``, else fstat), as
    ``pread(fd, MAX_FILE_BYTES + 1)`` would allocate 4 MiB for every read."""
    return read_upto(fd, os.fstat(fd).st_size if size is None else size, MAX_FILE_BYTES)


def open_error(exc: OSError) -> str:
    """Why a job file could not be opened, as a quarantine reason."""
    return "symbolic link" if exc.errno == errno.ELOOP else f"cannot open: {exc.strerror}"


def distrust(st: os.stat_result, uid: int, links: int = 1) -> str | None:
    """Why forge must not read or write the file it opened (status ``st``), or None: it is not a
    regular file, belongs to someone else, has another name somewhere, or others may write it."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != uid:
        return f"owned by uid {st.st_uid}, not {uid}"
    if st.st_nlink != links:
        return f"has {st.st_nlink} hard links"
    if st.st_mode & 0o022:
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def marker_set(path: str, uid: int) -> bool:
    """Whether the marker file ``path`` (a queue's ``paused``) is there and ours: one another
    user planted counts for nothing. One ``lstat``, as the existence check it replaces."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == uid


def open_lock(path: str | Path, uid: int) -> int:
    """Open (creating, 0600) a lock file forge keeps at the top of the queue directory. One
    that another user planted there is refused: she could hold its lock for ever."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in FILE_ERRNOS:
            raise unusable(exc, os.path.dirname(path), "lock") from None
        reason: str | None = open_error(exc)
    else:
        reason = distrust(os.fstat(fd), uid)
        if reason is None:
            return fd
        os.close(fd)
    raise QueueUnavailable(f"Cannot trust lock file {path} ({reason}): another user may have planted it.",
                           hint=f"Remove it (rm {path}); forge creates it afresh.")


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


def private_dir(path: str, uid: int, *, name: str | None = None, dir_fd: int | None = None,
                create: bool = True, root: bool = False) -> int:
    """Open the queue directory ``path`` (``name`` in ``dir_fd``, when given), creating it (0700)
    if missing and ``create``; return its descriptor once it is safe to use.

    Refused (``QueueUnavailable``): a symlink or anything else that is not a directory, and a
    directory that belongs to another user (``root``: the queue directory itself, which the
    user chose; otherwise an entry another user planted, so the fix is to move it aside). One
    of ours that group or others may enter is repaired to 700, with a warning: after the
    ``fchmod`` another user's open descriptor of it no longer lets her look anything up in it.
    ``FileNotFoundError`` if it is missing and not ``create``.
    """
    at = path if dir_fd is None else (name or path)
    try:
        try:
            fd = os.open(at, _O_PRIVATE_DIR, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                if root:
                    Path(path).mkdir(mode=0o700, parents=True)
                else:
                    os.mkdir(at, 0o700, dir_fd=dir_fd)
            fd = os.open(at, _O_PRIVATE_DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        if not create:
            raise
        raise QueueUnavailable(f"Cannot use queue directory {path}: it keeps disappearing.") from None
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise _not_a_directory(path, root) from None
        raise QueueUnavailable(
            f"Cannot use queue directory {path}: {exc.strerror}.",
            hint="Set [connections.file] path in forge.toml or FORGE_QUEUE_DIR." if root else
                 f"Check its owner and mode (ls -ld {path}) and that the disk is mounted read-write.",
        ) from None
    try:
        check_dir(fd, path, uid, root=root)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_dir(fd: int, path: str, uid: int, *, root: bool = False) -> None:
    """Refuse or repair the open directory ``fd`` (``path``), as ``private_dir`` describes."""
    st = os.fstat(fd)
    if st.st_uid != uid:
        if root:
            raise QueueUnavailable(
                f"Queue directory {path} belongs to uid {st.st_uid}, not to you (uid {uid});"
                " refusing to use it.",
                hint="Use a directory of your own: [connections.file] path in forge.toml or FORGE_QUEUE_DIR.",
            )
        raise QueueUnavailable(
            f"Queue directory {path} belongs to uid {st.st_uid}, not to you (uid {uid}):"
            " another user could read or change your jobs there; refusing to use it.",
            hint=f"Move it aside (mv {path} {path}.untrusted) or have it removed; forge then"
                 " creates it afresh.",
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        try:
            os.fchmod(fd, 0o700)
        except OSError as exc:
            raise QueueUnavailable(
                f"Queue directory {path} is accessible to other users (mode {mode:o}) and cannot"
                f" be repaired: {exc.strerror}.",
                hint=f"chmod 700 {path}",
            ) from None
        warnings.warn(f"Queue directory {path} was accessible to other users (mode {mode:o});"
                      " repaired to 700.", stacklevel=4)


def _not_a_directory(path: str, root: bool) -> QueueUnavailable:
    try:
        link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        link = False
    what = "a symbolic link" if link else "not a directory"
    if root:
        return QueueUnavailable(f"Queue directory {path} is {what}.",
                                hint="Point [connections.file] path or FORGE_QUEUE_DIR at a real directory.")
    return QueueUnavailable(
        f"Queue directory {path} is {what}, which forge never creates: another user may have"
        " planted it; refusing to use it.",
        hint=f"Remove it (rm {path}) or move it aside; forge then creates it afresh.",
    )


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


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object file (a unique-key holder), or None if missing, not an object, or
    not a regular file of ours that others cannot write (``forge.privatefile``: a planted
    holder counts as none, and is replaced). Two links are normal: a holder is link()ed into
    place before its temp name goes."""
    raw = read_trusted(path, 65536)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None
