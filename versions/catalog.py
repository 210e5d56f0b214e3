"""Reading the versioned store: CURRENT, manifests, verified objects, published versions, audit.

Every read of a shard's objects goes through :func:`verified_bytes` (size and sha256 against the
manifest). Which versions count as *published*: the current one, any parent of a manifest, and
any version named by a publish or rollback audit record; orphan manifests of crashed runs never
do (see versions.publish).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import pyarrow as pa

from schemas.bundle import decode_bundle, decode_layer, merge_bundle_chain
from schemas.facts import decode_fact_state, decode_tombstones, empty_tombstones, merge_state_chain
from schemas.manifest import LayerEntry, Manifest, ManifestError, ShardEntry, StateLayer, manifest_key
from versions.errors import IntegrityError, PublishError, UnknownVersion
from versions.layout import AUDIT_PREFIX, CURRENT_KEY, MANIFEST_PREFIX, manifest_version
from versions.store import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurrentPointer:
    version: int
    manifest_key: str
    etag: str


@dataclass(frozen=True)
class VersionInfo:
    version: int
    current: bool
    created_at: str
    parent: int | None
    users: int
    facts: int
    bytes: int


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_pointer(store: ObjectStore) -> CurrentPointer | None:
    try:
        body, etag = store.get_with_etag(CURRENT_KEY)
    except ObjectNotFound:
        published = _published_without_pointer(store)
        if not published:
            store.check_not_an_object()  # no store here: a file's URI given as the store?
            return None
        try:  # a first publish may have committed since CURRENT was read: then it is there now
            body, etag = store.get_with_etag(CURRENT_KEY)
        except ObjectNotFound:
            raise PublishError(
                f"{store.uri}/{CURRENT_KEY} is missing, but the store holds published versions "
                f"({', '.join(f'v{v}' for v in published[-5:])}): it is not a new store, and no writer may treat it "
                f"as one (a new first version would drop its watermark, tombstones and forgets). Point CURRENT at "
                f"the version to serve: engram rollback --store {store.uri} --to {published[-1]}") from None
    try:
        raw = json.loads(body)
        version, key = raw["version"], raw["manifest_key"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise PublishError(f"{store.uri}/{CURRENT_KEY}: not a valid pointer ({body[:80]!r})") from None
    if not isinstance(version, int) or key != manifest_key(version):
        raise PublishError(f"{store.uri}/{CURRENT_KEY}: pointer {raw} is inconsistent")
    return CurrentPointer(version, key, etag)


def _published_without_pointer(store: ObjectStore) -> list[int]:
    """Manifest versions on disk (sorted) when CURRENT is missing but some version was published
    (a manifest with a parent, or a commit in the audit log); [] for a new store, or one whose only
    manifests a killed first night left before its commit."""
    versions = sorted(manifest_versions_on_disk(store))
    if not versions:
        return []
    for version in reversed(versions):
        try:
            if read_manifest(store, version).parent is not None:
                return versions
        except (PublishError, ManifestError):
            continue
    for key in store.list(AUDIT_PREFIX):
        try:
            record = json.loads(store.get(key))
        except (ObjectNotFound, ValueError):
            continue
        if isinstance(record, dict) and record.get("event") not in ("forget", "gc", None):
            return versions  # publish, rollback, forget_rewrite, ...: a commit moved CURRENT once
    return []


def manifest_versions_on_disk(store: ObjectStore) -> list[int]:
    return [v for key in store.list(MANIFEST_PREFIX) if (v := manifest_version(key)) is not None]


def read_manifest(store: ObjectStore, version: int) -> Manifest:
    key = manifest_key(version)
    try:
        body = store.get(key)
    except ObjectNotFound:
        available = manifest_versions_on_disk(store)
        raise UnknownVersion(f"{store.uri}: version {version} does not exist or was collected "
                             f"(available: {available or 'none'})") from None
    manifest = Manifest.from_json(body, source=f"{store.uri}/{key}")
    if manifest.version != version:
        raise PublishError(f"{store.uri}/{key}: holds version {manifest.version}, expected {version}")
    return manifest


def read_current(store: ObjectStore) -> tuple[Manifest, str] | None:
    """The current manifest and the etag of CURRENT (for a later compare-and-swap), or None."""
    pointer = read_pointer(store)
    if pointer is None:
        return None
    return read_manifest(store, pointer.version), pointer.etag


def verified_bytes(store: ObjectStore, key: str, size: int | None, sha256: str, *, reference: str | None = None,
                   fix: str = "") -> bytes:
    """The object's bytes, read once and checked against the size and sha256 its manifest records
    (``size`` None: not recorded, as for a stats part, whose key names its sha256); IntegrityError
    naming it otherwise. ``reference`` says what names the object (default: the manifest) and
    ``fix``, appended to the message, what to do about it."""
    where = f"{store.uri}/{key}"
    named = f" ({reference})" if reference else ""
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise IntegrityError(f"{where}: missing ({reference or 'the manifest references it'}){fix}") from None
    if size is not None and len(data) != size:
        raise IntegrityError(f"{where}: {len(data)} bytes, manifest says {size}{named}{fix}")
    actual = _sha256(data)
    if actual != sha256:
        held = f" ({len(data)} bytes)" if size is None else ""
        raise IntegrityError(f"{where}: sha256 {actual}{held} does not match the manifest's {sha256}{named}{fix}")
    return data


def load_base_bundle(store: ObjectStore, entry: ShardEntry) -> pa.Table:
    """The shard's base bundle table, after checking its size and sha256 against the manifest."""
    data = verified_bytes(store, entry.bundle_key, entry.bundle_bytes, entry.bundle_sha256)
    return decode_bundle(data, source=f"{store.uri}/{entry.bundle_key}")


