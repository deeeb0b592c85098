"""Several forge "hosts" on one machine, for real: a lab of network, UTS, PID and mount namespaces.

A :class:`Lab` makes a bridge in the root network namespace with a private /24 of
10.231.0.0/16 that no interface of the machine uses (the gateway, ``.1``, is the bridge's
address), and per host a network namespace joined to the bridge by a veth pair (``eth0`` inside,
``.11``, ``.12``, ... and no route but that /24, so a host can reach nothing but its peers and
the lab's Redis). Each host's processes run under an init (``hostagent.py``, PID 1 of the
host's own PID namespace, its own hostname in its own UTS namespace, its own mount namespace
with a private ``/tmp``, ``/var/tmp`` and ``/dev/shm``): no process of one host can see
another's pids, signal them or share a file or lock with them. The lab's Redis
(``redis-server``, started here) listens on the bridge's address only.

The same project is deployed to every host (:meth:`Lab.deploy`: its own copy of the probe
commands and a ``forge.toml`` pointing at the lab's Redis, under the host's ``/tmp``), and the
test process dispatches and looks from the root namespace like any other client.

:meth:`Host.kill` SIGKILLs a host's init: the kernel kills every process of the host at once, as
a power cut would; :meth:`Host.start` boots it again (a new PID namespace: pids start over, and
each boot is an *incarnation* with its own ledger, so runs of two boots never mix).

Everything is torn down by :meth:`Lab.close` (processes killed by pid, namespaces and links
deleted), and a lab left behind by a killed test run is swept by the next one (its record in
``/run/forge-lab`` names the pid that made it). Needs root, iproute2, util-linux and
redis-server: :func:`unavailable` says what is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .checker import Figures, check

ROOT = Path(__file__).resolve().parent.parent.parent
AGENT = Path(__file__).resolve().parent / "hostagent.py"
PROBE = ROOT / "tests" / "project" / "commands" / "probe.py"
STATE_DIR = Path("/run/forge-lab")
NET = "10.231"
#: A pid in a merged ledger: (host, incarnation, pid) made one number (pids differ per host).
PID_SPAN = 10**7


def unavailable() -> str | None:
    """Why a lab cannot run here, or None."""
    if os.geteuid() != 0:
        return "the multi-host lab needs root (network and PID namespaces)"
    for tool in ("ip", "unshare", "mount", "redis-server"):
        if shutil.which(tool) is None:
            return f"the multi-host lab needs {tool} (.ci/run installs iproute2, util-linux and redis-server)"
    name = f"forge-lab-probe-{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
    return res


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pids: Iterable[int]) -> float:
    """CPU time of ``pids`` and of their reaped children (utime, stime, cutime, cstime)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / ticks, sum(values[:8]) / ticks


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.02, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"{what}: not met within {timeout:g} s")
        time.sleep(interval)


# -- Redis ------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server of the lab's, on the bridge address; ``aof``: appendonly + fsync always."""

    bind: str
    port: int
    dir: Path
    aof: bool = False
    proc: subprocess.Popen | None = None
    #: Reached over a network, as from other machines: protected by a password (random).
    password: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@{self.bind}:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> None:
        import redis

        self.dir.mkdir(parents=True, exist_ok=True)
        argv = ["redis-server", "--bind", self.bind, "--port", str(self.port), "--dir", str(self.dir),
                "--save", "", "--daemonize", "no", "--requirepass", self.password, "--logfile", str(self.dir / "redis.log")]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(host=self.bind, port=self.port, password=self.password, socket_connect_timeout=0.5)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: see {self.dir / 'redis.log'}")
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(up, timeout, 0.05, "redis-server answers")
        finally:
            client.close()

    def kill9(self) -> None:
        """A crash: SIGKILL, nothing flushed but what was already fsynced."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _free_port(addr: str) -> int:
    for _ in range(100):
        port = random.randrange(20000, 60000)
        with socket.socket() as s:
            try:
                s.bind((addr, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port on {addr}")


# -- hosts ------------------------------------------------------------------------------------


class HostDown(RuntimeError):
    """The host's init is gone (killed, or it never started)."""


