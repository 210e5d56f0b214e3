"""Forget a user: remove their rows and facts from every retained version, for good.

How a rewrite is represented. Manifests stay immutable and named by version, and CURRENT only
ever points at ``manifests/v<N>.json``. Forgetting re-issues every retained published version
that holds the user (or whose ``forgotten`` lacks them) as a *new version number*, above every
manifest on disk, in the same order as the originals::

    retained v3, v4, v5 (CURRENT), v6 (rolled back from)   ->   v7, v8, v9 (CURRENT), v10

Each rewrite has the original's content minus the user: the user's shard gets a new bundle
(the user's row dropped) and a new fact-state object (the user's facts dropped) under new
content addresses; every other shard is carried by reference; ``forgotten`` gains the user's
hash; ``parent`` points at the parent's rewrite. Stats partitions are copied to the new
version number without the user's rows. Then CURRENT moves to the rewrite of CURRENT with the
ordinary compare-and-swap, one ``forget_rewrite`` audit record per rewrite names it (so it
stays published and a roll-forward target stays one), one ``forget`` record maps old -> new,
and only then are the old manifests, every object no retained manifest references, the old
stats partitions and orphan manifests deleted.

Why new numbers rather than rewriting manifests in place:

- invariant 5 and the CAS hold unchanged: a rewrite is published exactly like a version
  (objects written and verified, manifest written with ``if_none_match``, one CAS), so a reader
  sees the old version or the new one, never a mix;
- serving nodes poll CURRENT; a new version is what tells them to pull the shard and drop the
  user from memory (an in-place rewrite would leave CURRENT's etag unchanged);
- "rollback to every retained version shows the user nowhere" holds because every version a
  rollback can reach is a rewrite (the originals are gone) and each carries the forget, so
  ``rollback``'s own check (targets must carry every forget of CURRENT) never refuses them;
- a rollback to an old number says the version was collected; the ``forget`` audit record
  says what it became (``rewritten``).

A version that was published by the nightly's own ``forget_user`` op but still holds the
user's data in an *older* version is scrubbed the same way when ``engram forget`` runs.
Run forget (like gc) from the same scheduler as the nightly, not concurrently with it: a
concurrent publish makes the CAS fail and forget retries against the new CURRENT.
"""

from __future__ import annotations

import io
import json
import logging
import re
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engram_core.text import canonical_id
from schemas.bundle import decode_bundle, encode_bundle
from schemas.facts import decode_fact_state, encode_fact_state
from schemas.manifest import Manifest, ShardEntry, manifest_key
from versions.catalog import (
    list_versions,
    manifest_versions_on_disk,
    read_manifest,
    read_pointer,
    verified_bytes,
)
from versions.commit import append_audit, swap_current, write_manifest, write_verified_objects
from versions.errors import PublishConflict, PublishError
from versions.layout import OBJECT_PREFIXES, PARTIAL_PREFIX, forgotten_id, shard_of
from versions.publish import ShardPayload, shard_entry_for
from versions.store import ObjectStore

log = logging.getLogger(__name__)

_STATS_KEY = re.compile(r"^stats/([^/]+)/version=(\d+)/(.+)$")
ATTEMPTS = 3


@dataclass(frozen=True)
class ForgetReport:
    user_hash: str  # sha256 of the user_id, as recorded in manifests and audit
    found: bool
    current_version: int | None  # CURRENT after the forget
    rewritten: dict[int, int] = field(default_factory=dict)  # old version -> its rewrite
    deleted_objects: tuple[str, ...] = ()
    message: str = ""

    def to_dict(self) -> dict:
        return {"user_hash": self.user_hash, "found": self.found, "current_version": self.current_version,
                "rewritten": {str(k): v for k, v in self.rewritten.items()},
                "deleted_objects": list(self.deleted_objects), "message": self.message}


# ------------------------------------------------------------------------- scanning


