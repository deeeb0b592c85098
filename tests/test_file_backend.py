"""File-backend specifics: permissions, hostile job files, durability, crashes and concurrency."""

from __future__ import annotations

import os
import pickle
import signal
import stat
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
from reliability.harness import fill_disk
from reliability.scripts import CLAIMER

from forge.backends.file import FileBackend
from forge.errors import DispatchFailed, QueueUnavailable, UsageError
from forge.job import Event, Job, State
from forge.queue import QueuedCommand

NOBODY = 65534
WORKER = "w"


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
from forge.backends.file import FileBackend
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
from forge.backends.file import FileBackend
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
    for fd in claim.fds:  # the worker is gone: its lock with it
        os.close(fd)
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
        with fb._global_lock("idem"):  # a dispatch in progress (or a stopped one)
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
