"""Forget users: remove their rows and facts from every retained version, for good.

How a rewrite is represented. Manifests stay immutable and named by version, and CURRENT only
ever points at ``manifests/v<N>.json``. Forgetting re-issues every retained published version
that holds the user (or whose ``forgotten`` lacks them) as a *new version number*, above every
manifest on disk, in the same order as the originals::

    retained v3, v4, v5 (CURRENT), v6 (rolled back from)   ->   v7, v8, v9 (CURRENT), v10

Each rewrite has the original's content minus the users: in each user's shard, every object of
the chains that holds them is rewritten without their rows under a new content address (the
base bundle, each delta layer; a layer left empty is dropped, and the layers above a rewritten
object are re-encoded because a layer names the object it applies on), the fact state and state
layers without their facts, the tombstones without their delete tombstones, a forget tombstone
holding only the hash of the id added to the newest tombstones object (so that no late event
brings them back), and new stats parts without their rows; every other shard is carried by
reference; ``forgotten`` gains the users'
hashes; ``parent`` points at the parent's rewrite. Version-level stats parts (rejects) that hold
a user are rewritten too. Then CURRENT moves to the rewrite of CURRENT with the ordinary
compare-and-swap, one ``forget_rewrite`` audit record per rewrite names it (so it stays
published and a roll-forward target stays one), one ``forget`` record maps old -> new, and only
then are the old manifests, orphan manifests, and every object that held a forgotten user and no
kept manifest references deleted. Objects nothing references for other reasons (those a night
in progress has written and not yet committed) are left to gc; those no manifest names that may
hold a user are recorded before they are deleted (:data:`FORGET_DELETES`), so a night beside the
forget fails with one line rather than on a missing object.

All users of one call are forgotten in one rewrite of the retained versions (the nightly passes
all of one night's ``forget_user`` events at once).

A shared scope whose id is a forgotten user's (user ``acme``, and other users' facts of scope
``acme``) is another owner and is kept: the scope objects, the scope's own ``facts`` rows
(``scope`` = ``user_id``) and the scope named first in a ``user+scope`` collision are never taken
for the user's; the user's copies of scope facts (its own rows) go with the user, from the fact
state and from the scope state (its shard's rows computed again without them). A scope whose merged
facts that changes was compiled from the user's text: its delta is dropped from the rewrite, which
names it ``stale`` for the next night to compile, and the own deltas of the users holding it as an
extra scope (compiled jointly with its merged facts) are emptied, their bundle rows and stats rows
kept, marked (see :meth:`_Rewriter.scopes`, :meth:`_Rewriter.shard`).

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
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engram_core.text import canonical_id
from schemas.bundle import encode_bundle, encode_layer, layer_fingerprint, layer_parts, merge_bundle_chain
from schemas.facts import (
    FUTURE_TOLERANCE,
    MAX_ID_CHARS,
    OP_FORGET_USER,
    TIMESTAMP,
    TOMBSTONE_SCHEMA,
    decode_fact_state,
    encode_fact_state,
    encode_tombstones,
    id_problem,
    merge_state_chain,
)
from schemas.manifest import (
    MANIFEST_SCHEMA_VERSION,
    Manifest,
    ManifestError,
    ScopesEntry,
    ShardEntry,
    StateLayer,
    bundle_key,
    layer_key,
    manifest_key,
    scope_state_key,
    scopes_key,
    state_key,
    stats_part_key,
    tombstones_key,
)
from versions.catalog import (
    load_base_bundle,
    load_base_tombstones,
    load_layer,
    load_shard_state_bytes,
    load_state_layer,
    manifest_inventory,
    manifest_versions_on_disk,
    published_among,
    read_audit,
    read_manifest,
    read_pointer,
)
from versions.commit import (
    append_audit,
    swap_current,
    write_manifest,
    write_verified_objects,
)
from versions.errors import PublishConflict, PublishError
from versions.layout import PARTIAL_PREFIX, forgotten_id, is_collectable, shard_hash, shard_of
from versions.store import ObjectStore

log = logging.getLogger(__name__)

ATTEMPTS = 3
_USER_TABLES = ("facts", "users", "collisions", "rejects")  # stats tables that can name a user


@dataclass(frozen=True)
class ForgetReport:
    user_hashes: tuple[str, ...]  # sha256 of each user_id, as recorded in manifests and audit
    found: bool  # some retained version held one of the users
    current_version: int | None  # CURRENT after the forget
    rewritten: dict[int, int] = field(default_factory=dict)  # old version -> its rewrite
    deleted_objects: tuple[str, ...] = ()
    message: str = ""
    refused_until: str | None = None
    """ISO time of the forget tombstones (found users): later nights refuse the users' events
    stamped up to it (FORGOTTEN_USER); an event after it is the id writing again."""
    found_hashes: tuple[str, ...] = ()
    """The hashes (of ``user_hashes``) of the users some retained version held: per user, ``found``."""
    recorded_until: dict[str, str] = field(default_factory=dict)
    """user hash -> ISO time of a forget CURRENT already held for it (a forget given again): later
    nights refuse its events up to it. ``refused_until`` is then the latest of them."""

    @property
    def user_hash(self) -> str:
        return self.user_hashes[0]

    def to_dict(self) -> dict:
        out = {"user_hashes": list(self.user_hashes), "found": self.found, "current_version": self.current_version,
               "rewritten": {str(k): v for k, v in self.rewritten.items()},
               "deleted_objects": list(self.deleted_objects), "message": self.message,
               "refused_until": self.refused_until}
        if len(self.user_hashes) == 1:
            out["user_hash"] = self.user_hash
        return out


# ------------------------------------------------------------------------- scanning


def _is_user(values: pa.Array | pa.ChunkedArray, users: pa.Array) -> pa.Array:
    return pc.fill_null(pc.is_in(values, users), False)


# A user and a shared scope may have the same id (user "acme", and members' facts of scope "acme"):
# they are two owners, and forgetting the user never touches the scope. Where a scope id sits in a
# column that otherwise names users:
SCOPE_OBJECT_PREFIXES = ("objects/scopes/", "objects/scope_state/")
"""Version-level scope objects (pipeline.scopes): the scope deltas (a bundle whose ``user_id`` is
the scope id) and the scope state (no user id). They never name a user, but the scope state holds
the members' copies of scope facts (texts, fact ids, times) and the scope deltas are compiled from
them: a forget computes them again without its users' copies (:meth:`_Rewriter.scopes`)."""
_OWNER_KIND_USER_SCOPE = "user+scope"  # pipeline.collisions.OWNER_KIND_USER_SCOPE: example_owners[0] is the scope


def _scope_rows(table: pa.Table) -> pa.Array | None:
    """Rows of a ``facts`` stats part that are a shared scope's own (pipeline.scopes.write_scopes
    writes them with ``user_id`` = ``scope`` = the scope id; a user's own facts have ``scope``
    null and its copies of a scope's facts that scope, never its own id); None for other tables.
    The fact state is not such a table: there a row with ``scope`` = its user is a personal fact."""
    names = set(table.column_names)
    if not {"user_id", "status", "scope"} <= names or "trigger" in names:
        return None
    return pc.fill_null(pc.equal(table.column("scope"), table.column("user_id")), False)


