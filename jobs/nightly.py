"""The nightly job: fact log -> ingest -> plan -> compile (Ray) -> collisions -> publish -> stats.

``run_nightly(spec)`` is the whole job; ``engram run nightly --spec FILE`` and ``engram submit``
call it. Incremental by construction: the previous version's fact state and deltas are the
starting point, only the log files not yet ingested are read (they are listed in the
manifest's watermark), only users whose facts changed are compiled, and shards without a
changed user keep their objects. Re-running with the same inputs publishes nothing new.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from engram_core.checkpoint import check_adapter_base
from engram_core.checkpoint import fingerprint as model_fingerprint
from jobs.spec import NightlySpec
from pipeline import compile as compile_mod
from pipeline.collisions import cross_user_collisions
from pipeline.ingest import ingest, read_fact_log
from pipeline.plan import plan
from pipeline.stats import write_stats
from schemas.bundle import bundle_deltas, bundle_table, encode_bundle
from schemas.facts import decode_fact_state, empty_fact_state, encode_fact_state
from schemas.manifest import Manifest
from versions.catalog import load_shard_bundle, load_shard_state_bytes, read_current
from versions.layout import shard_of
from versions.models import publish_model
from versions.publish import ShardPayload, publish_version
from versions.store import open_store

log = logging.getLogger(__name__)


@dataclass
class NightlyReport:
    version: int | None
    published: bool
    parent: int | None
    store: str
    users: int
    facts: int
    facts_ok: int
    facts_failed: int
    compiled_users: int
    carried_users: int
    dropped_users: int
    accepted: int
    rejects: int
    resumed_facts: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    sample: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started: dict[str, str] = {}
        self.items: dict[str, int] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self.started[name] = datetime.now(timezone.utc).isoformat()
        log.info("stage %s ...", name)
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 3)

    def table(self) -> pa.Table:
        names = list(self.seconds)
        return pa.table({
            "stage": names,
            "seconds": [float(self.seconds[n]) for n in names],
            "started_at": [datetime.fromisoformat(self.started[n]) for n in names],
            "items": [int(self.items.get(n, 0)) for n in names],
        })


def _read_watermark(manifest: Manifest | None) -> dict:
    if manifest is None or not manifest.watermark:
        return {"files": {}, "max_event_time": None}
    return json.loads(manifest.watermark)


def _load_state(store, manifest: Manifest | None) -> pa.Table:
    if manifest is None:
        return empty_fact_state()
    tables = []
    for entry in manifest.shards:
        data = load_shard_state_bytes(store, entry)
        tables.append(decode_fact_state(data, source=f"{store.uri}/{entry.state_key}"))
    return pa.concat_tables(tables) if tables else empty_fact_state()


def _shard_column(users: pa.Array | pa.ChunkedArray, num_shards: int) -> list[int]:
    return [shard_of(u, num_shards) for u in users.to_pylist()]


def _build_shards(store, previous: Manifest | None, state: pa.Table, compiled: dict, drop: set[str],
                  num_shards: int) -> dict[int, ShardPayload]:
    """Bundles and state objects for every shard that holds a compiled or dropped user."""
    reshard = previous is None or previous.num_shards != num_shards
    touched = set(range(num_shards)) if reshard else {shard_of(u, num_shards) for u in set(compiled) | drop}
    state_shards = pa.array(_shard_column(state.column("user_id"), num_shards), pa.int32())
    facts_per_user = dict(zip(*pc.value_counts(state.column("user_id")).flatten()))
    facts_per_user = {k.as_py(): v.as_py() for k, v in facts_per_user.items()}
    carried: dict[int, dict[str, tuple]] = {}
    if previous is not None and not reshard:
        for entry in previous.shards:
            if entry.shard in touched:
                table = load_shard_bundle(store, entry)
                nfacts = dict(zip(table.column("user_id").to_pylist(), table.column("num_facts").to_pylist()))
                carried[entry.shard] = {u: (d, nfacts[u]) for u, d in bundle_deltas(table).items()}
    elif previous is not None:  # resharding: every live user's delta moves
        for entry in previous.shards:
            table = load_shard_bundle(store, entry)
            nfacts = dict(zip(table.column("user_id").to_pylist(), table.column("num_facts").to_pylist()))
            for u, d in bundle_deltas(table).items():
                carried.setdefault(shard_of(u, num_shards), {})[u] = (d, nfacts[u])
    payloads = {}
    for shard in sorted(touched):
        owners = {u: v for u, v in carried.get(shard, {}).items() if u not in drop and u not in compiled}
        owners.update({u: (d, facts_per_user.get(u, 0)) for u, d in compiled.items() if shard_of(u, num_shards) == shard})
        shard_state = state.filter(pc.equal(state_shards, shard))
        groups = cross_user_collisions({u: d for u, (d, _) in owners.items()}).groups
        payloads[shard] = ShardPayload(bundle=encode_bundle(bundle_table(owners, groups)),
                                       state=encode_fact_state(shard_state))
    return payloads


def _token_counter(model_dir: str) -> Callable[[list[str]], list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(f"{model_dir}/tokenizer", local_files_only=True)
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]]


def run_nightly(
    spec: NightlySpec,
    *,
    crash_hook: Callable[[str], None] | None = None,
    progress: bool = False,
) -> NightlyReport:
    """Run one night end to end; returns what was published (or that nothing changed)."""
    timer = _Timer()
    job_id = spec.job_id or f"nightly-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    store = open_store(spec.store)
    store.check_conditional_writes()  # before any work: a store that ignores If-None-Match / If-Match is refused
    with timer.stage("read_previous"):
        current = read_current(store)
        previous = current[0] if current else None
        prior_state = _load_state(store, previous)
        watermark = _read_watermark(previous)
        fingerprint = model_fingerprint(spec.model)
        check_adapter_base(spec.model)  # here, before Ray: a compile worker would only fail at its load

    with timer.stage("ingest"):
        batch = read_fact_log(spec.fact_log, exclude_files=set(watermark["files"]), on_bad_file=spec.on_bad_file)
        ingested = ingest(batch, prior_state, max_trigger_tokens=spec.max_trigger_tokens,
                          count_tokens=_token_counter(spec.model))
        timer.items["ingest"] = batch.input_rows

    with timer.stage("plan"):
        the_plan = plan(prior_state, ingested.state, prior_fingerprint=previous.fingerprint if previous else None,
                        fingerprint=fingerprint, recompile_all=spec.recompile_all, forgotten=ingested.forgotten_users)
        compile_set = set(the_plan.compile_users)
        to_compile = ingested.state.filter(pc.is_in(ingested.state.column("user_id"), pa.array(sorted(compile_set), pa.string())))
        timer.items["plan"] = len(compile_set)
        log.info("plan: compile %d, carry %d, drop %d users", len(compile_set), len(the_plan.carry_users),
                 len(the_plan.drop_users))

    with timer.stage("compile"):
        facts = compile_mod.facts_from_table(to_compile)
        bar = _progress(progress, len(compile_set), len(facts))
        if spec.workers > 0 and facts:
            compile_mod.start_ray(spec.ray_address)
        checkpoints = compile_mod.ChunkCheckpoints(store, fingerprint, spec.compile_options())

        def on_chunk(users: int, facts_done: int) -> None:
            bar.advance(users, facts_done)
            if crash_hook is not None:
                crash_hook("compile_chunk")

        compiled = compile_mod.compile_stage(
            spec.model, facts, fingerprint=fingerprint, options=spec.compile_options(),
            workers=spec.workers, gpus_per_worker=spec.gpus_per_worker, on_chunk=on_chunk,
            checkpoints=checkpoints, batches_per_chunk=spec.batches_per_chunk,
        )
        bar.close()
        timer.items["compile"] = len(facts)

    if ingested.forgotten_users:
        with timer.stage("forget"):
            # forget_user events: scrub every retained older version too, so that no rollback can
            # bring these users back; this re-issues the retained versions (versions/forget.py).
            previous = _forget_in_retained_versions(store, sorted(ingested.forgotten_users), job_id) or previous

    with timer.stage("publish"):
        # Serving nodes load the model by fingerprint from the store: upload it before CURRENT
        # can point at deltas that need it (skipped when already there).
        publish_model(store, spec.model)
        # Users compiled to no delta (every fact refused by the compiler, e.g. an answer over the
        # token limit) must not keep serving their previous delta.
        undelivered = compile_set - compiled.deltas.keys()
        drop = set(the_plan.drop_users) | set(ingested.forgotten_users) | undelivered
        payloads = _build_shards(store, previous, ingested.state, compiled.deltas, drop, spec.num_shards)
        files = dict(watermark["files"]) | {f.path: f.size for f in batch.files}
        new_watermark = json.dumps({"files": dict(sorted(files.items())), "max_event_time": ingested.watermark},
                                   sort_keys=True, separators=(",", ":"))
        manifest = publish_version(
            store, shard_payloads=payloads, previous=previous, fingerprint=fingerprint,
            num_shards=spec.num_shards, job_id=job_id, watermark=new_watermark,
            counts={"accepted": ingested.accepted, "rejected": ingested.rejected,
                    "compiled_users": len(compile_set), "facts_ok": compiled.ok,
                    "facts_failed": len(compiled.results) - compiled.ok},
            forgotten_users=sorted(ingested.forgotten_users), crash_hook=crash_hook,
        )
        published = previous is None or manifest.version != previous.version
        checkpoints.clear()  # the night is published (or had nothing new): partial results are done

    if published:
        with timer.stage("stats"):
            _write_run_stats(store, manifest, previous, ingested, compiled, timer)

    report = NightlyReport(
        version=manifest.version, published=published, parent=manifest.parent, store=store.uri,
        users=manifest.users, facts=manifest.facts, facts_ok=compiled.ok,
        facts_failed=len(compiled.results) - compiled.ok, compiled_users=len(compile_set),
        carried_users=len(the_plan.carry_users), dropped_users=len(the_plan.drop_users),
        accepted=ingested.accepted, rejects=ingested.rejected, resumed_facts=compiled.resumed_facts,
        seconds=dict(timer.seconds),
        sample=_sample(to_compile, compiled),
    )
    log.info("nightly %s: %s", job_id, "published v%d" % manifest.version if published else "nothing changed")
    return report


def _forget_in_retained_versions(store, users: list[str], job_id: str) -> Manifest | None:
    """Forget ``users`` in every retained version; returns the (rewritten) current manifest."""
    from versions.forget import forget_user

    for user in users:
        forget_user(store, user, actor=job_id, reason="forget_user event in the fact log")
    current = read_current(store)
    return current[0] if current else None


def _sample(state: pa.Table, compiled, n: int = 5) -> list[dict]:
    ok = {(r.user_id, r.fact_id) for r in compiled.results if r.status == "ok"}
    out = []
    for row in state.select(["user_id", "fact_id", "trigger", "answer"]).to_pylist():
        if (row["user_id"], row["fact_id"]) in ok:
            out.append({"user_id": row["user_id"], "trigger": row["trigger"], "answer": row["answer"]})
        if len(out) == n:
            break
    return out


def _write_run_stats(store, manifest: Manifest, previous: Manifest | None, ingested, compiled, timer: _Timer) -> None:
    results = compiled.results
    facts = pa.table({
        "user_id": [r.user_id for r in results], "fact_id": [r.fact_id for r in results],
        "status": [r.status for r in results], "loss": pa.array([r.loss for r in results], pa.float64()),
        "steps": pa.array([r.steps for r in results], pa.int64()), "rows": pa.array([r.rows for r in results], pa.int64()),
    })
    facts = _carry_fact_stats(store, previous, facts, ingested.state, set(compiled.facts_per_user))
    ok_per_user: dict[str, int] = {}
    for user, status in zip(facts.column("user_id").to_pylist(), facts.column("status").to_pylist()):
        ok_per_user[user] = ok_per_user.get(user, 0) + (status == "ok")
    users, shards, collisions = _user_and_shard_stats(store, manifest, ok_per_user)
    timer.seconds.setdefault("stats", 0.0)
    tables = {"facts": facts, "users": users, "shards": shards, "collisions": collisions,
              "rejects": ingested.rejects, "runs": timer.table()}
    write_stats(store, manifest.version, tables)


def _carry_fact_stats(store, previous, facts: pa.Table, state: pa.Table, compiled_users: set[str]) -> pa.Table:
    """This version's facts table: fresh results for compiled users, the previous rows for the rest."""
    if previous is None:
        return facts
    import pyarrow.parquet as pq

    from pipeline.stats import stats_prefix

    keys = [k for k in store.list(stats_prefix("facts", previous.version)) if k.endswith(".parquet")]
    if not keys:
        return facts
    old = pa.concat_tables([pq.read_table(pa.BufferReader(store.get(k))) for k in keys])
    live = set(state.column("user_id").to_pylist()) - compiled_users
    old = old.filter(pc.is_in(old.column("user_id"), pa.array(sorted(live), pa.string())))
    old = old.select(facts.column_names).cast(facts.schema)
    return pa.concat_tables([old, facts]).sort_by([("user_id", "ascending"), ("fact_id", "ascending")])


