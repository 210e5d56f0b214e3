"""The manifest: one immutable JSON object per published version.

It names everything a reader needs: the parent version, when and by which job it was made,
the input watermark, the base fingerprint the deltas were compiled against, and per shard the
content-addressed bundle, fact-state and tombstone objects with their sha256 and size, and the
shard's stats parts. ``forgotten`` holds the sha256 (hex) of every user_id forgotten up to this
version, so a rollback can refuse a version that predates a forget. Loading validates every
field and names the bad one.

Schema versions. Version 2 (written since 2026-11-30) adds per shard ``tombstones_*`` (the
shard's delete and forget tombstones, see schemas.facts.TOMBSTONE_SCHEMA) and ``stats`` (table ->
key of the shard's part of that stats table); the manifest's ``stats`` maps a table to the list
of keys of its version-level parts (this night's rejects, runs, shards). Parts are
content-addressed, so a shard that did not change is carried with its stats by reference.
Version 1 manifests are still read: their shards have no tombstones object and no stats parts,
and their ``stats`` map a table to the hive prefix ``stats/<table>/version=<N>/`` that holds it
(a key ending in ``/`` is a prefix to list).

Layers (version 2, since 2026-12-01). A shard is a *base* plus ordered *layers* (oldest first):

* ``bundle_*`` is the base bundle, ``layers`` the delta layers (:class:`LayerEntry`,
  ``objects/layers/<sha256>.parquet``, schemas.bundle.LAYER_SCHEMA): each holds the whole deltas
  of the users that changed on one night and tombstones of users whose delta went; the newest
  entry for a user wins. Each layer names its own stats parts (facts, users, collisions of its
  users); a row of an older part is hidden by a newer layer that names its user.
* ``state_*`` / ``tombstones_*`` are the base fact state and tombstones, ``state_layers``
  (:class:`StateLayer`) the changed users' whole facts and tombstones of later nights
  (schemas.facts.merge_state_chain).
* ``cobatch_groups`` is how many co-batch group numbers the base and layers have used (a new
  layer numbers its groups from there, so a group never mixes users of two objects; null, as in
  entries written before layers: unknown, so the shard's next change writes a new base);
  ``compactions`` counts the bases written to replace a chain.
* ``users``, ``facts``, ``rows`` are the merged view's.

A chain is refused at load (ManifestError naming the field) when an object's key does not match
its sha256, a layer's ``parent_sha256`` is not the object below it (the base bundle or the
previous layer: each layer object also records it, see schemas.bundle.LAYER_SCHEMA), or a layer
names no user.

Shared scopes (optional field ``scopes``, since 2026-11-30; absent in manifests written before,
and in stores with no scope): a :class:`ScopesEntry` names two version-level objects. The
*scope deltas* (``objects/scopes/<sha256>.parquet``, a bundle whose ``user_id`` is the scope id:
every scope's delta, compiled once; serving nodes pull it whole) and the *scope state*
(``objects/scope_state/<sha256>.parquet``, pipeline.scopes.SCOPE_STATE_SCHEMA: per scope and
shard, the scope facts that shard's users carry (members, and users holding the scope as an
extra scope) and how many members it has; read by the night and its compile workers). Its
``stats`` name the scopes' own ``facts`` rows (``user_id`` = the scope id); its ``stale`` (only
when not empty) the scopes a forget dropped for the next night to compile. A member's bundle row
names its scope (schemas.bundle, column ``scope``).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime

MANIFEST_SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    pass


def scopes_key(sha256: str) -> str:
    return f"objects/scopes/{sha256}.parquet"


def scope_state_key(sha256: str) -> str:
    return f"objects/scope_state/{sha256}.parquet"


def manifest_key(version: int) -> str:
    return f"manifests/v{version:08d}.json"


def bundle_key(sha256: str) -> str:
    return f"objects/bundles/{sha256}.parquet"


def state_key(sha256: str) -> str:
    return f"objects/state/{sha256}.parquet"


def tombstones_key(sha256: str) -> str:
    return f"objects/tombstones/{sha256}.parquet"


def layer_key(sha256: str) -> str:
    return f"objects/layers/{sha256}.parquet"


def stats_part_key(table: str, sha256: str) -> str:
    return f"stats/{table}/{sha256}.parquet"


@dataclass(frozen=True)
class LayerEntry:
    """One night's change to a shard's deltas (see the module docstring)."""

    key: str
    sha256: str
    bytes: int
    parent_sha256: str  # the object it applies on: the base bundle, or the layer below it
    users: int  # deltas this layer holds (its users' whole deltas)
    tombstones: int  # users whose delta this layer removes
    stats: dict[str, str] = field(default_factory=dict)  # stats table -> key of this layer's part

    def object_keys(self) -> tuple[str, ...]:
        return (self.key,) + tuple(sorted(self.stats.values()))


@dataclass(frozen=True)
class StateLayer:
    """One night's change to a shard's fact state and tombstones: the changed users' whole rows."""

    state_key: str
    state_sha256: str
    state_bytes: int
    tombstones_key: str | None = None  # None: the changed users keep no tombstone
    tombstones_sha256: str | None = None
    tombstones_bytes: int = 0

    def object_keys(self) -> tuple[str, ...]:
        return (self.state_key,) + ((self.tombstones_key,) if self.tombstones_key else ())

    @property
    def bytes(self) -> int:
        return self.state_bytes + self.tombstones_bytes


