"""Serving benchmark: shard load time, index memory per user, per-request delta overhead, server throughput.

    .venv/bin/python bench/serving.py --json

1. Load a shard of ``--users`` users (synthetic random deltas: ``--facts`` facts x one row per
   hash head at the write layer, fp16, the model's row width) from a local store: cold (store,
   verify, decode, check) and warm (a restarted node reading its disk cache).
2. Memory per user held by the index (tracemalloc: arrays plus Python objects).
3. Added latency of applying per-sequence deltas vs the plain forward of the tiny model at batch
   ``--batch``: median of ``--repeats``; overlay build + forward with 32 distinct users' deltas,
   compared with (a) the forward with the Engram branch skipped (the tiny model's base table is
   all zero) and (b) the forward with the Engram branch computed (a trained, non-zero table).
4. Requests/s of the reference server with ``--concurrency`` clients over loopback (bounded count).

Numbers are recorded in bench/RESULTS.md; nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from engram_core.checkpoint import load_checkpoint  # noqa: E402
from engram_core.delta import Delta  # noqa: E402
from engram_core.memory_index import batch_overlay  # noqa: E402
from engram_core.serving import overlay_for  # noqa: E402
from engram_core.tiny import init_tiny  # noqa: E402
from pipeline.publish import ShardPayload, publish_version  # noqa: E402
from pipeline.pull import PullClient, load_shard_deltas  # noqa: E402
from pipeline.store import LocalStore  # noqa: E402
from schemas.bundle import bundle_table, encode_bundle  # noqa: E402
from schemas.facts import empty_fact_state  # noqa: E402

PROMPT = "My dentist is called Dr. and I live in the city of Lisbon with my dog"


def synthetic_deltas(em, users: int, facts: int, seed: int = 0) -> dict[str, tuple[Delta, int]]:
    rng = np.random.default_rng(seed)
    layer = em.config.write_layer if em.config.write_layer is not None else em.config.layers[-1]
    heads = (em.config.max_ngram - 1) * em.config.heads_per_order
    rows = facts * heads
    num_rows = em.memory.num_rows(layer)
    out = {}
    for i in range(users):
        row_ids = np.sort(rng.choice(num_rows, rows, replace=False))
        values = (rng.standard_normal((rows, em.config.row_width)) * 0.5).astype(np.float16)
        out[f"user-{i:06d}"] = (Delta(np.full(rows, layer, np.int16), row_ids, values), facts)
    return out


def _state_bytes() -> bytes:
    sink = io.BytesIO()
    pq.write_table(empty_fact_state(), sink)
    return sink.getvalue()


def bench_load(em, store: LocalStore, cache: Path, users: int, facts: int) -> tuple[dict, PullClient]:
    deltas = synthetic_deltas(em, users, facts)
    t = time.perf_counter()
    bundle = encode_bundle(bundle_table(deltas))
    encode_s = time.perf_counter() - t
    publish_version(store, shard_payloads={0: ShardPayload(bundle, _state_bytes())}, previous=None,
                    fingerprint=em.fingerprint, num_shards=1, job_id="bench", watermark=None)
    cold = PullClient(store, em, cache_dir=cache)
    t = time.perf_counter()
    result = cold.poll()
    cold_s = time.perf_counter() - t
    assert result.error is None, result.error
    warm = PullClient(store, em, cache_dir=cache)
    t = time.perf_counter()
    warm.poll()
    warm_s = time.perf_counter() - t

    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    held = load_shard_deltas(em, 0, 1, bundle, "bench")
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    held_bytes = sum(s.size_diff for s in after.compare_to(before, "filename"))
    rows = next(iter(deltas.values()))[0].num_rows
    del held
    return {
        "users": users,
        "rows_per_user": rows,
        "row_width": em.config.row_width,
        "bundle_bytes": len(bundle),
        "encode_s": round(encode_s, 3),
        "load_cold_s": round(cold_s, 3),
        "load_from_cache_s": round(warm_s, 3),
        "users_per_s_cold": round(users / cold_s),
        "index_array_bytes_per_user": cold.index.nbytes // users,
        "index_bytes_per_user": held_bytes // users,
    }, cold


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def bench_overhead(em, client: PullClient, batch: int, repeats: int) -> dict:
    users = sorted(client.index.users)[:batch]
    per_sequence = [list(client.deltas_for(u)) for u in users]
    served = [client.index.served_for(u) for u in users]
    ids = torch.as_tensor([em.encode_prompt(PROMPT)] * batch)

    def plain():
        em.model(input_ids=ids)

    def with_deltas():  # what the server does: the batch overlay from deltas checked at load time
        with em.memory.use(batch_overlay(em, served)):
            em.model(input_ids=ids)

    def build_only():
        batch_overlay(em, served)

    def build_unchecked_only():  # engram_core.serving.overlay_for: checks and converts per request
        overlay_for(em, per_sequence)

    plain_s = _median_time(plain, repeats)
    deltas_s = _median_time(with_deltas, repeats)
    build_s = _median_time(build_only, repeats)
    build_per_request_s = _median_time(build_unchecked_only, repeats)
    # A trained Engram table is non-zero, so a real model always computes the Engram branch:
    layers = [em.memory.layer(i) for i in em.config.layers]
    for layer in layers:
        layer.table_is_zero = False
    try:
        engram_s = _median_time(plain, repeats)
        deltas_engram_s = _median_time(with_deltas, repeats)
    finally:
        em.memory.refresh_zero_flags()
    return {
        "batch": batch,
        "prompt_tokens": int(ids.shape[1]),
        "forward_plain_ms": round(plain_s * 1e3, 3),
        "forward_with_deltas_ms": round(deltas_s * 1e3, 3),
        "overlay_build_ms": round(build_s * 1e3, 3),
        "overlay_for_build_ms": round(build_per_request_s * 1e3, 3),
        "added_ratio_vs_plain": round((deltas_s - plain_s) / plain_s, 4),
        "forward_engram_active_ms": round(engram_s * 1e3, 3),
        "forward_engram_active_with_deltas_ms": round(deltas_engram_s * 1e3, 3),
        "added_ratio_vs_engram_active": round((deltas_engram_s - engram_s) / engram_s, 4),
        "repeats": repeats,
    }


def bench_server(em, client: PullClient, concurrency: int, requests_per_client: int, max_tokens: int) -> dict:
    from jobs.serve_cli import ReferenceServer

    users = sorted(client.index.users)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    with ReferenceServer(em, client, port=0, max_batch=concurrency, poll=False) as server:
        def worker(k: int) -> None:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
            for r in range(requests_per_client):
                body = json.dumps({"model": "engram", "prompt": PROMPT, "max_tokens": max_tokens,
                                   "user": users[(k * requests_per_client + r) % len(users)]})
                t = time.perf_counter()
                connection.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                response.read()
                with lock:
                    latencies.append(time.perf_counter() - t)
                    if response.status != 200:
                        errors.append(str(response.status))
            connection.close()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
        t = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t
        health = server.health()
    total = len(latencies)
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": total,
        "max_tokens": max_tokens,
        "errors": len(errors),
        "wall_s": round(wall, 3),
        "requests_per_s": round(total / wall, 2),
        "tokens_per_s": round(total * max_tokens / wall, 1),
        "latency_p50_ms": round(latencies[len(latencies) // 2] * 1e3, 1),
        "latency_p95_ms": round(latencies[int(len(latencies) * 0.95) - 1] * 1e3, 1),
        "batches": health["batches"],
        "mean_batch": round(health["sequences"] / max(health["batches"], 1), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_tiny(root / "model")
        em = load_checkpoint(root / "model")
        load, client = bench_load(em, LocalStore(root / "store"), root / "cache", args.users, args.facts)
        overhead = bench_overhead(em, client, args.batch, args.repeats)
        server = bench_server(em, client, args.concurrency, args.requests_per_client, args.max_tokens)
    results = {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "shard_load": load,
               "delta_overhead": overhead, "server": server}
    if args.json:
        print(json.dumps(results))
    else:
        for section, values in results.items():
            print(f"{section}: {values}")


if __name__ == "__main__":
    main()
