"""One project deployed to every host of a :class:`~reliability.hosts.Lab`, and its workers.

Each host gets its own copy of the probe commands and a ``forge.toml`` pointing at the lab's
Redis (one fresh key prefix per deploy) under its private ``/tmp/<name>``; the test process
has a copy too, so it dispatches and looks like any client. The probe's ledger is one file per
host and boot; :meth:`Deploy.records` merges them with pids made unique across hosts and boots.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from waitfor import wait_for

from .checker import Figures, check
from .hosts import PID_SPAN, PROBE, Host, RedisServer

if TYPE_CHECKING:
    from .hosts import Lab


@dataclass
class HostWorker:
    """A ``forge queue:work --json`` process on a host."""

    host: Host
    incarnation: int
    pid: int  # in the host's PID namespace
    name: str
    out: Path  # its stdout and stderr, from the root namespace

    def events(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.out.read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out

    def saw(self, event: str) -> bool:
        return any(e.get("event") == event for e in self.events())

    def wait_event(self, event: str, timeout: float = 60.0) -> None:
        def seen() -> bool:
            if self.saw(event):
                return True
            if self.exit_code() is not None:
                raise AssertionError(f"{self.name} exited ({self.exit_code()}) before {event}: {self.out.read_text()[-2000:]}")
            return False

        wait_for(seen, timeout, 0.05, f"{self.name}: {event}")

    @property
    def current(self) -> bool:
        """Whether the host still runs the boot this worker was started in."""
        return self.host.up and self.host.incarnation == self.incarnation

    def exit_code(self) -> int | None:
        if not self.current:
            return -9  # its host died with it
        return self.host.exit_codes([self.pid])[self.pid]

    def signal(self, sig: int) -> None:
        if self.current:
            self.host.signal(self.pid, sig)

    def wait(self, timeout: float = 60.0) -> int:
        """Its exit code once it exits (-9 if its host died); AssertionError after ``timeout``."""
        wait_for(lambda: self.exit_code() is not None, timeout, 0.05, f"{self.name} exits")
        code = self.exit_code()
        assert code is not None
        return code


class Deploy:
    """The probe project deployed to every host of ``lab``, on one Redis server and prefix.

    Each host has its own copy of the project under its ``/tmp/<name>/app``; the test process
    has one too (``self.env``), so it dispatches and looks like any client of the queue."""

    def __init__(self, lab: Lab, name: str, redis: RedisServer, *, lease: str, timeout: str, tries: int) -> None:
        self.lab = lab
        self.name = name
        self.redis = redis
        self.prefix = f"forge-lab-{uuid.uuid4().hex[:8]}"
        self.toml = (f'[forge]\nname = "lab"\ncommands = ["commands"]\nplugins = false\n\n'
                     f'[queue]\nconnection = "redis"\ntries = {tries}\ntimeout = "{timeout}"\nbackoff = [0]\n'
                     f'done_retention = "1h"\n\n'
                     f'[connections.redis]\ndriver = "redis"\nurl = "{redis.url}"\nprefix = "{self.prefix}"\n'
                     f'lease = "{lease}"\nconnect_timeout = "2s"\n')
        self.base = f"/tmp/{name}"  # on each host
        for h in lab.hosts:
            self._install(h.outside(self.base))
        local = lab.workdir / "client" / name
        self._install(local)
        self.env = self._env(str(local), str(local / "ledger.jsonl"))
        self.workers: list[HostWorker] = []
        self._seq = 0
        self._backend: Any = None
        self._registry: Any = None

    def _install(self, where: Path) -> None:
        (where / "app" / "commands").mkdir(parents=True, exist_ok=True)
        shutil.copy(PROBE, where / "app" / "commands" / "probe.py")
        (where / "app" / "forge.toml").write_text(self.toml)
        (where / "logs").mkdir(exist_ok=True)

    def _env(self, base: str, ledger: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k in ("PATH", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV", "PYTHONPATH")}
        env.update(HOME=f"{base}/home", FORGE_CONFIG=f"{base}/app/forge.toml", FORGE_NO_PLUGINS="1",
                   FORGE_PROBE_LEDGER=ledger, XDG_CACHE_HOME=f"{base}/cache", XDG_DATA_HOME=f"{base}/data")
        return env

    def host_env(self, host: Host) -> dict[str, str]:
        return self._env(self.base, f"{self.base}/ledger-{host.incarnation}.jsonl")

    # -- the test process's view ------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.redis.url

    @property
    def backend(self) -> Any:
        if self._backend is None:
            from forge.backends.redis.backend import RedisBackend

            self._backend = RedisBackend(self.url, prefix=self.prefix, connect_timeout=2)
        return self._backend

    def queue(self, name: str = "default") -> Any:
        from forge.config import load_settings
        from forge.queue import CommandQueue
        from forge.registry.discovery import build_registry

        if self._registry is None:
            self._registry = build_registry(load_settings(env=self.env))
        return CommandQueue(name, connection=self.backend, registry=self._registry)

    # -- hosts --------------------------------------------------------------------------------

    def worker(self, host: Host, *args: str, name: str | None = None) -> HostWorker:
        """Start ``forge queue:work --json ARGS`` on ``host`` (its default name unless ``name``)."""
        self._seq += 1
        out = f"{self.base}/logs/worker-{host.incarnation}-{self._seq}.jsonl"
        argv = [sys.executable, "-m", "forge", "queue:work", "--json", *args]
        if name:
            argv.append(f"--name={name}")
        pid = host.spawn(argv, self.host_env(host), out, cwd=f"{self.base}/app")
        w = HostWorker(host, host.incarnation, pid, name or f"{host.name}:{pid}", host.outside(out))
        self.workers.append(w)
        return w

    def forge(self, host: Host, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run ``forge ARGS`` on ``host`` and wait for it."""
        return host.run([sys.executable, "-m", "forge", *args], self.host_env(host), cwd=f"{self.base}/app",
                        timeout=timeout)

    def stop_workers(self, timeout: float = 60.0) -> None:
        for w in self.workers:
            if w.current and w.exit_code() is None:
                w.signal(signal.SIGTERM)
        for w in self.workers:
            if w.current:
                try:
                    w.wait(timeout)
                except AssertionError:
                    w.signal(signal.SIGKILL)

    # -- accounting ----------------------------------------------------------------------------

    @staticmethod
    def gpid(host: Host | int, incarnation: int, pid: int) -> int:
        """A pid made unique across hosts and boots, as the merged ledger writes it."""
        index = host.index if isinstance(host, Host) else host
        return ((index + 1) * 1000 + incarnation) * PID_SPAN + pid

    def records(self) -> list[dict[str, Any]]:
        """Every host's ledger lines, pids made unique (``gpid``), with ``host`` added."""
        from .checker import read_ledger

        out = []
        for h in self.lab.hosts:
            for path in sorted(h.outside(self.base).glob("ledger-*.jsonl")):
                inc = int(path.stem.split("-")[1])
                for rec in read_ledger(path):
                    rec["pid"] = self.gpid(h, inc, int(rec.get("pid") or 0))
                    rec["ppid"] = self.gpid(h, inc, int(rec.get("ppid") or 0))
                    rec["host"] = h.name
                    out.append(rec)
        return out

    def figures(self, acknowledged: Iterable[str], *, dispatched: Iterable[str] | None = None,
                killed_at: Mapping[int, float] | None = None,
                host_kills: Iterable[tuple[Host, int, float]] = ()) -> Figures:
        """The checker's figures over the merged ledger. ``host_kills``: (host, incarnation,
        when its last process was gone): every unfinished run of that boot ended then."""
        records = self.records()
        killed = dict(killed_at or {})
        for host, inc, gone in host_kills:
            lo, hi = self.gpid(host, inc, 0), self.gpid(host, inc, PID_SPAN - 1)
            for rec in records:
                for key in ("pid", "ppid"):
                    if lo <= rec[key] <= hi:
                        killed.setdefault(rec[key], gone)
        return check(records, acknowledged, dispatched=dispatched, killed_at=killed)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_workers(30)
        if self._backend is not None:
            with contextlib.suppress(Exception):
                client = self._backend.server.r
                keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i:i + 1000])
            self._backend.close()
