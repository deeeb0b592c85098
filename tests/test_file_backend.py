"""File-backend specifics: permissions, hostile job files, durability, crashes and concurrency."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
from conftest import PROBE_PROJECT
from reliability.harness import fill_disk
from reliability.scripts import CLAIMER
from waitfor import wait_for

from forge.backends.base import Claim
from forge.backends.file.backend import FileBackend
from forge.errors import DispatchFailed, DuplicateJob, QueueUnavailable, UsageError
from forge.job import Event, Job, State
from forge.queue import QueuedCommand

NOBODY = 65534
WORKER = "w"
STRACE = shutil.which("strace")


def job(queue: str = "default", *args: str, **kw: object) -> Job:
    cmd = QueuedCommand("demo:sleep").with_args(list(args or ("0",)))
    if "max_attempts" in kw:
        cmd = cmd.with_max_attempts(kw["max_attempts"])  # type: ignore[arg-type]
    return cmd.to_job(queue)


@pytest.fixture
def qdir(tmp_path: Path) -> Path:
    return tmp_path / "q"


@pytest.fixture
def fb(qdir: Path) -> FileBackend:
    b = FileBackend(qdir)
    yield b
    b.close()


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def drain(b: FileBackend, queue: str = "default") -> list[str]:
    got = []
    while (c := b.claim([queue], WORKER, 60)) is not None:
        got.append(c.job.id)
        b.ack(c, Event("done", c.attempt, time.time()))
    return got


def needs_root() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root: to make files of another user (uid 65534), or to become one")


# -- permissions ----------------------------------------------------------------------------


def test_directory_0700_and_files_0600(fb: FileBackend, qdir: Path) -> None:
    j = QueuedCommand("demo:sleep").with_args(["0"]).with_unique_key("k").to_job("default")
    fb.push([j])
    fb.append_log(j.id, b"out")
    dirs = [qdir, *[p for p in qdir.rglob("*") if p.is_dir()]]
    assert dirs and all(mode(d) == 0o700 for d in dirs), {str(d): oct(mode(d)) for d in dirs}
    c = fb.claim(["default"], WORKER, 60)
    assert c is not None
    fb.ack(c, Event("done", 1, time.time()))
    fb.pause("other")
    fb.request_restart()
    (qdir / "q" / "default" / "pending" / "bad name").write_bytes(b"x")
    with pytest.warns(UserWarning, match="Quarantined"):
        assert fb.claim(["default"], WORKER, 60) is None
    files = [p for p in qdir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".reason" for p in files) and any(p.name == "restart" for p in files)
    assert all(mode(p) == 0o600 for p in files if not p.name.endswith("bad name")), \
        {str(p): oct(mode(p)) for p in files}


def test_open_directory_is_repaired_with_a_warning(qdir: Path) -> None:
    qdir.mkdir()
    os.chmod(qdir, 0o777)
    with pytest.warns(UserWarning, match="repaired to 700"):
        FileBackend(qdir)
    assert mode(qdir) == 0o700
    os.chmod(qdir, 0o720)
    with pytest.warns(UserWarning, match="accessible to other users"):
        FileBackend(qdir)
    assert mode(qdir) == 0o700


def test_directory_of_another_user_is_refused(qdir: Path) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to chown")
    qdir.mkdir(mode=0o700)
    os.chown(qdir, NOBODY, NOBODY)
    with pytest.raises(QueueUnavailable, match=f"uid {NOBODY}") as err:
        FileBackend(qdir)
    assert str(qdir) in str(err.value)


def test_queue_dir_that_is_a_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(QueueUnavailable):
        FileBackend(tmp_path / "f")


def test_names_are_validated_before_paths_are_built(fb: FileBackend, qdir: Path) -> None:
    for bad in ("../x", "..", "a/b", "/etc"):
        with pytest.raises(UsageError):
            fb.claim([bad], WORKER, 60)
        with pytest.raises(UsageError):
            fb.pause(bad)
        with pytest.raises(UsageError):
            fb.clear(bad)
    with pytest.raises(UsageError):
        fb.find("../../etc/passwd")
    with pytest.raises(UsageError):
        fb.read_log("../x")
    assert not (qdir.parent / "x").exists()


# -- hostile files --------------------------------------------------------------------------


def valid_blob(queue: str = "default") -> tuple[str, bytes]:
    j = job(queue)
    return j.id, j.to_json()


def hostile_name(job_id: str | None = None) -> str:
    return f"{1:016d}-{job_id or uuid.uuid4()}-0.job"  # sorts before every real job


def _plain(content: bytes):
    def make(pending: Path, outside: Path) -> Path:
        p = pending / hostile_name()
        p.write_bytes(content)
        os.chmod(p, 0o600)
        return p
    return make


def _record(**changes: object):
    def make(pending: Path, outside: Path) -> Path:
        import json

        jid, blob = valid_blob()
        d = json.loads(blob)
        d.update(changes)
        p = pending / hostile_name(jid)
        p.write_text(json.dumps(d) + "\n")
        return p
    return make


def _truncated(pending: Path, outside: Path) -> Path:
    jid, blob = valid_blob()
    p = pending / hostile_name(jid)
    p.write_bytes(blob[: len(blob) // 2])
    return p


def _symlink(pending: Path, outside: Path) -> Path:
    jid, blob = valid_blob()
    outside.write_bytes(blob)
    p = pending / hostile_name(jid)
    p.symlink_to(outside)
    return p


def _hardlink(pending: Path, outside: Path) -> Path:
    jid, blob = valid_blob()
    outside.write_bytes(blob)
    os.chmod(outside, 0o600)
    p = pending / hostile_name(jid)
    os.link(outside, p)
    return p


def _fifo(pending: Path, outside: Path) -> Path:
    p = pending / hostile_name()
    os.mkfifo(p, 0o600)
    return p


def _foreign(pending: Path, outside: Path) -> Path:
    if os.getuid() != 0:
        pytest.skip("needs root to chown")
    jid, blob = valid_blob()
    p = pending / hostile_name(jid)
    p.write_bytes(blob)
    os.chown(p, NOBODY, NOBODY)
    return p


def _others_may_write(pending: Path, outside: Path) -> Path:
    jid, blob = valid_blob()
    p = pending / hostile_name(jid)
    p.write_bytes(blob)
    os.chmod(p, 0o666)  # anyone could have changed what it runs
    return p


def _mismatched(pending: Path, outside: Path) -> Path:
    _, blob = valid_blob()
    p = pending / hostile_name()  # a name whose id is not the record's
    p.write_bytes(blob)
    return p


def _other_queue(pending: Path, outside: Path) -> Path:
    jid, blob = valid_blob("elsewhere")
    p = pending / hostile_name(jid)
    p.write_bytes(blob)
    return p


def _bad_name(pending: Path, outside: Path) -> Path:
    _, blob = valid_blob()
    p = pending / "evil; rm -rf.job"
    p.write_bytes(blob)
    return p


def _directory(pending: Path, outside: Path) -> Path:
    p = pending / hostile_name()
    p.mkdir()
    return p


HOSTILE = {
    "empty": _plain(b""),
    "truncated-json": _truncated,
    "bad-utf8": _plain(b'{"v":1,"id":"\xff\xfe"}\n'),
    "10MB": _plain(b"{" + b" " * (10 * 1024 * 1024) + b"}"),
    "unknown-field": _record(extra="surprise"),
    "wrong-type-args": _record(args="rm -rf /"),
    "wrong-type-attempts": _record(max_attempts="3"),
    "bool-attempts": _record(max_attempts=True),
    "zero-attempts": _record(max_attempts=0),
    "bad-id": _record(id="../../etc/passwd"),
    "future-version": _record(v=99),
    "not-an-object": _plain(b"[1, 2, 3]\n"),
    "deep-nesting": _plain(b"[" * 100000),
    "symlink": _symlink,
    "hardlink": _hardlink,
    "fifo": _fifo,
    "other-owner": _foreign,
    "others-may-write": _others_may_write,
    "pickle": _plain(pickle.dumps({"v": 1, "command": "demo:sleep"}) + b"\n"),
    "name-id-mismatch": _mismatched,
    "other-queue-record": _other_queue,
    "bad-name": _bad_name,
    "directory": _directory,
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_file_is_quarantined_and_valid_jobs_flow(fb: FileBackend, qdir: Path, tmp_path: Path,
                                                         kind: str) -> None:
    fb.push([job()])
    before = job()
    pending = qdir / "q" / "default" / "pending"
    outside = tmp_path / "outside.job"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        list(fb.jobs())  # listing never crashes on hostile files
        fb.stats()
    hostile = HOSTILE[kind](pending, outside)
    outside_before = outside.read_bytes() if outside.exists() else None
    fb.push([before])
    with pytest.warns(UserWarning, match="Quarantined"):
        got = drain(fb)
    assert len(got) == 2 and before.id in got
    assert not os.path.lexists(hostile)
    quarantined = [p for p in (qdir / "quarantine").iterdir() if not p.name.endswith(".reason")]
    assert len(quarantined) == 1, quarantined
    reason = Path(str(quarantined[0]) + ".reason")
    text = reason.read_text()
    assert text.startswith(str(qdir / "q" / "default")) and text.split(": ", 1)[1].strip(), text
    if outside_before is not None:  # a link's target is never touched
        assert outside.read_bytes() == outside_before
    assert fb.claim(["default"], WORKER, 60) is None
    assert fb.stats()[0].pending == 0


def test_hostile_file_in_reserved_is_quarantined_by_maintain(fb: FileBackend, qdir: Path) -> None:
    (qdir / "q" / "default" / "reserved").mkdir(parents=True, exist_ok=True)
    (qdir / "q" / "default" / "reserved" / f"{uuid.uuid4()}-1.job").write_bytes(b"garbage")
    (qdir / "q" / "default" / "reserved" / "x.job").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="Quarantined"):
        fb.maintain()
    assert os.listdir(qdir / "q" / "default" / "reserved") == []
    assert len(list((qdir / "quarantine").glob("*.reason"))) == 2


# -- another user (issue 11, item 12) ---------------------------------------------------------


def foreign(p: Path, mode: int = 0o666) -> Path:
    os.chmod(p, mode)
    os.chown(p, NOBODY, NOBODY, follow_symlinks=False)
    return p


def test_a_log_file_another_user_planted_is_never_written_nor_read(fb: FileBackend, qdir: Path,
                                                                     tmp_path: Path) -> None:
    needs_root()
    hers, link, target = str(uuid.uuid4()), str(uuid.uuid4()), tmp_path / "elsewhere"
    (qdir / "logs" / f"{hers}.log").write_bytes(b"")
    foreign(qdir / "logs" / f"{hers}.log")
    target.write_bytes(b"")
    (qdir / "logs" / f"{link}.log").symlink_to(target)
    with pytest.warns(UserWarning, match="Quarantined"):
        for job_id in (hers, link):
            fb.append_log(job_id, b"password=hunter2\n")
            fb.append_log(job_id, b"more\n")
    for job_id in (hers, link):
        log = qdir / "logs" / f"{job_id}.log"
        assert log.read_bytes() == b"password=hunter2\nmore\n" and fb.read_log(job_id).startswith(b"password")
        st = os.lstat(log)
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 1
    assert target.read_bytes() == b"" and len(list((qdir / "quarantine").glob("*.reason"))) == 2
    shown = str(uuid.uuid4())  # her file, found by a reader: never shown as the job's output
    (qdir / "logs" / f"{shown}.log").write_bytes(b"Job failed: re-enter your password at ...")
    foreign(qdir / "logs" / f"{shown}.log")
    with pytest.warns(UserWarning, match="Quarantined"):
        assert fb.read_log(shown) == b""


def test_markers_locks_and_holders_another_user_planted_count_for_nothing(fb: FileBackend, qdir: Path) -> None:
    needs_root()
    fb.push([job()])
    paused = qdir / "q" / "default" / "paused"
    paused.write_bytes(b"")
    foreign(paused, 0o644)
    (qdir / "restart").write_bytes(repr(time.time()).encode())
    foreign(qdir / "restart", 0o644)
    assert fb.paused() == set() and fb.restart_requested_at() is None
    assert fb.claim(["default"], WORKER, 60) is not None  # her marker pauses nothing
    with pytest.warns(UserWarning, match="Quarantined"):
        fb.pause("default")  # ours replaces hers
    assert fb.paused() == {"default"} and os.lstat(paused).st_uid == os.getuid()
    # A unique-key lock file she owns could be held by her for ever: refused, naming it.
    unique = QueuedCommand("demo:sleep").with_args(["0"]).with_unique_key("nightly")
    holder = fb.store.unique_path("nightly")
    holder.write_text(json.dumps({"key": "nightly", "job_id": str(uuid.uuid4()), "created_at": time.time()}))
    foreign(holder, 0o644)
    lock = qdir / ".unique.lock"
    lock.write_bytes(b"")
    foreign(lock)
    with pytest.raises(QueueUnavailable, match="lock file") as err:
        fb.push([unique.to_job("default")])
    assert str(lock) in str(err.value) and f"rm {lock}" in (err.value.hint or "")
    lock.unlink()
    j = unique.to_job("default")
    fb.push([j])  # her holder (a fresh one, naming a job of hers) did not block the key
    assert os.lstat(holder).st_uid == os.getuid() and str(j.id) in holder.read_text()


def test_a_finished_job_moved_back_is_never_run_again(fb: FileBackend, qdir: Path) -> None:
    """What another user does once a queue directory is open to her (or a careless copy):
    a done job's file moved back into pending/ or reserved/."""
    base = qdir / "q" / "default"
    a, b = job(), job()
    fb.push([a, b])
    assert sorted(drain(fb)) == sorted([a.id, b.id])
    done = {n[17:53]: n for n in os.listdir(base / "done")}
    os.rename(base / "done" / done[a.id], base / "pending" / f"{1:016d}-{a.id}-0.job")
    os.rename(base / "done" / done[b.id], base / "reserved" / f"{b.id}-1.job")
    with pytest.warns(UserWarning, match="has finished"):
        assert fb.claim(["default"], WORKER, 60) is None
    assert fb.maintain()["completed"] == 1  # filed as done again, not recovered to run again
    assert fb.claim(["default"], WORKER, 60) is None
    assert fb.find(b.id).state == State.DONE  # type: ignore[union-attr]
    assert fb.find(a.id) is None and list((qdir / "quarantine").glob(f"*{a.id}*.reason"))


