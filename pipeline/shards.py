"""The per-shard stages of a night: apply a shard's events, then assemble its bundle and stats.

Both run once per shard that has new events (``pipeline.runner`` puts them on Ray; here they are
plain functions), read and write only that shard's objects in the store, and return a small
value to the driver, which never holds per-fact data:

* :func:`apply_shard` applies the shard's events onto its prior fact state and tombstones
  (``pipeline.ingest.apply_events``), writes the new state, tombstones and this night's rejects
  part, and decides which users compile (their live facts changed), which are carried (their
  published delta is reused) and which are dropped (no live fact left, or forgotten). It
  returns a :class:`ShardApplied` for the driver and :class:`ShardChanges` (the compiled users'
  facts, the users whose published delta goes) for the compile pool and the assembly.
* :func:`assemble_shard` takes the shard's prior bundle without the users that go, adds the
  deltas compiled for it, recomputes the shard's co-batch groups and collisions, and writes the
  bundle and the shard's stats parts (``facts``, ``users``, ``collisions``); it returns the
  shard's :class:`~schemas.manifest.ShardEntry`.

A shard with no new event is not visited at all: its entry, objects and stats are carried by
reference. Objects are content-addressed and read back after writing, so a re-run or a retried
task writes nothing twice and nothing half.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.collisions import cross_user_collisions_arrays, row_keys
from pipeline.ingest import SHARD_COLUMN, UNROUTED, apply_events
from pipeline.stats import stats_prefix, write_stats_part
from schemas import facts as F
from schemas.bundle import BUNDLE_SCHEMA, decode_bundle, encode_bundle
from schemas.manifest import ShardEntry, bundle_key, state_key, tombstones_key
from schemas.stats import FACTS_STATS_SCHEMA
from versions.catalog import load_shard_bundle, load_shard_state, load_shard_tombstones
from versions.commit import write_verified_objects
from versions.layout import PARTIAL_PREFIX, shard_of
from versions.store import open_store

log = logging.getLogger(__name__)

COMPILE_COLUMNS = ("user_id", "fact_id", "trigger", "answer")


@dataclass(frozen=True)
class NightContext:
    """What every shard task of one night needs to know (small; sent with each task)."""

    store_uri: str
    num_shards: int
    recompile: bool  # compile every live user (first night, recompile_all, model change)
    prior_version: int | None = None
    prior_schema: int | None = None  # the prior manifest's schema version (1: stats in hive folders)
    prior_num_shards: int | None = None


@dataclass(frozen=True)
class ReshardedPrior:
    """A shard's prior when the number of shards changed: the pieces, cut from every old shard by
    :func:`split_prior_shard`, that belong to this new shard (keys under ``partial/reshard/``)."""

    state: tuple[str, ...] = ()
    tombstones: tuple[str, ...] = ()
    bundle: tuple[str, ...] = ()
    facts: tuple[str, ...] = ()


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class ShardApplied:
    """What the driver learns from applying one shard's events (no per-fact data)."""

    shard: int
    state: StoredObject | None  # None for the rows that reach no shard
    tombstones: StoredObject | None
    rejects_key: str | None  # this night's rejects part of the shard, if any
    accepted: int
    rejected: int
    compile_facts: np.ndarray  # (compiled users,) int32: facts per compiled user, in user order
    carried_users: int
    dropped_users: int
    forgotten_users: dict[str, int]  # forgotten this night -> forget time (us, UTC): their older versions are scrubbed
    removed_users: int  # users whose published delta goes (compiled, dropped or forgotten)
    watermark: str | None  # latest event time in the shard's state or accepted events

    @property
    def compile_users(self) -> int:
        return len(self.compile_facts)

    @property
    def changed(self) -> bool:
        """Whether the shard's bundle must be assembled again."""
        return self.removed_users > 0


@dataclass(frozen=True)
class ShardChanges:
    """What the compile pool and the assembly need from one applied shard."""

    compile: pa.Table  # COMPILE_COLUMNS of the compiled users' live facts, sorted by (user_id, fact_id)
    removed: pa.Array  # string: users whose published delta goes, sorted


def _write(store, key_of, data: bytes) -> StoredObject:
    sha = hashlib.sha256(data).hexdigest()
    key = key_of(sha)
    write_verified_objects(store, {key: data})
    return StoredObject(key, sha, len(data))


def _events(slices, tables) -> pa.Table:
    parts = [table.slice(offset, length) for (offset, length), table in zip(slices, tables)]
    if not parts:
        return F.FACT_LOG_BATCH_SCHEMA.empty_table()
    return pa.concat_tables(parts).drop_columns([SHARD_COLUMN])