@dataclass(frozen=True)
class ShardEntry:
    shard: int
    bundle_key: str
    bundle_sha256: str
    bundle_bytes: int
    state_key: str
    state_sha256: str
    state_bytes: int
    users: int
    facts: int
    rows: int
    tombstones_key: str | None = None  # None: the shard keeps no tombstones object (e.g. from version 1)
    tombstones_sha256: str | None = None
    tombstones_bytes: int = 0
    stats: dict[str, str] = field(default_factory=dict)  # stats table -> key of the base's part
    layers: tuple[LayerEntry, ...] = ()  # delta layers over the base bundle, oldest first
    state_layers: tuple[StateLayer, ...] = ()  # fact-state layers over the base state, oldest first
    cobatch_groups: int | None = 0  # co-batch group numbers used by the base and layers (None: not recorded)
    compactions: int = 0  # bases written to replace a chain of layers, so far

    def object_keys(self) -> tuple[str, ...]:
        """Every object this shard references (bundle, layers, state, tombstones, stats parts)."""
        keys = [self.bundle_key, self.state_key] + ([self.tombstones_key] if self.tombstones_key else [])
        keys += [k for layer in self.layers for k in layer.object_keys()]
        keys += [k for layer in self.state_layers for k in layer.object_keys()]
        return tuple(keys + sorted(self.stats.values()))

    def sized_objects(self) -> dict[str, int | None]:
        """Key -> size in bytes (None: a stats part, not sized in the manifest) of every object."""
        sizes: dict[str, int | None] = {key: None for key in self.object_keys()}
        sizes |= {self.bundle_key: self.bundle_bytes, self.state_key: self.state_bytes}
        if self.tombstones_key is not None:
            sizes[self.tombstones_key] = self.tombstones_bytes
        for layer in self.layers:
            sizes[layer.key] = layer.bytes
        for layer in self.state_layers:
            sizes[layer.state_key] = layer.state_bytes
            if layer.tombstones_key:
                sizes[layer.tombstones_key] = layer.tombstones_bytes
        return sizes

    @property
    def delta_bytes(self) -> int:
        """Bytes a serving node downloads for this shard: the base bundle and its layers."""
        return self.bundle_bytes + sum(layer.bytes for layer in self.layers)

    @property
    def total_bytes(self) -> int:
        return (self.delta_bytes + self.state_bytes + self.tombstones_bytes
                + sum(layer.bytes for layer in self.state_layers))

    @property
    def delta_chain(self) -> tuple[str, ...]:
        """sha256 of the base bundle and of each layer, oldest first: what a serving node holds."""
        return (self.bundle_sha256,) + tuple(layer.sha256 for layer in self.layers)


