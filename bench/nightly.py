"""One night of the real job on this machine: time per stage for N users x F facts.

Runs `run_nightly` (local Ray cluster, local store, the tiny model) on a synthetic fact log,
then a second night in which 10% of the users change one fact (the incremental path).

    python bench/nightly.py --users 10000 --facts-per-user 20 --workers 2 --json

No asserts on time: results go to bench/RESULTS.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engram_core.tiny import init_tiny  # noqa: E402
from jobs.nightly import run_nightly  # noqa: E402
from jobs.spec import NightlySpec  # noqa: E402
from jobs.synthetic import BASE_TIME, fact_log_rows, write_fact_log  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--facts-per-user", type=int, default=20)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--facts-per-batch", type=int, default=4096)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_tiny(root / "model")
        rows = fact_log_rows(args.users, args.facts_per_user)
        write_fact_log(rows, root / "log" / "day=1" / "part-0.parquet")
        spec = NightlySpec(store=str(root / "store"), fact_log=str(root / "log"), model=str(root / "model"),
                           num_shards=args.shards, workers=args.workers,
                           compile={"facts_per_batch": args.facts_per_batch})
        nights = []
        start = time.perf_counter()
        first = run_nightly(spec)
        nights.append({"night": 1, "wall_s": round(time.perf_counter() - start, 1), **_summary(first)})
        changed = [dict(r, answer=" Juniper", event_time=BASE_TIME + timedelta(days=1))
                   for r in rows if r["fact_id"] == rows[0]["fact_id"]][: max(1, args.users // 10)]
        write_fact_log(changed, root / "log" / "day=2" / "part-0.parquet")
        start = time.perf_counter()
        second = run_nightly(spec)
        nights.append({"night": 2, "wall_s": round(time.perf_counter() - start, 1), **_summary(second)})
    out = {"users": args.users, "facts_per_user": args.facts_per_user, "workers": args.workers, "nights": nights}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


def _summary(report) -> dict:
    return {"version": report.version, "users": report.users, "facts": report.facts,
            "compiled_users": report.compiled_users, "facts_ok": report.facts_ok,
            "facts_failed": report.facts_failed, "seconds": report.seconds}


if __name__ == "__main__":
    main()