def _prior_state(store, prior: ShardEntry | ReshardedPrior | None) -> tuple[pa.Table, pa.Table]:
    if prior is None:
        return F.empty_fact_state(), F.empty_tombstones()
    if isinstance(prior, ReshardedPrior):
        state = [F.decode_fact_state(store.get(k), source=f"{store.uri}/{k}") for k in prior.state]
        tombstones = [F.decode_tombstones(store.get(k), source=f"{store.uri}/{k}") for k in prior.tombstones]
        return (pa.concat_tables([F.empty_fact_state()] + state).sort_by([("user_id", "ascending"), ("fact_id", "ascending")]),
                pa.concat_tables([F.empty_tombstones()] + tombstones))
    return load_shard_state(store, prior), load_shard_tombstones(store, prior)


def apply_shard(ctx: NightContext, shard: int, prior: ShardEntry | ReshardedPrior | None, slices: list[tuple[int, int]],
                *tables: pa.Table) -> tuple[ShardApplied, ShardChanges]:
    """Apply shard ``shard``'s events (``tables[i]`` sliced by ``slices[i]``: the rows that
    ``pipeline.ingest.read_log_file`` keyed to this shard) onto its prior state (``prior``: its
    entry in the previous version, or None). Writes the shard's new state and tombstones and its
    rejects part. For :data:`~pipeline.ingest.UNROUTED` rows only the rejects part is written."""
    store = open_store(ctx.store_uri)
    events = _events(slices, tables)
    if shard == UNROUTED:
        result = apply_events(events, None)
        return ShardApplied(shard, None, None, _rejects_part(store, result.rejects), result.accepted, result.rejected,
                            np.zeros(0, np.int32), 0, 0, {}, 0, None), ShardChanges(_no_facts(), pa.array([], pa.string()))
    prior_state, prior_tombstones = _prior_state(store, prior)
    result = apply_events(events, prior_state, prior_tombstones)
    state = _write(store, state_key, F.encode_fact_state(result.state))
    tombstones = _write(store, tombstones_key, F.encode_tombstones(result.tombstones))

    live = pc.unique(result.state.column("user_id"))
    prior_users = pc.unique(prior_state.column("user_id"))
    dropped = pc.filter(prior_users, pc.invert(pc.is_in(prior_users, live)))
    if ctx.recompile:
        compiled = live
    else:
        changed = pa.array(sorted(result.changed_users), pa.string())
        compiled = pc.filter(changed, pc.is_in(changed, live))
    forgotten = pa.array(sorted(result.forgotten_users), pa.string())
    removed = pc.unique(pa.concat_arrays([compiled.cast(pa.string()), dropped.cast(pa.string()), forgotten]))
    removed = pc.take(removed, pc.sort_indices(removed))
    facts = result.state.filter(pc.is_in(result.state.column("user_id"), compiled)).select(list(COMPILE_COLUMNS))
    applied = ShardApplied(
        shard=shard, state=state, tombstones=tombstones, rejects_key=_rejects_part(store, result.rejects),
        accepted=result.accepted, rejected=result.rejected, compile_facts=_run_lengths(facts.column("user_id")),
        carried_users=len(live) - len(compiled), dropped_users=len(dropped),
        forgotten_users=dict(sorted(result.forget_times.items())), removed_users=len(removed), watermark=result.watermark,
    )
    return applied, ShardChanges(facts, removed)


def _no_facts() -> pa.Table:
    return pa.schema([(name, pa.string()) for name in COMPILE_COLUMNS]).empty_table()


def _run_lengths(sorted_users: pa.ChunkedArray) -> np.ndarray:
    """Lengths of the runs of equal values (facts per user of a table sorted by user)."""
    if len(sorted_users) == 0:
        return np.zeros(0, np.int32)
    run_ends = pc.run_end_encode(sorted_users.combine_chunks()).run_ends.to_numpy()
    return np.diff(run_ends, prepend=0).astype(np.int32)


def _rejects_part(store, rejects: pa.Table) -> str | None:
    return write_stats_part(store, "rejects", rejects) if rejects.num_rows else None


# --------------------------------------------------------------------------------- assembly


def carried_entry(prior: ShardEntry, applied: ShardApplied) -> ShardEntry:
    """The entry of a shard whose published deltas did not change (its events were all rejects,
    duplicates or no-ops): the prior bundle and stats with the shard's new state and tombstones."""
    return replace(prior, state_key=applied.state.key, state_sha256=applied.state.sha256, state_bytes=applied.state.bytes,
                   tombstones_key=applied.tombstones.key, tombstones_sha256=applied.tombstones.sha256,
                   tombstones_bytes=applied.tombstones.bytes)


