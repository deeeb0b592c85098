"""Start-up benchmark: how long a fresh ``forge`` process takes, beside ``python -c pass``.

    python bench/startup.py                                   # this checkout's venv
    python bench/startup.py --baseline /path/to/other/.venv/bin/python --runs 41

Each figure is the median wall time of a whole process: ``python -c pass``, ``forge --version``,
``forge --help`` and one ``forge queue:dispatch probe:noop`` (file backend, a throwaway project
with the probe commands; the command cache warmed first, as in cron). With ``--baseline``, the
runs of the two interpreters alternate, so both see the same machine; each interpreter gets its
own project, queue and cache directories. ``forge`` is the console script next to the
interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROBE = ROOT / "tests" / "project" / "commands"


def project(base: Path) -> dict[str, str]:
    """A throwaway file-backend project; returns the environment a forge process runs in."""
    base.mkdir(parents=True)
    (base / "forge.toml").write_text(
        f'[forge]\ncommands = ["{PROBE}"]\nplugins = false\n\n'
        f'[queue]\nconnection = "file"\n\n'
        f'[connections.file]\ndriver = "file"\npath = "{base / "queue"}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGE_")}
    env.update(FORGE_CONFIG=str(base / "forge.toml"), FORGE_NO_PLUGINS="1",
               XDG_CACHE_HOME=str(base / "cache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # start-up as users see it: with cached bytecode
    return env


def cases(python: str) -> dict[str, list[str]]:
    """The processes to time, for one interpreter."""
    forge = str(Path(python).parent / "forge")
    return {
        "python -c pass": [python, "-c", "pass"],
        "forge --version": [forge, "--version"],
        "forge --help": [forge, "--help"],
        "forge queue:dispatch": [forge, "queue:dispatch", "probe:noop"],
    }


def once(argv: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one process, which must succeed."""
    t = time.perf_counter()
    subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", default=sys.executable, help="the interpreter of the forge under test")
    ap.add_argument("--baseline", help="a second interpreter (another checkout's venv) to compare")
    ap.add_argument("--runs", type=int, default=31)
    ap.add_argument("--json", help="write the medians (ms) here")
    args = ap.parse_args()
    pythons = {"this": args.python}
    if args.baseline:
        pythons["baseline"] = args.baseline
    with tempfile.TemporaryDirectory(prefix="forge-startup-") as tmp:
        envs = {label: project(Path(tmp) / label) for label in pythons}
        times: dict[str, dict[str, list[float]]] = {label: {} for label in pythons}
        for label, py in pythons.items():  # warm the page cache, the bytecode and the command cache
            for argv in cases(py).values():
                for _ in range(2):
                    once(argv, envs[label])
        for _ in range(args.runs):
            for label, py in pythons.items():
                for name, argv in cases(py).items():
                    times[label].setdefault(name, []).append(once(argv, envs[label]))
    medians = {label: {name: statistics.median(v) * 1000 for name, v in t.items()} for label, t in times.items()}
    names = list(cases(args.python))
    header = f"{'process (median ms)':<24}" + "".join(f"{label:>12}" for label in pythons)
    print(header)
    for name in names:
        print(f"{name:<24}" + "".join(f"{medians[label][name]:>12.1f}" for label in pythons))
    print(f"({args.runs} runs each, alternated; load average {os.getloadavg()[0]:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(medians, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
