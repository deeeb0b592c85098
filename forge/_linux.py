"""Thin wrappers over Linux calls the stdlib lacks: syncfs, inotify, prctl, POSIX timers and the
process tree under a child subreaper.

Each falls back to something portable (``os.sync``, polling) where the call is missing.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable
from typing import Any

_loaded: list[Any] = []


def _lib() -> Any:
    """libc through ctypes, loaded on first use: ``ctypes`` costs 3 ms, and a single dispatch
    needs none of this module."""
    if not _loaded:
        import ctypes

        try:
            # Not ctypes.util.find_library first: it runs `/sbin/ldconfig -p` in a subprocess (a
            # shell script on some distributions) in every process that calls it.
            lib = ctypes.CDLL("libc.so.6", use_errno=True)
        except OSError:  # pragma: no cover - non-glibc platforms
            import ctypes.util

            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            except OSError:
                lib = None
        _loaded.append(lib)
    return _loaded[0]


def _raise_errno(*extra: str) -> None:
    import ctypes

    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), *extra)


IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
#: Reported by ``Inotify.drain`` for a directory that is no longer watched (no file has it as name).
IGNORED = "/"
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


def syncfs(fd: int) -> None:
    """Flush every dirty page and inode of the filesystem holding ``fd``; raise on error."""
    libc = _lib()
    if libc is not None and hasattr(libc, "syncfs"):
        if libc.syncfs(fd) != 0:
            _raise_errno()
        return
    os.sync()  # pragma: no cover


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the pages of ``[offset, offset + length)`` of ``fd``, keeping its size and offsets
    (``fallocate(PUNCH_HOLE | KEEP_SIZE)``); False where that is not supported."""
    libc = _lib()
    fallocate = getattr(libc, "fallocate64", None) or getattr(libc, "fallocate", None)  # 64-bit offsets
    if fallocate is None or length <= 0:
        return False
    import ctypes

    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    return bool(fallocate(fd, 0x02 | 0x01, offset, length) == 0)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Inotify:
    """Watch directories for files created or moved in. ``fileno()`` is select()-able."""

    def __init__(self) -> None:
        libc = _lib()
        if libc is None or not hasattr(libc, "inotify_init1"):
            raise OSError("inotify is not available")
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            _raise_errno()
        self.fd = fd
        self.watches: dict[int, str] = {}

    def fileno(self) -> int:
        return self.fd

    def watch(self, path: str, tag: str) -> None:
        wd = _lib().inotify_add_watch(self.fd, os.fsencode(path), IN_CREATE | IN_MOVED_TO)
        if wd < 0:
            _raise_errno(path)
        self.watches[wd] = tag

    def drain(self) -> dict[str, list[str]] | None:
        """Names created or moved into each watched directory since the last call, by tag
        (non-blocking). A directory whose watch the kernel dropped (it was deleted) is
        forgotten and reported with ``IN_IGNORED`` among its names.

        ``None`` means the kernel's event queue overflowed: treat everything as changed.
        """
        changed: dict[str, list[str]] = {}
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return changed
            pos = 0
            while pos + _EVENT.size <= len(data):
                wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
                start = pos + _EVENT.size
                pos = start + length
                if mask & IN_Q_OVERFLOW:
                    return None
                tag = self.watches.get(wd)
                if tag is None:
                    continue
                names = changed.get(tag)
                if names is None:
                    names = changed[tag] = []
                if mask & IN_IGNORED:
                    del self.watches[wd]
                    names.append(IGNORED)
                elif length:
                    names.append(os.fsdecode(data[start:pos].rstrip(b"\0")))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def set_parent_death_signal(sig: int) -> None:
    """Deliver ``sig`` to this process when its parent dies (Linux PR_SET_PDEATHSIG)."""
    libc = _lib()
    if libc is not None:
        libc.prctl(1, sig, 0, 0, 0)


def set_child_subreaper() -> bool:
    """Make orphaned descendants of this process its children (PR_SET_CHILD_SUBREAPER), so
    that a job's daemons, whatever they do with sessions, stay findable and killable."""
    libc = _lib()
    return libc is not None and libc.prctl(36, 1, 0, 0, 0) == 0


def preload() -> None:
    """Load what the job process's set-up needs (ctypes, libc) before forking it."""
    import ctypes  # noqa: F401

    _lib()


