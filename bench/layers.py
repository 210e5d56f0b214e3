"""A serving node: applying one night's layers against loading the whole shard set.

    .venv/bin/python bench/layers.py --users 1000000 --shards 64 --changed 0.05 --json

A local store holds N users' synthetic deltas (``--rows`` rows of the tiny model's width each, at
its Engram layers) in S shards, published as bases through the nightly's store-level functions
(jobs.synthetic.publish_synthetic_night: the same write_base / write_layer the night uses). A
serving node (serving.pull.PullClient, every shard, its own cache folder) loads them cold
(download, verify, decode, check every delta against the model), then again as a restarted node
from its cache. A night then changes a FRACTION of the users (nine in ten get a new delta, one in
ten is removed), written as one layer per shard, and the node polls: it downloads and applies
only the layers. Reported per step: seconds, objects and bytes downloaded, layers applied, and
the process's RSS; plus the layer poll's share of each full load.

No asserts on time: results go to bench/RESULTS.md with date and machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from engram_core.checkpoint import load_checkpoint  # noqa: E402
from engram_core.delta import Delta  # noqa: E402
from engram_core.tiny import init_tiny  # noqa: E402
from jobs.synthetic import publish_synthetic_night  # noqa: E402
from serving.pull import PullClient  # noqa: E402
from versions.store import open_store  # noqa: E402


def synthetic_deltas(em, users: list[str], rows: int, rng: np.random.Generator) -> dict[str, Delta]:
    """Random deltas: ``rows`` distinct rows per user spread over the model's Engram layers."""
    layers = list(em.config.layers)
    per_layer = max(1, rows // len(layers))
    sizes = {layer: em.memory.num_rows(layer) for layer in layers}
    out = {}
    for user in users:
        layer_ids = np.repeat(np.array(layers, np.int16), per_layer)
        row_ids = np.concatenate([rng.choice(sizes[layer], per_layer, replace=False) for layer in layers])
        values = (rng.standard_normal((len(row_ids), em.config.row_width)) * 0.5).astype(np.float16)
        out[user] = Delta.from_unsorted(layer_ids, row_ids, values)
    return out


def rss_mib() -> float:
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def timed_poll(client: PullClient) -> dict:
    start = time.perf_counter()
    result = client.poll()
    seconds = time.perf_counter() - start
    if result.error:
        raise SystemExit(f"poll failed: {result.error}")
    return {"seconds": round(seconds, 3), "version": result.version, "downloaded_objects": result.downloaded_objects,
            "downloaded_bytes": result.downloaded_bytes, "layers_applied": result.layers_applied,
            "rebuilt_shards": len(result.rebuilt_shards), "users": client.index.num_users, "rss_mib": rss_mib()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--shards", type=int, default=64)
    ap.add_argument("--rows", type=int, default=16, help="rows per user's delta")
    ap.add_argument("--changed", type=float, default=0.05)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    root = args.workdir or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    init_tiny(root / "model")
    em = load_checkpoint(root / "model")
    store = open_store(str(root / "store"))
    rng = np.random.default_rng(0)
    users = [f"user-{i:08d}" for i in range(args.users)]

    t = time.perf_counter()
    deltas = synthetic_deltas(em, users, args.rows, rng)
    generate_s = time.perf_counter() - t
    t = time.perf_counter()
    # one layer per shard however small the bases' share: this measures applying a night's layer
    options = dict(num_shards=args.shards, compact_layer_share=1e9)
    v1 = publish_synthetic_night(store, em.fingerprint, deltas, job_id="bench-base", **options)
    publish_base_s = time.perf_counter() - t
    del deltas
    gc.collect()

    cold = PullClient(store, em, cache_dir=root / "cache")
    steps = {"before_load": {"rss_mib": rss_mib()}, "load_cold": timed_poll(cold)}
    del cold
    gc.collect()
    node = PullClient(store, em, cache_dir=root / "cache")
    steps["load_from_cache"] = timed_poll(node)

    changed = sorted(rng.choice(args.users, max(1, int(args.users * args.changed)), replace=False).tolist())
    removed = set(changed[:: 10])
    new = synthetic_deltas(em, [users[i] for i in changed if i not in removed], args.rows, rng)
    t = time.perf_counter()
    v2 = publish_synthetic_night(store, em.fingerprint, new | {users[i]: None for i in removed}, job_id="bench-night",
                                 **options)
    publish_layer_s = time.perf_counter() - t
    steps["apply_night"] = timed_poll(node)
    check = [users[i] for i in changed[:50]]
    assert all((node.deltas_for(u) == ()) if u not in new else node.deltas_for(u)[0].equals(new[u]) for u in check)

    out = {
        "users": args.users, "shards": args.shards, "rows_per_user": args.rows, "row_width": em.config.row_width,
        "changed": args.changed, "changed_users": len(changed), "removed_users": len(removed),
        "base_bytes": sum(e.bundle_bytes for e in v1.shards), "layer_bytes": sum(x.bytes for e in v2.shards for x in e.layers),
        "generate_s": round(generate_s, 1), "publish_base_s": round(publish_base_s, 1),
        "publish_layer_s": round(publish_layer_s, 1), "steps": steps,
        "apply_share_of_cold_load": round(steps["apply_night"]["seconds"] / steps["load_cold"]["seconds"], 4),
        "apply_share_of_cache_load": round(steps["apply_night"]["seconds"] / steps["load_from_cache"]["seconds"], 4),
        "download_share": round(steps["apply_night"]["downloaded_bytes"] / steps["load_cold"]["downloaded_bytes"], 4),
        "device": f"cpu x{os.cpu_count()}",
    }
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
