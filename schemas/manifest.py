"""The manifest: one immutable JSON object per published version.

It names everything a reader needs: the parent version, when and by which job it was made,
the input watermark, the base fingerprint the deltas were compiled against, and per shard the
content-addressed bundle and fact-state objects with their sha256 and size. ``forgotten``
holds the sha256 (hex) of every user_id forgotten up to this version, so a rollback can refuse
a version that predates a forget. Loading validates every field and names the bad one.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime

MANIFEST_SCHEMA_VERSION = 1

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class ManifestError(ValueError):
    pass


def manifest_key(version: int) -> str:
    return f"manifests/v{version:08d}.json"


def bundle_key(sha256: str) -> str:
    return f"objects/bundles/{sha256}.parquet"


def state_key(sha256: str) -> str:
    return f"objects/state/{sha256}.parquet"


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
    stats: dict[str, str] = field(default_factory=dict)  # stats table -> key prefix
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
        return sum(s.bundle_bytes + s.state_bytes for s in self.shards)

    def shard(self, shard: int) -> ShardEntry:
        return self.shards[shard]

    def to_dict(self) -> dict:
        out = asdict(self)
        out["shards"] = [asdict(s) for s in self.shards]
        out["forgotten"] = list(self.forgotten)
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
        _check_fields(raw, cls, where)
        schema_version = _int(raw, "schema_version", where, minimum=1)
        if schema_version != MANIFEST_SCHEMA_VERSION:
            raise ManifestError(f"{where}: field 'schema_version' is {schema_version}; this engram reads "
                                f"version {MANIFEST_SCHEMA_VERSION} (upgrade engram to read newer manifests)")
        raw_shards = raw["shards"]
        if not isinstance(raw_shards, list):
            raise ManifestError(f"{where}: field 'shards' must be a list")
        shards = tuple(_shard_entry(s, f"{where} shards[{i}]") for i, s in enumerate(raw_shards))
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
            stats=_mapping(raw, "stats", where, str),
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


def _check_fields(raw: dict, cls, where: str) -> None:
    names = {f.name for f in fields(cls)}
    missing = names - raw.keys()
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


def _forgotten(raw: dict, where: str) -> tuple[str, ...]:
    value = raw["forgotten"]
    if not isinstance(value, list) or not all(isinstance(v, str) and _SHA256.match(v) for v in value):
        raise ManifestError(f"{where}: field 'forgotten' must be a list of sha256 hex digests")
    if value != sorted(set(value)):
        raise ManifestError(f"{where}: field 'forgotten' must be sorted and unique")
    return tuple(value)


def _shard_entry(raw, where: str) -> ShardEntry:
    if not isinstance(raw, dict):
        raise ManifestError(f"{where}: must be a JSON object")
    _check_fields(raw, ShardEntry, where)
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
    )
    if entry.bundle_key != bundle_key(entry.bundle_sha256):
        raise ManifestError(f"{where}: field 'bundle_key' must be {bundle_key(entry.bundle_sha256)!r}, got {entry.bundle_key!r}")
    if entry.state_key != state_key(entry.state_sha256):
        raise ManifestError(f"{where}: field 'state_key' must be {state_key(entry.state_sha256)!r}, got {entry.state_key!r}")
    return entry
