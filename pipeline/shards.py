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
* :func:`assemble_shard` writes what changed as a *layer* over the shard's base
  (:func:`write_layer`: the changed users' whole deltas, tombstones of the users whose delta
  goes, and the layer's stats parts), or, when the driver decided to compact the shard (first
  night, resharding, a model change, or a chain past the job spec's limits: :func:`chains_to_compact`),
  a new *base*: the merged view without the users that go plus the new deltas, with the shard's
  co-batch groups and collisions computed over all of it. It returns the shard's
  :class:`~schemas.manifest.ShardEntry`.

The fact state follows the same pattern (:func:`apply_shard` writes a state layer of the users
whose facts or tombstones changed, or a new base when compacting). :func:`compact_shard` writes a
shard's merged chain as a new base (``engram compact``).

Co-batch groups over the merged view: a layer numbers its users' groups from the shard's
``cobatch_groups`` on, partitioned among the layer's users only. A group therefore never mixes
users of two objects, and a user superseded or removed by a later layer only leaves its group
(a subset of users with pairwise disjoint rows still has pairwise disjoint rows), so every group
of the merged view stays valid without reading the base. Compaction recomputes them over the
whole shard (fewer, fuller groups). A layer's ``collisions`` part holds the rows shared among
its own users; the base's, those of the whole shard at the last compaction.

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
from schemas.bundle import (BUNDLE_SCHEMA, decode_bundle, encode_bundle, encode_layer, layer_fingerprint, layer_table,
                            merge_bundle_chain)
from schemas.manifest import LayerEntry, ShardEntry, StateLayer, bundle_key, layer_key, state_key, tombstones_key
from schemas.stats import COLLISIONS_STATS_SCHEMA, FACTS_STATS_SCHEMA, USERS_STATS_SCHEMA
from versions.catalog import load_base_bundle, load_layer, load_shard_bundle, load_shard_fact_state
from versions.commit import write_verified_objects
from versions.layout import PARTIAL_PREFIX, shard_of
from versions.store import open_store

log = logging.getLogger(__name__)

COMPILE_COLUMNS = ("user_id", "fact_id", "scope", "trigger", "answer", "event_time")


@dataclass(frozen=True)
class NightContext:
    """What every shard task of one night needs to know (small; sent with each task)."""

    store_uri: str
    num_shards: int
    recompile: bool  # compile every live user (first night, recompile_all, model change)
    prior_version: int | None = None
    prior_schema: int | None = None  # the prior manifest's schema version (1: stats in hive folders)
    prior_num_shards: int | None = None
    fingerprint: str = ""  # the model the night compiles for (recorded in every layer)


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
class StatePart:
    """The fact-state fields of a shard's entry: the base state and tombstones and their layers."""

    state: StoredObject
    tombstones: StoredObject | None  # None: no tombstones object (a shard carried from version 1)
    layers: tuple[StateLayer, ...] = ()

    @classmethod
    def of(cls, entry: ShardEntry) -> "StatePart":
        tombstones = (StoredObject(entry.tombstones_key, entry.tombstones_sha256, entry.tombstones_bytes)
                      if entry.tombstones_key else None)
        return cls(StoredObject(entry.state_key, entry.state_sha256, entry.state_bytes), tombstones, entry.state_layers)

    def fields(self) -> dict:
        """The ShardEntry fields this part sets."""
        tombstones = self.tombstones
        return dict(state_key=self.state.key, state_sha256=self.state.sha256, state_bytes=self.state.bytes,
                    tombstones_key=tombstones.key if tombstones else None,
                    tombstones_sha256=tombstones.sha256 if tombstones else None,
                    tombstones_bytes=tombstones.bytes if tombstones else 0, state_layers=self.layers)


@dataclass(frozen=True)
class ShardApplied:
    """What the driver learns from applying one shard's events (no per-fact data)."""

    shard: int
    state: StatePart | None  # None for the rows that reach no shard
    rejects_key: str | None  # this night's rejects part of the shard, if any
    accepted: int
    rejected: int
    compile_facts: np.ndarray  # (compiled users,) int32: facts per compiled user, in user order
    carried_users: int
    dropped_users: int
    forgotten_users: dict[str, int]  # forgotten this night -> forget time (us, UTC): their older versions are scrubbed
    removed_users: int  # users whose published delta goes (compiled, dropped or forgotten)
    watermark: str | None  # latest event time in the shard's state or accepted events
    scope_rows: int = 0  # rows of the shard's scope contribution (pipeline.scopes.shard_contribution)

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
    return load_shard_fact_state(store, prior)


def apply_shard(ctx: NightContext, shard: int, prior: ShardEntry | ReshardedPrior | None, compact_state: bool,
                slices: list[tuple[int, int]], *tables: pa.Table) -> tuple[ShardApplied, ShardChanges, pa.Table]:
    """Apply shard ``shard``'s events (``tables[i]`` sliced by ``slices[i]``: the rows that
    ``pipeline.ingest.read_log_file`` keyed to this shard) onto its prior state (``prior``: its
    entry in the previous version, or None). Writes the shard's new state and tombstones (a state
    layer of the users whose facts or tombstones changed, or a new base when ``compact_state``) and its
    rejects part. For :data:`~pipeline.ingest.UNROUTED` rows only the rejects part is written.
    The third output is the shard's scope contribution (pipeline.scopes.shard_contribution of the
    new state: the scope facts its members carry), for the night's scope merge."""
    from pipeline.scopes import SCOPE_STATE_SCHEMA, shard_contribution

    store = open_store(ctx.store_uri)
    events = _events(slices, tables)
    if shard == UNROUTED:
        result = apply_events(events, None)
        return ShardApplied(shard, None, _rejects_part(store, result.rejects), result.accepted, result.rejected,
                            np.zeros(0, np.int32), 0, 0, {}, 0, None), \
            ShardChanges(_no_facts(), pa.array([], pa.string())), SCOPE_STATE_SCHEMA.empty_table()
    prior_state, prior_tombstones = _prior_state(store, prior)
    result = apply_events(events, prior_state, prior_tombstones)
    state = _write_state(store, prior, compact_state, prior_state, prior_tombstones, result)

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
    contribution = shard_contribution(result.state, shard)
    applied = ShardApplied(
        shard=shard, state=state, rejects_key=_rejects_part(store, result.rejects),
        accepted=result.accepted, rejected=result.rejected, compile_facts=_run_lengths(facts.column("user_id")),
        carried_users=len(live) - len(compiled), dropped_users=len(dropped),
        forgotten_users=dict(sorted(result.forget_times.items())), removed_users=len(removed), watermark=result.watermark,
        scope_rows=contribution.num_rows,
    )
    return applied, ShardChanges(facts, removed), contribution


def state_entry(shard: int, state: StatePart) -> ShardEntry:
    """A ShardEntry naming only ``state`` (its delta fields empty): what reading a shard's fact
    state (versions.catalog.load_shard_fact_state) needs, for a shard with no prior entry."""
    return ShardEntry(shard=shard, bundle_key="", bundle_sha256="", bundle_bytes=0, users=0, facts=0, rows=0,
                      **state.fields())


def rescope_shard(ctx: NightContext, shard: int, entry: ShardEntry, applied: ShardApplied | None,
                  changes: ShardChanges | None, changed_scopes: tuple[str, ...],
                  refreshed_scopes: tuple[str, ...] = ()) -> tuple[ShardApplied, ShardChanges]:
    """Add the shard's members of ``changed_scopes`` (scopes recompiled this night: their deltas were
    fitted to the old scope delta) and its users holding one of ``refreshed_scopes`` (scopes whose
    merged facts changed) as an extra scope (they serve its facts from their own delta) to the users
    it compiles (pipeline.scopes.users_to_rescope). ``entry``: the shard's entry with its new fact
    state (this night's, if ``applied``); ``applied``/``changes``: what the apply task returned
    (None for a shard with no new event, whose state is the previous version's)."""
    from pipeline.scopes import users_to_rescope

    store = open_store(ctx.store_uri)
    state, _ = load_shard_fact_state(store, entry)
    members = users_to_rescope(state, changed_scopes, refreshed_scopes)
    before = changes.compile.column("user_id") if changes is not None else pa.chunked_array([], pa.string())
    compiled = pc.unique(pa.concat_arrays([before.combine_chunks().cast(pa.string()), members.cast(pa.string())]))
    removed = pc.unique(pa.concat_arrays([(changes.removed if changes is not None else pa.array([], pa.string())),
                                          compiled]))
    removed = pc.take(removed, pc.sort_indices(removed))
    facts = state.filter(pc.is_in(state.column("user_id"), compiled)).select(list(COMPILE_COLUMNS)).sort_by(
        [("user_id", "ascending"), ("fact_id", "ascending")])
    per_user = _run_lengths(facts.column("user_id"))
    live = len(pc.unique(state.column("user_id")))
    if applied is None:
        applied = ShardApplied(shard, StatePart.of(entry), None, 0, 0, per_user, live - len(per_user), 0, {},
                               len(removed), None)
    else:
        applied = replace(applied, compile_facts=per_user, carried_users=live - len(per_user), removed_users=len(removed))
    return applied, ShardChanges(facts, removed)


def shard_scope_contribution(ctx: NightContext, shard: int, entry: ShardEntry) -> pa.Table:
    """Shard ``shard``'s scope contribution (pipeline.scopes.shard_contribution) from its fact state
    in ``entry`` (a shard with no new event, read once when the prior scope state is version 1)."""
    from pipeline.scopes import shard_contribution

    state, _ = load_shard_fact_state(open_store(ctx.store_uri), entry)
    return shard_contribution(state, shard)


def _write_state(store, prior, compact: bool, prior_state: pa.Table, prior_tombstones: pa.Table, result) -> StatePart:
    """The shard's new state: a base (first night, resharding, compaction) or a state layer of the
    users whose facts or tombstones changed (none: the prior state, carried)."""
    if compact or not isinstance(prior, ShardEntry):
        return StatePart(_write(store, state_key, F.encode_fact_state(result.state)),
                         _write(store, tombstones_key, F.encode_tombstones(result.tombstones)))
    carried = StatePart.of(prior)
    layer = F.state_layer(prior_state, prior_tombstones, result.state, result.tombstones)
    if layer is None:
        return carried
    return replace(carried, layers=carried.layers + (write_state_layer(store, *layer),))


def write_state_layer(store, state: pa.Table, tombstones: pa.Table) -> StateLayer:
    """A state layer's objects (no tombstones object when the users keep none)."""
    facts = _write(store, state_key, F.encode_fact_state(state))
    if tombstones.num_rows == 0:
        return StateLayer(facts.key, facts.sha256, facts.bytes)
    kept = _write(store, tombstones_key, F.encode_tombstones(tombstones))
    return StateLayer(facts.key, facts.sha256, facts.bytes, kept.key, kept.sha256, kept.bytes)


def _no_facts() -> pa.Table:
    return F.FACT_STATE_SCHEMA.empty_table().select(list(COMPILE_COLUMNS))


def _run_lengths(sorted_users: pa.ChunkedArray) -> np.ndarray:
    """Lengths of the runs of equal values (facts per user of a table sorted by user)."""
    if len(sorted_users) == 0:
        return np.zeros(0, np.int32)
    run_ends = pc.run_end_encode(sorted_users.combine_chunks()).run_ends.to_numpy()
    return np.diff(run_ends, prepend=0).astype(np.int32)


def _rejects_part(store, rejects: pa.Table) -> str | None:
    return write_stats_part(store, "rejects", rejects) if rejects.num_rows else None


# --------------------------------------------------------------------------------- assembly


def chains_to_compact(entry: ShardEntry, max_layers: int, layer_share: float) -> tuple[bool, bool]:
    """(deltas, state): whether the next change of ``entry``'s shard writes a new base instead of
    another layer, for its delta chain and for its fact-state chain, each judged on its own: it has
    ``max_layers`` layers already, or its layers weigh more than ``layer_share`` of its base's bytes
    (job spec ``compact_after_layers``, ``compact_layer_share``). The state chain is small and
    compacts on its own, so it never costs a rewrite of the shard's deltas."""
    deltas = (entry.cobatch_groups is None  # a layer could not number its groups apart from the base's
              or len(entry.layers) >= max_layers
              or sum(layer.bytes for layer in entry.layers) > layer_share * entry.bundle_bytes)
    state = (len(entry.state_layers) >= max_layers
             or sum(layer.bytes for layer in entry.state_layers) > layer_share * (entry.state_bytes + entry.tombstones_bytes))
    return deltas, state


def carried_entry(prior: ShardEntry, applied: ShardApplied) -> ShardEntry:
    """The entry of a shard whose published deltas did not change (its events were all rejects,
    duplicates or no-ops): the prior deltas and stats with the shard's new state."""
    return replace(prior, **applied.state.fields())


def assemble_shard(ctx: NightContext, shard: int, prior: ShardEntry | ReshardedPrior | None, compact_deltas: bool,
                   applied: ShardApplied, changes: ShardChanges, scopes, *compiled) -> ShardEntry:
    """The shard's new entry: a layer over the prior chain holding the deltas that the compile
    chunks ``compiled`` (pipeline.compile.CompiledChunk, each holding some users of this shard)
    produced and tombstones of ``changes.removed``; or, with ``compact_deltas`` (or no prior entry), a new
    base of the merged view. Writes the objects; returns the entry. ``scopes``
    (schemas.manifest.ScopesEntry): the version's shared scopes, whose rows that members also write
    are reported in the ``collisions`` part (kind ``user+scope``)."""
    store = open_store(ctx.store_uri)
    scope_deltas = load_scope_deltas(store, scopes)
    new_rows = _bundle_rows([chunk.bundles[shard] for chunk in compiled if shard in chunk.bundles])
    results = _facts_rows([chunk.results[shard] for chunk in compiled if shard in chunk.results])
    if compact_deltas or not isinstance(prior, ShardEntry):
        delta = write_base(store, ctx, shard, prior, changes.removed, new_rows, results, scope_deltas)
        return ShardEntry(shard=shard, **delta, **applied.state.fields())
    entry = write_layer(store, prior, new_rows, results, changes.removed, applied.forgotten_users, ctx.fingerprint,
                        scope_deltas)
    return replace(entry, **applied.state.fields())


def load_scope_deltas(store, scopes) -> dict:
    """scope id -> Delta of a schemas.manifest.ScopesEntry (verified); {} for None."""
    if scopes is None:
        return {}
    from schemas.bundle import bundle_deltas
    from versions.catalog import verified_bytes

    return bundle_deltas(decode_bundle(verified_bytes(store, scopes.key, scopes.bytes, scopes.sha256),
                                       source=f"{store.uri}/{scopes.key}"))


def _scope_collisions(bundle: pa.Table, scope_deltas: dict) -> pa.Table:
    """``user+scope`` collisions of the members among bundle rows ``bundle`` with their scopes."""
    from pipeline.scopes import scope_member_collisions
    from schemas.bundle import bundle_deltas, bundle_scopes

    scope_of = bundle_scopes(bundle)
    if not scope_of or not scope_deltas:
        return COLLISIONS_STATS_SCHEMA.empty_table()
    members = bundle.filter(pc.is_in(bundle.column("user_id"), pa.array(sorted(scope_of), pa.string())))
    deltas = bundle_deltas(members)
    return scope_member_collisions(scope_deltas, {u: (scope_of[u], deltas[u]) for u in deltas})


def compact_shard(ctx: NightContext, shard: int, entry: ShardEntry, scopes=None) -> ShardEntry:
    """``entry``'s chains merged into new bases (deltas, state, stats); what every user is served
    is unchanged. A shard without layers is returned as it is. ``scopes``: the version's shared
    scopes (for the ``user+scope`` collisions of the new base)."""
    if not entry.layers and not entry.state_layers:
        return entry
    store = open_store(ctx.store_uri)
    state, tombstones = load_shard_fact_state(store, entry)
    state_part = StatePart(_write(store, state_key, F.encode_fact_state(state)),
                           _write(store, tombstones_key, F.encode_tombstones(tombstones)))
    delta = write_base(store, ctx, shard, entry, pa.array([], pa.string()), BUNDLE_SCHEMA.empty_table(),
                       FACTS_STATS_SCHEMA.empty_table(), load_scope_deltas(store, scopes))
    return ShardEntry(shard=shard, **delta, **state_part.fields())


def write_layer(store, prior: ShardEntry, upserts: pa.Table, results: pa.Table, removed: pa.Array,
                forgotten: tuple[str, ...] | list[str], fingerprint: str, scope_deltas: dict | None = None) -> ShardEntry:
    """``prior`` with one more delta layer: ``upserts`` (bundle rows: the changed users' whole
    deltas), tombstones of the other ``removed`` users, and the layer's stats parts (``results``:
    the compiled users' facts rows). Forgotten users get no tombstone (their id must not be
    written): the forget rewrites every older object without them (versions.forget). The entry's
    totals are the merged view's. A change of forgotten users only writes no layer."""
    upserts = upserts.cast(BUNDLE_SCHEMA).sort_by([("user_id", "ascending")])
    upserted = upserts.column("user_id").combine_chunks()
    excluded = pa.concat_arrays([upserted, pa.array(list(forgotten), pa.string())])
    gone = pc.filter(removed, pc.invert(pc.is_in(removed, excluded))) if len(removed) else removed
    prior_users = _merged_users_stats(store, prior)
    left = prior_users.filter(pc.is_in(prior_users.column("user_id"), removed))
    row_counts = pc.list_value_length(upserts.column("row_ids"))
    totals = dict(users=prior.users - left.num_rows + upserts.num_rows,
                  facts=prior.facts - _sum(left.column("facts")) + _sum(upserts.column("num_facts")),
                  rows=prior.rows - _sum(left.column("rows")) + _sum(row_counts))
    if upserts.num_rows == 0 and len(gone) == 0:
        return replace(prior, **totals)
    report = _collisions(upserts)
    groups = [prior.cobatch_groups + g for g in _group_numbers(report, upserted.to_pylist())]
    upserts = upserts.set_column(upserts.schema.get_field_index("cobatch_group"), BUNDLE_SCHEMA.field("cobatch_group"),
                                 pa.array(groups, pa.int32()))
    parent = prior.layers[-1].sha256 if prior.layers else prior.bundle_sha256
    stored = _write(store, layer_key, encode_layer(layer_table(upserts, gone), fingerprint, parent))
    results = _facts_rows([results]).sort_by([("user_id", "ascending"), ("fact_id", "ascending")])
    stats = {
        "facts": write_stats_part(store, "facts", results),
        "users": write_stats_part(store, "users", _users_stats(upserts, results, prior.shard, row_counts)),
        "collisions": write_stats_part(store, "collisions", pa.concat_tables(
            [report.hot_rows, _scope_collisions(upserts, scope_deltas or {})])),
    }
    layer = LayerEntry(key=stored.key, sha256=stored.sha256, bytes=stored.bytes, parent_sha256=parent,
                       users=upserts.num_rows, tombstones=len(gone), stats=stats)
    return replace(prior, layers=prior.layers + (layer,), cobatch_groups=prior.cobatch_groups + len(report.groups),
                   **totals)


def rebase_entry(store, entry: ShardEntry, before: ShardEntry, after: ShardEntry) -> ShardEntry:
    """``entry`` (a night's entry built on ``before``'s chains) built on ``after`` instead, where
    ``after`` is ``before`` re-issued by a forget without some users (versions.forget). The parts
    of ``entry`` that are ``before``'s become ``after``'s; the night's own layers on top are kept,
    a delta layer re-encoded when the object below it changed (a layer names its parent). The
    night's totals already leave the forgotten users out."""
    if before == after:
        return entry
    fields: dict = {}
    if _on_deltas_of(entry, before):
        parent = after.layers[-1].sha256 if after.layers else after.bundle_sha256
        layers = list(after.layers)
        for layer in entry.layers[len(before.layers):]:
            layer = _reparent(store, layer, parent)
            layers.append(layer)
            parent = layer.sha256
        fields |= dict(bundle_key=after.bundle_key, bundle_sha256=after.bundle_sha256, bundle_bytes=after.bundle_bytes,
                       stats=after.stats if entry.stats == before.stats else entry.stats, layers=tuple(layers))
    if _on_state_of(entry, before):
        fields |= dict(StatePart.of(after).fields(), state_layers=after.state_layers
                       + entry.state_layers[len(before.state_layers):])
    return replace(entry, **fields)


def _on_deltas_of(entry: ShardEntry, before: ShardEntry) -> bool:
    """Whether ``entry``'s deltas are ``before``'s base and layers with the night's layers on top."""
    return entry.bundle_key == before.bundle_key and entry.layers[:len(before.layers)] == before.layers


def _on_state_of(entry: ShardEntry, before: ShardEntry) -> bool:
    """Whether ``entry``'s state is ``before``'s base state and layers with the night's on top."""
    return (entry.state_key, entry.tombstones_key) == (before.state_key, before.tombstones_key) and \
        entry.state_layers[:len(before.state_layers)] == before.state_layers


def own_keys(entry: ShardEntry, before: ShardEntry) -> set[str]:
    """The keys of ``entry`` (a night's, built on ``before``) that are not the parts of ``before``
    which :func:`rebase_entry` replaces by their re-issue: the night's own layers (with their
    stats parts, even where one is the same content, so the same key, as a part of ``before``: a
    forget that re-issues ``before`` must not delete it), its own base, state and stats."""
    own_layers, own_state = entry.layers, entry.state_layers
    inherited: set[str] = set()
    if _on_deltas_of(entry, before):
        inherited |= {before.bundle_key} | {k for layer in before.layers for k in layer.object_keys()}
        own_layers = entry.layers[len(before.layers):]
        if entry.stats == before.stats:
            inherited |= set(before.stats.values())
    if _on_state_of(entry, before):
        inherited |= {k for k in (before.state_key, before.tombstones_key) if k}
        inherited |= {k for layer in before.state_layers for k in layer.object_keys()}
        own_state = entry.state_layers[len(before.state_layers):]
    mine = {k for layer in (*own_layers, *own_state) for k in layer.object_keys()}
    return (set(entry.object_keys()) - inherited) | mine


def _reparent(store, layer: LayerEntry, parent: str) -> LayerEntry:
    if layer.parent_sha256 == parent:
        return layer
    table = load_layer(store, layer)
    stored = _write(store, layer_key, encode_layer(table, layer_fingerprint(table), parent))
    return replace(layer, key=stored.key, sha256=stored.sha256, bytes=stored.bytes, parent_sha256=parent)


def write_base(store, ctx: NightContext, shard: int, prior: ShardEntry | ReshardedPrior | None, removed: pa.Array,
               new_rows: pa.Table, results: pa.Table, scope_deltas: dict | None = None) -> dict:
    """Write a new base of the shard's deltas and its stats parts: the prior's merged view without
    ``removed``, plus ``new_rows`` (bundle rows) whose facts rows are ``results``; co-batch groups
    and collisions over all of it. Returns the ShardEntry fields of the deltas (the state is the
    caller's)."""
    if isinstance(prior, ShardEntry):
        chain = _Chain(store, prior)
        prior_bundle, prior_facts = chain.bundle(), _prior_facts_stats(store, ctx, prior, shard, chain)
        compactions = prior.compactions + (1 if prior.layers else 0)  # a chain of delta layers replaced
    else:
        prior_bundle, prior_facts, compactions = _prior_bundle(store, prior), _prior_facts_stats(store, ctx, prior, shard), 0
    bundle = pa.concat_tables([_without_users(prior_bundle, removed).cast(BUNDLE_SCHEMA), new_rows.cast(BUNDLE_SCHEMA)])
    bundle = bundle.sort_by([("user_id", "ascending")])
    report = _collisions(bundle)
    bundle = bundle.set_column(bundle.schema.get_field_index("cobatch_group"), BUNDLE_SCHEMA.field("cobatch_group"),
                               pa.array(_group_numbers(report, bundle.column("user_id").to_pylist()), pa.int32()))
    stored = _write(store, bundle_key, encode_bundle(bundle))
    facts = pa.concat_tables([_without_users(prior_facts, removed), _facts_rows([results])])
    facts = facts.sort_by([("user_id", "ascending"), ("fact_id", "ascending")])
    row_counts = pc.list_value_length(bundle.column("row_ids"))
    stats = {
        "facts": write_stats_part(store, "facts", facts),
        "users": write_stats_part(store, "users", _users_stats(bundle, facts, shard, row_counts)),
        "collisions": write_stats_part(store, "collisions", pa.concat_tables(
            [report.hot_rows, _scope_collisions(bundle, scope_deltas or {})])),
    }
    return dict(bundle_key=stored.key, bundle_sha256=stored.sha256, bundle_bytes=stored.bytes,
                users=bundle.num_rows, facts=_sum(bundle.column("num_facts")), rows=_sum(row_counts), stats=stats,
                layers=(), cobatch_groups=len(report.groups), compactions=compactions)


class _Chain:
    """A shard entry's delta chain, each object read (and verified) once."""

    def __init__(self, store, entry: ShardEntry):
        self.store, self.entry = store, entry
        self._layers: list[pa.Table] | None = None

    def layers(self) -> list[pa.Table]:
        if self._layers is None:
            self._layers = [load_layer(self.store, layer) for layer in self.entry.layers]
        return self._layers

    def bundle(self) -> pa.Table:
        return merge_bundle_chain(load_base_bundle(self.store, self.entry), self.layers())

    def stats(self, name: str, schema: pa.Schema) -> pa.Table:
        """Stats table ``name`` of the merged view: each part's rows of users no newer layer names."""
        keys = [self.entry.stats.get(name)] + [layer.stats.get(name) for layer in self.entry.layers]
        parts = [_read_part(self.store, key, schema) if key else schema.empty_table() for key in keys]
        later = [layer.column("user_id") for layer in self.layers()]
        kept = []
        for i, part in enumerate(parts):
            hiding = pa.chunked_array([c for layer in later[i:] for c in layer.chunks], pa.string())
            kept.append(_without_users(part, hiding.combine_chunks()) if len(hiding) else part)
        return pa.concat_tables(kept)


def _merged_users_stats(store, entry: ShardEntry) -> pa.Table:
    if "users" not in entry.stats:
        raise ValueError(f"shard {entry.shard}: no users stats part to layer on (the night compacts such shards)")
    return _Chain(store, entry).stats("users", USERS_STATS_SCHEMA)


def _read_part(store, key: str, schema: pa.Schema) -> pa.Table:
    return with_schema(pq.read_table(pa.BufferReader(store.get(key))), schema)


def with_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema``: its columns selected and cast, a nullable column it lacks (a part
    written before the column existed, e.g. ``facts.scope``) filled with nulls."""
    for field in schema:
        if field.name not in table.column_names and field.nullable:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names).cast(schema)


def _sum(values) -> int:
    return int(pc.sum(values).as_py() or 0)


def _bundle_rows(tables: list[pa.Table]) -> pa.Table:
    return pa.concat_tables([BUNDLE_SCHEMA.empty_table()] + [t.cast(BUNDLE_SCHEMA) for t in tables])


def _facts_rows(tables: list[pa.Table]) -> pa.Table:
    """``facts`` stats rows of fact results (pipeline.compile.RESULT_SCHEMA, or stats rows); a
    member's copy of a scope fact gets its ``scope`` from its detail (pipeline.scopes.SCOPE_DETAIL)."""
    return pa.concat_tables([FACTS_STATS_SCHEMA.empty_table()] + [with_schema(_scope_column(t), FACTS_STATS_SCHEMA)
                                                                  for t in tables])


def _scope_column(results: pa.Table) -> pa.Table:
    if "scope" in results.column_names or "detail" not in results.column_names:
        return results
    from pipeline.scopes import scope_of_detail

    return results.append_column("scope", scope_of_detail(results.column("detail")))


def _prior_bundle(store, prior: ShardEntry | ReshardedPrior | None) -> pa.Table:
    if isinstance(prior, ReshardedPrior):
        parts = [decode_bundle(store.get(k), source=f"{store.uri}/{k}") for k in prior.bundle]
        return pa.concat_tables([BUNDLE_SCHEMA.empty_table()] + parts).sort_by([("user_id", "ascending")])
    return load_shard_bundle(store, prior) if prior is not None else BUNDLE_SCHEMA.empty_table()


def _without_users(table: pa.Table, users: pa.Array) -> pa.Table:
    if len(users) == 0 or table.num_rows == 0:
        return table
    return table.filter(pc.invert(pc.is_in(table.column("user_id"), users)))


def _prior_facts_stats(store, ctx: NightContext, prior: ShardEntry | ReshardedPrior | None, shard: int,
                       chain: _Chain | None = None) -> pa.Table:
    """The shard's ``facts`` stats rows of the prior version, layers merged (a version-1 store kept
    one file per version: its rows of this shard's users are taken)."""
    if prior is None:
        return FACTS_STATS_SCHEMA.empty_table()
    if isinstance(prior, ReshardedPrior):
        parts = [pq.read_table(pa.BufferReader(store.get(k))) for k in prior.facts]
        return pa.concat_tables([FACTS_STATS_SCHEMA.empty_table()] + [with_schema(t, FACTS_STATS_SCHEMA) for t in parts])
    if "facts" in prior.stats:
        return (chain or _Chain(store, prior)).stats("facts", FACTS_STATS_SCHEMA)
    if ctx.prior_schema == 1 and ctx.prior_version is not None:
        keys = [k for k in store.list(stats_prefix("facts", ctx.prior_version)) if k.endswith(".parquet")]
    else:
        keys = []
    tables = [_read_part(store, k, FACTS_STATS_SCHEMA) for k in keys]
    if not tables:
        return FACTS_STATS_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    # version 1: keep this shard's users only
    users = pc.unique(table.column("user_id")).to_pylist()
    mine = pa.array([u for u in users if u is not None and shard_of(u, ctx.prior_num_shards) == shard], pa.string())
    return table.filter(pc.is_in(table.column("user_id"), mine))


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
