"""One `forge queue:dispatch` process on Redis and on files, for two forge checkouts (the
baseline's venv python and this one), with `python -c pass`, interleaved; medians of 21 rounds.

    python bench/_peers/cli_ab.py [/path/to/baseline/.venv/bin/python]
"""
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from worker import make_project
envs = {b: make_project(Path(f"/tmp/rp-cliab-{b}"), b, "redis://127.0.0.1:6379/0") for b in ("redis", "file")}
pys = {"base": sys.argv[1] if len(sys.argv) > 1 else "/tmp/rp-base/.venv/bin/python", "new": sys.executable}
cmds = {}
for v, py in pys.items():
    for b, env in envs.items():
        cmds[(v, b)] = ([py, "-m", "forge", "queue:dispatch", f"--connection={b}", "probe:noop"], env, Path(f"/tmp/rp-cliab-{b}"))
cmds[("python", "pass")] = ([sys.executable, "-c", "pass"], None, Path("/tmp"))
# (the cwd is the throwaway project: `python -m` imports from the cwd)
for c, env, cwd in cmds.values():
    subprocess.run(c, env=env, cwd=cwd, capture_output=True, check=True)
ts = {k: [] for k in cmds}
for _ in range(21):
    for k, (c, env, cwd) in cmds.items():
        t = time.perf_counter(); subprocess.run(c, env=env, cwd=cwd, capture_output=True, check=True); ts[k].append((time.perf_counter() - t) * 1000)
med = {k: statistics.median(v) for k, v in ts.items()}
for k, v in med.items(): print(k, round(v, 1))
for v in pys: print(v, "redis/file", round(med[(v, "redis")] / med[(v, "file")], 2))

# delete the keys of the throwaway Redis project (its prefix is unique to this run)
import redis  # noqa: E402

prefix = (Path("/tmp/rp-cliab-redis") / "forge.toml").read_text().split('prefix = "')[1].split('"')[0]
client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
for key in client.scan_iter(match=f"{prefix}:*", count=1000):
    client.delete(key)