def load_layer(store: ObjectStore, layer: LayerEntry, *, fingerprint: str | None = None) -> pa.Table:
    """One delta layer (schemas.bundle.LAYER_SCHEMA), verified (size, sha256, and the model
    fingerprint it was written for when ``fingerprint`` is given)."""
    data = verified_bytes(store, layer.key, layer.bytes, layer.sha256)
    return decode_layer(data, source=f"{store.uri}/{layer.key}", fingerprint=fingerprint)


def load_shard_bundle(store: ObjectStore, entry: ShardEntry) -> pa.Table:
    """The shard's deltas as one bundle table: the base with its layers merged (newest entry per
    user wins, tombstones remove), every object verified."""
    base = load_base_bundle(store, entry)
    if not entry.layers:
        return base
    return merge_bundle_chain(base, [load_layer(store, layer) for layer in entry.layers])


def load_shard_state_bytes(store: ObjectStore, entry: ShardEntry) -> bytes:
    """The shard's base fact-state object, verified (size and sha256) before it is returned."""
    return verified_bytes(store, entry.state_key, entry.state_bytes, entry.state_sha256)


def load_state_layer(store: ObjectStore, layer: StateLayer) -> tuple[pa.Table, pa.Table]:
    """One state layer's (facts, tombstones), verified."""
    state = verified_bytes(store, layer.state_key, layer.state_bytes, layer.state_sha256)
    if layer.tombstones_key is None:
        tombstones = empty_tombstones()
    else:
        data = verified_bytes(store, layer.tombstones_key, layer.tombstones_bytes, layer.tombstones_sha256)
        tombstones = decode_tombstones(data, source=f"{store.uri}/{layer.tombstones_key}")
    return decode_fact_state(state, source=f"{store.uri}/{layer.state_key}"), tombstones


def load_base_tombstones(store: ObjectStore, entry: ShardEntry) -> pa.Table:
    """The shard's base tombstones, verified; empty for a shard that keeps none (from version 1)."""
    if entry.tombstones_key is None:
        return empty_tombstones()
    data = verified_bytes(store, entry.tombstones_key, entry.tombstones_bytes, entry.tombstones_sha256)
    return decode_tombstones(data, source=f"{store.uri}/{entry.tombstones_key}")


def load_shard_fact_state(store: ObjectStore, entry: ShardEntry) -> tuple[pa.Table, pa.Table]:
    """The shard's fact state and tombstones: the base with its state layers merged, verified."""
    state = decode_fact_state(load_shard_state_bytes(store, entry), source=f"{store.uri}/{entry.state_key}")
    tombstones = load_base_tombstones(store, entry)
    if not entry.state_layers:
        return state, tombstones
    return merge_state_chain(state, tombstones, [load_state_layer(store, layer) for layer in entry.state_layers])


def load_shard_state(store: ObjectStore, entry: ShardEntry) -> pa.Table:
    """The shard's fact state (schemas.facts.FACT_STATE_SCHEMA, layers merged), verified."""
    return load_shard_fact_state(store, entry)[0]


def load_shard_tombstones(store: ObjectStore, entry: ShardEntry) -> pa.Table:
    """The shard's tombstones (schemas.facts.TOMBSTONE_SCHEMA, layers merged), verified."""
    return load_shard_fact_state(store, entry)[1]


def read_audit(store: ObjectStore) -> list[dict]:
    """Every audit record, oldest first. Raises PublishError naming a record that is not a JSON
    object (the records say which versions were published and which a forget rewrote, so one is
    never skipped)."""
    records = []
    for key in store.list(AUDIT_PREFIX):
        try:
            record = json.loads(store.get(key))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            record = err
        if not isinstance(record, dict):
            raise PublishError(f"{store.uri}: audit record {key} is damaged ({record}); restore it from a backup or "
                               "the store's versioning, or move it aside after checking what it recorded")
        records.append(record)
    return records


