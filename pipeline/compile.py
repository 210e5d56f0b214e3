"""Compile stage: changed users' facts -> per-user deltas, on a pool of long-lived Ray workers.

The stage is a plain function over an Arrow table of facts. Users are packed, whole, into
chunks of about ``facts_per_batch`` facts (sorted by user id, so chunking is deterministic);
each chunk is one task for a pool of Ray actors that load the model once. All facts of a user
go to one worker together. Ray restarts a dead actor and re-runs its task
(``max_restarts``/``max_task_retries``); results are keyed by user, so a retried chunk can
neither lose nor duplicate a user. All the Ray wiring (pool size, GPUs, retries) lives in
this module.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa

from engram_core.compiler import CompileOptions, Fact, FactResult, compile_facts
from engram_core.delta import Delta

log = logging.getLogger(__name__)

ACTOR_MAX_RESTARTS = 3
ACTOR_MAX_TASK_RETRIES = 3


@dataclass(frozen=True)
class CompileStageResult:
    deltas: dict[str, Delta]
    results: list[FactResult]
    facts_per_user: dict[str, int]

    @property
    def ok(self) -> int:
        return sum(r.status == "ok" for r in self.results)


def facts_from_table(table: pa.Table) -> list[Fact]:
    """Fact-state rows -> compiler facts (in table order)."""
    cols = [table.column(c).to_pylist() for c in ("user_id", "fact_id", "trigger", "answer")]
    return [Fact(u, f, t, a) for u, f, t, a in zip(*cols)]


def chunk_users(facts: list[Fact], facts_per_chunk: int) -> list[list[Fact]]:
    """Whole users, sorted by id, packed into chunks of about ``facts_per_chunk`` facts."""
    by_user: dict[str, list[Fact]] = {}
    for fact in facts:
        by_user.setdefault(fact.user_id, []).append(fact)
    chunks, current = [], []
    for user in sorted(by_user):
        current.extend(sorted(by_user[user], key=lambda f: f.fact_id))
        if len(current) >= facts_per_chunk:
            chunks.append(current)
            current = []
    if current:
        chunks.append(current)
    return chunks


class CompileWorker:
    """Holds one loaded model; compiles chunks of whole users (a Ray actor, or used in-process)."""

    def __init__(self, model_dir: str, options: CompileOptions, device: str | None = None, threads: int | None = None):
        import torch

        from engram_core.checkpoint import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.options = options
        # On GPUs: bf16 weights (row values stay fp32) and eager attention, which beats the
        # flash kernels for the compiler's one-query steps (bench/RESULTS.md).
        on_gpu = str(device).startswith("cuda")
        self.model = load_checkpoint(model_dir, device=device, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                     attn_implementation="eager" if on_gpu else None)
        self.fingerprint = self.model.fingerprint

    def compile(self, facts: list[Fact]) -> tuple[dict[str, Delta], list[FactResult], str]:
        result = compile_facts(self.model, facts, self.options)
        return result.deltas, result.facts, self.fingerprint

    def pid(self) -> int:
        return os.getpid()


def _merge(outputs: Iterator[tuple[dict[str, Delta], list[FactResult], str]], fingerprint: str,
           on_chunk: Callable[[int, int], None]) -> CompileStageResult:
    deltas: dict[str, Delta] = {}
    results: list[FactResult] = []
    for chunk_deltas, chunk_results, worker_fingerprint in outputs:
        if worker_fingerprint != fingerprint:
            raise RuntimeError(f"compile worker loaded model {worker_fingerprint[:16]}, expected {fingerprint[:16]}")
        duplicate = deltas.keys() & chunk_deltas.keys()
        if duplicate:  # cannot happen with whole-user chunks; guard the promise anyway
            raise RuntimeError(f"users compiled twice: {sorted(duplicate)[:5]}")
        deltas.update(chunk_deltas)
        results.extend(chunk_results)
        on_chunk(len({r.user_id for r in chunk_results}), len(chunk_results))
    counts: dict[str, int] = {}
    for r in results:
        counts[r.user_id] = counts.get(r.user_id, 0) + 1
    results.sort(key=lambda r: (r.user_id, r.fact_id))
    return CompileStageResult(deltas, results, counts)


def compile_stage(
    model_dir: str,
    facts: list[Fact],
    *,
    fingerprint: str,
    options: CompileOptions = CompileOptions(),
    workers: int = 2,
    gpus_per_worker: float | None = None,
    on_chunk: Callable[[int, int], None] = lambda users, facts: None,
) -> CompileStageResult:
    """Compile ``facts`` on ``workers`` Ray actors (0 = in this process, no Ray)."""
    chunks = chunk_users(facts, options.facts_per_batch)
    if not chunks:
        return CompileStageResult({}, [], {})
    if workers == 0:
        worker = CompileWorker(model_dir, options)
        return _merge((worker.compile(c) for c in chunks), fingerprint, on_chunk)

    import ray
    from ray.util import ActorPool

    if not ray.is_initialized():
        raise RuntimeError("compile_stage: call pipeline.compile.start_ray() first (or use workers=0)")
    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actor_cls = ray.remote(
        num_cpus=1, num_gpus=gpus, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_TASK_RETRIES
    )(CompileWorker)
    size = min(workers, len(chunks))
    actors = [actor_cls.remote(model_dir, options, None, 1 if gpus == 0 else None) for _ in range(size)]
    try:
        pool = ActorPool(actors)
        outputs = pool.map_unordered(lambda actor, chunk: actor.compile.remote(chunk), chunks)
        return _merge(outputs, fingerprint, on_chunk)
    finally:
        for actor in actors:
            ray.kill(actor)


def start_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a Ray cluster by address, or start a local one (no dashboard: nothing to reach)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    if address or os.environ.get("RAY_ADDRESS"):  # a given cluster, or the one running this job
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus or max(2, os.cpu_count() or 2), **kwargs)