def _user_rows(table: pa.Table, users: pa.Array) -> pa.Array:
    """Per row: it holds one of ``users``' data (its ``user_id``, not a scope's own row of the same id)."""
    mask = _is_user(table.column("user_id"), users)
    scope = _scope_rows(table)
    return mask if scope is None else pc.and_(mask, pc.invert(scope))


def _user_owner_lists(table: pa.Table) -> list[tuple[list[str], list[str]]]:
    """Per collisions row, (owners kept as they are, owner names that may be users): the first
    owner of a ``user+scope`` row is the scope (pipeline.collisions.scope_collision_table), never a
    user of the same id."""
    lists = table.column("example_owners").to_pylist()
    kinds = table.column("owner_kind").to_pylist() if "owner_kind" in table.column_names else [None] * len(lists)
    out = []
    for owners, kind in zip(lists, kinds):
        owners = owners or []
        out.append((owners[:1], owners[1:]) if kind == _OWNER_KIND_USER_SCOPE else ([], owners))
    return out


def _owner_names(owner: str | None, names: set[str]) -> bool:
    """Whether a collision owner name is one of ``names`` or a ``user/fact`` name of one. A user id
    may itself hold "/" (``org/alice``), so every prefix ending before a "/" is tried: forgetting
    ``org`` also drops ``org/alice/f1`` from the examples (more than needed, never less)."""
    if owner is None:
        return False
    if owner in names:
        return True
    cut = owner.find("/")
    while cut != -1:
        if owner[:cut] in names:
            return True
        cut = owner.find("/", cut + 1)
    return False


def _users_held(table: pa.Table, users: pa.Array) -> set[str]:
    """Which of ``users`` the table holds data of (as :func:`_holds_users` finds it)."""
    held: set[str] = set()
    if "user_id" in table.column_names and table.num_rows:
        held |= set(pc.unique(table.column("user_id").filter(_user_rows(table, users))).to_pylist())
    if "example_owners" in table.column_names and table.num_rows:
        names = set(users.to_pylist())
        owners = {o for _, maybe_users in _user_owner_lists(table) for o in maybe_users if _owner_names(o, names)}
        held |= {n for n in names if any(_owner_names(o, {n}) for o in owners)}
    return held


def _holds_users(table: pa.Table, users: pa.Array) -> bool:
    if "user_id" in table.column_names and table.num_rows and pc.any(_user_rows(table, users)).as_py():
        return True
    if "example_owners" in table.column_names and table.num_rows:
        names = set(users.to_pylist())
        return any(_owner_names(o, names) for _, maybe_users in _user_owner_lists(table) for o in maybe_users)
    return False


def scan_for_user(store: ObjectStore, user_id: str) -> list[str]:
    """Keys of every object that still holds ``user_id``: Parquet rows (``user_id`` columns,
    ``example_owners`` lists) in bundles, fact state, tombstones and stats, or the raw id as a
    JSON string in any other object (manifests, CURRENT, audit). A shared scope of the same id is
    not the user: the scope objects, a scope's own ``facts`` rows and the scope named first in a
    ``user+scope`` collision do not count. Reads the whole store: an audit tool."""
    needle = json.dumps(user_id).encode()
    users = pa.array([user_id], pa.string())
    holding = []
    for key in store.list(""):
        if key.startswith(SCOPE_OBJECT_PREFIXES):
            continue
        data = store.get(key)
        if key.endswith(".parquet"):
            if _holds_users(pq.read_table(pa.BufferReader(data)), users):
                holding.append(key)
        elif needle in data:
            holding.append(key)
    return holding


# ------------------------------------------------------------------------- rewriting


def _emptied(table: pa.Table, holders: pa.Array) -> pa.Table:
    """A bundle or layer with the deltas of ``holders`` emptied (no rows, no values; the row, its
    ``num_facts``, co-batch group and ``scope`` kept), as a night writes a member whose own delta
    is empty; a layer's tombstone rows are left as they are."""
    if not len(holders) or not table.num_rows:
        return table
    mine = _is_user(table.column("user_id"), holders)
    if "tombstone" in table.column_names:
        mine = pc.and_(mine, pc.invert(table.column("tombstone")))
    if not pc.any(mine).as_py():
        return table
    for name in ("layers", "row_ids", "values"):
        i = table.column_names.index(name)
        field_ = table.schema.field(i)
        empty = pa.scalar(b"", field_.type) if name == "values" else \
            pa.array([[]] * table.num_rows, field_.type)
        table = table.set_column(i, field_, pc.if_else(mine, empty, table.column(i)))
    return table


def _marked_holders(facts: pa.Table, holders: Mapping[str, tuple[str, ...]]) -> pa.Table:
    """A ``facts`` part with the rows of the holders' own deltas (``scope`` null: their own facts
    and their copies of extra scopes' facts) given status ``scope_stale`` and a detail naming the
    stale scopes (:func:`pipeline.stats.scope_stale_holder_detail`); their first scope's copies
    (``scope`` set) are served as before and keep their status."""
    from pipeline.stats import SCOPE_STALE, scope_stale_holder_detail

    if not holders or not facts.num_rows:
        return facts
    mine = pc.and_(_is_user(facts.column("user_id"), pa.array(sorted(holders), pa.string())),
                   pc.is_null(facts.column("scope")))
    details = pa.array([scope_stale_holder_detail(holders[u]) if u in holders else None
                        for u in facts.column("user_id").to_pylist()], pa.string())
    for name, value in (("status", pa.scalar(SCOPE_STALE, pa.string())), ("detail", details)):
        i = facts.column_names.index(name)
        facts = facts.set_column(i, facts.schema.field(i),
                                 pc.if_else(mine, value, facts.column(i)).cast(facts.schema.field(i).type))
    return facts


def _ok_counts(facts: pa.Table, users: pa.Array) -> dict[str, int]:
    """user -> its ``ok`` rows in a ``facts`` part, for ``users``."""
    ok = facts.filter(pc.and_(_is_user(facts.column("user_id"), users), pc.equal(facts.column("status"), "ok")))
    counts = ok.group_by("user_id").aggregate([("fact_id", "count")])
    return dict(zip(counts.column("user_id").to_pylist(), counts.column("fact_id_count").to_pylist()))


def _without_users(table: pa.Table, users: pa.Array) -> pa.Table:
    if "user_id" in table.column_names and table.num_rows:
        table = table.filter(pc.invert(_user_rows(table, users)))
    if "example_owners" in table.column_names and table.num_rows:
        index = table.column_names.index("example_owners")
        lists = table.column("example_owners").to_pylist()
        names = set(users.to_pylist())
        kept = [None if ls is None else fixed + [o for o in maybe if not _owner_names(o, names)]
                for ls, (fixed, maybe) in zip(lists, _user_owner_lists(table))]
        table = table.set_column(index, table.schema.field(index), pa.array(kept, table.schema.field(index).type))
    return table


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", use_dictionary=False)
    return sink.getvalue()


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


