"""Workers on several "hosts" for real (issue 17; issue 13's `queue:workers` across hosts).

Each host is its own network, UTS, PID and mount namespace (``reliability/hosts.py``): its
own hostname, pids, /tmp and /dev/shm, and Redis reached over a veth pair and a bridge. The
Redis server is the lab's own, started for this module. Runs are checked from the jobs' own
start and end stamps (the probe's ledger, one per host and boot, merged).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from typing import Any

import pytest
from reliability.deploy import Deploy
from reliability.hosts import Lab, unavailable
from waitfor import wait_for

from forge.errors import QueueUnavailable
from forge.job import Event, State, idempotent_id
from forge.queue import QueuedCommand
from forge.worker.heartbeat import live_workers

#: Every worker beats at least this often (WorkerOptions.maintenance_interval).
BEAT = 2.0
#: A worker's record counts as dead once not renewed for this long (worker_registry).
STALE = 15.0
#: The lease the tests deploy with (the least a connection may set).
LEASE = 10.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Any:
    reason = unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    with Lab(tmp_path_factory.mktemp("lab"), hosts=3) as lab:
        yield lab


@pytest.fixture
def deploy(lab: Lab, request: pytest.FixtureRequest) -> Any:
    for h in lab.hosts:  # a test may have killed one
        if not h.up:
            h.start()
    d = lab.deploy(request.node.name.removeprefix("test_")[:40])
    try:
        yield d
    finally:
        d.close()


def _started(workers: list) -> None:
    for w in workers:
        w.wait_event("worker_started", timeout=60)


def _drained(d: Deploy, n: int, timeout: float = 90.0) -> None:
    def done() -> bool:
        (st,) = d.backend.stats(["default"])
        return st.done + st.failed >= n and st.size == 0 and st.reserved == 0

    wait_for(done, timeout, 0.1, f"{n} jobs finished")


def _listed(d: Deploy, host: Any) -> list[dict[str, Any]]:
    res = d.forge(host, "queue:workers", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)["workers"]


def test_jobs_drained_by_workers_on_three_hosts_each_run_once(lab: Lab, deploy: Deploy) -> None:
    workers = [deploy.worker(h, "--sleep=0.5") for h in lab.hosts for _ in range(2)]
    _started(workers)
    ids = deploy.queue().dispatch_many([QueuedCommand("probe:tick").with_args(["3"])] * 300)
    _drained(deploy, 300)
    deploy.stop_workers()
    f = deploy.figures(ids)
    assert (f.lost, f.duplicated, f.concurrent, f.unexpected, f.unfinished) == (0, 0, 0, 0, 0), f
    assert f.completed == 300
    records = deploy.records()
    ran_on = {r["job"]: r["host"] for r in records if r["kind"] == "end"}
    assert set(ran_on.values()) == {h.name for h in lab.hosts}, "every host took part"
    for jid in ids:  # the job's record names the host whose ledger saw the run
        info = deploy.backend.find(jid)
        assert info.state == State.DONE and info.attempts == 1
        (claimed,) = [e for e in info.events if e.event == "claimed"]
        assert claimed.worker.split(":")[0] == ran_on[jid], (claimed.worker, ran_on[jid])


def test_one_unique_job_when_three_hosts_dispatch_it_at_once(lab: Lab, deploy: Deploy) -> None:
    results: dict[str, Any] = {}

    def dispatch(host: Any) -> None:
        results[host.name] = deploy.forge(host, "queue:dispatch", "--unique-key=nightly", "probe:run", host.name)

    threads = [threading.Thread(target=dispatch, args=(h,)) for h in lab.hosts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.returncode for r in results.values())
    assert codes == [0, 4, 4], {h: (r.returncode, r.stderr) for h, r in results.items()}
    (st,) = deploy.backend.stats(["default"])
    assert st.size == 1


def test_retry_all_on_one_host_while_workers_on_three_fail_them(lab: Lab, deploy: Deploy) -> None:
    """The contract's multi-worker retry case across hosts: ``queue:retry all`` run on one
    host retries each job failed at its start once, and ends, while workers on every host fail
    the retried jobs again; no job runs twice."""
    n = 150
    b = deploy.backend
    ids = deploy.queue().dispatch_many([QueuedCommand("probe:run").with_arg("--fail")] * n)
    for _ in range(n):
        c = b.claim(["default"], "test:1", 60)
        b.fail(c, Event("failed", c.attempt, time.time(), worker="test:1", error="x"))
    workers = [deploy.worker(h, "--sleep=0.2", "--tries=1") for h in lab.hosts]
    _started(workers)
    res = deploy.forge(lab.hosts[1], "queue:retry", "all", timeout=90)
    assert res.returncode == 0, res.stderr
    assert sorted(res.stdout.split()) == sorted(ids)
    _drained(deploy, n)
    deploy.stop_workers()
    for jid in ids:
        info = b.find(jid)
        assert [e.event for e in info.events].count("retried") == 1, info.events
        assert info.state == State.FAILED
    f = deploy.figures(ids)
    assert (f.duplicated, f.concurrent, f.unexpected) == (0, 0, 0), f
    assert {r["host"] for r in deploy.records()} == {h.name for h in lab.hosts}


def test_a_killed_host_s_jobs_are_recovered_by_the_others_within_the_lease(lab: Lab, deploy: Deploy) -> None:
    """A power cut of one host (its PID namespace's init SIGKILLed: every process of it dies at
    once, mid-job): the other hosts recover its job once the lease lapses, never while the old
    run could still be going; its workers drop out of ``queue:workers`` once their heartbeat
    expires, and the others stay."""
    victim, others = lab.hosts[0], lab.hosts[1:]
    workers = [deploy.worker(h, "--sleep=0.5") for h in lab.hosts]
    _started(workers)
    cmd = QueuedCommand("probe:run").with_timeout(30).with_max_attempts(3)
    ids = deploy.queue().dispatch_many([cmd.with_args([str(i), "--sleep", "2"]) for i in range(6)])

    def running_on_victim() -> list[str]:
        recs = [r for r in deploy.records() if r["host"] == victim.name]
        ended = {(r["job"], r["pid"], r["start"]) for r in recs if r["kind"] == "end"}
        return [r["job"] for r in recs if r["kind"] == "start" and (r["job"], r["pid"], r["start"]) not in ended]

    (hit,) = wait_for(running_on_victim, 60, 0.02, f"a job running on {victim.name}")
    incarnation = victim.incarnation
    killed, gone = victim.kill()
    listed = {w["host"] for w in _listed(deploy, others[0])}
    assert victim.name in listed, "its record lives until its heartbeat expires"

    _drained(deploy, len(ids), timeout=LEASE + 60)
    f = deploy.figures(ids, host_kills=[(victim, incarnation, gone)])
    assert (f.lost, f.concurrent, f.unexpected) == (0, 0, 0), f
    assert f.extra_runs == 1 and f.duplicated_ids == [hit], f
    rerun = [r for r in deploy.records() if r["job"] == hit and r["kind"] == "start" and r["host"] != victim.name]
    assert len(rerun) == 1
    # Recovered within the lease (plus one maintenance round and the loaded machine's slack).
    assert gone <= rerun[0]["start"] <= killed + LEASE + BEAT + 10, (rerun[0]["start"] - killed)
    info = deploy.backend.find(hit)
    assert info.state == State.DONE and info.attempts == 2
    assert any(e.event == "released" and e.reason == "abandoned" for e in info.events), info.events

    def victim_dropped() -> set[str] | None:
        hosts = {w["host"] for w in _listed(deploy, others[1])}
        return hosts if victim.name not in hosts else None

    assert wait_for(victim_dropped, STALE + 20, 0.5, f"{victim.name}'s workers drop out") == \
        {h.name for h in others}
    assert time.time() - killed >= STALE - BEAT - 1  # not before its heartbeat expired


def test_pause_resume_restart_and_workers_act_across_hosts(lab: Lab, deploy: Deploy) -> None:
    workers = [deploy.worker(h, "--sleep=0.5") for h in lab.hosts]
    _started(workers)
    # queue:workers on any host lists every host's workers, each with its host and its pid there.
    expected = sorted((w.host.name, w.pid, w.name) for w in workers)
    for h in lab.hosts:
        got = sorted((w["host"], w["pid"], w["name"]) for w in _listed(deploy, h))
        assert got == expected
    table = deploy.forge(lab.hosts[0], "queue:workers").stdout
    assert all(w.name in table for w in workers), table

    assert deploy.forge(lab.hosts[1], "queue:pause", "default").returncode == 0
    res = deploy.forge(lab.hosts[2], "queue:dispatch", "probe:run", "while-paused")
    assert res.returncode == 0, res.stderr
    jid = res.stdout.strip()
    after = time.time()
    # Every worker has looped (claimed nothing) for two heartbeats since the dispatch.
    wait_for(lambda: all(r.heartbeat_at > after + BEAT + 0.5 for r in live_workers(deploy.backend))
             and len(live_workers(deploy.backend)) == 3, 30, 0.2, "two heartbeats of every worker")
    assert deploy.backend.find(jid).state == State.PENDING

    assert deploy.forge(lab.hosts[0], "queue:resume", "default").returncode == 0
    wait_for(lambda: deploy.backend.find(jid).state == State.DONE, 30, 0.05, "the job runs once resumed")

    assert deploy.forge(lab.hosts[2], "queue:restart").returncode == 0
    for w in workers:
        assert w.wait(60) == 0
        stopped = [e for e in w.events() if e.get("event") == "worker_stopped"]
        assert stopped and stopped[0]["reason"] == "restart", w.events()[-3:]
    assert _listed(deploy, lab.hosts[1]) == []


def test_a_redis_crash_with_aof_always_mid_drain_loses_nothing_acknowledged(lab: Lab, tmp_path: Any) -> None:
    """kill -9 of the Redis server (``appendonly yes``, ``appendfsync always``) while workers
    on two hosts drain and a client dispatches; the server comes back on the same directory and
    port. Every dispatch acknowledged is run, every job acknowledged done before the crash stays
    done and is not run again, and no job runs twice at once."""
    for h in lab.hosts:
        if not h.up:
            h.start()
    server = lab.new_redis(tmp_path / "aof", aof=True)
    d = lab.deploy("aof", redis=server)
    give_up = threading.Event()
    try:
        workers = [d.worker(h, "--sleep=0.5", "-v") for h in lab.hosts[:2]]
        _started(workers)
        q = d.queue()
        n = 300
        keys = [f"aof-{i}" for i in range(n)]
        acked: list[str] = []
        refused = 0

        def dispatcher() -> None:
            nonlocal refused
            for key in keys:
                while not give_up.is_set():  # a client retries a refused dispatch: the key makes it safe
                    try:
                        q.dispatch(QueuedCommand("probe:tick").with_args(["5"]).with_idempotency_key(key))
                    except QueueUnavailable:
                        refused += 1
                        time.sleep(0.05)
                        continue
                    acked.append(idempotent_id(key))
                    break
                time.sleep(0.005)

        t = threading.Thread(target=dispatcher, daemon=True)
        t.start()
        wait_for(lambda: d.backend.stats(["default"])[0].done >= 60, 60, 0.02, "60 jobs done")
        done_before = {i.id for i in d.backend.jobs(queue="default", state=State.DONE)}
        acked_before = len(acked)
        server.kill9()
        outage = ("backend_unavailable", "record_failed", "maintenance_failed")
        wait_for(lambda: any(w.saw(e) for w in workers for e in outage), 30, 0.05, "a worker sees the outage")
        server.start()
        t.join(120)
        assert not t.is_alive() and len(acked) == n
        _drained(d, n, timeout=90)
        d.stop_workers()

        assert acked_before < n, "the crash happened mid-dispatch"
        for w in workers:  # a worker that said the queue was unavailable says when it is back
            if w.saw("backend_unavailable") or w.saw("record_failed"):
                assert w.saw("backend_available"), w.events()[-5:]
        f = d.figures(acked, dispatched=[idempotent_id(k) for k in keys])
        lost = {j: d.backend.find(j) for j in f.lost_ids}
        assert (f.lost, f.concurrent, f.unexpected) == (0, 0, 0), (f, lost)
        # At least once: a claim in flight at the crash may run again (one per worker at most).
        assert f.extra_runs <= len(workers), f
        runs: dict[str, int] = {}
        for r in d.records():
            if r["kind"] == "start":
                runs[r["job"]] = runs.get(r["job"], 0) + 1
        assert done_before and all(runs[j] == 1 for j in done_before)
        assert all(d.backend.find(j).state == State.DONE for j in done_before)
        (st,) = d.backend.stats(["default"])
        assert (st.done, st.failed) == (n, 0)
    finally:
        give_up.set()
        d.close()
        server.stop()


def test_a_host_is_isolated(lab: Lab, deploy: Deploy) -> None:
    """What makes a host a host: its own hostname, pids, /tmp and network; Redis over the bridge."""
    a, b = lab.hosts[0], lab.hosts[1]
    script = ("import os, socket, json; print(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),"
              " 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()), 'tmp': sorted(os.listdir('/tmp'))}))")
    env = deploy.host_env(a)
    seen = [json.loads(h.run([sys.executable, "-c", script], env).stdout) for h in (a, b)]
    assert [s["host"] for s in seen] == [a.name, b.name]
    assert all(s["pids"][0] == 1 and len(s["pids"]) < 10 for s in seen), seen  # only its own processes
    (a.root / "only-a").write_text("x")
    assert "only-a" not in json.loads(b.run([sys.executable, "-c", script], env).stdout)["tmp"]
    routes = a.run([shutil.which("ip") or "ip", "-4", "route"], env).stdout
    assert routes.strip().splitlines() == [routes.strip().splitlines()[0]] and "default" not in routes
    res = deploy.forge(a, "queue:list")  # Redis, over the bridge
    assert res.returncode == 0, res.stderr