def _published_set(store: ObjectStore, manifests: dict[int, Manifest], pointer: CurrentPointer | None) -> set[int]:
    published = {m.parent for m in manifests.values() if m.parent is not None}
    if pointer is not None:
        published.add(pointer.version)
    for record in read_audit(store):
        for field in ("version", "from_version", "to_version"):
            if isinstance(record.get(field), int):
                published.add(record[field])
    return published & manifests.keys()


def manifest_inventory(store: ObjectStore) -> tuple[dict[int, Manifest], dict[int, str]]:
    """Every manifest on disk, in two parts: version -> manifest for those that load, and
    version -> why for those that do not (not JSON, truncated, a bad field, a broken layer chain,
    a file holding another version). A manifest deleted between the listing and its read (a
    concurrent gc or forget) is in neither. Store failures (permissions, outage) are raised."""
    readable, unreadable = {}, {}
    for version in manifest_versions_on_disk(store):
        try:
            readable[version] = read_manifest(store, version)
        except UnknownVersion:
            continue  # gone since the listing
        except (ManifestError, PublishError) as err:
            unreadable[version] = str(err)
    return readable, unreadable


def readable_manifests(store: ObjectStore) -> dict[int, Manifest]:
    """Every manifest on disk that parses; a damaged one is logged and left out (it can be
    neither read nor rolled back to, and must not block the versions that are intact)."""
    manifests, unreadable = manifest_inventory(store)
    for why in unreadable.values():
        log.warning("%s: skipping damaged manifest: %s", store.uri, why)
    return manifests


def damaged_manifests(store: ObjectStore) -> dict[int, str]:
    """version -> why its manifest is refused, for every manifest on disk that does not load
    (not JSON, a bad field, a broken layer chain)."""
    return manifest_inventory(store)[1]


def published_among(store: ObjectStore, manifests: dict[int, Manifest], pointer: CurrentPointer | None) -> set[int]:
    """Which of ``manifests`` (readable ones, by version) are published (see the module docstring)."""
    return _published_set(store, manifests, pointer)


_READ = object()


def list_versions(store: ObjectStore, *, pointer=_READ) -> list[VersionInfo]:
    """Published, readable versions (see the module docstring), oldest first. ``pointer``: CURRENT
    as already read (None: treat CURRENT as naming nothing, e.g. when it is damaged); by default
    it is read here (PublishError if it is damaged)."""
    pointer = read_pointer(store) if pointer is _READ else pointer
    manifests = readable_manifests(store)
    # An eventually consistent listing may not show yet the manifests written moments ago: CURRENT
    # names its manifest, which names its parent, and so on; one missing (collected) or damaged
    # ends the walk, and is left out as the listing leaves it out.
    version, walked = (pointer.version if pointer is not None else None), set()
    while version is not None and version not in walked:
        walked.add(version)
        if version not in manifests:
            try:
                if not store.exists(manifest_key(version)):
                    break
                manifests[version] = read_manifest(store, version)
            except (UnknownVersion, ManifestError, PublishError):
                break
        version = manifests[version].parent
    published = _published_set(store, manifests, pointer)
    return [
        VersionInfo(m.version, pointer is not None and m.version == pointer.version, m.created_at, m.parent,
                    m.users, m.facts, m.total_bytes)
        for v, m in sorted(manifests.items()) if v in published
    ]


def published_versions(store: ObjectStore) -> set[int]:
    """Published version numbers (see the module docstring) whose manifest still exists."""
    pointer = read_pointer(store)
    manifests = {v: read_manifest(store, v) for v in manifest_versions_on_disk(store)}
    return _published_set(store, manifests, pointer)


def known_forgets(store: ObjectStore) -> set[str]:
    """Every forget recorded anywhere: readable manifests and forget audit records."""
    forgets = {h for m in readable_manifests(store).values() for h in m.forgotten}
    for record in read_audit(store):
        if record.get("event") == "forget" and record.get("found"):
            hashes = record["forgotten"]  # one hash, or a list when one forget named several users
            forgets |= set(hashes) if isinstance(hashes, list) else {hashes}
    return forgets


def read_watermark(manifest: Manifest | None) -> dict:
    """A version's watermark (``{"files": {path: identity}, "max_event_time": ...}``): what a night
    on top of it has already ingested; empty for no version or one without a watermark.

    Raises IntegrityError naming the version when the watermark is not a night's JSON object (a
    version published by another tool, or a damaged manifest)."""
    if manifest is None or not manifest.watermark:
        return {"files": {}, "max_event_time": None}
    try:
        watermark = json.loads(manifest.watermark)
    except ValueError:
        watermark = None
    if not isinstance(watermark, dict) or not isinstance(watermark.setdefault("files", {}), dict):
        raise IntegrityError(
            f"version {manifest.version}'s watermark is not a night's ({manifest.watermark[:60]!r}): the version was "
            "published by another tool, or its manifest is damaged, and a night on top of it cannot tell which log "
            "files are already in it. Roll back to a version a night published (engram versions, then engram "
            "rollback --to N)")
    return watermark