class _Rewriter:
    """Rewrites of the users' shard objects and stats parts, shared between versions that share them."""

    def __init__(self, store: ObjectStore, users: Sequence[str], forgotten_at: Mapping[str, datetime]):
        self.store = store
        self.users = pa.array(sorted(set(users)), pa.string())
        self.forgotten_at = forgotten_at
        self.objects: dict[str, bytes] = {}  # new content-addressed objects to write
        self.held: set[str] = set()  # keys of objects that hold a user's data
        self.found: set[str] = set()  # the users whose data some of those held
        self.superseded: set[str] = set()  # other keys the rewrites replace (tombstones without the user)
        self._entries: dict[tuple, ShardEntry] = {}
        self._parts: dict[tuple, str] = {}  # see part and stats
        self.erased: dict[tuple, tuple[str, ...]] = {}  # a shard entry's object keys -> the users erased from it
        self._states: dict[tuple, list] = {}  # see _state_objects
        self._scopes: dict[tuple, tuple] = {}  # see scopes

    def _keep(self, key_of, data: bytes) -> tuple[str, str, int]:
        sha = _sha(data)
        key = key_of(sha)
        self.objects[key] = data
        return key, sha, len(data)

    def part(self, key: str, users: pa.Array | None = None, holders: Mapping[str, tuple[str, ...]] | None = None) -> str:
        """A stats part without ``users`` (default: all the forget's users; a new key), or the same
        key if it holds none of them. ``holders`` (user -> the stale scopes it holds as an extra
        scope; their own delta was emptied, :meth:`shard`): their ``facts`` rows of that delta are
        marked (:func:`_marked_holders`) and their names leave the ``collisions`` examples (they
        write no row); see :meth:`stats` for their ``users`` rows."""
        users = self.users if users is None else users
        name = key.split("/")[1]
        holders = dict(holders or {}) if name in ("facts", "collisions") else {}
        memo = (key, tuple(users.to_pylist()), tuple(sorted(holders.items())))
        if memo not in self._parts:
            names = pa.array(sorted(holders), pa.string())
            table = pq.read_table(pa.BufferReader(self.store.get(key))) if len(users) or holders else None
            if table is None or not _holds_users(table, pa.concat_arrays([users, names])):
                self._parts[memo] = key
            else:
                self.held.add(key)
                self.found |= _users_held(table, users)
                table = _without_users(table, users)
                table = _without_users(table, names) if name == "collisions" else _marked_holders(table, holders)
                self._parts[memo] = self._keep(lambda sha: stats_part_key(name, sha), _parquet_bytes(table))[0]
        return self._parts[memo]

    def stats(self, stats: Mapping[str, str], users: pa.Array, holders: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
        """A base's or layer's stats parts without ``users`` and with ``holders``' rows marked (see
        :meth:`part`); the holders' ``users`` rows say their own delta is empty (``rows``, ``bytes``
        0) and count in ``facts_ok`` only the ok facts served without it (their first scope's)."""
        out = {table: self.part(k, users, holders) for table, k in stats.items()}
        if not holders or "users" not in stats:
            return out
        memo = ("users of holders", out["users"], tuple(sorted(holders.items())), out.get("facts"))
        if memo not in self._parts:
            table = pq.read_table(pa.BufferReader(self.objects.get(out["users"]) or self.store.get(out["users"])))
            names = pa.array(sorted(holders), pa.string())
            mine = _is_user(table.column("user_id"), names)
            if not pc.any(mine).as_py():
                self._parts[memo] = out["users"]
            else:
                self.held.add(stats["users"])
                ok = {}
                if "facts" in out:
                    facts = pq.read_table(pa.BufferReader(self.objects.get(out["facts"]) or self.store.get(out["facts"])))
                    ok = _ok_counts(facts, names)
                counts = pa.array([ok.get(u, 0) for u in table.column("user_id").to_pylist()], pa.int64())
                for column, value in (("facts_ok", counts), ("rows", pa.scalar(0, pa.int64())),
                                      ("bytes", pa.scalar(0, pa.int64()))):
                    i = table.column_names.index(column)
                    table = table.set_column(i, table.schema.field(i),
                                             pc.if_else(mine, value, table.column(i)).cast(table.schema.field(i).type))
                self._parts[memo] = self._keep(lambda sha: stats_part_key("users", sha), _parquet_bytes(table))[0]
        out["users"] = self._parts[memo]
        return out

    def shards_part(self, keys: list[str], entries: tuple[ShardEntry, ...]) -> str:
        """The version-level ``shards`` stats part of a rewritten version: its rows again from the
        rewritten entries (users, facts, rows, bytes, keys), keeping whether that version compacted
        each shard. The old part holds no user; it is left to gc."""
        from pipeline.stats import encode_stats_part, shards_table

        old = pa.concat_tables([pq.read_table(pa.BufferReader(self.store.get(k))) for k in keys])
        compacted = dict(zip(old.column("shard").to_pylist(), old.column("compacted").to_pylist())) \
            if "compacted" in old.column_names else {}
        table = shards_table(list(entries), None)
        table = table.set_column(table.schema.get_field_index("compacted"), "compacted",
                                 pa.array([bool(compacted.get(e.shard, False)) for e in entries], pa.bool_()))
        key, data = encode_stats_part("shards", table)
        self.objects[key] = data
        return key

    def shard(self, entry: ShardEntry, users: list[str],
              holders: Mapping[str, tuple[str, ...]] | None = None) -> ShardEntry:
        """The entry with their forget tombstones, without the data of those ``users`` (all of this
        shard) that :meth:`erasable` finds written up to their forget, and with the delta of each
        other user of ``holders`` (user -> the stale scopes it holds as an extra scope) emptied:
        compiled jointly with those scopes' merged facts, which a forgotten user wrote (:meth:`scopes`),
        it cannot be kept in part. Their bundle rows stay (an empty delta, their first scope still
        named: serving composes that scope's delta under it, as for a member with no own delta), and
        so do their stats rows, marked (:meth:`stats`); their facts stay in the fact state, and the
        next night compiles them again."""
        holders = dict(holders or {})
        memo = (entry.object_keys(), tuple(users), tuple(sorted(holders.items())))
        if memo not in self._entries:
            nobody = pa.array([], pa.string())
            if not users:
                self._entries[memo] = replace(entry, **self._delta_chain(entry, nobody, holders),
                                              stats=self.stats(entry.stats, nobody, holders))
                return self._entries[memo]
            erase = self.erasable(entry, users)
            self.erased[entry.object_keys()] = tuple(sorted(set(self.erased.get(entry.object_keys(), ())) | set(erase)))
            self._entries[memo] = self._rewrite(entry, pa.array(erase, pa.string()), pa.array(users, pa.string()),
                                                holders)
        return self._entries[memo]

    def fact_state(self, entry: ShardEntry, erase: Sequence[str]) -> pa.Table:
        """The shard's merged fact state without the facts of ``erase`` (what :meth:`shard` leaves)."""
        objects = self._state_objects(entry)
        (state, tombstones, _, _), layers = objects[0], [(s, t) for s, t, _, _ in objects[1:]]
        merged = merge_state_chain(state, tombstones, layers)[0] if layers else state
        return merged.filter(pc.invert(_is_user(merged.column("user_id"), pa.array(sorted(erase), pa.string()))))

    def scopes(self, manifest: Manifest, erase: Mapping[int, Sequence[str]]) -> tuple[ScopesEntry | None,
                                                                                   dict[int, dict[str, tuple]]]:
        """The version's shared scopes without the copies of scope facts the users of ``erase``
        (shard -> the users erased there) carried, and per shard the other users whose own deltas
        must be emptied. The scope state's rows of those shards are computed again from their fact state without
        the users (pipeline.scopes.forget_scope_copies: as the shard's next apply would). A scope whose
        merged facts that changes was compiled from what a forgotten user wrote (its copy was the
        latest, or the only one): its delta and its own ``facts`` rows go, and the own deltas of
        the users holding it as an extra scope are to be emptied (compiled with its merged facts:
        returned per shard, holder -> the stale scopes it holds, for :meth:`shard`); the entry names
        it ``stale``, so the next night compiles it, its members and those users again. A scope
        whose last member went is dropped, as a night drops it."""
        from pipeline.scopes import SCOPE_STATE_SCHEMA, decode_scope_state, encode_scope_state, forget_scope_copies, \
            scope_copies, scope_state_version
        from schemas.bundle import decode_bundle
        from versions.catalog import verified_bytes

        entry, store = manifest.scopes, self.store
        shards = tuple(sorted((s, manifest.shard(s).object_keys(), tuple(sorted(users))) for s, users in erase.items()))
        memo = (entry.object_keys(), entry.stale, manifest.num_shards, shards)
        if memo in self._scopes:
            return self._scopes[memo]
        data = verified_bytes(store, entry.state_key, entry.state_bytes, entry.state_sha256)
        prior = decode_scope_state(data, source=f"{store.uri}/{entry.state_key}")
        legacy = scope_state_version(data) < 2
        states = {s: self.fact_state(manifest.shard(s), users) for s, users in erase.items()}
        forget = forget_scope_copies(prior, states, legacy)
        if forget.state.equals(prior.cast(SCOPE_STATE_SCHEMA)):
            self._scopes[memo] = (entry, {})
            return self._scopes[memo]
        self.held.add(entry.state_key)
        gone = pa.array(sorted(set(forget.stale) | set(forget.dropped)), pa.string())
        fields: dict = {}
        bundle = decode_bundle(verified_bytes(store, entry.key, entry.bytes, entry.sha256), source=f"{store.uri}/{entry.key}")
        if pc.any(pc.is_in(bundle.column("user_id"), gone)).as_py():
            self.held.add(entry.key)
            bundle = bundle.filter(pc.invert(pc.is_in(bundle.column("user_id"), gone)))
            key, sha, size = self._keep(scopes_key, encode_bundle(bundle))
            fields |= dict(key=key, sha256=sha, bytes=size,
                           rows=int(pc.sum(pc.list_value_length(bundle.column("row_ids"))).as_py() or 0))
        stats = dict(entry.stats)
        if "facts" in stats:  # the scopes' own rows (user_id = scope = the scope id)
            facts = pq.read_table(pa.BufferReader(store.get(stats["facts"])))
            mine = pc.is_in(facts.column("user_id"), gone)
            if pc.any(mine).as_py():
                self.held.add(stats["facts"])
                facts = facts.filter(pc.invert(mine))
                stats["facts"] = self._keep(lambda sha: stats_part_key("facts", sha), _parquet_bytes(facts))[0]
                fields |= dict(facts=facts.num_rows, stats=stats)
        drop: dict[int, dict[str, tuple[str, ...]]] = {}  # shard -> holder -> the stale scopes it holds
        stale = pa.array(forget.stale, pa.string())
        holder_shards = prior.filter(pc.is_in(prior.column("scope"), stale)).column("shard").to_pylist()
        forgotten = set(self.users.to_pylist())
        for shard in sorted(set(holder_shards)):
            state = states[shard] if shard in states else self.fact_state(manifest.shard(shard), ())
            copies = scope_copies(state.select(["user_id", "fact_id", "scope"]))
            extra = copies.filter(pc.and_(pc.invert(copies.column("composed")), pc.is_in(copies.column("scope"), stale)))
            held: dict[str, set[str]] = {}
            for user, scope in zip(extra.column("user_id").to_pylist(), extra.column("scope").to_pylist()):
                if user not in forgotten:
                    held.setdefault(user, set()).add(scope)
            if held:
                drop[shard] = {user: tuple(sorted(scopes)) for user, scopes in sorted(held.items())}
        left = set(pc.unique(forget.state.column("scope")).to_pylist())
        marked = tuple(sorted((set(entry.stale) | set(forget.stale)) & left))  # a scope no one carries needs nothing
        if forget.scopes == 0 and not marked:
            self._scopes[memo] = (None, drop)  # no scope has a member left (as a night writes it)
            return self._scopes[memo]
        state_bytes = encode_scope_state(forget.state, 1 if legacy else 2)
        key, sha, size = self._keep(scope_state_key, state_bytes)
        new = replace(entry, **fields, state_key=key, state_sha256=sha, state_bytes=size, scopes=forget.scopes,
                      members=forget.members, stale=marked)
        self._scopes[memo] = (new, drop)
        return self._scopes[memo]

    def erasable(self, entry: ShardEntry, users: list[str]) -> list[str]:
        """The users of ``users`` (of this shard) that have data here written up to their forget's
        time: a fact, or a delete tombstone naming them. A user whose every event here is later
        than the forget wrote again after it (a ``forget_user`` event stamped before the user's
        facts: a replayed old forget, a device clock at the epoch): that data stays, as ingest
        keeps it; the forget only records its tombstone. A user with no fact rows here to date its
        other objects by (deltas, stats) is erased. A shard's deltas cannot be recompiled here, so
        a user with any data up to the forget is erased whole from that version (its later facts
        too: the night's own version keeps those). An ``engram forget`` is stamped a day ahead of
        now, so every user's data is erased."""
        objects = self._state_objects(entry)
        states = [state for state, _, _, _ in objects]
        tombstones = [removed for _, removed, _, _ in objects]
        out = []
        for user in users:
            limit = pa.scalar(self.forgotten_at[user], TIMESTAMP)
            times = [t.column("event_time").filter(_is_user(t.column("user_id"), pa.array([user], pa.string())))
                     for t in states + tombstones if t.num_rows]
            facts = sum(len(t) for t in times[:sum(1 for t in states if t.num_rows)])
            early = any(len(t) and pc.any(pc.less_equal(t, limit)).as_py() for t in times)
            if early or not facts:  # no fact rows to date the shard's other objects by: erased, to be safe
                out.append(user)
        return out

    def _state_objects(self, entry: ShardEntry) -> list[tuple[pa.Table, pa.Table, str, str | None]]:
        """(facts, tombstones, state key, tombstones key) of the entry's base state and each state
        layer, verified; read once per entry (:meth:`erasable` and :meth:`_state_chain` both need them)."""
        key = (entry.state_key, entry.tombstones_key, entry.state_layers)
        if key not in self._states:
            store = self.store
            objects = [(decode_fact_state(load_shard_state_bytes(store, entry)), load_base_tombstones(store, entry),
                        entry.state_key, entry.tombstones_key)]
            objects += [load_state_layer(store, layer) + (layer.state_key, layer.tombstones_key)
                        for layer in entry.state_layers]
            self._states[key] = objects
        return self._states[key]

    def _rewrite(self, entry: ShardEntry, erase: pa.Array, users: pa.Array,
                 holders: Mapping[str, tuple[str, ...]]) -> ShardEntry:
        new = replace(entry, **self._delta_chain(entry, erase, holders), **self._state_chain(entry, erase, users))
        return replace(new, stats=self.stats(entry.stats, erase, holders))

    def _delta_chain(self, entry: ShardEntry, users: pa.Array, holders: Mapping[str, tuple[str, ...]]) -> dict:
        """The base bundle and layers without the users (see the module docstring) and their stats
        rows, with the ``holders``' deltas emptied (:meth:`shard`), and the totals."""
        store = self.store
        names = pa.array(sorted(holders), pa.string())
        base = load_base_bundle(store, entry)
        fields: dict = {}
        if _holds_users(base, pa.concat_arrays([users, names])):
            self.held.add(entry.bundle_key)
            self.found |= _users_held(base, users)
            base = _emptied(_without_users(base, users), names)
            key, sha, size = self._keep(bundle_key, encode_bundle(base))
            fields = dict(bundle_key=key, bundle_sha256=sha, bundle_bytes=size)
        parent = fields.get("bundle_sha256", entry.bundle_sha256)
        changed = bool(fields)
        layers, tables = [], []
        for layer in entry.layers:
            table = load_layer(store, layer)
            holds = _holds_users(table, pa.concat_arrays([users, names]))
            if holds:
                self.held.add(layer.key)
                self.found |= _users_held(table, users)
                table = _emptied(_without_users(table, users), names)
            stats = self.stats(layer.stats, users, holders)
            if table.num_rows == 0:
                changed = True
                continue  # the layer held only these users: it goes
            if holds or parent != layer.parent_sha256:
                changed = True
                if not holds:
                    self.superseded.add(layer.key)  # the same rows over a rewritten parent
                key, sha, size = self._keep(layer_key, encode_layer(table, layer_fingerprint(table), parent))
                upserts, removed = layer_parts(table)
                layer = replace(layer, key=key, sha256=sha, bytes=size, parent_sha256=parent, users=upserts.num_rows,
                                tombstones=len(removed))
            layers.append(replace(layer, stats=stats))
            tables.append(table)
            parent = layer.sha256
        if not changed:
            return dict(layers=tuple(layers))
        merged = merge_bundle_chain(base, tables)
        rows = int(pc.sum(pc.list_value_length(merged.column("row_ids"))).as_py() or 0)
        return fields | dict(layers=tuple(layers), users=merged.num_rows, rows=rows,
                             facts=int(pc.sum(merged.column("num_facts")).as_py() or 0))

    def _state_chain(self, entry: ShardEntry, erase: pa.Array, users: pa.Array) -> dict:
        """The base state and tombstones and the state layers without the facts and tombstones of
        ``erase``, and without the older forget tombstones of ``users``; one forget tombstone per
        user of ``users`` in the newest tombstones object."""
        hashes = pa.array([forgotten_id(u) for u in users.to_pylist()], pa.string())
        erased = pa.array([forgotten_id(u) for u in erase.to_pylist()], pa.string())
        objects = self._state_objects(entry)
        latest: dict[str, object] = {}
        for _, tombstones, _, _ in objects:
            forgets = tombstones.filter(pc.and_(pc.is_in(tombstones.column("user_hash"), hashes),
                                                pc.equal(tombstones.column("op"), OP_FORGET_USER)))
            for h, t in zip(forgets.column("user_hash").to_pylist(), forgets.column("event_time").to_pylist()):
                latest[h] = max(t, latest.get(h, t))
        kept = []
        for i, (state, tombstones, s_key, t_key) in enumerate(objects):
            newest = i == len(objects) - 1
            if _holds_users(state, erase):
                self.held.add(s_key)
                self.found |= _users_held(state, erase)
                state = _without_users(state, erase)
            # the erased users' tombstones (a delete's holds the raw id) and every older forget tombstone
            mine = pc.or_(pc.is_in(tombstones.column("user_hash"), erased),
                          pc.and_(pc.is_in(tombstones.column("user_hash"), hashes),
                                  pc.equal(tombstones.column("op"), OP_FORGET_USER)))
            if pc.any(mine).as_py():
                if _holds_users(tombstones, erase):  # a delete tombstone holds the raw id
                    self.held.add(t_key)
                    self.found |= _users_held(tombstones, erase)
                elif t_key is not None:
                    self.superseded.add(t_key)
                tombstones = tombstones.filter(pc.invert(mine))
            if newest:
                if t_key is not None:
                    self.superseded.add(t_key)
                tombstones = pa.concat_tables([tombstones.cast(TOMBSTONE_SCHEMA), self._forgets(users, latest)])
            if i and not newest and state.num_rows == 0 and tombstones.num_rows == 0:
                continue  # a state layer that held only these users goes
            kept.append((state, tombstones))
        parts = []
        for i, (state, tombstones) in enumerate(kept):
            part = self._keep(state_key, encode_fact_state(state))
            if i and tombstones.num_rows == 0:  # a state layer keeps no empty tombstones object
                parts.append(part + (None, None, 0))
            else:
                parts.append(part + self._keep(tombstones_key, encode_tombstones(tombstones)))
        (s_key, s_sha, s_size, t_key, t_sha, t_size), rest = parts[0], parts[1:]
        return dict(state_key=s_key, state_sha256=s_sha, state_bytes=s_size, tombstones_key=t_key,
                    tombstones_sha256=t_sha, tombstones_bytes=t_size,
                    state_layers=tuple(StateLayer(*part) for part in rest))

    def _forgets(self, users: pa.Array, latest: dict) -> pa.Table:
        """One forget tombstone per user (the id's hash; the forget's time, or a later one already
        recorded), so no late event brings them back."""
        names = users.to_pylist()
        hashes = [forgotten_id(u) for u in names]
        at = self.forgotten_at  # user -> the forget's time
        return pa.table({
            "user_hash": pa.array(hashes, pa.string()),
            "user_xxh64": pa.array([shard_hash(u) for u in names], pa.uint64()),
            "user_id": pa.nulls(len(hashes), pa.string()),
            "fact_id": pa.nulls(len(hashes), pa.string()),
            "op": pa.array([OP_FORGET_USER] * len(hashes), pa.string()),
            "event_time": pa.array([max(at[u], latest.get(h, at[u])) for u, h in zip(names, hashes)], TIMESTAMP),
        }, schema=TOMBSTONE_SCHEMA)


@dataclass
class _Plan:
    pointer: object
    retained: list[Manifest]
    to_rewrite: list[Manifest]
    rewrites: dict[int, Manifest]  # old version -> draft of its rewrite (version number still to take)
    orphans: list[int]
    found: bool = False  # some retained version held data of the users written up to their forget


def _version_parts(store: ObjectStore, manifest: Manifest) -> dict[str, list[str]]:
    """The version-level stats parts of a manifest (a version-1 manifest's hive folders listed)."""
    if manifest.schema_version == 1:
        out = {}
        for key in store.list("stats/"):
            parts = key.split("/")
            if len(parts) >= 4 and parts[2] == f"version={manifest.version}" and key.endswith(".parquet"):
                out.setdefault(parts[1], []).append(key)
        return out
    return {table: list(parts) for table, parts in manifest.stats.items()}


def _plan(store: ObjectStore, users: list[str], rewriter: _Rewriter, record_absent: bool = False) -> _Plan | None:
    """What to rewrite: every retained version that holds data of the users written up to their
    forget, every one that does not yet name their forget, and CURRENT. None if the store has no
    version; no rewrite at all where no version holds such data, unless ``record_absent`` (then the
    forget tombstones are recorded all the same)."""
    pointer = read_pointer(store)
    if pointer is None:
        return None
    manifests, unreadable = manifest_inventory(store)
    published = sorted(published_among(store, manifests, pointer))
    if pointer.version not in published:
        raise PublishError(f"{store.uri}: the current manifest (v{pointer.version}) is unreadable; roll back to an "
                           "intact version first (engram versions lists them, engram rollback --to N), then forget")
    for version, why in sorted(unreadable.items()):  # not an orphan: what it names is unknown, so it stays
        log.warning("forget on %s: %s is unreadable (%s); it is kept (not taken for an orphan) and not rewritten: "
                    "restore it from a backup, or delete it by hand if that version is not wanted",
                    store.uri, manifest_key(version), why)
    orphans = sorted(set(manifests) - set(published))  # readable manifests never published
    retained = [manifests[v] for v in published]
    hashes = {forgotten_id(u) for u in users}
    drafts: dict[int, Manifest] = {}
    held: set[int] = set()
    for manifest in retained:
        by_shard: dict[int, list[str]] = {}
        for user in sorted(set(users)):
            by_shard.setdefault(shard_of(user, manifest.num_shards), []).append(user)
        scopes, drop = manifest.scopes, {}
        if scopes is not None:  # the users' copies of shared scopes' facts (see _Rewriter.scopes)
            erase = {shard: rewriter.erasable(manifest.shard(shard), members) for shard, members in by_shard.items()}
            scopes, drop = rewriter.scopes(manifest, erase)
        new_entries = {shard: rewriter.shard(manifest.shard(shard), by_shard.get(shard, []), drop.get(shard))
                       for shard in sorted(set(by_shard) | set(drop))}
        erased = pa.array(sorted({u for shard in by_shard for u in rewriter.erased[manifest.shard(shard).object_keys()]}),
                          pa.string())
        parts = _version_parts(store, manifest)
        stats = {table: [rewriter.part(k, erased) if table in _USER_TABLES else k for k in keys]
                 for table, keys in parts.items()}
        shards = tuple(new_entries.get(e.shard, e) for e in manifest.shards)
        if parts.get("shards") and shards != manifest.shards:  # per-shard totals and keys of the rewrite
            stats["shards"] = [rewriter.shards_part(parts["shards"], shards)]
        version_parts = {k for keys in parts.values() for k in keys}
        scope_keys = set(manifest.scopes.object_keys()) if manifest.scopes is not None else set()
        if any(k in rewriter.held for e in manifest.shards for k in e.object_keys()) or \
                (version_parts | scope_keys) & rewriter.held:
            held.add(manifest.version)
        drafts[manifest.version] = replace(
            manifest, schema_version=MANIFEST_SCHEMA_VERSION,
            shards=shards, scopes=scopes,
            stats={table: tuple(keys) for table, keys in stats.items()},
            forgotten=tuple(sorted(set(manifest.forgotten) | hashes)))
    if not held and (not record_absent or all(hashes <= set(m.forgotten) for m in retained)):
        return _Plan(pointer, retained, [], {}, orphans)  # nothing held; the forget already recorded, or not asked for
    to_rewrite = [m for m in retained
                  if m.version in held or not hashes <= set(m.forgotten) or m.version == pointer.version]
    return _Plan(pointer, retained, to_rewrite, drafts, orphans, found=bool(held))


def forget_id_problem(user_id: str) -> str | None:
    """Why ``user_id`` (as given) can be no user of any store, or None: empty once invisible
    characters go. An id that breaks ingest's other rules (over
    :data:`schemas.facts.MAX_ID_CHARS` characters, control characters) is taken: its events are
    rejected (``BAD_USER_ID``), but the rejects stats of a version keep the id they were sent with,
    and a forget erases those rows too."""
    if not canonical_id(user_id):
        return f"user id {user_id!r} is empty once invisible characters are removed"
    return None


def forget_user(store: ObjectStore, user_id: str, *, actor: str, reason: str) -> ForgetReport:
    """Remove ``user_id`` from every retained version (see the module docstring)."""
    return forget_users(store, [user_id], actor=actor, reason=reason)


def forget_users(store: ObjectStore, user_ids: Sequence[str], *, actor: str, reason: str,
                 forgotten_at: datetime | Mapping[str, datetime] | None = None,
                 keep: frozenset[str] = frozenset(), record_absent: bool = True) -> ForgetReport:
    """Remove every user of ``user_ids`` from every retained version, in one rewrite of each
    (see the module docstring). Ids are read in canonical form (:func:`engram_core.text.canonical_id`),
    as ingest stores them: ``u-sam`` with a zero-width space or a byte-order mark forgets ``u-sam``.
    ``forgotten_at`` (default: now plus :data:`schemas.facts.FUTURE_TOLERANCE`; or per user, as the
    nightly passes each forget event's time) is the forget tombstones' time: events of these users
    up to it are refused by later nights. The default covers every event that may have been written
    before the forget on a client clock running ahead by as much as ingest accepts (one day): such
    an event, arriving late, would otherwise bring the user back.
    ``keep``: object keys that must not be deleted even if they held a user and no retained
    version names them (the objects a night in progress has written for its own version).
    ``record_absent``: where no retained version holds data of a user written up to the forget
    (the user is not published yet, its events still on their way), CURRENT is still rewritten to
    carry the forget tombstones, so the next night refuses the user's events up to the forget's
    time (``found`` False, ``refused_until`` set). The nightly passes False: its own version records
    the tombstones of its ``forget_user`` events. A store with no version has nowhere to record a
    forget: PublishError under ``record_absent`` (it said "not found" and the first night published
    the user), nothing recorded otherwise.
    Raises ValueError for an id that is empty once invisible characters go (:func:`forget_id_problem`)
    or a missing actor/reason, PublishError if CURRENT keeps moving."""
    times = forgotten_at if isinstance(forgotten_at, Mapping) else None
    at = forgotten_at if isinstance(forgotten_at, datetime) else datetime.now(timezone.utc) + FUTURE_TOLERANCE
    if not user_ids:
        raise ValueError("forget: user ids must be non-empty")
    if problem := next(filter(None, map(forget_id_problem, user_ids)), None):
        raise ValueError(f"forget: {problem}; nothing was forgotten")
    forgotten_at = {canonical_id(u): (times[u] if times is not None else at) for u in user_ids}
    user_ids = list(dict.fromkeys(canonical_id(u) for u in user_ids))  # one user once, however often given
    if not actor or not reason:
        raise ValueError("forget: actor and reason are required (they go into the audit log)")
    store.check_conditional_writes()  # its rewrite ends in a compare-and-swap of CURRENT (once per store object)
    # Compiled chunks of an unfinished night may hold the users' rows: they are only a cache.
    # (Recorded first: a night running beside the forget says so if it needed one, see FORGET_DELETES.)
    partial = store.list(PARTIAL_PREFIX)
    if partial:
        append_audit(store, FORGET_DELETES, actor=actor, prefixes=[PARTIAL_PREFIX])
        for key in partial:
            store.delete(key)
    _finish_interrupted_forgets(store)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            report = _forget_once(store, list(user_ids), actor=actor, reason=reason, forgotten_at=forgotten_at,
                                  keep=keep, record_absent=record_absent)
        except PublishConflict as err:
            if attempt == ATTEMPTS:
                raise PublishError(f"forget on {store.uri}: CURRENT kept moving ({err}); run forget again "
                                   "when no publish is in progress") from err
            log.warning("forget on %s: %s; retrying against the new CURRENT", store.uri, err)
            continue
        orphans = _delete_unreferenced_holders(store, pa.array(sorted(set(user_ids)), pa.string()), keep, actor)
        if orphans:
            report = replace(report, deleted_objects=report.deleted_objects + tuple(orphans))
        if report.rewritten:
            report = replace(report, refused_until=max(forgotten_at.values()).isoformat())
        return report
    raise AssertionError("unreachable")


FORGET_DELETES = "forget_deletes"
"""Audit event a forget appends *before* it deletes objects no manifest names (``keys``), or every
key under ``prefixes`` (a night's ``partial/`` cache). Such an object may be a night's in progress,
written and not yet named by its manifest: the night reads the records written since it began
(jobs.nightly) and, if one names an object its version needs, fails with one line saying a forget
ran beside it (nothing published, nothing lost; run it again) instead of a missing object, and never
moves CURRENT to a version missing one. Recorded before the deletes, and the manifests read again
after the record, so a night that wrote its manifest before that reading has its objects kept, and
one that writes it later finds the record before it moves CURRENT."""


def _finish_interrupted_forgets(store: ObjectStore) -> list[int]:
    """Delete the manifests an earlier forget re-issued (its ``forget_rewrite`` records name them)
    but did not get to delete: a store failure after it moved CURRENT. Left, they were taken for
    retained versions that hold the users, and the next forget re-issued them once more and moved
    CURRENT again. Only a manifest whose rewrite is on disk and that still lacks that forget's users
    is deleted (never CURRENT, never a later version that reused the number). The objects only
    they named are left to the unreferenced scan below (the same users) or to gc."""
    pointer = read_pointer(store)
    on_disk = set(manifest_versions_on_disk(store))
    stale = {}
    for record in read_audit(store):
        old, new = record.get("rewrites"), record.get("version")
        if record.get("event") != "forget_rewrite" or old not in on_disk or new not in on_disk:
            continue
        if pointer is not None and old == pointer.version:
            continue
        hashes = record.get("forgotten")
        stale.setdefault(old, set()).update([hashes] if isinstance(hashes, str) else hashes or [])
    deleted = []
    for version, hashes in sorted(stale.items()):
        try:
            carried = set(read_manifest(store, version).forgotten)
        except (ManifestError, PublishError, ValueError):
            continue  # unreadable: kept, as forget keeps a damaged manifest
        if not hashes <= carried:
            store.delete(manifest_key(version))
            deleted.append(version)
    if deleted:
        log.info("forget on %s: deleted manifest(s) %s that an interrupted forget had re-issued", store.uri,
                 ", ".join(f"v{v}" for v in deleted))
    return deleted


def _recorded_forgets(rewriter: "_Rewriter", plan: _Plan, users: list[str]) -> dict[str, str]:
    """user hash -> ISO time of the forget tombstone CURRENT already holds for it (later nights refuse
    the user's events stamped up to it), for the ``users`` that have one: a forget given again."""
    current = next((m for m in plan.retained if m.version == plan.pointer.version), None)
    if current is None:
        return {}
    out = {}
    for user in users:
        user_hash = forgotten_id(user)
        times = []
        for _, tombstones, _, _ in rewriter._state_objects(current.shard(shard_of(user, current.num_shards))):
            mine = tombstones.filter(pc.and_(pc.equal(tombstones.column("user_hash"), user_hash),
                                             pc.equal(tombstones.column("op"), OP_FORGET_USER)))
            times += mine.column("event_time").to_pylist()
        if times:
            out[user_hash] = max(times).isoformat()
    return out


def _delete_unreferenced_holders(store: ObjectStore, users: pa.Array, keep: frozenset[str], actor: str) -> list[str]:
    """Delete every object under ``objects/`` and ``stats/`` that holds one of ``users`` and no
    manifest on the store references: what a night killed before its commit (or a losing
    concurrent publisher) wrote, or what a forget that failed part-way had still to delete. gc
    would collect them too, but an erasure must not wait for it. Scope objects (scope deltas and
    state, the scopes' own ``facts`` parts) hold the members' copies of scope facts (texts, fact
    ids, deltas compiled from them) with no user id to tell whose: every one no manifest names goes.
    ``keep``: objects of a night in progress (they are not named by a manifest yet). If a
    manifest cannot be read, nothing is deleted here (its references are unknown) and a warning
    says so. The keys are recorded (:data:`FORGET_DELETES`) before the first delete, and the
    manifests read again after it: an object a manifest written meanwhile names is kept."""
    referenced = _referenced_now(store)
    if referenced is None:
        return []
    referenced |= set(keep)
    doomed = []
    for prefix in ("objects/", "stats/"):
        for key in store.list(prefix):
            if key in referenced or not is_collectable(key):
                continue  # (a key whose name the store does not write is not the store's object)
            if key.startswith(SCOPE_OBJECT_PREFIXES):
                doomed.append(key)  # whose copies it holds is unknown (see below)
                continue
            try:
                table = pq.read_table(pa.BufferReader(store.get(key)))
            except (pa.ArrowInvalid, OSError):
                continue  # not a table we wrote; gc decides about it
            if _holds_users(table, users) or _scope_rows(table) is not None and pc.any(_scope_rows(table)).as_py():
                doomed.append(key)
    if not doomed:
        return []
    append_audit(store, FORGET_DELETES, actor=actor, keys=doomed)
    referenced = _referenced_now(store)  # a night may have named some in a manifest since the first reading
    if referenced is None:
        return []
    deleted = []
    for key in doomed:
        if key not in referenced:
            store.delete(key)
            deleted.append(key)
    if deleted:
        log.info("forget on %s: deleted %d unreferenced object(s) that held a forgotten user", store.uri, len(deleted))
    return deleted


def _referenced_now(store: ObjectStore) -> set[str] | None:
    """The keys every manifest on the store references, or None (and a warning) if one cannot be read."""
    try:
        return references([read_manifest(store, v) for v in manifest_versions_on_disk(store)])
    except (ManifestError, PublishError, ValueError) as err:
        log.warning("forget on %s: a manifest could not be read (%s); unreferenced objects were not scanned for "
                    "the forgotten users: run engram gc after repairing it", store.uri, err)
        return None


def _forget_once(store: ObjectStore, users: list[str], *, actor: str, reason: str,
                 forgotten_at: Mapping[str, datetime], keep: frozenset[str], record_absent: bool) -> ForgetReport:
    hashes = tuple(forgotten_id(u) for u in users)
    audit_hashes = hashes[0] if len(hashes) == 1 else list(hashes)
    rewriter = _Rewriter(store, users, forgotten_at)
    plan = _plan(store, users, rewriter, record_absent)
    if plan is None and record_absent:  # nowhere to record it: the first night would publish the users
        who = "the user" if len(users) == 1 else f"the {len(users)} users"
        raise PublishError(f"{store.uri}: nothing is published yet, so the forget of {who} cannot be recorded (the "
                           "first night would publish their events); nothing was forgotten. Put a forget_user event "
                           "for them in the fact log (the night applies it), or forget again after the first night")
    scopes_note = _scopes_note(store, plan, users)
    if plan is None or not plan.to_rewrite:
        current = plan.pointer.version if plan is not None else None
        who = "user" if len(users) == 1 else "users"
        recorded = _recorded_forgets(rewriter, plan, users) if plan is not None else {}
        until = max(recorded.values()) if recorded else None
        already = (f"; the forget is already recorded: their events up to {until} are refused (FORGOTTEN_USER)"
                   if until else "")
        message = (f"{who} not found: no retained version of {store.uri} holds them, no data of theirs is stored; "
                   f"nothing to forget{already}{scopes_note}")
        append_audit(store, "forget", actor=actor, reason=reason, forgotten=audit_hashes, found=False)
        return ForgetReport(hashes, False, current, message=message, refused_until=until, recorded_until=recorded)

    needed = {k for m in plan.to_rewrite for k in plan.rewrites[m.version].object_keys()}
    write_verified_objects(store, {k: v for k, v in rewriter.objects.items() if k in needed})
    mapping: dict[int, int] = {}
    next_version = max(manifest_versions_on_disk(store)) + 1
    retained_versions = {m.version for m in plan.retained}
    for old in plan.to_rewrite:  # ascending: parents are rewritten before their children
        if old.parent in mapping:
            parent = mapping[old.parent]
        else:
            parent = old.parent if old.parent in retained_versions else None
        # a rewrite names the job that wrote the version it rewrites, once: the rewrite of a rewrite
        # ("forget:forget:...", one more prefix each forget) stopped reading as the night's job id
        job_id = old.job_id if old.job_id.startswith("forget:") else f"forget:{old.job_id}"[:200]
        draft = replace(plan.rewrites[old.version], version=next_version, parent=parent, job_id=job_id)
        written = write_manifest(store, draft, plan.pointer)
        mapping[old.version] = written.version
        next_version = written.version + 1

    new_current = read_manifest(store, mapping[plan.pointer.version])
    swap_current(store, new_current, plan.pointer.etag)
    for old_version, new_version in mapping.items():
        append_audit(store, "forget_rewrite", actor=actor, version=new_version, rewrites=old_version,
                     forgotten=audit_hashes)
    deleted = _delete_replaced(store, plan, mapping, (rewriter.held | rewriter.superseded) - keep)
    append_audit(store, "forget", actor=actor, reason=reason, forgotten=audit_hashes, found=plan.found,
                 version=new_current.version, rewritten={str(k): v for k, v in mapping.items()},
                 deleted_objects=len(deleted))
    log.info("forget on %s: rewrote %d version(s), CURRENT v%d -> v%d, deleted %d object(s)",
             store.uri, len(mapping), plan.pointer.version, new_current.version, len(deleted))
    if plan.found:
        erased = len(rewriter.found) or len(users)
        who = f"{erased} user(s)" if erased == len(users) else \
            f"{erased} of {len(users)} users (the others not found: their forget is recorded)"
        message = f"forgot {who} in {len(mapping)} version(s); CURRENT is v{new_current.version}"
    else:
        who = "user" if len(users) == 1 else "users"
        message = (f"{who} not found in any retained version of {store.uri}: no data of theirs is stored; the "
                   f"forget is recorded (its tombstone alone, data unchanged) in v{new_current.version} (CURRENT) and "
                   f"each retained version, so their events up to the forget's time are refused (FORGOTTEN_USER) "
                   f"when they arrive")
    found = tuple(forgotten_id(u) for u in sorted(rewriter.found)) if plan.found else ()
    return ForgetReport(hashes, plan.found, new_current.version, dict(mapping), tuple(deleted),
                        message=message + scopes_note + _stale_note(plan, new_current), found_hashes=found)


def _stale_note(plan: _Plan, current: Manifest) -> str:
    """A sentence for the report when the forget left shared scopes of CURRENT stale (their deltas
    were compiled from the users' copies: dropped until the next night compiles them)."""
    before = next((m for m in plan.retained if m.version == plan.pointer.version), None)
    stale = set(current.scopes.stale if current.scopes is not None else ()) - \
        set(before.scopes.stale if before is not None and before.scopes is not None else ())
    if not stale:
        return ""
    return (f"; {len(stale)} shared scope(s) were compiled from the forgotten copies: their deltas (and the own deltas "
            "of the users holding them as an extra scope, who are still served their first scope's) are dropped until "
            "the next night compiles them again")


def _scopes_note(store: ObjectStore, plan: _Plan | None, users: list[str]) -> str:
    """A sentence for the report when a forgotten id is also a shared scope's id in CURRENT: the
    scope is another owner (its members' shared facts) and is kept. The id is not repeated."""
    current = next((m for m in plan.retained if m.version == plan.pointer.version), None) if plan is not None else None
    if current is None or current.scopes is None:
        return ""
    from schemas.bundle import decode_bundle
    from versions.catalog import verified_bytes

    entry = current.scopes
    table = decode_bundle(verified_bytes(store, entry.key, entry.bytes, entry.sha256), source=f"{store.uri}/{entry.key}")
    shared = set(table.column("user_id").to_pylist()) & set(users)
    if not shared:
        return ""
    return (f"; {len(shared)} of the id(s) also name a shared scope, which is not a user and is kept (its members' "
            "shared facts; a scope goes when its last member leaves it)")


def references(manifests: list[Manifest]) -> set[str]:
    """Object keys (shard objects and stats parts) the manifests reference."""
    return {key for m in manifests for key in m.object_keys()}


def _delete_replaced(store: ObjectStore, plan: _Plan, mapping: dict[int, int], replaced: set[str]) -> list[str]:
    """Old manifests of rewritten versions, orphans, and the objects that held a forgotten user
    and no kept manifest references."""
    kept = [read_manifest(store, v) for v in sorted({mapping.get(m.version, m.version) for m in plan.retained})]
    kept_versions = {m.version for m in kept}
    referenced = references(kept)
    deleted = []
    for version in sorted(set(mapping) | set(plan.orphans)):
        if version not in kept_versions:
            store.delete(manifest_key(version))
            deleted.append(manifest_key(version))
    for key in sorted(replaced - referenced):
        store.delete(key)
        deleted.append(key)
    return deleted