@dataclass(frozen=True)
class ScopesEntry:
    """A version's shared scopes (see the module docstring): every scope's delta, in one object
    that serving nodes pull whole, and the night's scope state. Counts are over the scopes."""

    key: str  # objects/scopes/<sha256>.parquet: a bundle, one row per scope (user_id = scope id)
    sha256: str
    bytes: int
    state_key: str  # objects/scope_state/<sha256>.parquet: (scope, shard) -> copies, members
    state_sha256: str
    state_bytes: int
    scopes: int  # scopes with at least one member
    facts: int  # the scopes' facts (each once)
    rows: int  # rows of the scope deltas
    members: int  # users composed with a scope
    stats: dict[str, str] = field(default_factory=dict)  # stats table -> key of the scopes' part
    stale: tuple[str, ...] = ()
    """Scopes (ids, sorted) whose merged facts a forget changed (a forgotten user's copy was the
    latest, or its only carrier): their deltas were dropped, with the deltas of users holding one
    as an extra scope, and the next night compiles them and those users (versions.forget). Written
    only when not empty (manifests before 2026-12-01 have none)."""

    def object_keys(self) -> tuple[str, ...]:
        return (self.key, self.state_key) + tuple(sorted(self.stats.values()))

    def sized_objects(self) -> dict[str, int | None]:
        sizes: dict[str, int | None] = {key: None for key in self.object_keys()}
        return sizes | {self.key: self.bytes, self.state_key: self.state_bytes}


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    version: int
    parent: int | None
    created_at: str  # ISO 8601 UTC, e.g. 2026-01-02T03:04:05.123456Z
    job_id: str
    watermark: str | None
    fingerprint: str
    num_shards: int
    shards: tuple[ShardEntry, ...]
    stats: dict[str, tuple[str, ...]] = field(default_factory=dict)  # stats table -> version-level part keys
    counts: dict[str, int] = field(default_factory=dict)
    forgotten: tuple[str, ...] = ()  # sha256 hex of forgotten user_ids, sorted
    scopes: ScopesEntry | None = None  # shared scopes' deltas and state (None: no scope)

    @property
    def key(self) -> str:
        return manifest_key(self.version)

    @property
    def users(self) -> int:
        return sum(s.users for s in self.shards)

    @property
    def facts(self) -> int:
        return sum(s.facts for s in self.shards)

    @property
    def total_bytes(self) -> int:
        return sum(s.total_bytes for s in self.shards)

    def shard(self, shard: int) -> ShardEntry:
        return self.shards[shard]

    def stats_parts(self, table: str) -> list[str]:
        """Keys (or, in version-1 manifests, hive prefixes ending in '/') of ``table``'s parts: the
        version's own, each shard's base's and each layer's."""
        return (list(self.stats.get(table, ())) + [e.stats[table] for e in self.shards if table in e.stats]
                + [layer.stats[table] for e in self.shards for layer in e.layers if table in layer.stats]
                + ([self.scopes.stats[table]] if self.scopes is not None and table in self.scopes.stats else []))

    def object_keys(self) -> set[str]:
        """Every object key the version references: shard objects and stats parts (not prefixes)."""
        keys = {k for e in self.shards for k in e.object_keys()}
        keys |= set(self.scopes.object_keys()) if self.scopes is not None else set()
        return keys | {k for parts in self.stats.values() for k in parts if not k.endswith("/")}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shards"] = [_shard_dict(s) for s in self.shards]
        out["forgotten"] = list(self.forgotten)
        out["stats"] = {table: list(parts) for table, parts in self.stats.items()}
        if self.scopes is None:
            del out["scopes"]  # a store without scopes writes the manifests it wrote before scopes
        elif not self.scopes.stale:
            del out["scopes"]["stale"]  # (readers before 2026-12-01 refuse an unknown field)
        else:
            out["scopes"]["stale"] = list(self.scopes.stale)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "manifest") -> "Manifest":
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"manifest {source}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=source)

    @classmethod
    def from_dict(cls, raw: dict, *, source: str = "manifest") -> "Manifest":
        where = f"manifest {source}"
        if not isinstance(raw, dict):
            raise ManifestError(f"{where}: must be a JSON object")
        if not isinstance(raw.get("schema_version"), int) or raw["schema_version"] not in READABLE_SCHEMA_VERSIONS:
            raise ManifestError(f"{where}: field 'schema_version' is {raw.get('schema_version')!r}; this engram reads "
                                f"versions {list(READABLE_SCHEMA_VERSIONS)} (upgrade engram to read newer manifests)")
        schema_version = raw["schema_version"]
        _check_fields(raw, cls, where, optional={"scopes"})
        raw_shards = raw["shards"]
        if not isinstance(raw_shards, list):
            raise ManifestError(f"{where}: field 'shards' must be a list")
        shards = tuple(_shard_entry(s, f"{where} shards[{i}]", schema_version) for i, s in enumerate(raw_shards))
        manifest = cls(
            schema_version=schema_version,
            version=_int(raw, "version", where, minimum=1),
            parent=None if raw["parent"] is None else _int(raw, "parent", where, minimum=1),
            created_at=_timestamp(raw, "created_at", where),
            job_id=_str(raw, "job_id", where),
            watermark=None if raw["watermark"] is None else _str(raw, "watermark", where),
            fingerprint=_str(raw, "fingerprint", where),
            num_shards=_int(raw, "num_shards", where, minimum=1, what="a positive int"),
            shards=shards,
            stats=_stats(raw, where, schema_version),
            counts=_mapping(raw, "counts", where, int),
            forgotten=_forgotten(raw, where),
            scopes=_scopes_entry(raw["scopes"], f"{where} scopes") if raw.get("scopes") is not None else None,
        )
        manifest.validate(source=source)
        return manifest

    def validate(self, *, source: str | None = None) -> None:
        where = f"manifest {source or self.key}"
        if len(self.shards) != self.num_shards:
            raise ManifestError(f"{where}: field 'shards' has {len(self.shards)} entries for num_shards={self.num_shards}")
        for i, entry in enumerate(self.shards):
            if entry.shard != i:
                raise ManifestError(f"{where}: field 'shards[{i}].shard' is {entry.shard}; shards must be 0..num_shards-1 in order")
        if self.parent is not None and self.parent == self.version:
            raise ManifestError(f"{where}: field 'parent' equals the version {self.version}")