def _holds_user(table: pa.Table, user_id: str) -> bool:
    if "user_id" in table.column_names and pc.any(pc.equal(table.column("user_id"), user_id)).as_py():
        return True
    if "example_owners" in table.column_names:
        flat = pc.list_flatten(table.column("example_owners"))
        return bool(pc.any(pc.or_(pc.equal(flat, user_id), pc.starts_with(flat, user_id + "/"))).as_py())
    return False


def scan_for_user(store: ObjectStore, user_id: str) -> list[str]:
    """Keys of every object that still holds ``user_id``: Parquet rows (``user_id`` columns,
    ``example_owners`` lists) in bundles, fact state and stats, or the raw id as a JSON string in
    any other object (manifests, CURRENT, audit). Reads the whole store: an audit tool."""
    needle = json.dumps(user_id).encode()
    holding = []
    for key in store.list(""):
        data = store.get(key)
        if key.endswith(".parquet"):
            if _holds_user(pq.read_table(pa.BufferReader(data)), user_id):
                holding.append(key)
        elif needle in data:
            holding.append(key)
    return holding


# ------------------------------------------------------------------------- rewriting


def _without_user(table: pa.Table, user_id: str) -> pa.Table:
    if "user_id" in table.column_names:
        table = table.filter(pc.invert(pc.fill_null(pc.equal(table.column("user_id"), user_id), False)))
    if "example_owners" in table.column_names:
        lists = table.column("example_owners").to_pylist()
        kept = [None if ls is None else [o for o in ls if o != user_id and not o.startswith(user_id + "/")]
                for ls in lists]
        index = table.column_names.index("example_owners")
        table = table.set_column(index, table.schema.field(index), pa.array(kept, table.schema.field(index).type))
    return table


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def _stats_keys(store: ObjectStore) -> dict[int, list[str]]:
    """version -> its stats object keys (``stats/<table>/version=<N>/...``)."""
    out: dict[int, list[str]] = {}
    for key in store.list("stats/"):
        if m := _STATS_KEY.match(key):
            out.setdefault(int(m.group(2)), []).append(key)
    return out


class _Rewriter:
    """Rewrites of one user's shard objects, shared between versions that share objects."""

    def __init__(self, store: ObjectStore, user_id: str):
        self.store, self.user_id = store, user_id
        self.objects: dict[str, bytes] = {}  # new content-addressed objects to write
        self._entries: dict[tuple[str, str, int], ShardEntry | None] = {}

    def shard(self, entry: ShardEntry) -> ShardEntry | None:
        """The entry without the user, or None if the shard does not hold them."""
        memo = (entry.bundle_key, entry.state_key, entry.shard)
        if memo not in self._entries:
            self._entries[memo] = self._rewrite(entry)
        return self._entries[memo]

    def _rewrite(self, entry: ShardEntry) -> ShardEntry | None:
        store = self.store
        bundle_bytes = verified_bytes(store, entry.bundle_key, entry.bundle_bytes, entry.bundle_sha256)
        state_bytes = verified_bytes(store, entry.state_key, entry.state_bytes, entry.state_sha256)
        bundle = decode_bundle(bundle_bytes, source=f"{store.uri}/{entry.bundle_key}")
        state = decode_fact_state(state_bytes, source=f"{store.uri}/{entry.state_key}")
        if not (_holds_user(bundle, self.user_id) or _holds_user(state, self.user_id)):
            return None
        payload = ShardPayload(encode_bundle(_without_user(bundle, self.user_id)),
                               encode_fact_state(_without_user(state, self.user_id)))
        new = shard_entry_for(entry.shard, payload, f"forget on {store.uri}")
        self.objects[new.bundle_key] = payload.bundle
        self.objects[new.state_key] = payload.state
        return new


@dataclass
class _Plan:
    pointer: object
    retained: list[Manifest]
    to_rewrite: list[Manifest]
    shards: dict[int, dict[int, ShardEntry]]  # old version -> shard -> rewritten entry
    stats_hit: set[int]  # versions whose stats hold the user
    stats_keys: dict[int, list[str]]
    listed_objects: list[str]
    orphans: list[int]


