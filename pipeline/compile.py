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

import hashlib
import itertools
import json
import logging
import os
from dataclasses import asdict, astuple, dataclass
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from engram_core.compiler import CompileOptions, Fact, FactResult, compile_facts
from engram_core.delta import Delta
from versions.layout import PARTIAL_PREFIX
from versions.store import ObjectNotFound

log = logging.getLogger(__name__)

ACTOR_MAX_RESTARTS = 3
ACTOR_MAX_TASK_RETRIES = 3


@dataclass(frozen=True)
class CompileStageResult:
    deltas: dict[str, Delta]
    results: list[FactResult]
    facts_per_user: dict[str, int]
    resumed_facts: int = 0
    """Facts whose chunk was restored from a checkpoint of an earlier, interrupted run."""

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


class ChunkCheckpoints:
    """Compiled chunks kept in the store until the night publishes, so a run killed mid-compile
    resumes from what it had compiled.

    A chunk's key is a sha256 over the model fingerprint, the compile options and the chunk's
    facts, so only an identical chunk is reused. Objects live under ``partial/<key>/`` (no user
    ids in keys); the nightly clears them after publishing, and ``forget`` clears them too.
    """

    PREFIX = PARTIAL_PREFIX

    def __init__(self, store, fingerprint: str, options: CompileOptions):
        self.store, self.fingerprint, self.options = store, fingerprint, options

    def key(self, chunk: list[Fact]) -> str:
        payload = json.dumps([self.fingerprint, asdict(self.options), [list(astuple(f)) for f in chunk]],
                             ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def load(self, key: str) -> tuple[dict[str, Delta], list[FactResult], str] | None:
        from schemas.bundle import bundle_deltas, decode_bundle

        try:
            bundle = self.store.get(f"{self.PREFIX}{key}/bundle.parquet")
            results = pq.read_table(pa.BufferReader(self.store.get(f"{self.PREFIX}{key}/results.parquet")))
        except ObjectNotFound:
            return None
        facts = [FactResult(**row) for row in results.to_pylist()]
        return bundle_deltas(decode_bundle(bundle, source=f"{self.store.uri}/{self.PREFIX}{key}")), facts, self.fingerprint

    def save(self, key: str, deltas: dict[str, Delta], results: list[FactResult]) -> None:
        from schemas.bundle import bundle_table, encode_bundle

        counts: dict[str, int] = {}
        for r in results:
            counts[r.user_id] = counts.get(r.user_id, 0) + 1
        table = pa.Table.from_pylist([asdict(r) for r in results])
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        # results last: a chunk counts as saved only once both objects are there
        self.store.put(f"{self.PREFIX}{key}/bundle.parquet", encode_bundle(bundle_table(
            {u: (d, counts.get(u, 0)) for u, d in deltas.items()})))
        self.store.put(f"{self.PREFIX}{key}/results.parquet", sink.getvalue().to_pybytes())

    def clear(self) -> int:
        keys = self.store.list(self.PREFIX)
        for key in keys:
            self.store.delete(key)
        return len(keys)


def _merge(outputs: Iterator[tuple[dict[str, Delta], list[FactResult], str]], fingerprint: str,
           on_chunk: Callable[[int, int], None], save: Callable[[dict, list], None] = lambda d, r: None,
           resumed_facts: int = 0) -> CompileStageResult:
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
        save(chunk_deltas, chunk_results)
        on_chunk(len({r.user_id for r in chunk_results}), len(chunk_results))
    counts: dict[str, int] = {}
    for r in results:
        counts[r.user_id] = counts.get(r.user_id, 0) + 1
    results.sort(key=lambda r: (r.user_id, r.fact_id))
    return CompileStageResult(deltas, results, counts, resumed_facts)


def compile_stage(
    model_dir: str,
    facts: list[Fact],
    *,
    fingerprint: str,
    options: CompileOptions = CompileOptions(),
    workers: int = 2,
    gpus_per_worker: float | None = None,
    on_chunk: Callable[[int, int], None] = lambda users, facts: None,
    checkpoints: ChunkCheckpoints | None = None,
    batches_per_chunk: int = 1,
) -> CompileStageResult:
    """Compile ``facts`` on ``workers`` Ray actors (0 = in this process, no Ray).

    Each task (chunk) is about ``batches_per_chunk`` compile batches of whole users: with more
    than one, a worker tokenizes the next batch while the current one's steps run, and the
    per-chunk costs (transfer, checkpoint) are paid less often; with one, checkpoints are finer.
    Each actor holds two chunks at a time, so the next one's transfer overlaps the current one.
    With ``checkpoints``, chunks compiled by an earlier interrupted run are restored instead of
    compiled again, and every newly compiled chunk is saved as soon as it arrives.
    """
    if batches_per_chunk < 1:
        raise ValueError(f"compile_stage: batches_per_chunk must be at least 1, got {batches_per_chunk}")
    chunks = chunk_users(facts, options.facts_per_batch * batches_per_chunk)
    if not chunks:
        return CompileStageResult({}, [], {})
    restored, todo, key_of_first_user = [], [], {}
    for chunk in chunks:
        key = checkpoints.key(chunk) if checkpoints is not None else None
        earlier = checkpoints.load(key) if checkpoints is not None else None
        if earlier is not None:
            restored.append(earlier)
        else:
            todo.append(chunk)
            key_of_first_user[chunk[0].user_id] = key

    def save(chunk_deltas: dict, chunk_results: list) -> None:
        key = key_of_first_user.get(min(r.user_id for r in chunk_results))
        if checkpoints is not None and key is not None:
            checkpoints.save(key, chunk_deltas, chunk_results)

    resumed = sum(len(r[1]) for r in restored)
    if resumed:
        log.info("compile: resuming, %d facts restored from %d checkpointed chunks", resumed, len(restored))
    if not todo:
        return _merge(iter(restored), fingerprint, on_chunk, resumed_facts=resumed)
    if workers == 0:
        worker = CompileWorker(model_dir, options)
        outputs = itertools.chain(restored, (worker.compile(c) for c in todo))
        return _merge(outputs, fingerprint, on_chunk, save, resumed)

    import ray

    if not ray.is_initialized():
        raise RuntimeError("compile_stage: call pipeline.compile.start_ray() first (or use workers=0)")
    gpus = gpus_per_worker
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    actor_cls = ray.remote(
        num_cpus=1, num_gpus=gpus, max_restarts=ACTOR_MAX_RESTARTS, max_task_retries=ACTOR_MAX_TASK_RETRIES
    )(CompileWorker)
    size = min(workers, len(todo))
    actors = [actor_cls.remote(model_dir, options, None, 1 if gpus == 0 else None) for _ in range(size)]
    try:
        outputs = _on_actors(ray, actors, todo, per_actor=2)
        return _merge(itertools.chain(restored, outputs), fingerprint, on_chunk, save, resumed)
    finally:
        for actor in actors:
            ray.kill(actor)


def _on_actors(ray, actors: list, chunks: list[list[Fact]], per_actor: int) -> Iterator[tuple]:
    """Results of ``actor.compile(chunk)`` for every chunk, in the order they finish, keeping up to
    ``per_actor`` chunks queued on each actor (an actor runs its calls one at a time, so the next
    chunk is already there when one finishes)."""
    queue = iter(chunks)
    pending: dict = {}  # object ref -> actor

    def submit(actor) -> None:
        chunk = next(queue, None)
        if chunk is not None:
            pending[actor.compile.remote(chunk)] = actor

    for _ in range(per_actor):
        for actor in actors:
            submit(actor)
    while pending:
        (done,), _ = ray.wait(list(pending), num_returns=1)
        actor = pending.pop(done)
        output = ray.get(done)
        submit(actor)
        yield output


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
