"""Compile stage: changed users' facts -> per-user deltas, on a pool of long-lived workers.

The night's applied shards (pipeline.shards.apply_shard) each hold their compiled users' facts,
sorted by user. :func:`plan_chunks` packs whole users, in (shard, user) order, into chunks of about
``facts_per_batch * batches_per_chunk`` facts; the packing depends only on which users changed,
so a re-run plans the same chunks. Each chunk is one call of :meth:`CompileWorker.compile` on a
worker that loaded the model once (a Ray actor, or this process), which returns per shard the
compiled users' bundle rows and fact results (:class:`CompiledChunk`) for the shards' assembly,
and a small :class:`ChunkMeta` for the driver. All facts of a user go to one chunk; a retried
chunk replaces its first attempt's output whole, so no user is lost or compiled twice.

A worker keeps what it compiled under ``partial/`` in the store (:class:`ChunkCheckpoints`) until
the night publishes, so a night killed mid-compile resumes from what it had compiled. The pool
itself (sizes, GPUs, retries) is wired in pipeline.runner.

With ``compiled_step``, a worker points torch.compile's caches (inductor's FX graph and AOT
autograd caches, Triton's kernels) at one folder per model and torch version on its machine
(:func:`use_step_cache`) before anything compiles, so the step's compile is paid once per model
and machine: every later worker process of that node (the next night's actors, a restarted
actor) loads the compiled step from the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engram_core.options import CompileOptions, Fact, FactResult, status_counts
from engram_core.delta import Delta
from pipeline.scopes import SCOPE_DETAIL
from versions.layout import PARTIAL_PREFIX
from versions.store import ObjectNotFound, open_store

log = logging.getLogger(__name__)

SAMPLE_FACTS = 5  # recalled facts per chunk kept for the night's report

STEP_CACHE_ENV = "ENGRAM_STEP_CACHE_DIR"
"""The folder that holds the compiled step's caches, one subfolder per model and torch version
(default ``~/.cache/engram/compiled-step``: per machine and user, kept across nights). Put it on
a disk that outlives the worker (a Kubernetes hostPath or volume) where containers are fresh
each night; the nightly passes the driver's value to its Ray workers."""


def step_cache_dir(root: str | os.PathLike, fingerprint: str) -> Path:
    """``root/<fingerprint[:16]>-torch<version>``: compiled graphs are only valid for one model
    (its shapes and weights' dtypes) and one torch build."""
    import torch

    version = "".join(c if c.isalnum() or c in ".-_" else "_" for c in torch.__version__)
    return Path(root).expanduser() / f"{fingerprint[:16]}-torch{version}"


def use_step_cache(root: str | os.PathLike | None, fingerprint: str) -> Path:
    """Point this process's torch.compile caches at :func:`step_cache_dir` (``root`` None: the
    ``ENGRAM_STEP_CACHE_DIR`` environment variable, else ``~/.cache/engram/compiled-step``).

    Sets ``TORCHINDUCTOR_CACHE_DIR`` (inductor's FX graph cache and AOT autograd cache live under
    it) and ``TRITON_CACHE_DIR`` (compiled Triton kernels, also the prefix attention kernel), and
    turns both caches on unless the environment turned them off. It must run before anything in
    the process compiles: inductor reads the folder when it first compiles. Returns the folder."""
    root = root or os.environ.get(STEP_CACHE_ENV) or Path.home() / ".cache" / "engram" / "compiled-step"
    directory = step_cache_dir(root, fingerprint)
    (directory / "triton").mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")  # on by default in torch 2.11; workers it starts read these
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    log.info("compile: compiled-step caches in %s", directory)
    return directory


def facts_from_table(table: pa.Table) -> list[Fact]:
    """Fact-state rows -> compiler facts (in table order); ``event_time``, where the table has it,
    is each fact's ``written_at`` (microseconds since the epoch)."""
    cols = [table.column(c).to_pylist() for c in ("user_id", "fact_id", "trigger", "answer")]
    if "event_time" in table.column_names:
        times = pc.cast(table.column("event_time"), pa.timestamp("us", "UTC")).cast(pa.int64()).to_pylist()
    else:
        times = [None] * table.num_rows
    return [Fact(u, f, t, a, w) for u, f, t, a, w in zip(*cols, times)]


@dataclass(frozen=True)
class ChunkSlice:
    """Rows ``[start, stop)`` of one applied shard's compile table: whole users."""

    shard: int
    start: int
    stop: int