def assemble_shard(ctx: NightContext, shard: int, prior: ShardEntry | ReshardedPrior | None, applied: ShardApplied,
                   changes: ShardChanges, *compiled) -> ShardEntry:
    """The shard's new bundle and stats parts: the prior bundle without ``changes.removed``, plus
    the deltas that the compile chunks ``compiled`` (pipeline.compile.CompiledChunk, each holding
    some users of this shard) produced for it. Writes the objects; returns the shard's entry."""
    store = open_store(ctx.store_uri)
    kept = _without_users(_prior_bundle(store, prior), changes.removed)
    new_rows = [chunk.bundles[shard] for chunk in compiled if shard in chunk.bundles]
    bundle = pa.concat_tables([kept.cast(BUNDLE_SCHEMA)] + [t.cast(BUNDLE_SCHEMA) for t in new_rows])
    bundle = bundle.sort_by([("user_id", "ascending")])
    report = _collisions(bundle)
    bundle = bundle.set_column(bundle.schema.get_field_index("cobatch_group"), BUNDLE_SCHEMA.field("cobatch_group"),
                               pa.array(_group_numbers(report, bundle.column("user_id").to_pylist()), pa.int32()))
    stored = _write(store, bundle_key, encode_bundle(bundle))

    results = [chunk.results[shard] for chunk in compiled if shard in chunk.results]
    facts = pa.concat_tables([_without_users(_prior_facts_stats(store, ctx, prior, shard), changes.removed)]
                             + [r.select(FACTS_STATS_SCHEMA.names).cast(FACTS_STATS_SCHEMA) for r in results])
    facts = facts.sort_by([("user_id", "ascending"), ("fact_id", "ascending")])
    row_counts = pc.list_value_length(bundle.column("row_ids"))
    stats = {
        "facts": write_stats_part(store, "facts", facts),
        "users": write_stats_part(store, "users", _users_stats(bundle, facts, shard, row_counts)),
        "collisions": write_stats_part(store, "collisions", report.hot_rows),
    }
    return ShardEntry(
        shard=shard, bundle_key=stored.key, bundle_sha256=stored.sha256, bundle_bytes=stored.bytes,
        state_key=applied.state.key, state_sha256=applied.state.sha256, state_bytes=applied.state.bytes,
        users=bundle.num_rows, facts=int(pc.sum(bundle.column("num_facts")).as_py() or 0),
        rows=int(pc.sum(row_counts).as_py() or 0),
        tombstones_key=applied.tombstones.key, tombstones_sha256=applied.tombstones.sha256,
        tombstones_bytes=applied.tombstones.bytes, stats=stats,
    )


def _prior_bundle(store, prior: ShardEntry | ReshardedPrior | None) -> pa.Table:
    if isinstance(prior, ReshardedPrior):
        parts = [decode_bundle(store.get(k), source=f"{store.uri}/{k}") for k in prior.bundle]
        return pa.concat_tables([BUNDLE_SCHEMA.empty_table()] + parts).sort_by([("user_id", "ascending")])
    return load_shard_bundle(store, prior) if prior is not None else BUNDLE_SCHEMA.empty_table()


def _without_users(table: pa.Table, users: pa.Array) -> pa.Table:
    if len(users) == 0 or table.num_rows == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("user_id"), users)))


def _prior_facts_stats(store, ctx: NightContext, prior: ShardEntry | ReshardedPrior | None, shard: int) -> pa.Table:
    """The shard's ``facts`` stats rows of the prior version (a version-1 store kept one file per
    version: its rows of this shard's users are taken)."""
    if prior is None:
        return FACTS_STATS_SCHEMA.empty_table()
    if isinstance(prior, ReshardedPrior):
        parts = [pq.read_table(pa.BufferReader(store.get(k))) for k in prior.facts]
        return pa.concat_tables([FACTS_STATS_SCHEMA.empty_table()] + [t.cast(FACTS_STATS_SCHEMA) for t in parts])
    if "facts" in prior.stats:
        keys = [prior.stats["facts"]]
    elif ctx.prior_schema == 1 and ctx.prior_version is not None:
        keys = [k for k in store.list(stats_prefix("facts", ctx.prior_version)) if k.endswith(".parquet")]
    else:
        keys = []
    tables = [pq.read_table(pa.BufferReader(store.get(k))).select(FACTS_STATS_SCHEMA.names).cast(FACTS_STATS_SCHEMA)
              for k in keys]
    if not tables:
        return FACTS_STATS_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    if "facts" not in prior.stats:  # version 1: keep this shard's users only
        users = pc.unique(table.column("user_id")).to_pylist()
        mine = pa.array([u for u in users if u is not None and shard_of(u, ctx.prior_num_shards) == shard], pa.string())
        table = table.filter(pc.is_in(table.column("user_id"), mine))
    return table


