"""Issue 11, item 12: another user must never control a file queue directory.

The attacker is a real other user: a process forked from the test that drops to uid 65534
(``nobody``) and works only through what that uid may do. While the queue directory is open
to others she plants what she can (sub-directories, symlinks, log files) and keeps descriptors
of her directories, which keep working after the owner's forge has closed the queue directory
itself. The owner runs the real CLI (``forge queue:dispatch``, ``forge queue:work``). Each
scenario then checks the two harms seen in the attack: she read a job's output (a password),
and a finished job of the owner ran again because she moved it back into pending/.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from reliability.checker import read_ledger, runs_of
from waitfor import wait_for

pytestmark = pytest.mark.slow

NOBODY = 65534
SECRET = "password=hunter2"
STATES = ("pending", "reserved", "done", "failed")
JOB_NAME = re.compile(r"(?:[0-9]{16}-)?([0-9a-f-]{36})-[0-9]+\.job\Z")


@pytest.fixture
def shared(probe_project: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A folder in /tmp that uid 65534 can reach, holding ``queue`` (the owner's queue
    directory, made world-writable by the careless operator) and ``attacker`` (hers)."""
    if os.getuid() != 0:
        pytest.skip("needs root: the attacker runs as a real other user (uid 65534)")
    base = Path(tempfile.mkdtemp(prefix="forge-users-", dir="/tmp"))
    base.chmod(0o755)
    (base / "attacker").mkdir()
    os.chown(base / "attacker", NOBODY, NOBODY)
    monkeypatch.setenv("FORGE_QUEUE_DIR", str(base / "queue"))
    yield base
    shutil.rmtree(base, ignore_errors=True)


def forge(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "forge", *args], capture_output=True, text=True,
                          timeout=timeout)


def runs(job_id: str) -> int:
    ledger = Path(os.environ["FORGE_PROBE_LEDGER"])
    return sum(1 for r in runs_of(read_ledger(ledger)) if r.job == job_id) if ledger.exists() else 0


# -- the attacker ---------------------------------------------------------------------------


def _mkdirs(*paths: Path) -> None:
    for p in paths:
        p.mkdir(mode=0o777)
        p.chmod(0o777)


def _plant(plan: str, qdir: Path, evil: Path) -> tuple[dict[str, int], set[str]]:
    """Set up while the queue directory is open to her; returns descriptors of the directories
    she will work through (logs, and one queue's pending and done) and the jobs she moved."""
    queue = "emails" if plan == "queue-dir" else "default"
    if plan == "subdirs":  # the attack: the directories forge will use are hers
        _mkdirs(qdir / "logs", qdir / "q", qdir / "q" / queue, *(qdir / "q" / queue / s for s in STATES))
        logs, qq = qdir / "logs", qdir / "q" / queue
    elif plan == "symlinks":  # the same, through symlinks to a tree of hers elsewhere
        _mkdirs(evil / "logs", evil / "q", evil / "q" / queue, *(evil / "q" / queue / s for s in STATES))
        (qdir / "logs").symlink_to(evil / "logs")
        (qdir / "q").symlink_to(evil / "q")
        logs, qq = evil / "logs", evil / "q" / queue
    elif plan == "queue-dir":  # forge's q/ is open to her: she plants the next queue's directory
        _mkdirs(qdir / "q" / queue, *(qdir / "q" / queue / s for s in STATES))
        logs, qq = qdir / "logs", qdir / "q" / queue
    else:  # "chmod-R": forge's own tree, opened to everyone by `chmod -R 777`
        logs, qq = qdir / "logs", qdir / "q" / queue
    fds = {"logs": os.open(logs, os.O_RDONLY | os.O_DIRECTORY),
           "pending": os.open(qq / "pending", os.O_RDONLY | os.O_DIRECTORY),
           "done": os.open(qq / "done", os.O_RDONLY | os.O_DIRECTORY)}
    moved = set()
    if plan == "chmod-R":  # at once, before any forge process runs: a finished job, back to pending/
        for name in os.listdir(fds["done"]):
            m = JOB_NAME.match(name)
            if m:
                os.rename(name, f"{1:016d}-{m.group(1)}-0.job", src_dir_fd=fds["done"], dst_dir_fd=fds["pending"])
                moved.add(m.group(1))
    return fds, moved