def plan_chunks(shards: list[tuple[int, np.ndarray]], facts_per_chunk: int) -> list[tuple[ChunkSlice, ...]]:
    """Whole users packed into chunks of about ``facts_per_chunk`` facts.

    ``shards``: (shard, facts per compiled user in user order) for each applied shard, in shard
    order. A chunk is closed once it holds ``facts_per_chunk`` facts or more, so no user is split
    and every chunk but the last holds at least that many. Raises ValueError for a size below 1.
    """
    if facts_per_chunk < 1:
        raise ValueError(f"plan_chunks: facts_per_chunk must be at least 1, got {facts_per_chunk}")
    chunks: list[tuple[ChunkSlice, ...]] = []
    current: list[ChunkSlice] = []
    filled = 0
    for shard, per_user in shards:
        ends = np.cumsum(np.asarray(per_user, np.int64))
        row, user = 0, 0
        while user < len(ends):
            # the first user at which this chunk reaches its size (or the shard's last user)
            need = facts_per_chunk - filled
            base = ends[user - 1] if user else 0
            last = int(np.searchsorted(ends, base + need, side="left"))
            last = min(last, len(ends) - 1)
            stop = int(ends[last])
            current.append(ChunkSlice(shard, row, stop))
            filled += stop - row
            row, user = stop, last + 1
            if filled >= facts_per_chunk:
                chunks.append(tuple(current))
                current, filled = [], 0
    if current:
        chunks.append(tuple(current))
    return chunks


@dataclass(frozen=True)
class ChunkMeta:
    """What the driver learns from one compiled chunk (no per-fact data)."""

    users: int
    facts: int
    ok: int
    failed: dict[str, int]  # status -> facts
    resumed: bool  # restored from a checkpoint of an earlier, interrupted run
    sample: tuple[dict, ...] = ()  # a few recalled facts: user_id, trigger, answer
    checks: dict | None = None  # engram_core.verify.InvariantReport.to_dict() of a sample of the chunk's users
    seconds: dict[str, float] = field(default_factory=dict)
    """Where the chunk's time went on its worker (:data:`CHUNK_SECONDS`): ``total`` (the call),
    ``compile`` (the compiler) and its phases (``tokenize``, ``prepare``, ``optimize``, ``verify``,
    ``assemble``: CompileResult.timings), ``checkpoint`` (the chunk's facts and key, a resumed
    chunk's read, waiting for the previous chunk's checkpoint write and queueing this one's: the
    write itself runs on a thread), ``output`` (bundle and result tables), ``checks`` (invariant
    sample), ``wait`` (waiting for the worker's previous chunk to leave the device, whose compile
    overlapped this chunk's preparation); on a worker's first chunk also ``load`` (model load; where
    it went: ``load_imports`` (torch and transformers), ``load_tokenizer``, ``load_base``,
    ``load_digest``, ``load_to_device``, ``load_engram``: engram_core.checkpoint.load_checkpoint's
    timings) and ``warm_up`` (:meth:`CompileWorker.warm_up`), which ran before the chunk arrived.
    Seconds."""


@dataclass(frozen=True)
class CompiledChunk:
    """A chunk's output for the assembly, per shard: bundle rows (schemas.bundle, cobatch_group
    null) of the users that got a delta, and every fact's result (FactResult fields)."""

    bundles: dict[int, pa.Table] = field(default_factory=dict)
    results: dict[int, pa.Table] = field(default_factory=dict)


CPU_COMPILE_THREADS = 1
"""Torch intra-op threads of a compile on a CPU. torch's CPU kernels split some reductions by the
number of threads, so the same facts compiled with 1 and with 2 threads differ in the last bit of
some float16 values. One fixed number makes a night's deltas bit-identical whatever runs it: in
process (``workers: 0``) or on Ray actors (which get one thread per CPU they hold), on any machine.
On the tiny model, 2 cores, one thread compiled 80 facts in 1.4 s and two threads in 8.6-37 s
while another job shared the cores. GPU compiles are unaffected (their math runs on the GPU)."""


@contextmanager
def _torch_threads(threads: int | None):
    import torch

    if threads is None or torch.get_num_threads() == threads:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _concurrent_chunks() -> int:
    value = os.environ.get("ENGRAM_CONCURRENT_CHUNKS", "1")
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise ValueError(f"ENGRAM_CONCURRENT_CHUNKS={value!r}: must be a whole number of at least 1 (chunk calls "
                         "a compile actor takes at once); unset it for the default, 1")
    return number