# --------------------------------------------------------------------------------- resharding


def split_prior_shard(ctx: NightContext, entry: ShardEntry) -> dict[int, dict[str, str]]:
    """Cut one old shard's fact state, tombstones, bundle and ``facts`` stats by each user's shard
    under ``ctx.num_shards`` (a night that changes the number of shards). Each piece is written
    under ``partial/reshard/`` (content-addressed; cleared when the night publishes); returns
    new shard -> kind -> key. Users keep their deltas: nothing is compiled again."""
    store = open_store(ctx.store_uri)
    state, tombstones = _prior_state(store, entry)
    tables = {
        "state": (state, "user_id", F.encode_fact_state),
        "tombstones": (tombstones, "user_xxh64", F.encode_tombstones),
        "bundle": (_prior_bundle(store, entry).cast(BUNDLE_SCHEMA), "user_id", encode_bundle),
        "facts": (_prior_facts_stats(store, ctx, entry, entry.shard), "user_id", _facts_bytes),
    }
    pieces: dict[int, dict[str, str]] = {}
    for kind, (table, column, encode) in tables.items():
        shards = _new_shards(table.column(column), ctx.num_shards)
        for shard in sorted(set(shards.to_pylist())):
            piece = table.filter(pc.equal(shards, shard))
            stored = _write(store, lambda sha, kind=kind: f"{PARTIAL_PREFIX}reshard/{kind}/{sha}.parquet", encode(piece))
            pieces.setdefault(shard, {})[kind] = stored.key
    return pieces


def _new_shards(column: pa.ChunkedArray, num_shards: int) -> pa.Array:
    if pa.types.is_uint64(column.type):  # tombstones: the stored shard hash
        return pa.array([h % num_shards for h in column.to_pylist()], pa.int64())
    return pa.array([shard_of(u, num_shards) for u in column.to_pylist()], pa.int64())


def _facts_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def resharded_priors(splits: list[dict[int, dict[str, str]]], num_shards: int) -> dict[int, ReshardedPrior]:
    """Every new shard's prior from the pieces of every old shard (:func:`split_prior_shard`)."""
    keys: dict[int, dict[str, list[str]]] = {s: {} for s in range(num_shards)}
    for split in splits:
        for shard, kinds in split.items():
            for kind, key in kinds.items():
                keys[shard].setdefault(kind, []).append(key)
    return {s: ReshardedPrior(**{kind: tuple(v) for kind, v in kinds.items()}) for s, kinds in keys.items()}


def _collisions(bundle: pa.Table):
    users = bundle.column("user_id").to_pylist()
    layers = pc.list_flatten(bundle.column("layers")).to_numpy(zero_copy_only=False)
    rows = pc.list_flatten(bundle.column("row_ids")).to_numpy(zero_copy_only=False)
    counts = pc.list_value_length(bundle.column("row_ids")).to_numpy(zero_copy_only=False)
    return cross_user_collisions_arrays(users, np.asarray(counts, np.int64), row_keys(layers, rows))


def _group_numbers(report, users: list[str]) -> list[int]:
    number = {u: g for g, members in enumerate(report.groups) for u in members}
    return [number[u] for u in users]


def _users_stats(bundle: pa.Table, facts: pa.Table, shard: int, row_counts: pa.Array) -> pa.Table:
    ok = facts.filter(pc.equal(facts.column("status"), "ok")).group_by("user_id").aggregate([("fact_id", "count")])
    ok_of = dict(zip(ok.column("user_id").to_pylist(), ok.column("fact_id_count").to_pylist()))
    users = bundle.column("user_id").to_pylist()
    return pa.table({
        "user_id": pa.array(users, pa.string()),
        "shard": pa.array([shard] * len(users), pa.int64()),
        "facts": bundle.column("num_facts").cast(pa.int64()),
        "facts_ok": pa.array([ok_of.get(u, 0) for u in users], pa.int64()),
        "rows": row_counts.cast(pa.int64()),
        "bytes": pc.binary_length(bundle.column("values")).cast(pa.int64()),
    })
