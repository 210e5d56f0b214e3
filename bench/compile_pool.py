"""The compile stage on Ray two ways: the night's own actor pool against Ray Data's actor-pool
``map_batches`` (issue 14 item 1: keep whichever is as fast or faster).

Both compile the same chunks of the same synthetic users (random-word facts, whole users packed
into chunks by pipeline.compile.plan_chunks, exactly as a night plans them) with the same
CompileWorker, one actor per GPU (two CPU actors without GPUs), starting from no actor:

* ``pool``: pipeline.runner's compile pool (what ``engram run nightly`` uses): actors start,
  chunks go to started actors, each chunk's shard inputs are passed as object refs, each chunk's
  output stays in the object store as one object for its shards' assembly.
* ``ray_data``: ``ray.data.from_items(chunk indices).map_batches(<class>, batch_size=1,
  concurrency=G, num_gpus=1)``: the class loads the model in its constructor (ActorPoolStrategy),
  fetches the chunk's shard inputs with ray.get, compiles, and returns the output pickled in a
  binary column; ``materialize()`` ends when every output block is in the object store.

Reported per variant: wall seconds from the first actor's creation to the last chunk's output,
the compile facts/s, and the facts compiled ok (they must agree). Each variant starts its own
actors, so both pay the model load. Needs Ray Data's dependencies (``pip install 'ray[data]'``:
pandas); the pool variant alone runs without.

    python bench/compile_pool.py --model tiny --users 400 --facts-per-user 10 --json
    python bench/compile_pool.py --model d768 --users 20000 --facts-per-user 20 --gpus 2 --json

No asserts on time: results go to bench/RESULTS.md with date and machine.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from night_scale import build_model, vocabulary_words  # noqa: E402

VARIANTS = ("pool", "ray_data")


def shard_tables(users: int, facts_per_user: int, shards: int, words: list[str], trigger_words: int,
                 seed: int = 0) -> dict[int, pa.Table]:
    """Per shard, the compile table a night's apply gives (pipeline.shards.COMPILE_COLUMNS, sorted by
    user and fact): random-word facts, users dealt to shards round-robin."""
    rng = np.random.default_rng(seed)
    vocab = np.array(words, dtype=object)
    out = {}
    for shard in range(shards):
        ids = np.arange(shard, users, shards)
        n = len(ids) * facts_per_user
        picks = vocab[rng.integers(0, len(vocab), size=(n, trigger_words + 1))]
        out[shard] = pa.table({
            "user_id": pa.array([f"u{u:08d}" for u in np.repeat(ids, facts_per_user)], pa.string()),
            "fact_id": pa.array([f"f{k:04d}" for k in np.tile(np.arange(facts_per_user), len(ids))], pa.string()),
            "scope": pa.nulls(n, pa.string()),
            "trigger": pa.array([" ".join(p[:-1]) for p in picks], pa.string()),
            "answer": pa.array([" " + p[-1] for p in picks], pa.string()),
        })
    return out


class RayDataCompile:
    """The Ray Data variant's callable class: one CompileWorker per actor."""

    def __init__(self, model_dir: str, options, chunks: list, refs: dict, threads: int | None = None):
        from pipeline.compile import CompileWorker

        self.worker = CompileWorker(model_dir, options, threads=threads)  # as the pool's: 1 thread on a CPU
        self.chunks, self.refs = chunks, refs

    def __call__(self, batch: dict) -> dict:
        import ray

        out: dict[str, list] = {"chunk": [], "facts": [], "ok": [], "output": []}
        for i in batch["chunk"]:
            chunk = self.chunks[int(i)]
            changes = ray.get([self.refs[s.shard] for s in chunk])
            meta, output = self.worker.compile(chunk, *changes)
            out["chunk"].append(int(i))
            out["facts"].append(meta.facts)
            out["ok"].append(meta.ok)
            out["output"].append(pickle.dumps(output, protocol=5))
        return out


def run_pool(model_dir: str, options, chunks: list, refs: dict, workers: int, gpus: int) -> dict:
    from pipeline.runner import RayRunner

    started = time.perf_counter()
    pool = RayRunner().compile_pool(model_dir, options, None, workers, 1.0 if gpus else 0.0)
    facts = ok = 0
    outputs = []
    try:
        for _, meta, output in pool.map(chunks, lambda chunk: [refs[s.shard] for s in chunk]):
            facts, ok = facts + meta.facts, ok + meta.ok
            outputs.append(output)
        wall = time.perf_counter() - started
    finally:
        pool.close(flush=False)
    return {"wall_s": round(wall, 2), "facts": facts, "facts_ok": ok}


