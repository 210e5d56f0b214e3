"""Benchmark: cross-user collisions and co-batch groups, shard by shard, at 1M users.

Synthetic addresses: every user has ``--facts`` facts of ``--rows-per-fact`` rows each (one row
per hash head, ``--heads`` heads of ``--slots`` slots in one Engram layer). A fraction
``--common`` of facts use a popular trigger drawn from a Zipf law over ``--templates`` triggers
("My dentist is"): all users with that trigger write the identical rows at its last position;
the rest write rows of rare triggers (uniformly random slots). Users are processed shard by
shard (``xxh64(user_id) mod shards`` in production; here user i is in shard i mod shards), so a
shard's arrays are the only rows in memory at once.

    .venv/bin/python bench/collisions.py --json              # 1,000,000 users x 20 facts, 64 shards
    .venv/bin/python bench/collisions.py --users 20000 --shards 4
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.collisions import collision_table, cross_user_collisions_arrays, row_keys  # noqa: E402


def synthetic_shard(rng: np.random.Generator, users: int, args) -> tuple[np.ndarray, np.ndarray]:
    """(rows_per_user, keys): each user's unique row keys, user by user."""
    facts = users * args.facts
    common = rng.random(facts) < args.common
    # Zipf over templates (rank 1 most popular), truncated to the template count.
    template = np.minimum(rng.zipf(args.zipf, facts), args.templates) - 1
    head = np.arange(args.heads)
    slot_common = (template[:, None] * 1_000_003 + head[None, :] * 7_919) % args.slots  # (facts, heads)
    slot_rare = rng.integers(0, args.slots, (facts, args.heads))
    slot = np.where(common[:, None], slot_common, slot_rare)
    row = head[None, :] * args.slots + slot  # (facts, heads): head h owns rows [h*slots, (h+1)*slots)
    keys = row_keys(np.zeros(row.size, np.int64), row.ravel()).reshape(users, args.facts * args.heads)
    # A user's facts may hit the same row twice (two facts, one trigger): a delta holds it once.
    keys.sort(axis=1)
    fresh = np.ones_like(keys, bool)
    fresh[:, 1:] = keys[:, 1:] != keys[:, :-1]
    return fresh.sum(axis=1), keys[fresh]


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    per_shard = np.full(args.shards, args.users // args.shards)
    per_shard[: args.users % args.shards] += 1
    gen_seconds = collide_seconds = 0.0
    reports = []
    traced_peak = 0
    totals = dict(rows=0, shared_rows=0, conflicted_users=0, pairs=0, groups=0)
    worst = dict(min_groups=0, groups=0, biggest_group=0)
    for shard, users in enumerate(per_shard.tolist()):
        t0 = time.perf_counter()
        sizes, keys = synthetic_shard(rng, users, args)
        names = [f"s{shard}-u{i}" for i in range(users)]
        t1 = time.perf_counter()
        if args.tracemalloc and shard == 0:
            tracemalloc.start()
        report = cross_user_collisions_arrays(names, sizes, keys, top=args.top)
        if args.tracemalloc and shard == 0:
            traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        t2 = time.perf_counter()
        gen_seconds += t1 - t0
        collide_seconds += t2 - t1
        reports.append(report)
        for key in totals:
            totals[key] += len(report.groups) if key == "groups" else getattr(report, key)
        worst["min_groups"] = max(worst["min_groups"], report.min_groups)
        worst["groups"] = max(worst["groups"], len(report.groups))
        worst["biggest_group"] = max(worst["biggest_group"], max(len(g) for g in report.groups))
        del sizes, keys, names
        if args.verbose:
            print(f"shard {shard}: {report.summary()} in {t2 - t1:.2f}s", file=sys.stderr)
    t3 = time.perf_counter()
    table = collision_table(reports, top=args.top)
    table_seconds = time.perf_counter() - t3
    hottest = table.slice(0, 3).to_pylist()
    return {
        "users": args.users, "facts_per_user": args.facts, "rows_per_fact": args.heads, "shards": args.shards,
        "table_rows": args.heads * args.slots, "common_fraction": args.common, "templates": args.templates,
        "zipf": args.zipf,
        "seconds_collisions": round(collide_seconds, 2), "seconds_synthetic_data": round(gen_seconds, 2),
        "seconds_collision_table": round(table_seconds, 3),
        "users_per_second": round(args.users / collide_seconds) if collide_seconds else None,
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "tracemalloc_peak_mib_one_shard": round(traced_peak / 2**20, 1) if args.tracemalloc else None,
        **{f"total_{k}": v for k, v in totals.items()},
        "max_min_groups_per_shard": worst["min_groups"], "max_groups_per_shard": worst["groups"],
        "biggest_group": worst["biggest_group"],
        "hottest_rows": [{"row_id": r["row_id"], "owners": r["owners"]} for r in hottest],
        "machine": f"{platform.machine()} {platform.processor() or ''} cpus={__import__('os').cpu_count()}".strip(),
        "python": platform.python_version(), "numpy": np.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--heads", type=int, default=16, help="rows per fact (one per hash head)")
    parser.add_argument("--slots", type=int, default=100_003, help="slots per head")
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--common", type=float, default=0.5, help="fraction of facts with a popular trigger")
    parser.add_argument("--templates", type=int, default=50_000, help="distinct popular triggers")
    parser.add_argument("--zipf", type=float, default=1.3, help="Zipf exponent of trigger popularity")
    parser.add_argument("--top", type=int, default=100, help="hot rows kept per shard and in the table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations of shard 0")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--verbose", action="store_true", help="per-shard lines on stderr")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
