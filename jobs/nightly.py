"""The nightly job: fact log -> read -> apply per shard -> compile -> assemble per shard -> publish.

``run_nightly(spec)`` is the whole job; ``engram run nightly --spec FILE`` and ``engram submit``
call it. The shard is the unit of work: every stage between listing the new log files and the
commit runs as tasks (pipeline.runner: Ray tasks and actors, or this process with
``workers: 0``), and the driver holds only O(shards + files) metadata:

    read      one task per new log file: read, normalise, validate rows, key rows by shard
    apply     one task per shard with new events: apply them onto the shard's prior fact state
              and tombstones; write the shard's state, tombstones and rejects; decide who compiles
    scopes    (only when a shard holds shared-scope members, or the previous version has scopes)
              one task merges the applied shards' scope contributions into the version's scope
              state; the scopes whose facts changed compile on the pool, each once (owner = the
              scope id); the version's scope deltas are written; every shard holding a member of a
              changed scope, or a user holding a scope whose facts changed as an extra scope (a
              user in several scopes), adds those users to the users it compiles (pipeline.scopes)
    compile   chunks of whole changed users, packed in (shard, user) order, on the compile pool
              (members of a scope with its published delta fixed underneath)
    assemble  one task per changed shard: a layer over the shard's base holding the changed users'
              deltas and tombstones of the users that go, with its stats parts; or, for a shard
              past the job spec's compaction limits, a new base of the merged view
    forget    this night's forget_user events scrub every retained older version, all at once
    publish   upload the model if new, write the version-level stats parts, check every object,
              write the manifest and move CURRENT (versions.publish.publish_entries)

A night costs what changed: a shard without new events is not visited (its objects and stats are
carried by reference), a changed shard gets a layer of its changed users (deltas, fact state,
stats) rather than a rewrite, and a re-run with the same inputs lists the log and stops. The watermark
records each ingested file's path, size and modification time, so only new or rewritten files are
read; an unreadable file rejected with ``on_bad_file: reject`` is read again the next night. The
spec's ``max_file_age`` bounds it: entries of files modified before the night's horizon are dropped,
and a file behind the horizon that it lacks is not read (counted as ``files_behind``, warned). A
night with rejected rows always publishes (its rejects stats part), even if nothing else changed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterator

import pyarrow as pa

from engram_core.fingerprint import check_adapter_base, check_checkpoint_files
from engram_core.fingerprint import fingerprint as model_fingerprint
from jobs.spec import DEFAULT_NUM_SHARDS, NightlySpec
from pipeline.compile import CHUNK_SECONDS, ChunkCheckpoints, plan_chunks
from pipeline.ingest import (
    UNROUTED,
    FactFile,
    FileRead,
    RowRules,
    _source_root,
    file_horizon,
    files_behind,
    files_to_read,
    list_log_files,
    log_read_warnings,
    no_data_by_listing,
    not_data_message,
    purge_ledger,
    read_log_file,
    under_sources,
    warn_files_behind,
)
from pipeline.plan import check_model_change
from pipeline.runner import make_runner
from pipeline.scopes import ScopePlan, merge_scopes, write_scopes
from pipeline.shards import (
    NightContext,
    ReshardedPrior,
    ShardApplied,
    apply_shard,
    assemble_shard,
    carried_entry,
    chains_to_compact,
    own_keys,
    rebase_entry,
    rescope_shard,
    resharded_priors,
    shard_scope_contribution,
    state_entry as shard_state_entry,
    split_prior_shard,
)
from pipeline.stats import encode_stats_part, shards_table
from schemas.facts import REJECTS_SCHEMA
from schemas.manifest import Manifest, ScopesEntry, ShardEntry
from versions.catalog import read_current, read_watermark
from versions.errors import IntegrityError, PublishConflict
from versions.models import publish_model
from versions import publish
from versions.publish import publish_entries
from versions.store import ObjectNotFound, open_store

log = logging.getLogger(__name__)


@dataclass
class NightlyReport:
    version: int | None
    published: bool
    parent: int | None
    store: str
    users: int  # the published version's totals
    facts: int
    facts_ok: int  # this night's compile
    facts_failed: int
    compiled_users: int
    carried_users: int
    dropped_users: int
    accepted: int  # this night's input rows
    rejects: int
    resumed_facts: int = 0
    files_read: int = 0
    files_reread: int = 0  # files rewritten in place since they were ingested
    files_behind: int = 0  # log files not read for their age: older than the horizon and not in the ledger (max_file_age)
    shards_changed: int = 0  # shards whose deltas changed (a layer or a new base; the others were carried)
    layers_written: int = 0  # shards that got a delta layer
    compacted_shards: int = 0  # shards whose chain was replaced by a new base
    checked_users: int = 0  # users whose deltas were checked for locality and isolation (stats table checks)
    compiled_scopes: int = 0  # shared scopes compiled this night (their facts changed, or new)
    scopes: int = 0  # shared scopes in the published version
    scope_members: int = 0  # users composed with a scope in the published version
    facts_failed_by_reason: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    compile_worker_seconds: dict[str, float | int] = field(default_factory=dict)
    """Seconds summed over this night's compile chunks on their workers, the shared scopes' round
    included (pipeline.compile.ChunkMeta.seconds: total, compile and its phases, checkpoint, output,
    checks; load and warm_up of each worker), and ``chunks``: where the ``compile`` and ``scopes``
    stages went. Empty when nothing compiled."""
    sample: list[dict] = field(default_factory=list)
    rejected_files: list[dict] = field(default_factory=list)
    """The log files rejected whole this night (``path``, ``reason``, ``detail``: UNREADABLE_FILE,
    SCHEMA_MISMATCH): not ingested, read again by the next night. Recorded in the rejects table of
    the version this night published, if it published one."""
    skipped_files: list[dict] = field(default_factory=list)
    """The listed files that are no data files (``path``, ``detail``: a ``README.txt``, an empty file
    without a Parquet suffix), skipped as ``_SUCCESS`` is."""

    def to_dict(self) -> dict:
        return asdict(self)


class InvariantViolation(RuntimeError):
    """A compiled delta changed the model where it must not (design invariant 4); the night stops."""


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started: dict[str, str] = {}
        self.items: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.started.setdefault(name, datetime.now(timezone.utc).isoformat())
        log.info("stage %s ...", name)
        try:
            yield
        finally:  # a stage entered twice (read_previous, around the compile pool's early start) adds up
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)

    def table(self) -> pa.Table:
        names = list(self.seconds)
        return pa.table({
            "stage": names,
            "seconds": [float(self.seconds[n]) for n in names],
            "started_at": [datetime.fromisoformat(self.started[n]) for n in names],
            "items": [int(self.items.get(n, 0)) for n in names],
        })


def run_nightly(
    spec: NightlySpec,
    *,
    crash_hook: Callable[[str], None] | None = None,
    progress: bool = False,
) -> NightlyReport:
    """Run one night end to end; returns what was published (or that nothing changed).

    Raises FactLogError (a log file that cannot be read, naming it), FingerprintMismatch (the
    model changed without ``recompile_all``), StoreError, PublishConflict (another publisher
    moved CURRENT), or the error of the shard task that failed, before anything is committed.

    A night with new log files connects to Ray (or starts it) and starts its compile actors
    before it checks the model (adapter base, fingerprint), so an unreachable ``ray_address`` is
    reported before a model check would be; a failing check ends the actors.
    """
    hook = crash_hook or (lambda step: None)
    timer = _Timer()
    began = datetime.now(timezone.utc)
    job_id = spec.job_id or f"nightly-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    store = open_store(spec.store)
    store.check_conditional_writes()  # before any work: a store that ignores If-None-Match / If-Match is refused
    with timer.stage("read_previous"):
        current = read_current(store)
        previous = current[0] if current else None
        if spec.num_shards is None:  # keep the store's shards; only an explicit number reshards
            spec = replace(spec, num_shards=previous.num_shards if previous else DEFAULT_NUM_SHARDS)
        watermark = read_watermark(previous)
        listed = list_log_files(spec.fact_log)
        horizon = file_horizon(listed, watermark["files"], spec.max_file_age_ns(), spec.fact_log)
        new, rewritten = files_to_read(listed, watermark["files"], horizon)
        behind = files_behind(listed, watermark["files"], horizon)
        warn_files_behind(behind, horizon, _horizons(watermark).get(_source_root(spec.fact_log)), spec.max_file_age)
        if rewritten:
            log.warning("fact log: %d file(s) changed since they were ingested; reading them again: %s",
                        len(rewritten), ", ".join(f.path for f in rewritten[:5]))
    # A night with new files has work whatever the model checks find: its compile actors start
    # loading the model now (their start is the longest fixed cost of a small night), while the
    # model's files are hashed here; a check that fails ends them with the night.
    # Files that are no data by their listing (a README, a checksum, a marker, an empty local file) are
    # recorded once a night publishes; until then they are new every night: alone, they start no
    # compile workers.
    no_data = {f.path: why for f in new if (why := no_data_by_listing(f)) is not None}
    maybe_data = [f for f in new if f.path not in no_data]
    if maybe_data or rewritten:  # names only, before the actors start: each would die on a missing file with a traceback
        check_checkpoint_files(spec.model)
    started = _start_compile(spec, store.uri) if maybe_data or rewritten else None
    night = None
    try:
        with timer.stage("read_previous"):
            check_adapter_base(spec.model)  # before any compile: a compile worker would only fail at its load
            fingerprint = model_fingerprint(spec.model)
            check_model_change(previous.fingerprint if previous else None, fingerprint, spec.recompile_all,
                               model=spec.model, prior=f"{store.uri} v{previous.version}" if previous else None)
        recompile = previous is None or spec.recompile_all or previous.fingerprint != fingerprint
        # Every shard is visited when the number of shards changed, and once after an upgrade from a
        # version-1 store (whose shards have no tombstones or stats parts yet).
        upgrade = previous is not None and (previous.schema_version == 1 or previous.num_shards != spec.num_shards)
        night = _Night(spec, store, previous, fingerprint, job_id, timer, hook, progress)
        night.began = began  # what a forget or gc beside the night recorded since then is checked before publishing
        night.listed = {f.path: f for f in listed}
        night.horizon, night.files_behind = horizon, len(behind)
        # A forget (or a rollback to a forget's rewrite) left shared scopes stale: their deltas, and
        # those of their extra holders, are dropped until a night compiles them (even with no new file).
        stale = previous is not None and previous.scopes is not None and bool(previous.scopes.stale)
        if not (maybe_data or rewritten or recompile or upgrade or stale):
            night.reads = [FileRead(f, 0, {}, skipped=no_data[f.path]) for f in new]
            for f in new:
                log.warning("%s", not_data_message(f.path, no_data[f.path]))
            log.info("nightly %s: no new log files%s; v%s stays current", job_id,
                     f" ({len(new)} no data file(s), skipped)" if new else "", previous.version if previous else "-")
            return night.report(previous, published=False)
        return night.run(new + rewritten, len(rewritten), every_shard=recompile or upgrade, recompile=recompile,
                         started=started)
    except BaseException as err:
        if started is not None:  # night.run closes it too; closing twice is a no-op
            started[1].close(flush=False)
        if isinstance(err, (IntegrityError, ObjectNotFound)):  # a prior object gone or changed
            _raise_if_collected(store, began, err)
            # (after this night's own forget stage, CURRENT is the rewrite it made: not a move by another)
            _raise_if_current_moved(store, night.previous if night is not None else previous, err)
            _raise_if_forget_deleted(store, began, job_id, err)
        raise


APPLY_MIN_IN_FLIGHT = 8
APPLY_ROWS_PER_TASK = 4096


def apply_in_flight(configured: int | None, rows: int, shards: int, every_shard: bool = False) -> int:
    """Apply tasks in flight: ``configured`` (the job spec's ``apply_in_flight``) if given, else
    every shard on a night that visits them all (``every_shard``: a recompile, an upgrade, a
    reshard: each task loads a whole prior state whatever the new rows), else
    ``max(APPLY_MIN_IN_FLIGHT, ceil(rows / APPLY_ROWS_PER_TASK))``; at most ``shards``, at least 1.
    ``rows``: the night's new log rows (read). A Ray task needs a worker process, and a process's
    start (Python, pyarrow, the pipeline's imports: 1-3 s of CPU each on a busy host) competes with
    the compile actors' own start, which is the longest fixed cost of a small night; so a small
    night's 64 light shards go through a few processes, a full night's all at once."""
    if configured is not None:
        want = configured
    elif every_shard:
        want = shards
    else:
        want = max(APPLY_MIN_IN_FLIGHT, -(-rows // APPLY_ROWS_PER_TASK))
    return max(1, min(shards, want))


def _raise_if_current_moved(store, previous: Manifest | None, err: Exception) -> None:
    """A prior object missing or changed while CURRENT moved since the night began: another writer
    (an ``engram forget``, rollback or gc run beside the night) rewrote or deleted what the night was
    reading. Nothing was published; say so, and that a re-run is safe, instead of the bare object."""
    try:
        now = read_current(store)
    except Exception:  # noqa: BLE001 - the night's own error stands
        return
    before = previous.version if previous else None
    after = now[0].version if now else None
    if after != before:
        raise PublishConflict(
            f"CURRENT moved from v{before} to v{after} while this night ran (another night, or an engram forget, "
            f"rollback or gc beside it, rewrote or deleted objects the night was reading: {err}); nothing was "
            "published. Run the night again, and run other nights, forget, rollback and gc from the same schedule "
            "as the night, not beside it") from err


GC_RECORD_WAIT_S = 1.0


def _raise_if_collected(store, began: datetime, err: Exception) -> None:
    """An object missing while an ``engram gc`` ran beside the night (its audit record is newer than
    the night's start): gc deleted what the night had written and not yet published (no manifest
    names it yet, so to gc it is unreferenced). Nothing was published and nothing is lost (the
    night's inputs are the log and the previous version, which gc keeps); say so in one line,
    naming gc, instead of an error that reads like a damaged store."""
    from versions.layout import AUDIT_PREFIX

    since = f"{AUDIT_PREFIX}{began:%Y%m%dT%H%M%S%fZ}"

    def gc_record() -> dict | None:
        for key in sorted((k for k in store.list(AUDIT_PREFIX) if k >= since), reverse=True):
            record = json.loads(store.get(key))
            if record.get("event") == "gc" and record.get("deleted_objects"):
                return record
        return None

    try:  # a gc writes its record once its deletes are done: a moment later, the second look finds it
        record = gc_record()
        if record is None:
            time.sleep(GC_RECORD_WAIT_S)
            record = gc_record()
    except Exception:  # noqa: BLE001 - the night's own error stands
        return
    if record is None:
        return
    raise PublishConflict(
        f"engram gc ran beside this night (at {record.get('at')}) and deleted objects the night had written but not "
        f"yet published ({err}); nothing was published and nothing is lost. Run the night again, and run gc from "
        "the same schedule as the night, not beside it") from err


def _deletes_since(store, began: datetime, job_id: str) -> list[dict]:
    """The records of the objects ``engram forget`` and ``engram gc`` runs (not this night's own
    forget stage) deleted, or were about to, since the night began (versions.forget.FORGET_DELETES,
    versions.retention.GC_DELETES), oldest first."""
    from versions.forget import FORGET_DELETES
    from versions.layout import AUDIT_PREFIX
    from versions.retention import GC_DELETES

    since = f"{AUDIT_PREFIX}{began:%Y%m%dT%H%M%S%fZ}"
    records = [json.loads(store.get(key)) for key in sorted(k for k in store.list(AUDIT_PREFIX) if k >= since)]
    return [r for r in records if r.get("event") in (FORGET_DELETES, GC_DELETES) and r.get("actor") != job_id]


def _deleted_beside(record: dict, err: object) -> PublishConflict:
    from versions.forget import FORGET_DELETES

    command = "forget" if record.get("event") == FORGET_DELETES else "gc"
    return PublishConflict(
        f"engram {command} ran beside this night (at {record.get('at')}) and deleted objects the night had written "
        f"but not yet published ({err}); nothing was published and nothing is lost. Run the night again, and run "
        f"{command} from the same schedule as the night, not beside it")


def _raise_if_forget_deleted(store, began: datetime, job_id: str, err: Exception) -> None:
    """An object missing while an ``engram forget`` ran beside the night and deleted objects no
    manifest named (what the night had written, or its ``partial/`` cache): one line saying so,
    as for gc (:func:`_raise_if_collected`), instead of the bare missing object."""
    from versions.forget import FORGET_DELETES

    try:
        records = [r for r in _deletes_since(store, began, job_id) if r.get("event") == FORGET_DELETES]
    except Exception:  # noqa: BLE001 - the night's own error stands
        return
    if records:
        raise _deleted_beside(records[-1], err) from err


def _refuse_if_deleted_beside(store, began: datetime, job_id: str, manifest: Manifest) -> None:
    """Before CURRENT moves to ``manifest`` (written, not yet published): refuse if an ``engram
    forget`` or ``engram gc`` beside the night recorded, since it began, deleting an object the
    version names. Both record their deletes before they make them and read the manifests again
    after the record: one that records later sees this manifest and keeps its objects, so a version
    is never made current with an object either deleted (it used to be, deleted after the publish's
    size checks)."""
    needed = manifest.object_keys()
    for record in _deletes_since(store, began, job_id):
        hit = sorted(set(record.get("keys") or ()) & needed) + \
            sorted(k for k in needed for p in record.get("prefixes") or () if k.startswith(p))
        if hit:
            raise _deleted_beside(record, f"{store.uri}/{hit[0]}" + (f" and {len(hit) - 1} more" if len(hit) > 1 else ""))


def _start_compile(spec: NightlySpec, store_uri: str):
    """(runner, compile pool) of the night: connects to (or starts) Ray; on Ray, the pool's actors
    start loading the model (pipeline.runner._RayPool)."""
    runner = make_runner(spec.workers, spec.ray_address)
    return runner, runner.compile_pool(spec.model, spec.compile_options(), store_uri, spec.workers,
                                       spec.gpus_per_worker, spec.check_users_per_chunk)


class _Night:
    """One night's driver state: O(shards + files) metadata and the handles of the tasks' outputs."""

    def __init__(self, spec: NightlySpec, store, previous: Manifest | None, fingerprint: str, job_id: str,
                 timer: _Timer, hook: Callable[[str], None], progress: bool):
        self.spec, self.store, self.previous, self.fingerprint = spec, store, previous, fingerprint
        self.job_id, self.timer, self.hook = job_id, timer, hook
        self.began = datetime.now(timezone.utc)  # run_nightly sets the night's start
        self.bar = _progress(progress)
        self.applied: dict[int, ShardApplied] = {}
        self.resharded: dict[int, ReshardedPrior] | None = None
        self.entries: dict[int, ShardEntry] = {}
        self.reads: list[FileRead] = []
        self.chunks: list = []  # chunk metas
        self.files_reread = 0
        self.listed: dict[str, FactFile] = {}  # every file of the log this night, by path
        self.horizon: int | None = None  # the ingest horizon (pipeline.ingest.file_horizon), ns
        self.files_behind = 0  # listed files not read for their age (pipeline.ingest.files_behind)
        self.every_shard = False
        self.scope_plan: ScopePlan | None = None  # the night's scope merge (None: no scope touched)
        self.scopes = publish.CARRY  # the version's ScopesEntry (CARRY: the previous version's)

    def compact(self, shard: int) -> tuple[bool, bool]:
        """(deltas, state): whether the shard's change is written as a new base rather than a layer,
        for its deltas and for its fact state: both on a first night, after resharding, a model
        change or an upgrade (every shard), and for a shard without stats parts to layer on; else
        each chain once it is past the job spec's compaction limits."""
        prior = self.prior_entry(shard)
        if prior is None or self.every_shard or not prior.stats:
            return True, True
        return chains_to_compact(prior, self.spec.compact_after_layers, self.spec.compact_layer_share)

    def _chain_to_compact(self, shard: int) -> bool:
        prior = self.prior_entry(shard)
        return prior is not None and bool(prior.layers) and self.compact(shard)[0]

    def prior_entry(self, shard: int) -> ShardEntry | None:
        """The shard's entry in the previous version (None on a first night or after resharding)."""
        if self.previous is None or self.previous.num_shards != self.spec.num_shards:
            return None
        return self.previous.shard(shard)

    def prior_of(self, shard: int) -> ShardEntry | ReshardedPrior | None:
        """Where the shard's prior state, bundle and stats come from."""
        return self.resharded[shard] if self.resharded is not None else self.prior_entry(shard)

    def run(self, files, files_reread: int, *, every_shard: bool, recompile: bool, started=None) -> NightlyReport:
        """``started``: (runner, compile pool) of :func:`_start_compile`, already started; else here."""
        spec = self.spec
        self.files_reread = files_reread
        self.every_shard = every_shard
        runner, pool = started or _start_compile(spec, self.store.uri)
        self.model_upload = None
        try:
            ctx = NightContext(store_uri=self.store.uri, num_shards=spec.num_shards, recompile=recompile,
                               prior_version=self.previous.version if self.previous else None,
                               prior_schema=self.previous.schema_version if self.previous else None,
                               prior_num_shards=self.previous.num_shards if self.previous else None,
                               fingerprint=self.fingerprint)
            rules = RowRules(max_trigger_tokens=spec.max_trigger_tokens, model_dir=spec.model,
                             max_answer_tokens=spec.compile_options().max_answer_tokens)
            # Serving nodes load the model by fingerprint from the store: it is uploaded (if new)
            # while the night runs, and must be there before CURRENT can point at deltas that need it.
            self.model_upload = _Background(publish_model, self.store, spec.model)
            # The compile workers load the model while the log is read and applied (Ray starts
            # actors in the background); a night that turns out to compile nothing lets them go.
            return self._run(runner, pool, ctx, rules, files, every_shard=every_shard)
        finally:
            pool.close(flush=False)  # a no-op after the compile stage's own close
            if self.model_upload is not None:
                self.model_upload.join()  # a failed night does not leave an upload running behind it

    def _run(self, runner, pool, ctx: NightContext, rules: RowRules, files, *, every_shard: bool) -> NightlyReport:
        spec, timer = self.spec, self.timer
        if self.previous is not None and self.previous.num_shards != spec.num_shards:
            with timer.stage("reshard"):
                log.info("resharding from %d to %d shards", self.previous.num_shards, spec.num_shards)
                splits = [runner.submit(split_prior_shard, ctx, entry, what=f"split shard {entry.shard}")
                          for entry in self.previous.shards]
                self.resharded = resharded_priors(
                    [runner.get(h, f"split shard {e.shard}") for h, e in zip(splits, self.previous.shards)],
                    spec.num_shards)

        with timer.stage("read"):
            handles = [runner.submit(read_log_file, f, rules, spec.num_shards, spec.on_bad_file, num_returns=2,
                                     what=f"read {f.path}") for f in files]
            metas = [h[0] for h in handles]
            self.reads = [None] * len(files)
            self.bar.start("read files", len(files))
            for i in runner.completed(metas):
                self.reads[i] = runner.get(metas[i], f"read {files[i].path}")
                log_read_warnings(self.reads[i])
                self.bar.advance("read files")
            timer.items["read"] = sum(r.rows + (r.reject is not None) for r in self.reads)
        if not sum(r.rows for r in self.reads) and not self._publishes_without_rows(every_shard):
            # New files with no row read (an empty export, files that are no data, files rejected whole):
            # nothing changes. A version of the same content would move CURRENT (every node polls it) for
            # nothing, and a first night's empty one would look like a published base; a file rejected
            # whole is not ingested, so every night read it again and published one more such version.
            # The report names the rejected files; the files are read again by the next night, and one
            # with something to publish records them (the empty ones as ingested, the rejects in its
            # rejects table).
            log.info("nightly %s: the %d new log file(s) hold no rows%s; nothing to publish (%s)", self.job_id,
                     len(files), f" ({self._rejected()} rejected whole)" if self._rejected() else "",
                     f"v{self.previous.version} stays current" if self.previous else "no version yet")
            return self.report(self.previous, published=False)

        with timer.stage("apply"):
            per_shard: dict[int, list[tuple[int, tuple[int, int]]]] = defaultdict(list)
            for i, read in enumerate(self.reads):
                for shard, piece in read.slices.items():
                    per_shard[shard].append((i, piece))
            shards = sorted(set(range(spec.num_shards)) if every_shard else {s for s in per_shard if s != UNROUTED})
            if UNROUTED in per_shard:
                shards.append(UNROUTED)
            applies = {}

            def submit_apply(shard: int) -> None:
                pieces = per_shard.get(shard, [])
                routed_shard = shard != UNROUTED
                applies[shard] = runner.submit(
                    apply_shard, ctx, shard, self.prior_of(shard) if routed_shard else None,
                    self.compact(shard)[1] if routed_shard else False,
                    [piece for _, piece in pieces], *[handles[i][1] for i, _ in pieces],
                    num_returns=3, what=f"apply shard {shard}")

            window = apply_in_flight(spec.apply_in_flight, timer.items["read"], len(shards), every_shard)
            self.bar.start("apply shards", len(shards))
            for shard in runner.windowed(shards, submit_apply, lambda s: applies[s][0], window):
                self.applied[shard] = runner.get(applies[shard][0], f"apply shard {shard}")
                self.bar.advance("apply shards")
            del handles  # the log's rows are no longer needed once every shard has taken its own
            timer.items["apply"] = len(shards)

        routed = {s: a for s, a in self.applied.items() if s != UNROUTED}
        changes = {s: applies[s][1] for s in routed}  # shard -> handle of its ShardChanges
        scopes = publish.CARRY
        if self.previous is not None and self.previous.scopes is not None or any(a.scope_rows for a in routed.values()):
            with timer.stage("scopes"):
                scopes = self._scope_round(runner, pool, ctx, routed, changes, applies)

        with timer.stage("compile"):
            to_assemble = {s for s, a in routed.items()
                           if a.changed or self._needs_stats(s) or self._chain_to_compact(s)}
            plan = plan_chunks([(s, routed[s].compile_facts) for s in sorted(routed) if routed[s].compile_users],
                               self._facts_per_chunk(sum(int(a.compile_facts.sum()) for a in routed.values())))
            waiting = defaultdict(set)  # shard -> chunks not yet compiled
            for c, chunk in enumerate(plan):
                for piece in chunk:
                    waiting[piece.shard].add(c)
            outputs_of = defaultdict(list)  # shard -> chunk output handles
            assembling = {}
            published_scopes = self.previous.scopes if scopes == publish.CARRY and self.previous else (
                None if scopes == publish.CARRY else scopes)

            def assemble(shard: int) -> None:
                assembling[shard] = runner.submit(
                    assemble_shard, ctx, shard, self.prior_of(shard), self.compact(shard)[0], routed[shard],
                    changes[shard], published_scopes, *outputs_of[shard], what=f"assemble shard {shard}")

            for shard in sorted(to_assemble - set(waiting)):
                assemble(shard)
            total = sum(int(a.compile_facts.sum()) for a in routed.values())
            self.bar.start("compile facts", total)
            for c, meta, output in pool.map(plan, lambda chunk: [changes[p.shard] for p in chunk], scopes=published_scopes):
                self.chunks.append(meta)
                self.bar.advance("compile facts", meta.facts)
                for piece in plan[c]:
                    outputs_of[piece.shard].append(output)
                    waiting[piece.shard].discard(c)
                    if not waiting[piece.shard]:
                        assemble(piece.shard)
                self.hook("compile_chunk")
            pool.close()  # the workers' CPUs (and GPUs) go to the assembly still running
            timer.items["compile"] = total

        with timer.stage("assemble"):
            self.bar.start("assemble shards", len(assembling))
            order = list(assembling)
            for k in runner.completed([assembling[s] for s in order]):
                shard = order[k]
                self.entries[shard] = runner.get(assembling[shard], f"assemble shard {shard}")
                self.bar.advance("assemble shards")
            for shard, applied in routed.items():
                if shard not in self.entries:
                    self.entries[shard] = carried_entry(self.prior_entry(shard), applied)
            timer.items["assemble"] = len(order)
        self.bar.close()

        self._refuse_on_failed_checks()
        forget_times = {u: t for a in self.applied.values() for u, t in a.forgotten_users.items()}
        forgotten = sorted(forget_times)
        if forgotten:
            with timer.stage("forget"):
                # forget_user events also scrub every retained older version (all of this night's
                # users in one rewrite), so that no rollback can bring them back; CURRENT moves
                # to the rewrite of the previous version, which this night's version then follows.
                # The tombstones of the rewrites carry each forget's own time (a replay after a
                # rollback keeps what a user wrote after it), and nothing this night's version
                # names is deleted (a shard's objects can be shared with the version rewritten).
                from versions.forget import forget_users

                epoch = datetime(1970, 1, 1, tzinfo=timezone.utc)
                before = self.previous
                forget_users(self.store, forgotten, actor=self.job_id, reason="forget_user event in the fact log",
                             forgotten_at={u: epoch + timedelta(microseconds=t) for u, t in forget_times.items()},
                             keep=self._own_objects(before, scopes), record_absent=False)
                current = read_current(self.store)
                self.previous = current[0] if current else None
                self._rebase(before, self.previous)
        self.scopes = scopes
        return self.publish(forgotten)

    def _facts_per_chunk(self, facts: int) -> int:
        """Facts per compile chunk: ``batches_per_chunk`` batches, or as few whole batches (at
        least one) as make ``min_chunks`` chunks of this night's ``facts``; a night of fewer than
        ``min_chunks`` batches gets chunks of ``ceil(facts / min_chunks)`` facts, each compiled
        as one smaller batch. So a small night (e.g. 5% of users changed) is spread over every GPU
        rather than compiled by one, and with ``min_chunks`` above the number of GPUs the actor
        that starts first takes the chunks of one still loading its model. It depends on the facts
        and the spec alone, not on the cluster: a resumed night plans the chunks it had."""
        batch = self.spec.compile_options().facts_per_batch
        batches = self.spec.batches_per_chunk
        if self.spec.min_chunks > 1:
            share = -(-facts // self.spec.min_chunks)
            if share < batch:
                return max(1, share)
            batches = min(batches, -(-share // batch))
        return batch * batches

    def _scope_round(self, runner, pool, ctx: NightContext, routed: dict, changes: dict, applies: dict):
        """Shared scopes compile once (pipeline.scopes): merge the applied shards' scope
        contributions into the version's scope state, compile the scopes whose facts changed on
        the pool (each scope whole, owner = the scope id), write the version's scope deltas, and add
        the members of those scopes, in every shard that holds one, to the users that compile
        (their rows were fitted to the old scope delta). Updates ``routed`` and ``changes`` in
        place for the shards it adds members to; returns the version's ScopesEntry (or None)."""
        spec = self.spec
        prior_scopes = self.previous.scopes if self.previous is not None else None
        shards = sorted(routed)
        merged = runner.submit(merge_scopes, ctx.store_uri, prior_scopes, self.every_shard, ctx.recompile, shards,
                               *[applies[s][2] for s in shards], num_returns=2, what="merge scopes")
        plan: ScopePlan = runner.get(merged[0], "merge scopes")
        if plan.needs_every_shard:
            # Once, after an upgrade: the previous scope state (version 1) lacks the copies of users
            # holding a scope as an extra scope; every other shard's fact state is read (not written)
            # for its contribution, and every such user recompiles with the scopes' merged facts.
            others = [s for s in range(spec.num_shards) if s not in routed and self.prior_entry(s) is not None]
            log.info("scopes: the previous scope state is of version 1; reading %d more shard(s) once", len(others))
            read = [runner.submit(shard_scope_contribution, ctx, s, self.prior_entry(s),
                                  what=f"scope contribution of shard {s}") for s in others]
            merged = runner.submit(merge_scopes, ctx.store_uri, prior_scopes, True, ctx.recompile, shards,
                                   *[applies[s][2] for s in shards], *read, num_returns=2, what="merge scopes")
            plan = runner.get(merged[0], "merge scopes")
        self.scope_plan = plan
        outputs = []
        if plan.changed:
            chunks = plan_chunks([(0, plan.compile_facts)], spec.compile_options().facts_per_batch * spec.batches_per_chunk)
            for c, meta, output in pool.map(chunks, lambda chunk: [merged[1]] * len(chunk)):
                self.chunks.append(meta)
                outputs.append(output)
                self.hook("compile_chunk")
        entry = runner.get(runner.submit(write_scopes, ctx.store_uri, prior_scopes, plan, merged[1], *outputs,
                                         what="write scopes"), "write scopes")
        if plan.changed or plan.refreshed:
            rescopes = {}
            for shard in plan.member_shards if not ctx.recompile else ():  # (recompile: every user compiles)
                applied = routed.get(shard)
                if applied is not None:  # this night's state (after resharding: the shard's first)
                    state_entry = shard_state_entry(shard, applied.state)
                elif (prior := self.prior_entry(shard)) is not None:
                    state_entry = prior
                else:
                    raise RuntimeError(f"scope round: shard {shard} holds members of a changed scope but has "
                                       "neither this night's state nor a previous entry")
                rescopes[shard] = runner.submit(rescope_shard, ctx, shard, state_entry, applied, changes.get(shard),
                                                plan.changed, plan.refreshed, num_returns=2,
                                                what=f"rescope shard {shard}")
            for shard, (meta, shard_changes) in rescopes.items():
                routed[shard] = runner.get(meta, f"rescope shard {shard}")
                self.applied[shard] = routed[shard]
                changes[shard] = shard_changes
        log.info("scopes: %d in all, %d compiled (%d facts), %d dropped, %d with changed facts; members of changed "
                 "scopes and holders of scopes with changed facts in %d shard(s)", plan.scopes, len(plan.changed),
                 int(plan.compile_facts.sum()), len(plan.dropped), len(plan.refreshed), len(plan.member_shards))
        return entry

    def _refuse_on_failed_checks(self) -> None:
        """Invariant 4 (locality, isolation) checked on a sample of every chunk: a failure stops the
        night here, before anything is forgotten or published."""
        failed = [(c, m.checks) for c, m in enumerate(self.chunks) if m.checks is not None and not m.checks["ok"]]
        if failed:
            chunk, checks = failed[0]
            raise InvariantViolation(f"{len(failed)} compile chunk(s) failed the locality/isolation check (chunk {chunk}: "
                                     f"{checks['problems']}); nothing was published")

    def _rebase(self, before: Manifest | None, after: Manifest | None) -> None:
        """This night's entries were built on ``before``'s objects; the forget re-issued ``before`` as
        ``after`` without the forgotten users (object for object): build them on ``after`` instead."""
        if before is None or after is None or before.num_shards != self.spec.num_shards:
            return  # a first night or resharding: the entries name no object of the prior version
        for shard, entry in self.entries.items():
            self.entries[shard] = rebase_entry(self.store, entry, before.shard(shard), after.shard(shard))

    def _own_objects(self, before: Manifest | None, scopes) -> frozenset[str]:
        """Objects this night's version names that a forget must not delete: those it wrote itself
        (a user forgotten by an older forget can still be in them, legitimately), its rejects and
        its scope objects (``scopes``: a ScopesEntry; merged with this night's applied shards, they
        hold no copy of the night's forgotten users). Shard objects it shares with ``before`` are
        left out: the forget re-issues them without the users, and :meth:`_rebase` moves the
        entries onto the re-issued ones."""
        if before is None or before.num_shards != self.spec.num_shards:
            own = {k for e in self.entries.values() for k in e.object_keys()}
        else:
            own = {k for s, e in self.entries.items() for k in own_keys(e, before.shard(s))}
        own |= set(scopes.object_keys()) if isinstance(scopes, ScopesEntry) else set()
        return frozenset(own | {a.rejects_key for a in self.applied.values() if a.rejects_key})

    def _publishes_without_rows(self, every_shard: bool) -> bool:
        """Whether this night has a version to publish even if its new files hold no rows: one that
        visits every shard of a previous version (a new model, recompile_all, a reshard, an upgrade)
        or compiles the scopes a forget left stale."""
        previous = self.previous
        return previous is not None and (every_shard or (previous.scopes is not None and bool(previous.scopes.stale)))

    def _needs_stats(self, shard: int) -> bool:
        """A first night's shard, a resharded one, or one carried from a version-1 manifest (no
        stats parts yet) is assembled even if no user of it changed."""
        prior = self.prior_entry(shard)
        return prior is None or not prior.stats

    def publish(self, forgotten: list[str]) -> NightlyReport:
        spec, store, timer = self.spec, self.store, self.timer
        with timer.stage("publish"):
            self.model_upload.result()  # the model is in the store before the version that needs it
            objects, stats = self._version_stats()
            manifest = publish_entries(
                store, entries=self.entries, objects=objects, previous=self.previous, fingerprint=self.fingerprint,
                num_shards=spec.num_shards, job_id=self.job_id, watermark=self._watermark(), stats=stats,
                counts={"accepted": self._sum("accepted"), "rejected": self._rejected(),
                        "compiled_users": self._sum("compile_users"), "facts_ok": sum(m.ok for m in self.chunks),
                        "facts_failed": sum(m.facts - m.ok for m in self.chunks),
                        "compiled_scopes": len(self.scope_plan.changed) if self.scope_plan else 0},
                forgotten_users=forgotten, crash_hook=self.hook, scopes=self.scopes,
                # rejected rows are always recorded, even if nothing else changed (a file of rows that are all
                # rejected is ingested: the watermark changes too); a file rejected whole alone is not news
                record=any(a.rejects_key for a in self.applied.values()),
                before_swap=lambda written: _refuse_if_deleted_beside(store, self.began, self.job_id, written),
            )
            published = self.previous is None or manifest.version != self.previous.version
            ChunkCheckpoints(store, self.fingerprint, spec.compile_options()).clear()  # the night is done
        report = self.report(manifest, published=published)
        log.info("nightly %s: %s", self.job_id, "published v%d" % manifest.version if published else "nothing changed")
        return report

    def _sum(self, name: str) -> int:
        return sum(getattr(a, name) for a in self.applied.values())

    def _rejected(self) -> int:
        return self._sum("rejected") + sum(r.reject is not None for r in self.reads)

    def _version_stats(self) -> tuple[dict[str, bytes], dict[str, list[str]]]:
        """This version's version-level stats parts: rejects (the shards' parts, and one for whole
        files rejected), runs and shards."""
        objects: dict[str, bytes] = {}
        stats: dict[str, list[str]] = {"rejects": sorted(a.rejects_key for a in self.applied.values() if a.rejects_key)}
        file_rejects = [r.reject for r in self.reads if r.reject is not None]
        if file_rejects:
            key, data = encode_stats_part("rejects", pa.concat_tables(file_rejects).cast(REJECTS_SCHEMA))
            objects[key] = data
            stats["rejects"].append(key)
        self.timer.seconds.setdefault("publish", 0.0)
        shards = [self.entries.get(s) or self.prior_entry(s) for s in range(self.spec.num_shards)]
        tables = [("runs", self.timer.table()), ("shards", shards_table(shards, self.previous))]
        checks = [dict(m.checks, chunk=c) for c, m in enumerate(self.chunks) if m.checks is not None]
        if checks:
            tables.append(("checks", pa.Table.from_pylist(checks)))
        for name, table in tables:
            key, data = encode_stats_part(name, table)
            objects[key] = data
            stats[name] = [key]
        return objects, stats

    def _watermark(self) -> str:
        """Every log file ingested and still in the log (path -> size and mtime), within the ingest
        horizon. A file deleted from the log upstream (retention) is forgotten here, and so is one
        modified before the night's horizon (``max_file_age``: Spark's seen-files purge), so the
        watermark stays as large as the window; files outside this night's fact_log (another prefix
        of the same log) are kept as they are. ``horizons`` records the horizon each fact_log last
        purged at (its files behind it that the ledger lacks were ingested, or warned about)."""
        previous = read_watermark(self.previous)
        files = {path: identity for path, identity in previous["files"].items()
                 if path in self.listed or not under_sources(path, self.spec.fact_log)}
        for path, identity in files.items():  # an older entry (no change time) of an unchanged file: now with it
            listed = self.listed.get(path)
            if listed is not None and listed.ingested_as(identity):
                files[path] = listed.identity()
        # A file skipped as no data (a README, an empty file) is recorded with its identity too, so it
        # costs no read (on S3, no compile workers) every night after; a file that changes under its
        # name (the empty file filled, a stray replaced by data) is read again as a rewritten one.
        files.update({r.file.path: r.file.identity() for r in self.reads if r.reject is None and not r.gone})
        files = purge_ledger(files, self.horizon, self.spec.fact_log)
        horizons = dict(_horizons(previous))
        horizons.pop(_source_root(self.spec.fact_log), None)
        if self.horizon is not None:
            horizons[_source_root(self.spec.fact_log)] = self.horizon
        times = [a.watermark for a in self.applied.values() if a.watermark] + (
            [previous["max_event_time"]] if previous["max_event_time"] else [])
        out = {"files": dict(sorted(files.items())), "max_event_time": max(times, default=None)}
        if horizons:  # absent as before the option while no night purged
            out["horizons"] = dict(sorted(horizons.items()))
        return json.dumps(out, sort_keys=True, separators=(",", ":"))

    def report(self, manifest: Manifest | None, *, published: bool) -> NightlyReport:
        failed: dict[str, int] = defaultdict(int)
        for meta in self.chunks:
            for status, n in meta.failed.items():
                failed[status] += n
        routed = [a for s, a in self.applied.items() if s != UNROUTED]
        carried_elsewhere = sum(e.users for e in (manifest.shards if manifest else ()) if e.shard not in self.applied)
        return NightlyReport(
            version=manifest.version if manifest else None, published=published,
            parent=manifest.parent if manifest else None, store=self.store.uri,
            users=manifest.users if manifest else 0, facts=manifest.facts if manifest else 0,
            facts_ok=sum(m.ok for m in self.chunks), facts_failed=sum(m.facts - m.ok for m in self.chunks),
            compiled_users=sum(a.compile_users for a in routed),
            carried_users=sum(a.carried_users for a in routed) + carried_elsewhere,
            dropped_users=sum(a.dropped_users for a in routed),
            accepted=self._sum("accepted"), rejects=self._rejected(),
            resumed_facts=sum(m.facts for m in self.chunks if m.resumed),
            files_read=sum(not r.gone for r in self.reads), files_reread=self.files_reread, files_behind=self.files_behind,
            shards_changed=sum(1 for s, e in self.entries.items() if self.prior_entry(s) is None
                               or e.delta_chain != self.prior_entry(s).delta_chain),
            layers_written=sum(1 for s, e in self.entries.items() if self.prior_entry(s) is not None
                               and e.bundle_key == self.prior_entry(s).bundle_key
                               and len(e.layers) > len(self.prior_entry(s).layers)),
            compacted_shards=sum(1 for s, e in self.entries.items() if self.prior_entry(s) is not None
                                 and e.compactions > self.prior_entry(s).compactions),
            facts_failed_by_reason=dict(sorted(failed.items())),
            checked_users=sum(m.checks["users_checked"] for m in self.chunks if m.checks is not None),
            compiled_scopes=len(self.scope_plan.changed) if self.scope_plan else 0,
            scopes=manifest.scopes.scopes if manifest is not None and manifest.scopes is not None else 0,
            scope_members=manifest.scopes.members if manifest is not None and manifest.scopes is not None else 0,
            seconds=dict(self.timer.seconds),
            compile_worker_seconds=_worker_seconds(self.chunks),
            sample=[s for m in self.chunks for s in m.sample][:5],
            rejected_files=[{"path": r.file.path, "reason": row["reason"], "detail": row["detail"]}
                            for r in self.reads if r.reject is not None for row in r.reject.to_pylist()],
            skipped_files=[{"path": r.file.path, "detail": r.skipped} for r in self.reads if r.skipped],
        )


def _horizons(watermark: dict) -> dict[str, int]:
    """The watermark's ``{fact_log: horizon ns}`` (empty for one written before max_file_age or
    by nights that never purged); a value that is not an int is ignored (no previous horizon)."""
    raw = watermark.get("horizons")
    if not isinstance(raw, dict):
        return {}
    return {k: v for k, v in raw.items() if isinstance(v, int) and not isinstance(v, bool)}


def _worker_seconds(chunks: list) -> dict[str, float | int]:
    """ChunkMeta.seconds summed over the night's chunks (the scope round's too), in CHUNK_SECONDS
    order, after ``chunks`` (their number)."""
    if not chunks:
        return {}
    sums: dict[str, float] = defaultdict(float)
    for meta in chunks:
        for key, value in meta.seconds.items():
            sums[key] += value
    order = [k for k in CHUNK_SECONDS if k in sums] + sorted(set(sums) - set(CHUNK_SECONDS))
    return {"chunks": len(chunks), **{k: round(sums[k], 3) for k in order}}


class _Background:
    """Runs ``fn(*args)`` on a thread; :meth:`result` waits for it and re-raises its error."""

    def __init__(self, fn: Callable, *args):
        self._result, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True, name=fn.__name__)
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._result = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the caller of result()
            self._error = err

    def join(self) -> None:
        self._thread.join()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class _NoBar:
    def start(self, name: str, total: int) -> None:
        pass

    def advance(self, name: str, amount: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar(_NoBar):
    """One bar per stage (files read, shards applied, facts compiled, shards assembled)."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.tasks: dict[str, int] = {}

    def start(self, name: str, total: int) -> None:
        self.tasks[name] = self.progress.add_task(name, total=total)

    def advance(self, name: str, amount: int = 1) -> None:
        self.progress.advance(self.tasks[name], amount)

    def close(self) -> None:
        self.progress.stop()


def _progress(enabled: bool) -> _NoBar:
    return _RichBar() if enabled else _NoBar()