@dataclass
class Host:
    """One lab host: a network namespace and, while it is up, an init in fresh PID, UTS and
    mount namespaces. ``root`` is the host's /tmp as seen from the root namespace."""

    index: int
    name: str
    netns: str
    addr: str
    root: Path
    incarnation: int = 0
    init_pid: int = 0  # the init's pid in the root namespace
    pid_ns: str = ""
    proc: subprocess.Popen | None = None
    _buf: bytes = b""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- boot and power cut ---------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Boot the host: a new init (PID 1) in new PID, UTS and mount namespaces."""
        if self.up:
            raise RuntimeError(f"{self.name} is already up")
        self.incarnation += 1
        self.root.mkdir(parents=True, exist_ok=True)
        self._buf = b""
        setup = ('mount --bind "$1" /tmp && mount -t tmpfs -o mode=1777 lab-shm /dev/shm && '
                 'mount -t tmpfs -o mode=1777 lab-vartmp /var/tmp && hostname "$2" && exec "$3" -u "$4"')
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--pid", "--fork", "--mount-proc",
                "--propagation", "private", "--", "sh", "-c", setup, "sh", str(self.root), self.name,
                sys.executable, str(AGENT)]
        with open(self.root.parent / f"{self.name}.init.log", "ab") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         bufsize=0, start_new_session=True)
        hello = self._reply(timeout)
        if not hello.get("ready") or hello.get("hostname") != self.name or hello.get("pid") != 1:
            raise RuntimeError(f"{self.name}: unexpected hello {hello}")
        kids = wait_for(lambda: self._children(self.proc.pid), 10, 0.01, f"{self.name}'s init appears")
        self.init_pid = kids[0]
        self.pid_ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")

    @staticmethod
    def _children(pid: int) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        except OSError:
            return []

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> tuple[float, float]:
        """Power cut: SIGKILL the host's init, so the kernel kills every process of the host at
        once. Returns (when it was killed, when the last process of the host was gone)."""
        if not self.up:
            raise HostDown(self.name)
        assert self.proc is not None
        at = time.time()
        os.kill(self.init_pid, signal.SIGKILL)
        # An init's exit completes only once every process of its PID namespace is gone, and
        # unshare (its parent) exits after it.
        self.proc.wait(60)
        gone = time.time()
        left = [p for p in _all_pids() if _pid_ns(p) == self.pid_ns]
        if left:
            raise RuntimeError(f"{self.name}: processes {left} outlived their PID namespace's init")
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stdin.close()  # type: ignore[union-attr]
        return at, gone

    def shutdown(self) -> None:
        """Tear the host down whatever its state (kill by pid, never by name)."""
        if self.up:
            with contextlib.suppress(ProcessLookupError, HostDown, subprocess.TimeoutExpired):
                self.kill()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    # -- talking to the init --------------------------------------------------------------

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}'s init did not answer within {timeout:g} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise HostDown(f"{self.name}'s init is gone (see {self.root.parent / (self.name + '.init.log')})")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def request(self, op: str, timeout: float = 30.0, **fields: Any) -> dict[str, Any]:
        with self._lock:
            if not self.up:
                raise HostDown(self.name)
            assert self.proc is not None and self.proc.stdin is not None
            try:
                self.proc.stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
            except (BrokenPipeError, ValueError):
                raise HostDown(self.name) from None
            return self._reply(timeout + 5)

    def spawn(self, argv: Sequence[str], env: Mapping[str, str], out: str, cwd: str | None = None) -> int:
        """Start a process on the host (``out``: a path as the host sees it); its pid there."""
        reply = self.request("spawn", argv=list(argv), env=dict(env), out=out, cwd=cwd)
        if not reply["ok"]:
            raise RuntimeError(f"{self.name}: spawn failed: {reply['error']}")
        return int(reply["pid"])

    def run(self, argv: Sequence[str], env: Mapping[str, str], cwd: str | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess:
        reply = self.request("run", timeout=timeout, argv=list(argv), env=dict(env), cwd=cwd, limit=timeout)
        if not reply["ok"]:
            raise RuntimeError(f"{self.name}: run failed: {reply['error']}")
        if reply["returncode"] is None:
            raise subprocess.TimeoutExpired(list(argv), timeout, reply["stdout"], reply["stderr"])
        return subprocess.CompletedProcess(list(argv), reply["returncode"], reply["stdout"], reply["stderr"])

    def signal(self, pid: int, sig: int) -> bool:
        return bool(self.request("signal", pid=pid, sig=int(sig))["ok"])

    def exit_codes(self, pids: Iterable[int]) -> dict[int, int | None]:
        return {int(p): c for p, c in self.request("status", pids=list(pids))["status"].items()}

    def children(self, pid: int) -> list[int]:
        return list(self.request("children", pid=pid)["children"])

    def alive(self, pids: Iterable[int]) -> list[int]:
        return list(self.request("alive", pids=list(pids))["alive"])

    def pids(self) -> list[int]:
        """Every process of the host, by its pid in the root namespace."""
        return [p for p in _all_pids() if _pid_ns(p) == self.pid_ns] if self.up else []

    def outside(self, inner: str) -> Path:
        """The root namespace's path of the host's ``/tmp/...`` path ``inner``."""
        rel = Path(inner).relative_to("/tmp")
        return self.root / rel


def _all_pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _pid_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


# -- the lab ----------------------------------------------------------------------------------


class Lab:
    """A bridge, ``hosts`` network namespaces on it and a Redis server on its address."""

    def __init__(self, workdir: Path, hosts: int = 3) -> None:
        self.workdir = Path(workdir)
        self.tag = uuid.uuid4().hex[:6]
        self.bridge = f"flb{self.tag}"
        self.subnet = 0
        self.hosts: list[Host] = []
        self.n = hosts
        self.redis: RedisServer | None = None
        self._extra_redis: list[RedisServer] = []
        self._record = STATE_DIR / f"{self.tag}.json"

    @property
    def gateway(self) -> str:
        return f"{NET}.{self.subnet}.1"

    def __enter__(self) -> Lab:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        sweep_stale()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.subnet = _free_subnet()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        netns = [f"forge-lab-{self.tag}-h{i + 1}" for i in range(self.n)]
        self._record.write_text(json.dumps({"pid": os.getpid(), "start": _start_time(os.getpid()),
                                            "bridge": self.bridge, "netns": netns, "subnet": self.subnet,
                                            "redis": []}))
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for i, ns in enumerate(netns):
            veth = f"flv{self.tag}{i + 1}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge, "up")
            addr = f"{NET}.{self.subnet}.{11 + i}"
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            self.hosts.append(Host(i, f"host{i + 1}", ns, addr, self.workdir / f"host{i + 1}" / "tmp"))
        self.redis = self.new_redis(self.workdir / "redis")
        for h in self.hosts:
            h.start()

    def new_redis(self, data: Path, aof: bool = False) -> RedisServer:
        """Start a redis-server on the bridge's address (a free port); stopped by ``close``."""
        server = RedisServer(self.gateway, _free_port(self.gateway), data, aof)
        self._extra_redis.append(server)
        server.start()
        rec = json.loads(self._record.read_text())
        rec["redis"].append(server.pid)
        self._record.write_text(json.dumps(rec))
        return server

    def close(self) -> None:
        for h in self.hosts:
            with contextlib.suppress(Exception):
                h.shutdown()
        for server in self._extra_redis:
            with contextlib.suppress(Exception):
                server.stop()
        for h in self.hosts:
            _ip("netns", "del", h.netns, check=False)  # its end of the veth pair goes with it
        _ip("link", "del", self.bridge, check=False)
        with contextlib.suppress(FileNotFoundError):
            self._record.unlink()

    def deploy(self, name: str, *, redis: RedisServer | None = None, lease: str = "10s",
               timeout: str = "60s", tries: int = 1) -> Deploy:
        """Deploy the probe project to every host (and to the test process), on ``redis``
        (default: the lab's), with a fresh key prefix."""
        return Deploy(self, name, redis or self.redis, lease=lease, timeout=timeout, tries=tries)  # type: ignore[arg-type]