CLOCK_BOOTTIME = 7  # counts time suspended, unlike CLOCK_MONOTONIC


def boottime() -> float:
    return time.clock_gettime(CLOCK_BOOTTIME)


class KillTimer:
    """A POSIX timer that sends SIGKILL to this process at a CLOCK_BOOTTIME instant.

    Job code cannot ignore, block or handle SIGKILL, and the kernel delivers it even to a
    stopped or frozen process, so a run whose deadline passed while it was frozen dies on
    thaw before it executes another instruction. (Timers do not survive ``exec``.)
    """

    def __init__(self, at: float) -> None:
        import ctypes

        libc = _lib()
        if libc is None or not hasattr(libc, "timer_create"):
            raise OSError("POSIX timers are not available")
        sigevent = (ctypes.c_byte * 64)()  # sigev_value 8, sigev_signo 4, sigev_notify 4 (SIGEV_SIGNAL=0)
        struct.pack_into("=qii", sigevent, 0, 0, 9, 0)
        self._id = ctypes.c_void_p()
        libc.timer_create.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        if libc.timer_create(CLOCK_BOOTTIME, ctypes.byref(sigevent), ctypes.byref(self._id)) != 0:
            _raise_errno("timer_create")
        libc.timer_settime.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        self.at = 0.0
        self.set(at)

    def set(self, at: float) -> None:
        """Fire at ``at`` (CLOCK_BOOTTIME seconds) instead; an instant passed fires at once."""
        import ctypes

        sec = max(int(at), 0)
        nsec = max(int((at - sec) * 1e9), 1) if at > 0 else 1
        spec = (ctypes.c_long * 4)(0, 0, sec, min(nsec, 999_999_999))
        if _lib().timer_settime(self._id, 1, ctypes.byref(spec), None) != 0:  # TIMER_ABSTIME
            _raise_errno("timer_settime")
        self.at = at


def descendants(pid: int | None = None, depth: int = 0) -> list[int]:
    """Every descendant of ``pid`` (default: this process), zombies included, parents before
    children; ``depth=1``: its children only."""
    root = os.getpid() if pid is None else pid
    found: list[int] = []
    level = [root]
    while level:
        level = [kid for parent in level for kid in _children(parent)]
        found.extend(level)
        if depth == 1:
            break
    return found


def c_environ() -> tuple[bytes, ...]:
    """The C library's environment (what a child gets), which ``os.putenv`` changes without
    touching ``os.environ``."""
    import ctypes

    env = ctypes.POINTER(ctypes.c_char_p).in_dll(_lib(), "environ")
    out = []
    i = 0
    while env[i]:
        out.append(env[i])
        i += 1
    return tuple(out)


def read_proc(path: str) -> bytes:
    """The whole of a small ``/proc`` file, in four system calls (``open()``'s buffered file
    adds an fstat, an ioctl and an lseek or two: the worker and its job process read a few of
    these per job). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(fd, 65536)
        if data:
            while more := os.read(fd, 65536):
                data += more
        return data
    finally:
        os.close(fd)


def posix_timers() -> int:
    """How many POSIX timers this process has (``/proc/self/timers``; -1 if unknown)."""
    try:
        return read_proc("/proc/self/timers").count(b"ID:")
    except OSError:
        return -1


def process_name() -> bytes:
    """This thread's name (``prctl(PR_GET_NAME)``: one system call; ``/proc/self/comm`` else)."""
    libc = _lib()
    if libc is not None:
        import ctypes

        buf = ctypes.create_string_buffer(17)
        if libc.prctl(16, buf, 0, 0, 0) == 0:  # PR_GET_NAME
            return buf.value + b"\n"  # as /proc/self/comm has it
    try:
        return read_proc("/proc/self/comm")
    except OSError:
        return b""


def main_thread_children(pid: int) -> list[int]:
    """The children of ``pid``'s main thread (those a single-threaded process has)."""
    try:
        return [int(k) for k in read_proc(f"/proc/{pid}/task/{pid}/children").split()]
    except OSError:
        return [-1]  # unknown: look closer


def is_zombie(pid: int) -> bool:
    """Whether ``pid`` has ended (a zombie awaiting its reaper, or gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return True


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                kids.extend(int(k) for k in fh.read().split())
        except OSError:
            continue
    return kids


def names_matching(names: Iterable[str], length: int) -> list[str]:
    return [n for n in names if len(n) >= length]