CONCURRENT_CHUNKS = _concurrent_chunks()
"""Chunk calls a compile actor takes at once (Ray ``max_concurrency``; the driver's
``ENGRAM_CONCURRENT_CHUNKS`` environment variable). With 2, one chunk compiles on the device while
the next prepares its facts and the one before builds its output (:meth:`CompileWorker.compile`).
Default 1: measured on one H200 (bench/RESULTS.md, 2026-11-30 third session), 1M facts on one GPU,
the compile stage took 91.7 s with 1 and 95.6 s with 2: the compiler's own host phases (tokenize,
prepare) hold the GIL, and the overlapped output slowed them more than it saved."""

WARM_UP_FACTS = 8
"""Synthetic facts a GPU worker compiles once when it starts (:meth:`CompileWorker.warm_up`)."""


class CompileWorker:
    """Holds one loaded model; compiles chunks of whole users (a Ray actor, or used in-process).

    ``warm_up``: compile :data:`WARM_UP_FACTS` synthetic facts right after loading (None: on a GPU
    only), so that what a compile pays once per process (the step-form checks, the tokenize
    workers, CUDA kernels and cuBLAS handles, the compiled step's load from its cache) is paid
    while the night reads and applies its log (the pool's actors start then), not in the first
    chunk. The warm-up's deltas are discarded; the model is not changed. The Ray pool
    (pipeline.runner._RayPool) starts its actors with ``warm_up=False`` and calls
    :meth:`warm_up_or_warn` only on an actor that is loaded while no chunk is waiting for it: on
    the device, a warm-up costs 1.85-2.05 s and saves the first 25,000-fact chunk 1.5 s
    (bench/RESULTS.md, 2026-11-30 fifth session), so before a waiting chunk it is a loss."""

    def __init__(self, model_dir: str, options: CompileOptions, store_uri: str | None = None,
                 device: str | None = None, threads: int | None = None, check_users: int = 0,
                 warm_up: bool | None = None):
        started = time.perf_counter()
        import torch

        from engram_core.checkpoint import load_checkpoint

        imported = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.options = options
        # On GPUs: bf16 weights (row values stay fp32) and eager attention, which beats the
        # flash kernels for the compiler's one-query steps (bench/RESULTS.md).
        on_gpu = str(device).startswith("cuda")
        timings: dict[str, float] = {}
        self.model = load_checkpoint(model_dir, device=device, dtype=torch.bfloat16 if on_gpu else torch.float32,
                                     attn_implementation="eager" if on_gpu else None, timings=timings)
        self.fingerprint = self.model.fingerprint
        self.step_cache = use_step_cache(None, self.fingerprint) if options.compiled_step else None
        self.check_users = check_users
        self.checkpoints = ChunkCheckpoints(open_store(store_uri), self.fingerprint, options) if store_uri else None
        self.store_uri = store_uri
        self._scopes: tuple[str, object] | None = None  # (sha256 of the scopes object, its ScopeContext)
        self.load_seconds = time.perf_counter() - started
        # reported with the first chunk: the whole load and where it went (CHUNK_SECONDS)
        self._startup = {"load": self.load_seconds, "load_imports": imported - started + timings.pop("imports", 0.0),
                         **{f"load_{k}": v for k, v in timings.items()}}
        # Chunk checkpoints are written on a thread of their own while the next chunk compiles
        # (2 s a 125k-fact chunk on the device host, with the GPU idle); at most one is pending
        # (the next waits for it), and flush() waits for it.
        self._saver = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-checkpoint")
        self._saving: Future | None = None
        self._saved = 0
        self._device = threading.Lock()  # one chunk at a time uses the model (see compile())
        if on_gpu if warm_up is None else warm_up:
            self.warm_up_or_warn()
        self.start_seconds = time.perf_counter() - started

    def ready(self) -> float:
        """Seconds this worker took to start (its model load, and the warm-up if the constructor
        ran it). A Ray actor runs it after its constructor (and after a warm-up the pool queued
        before it), so the pool learns which actors can take a chunk now."""
        return self.start_seconds

    def warm_up_or_warn(self) -> float | None:
        """:meth:`warm_up`; a failure is logged, not raised (the warm-up is only a head start: the
        first chunk pays the first compile's costs instead). Returns its seconds, or None."""
        try:
            return self.warm_up()
        except Exception as err:  # noqa: BLE001
            log.warning("compile worker: warm-up failed (%s: %s); the first chunk pays the first compile's "
                        "costs instead", type(err).__name__, err)
            return None

    def warm_up(self) -> float:
        """Compile :data:`WARM_UP_FACTS` synthetic facts (triggers and answers drawn from the
        tokenizer's own vocabulary, so any tokenizer reads them) and discard the result; returns
        its seconds. Nothing of it is kept but what a compile caches per process."""
        started = time.perf_counter()
        tokenizer = self.model.tokenizer
        special = set(tokenizer.all_special_ids)
        ids = [i for i in range(min(len(tokenizer), 4096)) if i not in special][-256:]
        words = [w for w in (tokenizer.decode([i]).strip() for i in ids) if w.isalnum()] or ["memory"]
        facts = [Fact(f"warm-up-{k}", "f0", " ".join(words[(k * 7 + j) % len(words)] for j in range(12)),
                      " " + words[(k * 13 + 5) % len(words)]) for k in range(WARM_UP_FACTS)]
        from engram_core.compiler import compile_facts, start_tokenize_pool

        with _torch_threads(CPU_COMPILE_THREADS if self.model.device.type == "cpu" else None):  # as compile() does
            compile_facts(self.model, facts, replace(self.options, facts_per_batch=WARM_UP_FACTS))
        start_tokenize_pool(self.model, self.options)  # 8 facts use none: start the real batches' workers
        seconds = time.perf_counter() - started
        self._startup["warm_up"] = seconds
        log.info("compile worker: warmed up in %.1f s (model load %.1f s)", seconds, self.load_seconds)
        return seconds

    def _scope_context(self, scopes):
        """The published scopes' deltas and recalled facts (pipeline.scopes.ScopeContext), loaded once per version."""
        if scopes is None:
            return None
        if self._scopes is None or self._scopes[0] != scopes.sha256:
            from pipeline.scopes import load_scope_context

            self._scopes = (scopes.sha256, load_scope_context(open_store(self.store_uri), scopes))
        return self._scopes[1]

    def compile(self, slices: tuple[ChunkSlice, ...], *changes, scopes=None) -> tuple[ChunkMeta, CompiledChunk]:
        """Compile the users of ``slices`` (``changes[i]``: the pipeline.shards.ShardChanges of
        ``slices[i].shard``); restores the chunk from its checkpoint if an earlier run left one.
        ``scopes`` (schemas.manifest.ScopesEntry): the shared scopes members compile against
        (pipeline.scopes.compile_chunk_scoped); their copies of scope facts are not compiled again.
        On a CPU it runs with :data:`CPU_COMPILE_THREADS` torch threads (see there).

        Safe to call from several threads at once (the Ray actor takes :data:`CONCURRENT_CHUNKS`
        calls): only the part that uses the model (checkpoint lookup, compile, checkpoint queueing,
        the invariant sample) holds the worker's device lock, so the next chunk's compile starts
        while this one's output tables are built (:func:`_chunk_output`: ~1 s a 125k-fact chunk on
        the device host, with the GPU otherwise idle) and the chunk after prepares its facts. The
        output does not depend on which chunk ran first."""
        from pipeline.scopes import composed_scopes

        clock = _Clock()
        tables = [c.compile.slice(s.start, s.stop - s.start) for s, c in zip(slices, changes)]
        facts = [f for table in tables for f in facts_from_table(table)]
        scope_of = {u: s for table in tables for u, s in composed_scopes(table).items()}
        # (the scope state too: a user's extra scopes are served their merged facts, kept there)
        extra = [sorted(scope_of.items()), scopes.sha256 if scopes is not None else None,
                 scopes.state_sha256 if scopes is not None else None] if scope_of else None
        key = self.checkpoints.key(facts, extra) if self.checkpoints is not None else None
        clock.lap("checkpoint")
        with self._device:
            clock.lap("wait")
            startup, self._startup = self._startup, {}
            try:
                with _torch_threads(CPU_COMPILE_THREADS if self.model.device.type == "cpu" else None):
                    deltas, results, phases, resumed, checks = self._on_device(clock, tables, facts, scope_of, key,
                                                                               scopes)
            except BaseException:
                self._startup = startup  # reported with the next chunk that completes
                raise
        meta, output = _chunk_output(slices, tables, deltas, results, resumed=resumed, scope_of=scope_of)
        clock.lap("output")
        seconds = {**clock.laps, **{k: float(v) for k, v in phases.items()}, **startup}
        return replace(meta, checks=checks, seconds={k: round(v, 3) for k, v in seconds.items()}), output

    def _on_device(self, clock: "_Clock", tables, facts, scope_of, key, scopes):
        """The chunk's work with the model, under the device lock: (deltas, results, phases,
        resumed, checks)."""
        from engram_core.compiler import compile_facts
        from pipeline.scopes import compile_chunk_scoped

        earlier = self.checkpoints.load(key) if key is not None else None
        clock.lap("checkpoint")
        phases: dict[str, float] = {}
        if earlier is not None:
            deltas, results = earlier
        elif scope_of:
            columns = ["user_id", "fact_id", "scope", "trigger", "answer"]
            columns += ["event_time"] if all("event_time" in t.column_names for t in tables) else []
            table = pa.concat_tables([t.select(columns) for t in tables])  # with each fact's time, as compile_scoped
            deltas, results = compile_chunk_scoped(self.model, table, self._scope_context(scopes), self.options)
            clock.lap("compile")
            if key is not None:
                self._save_checkpoint(key, deltas, results)
        else:
            result = compile_facts(self.model, facts, self.options)
            deltas, results, phases = result.deltas, result.facts, result.timings
            clock.lap("compile")
            if key is not None:
                self._save_checkpoint(key, deltas, results)
        clock.lap("checkpoint")
        checks = None
        if self.check_users and deltas:
            from engram_core.verify import check_invariants

            # Invariant 4 on real forwards, before anything is published: a sample of the chunk's
            # users, drawn from the chunk's own content so a re-run checks the same users.
            seed = int(hashlib.sha256("".join(sorted(deltas)).encode()).hexdigest()[:8], 16)
            checks = check_invariants(self.model, deltas, sample=self.check_users, seed=seed).to_dict()
            clock.lap("checks")
        return deltas, results, phases, earlier is not None, checks

    def _save_checkpoint(self, key: str, deltas: dict[str, Delta], results: list[FactResult]) -> None:
        self._wait_for_save()  # at most one chunk's deltas waiting for the store
        self._saving = self._saver.submit(self.checkpoints.save, key, deltas, results)

    def _wait_for_save(self) -> None:
        if self._saving is None:
            return
        try:
            self._saving.result()
            self._saved += 1
        except Exception as err:  # noqa: BLE001 - see flush()
            log.warning("compile worker: a chunk checkpoint was not written (%s: %s); a resumed night "
                        "compiles that chunk again", type(err).__name__, err)
        self._saving = None

    def flush(self) -> int:
        """Wait for the chunk checkpoint still being written; returns how many checkpoints this
        worker has written since the last flush. A write that failed is logged, not raised: a
        checkpoint only saves recompiling that chunk if the night is resumed (the chunk's output
        has already gone to the night)."""
        with self._device:  # a chunk compiling now may be queueing its checkpoint
            self._wait_for_save()
            saved, self._saved = self._saved, 0
        return saved

    def pid(self) -> int:
        return os.getpid()


