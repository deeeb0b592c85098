"""A real ``forge dashboard`` process over a real store (file or Redis), for the dashboard tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = '''
import sys
import time
from typing import Annotated

import typer

from forge import command


@command("dash:echo")
def echo(words: Annotated[list[str] | None, typer.Argument()] = None) -> None:
    """Print the arguments (each on a line) and the hostile output the XSS test looks for."""
    for w in words or []:
        print(w, flush=True)
    print("<script>alert('out')</script><b onmouseover=alert(4)>bold?</b>", flush=True)


@command("dash:work")
def work(steps: int = 5, delay: float = 0.3) -> None:
    """Print a line and report progress every DELAY seconds, STEPS times."""
    for i in range(1, steps + 1):
        print(f"step {i} of {steps}", flush=True)
        print(f"::forge-progress {i}/{steps} step {i}", file=sys.stderr, flush=True)
        time.sleep(delay)


@command("dash:fail")
def fail(why: str = "boom") -> None:
    """Fail with an exception naming WHY."""
    raise RuntimeError(f"dash:fail failed: {why}")
'''


def write_project(root: Path, kind: str, redis_url: str | None) -> dict[str, str]:
    """A project using ``kind``; returns the environment for forge subprocesses."""
    (root / "commands").mkdir(parents=True, exist_ok=True)
    (root / "commands" / "dash.py").write_text(COMMANDS)
    prefix = f"forge-dash-{uuid.uuid4().hex[:8]}"
    (root / "forge.toml").write_text(
        '[forge]\ncommands = ["commands"]\n'
        f'[queue]\nconnection = "{kind}"\ntries = 1\ntimeout = "60s"\nbackoff = [0]\ndone_retention = "1h"\n'
        f'[connections.file]\npath = "{root / "queue"}"\n'
        f'[connections.redis]\nurl = "{redis_url or "redis://127.0.0.1:6379/0"}"\nprefix = "{prefix}"\n'
        '[[schedule]]\nname = "nightly-echo"\ncommand = "dash:echo"\nargs = ["nightly"]\ncron = "30 2 * * *"\n'
        '[[schedule]]\ncommand = "dash:work"\nargs = ["--steps=1"]\nevery = "15m"\nqueue = "reports"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(root / "forge.toml"), FORGE_NO_PLUGINS="1",
               XDG_CACHE_HOME=str(root / "xdg-cache"), XDG_DATA_HOME=str(root / "xdg"))
    env["FORGE_TEST_PREFIX"] = prefix
    return env


def forge(env: dict[str, str], *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "forge", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"forge {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def dispatch(env: dict[str, str], *args: str, queue: str = "default") -> str:
    return forge(env, "queue:dispatch", "--queue", queue, *args).stdout.strip().splitlines()[-1]


@dataclass
class Dashboard:
    """A running ``forge dashboard``: its URL (with and without the token) and process."""

    proc: subprocess.Popen[str]
    url: str
    base: str
    token: str
    stderr: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reader is not None:
            self.reader.join(timeout=10)


def start_dashboard(env: dict[str, str], *args: str, timeout: float = 60) -> Dashboard:
    """Start ``forge dashboard --listen=127.0.0.1:0`` and wait for the URL it prints."""
    proc = subprocess.Popen([sys.executable, "-m", "forge", "dashboard", "--listen=127.0.0.1:0", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    line = ""
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            break
        m = re.match(r"Open (http://[^/]+)/\?token=(\S+)", line)
        if m:
            d = Dashboard(proc, f"{m.group(1)}/?token={m.group(2)}", m.group(1), m.group(2))
            # Keep reading its stderr (a full pipe would stall it); the tests show it on failure.
            d.reader = threading.Thread(target=d.stderr.extend, args=(proc.stderr,), daemon=True)
            d.reader.start()
            return d
    proc.kill()
    err = proc.stderr.read() if proc.stderr else ""
    raise AssertionError(f"forge dashboard did not print its URL: {line!r} {err}")