def _free_subnet() -> int:
    used = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
    taken = set()
    if STATE_DIR.exists():
        for rec in STATE_DIR.glob("*.json"):
            with contextlib.suppress(ValueError, OSError):
                taken.add(int(json.loads(rec.read_text())["subnet"]))
    choices = [s for s in range(1, 255) if f"{NET}.{s}." not in used and s not in taken]
    if not choices:
        raise RuntimeError(f"no free /24 in {NET}.0.0/16")
    return random.choice(choices)


def _start_time(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def sweep_stale() -> None:
    """Remove what labs of dead processes left (a test run killed before its clean-up)."""
    if not STATE_DIR.exists():
        return
    for path in STATE_DIR.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _start_time(int(rec["pid"])) == rec.get("start"):
            continue  # its lab is still in use
        for ns in rec.get("netns", []):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for p in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(p), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)
        for pid in rec.get("redis", []):
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if cmd and cmd[0].endswith(b"redis-server") and f"{NET}.{rec['subnet']}.1".encode() in cmd:
                    os.kill(pid, signal.SIGKILL)
        _ip("link", "del", rec.get("bridge", ""), check=False)
        path.unlink(missing_ok=True)


# -- one project deployed to every host -------------------------------------------------------


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
            from forge.backends.redis import RedisBackend

            self._backend = RedisBackend(self.url, prefix=self.prefix, connect_timeout=2)
        return self._backend

    def queue(self, name: str = "default") -> Any:
        from forge.config import load_settings
        from forge.discovery import build_registry
        from forge.queue import CommandQueue

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
                client = self._backend._r
                keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
                for i in range(0, len(keys), 1000):
                    client.delete(*keys[i:i + 1000])
            self._backend.close()