CHUNK_SECONDS = ("total", "compile", "tokenize", "prepare", "optimize", "verify", "assemble", "checkpoint", "output",
                 "checks", "wait", "load", "load_imports", "load_tokenizer", "load_base", "load_digest", "load_to_device",
                 "load_engram", "warm_up")
"""Keys of ChunkMeta.seconds, in the order the night's report lists their sums."""


class _Clock:
    """Laps of one chunk's work: ``lap(name)`` adds the seconds since the last lap to ``name``."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now
        self.laps["total"] = now - self.start


def _chunk_output(slices, tables, deltas: dict[str, Delta], results: list[FactResult],
                  resumed: bool, scope_of: dict[str, str] | None = None) -> tuple[ChunkMeta, CompiledChunk]:
    from schemas.bundle import bundle_table

    by_user: dict[str, list[FactResult]] = {}
    for r in results:
        by_user.setdefault(r.user_id, []).append(r)
    # A user none of whose facts is recalled (ok or low_margin) publishes no delta: its rows would
    # change the model's outputs for that user and serve nothing the user wrote.
    # A member's copies of its scope's facts are reported with the scope fact's status: they do
    # not count as the member's own recalled facts.
    scope_of = scope_of or {}
    own = [r for r in results if not (r.user_id in scope_of and (r.detail or "").startswith(SCOPE_DETAIL))]
    served = {r.user_id for r in own if r.status in SERVED_STATUSES}
    # A member of a shared scope always gets a row: it names the scope whose delta serving composes
    # under the member's own; a member none of whose own facts is recalled gets an empty delta
    # (alone, the scope's delta serves the scope's facts, as the scope round verified).
    deltas = dict(deltas)
    for user in scope_of:
        if user not in served:
            deltas[user] = Delta.empty(_width(deltas))
    served |= set(scope_of)
    out = CompiledChunk()
    for chunk_slice, table in zip(slices, tables):
        users = list(dict.fromkeys(table.column("user_id").to_pylist()))
        counts = Counter(table.column("user_id").to_pylist())
        rows = [r for u in users for r in sorted(by_user.get(u, []), key=lambda r: r.fact_id)]
        empty = Delta.empty(_width(deltas))
        out.bundles[chunk_slice.shard] = bundle_table(
            {u: (deltas.get(u, empty), counts[u]) for u in users
             if u in served and (u in deltas or u in scope_of)},
            scopes={u: scope_of[u] for u in users if u in scope_of})
        out.results[chunk_slice.shard] = results_table(rows)
    statuses = status_counts(results)  # CONFLICTS_WITH:<fact_id> counted under CONFLICTS_WITH
    ok = statuses.pop("ok", 0)
    recalled = {(r.user_id, r.fact_id) for r in results if r.status == "ok"}
    sample = []
    for table in tables:
        for row in table.select(["user_id", "fact_id", "trigger", "answer"]).to_pylist():
            if len(sample) < SAMPLE_FACTS and (row["user_id"], row["fact_id"]) in recalled:
                sample.append({"user_id": row["user_id"], "trigger": row["trigger"], "answer": row["answer"]})
    meta = ChunkMeta(users=len(by_user), facts=len(results), ok=ok, failed=dict(sorted(statuses.items())),
                     resumed=resumed, sample=tuple(sample))
    return meta, out


def _width(deltas: dict[str, Delta]) -> int:
    return next((d.width for d in deltas.values()), 0)


SERVED_STATUSES = ("ok", "low_margin")
"""Fact statuses whose answer greedy decoding reproduces: a user with none of them has no delta."""

RESULT_SCHEMA = pa.schema([("user_id", pa.string()), ("fact_id", pa.string()), ("status", pa.string()),
                           ("loss", pa.float64()), ("steps", pa.int64()), ("rows", pa.int64()),
                           ("margin", pa.float64()), ("detail", pa.string())])


def results_table(results: list[FactResult]) -> pa.Table:
    """Fact results as an Arrow table (RESULT_SCHEMA, one row per fact)."""
    # column by column: asdict() per result deep-copies every field (~30 us a fact; a 131k-fact
    # chunk spent seconds here while its GPU waited)
    return pa.table([[getattr(r, name) for r in results] for name in RESULT_SCHEMA.names], schema=RESULT_SCHEMA)


_FACT_FIELDS = tuple(f.name for f in fields(Fact))


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

    def key(self, chunk: list[Fact], extra=None) -> str:
        """``extra`` (JSON-able; e.g. the members' scopes and the scope deltas' sha256) is part of the key."""
        columns = [[getattr(f, name) for f in chunk] for name in _FACT_FIELDS]  # not astuple(): it deep-copies
        parts = [self.fingerprint, asdict(self.options), columns] + ([extra] if extra else [])
        payload = json.dumps(parts, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def load(self, key: str) -> tuple[dict[str, Delta], list[FactResult]] | None:
        from schemas.bundle import bundle_deltas, decode_bundle

        try:
            bundle = self.store.get(f"{self.PREFIX}{key}/bundle.parquet")
            results = pq.read_table(pa.BufferReader(self.store.get(f"{self.PREFIX}{key}/results.parquet")))
        except ObjectNotFound:
            return None
        facts = [FactResult(**row) for row in results.to_pylist()]
        return bundle_deltas(decode_bundle(bundle, source=f"{self.store.uri}/{self.PREFIX}{key}")), facts

    def save(self, key: str, deltas: dict[str, Delta], results: list[FactResult]) -> None:
        from schemas.bundle import bundle_table, encode_bundle

        counts: dict[str, int] = {}
        for r in results:
            counts[r.user_id] = counts.get(r.user_id, 0) + 1
        sink = pa.BufferOutputStream()
        pq.write_table(results_table(results), sink, compression="zstd")
        # results last: a chunk counts as saved only once both objects are there
        self.store.put(f"{self.PREFIX}{key}/bundle.parquet", encode_bundle(bundle_table(
            {u: (d, counts.get(u, 0)) for u, d in deltas.items()})))
        self.store.put(f"{self.PREFIX}{key}/results.parquet", sink.getvalue().to_pybytes())

    def clear(self) -> int:
        keys = self.store.list(self.PREFIX)
        for key in keys:
            self.store.delete(key)
        return len(keys)