def _one_pass(fds: dict[str, int], planted: set[str], moved: set[str]) -> dict:
    """What her polling loop does each time round: a log file of hers for every job she sees,
    every finished job moved back into pending/, and whatever her log files hold."""
    out: dict = {"seen": [], "loot": {}, "errors": []}
    try:
        names = os.listdir(fds["pending"])
    except OSError as exc:
        names = []
        out["errors"].append(f"list pending: {exc.strerror}")
    for name in names:
        m = JOB_NAME.match(name)
        if not m:
            continue
        out["seen"].append(m.group(1))
        if m.group(1) not in planted:
            try:
                fd = os.open(f"{m.group(1)}.log", os.O_CREAT | os.O_RDWR, 0o666, dir_fd=fds["logs"])
                os.fchmod(fd, 0o666)
                os.close(fd)
                planted.add(m.group(1))
            except OSError as exc:
                out["errors"].append(f"plant log: {exc.strerror}")
    try:
        done = os.listdir(fds["done"])
    except OSError as exc:
        done = []
        out["errors"].append(f"list done: {exc.strerror}")
    for name in done:
        m = JOB_NAME.match(name)
        if m and m.group(1) not in moved:
            try:
                os.rename(name, f"{1:016d}-{m.group(1)}-0.job", src_dir_fd=fds["done"], dst_dir_fd=fds["pending"])
                moved.add(m.group(1))
            except OSError as exc:
                out["errors"].append(f"move done: {exc.strerror}")
    for job_id in planted:
        try:
            fd = os.open(f"{job_id}.log", os.O_RDONLY, dir_fd=fds["logs"])
            out["loot"][job_id] = os.read(fd, 65536).decode(errors="replace")
            os.close(fd)
        except OSError as exc:
            out["errors"].append(f"read log: {exc.strerror}")
    out["moved"] = sorted(moved)
    return out


def _attacker(conn, plan: str, qdir: str, evil: str) -> None:
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    os.umask(0)
    try:
        fds, moved = _plant(plan, Path(qdir), Path(evil))
    except OSError as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    conn.send({"ready": True})
    planted: set[str] = set()
    while conn.recv() == "pass":
        conn.send(_one_pass(fds, planted, moved))


class Attacker:
    """uid 65534 in a process of her own; ``act()`` runs one pass of her loop and reports it."""

    def __init__(self, plan: str, shared: Path) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_attacker, args=(child, plan, str(shared / "queue"), str(shared / "attacker")))
        self.proc.start()
        hello = self.conn.recv()
        assert hello.get("ready"), hello
        self.loot: dict[str, str] = {}
        self.seen: set[str] = set()
        self.moved: set[str] = set()

    def act(self) -> dict:
        self.conn.send("pass")
        out = self.conn.recv()
        self.loot.update({k: v for k, v in out["loot"].items() if v})
        self.seen.update(out["seen"])
        self.moved.update(out["moved"])
        return out

    def stop(self) -> None:
        self.conn.send("stop")
        self.proc.join(10)


# -- the owner ------------------------------------------------------------------------------