def _plan(store: ObjectStore, user_id: str, rewriter: _Rewriter) -> _Plan | None:
    pointer = read_pointer(store)
    listed_objects = [k for p in OBJECT_PREFIXES for k in store.list(p)]
    stats_keys = _stats_keys(store)
    if pointer is None:
        return None
    published = [info.version for info in list_versions(store)]
    orphans = sorted(set(manifest_versions_on_disk(store)) - set(published))
    retained = [read_manifest(store, v) for v in published]
    user_hash = forgotten_id(user_id)
    shards: dict[int, dict[int, ShardEntry]] = {}
    stats_hit = set()
    for manifest in retained:
        shard = shard_of(user_id, manifest.num_shards)
        new = rewriter.shard(manifest.shard(shard))
        if new is not None:
            shards[manifest.version] = {shard: new}
        if any(_holds_user(pq.read_table(pa.BufferReader(store.get(k))), user_id)
               for k in stats_keys.get(manifest.version, []) if k.endswith(".parquet")):
            stats_hit.add(manifest.version)
    holding = set(shards) | stats_hit
    if not holding:
        return _Plan(pointer, retained, [], {}, set(), stats_keys, listed_objects, orphans)
    to_rewrite = [m for m in retained
                  if m.version in holding or user_hash not in m.forgotten or m.version == pointer.version]
    return _Plan(pointer, retained, to_rewrite, shards, stats_hit, stats_keys, listed_objects, orphans)


def _rewrite_stats(store: ObjectStore, user_id: str, keys: list[str], new_version: int,
                   new_entries: dict[int, ShardEntry]) -> dict[str, str]:
    """Copy a version's stats partitions to ``new_version`` without the user; returns table -> prefix."""
    prefixes = {}
    for key in keys:
        table_name, _, rest = _STATS_KEY.match(key).groups()
        new_key = f"stats/{table_name}/version={new_version}/{rest}"
        data = store.get(key)
        if key.endswith(".parquet"):
            table = _without_user(pq.read_table(pa.BufferReader(data)), user_id)
            if table_name == "shards":
                table = _updated_shard_stats(table, new_entries)
            data = _parquet_bytes(table)
        store.put(new_key, data)
        prefixes[table_name] = f"stats/{table_name}/version={new_version}/"
    return prefixes


def _updated_shard_stats(table: pa.Table, new_entries: dict[int, ShardEntry]) -> pa.Table:
    if not new_entries or "shard" not in table.column_names:
        return table
    rows = table.to_pylist()
    for row in rows:
        entry = new_entries.get(row["shard"])
        if entry is not None:
            row.update(users=entry.users, facts=entry.facts, rows=entry.rows, bytes=entry.bundle_bytes,
                       bundle_key=entry.bundle_key)
    return pa.Table.from_pylist(rows, schema=table.schema)


def forget_user(store: ObjectStore, user_id: str, *, actor: str, reason: str) -> ForgetReport:
    """Remove ``user_id`` from every retained version (see the module docstring). The id is read
    in canonical form (:func:`engram_core.text.canonical_id`), as ingest stores ids: ``u-sam``
    with a zero-width space or a byte-order mark forgets ``u-sam``."""
    user_id = canonical_id(user_id)
    if not user_id:
        raise ValueError("forget: user_id must be non-empty")
    if not actor or not reason:
        raise ValueError("forget: actor and reason are required (they go into the audit log)")
    # Compiled chunks of an unfinished night may hold the user's rows: they are only a cache.
    for key in store.list(PARTIAL_PREFIX):
        store.delete(key)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _forget_once(store, user_id, actor=actor, reason=reason)
        except PublishConflict as err:
            if attempt == ATTEMPTS:
                raise PublishError(f"forget on {store.uri}: CURRENT kept moving ({err}); run forget again "
                                   "when no publish is in progress") from err
            log.warning("forget on %s: %s; retrying against the new CURRENT", store.uri, err)
    raise AssertionError("unreachable")