def run_ray_data(model_dir: str, options, chunks: list, refs: dict, workers: int, gpus: int) -> dict:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    started = time.perf_counter()
    ds = ray.data.from_items([{"chunk": i} for i in range(len(chunks))], override_num_blocks=len(chunks))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    compiled = ds.map_batches(RayDataCompile, fn_constructor_args=(model_dir, options, chunks, refs, None if gpus else 1),
                              batch_size=1,
                              concurrency=workers, batch_format="numpy", **resources).materialize()
    wall = time.perf_counter() - started
    small = compiled.select_columns(["facts", "ok"]).to_arrow_refs()
    tables = [ray.get(r) for r in small]
    facts = sum(int(pc.sum(t.column("facts")).as_py() or 0) for t in tables)
    ok = sum(int(pc.sum(t.column("ok")).as_py() or 0) for t in tables)
    return {"wall_s": round(wall, 2), "facts": facts, "facts_ok": ok}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "d768"], default="tiny")
    ap.add_argument("--users", type=int, default=400)
    ap.add_argument("--facts-per-user", type=int, default=10)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--gpus", type=int, default=0, help="GPUs of the Ray cluster (one compile actor each)")
    ap.add_argument("--workers", type=int, default=None, help="compile actors (default: GPUs, or 2 on CPU)")
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the Ray cluster (default: this machine's)")
    ap.add_argument("--facts-per-batch", type=int, default=None)
    ap.add_argument("--batches-per-chunk", type=int, default=None)
    ap.add_argument("--trigger-words", type=int, default=None)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each variant, alternating")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="keep the model here (a model already there is used, whatever --model says)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    gpu = args.gpus > 0
    workers = args.workers or (args.gpus if gpu else 2)
    facts_per_batch = args.facts_per_batch or (32768 if gpu else 64)
    batches_per_chunk = args.batches_per_chunk or (4 if gpu else 1)
    trigger_words = args.trigger_words or (16 if args.model == "d768" else 6)
    if "ray_data" in args.variants:
        try:
            import ray.data  # noqa: F401
        except ImportError as err:
            raise SystemExit(f"compile_pool: the ray_data variant needs Ray Data's dependencies ({err}); "
                             "pip install 'ray[data]', or run --variants pool") from None

    import ray

    from engram_core.options import CompileOptions
    from pipeline.compile import plan_chunks
    from pipeline.shards import ShardChanges

    tmp = None if args.workdir else tempfile.TemporaryDirectory()
    root = args.workdir or Path(tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    model_dir = root / "model"
    words = build_model(args.model, model_dir) if not (model_dir / "base").is_dir() else vocabulary_words(model_dir)
    tables = shard_tables(args.users, args.facts_per_user, args.shards, words, trigger_words)
    options = CompileOptions(facts_per_batch=facts_per_batch)
    chunks = plan_chunks([(s, np.full(t.num_rows // args.facts_per_user, args.facts_per_user)) for s, t in tables.items()],
                         facts_per_batch * batches_per_chunk)
    ray.init(num_cpus=args.cpus or os.cpu_count(), num_gpus=args.gpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    refs = {s: ray.put(ShardChanges(compile=t, removed=pa.array([], pa.string()))) for s, t in tables.items()}
    runs = {v: [] for v in args.variants}
    for _ in range(args.repeat):
        for variant in args.variants:
            run = run_pool if variant == "pool" else run_ray_data
            result = run(str(model_dir), options, chunks, refs, workers, args.gpus)
            result["compile_facts_per_s"] = round(result["facts_ok"] / result["wall_s"], 1)
            runs[variant].append(result)
            print(f"{variant}: {result}", file=sys.stderr, flush=True)
    ray.shutdown()
    out = {"model": args.model, "users": args.users, "facts_per_user": args.facts_per_user,
           "facts": args.users * args.facts_per_user, "chunks": len(chunks), "gpus": args.gpus, "workers": workers,
           "facts_per_batch": facts_per_batch, "batches_per_chunk": batches_per_chunk, "runs": runs,
           "best_wall_s": {v: min(r["wall_s"] for r in rs) for v, rs in runs.items()}}
    if {"pool", "ray_data"} <= set(runs):
        out["ray_data_over_pool"] = round(out["best_wall_s"]["ray_data"] / out["best_wall_s"]["pool"], 3)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