@pytest.mark.parametrize("where", ["root-subdir", "queue-dir", "state-dir-symlink"])
def test_a_directory_another_user_planted_is_refused(qdir: Path, tmp_path: Path, where: str) -> None:
    needs_root()
    FileBackend(qdir).close()
    hers = tmp_path / "hers"
    hers.mkdir(mode=0o777)
    os.chown(hers, NOBODY, NOBODY)
    if where == "root-subdir":
        planted = qdir / "logs"
        planted.rmdir()
        planted.mkdir()
        os.chown(planted, NOBODY, NOBODY)
    elif where == "queue-dir":
        planted = qdir / "q" / "emails"
        planted.mkdir()
        os.chown(planted, NOBODY, NOBODY)
    else:
        (qdir / "q" / "emails").mkdir(mode=0o700)
        planted = qdir / "q" / "emails" / "done"
        planted.symlink_to(hers)
    fragment = "is a symbolic link" if where == "state-dir-symlink" else "belongs to uid 65534"
    calls = [lambda b: b.push([job("emails")]), lambda b: b.claim(["emails"], WORKER, 60), lambda b: b.stats(),
             lambda b: b.maintain()]
    for call in calls:
        with pytest.raises(QueueUnavailable, match=fragment) as err:
            call(FileBackend(qdir))
        assert f"{planted} " in str(err.value) and str(planted) in (err.value.hint or ""), err.value
    assert os.listdir(hers) == []


