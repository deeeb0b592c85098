"""Chaos soaks outside CI: the kill storm and the contention run at full size, with figures.

    python bench/chaos.py --backend file|redis --workers 4 --jobs 5000 --seconds 60
    python bench/chaos.py --scenario contention --workers 8 --jobs 20000

Same harness and checker as ``tests/test_reliability.py`` (``tests/reliability/``). Prints
one ``FIGURES`` line per run and exits 1 if an invariant broke (lost, concurrent or
unexpected runs, more extra runs than kills that caught a claim, anything left reserved).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from reliability.harness import contention, kill_storm, make_target  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["storm", "contention"], default="storm")
    p.add_argument("--backend", choices=["file", "redis"], default="file")
    p.add_argument("--redis-url", default=os.environ.get("FORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--jobs", type=int, default=5000)
    p.add_argument("--seconds", type=float, default=60.0, help="storm: how long to keep killing")
    p.add_argument("--interval", type=float, default=0.2, help="storm: mean seconds between kills")
    p.add_argument("--job-ms", type=int, default=10, help="storm: each job sleeps this long")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--hostile", action="store_true",
                   help="storm: add descriptor-closing jobs and SIGSTOPs of supervisors to the mix")
    p.add_argument("--json", metavar="FILE", help="also write the figures here")
    a = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="forge-chaos-") as tmp:
        target = make_target(a.backend, Path(tmp), a.redis_url)
        try:
            if a.scenario == "storm":
                res = kill_storm(target, workers=a.workers, jobs=a.jobs, seconds=a.seconds,
                                 interval=a.interval, job_ms=a.job_ms, seed=a.seed, drain_timeout=600,
                                 hostile=a.hostile)
                f = res.figures
                ok = (res.drained and f.lost == f.concurrent == f.unexpected == 0
                      and f.extra_runs <= res.claims_hit and res.reserved_after == 0)
                line = res.line(f"storm-{a.backend}{'-hostile' if a.hostile else ''}", workers=a.workers)
            else:
                res = contention(target, workers=a.workers, jobs=a.jobs)
                f = res.figures
                ok = f.lost == f.duplicated == f.concurrent == f.unexpected == 0
                line = res.line(f"contention-{a.backend}", workers=a.workers)
        finally:
            target.close()
    print(line)
    if a.json:
        Path(a.json).write_text(json.dumps({k: v for k, v in vars(f).items() if not k.endswith("_ids")}, indent=2))
    if not ok:
        print(f"INVARIANT BROKEN: lost={f.lost_ids[:5]} concurrent={f.concurrent_ids[:5]} "
              f"unexpected={f.unexpected_ids[:5]}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
