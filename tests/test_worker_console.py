"""issue 13: the worker's console as a person sees it on a terminal (a real pty), on both
backends: the start banner (connection, where the jobs are, queues in order), the short job id
and queue on every line, the first Ctrl-C's line on a fresh line, timestamps on the stop line
with the queue's location, ``after 1 job``, and ``-v`` events as text rather than a dict."""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading

from reliability.harness import Target, worker_argv
from waitfor import wait_for

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"


class Terminal:
    """A process whose stdout and stderr are a pty; what it wrote so far is ``text``."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, env={**env, "TERM": "xterm"}, stdin=subprocess.DEVNULL,
                                     stdout=slave, stderr=slave, close_fds=True)
        os.close(slave)
        self._fd, self._chunks = master, []  # type: ignore[var-annotated]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 4096)
            except OSError:
                return
            if not data:
                return
            self._chunks.append(data)

    @property
    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace").replace("\r\n", "\n")

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        return wait_for(lambda: re.search(pattern, self.text, re.M), timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        os.close(self._fd)


def dispatch(t: Target, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "forge", "queue:dispatch", "probe:run", *args], env=t.env,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_the_worker_console_on_a_terminal(queue_target: Target) -> None:
    job = dispatch(queue_target, "--say", "hello from the job")
    second = dispatch(queue_target)
    term = Terminal(worker_argv("-v", "--queue=high,default", "--sleep=0.1"), queue_target.env)
    try:
        banner = term.wait_for(rf"^({STAMP}) Processing jobs from queues high, default \(in this order\)"
                               r" on connection (\w+): (.+)\. Worker (\S+)\.$")
        assert banner.group(2) == queue_target.kind
        where = banner.group(3)
        if queue_target.kind == "file":
            assert where == str(queue_target.queue_dir)
        else:
            assert where.startswith("redis://127.0.0.1:") and queue_target.prefix in where
        for job_id in (job, second):  # the short id and the queue on every job line
            term.wait_for(rf"^{STAMP} {job_id[:8]} default probe:run .*DONE")
            assert re.search(rf"^{STAMP} {job_id[:8]} default probe:run .*RUNNING", term.text, re.M)

        held = dispatch(queue_target, "--sleep", "60")  # still running when the signals come
        term.wait_for(rf"^{STAMP} {held[:8]} default probe:run .*RUNNING")
        term.proc.send_signal(signal.SIGINT)
        line = term.wait_for(rf"^\n({STAMP}) Finishing {held[:8]} probe:run; press Ctrl-C again"
                             r" \(or send another SIGTERM\) to stop now\.$")
        assert line  # on a line of its own, after the ^C a terminal echoes
        term.proc.send_signal(signal.SIGINT)  # the second one stops it now: the job is put back (RETRY, not counted as an attempt)
        try:
            stop = term.wait_for(rf"^{STAMP} Worker stopped: forced to stop, after 3 jobs \((.+)\)\.$", timeout=20)
        except AssertionError:
            raise AssertionError(term.text) from None
        assert stop.group(1) == where
        assert term.proc.wait(timeout=30) == 1
        info = queue_target.backend.find(held)
        assert info is not None and str(info.state) == "pending" and info.attempts == 0
        assert "{'" not in term.text and '{"' not in term.text  # -v events are text, not dicts
        assert "hello from the job" not in term.text  # output goes to the job's log (--echo shows it)
    finally:
        term.close()


def test_after_one_job_and_the_stop_line_when_the_queues_are_empty(queue_target: Target) -> None:
    dispatch(queue_target)
    term = Terminal(worker_argv("--stop-when-empty", "--sleep=0.1"), queue_target.env)
    try:
        assert term.proc.wait(timeout=60) == 0
        term._reader.join(timeout=5)
        assert re.search(rf"^{STAMP} Worker stopped: the queues are empty, after 1 job \(.+\)\.$", term.text, re.M), \
            term.text
    finally:
        term.close()