def _forget_once(store: ObjectStore, user_id: str, *, actor: str, reason: str) -> ForgetReport:
    user_hash = forgotten_id(user_id)
    rewriter = _Rewriter(store, user_id)
    plan = _plan(store, user_id, rewriter)
    if plan is None or not plan.to_rewrite:
        current = plan.pointer.version if plan is not None else None
        message = (f"user not found: no retained version of {store.uri} holds this user; nothing to forget")
        append_audit(store, "forget", actor=actor, reason=reason, forgotten=user_hash, found=False)
        return ForgetReport(user_hash, False, current, message=message)

    write_verified_objects(store, rewriter.objects)
    mapping: dict[int, int] = {}
    rewrites: list[Manifest] = []
    next_version = max(manifest_versions_on_disk(store)) + 1
    retained_versions = {m.version for m in plan.retained}
    for old in plan.to_rewrite:  # ascending: parents are rewritten before their children
        new_entries = plan.shards.get(old.version, {})
        shards = tuple(new_entries.get(e.shard, e) for e in old.shards)
        if old.parent in mapping:
            parent = mapping[old.parent]
        else:
            parent = old.parent if old.parent in retained_versions else None
        stats = _rewrite_stats(store, user_id, plan.stats_keys.get(old.version, []), next_version, new_entries)
        draft = replace(old, version=next_version, parent=parent, shards=shards,
                        forgotten=tuple(sorted(set(old.forgotten) | {user_hash})),
                        stats=stats or _renumbered(old.stats, old.version, next_version),
                        job_id=f"forget:{old.job_id}"[:200])
        written = write_manifest(store, draft, plan.pointer)
        if written.version != next_version:  # a competitor took the number: our stats are misnamed
            raise PublishConflict(f"{store.uri}: version {next_version} was taken during the forget")
        mapping[old.version] = written.version
        rewrites.append(written)
        next_version = written.version + 1

    new_current = read_manifest(store, mapping[plan.pointer.version])
    swap_current(store, new_current, plan.pointer.etag)
    for old_version, new_version in mapping.items():
        append_audit(store, "forget_rewrite", actor=actor, version=new_version, rewrites=old_version,
                     forgotten=user_hash)
    deleted = _delete_unreferenced(store, plan, mapping)
    append_audit(store, "forget", actor=actor, reason=reason, forgotten=user_hash, found=True,
                 version=new_current.version, rewritten={str(k): v for k, v in mapping.items()},
                 deleted_objects=len(deleted))
    log.info("forget on %s: rewrote %d version(s), CURRENT v%d -> v%d, deleted %d object(s)",
             store.uri, len(mapping), plan.pointer.version, new_current.version, len(deleted))
    return ForgetReport(user_hash, True, new_current.version, dict(mapping), tuple(deleted),
                        message=f"forgot the user in {len(mapping)} version(s); CURRENT is v{new_current.version}")


def _renumbered(stats: dict[str, str], old: int, new: int) -> dict[str, str]:
    return {t: p.replace(f"/version={old}/", f"/version={new}/") for t, p in stats.items()}


def references(manifests: list[Manifest]) -> set[str]:
    """Object keys (bundles, state) the manifests reference."""
    return {key for m in manifests for e in m.shards for key in (e.bundle_key, e.state_key)}


def _delete_unreferenced(store: ObjectStore, plan: _Plan, mapping: dict[int, int]) -> list[str]:
    """Old manifests and stats of rewritten versions, orphans, and objects nothing retained references."""
    kept = [read_manifest(store, v) for v in sorted(
        {mapping.get(m.version, m.version) for m in plan.retained})]
    kept_versions = {m.version for m in kept}
    referenced = references(kept)
    deleted = []
    for version in sorted(set(mapping) | set(plan.orphans)):
        if version not in kept_versions:
            store.delete(manifest_key(version))
            deleted.append(manifest_key(version))
    for version, keys in sorted(plan.stats_keys.items()):
        if version not in kept_versions:
            for key in keys:
                store.delete(key)
                deleted.append(key)
    for key in plan.listed_objects:
        if key not in referenced:
            store.delete(key)
            deleted.append(key)
    return deleted