def _user_and_shard_stats(store, manifest: Manifest, ok_per_user: dict[str, int]) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Per-user and per-shard rows, and the cross-user collisions (shard by shard, one pass)."""
    from pipeline.collisions import collision_table, cross_user_collisions

    reports = []
    users = {"user_id": [], "shard": [], "facts": [], "facts_ok": [], "rows": [], "bytes": []}
    shards = {"shard": [], "users": [], "facts": [], "rows": [], "bytes": [], "bundle_key": []}
    for entry in manifest.shards:
        for k, v in (("shard", entry.shard), ("users", entry.users), ("facts", entry.facts), ("rows", entry.rows),
                     ("bytes", entry.bundle_bytes), ("bundle_key", entry.bundle_key)):
            shards[k].append(v)
        table = load_shard_bundle(store, entry)
        reports.append(cross_user_collisions(bundle_deltas(table)))
        for user, nfacts, row_ids, values in zip(table.column("user_id").to_pylist(), table.column("num_facts").to_pylist(),
                                                 table.column("row_ids").to_pylist(), table.column("values").to_pylist()):
            users["user_id"].append(user)
            users["shard"].append(entry.shard)
            users["facts"].append(nfacts)
            users["facts_ok"].append(ok_per_user.get(user, 0))
            users["rows"].append(len(row_ids))
            users["bytes"].append(len(values))
    return pa.table(users), pa.table(shards), collision_table(reports)


class _NoBar:
    def advance(self, users: int, facts: int) -> None:
        pass

    def close(self) -> None:
        pass


class _RichBar(_NoBar):
    def __init__(self, users: int, facts: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(TextColumn("[bold]compile[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), transient=False)
        self.progress.start()
        self.users = self.progress.add_task("users", total=users)
        self.facts = self.progress.add_task("facts", total=facts)

    def advance(self, users: int, facts: int) -> None:
        self.progress.advance(self.users, users)
        self.progress.advance(self.facts, facts)

    def close(self) -> None:
        self.progress.stop()


def _progress(enabled: bool, users: int, facts: int) -> _NoBar:
    return _RichBar(users, facts) if enabled and facts else _NoBar()
