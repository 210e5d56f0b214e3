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


def manifest_key(version: int) -> str:
    return f"manifests/v{version:08d}.json"


def bundle_key(sha256: str) -> str:
    return f"objects/bundles/{sha256}.parquet"


def state_key(sha256: str) -> str:
    return f"objects/state/{sha256}.parquet"


def tombstones_key(sha256: str) -> str:
    return f"objects/tombstones/{sha256}.parquet"


def stats_part_key(table: str, sha256: str) -> str:
    return f"stats/{table}/{sha256}.parquet"


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
    stats: dict[str, str] = field(default_factory=dict)  # stats table -> key of this shard's part

    def object_keys(self) -> tuple[str, ...]:
        """Every object this shard references (bundle, state, tombstones, stats parts)."""
        keys = [self.bundle_key, self.state_key] + ([self.tombstones_key] if self.tombstones_key else [])
        return tuple(keys + sorted(self.stats.values()))


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
        return sum(s.bundle_bytes + s.state_bytes + s.tombstones_bytes for s in self.shards)

    def shard(self, shard: int) -> ShardEntry:
        return self.shards[shard]

    def stats_parts(self, table: str) -> list[str]:
        """Keys (or, in version-1 manifests, hive prefixes ending in '/') of ``table``'s parts."""
        return list(self.stats.get(table, ())) + [e.stats[table] for e in self.shards if table in e.stats]

    def object_keys(self) -> set[str]:
        """Every object key the version references: shard objects and stats parts (not prefixes)."""
        keys = {k for e in self.shards for k in e.object_keys()}
        return keys | {k for parts in self.stats.values() for k in parts if not k.endswith("/")}

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shards"] = [asdict(s) for s in self.shards]
        out["forgotten"] = list(self.forgotten)
        out["stats"] = {table: list(parts) for table, parts in self.stats.items()}
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
        _check_fields(raw, cls, where)
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


_V1_ABSENT = {"tombstones_key", "tombstones_sha256", "tombstones_bytes"}  # shard fields version 1 lacks
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
    _check_fields(raw, ShardEntry, where, optional=_V1_ABSENT | _V1_SHARD_STATS if schema_version == 1 else set())
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
    )
    if entry.bundle_key != bundle_key(entry.bundle_sha256):
        raise ManifestError(f"{where}: field 'bundle_key' must be {bundle_key(entry.bundle_sha256)!r}, got {entry.bundle_key!r}")
    if entry.state_key != state_key(entry.state_sha256):
        raise ManifestError(f"{where}: field 'state_key' must be {state_key(entry.state_sha256)!r}, got {entry.state_key!r}")
    if tombstones and entry.tombstones_key != tombstones_key(entry.tombstones_sha256):
        raise ManifestError(f"{where}: field 'tombstones_key' must be {tombstones_key(entry.tombstones_sha256)!r}, "
                            f"got {entry.tombstones_key!r}")
    for table, key in entry.stats.items():
        if not key.startswith(f"stats/{table}/") or not key.endswith(".parquet"):
            raise ManifestError(f"{where}: field 'stats' names {key!r} for table {table!r}; "
                                f"expected stats/{table}/<sha256>.parquet")
    return entry