# -- an unusable queue directory (issue 11, item 8) ---------------------------------------


@pytest.fixture
def read_only(qdir: Path):
    """Make ``qdir`` read-only (a bind mount onto itself, remounted ro), as a read-only disk."""
    def mount() -> None:
        r = subprocess.run(["mount", "--bind", str(qdir), str(qdir)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot bind-mount: {r.stderr.strip()}")
        mounted.append(qdir)
        r = subprocess.run(["mount", "-o", "remount,bind,ro", str(qdir)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot remount read-only: {r.stderr.strip()}")
    mounted: list[Path] = []
    try:
        yield mount
    finally:
        for m in mounted:
            subprocess.run(["umount", "-l", str(m)], check=False)


def test_claim_and_maintain_on_a_read_only_queue_directory_raise_unavailable(qdir: Path, read_only) -> None:
    b = FileBackend(qdir)
    b.push([job(), job()])
    orphan = b.claim(["default"], WORKER, 60)  # its worker died: maintain must recover it
    assert orphan is not None
    b.close()
    os.close(orphan.handle.fd)
    read_only()
    b = FileBackend(qdir)
    pending = qdir / "q" / "default" / "pending"
    with pytest.raises(QueueUnavailable, match="Read-only file system") as err:
        b.claim(["default"], WORKER, 60)  # not None: a job is pending
    assert str(pending) in str(err.value), err.value
    with pytest.raises(QueueUnavailable, match="Read-only file system") as err:
        b.maintain()
    assert str(qdir / "q" / "default") in str(err.value), err.value
    with pytest.raises(QueueUnavailable, match="Read-only file system"):
        b.push([job()])


def _unwritable_pending_as_nobody(conn, qdir: str) -> None:
    """In a process of uid 65534: a queue directory of hers whose pending/ she cannot write
    (0500), then cannot read (0300). Sends what each call raised."""
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    pending = f"{qdir}/q/default/pending"
    FileBackend(qdir).push([job()])
    out = {}

    def attempt(label: str, fn) -> None:
        try:
            fn(FileBackend(qdir))
            out[label] = ["no error", "", None]
        except Exception as exc:
            out[label] = [type(exc).__name__, str(exc), getattr(exc, "exit_code", None)]

    os.chmod(pending, 0o500)
    attempt("push", lambda b: b.push([job()]))
    attempt("claim", lambda b: b.claim(["default"], WORKER, 60))
    os.chmod(pending, 0o300)
    attempt("wait", lambda b: b.wait(["default"], 0.01))
    attempt("claim-unreadable", lambda b: b.claim(["default"], WORKER, 60))
    os.chmod(pending, 0o700)
    conn.send(out)


def test_an_unwritable_pending_directory_is_reported_not_empty() -> None:
    """As a user whose permissions count (root ignores them): pending/ made read-only, then
    unreadable. Dispatch, claim and wait raise QueueUnavailable (exit code 6) naming pending/
    and the OS error; the queue is never reported empty."""
    needs_root()
    import multiprocessing
    import shutil
    import tempfile

    from forge import _linux

    _linux._lib()  # uid 65534 cannot read this Python's files: load what she needs first (ctypes)
    base = Path(tempfile.mkdtemp(prefix="forge-unwritable-", dir="/tmp"))
    os.chown(base, NOBODY, NOBODY)
    try:
        ctx = multiprocessing.get_context("fork")
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=_unwritable_pending_as_nobody, args=(child, str(base / "q")))
        proc.start()
        out = conn.recv() if conn.poll(60) else {}
        proc.join(10)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    pending = str(base / "q" / "q" / "default" / "pending")
    for label in ("push", "claim", "wait", "claim-unreadable"):
        name, message, code = out[label]
        assert name == "QueueUnavailable" and code == 6, (label, out[label])
        assert pending in message and "Permission denied" in message, (label, message)


def test_stop_when_empty_worker_on_a_read_only_queue_directory_does_not_say_empty(qdir: Path, read_only,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The cron drainer of item 8: a job is pending and the directory is read-only. The
    worker must not print "stopped (empty)" and exit 0; it names the directory and the error."""
    monkeypatch.setenv("FORGE_QUEUE_DIR", str(qdir))
    b = FileBackend(qdir)
    b.push([job()])
    b.close()
    read_only()
    proc = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty", "--sleep=0.1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line)  # until it stops, or has retried (and failed) three times
            if sum("unavailable" in seen.lower() for seen in lines) >= 3 or "Worker stopped" in line:
                break
    finally:
        if proc.poll() is None:
            proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    text = "".join(lines) + (rest or "")
    assert "Worker stopped (empty)" not in text, text
    assert "Read-only file system" in text and str(qdir / "q" / "default" / "pending") in text, text


def test_stop_when_empty_worker_on_a_read_only_queue_directory_exits_6(qdir: Path, read_only,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_QUEUE_DIR", str(qdir))
    b = FileBackend(qdir)
    b.push([job()])
    b.close()
    read_only()
    res = subprocess.run([sys.executable, "-m", "forge", "queue:work", "--stop-when-empty", "--sleep=0.1"],
                         capture_output=True, text=True, timeout=20)
    assert res.returncode == 6, (res.returncode, res.stdout, res.stderr)


def test_dispatch_into_an_unwritable_pending_directory_exits_6_naming_it(qdir: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGE_QUEUE_DIR", str(qdir))
    FileBackend(qdir).push([job()])
    pending = qdir / "q" / "default" / "pending"
    r = subprocess.run(["chattr", "+i", str(pending)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot make pending/ immutable: {r.stderr.strip()}")
    try:
        before = os.listdir(pending)
        res = subprocess.run([sys.executable, "-m", "forge", "queue:dispatch", "demo:sleep", "0"],
                             capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(pending)], check=False)
    assert res.returncode == 6, (res.returncode, res.stderr)
    assert f"{pending}:" in res.stderr and "Operation not permitted" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and os.listdir(pending) == before and os.listdir(qdir / "tmp") == []


# -- durability -----------------------------------------------------------------------------


def test_dispatch_syncs_file_then_renames_then_syncs_directory(fb: FileBackend, qdir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def where(fd: int | None) -> str:
        return os.readlink(f"/proc/self/fd/{fd}") if fd is not None else ""

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        calls.append(("fsync-dir" if stat.S_ISDIR(st.st_mode) else "fsync-file", where(fd)))
        real_fsync(fd)

    def rename(a: object, b: object, **kw: object) -> None:
        calls.append(("rename", os.path.join(where(kw.get("dst_dir_fd")), str(b))))  # type: ignore[arg-type]
        real_rename(a, b, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    j = job()
    fb.push([j])
    assert [c[0] for c in calls] == ["fsync-file", "rename", "fsync-dir"], calls
    pending = str(qdir / "q" / "default" / "pending")
    assert calls[0][1] == str(qdir / "tmp" / f"{j.id}.tmp")
    assert calls[1][1].startswith(pending + "/") and j.id in calls[1][1]
    assert calls[2][1] == pending
    assert os.listdir(qdir / "tmp") == []


def test_queue_dir_removed_under_a_live_backend(fb: FileBackend, qdir: Path) -> None:
    import shutil

    fb.push([job()])
    shutil.rmtree(qdir)
    fb.push([job()])  # cached directory handles are stale: recreated, never lost
    assert fb.stats()[0].pending == 1 and os.listdir(qdir / "q" / "default" / "pending")


def test_batch_leaves_no_temp_files(fb: FileBackend, qdir: Path) -> None:
    fb.push([job() for _ in range(50)])
    assert os.listdir(qdir / "tmp") == []
    assert fb.stats()[0].pending == 50


def test_maintain_removes_stale_temp_files(fb: FileBackend, qdir: Path) -> None:
    old, fresh = qdir / "tmp" / "old.tmp", qdir / "tmp" / "fresh.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert fb.maintain()["temp_removed"] == 1
    assert not old.exists() and fresh.exists()


@pytest.fixture
def tiny_fs(tmp_path: Path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)




def test_full_disk(tiny_fs: Path) -> None:
    fb = FileBackend(tiny_fs)
    existing = job()
    fb.push([existing])
    filler = fill_disk(tiny_fs)
    for batch in ([job()], [job() for _ in range(5)]):
        with pytest.raises(DispatchFailed) as err:
            fb.push(batch)
        msg = str(err.value)
        assert str(tiny_fs) in msg and "No space left on device" in msg, msg
        assert err.value.hint
        assert os.listdir(tiny_fs / "tmp") == []
        assert [i.id for i in fb.jobs(state=State.PENDING)] == [existing.id]
    c = fb.claim(["default"], WORKER, 60)
    assert c is not None and c.job.id == existing.id
    filler.unlink()
    fb.push([job()])
    assert fb.stats()[0].pending == 1
    fb.close()


# -- crashes --------------------------------------------------------------------------------

HOLDER = """
import sys, time
from forge.backends.base import Claim
from forge.backends.file.backend import FileBackend
b = FileBackend(sys.argv[1])
c = b.claim(["default"], "doomed", 60)
print(c.job.id if c else "none", c.attempt if c else 0, flush=True)
time.sleep(120)
"""


def test_kill_9_of_a_claiming_process(fb: FileBackend, qdir: Path) -> None:
    j = job(max_attempts=3)
    fb.push([j])
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(qdir)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline().split()  # type: ignore[union-attr]
        assert line == [j.id, "1"]
        assert fb.maintain(3)["recovered"] == 0  # alive: its lock is held
        assert fb.claim(["default"], WORKER, 60) is None
        assert fb.find(j.id).state == State.RESERVED  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
    assert fb.maintain(3)["recovered"] == 1
    info = fb.find(j.id)
    assert info is not None and info.state == State.PENDING and info.attempts == 1
    assert info.last_event is not None and info.last_event.reason == "abandoned"
    c = fb.claim(["default"], WORKER, 60)
    assert c is not None and c.job.id == j.id and c.attempt == 2


def test_crash_between_rename_and_event_is_recovered(fb: FileBackend, qdir: Path) -> None:
    j = job(max_attempts=2)
    fb.push([j])
    base = qdir / "q" / "default"
    (name,) = os.listdir(base / "pending")
    os.rename(base / "pending" / name, base / "reserved" / f"{j.id}-1.job")  # claimed, then died
    assert fb.maintain(1)["recovered"] == 1
    c = fb.claim(["default"], WORKER, 60)
    assert c is not None and c.attempt == 2


# -- concurrency ----------------------------------------------------------------------------

DISPATCHER = """
import sys
from forge.backends.base import Claim
from forge.backends.file.backend import FileBackend
from forge.queue import QueuedCommand
b = FileBackend(sys.argv[1])
n, batch = int(sys.argv[2]), int(sys.argv[3])
cmd = QueuedCommand("demo:sleep").with_args(["0"])
out = []
for start in range(0, n, batch):
    jobs = [cmd.to_job("default") for _ in range(min(batch, n - start))]
    b.push(jobs)
    out += [j.id for j in jobs]
print("\\n".join(out))
"""



def run_concurrently(qdir: Path, total: int, dispatchers: int = 4, claimers: int = 2) -> tuple[list, list]:
    FileBackend(qdir).close()
    stop = qdir.parent / "stop"
    per = total // dispatchers
    cl = [subprocess.Popen([sys.executable, "-c", CLAIMER, str(qdir), str(stop), "default"],
                           stdout=subprocess.PIPE, text=True) for _ in range(claimers)]
    ds = [subprocess.Popen([sys.executable, "-c", DISPATCHER, str(qdir), str(per), str(1 if i % 2 else 50)],
                           stdout=subprocess.PIPE, text=True) for i in range(dispatchers)]
    dispatched = []
    for p in ds:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        dispatched += out.split()
    stop.touch()
    claimed = []
    for p in cl:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        claimed += out.split()
    return dispatched, claimed


def test_concurrent_dispatch_and_claim_lose_nothing_and_never_double_claim(qdir: Path) -> None:
    dispatched, claimed = run_concurrently(qdir, 2000)
    assert len(dispatched) == 2000 == len(set(dispatched))
    assert len(claimed) == len(set(claimed)), "a job was claimed twice"
    assert set(claimed) == set(dispatched), "jobs were lost"
    fb = FileBackend(qdir)
    s = fb.stats()[0]
    assert (s.pending, s.reserved, s.done) == (0, 0, 2000)


# -- unique keys ----------------------------------------------------------------------------


def traced(log: Path, path: str, proc: subprocess.Popen[str]) -> bool:
    """Whether strace's ``log`` shows ``proc`` inside its (delayed) call on ``path``; fails
    with ``proc``'s stderr if it ended first."""
    if log.exists() and f'"{path}"' in log.read_text():
        return True
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
    return False


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace)")
@pytest.mark.parametrize("outcome", ["done", "failed"])
def test_a_finishing_job_never_frees_the_key_its_successor_took(fb: FileBackend, qdir: Path, tmp_path: Path,
                                                                 outcome: str) -> None:
    """Issue 11 item 13a. A real worker finishes the job holding a unique key while a dispatch
    takes the key over; strace holds the worker inside its removal of the holder file (2 s),
    after it read that the file names its job. The key must stay with the new job: it was
    removed from under it, so a third dispatch got in and two pending jobs held one key."""
    args = ["--fail"] if outcome == "failed" else []
    first = QueuedCommand("probe:run").with_args(args).with_unique_key("nightly").to_job("default")
    fb.push([first])
    holder = str(fb.store.unique_path("nightly"))
    log = tmp_path / "strace.log"
    env = {**os.environ, "FORGE_CONFIG": str(PROBE_PROJECT), "FORGE_QUEUE_DIR": str(qdir)}
    worker = subprocess.Popen(
        [STRACE, "-qq", "-f", "-o", str(log), "-P", holder, "-e", "trace=unlink,unlinkat", "-e", "signal=none",
         "-e", "inject=unlink,unlinkat:delay_enter=2000000", sys.executable, "-m", "forge", "queue:work", "--once"],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: traced(log, holder, worker), timeout=60, interval=0.01,
                 what="the worker inside its delayed unlink of the holder file")
        assert fb.find(first.id).state == State(outcome)  # type: ignore[union-attr]
        second = QueuedCommand("probe:run").with_unique_key("nightly").to_job("default")
        fb.push([second])  # the first job is finished: its key is free to take
        _, err = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate()
    assert worker.returncode == 0, err
    with pytest.raises(DuplicateJob) as dup:
        fb.push([QueuedCommand("probe:run").with_unique_key("nightly").to_job("default")])
    assert dup.value.job_id == second.id
    assert fb.stats()[0].pending == 1


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace)")
def test_no_dispatch_takes_the_key_of_a_unique_job_while_it_is_retried(fb: FileBackend, qdir: Path,
                                                                        tmp_path: Path) -> None:
    """Issue 11 item 13b, the window: strace holds a real ``forge queue:retry`` 2 s just before
    it moves the failed job back to pending/. A dispatch with the job's key in that window
    is refused, naming the job: the key was taken back with the move, as one step."""
    first = QueuedCommand("probe:run").with_unique_key("nightly").to_job("default")
    fb.push([first])
    claim = fb.claim(["default"], WORKER, 60)
    assert claim is not None
    fb.fail(claim, Event("failed", claim.attempt, time.time(), reason="exception", error="boom"))
    (failed,) = (qdir / "q" / "default" / "failed").iterdir()
    log = tmp_path / "strace.log"
    env = {**os.environ, "FORGE_CONFIG": str(PROBE_PROJECT), "FORGE_QUEUE_DIR": str(qdir)}
    retry = subprocess.Popen(
        [STRACE, "-qq", "-f", "-o", str(log), "-P", str(failed), "-e", "trace=rename,renameat,renameat2",
         "-e", "signal=none", "-e", "inject=rename,renameat,renameat2:delay_enter=2000000",
         sys.executable, "-m", "forge", "queue:retry", first.id],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: traced(log, str(failed), retry), timeout=60, interval=0.01,
                 what="queue:retry inside its delayed rename of the failed job")
        with pytest.raises(DuplicateJob) as dup:
            fb.push([QueuedCommand("probe:run").with_unique_key("nightly").to_job("default")])
        out, err = retry.communicate(timeout=60)
    finally:
        if retry.poll() is None:
            retry.kill()
            retry.communicate()
    assert dup.value.job_id == first.id
    assert retry.returncode == 0 and out.split() == [first.id], err
    assert fb.find(first.id).state == State.PENDING  # type: ignore[union-attr]
    assert fb.stats()[0].pending == 1


# -- a crash that kept a dispatch's temp name (ext4 without a journal) ----------------------


def test_a_job_whose_temp_name_survived_a_crash_is_claimed_not_quarantined(fb: FileBackend, qdir: Path) -> None:
    j = job()
    fb.push([j])
    (pending,) = (qdir / "q" / "default" / "pending").iterdir()
    twin = qdir / "tmp" / f"{j.id}.tmp"
    os.link(pending, twin)  # what fsck leaves when tmp/'s half of the rename was lost
    claim = fb.claim(["default"], WORKER, 60)
    assert claim is not None and claim.job.id == j.id
    assert not twin.exists() and not list((qdir / "quarantine").iterdir())


def test_a_second_link_that_is_not_the_jobs_own_temp_name_is_still_refused(fb: FileBackend, qdir: Path) -> None:
    j, other = job(), job()
    fb.push([j])
    (pending,) = (qdir / "q" / "default" / "pending").iterdir()
    os.link(pending, qdir / "tmp" / f"{other.id}.tmp")  # a temp name, but another job's
    with pytest.warns(UserWarning, match="2 hard links"):
        assert fb.claim(["default"], WORKER, 60) is None
    assert any(p.name.endswith(pending.name) for p in (qdir / "quarantine").iterdir())


def test_a_running_job_whose_temp_name_survived_a_crash_is_recovered(qdir: Path) -> None:
    b = FileBackend(qdir)
    j = job(max_attempts=3)
    b.push([j])
    claim = b.claim(["default"], WORKER, 60)
    assert claim is not None
    (reserved,) = (qdir / "q" / "default" / "reserved").iterdir()
    os.link(reserved, qdir / "tmp" / f"{j.id}.tmp")  # the crash kept the temp name too
    os.close(claim.handle.fd)  # the worker is gone: its lock with it
    b.close()
    b = FileBackend(qdir)
    assert b.maintain()["recovered"] == 1
    again = b.claim(["default"], WORKER, 60)
    assert again is not None and again.job.id == j.id and again.attempt == 2
    assert not list((qdir / "quarantine").iterdir()) and not list((qdir / "tmp").iterdir())
    b.close()


# -- idempotency keys: a second name of the job file (issue 11, item 5) ----------------------


def idem_job(key: str, queue: str = "default") -> Job:
    return QueuedCommand("demo:sleep").with_args(["0"]).with_idempotency_key(key).to_job(queue)


def test_the_key_of_an_idempotent_job_is_a_hard_link_to_its_file(fb: FileBackend, qdir: Path) -> None:
    j = idem_job("tick-1")
    assert fb.push([j]) == [True]
    (pending,) = (qdir / "q" / "default" / "pending").iterdir()
    key = qdir / "idem" / f"{j.id}.job"
    assert os.stat(key).st_ino == os.stat(pending).st_ino and os.stat(key).st_nlink == 2
    assert mode(key) == 0o600 and mode(qdir / "idem") == 0o700
    claim = fb.claim(["default"], WORKER, 60)  # the key's link is the only second link accepted
    assert claim is not None and claim.job.id == j.id
    (reserved,) = (qdir / "q" / "default" / "reserved").iterdir()
    assert os.stat(reserved).st_ino == os.stat(key).st_ino
    fb.ack(claim, Event("done", claim.attempt, time.time()))
    assert fb.push([idem_job("tick-1")]) == [False]
    assert fb.prune_done() == 1
    assert os.stat(key).st_nlink == 1  # the job is gone: the key is free, its name garbage
    assert fb.maintain()["keys_removed"] == 1 and not key.exists()
    assert not list((qdir / "quarantine").iterdir())


def test_a_third_link_to_an_idempotent_job_is_still_refused(fb: FileBackend, qdir: Path, tmp_path: Path) -> None:
    j = idem_job("tick-2")
    fb.push([j])
    (pending,) = (qdir / "q" / "default" / "pending").iterdir()
    os.link(pending, tmp_path / "elsewhere")
    with pytest.warns(UserWarning, match="3 hard links"):
        assert fb.claim(["default"], WORKER, 60) is None
    other = job()
    fb.push([other])
    (pending,) = (qdir / "q" / "default" / "pending").iterdir()
    os.link(pending, qdir / "idem" / f"{other.id}.job")  # a key's name, for a job without a key
    with pytest.warns(UserWarning, match="2 hard links"):
        assert fb.claim(["default"], WORKER, 60) is None


def test_maintenance_never_waits_for_a_dispatcher_holding_the_key_lock(fb: FileBackend, qdir: Path) -> None:
    fb.push([idem_job("tick-3")])
    c = fb.claim(["default"], WORKER, 60)
    assert c is not None
    fb.ack(c, Event("done", 1, time.time()))
    fb.prune_done()
    other = FileBackend(qdir)
    try:
        with fb.layout.global_lock("idem"):  # a dispatch in progress (or a stopped one)
            start = time.monotonic()
            assert other.maintain()["keys_removed"] == 0
            assert time.monotonic() - start < 2
        assert other.maintain()["keys_removed"] == 1  # the next maintenance sweeps instead
        fb.push([idem_job("tick-4")])
        c = fb.claim(["default"], WORKER, 60)
        assert c is not None
        fb.ack(c, Event("done", 1, time.time()))
        fb.prune_done()
        assert other.maintain()["keys_removed"] == 0  # then not before SWEEP_EVERY
    finally:
        other.close()


def test_find_never_misses_a_job_that_is_being_claimed(qdir: Path, fb: FileBackend) -> None:
    """A claim moves a job from pending/ to reserved/ by one rename; a find that listed
    reserved/ just before and pending/ just after said there was no such job (``queue:show``
    printed 'no such job' for a job a worker was taking). Another process claims the job and
    releases it again, holding each state for a millisecond (a run takes longer), while this
    one looks for it."""
    j = job()
    fb.push([j])
    job_id = j.id
    flipper = subprocess.Popen([sys.executable, "-c", f"""
import time
from forge.backends.file.backend import FileBackend
b = FileBackend({str(qdir)!r})
for _ in range(1500):  # each release adds an event to the job's file: not too many
    c = b.claim(["default"], "flipper", 60)
    time.sleep(0.001)
    if c is not None:
        b.release(c, None, 0, counted=False)
    time.sleep(0.001)
"""])
    states = []
    try:
        while flipper.poll() is None:
            info = fb.find(job_id)
            states.append(info.state if info is not None else None)
    finally:
        if flipper.poll() is None:
            flipper.kill()
        flipper.wait()
    assert flipper.returncode == 0  # it flipped the job to the end
    assert None not in states
    assert {State.PENDING, State.RESERVED} <= set(states)  # it did move while we looked


@pytest.mark.parametrize("limited", [False, True], ids=["plain", "limited"])
def test_a_leased_claim_whose_event_cannot_be_written_is_no_claim(tiny_fs: Path, limited: bool) -> None:
    """With leases the lease lives in the ``claimed`` event: a claim on a full disk must fail
    rather than run a job that the next maintenance pass hands to another worker (the limited
    claim ran it). Once there is room, the job is recovered and claimed as usual, and no torn
    line was left in its file."""
    from forge.limits.spec import LimitsConfig, QueueLimits

    fb = FileBackend(tiny_fs, lock="lease")
    cfg = LimitsConfig(queues={"default": QueueLimits(parallel=2)})

    def claim() -> object:
        return fb.claim_limited(["default"], WORKER, 60, cfg) if limited else fb.claim(["default"], WORKER, 60)

    warm = job()
    fb.push([warm])
    c = claim()
    assert isinstance(c, Claim)
    fb.ack(c, Event("done", c.attempt, time.time()))  # the limits' files exist now
    probe = job("default", "x" * 3000)
    fb.push([probe])
    pending = tiny_fs / "q" / "default" / "pending"
    size = next(pending.iterdir()).stat().st_size
    next(pending.iterdir()).unlink()
    # A job whose file ends 40 bytes short of a page: its claimed event needs a page more.
    j = job("default", "x" * (3000 + 4096 - 40 - size))
    fb.push([j])
    assert 4096 - 60 < next(pending.iterdir()).stat().st_size < 4096
    filler = fill_disk(tiny_fs)
    with pytest.raises(OSError):
        claim()
    filler.unlink()
    assert fb.maintain(3)["recovered"] == 1
    again = claim()
    assert isinstance(again, Claim) and again.job.id == j.id
    info = fb.find(j.id)
    assert info is not None and [e.event for e in info.events].count("claimed") == 1
    fb.close()


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_file_is_quarantined_by_a_claim_through_the_limits(fb: FileBackend, qdir: Path, tmp_path: Path,
                                                                    kind: str) -> None:
    """The claim path of a worker with [limits] (``Limiter``) opens, checks and locks a pending
    file as the plain claim does (``JobFiles.lock_pending``): the same quarantine, and the valid
    jobs flow."""
    from forge.limits.spec import LimitsConfig, QueueLimits

    cfg = LimitsConfig(queues={"other": QueueLimits(parallel=1)})  # [limits]: every claim goes through them
    fb.push([job()])
    hostile = HOSTILE[kind](qdir / "q" / "default" / "pending", tmp_path / "outside.job")
    fb.push([job()])
    got = []
    with pytest.warns(UserWarning, match="Quarantined"):
        while (c := fb.claim_limited(["default"], WORKER, 60, cfg)) is not None:
            got.append(c.job.id)
            fb.ack(c, Event("done", c.attempt, time.time()))
    assert len(got) == 2 and not os.path.lexists(hostile)
    assert len(list((qdir / "quarantine").glob("*.reason"))) == 1
    assert fb.stats()[0].pending == 0