def _scopes_entry(raw, where: str) -> ScopesEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be a JSON object")
    _check_fields(raw, ScopesEntry, where, optional={"stale"})
    stale = raw.get("stale", [])
    if not isinstance(stale, list) or not all(isinstance(s, str) and s for s in stale) or stale != sorted(set(stale)):
        raise ManifestError(f"{where}: field 'stale' must be a sorted list of distinct scope ids, got {stale!r}")
    entry = ScopesEntry(key=_str(raw, "key", where), sha256=_sha(raw, "sha256", where), bytes=_int(raw, "bytes", where),
                        state_key=_str(raw, "state_key", where), state_sha256=_sha(raw, "state_sha256", where),
                        state_bytes=_int(raw, "state_bytes", where), scopes=_int(raw, "scopes", where),
                        facts=_int(raw, "facts", where), rows=_int(raw, "rows", where),
                        members=_int(raw, "members", where), stats=_mapping(raw, "stats", where, str),
                        stale=tuple(stale))
    if entry.key != scopes_key(entry.sha256):
        raise ManifestError(f"{where}: field 'key' is {entry.key!r}; expected {scopes_key(entry.sha256)!r}")
    if entry.state_key != scope_state_key(entry.state_sha256):
        raise ManifestError(f"{where}: field 'state_key' is {entry.state_key!r}; expected "
                            f"{scope_state_key(entry.state_sha256)!r}")
    _check_stats_keys(entry.stats, where)
    return entry


def _shard_dict(entry: ShardEntry) -> dict:
    out = asdict(entry)
    out["layers"] = [asdict(layer) for layer in entry.layers]
    out["state_layers"] = [asdict(layer) for layer in entry.state_layers]
    return out


_LAYER_FIELDS = {"layers", "state_layers", "cobatch_groups", "compactions"}  # absent: a base without layers
_V1_ABSENT = {"tombstones_key", "tombstones_sha256", "tombstones_bytes"} | _LAYER_FIELDS  # shard fields version 1 lacks
_V1_SHARD_STATS = {"stats"}


def _check_fields(raw: dict, cls, where: str, optional: set[str] = frozenset()) -> None:
    names = {f.name for f in fields(cls)}
    missing = names - raw.keys() - optional
    unknown = raw.keys() - names
    if missing:
        raise ManifestError(f"{where}: missing field {sorted(missing)[0]!r}")
    if unknown:
        raise ManifestError(f"{where}: unknown field {sorted(unknown)[0]!r}")


