"""Limits on the file backend (``forge.limits``, ``Limiter``): slots held with ``flock``, rates in files.

Layout under the queue directory::

    limits/slots/<h>/<n>    slot n of a scope (h: a hash of its name): a slot is held while a
                            process holds an flock on its file; the file names the holder
    limits/rates/<h>        a rate's theoretical arrival time (microseconds), changed under flock
    limits/names/<h>        the scope's name, for queue:limits
    limits/wait/<h>.<pid>/  a worker waiting for a slot of scope h (watched with inotify): a
                            release creates ``w`` in one of them, so one waiting worker wakes

A slot is held by the process that claimed the job, the worker (a direct run's isolation lock:
the ``forge`` process running the command), never by the job's own process, which has no
descriptor of it: it frees the moment the worker dies, with no TTL. A limited claim locks the
job file first (as every claim does), then takes every hold the job needs (slots without
blocking, rates last), then renames the file to reserved/: a job whose holds are not free is
left pending, untouched, with its attempts unchanged, and the claimer goes on to the next due
job, so jobs of other keys behind it are not held up. Blocked jobs are set aside for the rest of
the pass and tried again at the next one; the worker sleeps until the earliest time a rate
frees a token, a job arrives, or a release wakes it: each release wakes one of the workers
registered as waiting for that scope (``limits/wait``), not all of them. A waiting worker
registers before it looks once more, so a release cannot slip between its look and its sleep.
A slot freed by its holder's death wakes nobody: waiting workers find it at their next look
(``queue:work --sleep``, 3 s by default, or when the dead worker's job is recovered).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from forge.backends.base import Claim
from forge.backends.file.claim import (
    TAKEN,
    Claimer,
    JobFiles,
    OpenJob,
    claimable_job,
)
from forge.backends.file.fsio import (
    first_unwritable,
    marker_set,
    micros,
    private_dir,
    read_whole,
    unusable,
)
from forge.backends.file.layout import (
    FileLayout,
    QueueDirs,
    key_str,
    pending_name,
    reserved_name,
    split_pending,
)
from forge.errors import CorruptJob
from forge.job import Event
from forge.limits import REASON_ISOLATED
from forge.limits.spec import LimitsConfig, Need, job_limits

_BLOCKED = object()
_O_SLOT = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
#: A slot file's holder record, padded with spaces to this size (longer ones are cut by readers).
_HOLDER_BYTES = 512
#: Job ids whose own limits a worker remembers (a job's first line never changes).
_CACHE_MAX = 100_000


@dataclass
class FileHolds:
    """What a limited claim holds: locked slot files (closing them frees the slots)."""

    fds: list[int] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)


@dataclass
class Block:
    """Why a job cannot start now: the hold it could not take."""

    need: Need
    held: int = 0
    until: float | None = None  # a rate: when its next token frees


_hashes: dict[str, str] = {}


def scope_hash(scope: str) -> str:
    """The file name of a limit scope (a hash of its name: any scope is a safe name), memoised."""
    h = _hashes.get(scope)
    if h is None:
        if len(_hashes) >= 4096:
            _hashes.clear()
        h = _hashes[scope] = hashlib.sha256(scope.encode()).hexdigest()[:32]
    return h


class Limiter:
    """Limited claims, holds and their inspection on a job-file directory (``FileLayout``);
    claims go through ``claimer`` (its inotify watch and listings), files are checked by
    ``files``."""

    def __init__(self, lay: FileLayout, files: JobFiles, claimer: Claimer) -> None:
        self.lay = lay
        self.files = files
        self.claimer = claimer
        #: After a limited claim that returned None: the earliest time a rate frees a token for
        #: a blocked job (None: none is waiting on a rate), and whether any due job was held back.
        self.limits_wake_at: float | None = None
        self.limits_blocked = False
        self._lim_fds: dict[str, int] = {}
        self._lim_slot_dirs: dict[str, int] = {}
        self._lim_waits: dict[str, str] = {}
        self._lim_parked: dict[str, list[str]] = {}
        self._lim_cache: dict[str, Any] = {}

    # -- layout -----------------------------------------------------------------------------

    def _lim_fd(self, sub: str) -> int:
        fds = self._lim_fds
        fd = fds.get(sub)
        if fd is None:
            top = fds.get("")
            if top is None:
                top = fds[""] = private_dir(f"{self.lay.path}/limits", self.lay.uid)
            fd = top if not sub else private_dir(f"{self.lay.path}/limits/{sub}", self.lay.uid, name=sub, dir_fd=top)
            fds[sub] = fd
        return fd

    def _slot_dir(self, scope: str) -> int:
        """The directory of a scope's slot files (kept open: a worker uses few scopes)."""
        dirs = self._lim_slot_dirs
        fd = dirs.get(scope)
        if fd is None:
            h = scope_hash(scope)
            self._name_scope(h, scope)
            fd = private_dir(f"{self.lay.path}/limits/slots/{h}", self.lay.uid, name=h, dir_fd=self._lim_fd("slots"))
            if len(dirs) >= 256:
                for old in list(dirs.values()):
                    with contextlib.suppress(OSError):
                        os.close(old)
                dirs.clear()
            dirs[scope] = fd
        return fd

    def _name_scope(self, h: str, scope: str) -> None:
        names = self._lim_fd("names")
        with contextlib.suppress(FileExistsError):
            fd = os.open(h, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=names)
            try:
                os.write(fd, scope.encode())
            finally:
                os.close(fd)

    def _waiting(self, scopes: set[str]) -> bool:
        """Be registered as waiting for exactly ``scopes`` (``limits/wait/<h>.<pid>``, each
        watched by this worker's inotify); True if one was added (then look once more)."""
        mine = self._lim_waits
        if self.claimer.inotify is None:
            return False
        wait = self._lim_fd("wait")
        added = False
        for scope in scopes - mine.keys():
            name = f"{scope_hash(scope)}.{os.getpid()}"
            try:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o700, dir_fd=wait)
                self.claimer.inotify.watch(f"{self.lay.path}/limits/wait/{name}", "\0limits")
            except OSError:
                continue
            mine[scope] = name
            added = True
        for scope in mine.keys() - scopes:
            _remove_waiter(wait, mine.pop(scope))
        for name in mine.values():  # a wake-up seen: clear it, so the next one is seen too
            with contextlib.suppress(OSError):
                os.unlink(f"{name}/w", dir_fd=wait)
        return added

    def drop_waits(self) -> None:
        """No longer wait for any slot (a worker's backend closing)."""
        mine = self._lim_waits
        if mine:
            wait = self._lim_fd("wait")
            for name in mine.values():
                _remove_waiter(wait, name)
            mine.clear()

    def _wake(self, scopes: Sequence[str]) -> None:
        """Wake one worker waiting for each of ``scopes`` (a live one: the dead are removed)."""
        try:
            wait = self._lim_fd("wait")
            if os.fstat(wait).st_nlink <= 2:  # no sub-directory: nobody waits
                return
            names = os.listdir(wait)
        except OSError:
            return
        for scope in scopes:
            h = scope_hash(scope) + "."
            for name in sorted(n for n in names if n.startswith(h)):
                pid = name[len(h):]
                if not pid.isdigit() or int(pid) == os.getpid():
                    continue
                if not _alive(int(pid)):
                    _remove_waiter(wait, name)
                    continue
                try:
                    os.close(os.open(f"{name}/w", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                                     dir_fd=wait))
                    break
                except OSError:
                    continue

    # -- holds ------------------------------------------------------------------------------

    def take_holds(self, needs: Sequence[Need], holder: dict[str, Any], now: float) -> tuple[FileHolds | None, Block | None]:
        """Take every hold in ``needs`` (slots first, without blocking; rates last), or none:
        then the first one that could not be taken."""
        holds = FileHolds()
        info = json.dumps({**holder, "pid": os.getpid(), "host": socket.gethostname(), "since": now}).encode()
        try:
            for need in needs:
                if need.kind != "slot":
                    continue
                fd = self._take_slot(need, info)
                if fd is None:
                    self.release_holds(holds, wake=False)
                    return None, Block(need, held=need.max)
                holds.fds.append(fd)
                holds.scopes.append(need.scope)
            rates = [n for n in needs if n.kind == "rate"]
            if rates:
                block = self._take_tokens(rates, now)
                if block is not None:
                    self.release_holds(holds, wake=False)
                    return None, block
        except BaseException:
            self.release_holds(holds, wake=False)
            raise
        return holds, None

    def _take_slot(self, need: Need, info: bytes) -> int | None:
        d = self._slot_dir(need.scope)
        for i in range(need.max):
            fd = os.open(str(i), _O_SLOT, 0o600, dir_fd=d)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            with contextlib.suppress(OSError):  # padded, not truncated: ftruncate may wait for the disk
                os.pwrite(fd, info.ljust(_HOLDER_BYTES), 0)
            return fd
        return None

    def _take_tokens(self, rates: Sequence[Need], now: float) -> Block | None:
        """Take one token of every rate, under their files' locks (in scope order), or none."""
        rdir = self._lim_fd("rates")
        fds: list[tuple[Need, int, int]] = []
        try:
            for need in sorted(rates, key=lambda n: n.scope):
                h = scope_hash(need.scope)
                self._name_scope(h, need.scope)
                fd = os.open(h, _O_SLOT, 0o600, dir_fd=rdir)
                fds.append((need, fd, 0))
                if not _lock_briefly(fd):  # its holder is stopped mid-update: count it as held back
                    return Block(need, until=now + 0.1)
            now_us = micros(now)
            new = []
            for need, fd, _ in fds:
                assert need.rate is not None
                tat = _read_int(fd)
                interval = round(need.rate.interval * 1_000_000)
                allowed_at = tat - (need.rate.burst - 1) * interval
                if allowed_at > now_us:
                    return Block(need, until=allowed_at / 1_000_000)
                new.append((fd, max(tat, now_us) + interval))
            for fd, tat in new:
                data = str(tat).encode()
                os.pwrite(fd, data.ljust(20), 0)
            return None
        finally:
            for _, fd, _ in fds:
                os.close(fd)  # also unlocks

    def release_holds(self, holds: Any, *, wake: bool = True) -> None:
        """Free what a claim held (idempotent); wake a worker waiting for a slot."""
        if not isinstance(holds, FileHolds):
            return
        fds, holds.fds = holds.fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        if fds and wake:
            self._wake(holds.scopes)

    def renew_holds(self, claim: Claim) -> bool:
        """Always True: an flock needs no renewal."""
        return True  # an flock needs no renewal

    # -- claiming ---------------------------------------------------------------------------

    def claim_limited(self, queues: Sequence[str], worker: str, timeout: float, cfg: LimitsConfig) -> Claim | None:
        """``claim`` through the limits: the first due job, in priority and FIFO order, whose
        holds are free; jobs that must wait stay pending, their attempts untouched."""
        self.claimer.watch(queues)
        for again in (True, False):
            self.claimer.refresh()
            self.limits_wake_at, self.limits_blocked = None, False
            now = time.time()
            now_key = key_str(micros(now))
            parked = self._lim_parked
            slots: set[str] = set()  # the slot scopes that held a job back
            for name in queues:
                q = self.lay.open_queues.get(name) or self.lay.queue(name)
                for n in parked.pop(name, ()):  # set aside by the last pass: try them again
                    q.listing.add(n)
                if marker_set(q.paused, self.lay.uid):
                    continue
                claim = self._claim_limited_queue(q, worker, timeout, cfg, now, now_key, parked, slots)
                if claim is not None:
                    self._waiting(set())
                    return claim
            if not (self._waiting(slots) and again):
                break  # registered for every scope it waits on before this look: sleep
        return None

    def _claim_limited_queue(self, q: QueueDirs, worker: str, timeout: float, cfg: LimitsConfig, now: float,
                             now_key: str, parked: dict[str, list[str]], slots: set[str]) -> Claim | None:
        cache = self._lim_cache
        blocked: set[str] = set()
        aside: list[str] = []
        relisted = False
        try:
            while True:
                entry = q.listing.next_due(now_key)
                if entry is None:
                    if relisted or not q.listing.dirty:
                        break
                    q = self.claimer.relist(q)
                    aside.clear()  # listed afresh: they are back in the listing
                    relisted = True
                    continue
                name = entry[0]
                own = cache.get(name[17:53], TAKEN)
                if own is not TAKEN and blocked and any(n.scope in blocked and not n.drop for n in cfg.needs(q.name, own)):
                    aside.append(name)
                    continue
                try:
                    got = self._claim_limited_one(q, name, worker, timeout, now, cfg, cache, blocked, slots)
                except BaseException:
                    q.listing.dirty = True
                    raise
                if got is _BLOCKED:
                    aside.append(name)
                elif got is TAKEN:
                    if entry[1]:
                        q.listing.skip(now_key)
                elif isinstance(got, Claim):
                    return got
        finally:
            if aside:
                parked.setdefault(q.name, []).extend(aside)
                self.limits_blocked = True
        return None

    def _claim_limited_one(self, q: QueueDirs, name: str, worker: str, timeout: float, now: float,
                           cfg: LimitsConfig, cache: dict[str, Any], blocked: set[str], slots: set[str]) -> Any:
        """``Claimer.claim_one`` with the job's holds taken between locking the file and renaming it."""
        opened = self.files.lock_pending(q, name)
        if not isinstance(opened, OpenJob):
            return opened
        fd, st = opened
        pfd = q.fds[0]
        holds: FileHolds | None = None
        try:
            job_id, attempts = split_pending(name)
            data = read_whole(fd, st.st_size)
            try:
                job = claimable_job(data, job_id, q.name)
            except CorruptJob as exc:
                os.close(fd)
                fd = -1
                self.files.quarantine(q.pending, name, str(exc))
                return None
            own = job_limits(job.metadata)
            if len(cache) >= _CACHE_MAX:
                cache.clear()
            cache[job_id] = own
            needs = cfg.needs(q.name, own)
            drop: Block | None = None
            if needs:
                holds, block = self.take_holds(needs, {"job": job_id, "queue": q.name, "worker": worker}, now)
                if block is not None:
                    blocked.add(block.need.scope)
                    if block.until is None and not block.need.drop:
                        slots.add(block.need.scope)
                    if block.until is not None:
                        self.limits_wake_at = min(self.limits_wake_at or block.until, block.until)
                    if not block.need.drop:
                        return _BLOCKED
                    drop = block
            attempt = attempts + 1
            reserved = reserved_name(job_id, attempt)
            try:
                os.rename(name, reserved, src_dir_fd=pfd, dst_dir_fd=q.fds[1])
            except FileNotFoundError:
                return TAKEN
            except OSError as exc:
                raise unusable(exc, first_unwritable(q.pending, q.reserved), "claim jobs from") from None
            try:
                claim = self.claimer.begin(fd, st.st_size, q, reserved, job, attempt, worker, timeout, now)
            finally:
                fd = -1  # the claim owns it now, or begin closed it
            if drop is not None:
                self.claimer.fail(claim, Event("failed", attempt, time.time(), worker=worker, reason=REASON_ISOLATED,
                                       error=f"{drop.need.label} was held by another run; dropped (on_busy=drop)"))
                return None
            claim.holds = holds
            holds = None
            return claim
        finally:
            if holds is not None:
                self.release_holds(holds, wake=False)
            if fd >= 0:
                os.close(fd)

    def hand_back(self, claim: Claim) -> None:
        """Put a job that a plain claim took back where it was, its attempt un-counted (a job
        with limits of its own, claimed by a worker that was not yet claiming through them)."""
        self.claimer.finish(claim, None, "pending", pending_name(micros(claim.job.available_at), claim.job.id,
                                                          claim.attempt - 1))

    # -- inspection -------------------------------------------------------------------------

    def limit_scopes(self) -> list[str]:
        """Every scope that has held a slot or a rate here."""
        try:
            names = self._lim_fd("names")
            out = []
            for h in os.listdir(names):
                with contextlib.suppress(OSError):
                    fd = os.open(h, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=names)
                    try:
                        out.append(os.read(fd, 4096).decode())
                    finally:
                        os.close(fd)
            return sorted(out)
        except OSError:
            return []

    def slot_holders(self, scope: str) -> list[dict[str, Any]]:
        """The holders of a scope's slots: who holds each locked slot file (read from
        /proc/locks, so looking never takes a slot from a claimer)."""
        locked = _flocked()
        path = f"{self.lay.path}/limits/slots/{scope_hash(scope)}"
        try:
            names = os.listdir(path)
        except OSError:
            return []
        out = []
        for n in sorted(names, key=lambda s: int(s) if s.isdigit() else 0):
            try:
                fd = os.open(f"{path}/{n}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) not in locked:
                    continue
                try:
                    info = json.loads(os.pread(fd, _HOLDER_BYTES, 0).strip() or b"{}")
                except ValueError:
                    info = {}
                out.append({"slot": int(n) if n.isdigit() else n, **(info if isinstance(info, dict) else {})})
            finally:
                os.close(fd)
        return out

    def rate_state(self, scope: str) -> float | None:
        """When a rate's bucket is next empty of debt (its theoretical arrival time), or None."""
        try:
            fd = os.open(f"{self.lay.path}/limits/rates/{scope_hash(scope)}", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            tat = _read_int(fd)
        finally:
            os.close(fd)
        return tat / 1_000_000 if tat else None

    # -- a direct run's isolation lock -------------------------------------------------------

    def lock_scope(self, need: Need, holder: dict[str, Any]) -> FileHolds | None:
        """Take a slot for a run outside any worker (``forge NAME --isolated``), or None."""
        holds, _ = self.take_holds([need], holder, time.time())
        return holds


def _lock_briefly(fd: int, patience: float = 1.0) -> bool:
    """flock ``fd``, waiting at most ``patience`` seconds (a rate's update takes microseconds;
    a holder that takes longer is stopped, and must not stop every other worker)."""
    end = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= end:
                return False
            time.sleep(0.001)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_waiter(wait: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(f"{name}/w", dir_fd=wait)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=wait)


def _read_int(fd: int) -> int:
    try:
        return int(os.pread(fd, 32, 0).strip() or 0)
    except ValueError:
        return 0


def _flocked() -> set[tuple[int, int, int]]:
    """(major, minor, inode) of every file an flock is held on, from /proc/locks."""
    out: set[tuple[int, int, int]] = set()
    try:
        with open("/proc/locks") as fh:
            for line in fh:
                parts = line.split()
                if len(parts) < 6 or parts[1] != "FLOCK" or parts[2] == "->":
                    continue
                dev = parts[5].split(":")
                if len(dev) == 3:
                    with contextlib.suppress(ValueError):
                        out.add((int(dev[0], 16), int(dev[1], 16), int(dev[2])))
    except OSError:
        pass
    return out


__all__ = ["Block", "FileHolds", "Limiter", "scope_hash"]