def dispatch_following_the_fixes(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``forge queue:dispatch``; while it refuses the directory (exit code 6), do what the
    message says (move the path aside, or remove the symlink) and try again."""
    refusals = []
    for _ in range(6):
        res = forge("queue:dispatch", *argv)
        if res.returncode != 6:
            return res, refusals
        errors = [line for line in res.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr  # one line
        refusals.append(errors[0])
        m = re.search(r"\((mv|rm) ([^ )]+)", res.stderr)
        assert m, res.stderr
        if m.group(1) == "mv":
            os.rename(m.group(2), m.group(2) + ".untrusted")
        else:
            os.unlink(m.group(2))
    raise AssertionError(f"still refused after following the fixes: {refusals}")


def drain(*args: str) -> subprocess.CompletedProcess:
    res = forge("queue:work", "--stop-when-empty", "--sleep=0.1", *args)
    assert res.returncode == 0, res.stderr[-2000:]
    return res


def _healthy_layout_opened_to_all(shared: Path) -> str:
    """A queue directory forge made (one job run and done), then `chmod -R 777`'d."""
    first = forge("queue:dispatch", "probe:run", "first")
    assert first.returncode == 0, first.stderr
    drain()
    subprocess.run(["chmod", "-R", "777", str(shared / "queue")], check=True)
    return first.stdout.strip()


@pytest.mark.parametrize("plan", ["subdirs", "symlinks"])
def test_planted_directories_are_refused_and_the_attack_gets_nothing(shared: Path, plan: str) -> None:
    """The issue's attack: before forge first used the world-writable queue directory, she
    made its sub-directories (or symlinks to hers). forge must refuse them (exit 6, naming the
    path and the fix); once the owner has moved them aside, she reads no output of the job and
    cannot make a finished job run again."""
    qdir = shared / "queue"
    qdir.mkdir(mode=0o777)
    qdir.chmod(0o777)
    she = Attacker(plan, shared)
    try:
        res, refusals = dispatch_following_the_fixes("probe:run", "--say", SECRET)
        assert res.returncode == 0, res.stderr
        job_id = res.stdout.strip()
        she.act()  # sees the job, plants its log file
        drain()  # the job runs and prints the secret
        she.act()  # reads her log file; moves the finished job back into pending/
        drain()  # does the job run again?
        she.act()
    finally:
        she.stop()
    assert SECRET not in json.dumps(she.loot), f"she read the job's output: {she.loot}"
    assert runs(job_id) == 1, f"the job ran {runs(job_id)} times (she moved {sorted(she.moved)})"
    assert job_id not in she.seen
    # Refused first, each time naming the planted path, what is wrong and the fix.
    assert refusals, "forge used a directory tree another user controls"
    for text in refusals:
        assert str(qdir) in text, text
        assert ("belongs to uid 65534" in text) if plan == "subdirs" else ("symbolic link" in text), text
    assert stat.S_IMODE(qdir.stat().st_mode) == 0o700


def test_a_tree_opened_to_everyone_is_closed_again_and_what_she_did_is_not_trusted(shared: Path) -> None:
    """`chmod -R 777` on a queue directory in use: while it was open she moved a finished job
    back into pending/; then she tries to plant the log file of the next job. forge closes
    every directory again (with warnings), never runs the moved job, and writes the new job's
    output to a file of its own."""
    first = _healthy_layout_opened_to_all(shared)
    she = Attacker("chmod-R", shared)  # moves `first` back into pending/ at once
    try:
        res = forge("queue:dispatch", "probe:run", "--say", SECRET)
        assert res.returncode == 0, res.stderr
        job_id = res.stdout.strip()
        assert "repaired to 700" in res.stderr, res.stderr
        she.act()
        work = drain()
        she.act()
        drain()
        she.act()
    finally:
        she.stop()
    assert first in she.moved  # the move itself happened while the tree was open
    assert SECRET not in json.dumps(she.loot), f"she read the job's output: {she.loot}"
    assert runs(first) == 1, f"the finished job ran again ({runs(first)} runs)"
    assert runs(job_id) == 1
    reasons = [r.read_text() for r in (shared / "queue" / "quarantine").glob(f"*{first}*.reason")]
    assert reasons, (work.stdout, work.stderr)  # set aside, with the reason
    show = forge("queue:log", job_id)
    assert SECRET in show.stdout, (show.returncode, show.stdout, show.stderr)
    for d in [shared / "queue", *[p for p in (shared / "queue").rglob("*") if p.is_dir()]]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d


def test_a_queue_directory_she_planted_is_refused(shared: Path) -> None:
    """forge's q/ is open to her (`chmod -R 777`), and she makes q/emails/ before the first
    job for that queue: the dispatch is refused (exit 6) and no job of the owner's lands in a
    directory of hers; the queues forge made are still served."""
    _healthy_layout_opened_to_all(shared)
    she = Attacker("queue-dir", shared)
    try:
        res = forge("queue:dispatch", "--queue=emails", "probe:run", "--say", SECRET)
        she.act()
        other = forge("queue:dispatch", "probe:run", "default-queue")
        listed = forge("queue:list", "--queue=emails")
    finally:
        she.stop()
    assert not she.seen, f"a job was stored in her directory: {she.seen}"
    assert res.returncode == 6, (res.returncode, res.stderr)
    planted = shared / "queue" / "q" / "emails"
    assert f"{planted} belongs to uid 65534" in res.stderr and f"mv {planted}" in res.stderr, res.stderr
    assert other.returncode == 0, other.stderr
    assert listed.returncode == 6 and str(planted) in listed.stderr, (listed.returncode, listed.stderr)


def test_a_directory_opened_after_start_is_closed_by_the_running_worker(shared: Path) -> None:
    """A worker is running when its pending/ and logs/ are made world-writable: its next
    maintenance pass (every 2 s) closes them again and says so."""
    res = forge("queue:dispatch", "probe:run", "warm-up")
    assert res.returncode == 0, res.stderr
    worker = subprocess.Popen([sys.executable, "-m", "forge", "queue:work", "--sleep=0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: runs(res.stdout.strip()) == 1, timeout=30)
        opened = [shared / "queue" / "logs", shared / "queue" / "q" / "default" / "pending"]
        for d in opened:
            d.chmod(0o777)
        wait_for(lambda: all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in opened), timeout=15)
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = worker.communicate(timeout=30)
    assert worker.returncode == 0, err[-2000:]
    for d in opened:
        assert f"{d} was accessible to other users (mode 777); repaired to 700" in err, err