def _int(raw: dict, name: str, where: str, *, minimum: int = 0, what: str | None = None) -> int:
    value = raw[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = what or ("a positive int" if minimum >= 1 else "a non-negative int")
        raise ManifestError(f"{where}: field {name!r} must be {what}, got {value!r}")
    return value


def _str(raw: dict, name: str, where: str) -> str:
    value = raw[name]
    if not isinstance(value, str) or not value:
        raise ManifestError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _sha(raw: dict, name: str, where: str) -> str:
    value = raw[name]
    if not isinstance(value, str) or not _SHA256.match(value):
        raise ManifestError(f"{where}: field {name!r} must be a lowercase sha256 hex digest, got {value!r}")
    return value


def _timestamp(raw: dict, name: str, where: str) -> str:
    value = _str(raw, name, where)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        parsed = None
    if parsed is None or parsed.utcoffset() is None or parsed.utcoffset().total_seconds() != 0:
        raise ManifestError(f"{where}: field {name!r} must be an ISO 8601 UTC timestamp, got {value!r}")
    return value


def _mapping(raw: dict, name: str, where: str, value_type: type) -> dict:
    value = raw[name]
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, value_type) and not isinstance(v, bool) for k, v in value.items()
    ):
        raise ManifestError(f"{where}: field {name!r} must map strings to {value_type.__name__}")
    return dict(value)


def _stats(raw: dict, where: str, schema_version: int) -> dict[str, tuple[str, ...]]:
    value = raw["stats"]
    if schema_version == 1:  # table -> hive prefix
        return {table: (prefix,) for table, prefix in _mapping(raw, "stats", where, str).items()}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) and x for x in v) for k, v in value.items()
    ):
        raise ManifestError(f"{where}: field 'stats' must map table names to lists of object keys")
    return {table: tuple(parts) for table, parts in value.items()}


def _forgotten(raw: dict, where: str) -> tuple[str, ...]:
    value = raw["forgotten"]
    if not isinstance(value, list) or not all(isinstance(v, str) and _SHA256.match(v) for v in value):
        raise ManifestError(f"{where}: field 'forgotten' must be a list of sha256 hex digests")
    if value != sorted(set(value)):
        raise ManifestError(f"{where}: field 'forgotten' must be sorted and unique")
    return tuple(value)


def _shard_entry(raw, where: str, schema_version: int = MANIFEST_SCHEMA_VERSION) -> ShardEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be a JSON object")
    # Layers were added to schema 2 before it was released: a schema-2 entry without them is a base.
    _check_fields(raw, ShardEntry, where,
                  optional=_V1_ABSENT | _V1_SHARD_STATS if schema_version == 1 else _LAYER_FIELDS)
    tombstones = raw.get("tombstones_key") is not None  # None: no tombstones object (none kept yet)
    entry = ShardEntry(
        shard=_int(raw, "shard", where),
        bundle_key=_str(raw, "bundle_key", where),
        bundle_sha256=_sha(raw, "bundle_sha256", where),
        bundle_bytes=_int(raw, "bundle_bytes", where, minimum=1),
        state_key=_str(raw, "state_key", where),
        state_sha256=_sha(raw, "state_sha256", where),
        state_bytes=_int(raw, "state_bytes", where),
        users=_int(raw, "users", where),
        facts=_int(raw, "facts", where),
        rows=_int(raw, "rows", where),
        tombstones_key=_str(raw, "tombstones_key", where) if tombstones else None,
        tombstones_sha256=_sha(raw, "tombstones_sha256", where) if tombstones else None,
        tombstones_bytes=_int(raw, "tombstones_bytes", where, minimum=1) if tombstones else 0,
        stats=_mapping(raw, "stats", where, str) if "stats" in raw else {},
        layers=tuple(_layer(x, f"{where} layers[{i}]") for i, x in enumerate(_list(raw, "layers", where))),
        state_layers=tuple(_state_layer(x, f"{where} state_layers[{i}]")
                           for i, x in enumerate(_list(raw, "state_layers", where))),
        cobatch_groups=None if raw.get("cobatch_groups") is None else _int(raw, "cobatch_groups", where),
        compactions=_int(raw, "compactions", where) if "compactions" in raw else 0,
    )
    if entry.bundle_key != bundle_key(entry.bundle_sha256):
        raise ManifestError(f"{where}: field 'bundle_key' must be {bundle_key(entry.bundle_sha256)!r}, got {entry.bundle_key!r}")
    if entry.state_key != state_key(entry.state_sha256):
        raise ManifestError(f"{where}: field 'state_key' must be {state_key(entry.state_sha256)!r}, got {entry.state_key!r}")
    if tombstones and entry.tombstones_key != tombstones_key(entry.tombstones_sha256):
        raise ManifestError(f"{where}: field 'tombstones_key' must be {tombstones_key(entry.tombstones_sha256)!r}, "
                            f"got {entry.tombstones_key!r}")
    _check_stats_keys(entry.stats, where)
    _check_chain(entry, where)
    return entry


