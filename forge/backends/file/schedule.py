"""Schedule state in the file backend: ``schedule/state.json`` under the queue directory.

One JSON object ``{"v": 1, "entries": {name: state}}``, replaced atomically (written to a new
temp file, fsynced, renamed over the old one, the directory fsynced), so a kill at any point
leaves the old state or the new one. Every read-modify-write holds ``schedule/lock`` (flock);
a scheduler run holds it for the whole run (``session``), so runs on one host take turns.

As everywhere in the file backend, trust is decided on descriptors: ``schedule/`` is opened
without following a symlink and must be ours and closed to others (``private_dir``); the state
file is opened without following a symlink and must be a regular file of ours with one link that
others cannot write, else the store is refused (``QueueUnavailable``) rather than steered by a
planted file. The last run is never kept as a file time (clock fakers do not fake file times).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from forge.backends.file.fsio import O_NEW, O_PEEK, distrust, open_lock, private_dir, unusable
from forge.errors import QueueUnavailable
from forge.scheduler.state import STATE_VERSION, EntryState, Updater

DIR = "schedule"
STATE = "state.json"
#: The largest state file read (about 1,000 bytes per entry).
MAX_STATE_BYTES = 64 * 1024 * 1024


class FileScheduleStore:
    """``ScheduleStore`` over a ``FileBackend``'s queue directory."""

    def __init__(self, backend: Any) -> None:
        self.root = str(backend.root)
        self.uid: int = backend.uid
        self.path = f"{self.root}/{DIR}"
        self._dirfd: int | None = None
        self._lockfd: int | None = None
        self._depth = 0
        #: The entries as last read or written while the lock is held (nobody else can change
        #: them then): a run reads the file once, not once per step.
        self._held: dict[str, Any] | None = None
        self._parsed: dict[str, EntryState] = {}  # the states of _held, parsed

    # -- layout --------------------------------------------------------------------------------

    def _dir(self) -> int:
        if self._dirfd is None:
            rfd = private_dir(self.root, self.uid, root=True)
            try:
                self._dirfd = private_dir(self.path, self.uid, name=DIR, dir_fd=rfd)
            finally:
                os.close(rfd)
        return self._dirfd

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Hold ``schedule/lock`` (re-entrant within this object)."""
        if self._depth == 0:
            dfd = self._dir()
            fd = open_lock(f"{self.path}/lock", self.uid)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._lockfd = fd
            del dfd
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0 and self._lockfd is not None:
                self._held, self._parsed = None, {}
                os.close(self._lockfd)  # releases the lock
                self._lockfd = None

    # -- state ---------------------------------------------------------------------------------

    def _load(self) -> dict[str, Any]:
        """The stored entries (name -> state dict); do not change the result in place."""
        if self._held is not None and self._lockfd is not None:
            return self._held
        entries = self._read_file()
        if self._lockfd is not None:
            self._held, self._parsed = entries, {}
        return entries

    def _read_file(self) -> dict[str, Any]:
        dfd = self._dir()
        where = f"{self.path}/{STATE}"
        try:
            fd = os.open(STATE, O_PEEK, dir_fd=dfd)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise QueueUnavailable(f"Cannot read schedule state {where}: {exc.strerror}.",
                                   hint=f"Move it aside (mv {where} {where}.bad); forge starts afresh.") from None
        try:
            st = os.fstat(fd)
            reason = distrust(st, self.uid)
            if reason is not None:
                raise QueueUnavailable(
                    f"Cannot trust schedule state {where} ({reason}): another user may have planted it.",
                    hint=f"Remove it (rm {where}); forge starts the schedule afresh (no past tick runs again"
                         " beyond the on-time minute).")
            data = os.pread(fd, min(st.st_size, MAX_STATE_BYTES) + 1, 0)
        finally:
            os.close(fd)
        try:
            doc = json.loads(data)
        except ValueError:
            raise QueueUnavailable(f"Schedule state {where} is not valid JSON.",
                                   hint=f"Move it aside (mv {where} {where}.bad); forge starts afresh.") from None
        entries = doc.get("entries") if isinstance(doc, dict) else None
        return entries if isinstance(entries, dict) else {}

    def _store(self, entries: dict[str, Any]) -> None:
        dfd = self._dir()
        tmp = f"{STATE}.{os.getpid()}.tmp"
        data = json.dumps({"v": STATE_VERSION, "entries": entries}, separators=(",", ":"),
                          sort_keys=True).encode()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)  # left by a killed run of a process with our pid
            fd = os.open(tmp, O_NEW, 0o600, dir_fd=dfd)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, STATE, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
            if self._lockfd is not None:
                self._held = entries  # update() files the parsed states that it wrote
        except OSError as exc:
            self._held, self._parsed = None, {}
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise unusable(exc, self.path, "write schedule state in") from None

    def _state(self, entries: dict[str, Any], name: str) -> EntryState:
        """The state of ``name`` in ``entries`` (parsed once while the lock is held)."""
        if entries is not self._held:
            return EntryState.from_dict(entries.get(name))
        got = self._parsed.get(name)
        if got is None:
            got = self._parsed[name] = EntryState.from_dict(entries.get(name))
        return got

    def read(self, names: Iterable[str] | None = None) -> dict[str, EntryState]:
        """``ScheduleStore.read``: the states of ``names`` (every entry when None) that the file
        has."""
        entries = self._load()
        wanted = entries if names is None else [n for n in names if n in entries]
        return {n: self._state(entries, n) for n in wanted}

    def update(self, names: Iterable[str], fn: Updater) -> dict[str, EntryState]:
        """``ScheduleStore.update``: ``fn`` is given the current states of ``names`` under the
        lock; what it returns is written atomically. Returns every named state after the update."""
        names = list(names)
        with self.session():
            held = self._load()
            cur = {n: self._state(held, n) for n in names}
            new = fn(cur)
            if new:
                entries = dict(held)
                for n, s in new.items():
                    entries[n] = s.to_dict()
                self._store(entries)
                self._parsed = {**self._parsed, **new} if self._held is entries else {}
            return {n: new.get(n, cur[n]) for n in names}

    def names(self) -> list[str]:
        """``ScheduleStore.names``: the names of every entry in the state file."""
        return list(self._load())

    def drop(self, names: Iterable[str], fn: Callable[[EntryState], bool]) -> list[str]:
        """``ScheduleStore.drop``: delete the entries of ``names`` for which ``fn`` is true, under
        the lock; returns their names."""
        with self.session():
            held = self._load()
            gone = [n for n in names if n in held and fn(self._state(held, n))]
            if gone:
                entries = {n: v for n, v in held.items() if n not in gone}
                self._store(entries)
                self._parsed = {n: v for n, v in self._parsed.items() if n not in gone}
            return gone

    def close(self) -> None:
        """Release the lock, if held, and close the directory's descriptor."""
        if self._lockfd is not None:
            os.close(self._lockfd)
            self._lockfd = None
        if self._dirfd is not None:
            os.close(self._dirfd)
            self._dirfd = None
