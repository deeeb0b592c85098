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

from waitfor import wait_for

ROOT = Path(__file__).resolve().parent.parent.parent
AGENT = Path(__file__).resolve().parent / "hostagent.py"
PROBE = ROOT / "tests" / "project" / "commands" / "probe.py"
STATE_DIR = Path("/run/forge-lab")
#: Where a host's mount namespace keeps a view of the real /tmp (see ``Host.start``).
KEEP = STATE_DIR / "keep-tmp"
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
        # The host's own /tmp hides the real one; what forge runs from (the checkout, the venv)
        # may live under the real /tmp (CI clones into a mktemp dir), so those are bound back
        # from a view of the real /tmp kept at KEEP (a mount of this namespace only).
        KEEP.mkdir(parents=True, exist_ok=True)
        setup = ('mount --bind /tmp "$5" && mount --bind "$1" /tmp && '
                 'for k in $6; do mkdir -p "$k" && mount --bind "$5${k#/tmp}" "$k" || exit 1; done && '
                 'mount -t tmpfs -o mode=1777 lab-shm /dev/shm && '
                 'mount -t tmpfs -o mode=1777 lab-vartmp /var/tmp && hostname "$2" && exec "$3" -u "$4"')
        argv = ["ip", "netns", "exec", self.netns, "unshare", "--uts", "--pid", "--fork", "--mount-proc",
                "--propagation", "private", "--", "sh", "-c", setup, "sh", str(self.root), self.name,
                sys.executable, str(AGENT), str(KEEP), " ".join(_under_tmp())]
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
               timeout: str = "60s", tries: int = 1) -> Any:
        """Deploy the probe project to every host (and to the test process), on ``redis``
        (default: the lab's), with a fresh key prefix."""
        from .deploy import Deploy

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


def _under_tmp() -> list[str]:
    """The directories forge runs from that lie under the real /tmp: the checkout and the
    Python environments (shortest first, so a parent is bound before what is inside it)."""
    dirs = {ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.executable).resolve().parent}
    tmp = Path("/tmp")
    out = sorted({str(d) for d in dirs if d != tmp and tmp in d.parents}, key=len)
    for d in out:
        if " " in d:
            raise RuntimeError(f"the host lab cannot bind {d!r} (a space in the path)")
    return [d for d in out if not any(d != o and d.startswith(o + "/") for o in out)]


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