def _check_stats_keys(stats: dict[str, str], where: str) -> None:
    for table, key in stats.items():
        if not key.startswith(f"stats/{table}/") or not key.endswith(".parquet"):
            raise ManifestError(f"{where}: field 'stats' names {key!r} for table {table!r}; "
                                f"expected stats/{table}/<sha256>.parquet")


def _check_chain(entry: ShardEntry, where: str) -> None:
    """Each layer applies on the object below it: a layer listed over another base or out of order
    means the chain was put together wrongly (or cut), and is refused."""
    below = entry.bundle_sha256
    for i, layer in enumerate(entry.layers):
        if layer.parent_sha256 != below:
            raise ManifestError(f"{where}: layer chain broken: layers[{i}] applies on {layer.parent_sha256[:16]}.., "
                                f"but the object below it is {below[:16]}.. (a layer is missing, out of order, or "
                                "from another chain)")
        below = layer.sha256


def _list(raw: dict, name: str, where: str) -> list:
    value = raw.get(name, [])
    if not isinstance(value, list):
        raise ManifestError(f"{where}: layer chain broken: field {name!r} must be a list")
    return value


def _check_chain_fields(raw: dict, cls, where: str) -> None:
    try:
        _check_fields(raw, cls, where)
    except ManifestError as err:
        raise ManifestError(str(err).replace(f"{where}: ", f"{where}: layer chain broken: ", 1)) from None


def _layer(raw, where: str) -> LayerEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: layer chain broken: a layer must be a JSON object")
    _check_chain_fields(raw, LayerEntry, where)
    layer = LayerEntry(key=_str(raw, "key", where), sha256=_sha(raw, "sha256", where),
                       bytes=_int(raw, "bytes", where, minimum=1), parent_sha256=_sha(raw, "parent_sha256", where),
                       users=_int(raw, "users", where),
                       tombstones=_int(raw, "tombstones", where), stats=_mapping(raw, "stats", where, str))
    if layer.key != layer_key(layer.sha256):
        raise ManifestError(f"{where}: layer chain broken: field 'key' must be {layer_key(layer.sha256)!r}, "
                            f"got {layer.key!r}")
    if layer.users + layer.tombstones == 0:
        raise ManifestError(f"{where}: layer chain broken: a layer with no users and no tombstones")
    _check_stats_keys(layer.stats, where)
    return layer


def _state_layer(raw, where: str) -> StateLayer:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: layer chain broken: a state layer must be a JSON object")
    _check_chain_fields(raw, StateLayer, where)
    tombstones = raw["tombstones_key"] is not None
    layer = StateLayer(
        state_key=_str(raw, "state_key", where), state_sha256=_sha(raw, "state_sha256", where),
        state_bytes=_int(raw, "state_bytes", where, minimum=1),
        tombstones_key=_str(raw, "tombstones_key", where) if tombstones else None,
        tombstones_sha256=_sha(raw, "tombstones_sha256", where) if tombstones else None,
        tombstones_bytes=_int(raw, "tombstones_bytes", where, minimum=1) if tombstones else 0)
    expected_keys = [("state_key", layer.state_key, state_key(layer.state_sha256))]
    if tombstones:
        expected_keys.append(("tombstones_key", layer.tombstones_key, tombstones_key(layer.tombstones_sha256)))
    for name, key, expected in expected_keys:
        if key != expected:
            raise ManifestError(f"{where}: layer chain broken: field {name!r} must be {expected!r}, got {key!r}")
    return layer
