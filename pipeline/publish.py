"""Publish: content-addressed shard objects, an immutable manifest per version, and the CURRENT pointer.

Store layout::

    CURRENT                          {"version": N, "manifest_key": "manifests/v0000000N.json"}
    manifests/v00000001.json         immutable, written with if_none_match
    objects/bundles/<sha256>.parquet shard bundles (schemas.bundle), shared between versions
    objects/state/<sha256>.parquet   per-shard fact state, shared between versions
    audit/<UTC timestamp>-<random>.json  one object per event (publish, rollback, forget, gc)
    partial/<sha256>/...             compiled chunks of a night not yet published (cleared after it)

A version becomes visible only through ``_swap_current``, the one compare-and-swap of CURRENT,
and only after every object it names was written and read back with the right size and
sha256 (invariant 5: complete or invisible). Everything else is immutable.

Version numbers and crashed runs. Manifests are named by version. A publish reads CURRENT (and
its etag) first and proposes ``previous.version + 1``. If that manifest already exists:

- CURRENT changed since we read it -> a competitor published: ``PublishConflict``;
- CURRENT unchanged and the existing manifest has our content (same parent, fingerprint,
  watermark, shards, stats, counts, forgotten; creation time and job id aside) -> it was left by
  a crashed run of this same publish (or our own write whose response was lost and retried):
  adopt it and go on to the swap;
- CURRENT unchanged, other content -> an orphan of a crashed run with other inputs, a version
  above CURRENT left by a rollback, or a live competitor that has not swapped yet: take the next
  number. Of several live publishers only one swap can succeed (all hold the same etag).

So an orphaned manifest never blocks a re-run, and never becomes visible: readers only follow
CURRENT, and ``list_versions`` / ``rollback`` only offer *published* versions: the current one,
any parent of a manifest, and any version named by a publish or rollback audit record.
A publish that crashes after the swap but before its audit record is still published (it is
current, or becomes a parent or the ``from`` of a rollback); its audit record is missing.

If a rollback leaves CURRENT below a version that users were forgotten in, ``rollback`` refuses
targets whose manifest does not carry every forget recorded in the current manifest, so a
rollback never restores a forgotten user's data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from pipeline.store import ObjectNotFound, ObjectStore, PreconditionFailed
from schemas.bundle import decode_bundle
from schemas.manifest import (
    MANIFEST_SCHEMA_VERSION,
    Manifest,
    ManifestError,
    ShardEntry,
    bundle_key,
    manifest_key,
    state_key,
)

log = logging.getLogger(__name__)

CURRENT_KEY = "CURRENT"
PARTIAL_PREFIX = "partial/"  # compiled chunks of an unfinished night (pipeline.compile.ChunkCheckpoints)
PUBLISH_STEPS = ("write_objects", "verify_objects", "write_manifest", "swap_current", "write_audit")
_MANIFEST_NAME = re.compile(r"^manifests/v(\d{8})\.json$")


class PublishError(RuntimeError):
    pass


class PublishConflict(PublishError):
    """Another publisher (or a rollback) moved CURRENT first; re-plan against the new CURRENT."""


class IntegrityError(PublishError):
    """An object's bytes do not match the size / sha256 its manifest records."""


class UnknownVersion(PublishError):
    pass


@dataclass(frozen=True)
class ShardPayload:
    """The encoded objects of one changed shard."""

    bundle: bytes  # schemas.bundle.encode_bundle output
    state: bytes  # the shard's fact state, Parquet


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


def shard_of(user_id: str, num_shards: int) -> int:
    return xxhash.xxh64_intdigest(user_id.encode("utf-8")) % num_shards


def forgotten_id(user_id: str) -> str:
    """How a forgotten user is recorded in manifests and audit records (never the raw id)."""
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------- reading


def _read_pointer(store: ObjectStore) -> CurrentPointer | None:
    try:
        body, etag = store.get_with_etag(CURRENT_KEY)
    except ObjectNotFound:
        return None
    try:
        raw = json.loads(body)
        version, key = raw["version"], raw["manifest_key"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise PublishError(f"{store.uri}/{CURRENT_KEY}: not a valid pointer ({body[:80]!r})") from None
    if not isinstance(version, int) or key != manifest_key(version):
        raise PublishError(f"{store.uri}/{CURRENT_KEY}: pointer {raw} is inconsistent")
    return CurrentPointer(version, key, etag)


def _published_versions_on_disk(store: ObjectStore) -> list[int]:
    return [int(m.group(1)) for key in store.list("manifests/") if (m := _MANIFEST_NAME.match(key))]


def read_manifest(store: ObjectStore, version: int) -> Manifest:
    key = manifest_key(version)
    try:
        body = store.get(key)
    except ObjectNotFound:
        available = _published_versions_on_disk(store)
        raise UnknownVersion(f"{store.uri}: version {version} does not exist or was collected "
                             f"(available: {available or 'none'})") from None
    manifest = Manifest.from_json(body, source=f"{store.uri}/{key}")
    if manifest.version != version:
        raise PublishError(f"{store.uri}/{key}: holds version {manifest.version}, expected {version}")
    return manifest


def read_current(store: ObjectStore) -> tuple[Manifest, str] | None:
    """The current manifest and the etag of CURRENT (for a later compare-and-swap), or None."""
    pointer = _read_pointer(store)
    if pointer is None:
        return None
    return read_manifest(store, pointer.version), pointer.etag


def _verified_bytes(store: ObjectStore, key: str, size: int, sha256: str) -> bytes:
    try:
        data = store.get(key)
    except ObjectNotFound:
        raise IntegrityError(f"{store.uri}/{key}: missing (the manifest references it)") from None
    if len(data) != size:
        raise IntegrityError(f"{store.uri}/{key}: {len(data)} bytes, manifest says {size}")
    actual = _sha256(data)
    if actual != sha256:
        raise IntegrityError(f"{store.uri}/{key}: sha256 {actual} does not match the manifest's {sha256}")
    return data


def load_shard_bundle(store: ObjectStore, entry: ShardEntry) -> pa.Table:
    """The shard's bundle table, after checking its size and sha256 against the manifest."""
    data = _verified_bytes(store, entry.bundle_key, entry.bundle_bytes, entry.bundle_sha256)
    return decode_bundle(data, source=f"{store.uri}/{entry.bundle_key}")


def load_shard_state_bytes(store: ObjectStore, entry: ShardEntry) -> bytes:
    """The shard's fact-state object, verified (size and sha256) before it is returned."""
    return _verified_bytes(store, entry.state_key, entry.state_bytes, entry.state_sha256)


def read_audit(store: ObjectStore) -> list[dict]:
    """Every audit record, oldest first."""
    return [json.loads(store.get(key)) for key in store.list("audit/")]


def _published_set(store: ObjectStore, manifests: dict[int, Manifest], pointer: CurrentPointer | None) -> set[int]:
    published = {m.parent for m in manifests.values() if m.parent is not None}
    if pointer is not None:
        published.add(pointer.version)
    for record in read_audit(store):
        for field in ("version", "from_version", "to_version"):
            if isinstance(record.get(field), int):
                published.add(record[field])
    return published & manifests.keys()


def _readable_manifests(store: ObjectStore) -> dict[int, Manifest]:
    """Every manifest on disk that parses; a damaged one is logged and left out (it can be
    neither read nor rolled back to, and must not block the versions that are intact)."""
    manifests = {}
    for version in _published_versions_on_disk(store):
        try:
            manifests[version] = read_manifest(store, version)
        except ManifestError as err:
            log.warning("%s: skipping damaged manifest: %s", store.uri, err)
    return manifests


def list_versions(store: ObjectStore) -> list[VersionInfo]:
    """Published, readable versions (see the module docstring), oldest first."""
    pointer = _read_pointer(store)
    manifests = _readable_manifests(store)
    published = _published_set(store, manifests, pointer)
    return [
        VersionInfo(m.version, pointer is not None and m.version == pointer.version, m.created_at, m.parent,
                    m.users, m.facts, m.total_bytes)
        for v, m in sorted(manifests.items()) if v in published
    ]


# ---------------------------------------------------------------- writing


def _swap_current(store: ObjectStore, manifest: Manifest, expected_etag: str | None) -> None:
    """The one compare-and-swap of CURRENT: point it at ``manifest`` if it still has ``expected_etag``."""
    body = json.dumps({"version": manifest.version, "manifest_key": manifest.key}, sort_keys=True).encode()
    try:
        if expected_etag is None:
            store.put(CURRENT_KEY, body, if_none_match=True)
        else:
            store.put(CURRENT_KEY, body, if_match=expected_etag)
    except PreconditionFailed:
        now = _read_pointer(store)
        if now is not None and now.version == manifest.version:
            return  # our write landed; a retried request then saw its own result
        seen = f"v{now.version}" if now else "nothing"
        raise PublishConflict(f"{store.uri}: CURRENT moved (now {seen}) before version {manifest.version} "
                              "could be made current; re-plan against the new CURRENT") from None


def _append_audit(store: ObjectStore, event: str, **fields) -> dict:
    now = _utc_now()
    record = {"event": event, "at": now.isoformat().replace("+00:00", "Z"), **fields}
    key = f"audit/{now.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}.json"
    store.put(key, json.dumps(record, sort_keys=True).encode(), if_none_match=True)
    return record


def _shard_entry(shard: int, payload: ShardPayload, where: str) -> ShardEntry:
    table = decode_bundle(payload.bundle, source=f"{where} shard {shard} bundle")
    bundle_sha, state_sha = _sha256(payload.bundle), _sha256(payload.state)
    rows = int(pc.sum(pc.list_value_length(table.column("row_ids"))).as_py() or 0)
    return ShardEntry(
        shard=shard,
        bundle_key=bundle_key(bundle_sha), bundle_sha256=bundle_sha, bundle_bytes=len(payload.bundle),
        state_key=state_key(state_sha), state_sha256=state_sha, state_bytes=len(payload.state),
        users=table.num_rows, facts=int(pc.sum(table.column("num_facts")).as_py() or 0), rows=rows,
    )


def _merge_shards(new: dict[int, ShardEntry], previous: Manifest | None, num_shards: int, where: str) -> tuple[ShardEntry, ...]:
    out_of_range = sorted(s for s in new if not 0 <= s < num_shards)
    if out_of_range:
        raise ValueError(f"{where}: shards {out_of_range} outside 0..{num_shards - 1}")
    carried = previous.shards if previous is not None and previous.num_shards == num_shards else ()
    merged = {e.shard: e for e in carried} | new
    missing = sorted(set(range(num_shards)) - merged.keys())
    if missing:
        raise ValueError(f"{where}: no payload for shards {missing[:10]} and no previous version with "
                         f"num_shards={num_shards} to carry them over from")
    return tuple(merged[s] for s in range(num_shards))


def _write_objects(store: ObjectStore, objects: dict[str, bytes]) -> None:
    for key, data in objects.items():
        info = store.head(key)
        if info is not None:
            if info.size != len(data):
                raise IntegrityError(f"{store.uri}/{key}: exists with {info.size} bytes, its content has {len(data)}; "
                                     "content-addressed objects are never overwritten (repair or collect it)")
            continue
        try:
            store.put(key, data, if_none_match=True)
        except PreconditionFailed:
            pass  # written concurrently by another publisher; the verify step checks its bytes


def _same_content(a: Manifest, b: Manifest) -> bool:
    ignore = {"version": 0, "created_at": "", "job_id": ""}
    return replace(a, **ignore) == replace(b, **ignore)


def _write_manifest(store: ObjectStore, draft: Manifest, pointer: CurrentPointer | None) -> Manifest:
    """Write ``draft`` under the first free version number from ``draft.version`` (see module docstring)."""
    version = draft.version
    while True:
        candidate = replace(draft, version=version)
        try:
            store.put(candidate.key, candidate.to_json().encode(), if_none_match=True)
            return candidate
        except PreconditionFailed:
            pass
        now = _read_pointer(store)
        if (now and now.etag) != (pointer and pointer.etag):
            raise PublishConflict(f"{store.uri}: version {version} was published by another publisher "
                                  f"(CURRENT is now v{now.version if now else '-'}); re-plan against it")
        existing = read_manifest(store, version)
        if _same_content(existing, candidate):
            log.info("%s: adopting %s left by an earlier run with the same content", store.uri, candidate.key)
            return existing
        version += 1


def publish_version(
    store: ObjectStore,
    *,
    shard_payloads: dict[int, ShardPayload],
    previous: Manifest | None,
    fingerprint: str,
    num_shards: int,
    job_id: str,
    watermark: str | None,
    stats: dict[str, str] | None = None,
    counts: dict[str, int] | None = None,
    forgotten_users: Iterable[str] = (),
    crash_hook: Callable[[str], None] | None = None,
) -> Manifest:
    """Publish the changed shards as the next version and make it current; returns its manifest.

    Shards missing from ``shard_payloads`` are carried over from ``previous`` by reference.
    ``forgotten_users`` are user_ids forgotten by this run (recorded hashed, cumulatively).
    If nothing changed (shards, fingerprint, watermark, forgets), nothing is written and
    ``previous`` is returned. ``crash_hook(step)`` runs before each of ``PUBLISH_STEPS``.
    Raises PublishConflict if CURRENT is not (or no longer) ``previous``.
    """
    hook = crash_hook or (lambda step: None)
    where = f"publish to {store.uri}"
    pointer = _read_pointer(store)
    planned = previous.version if previous is not None else None
    if (pointer.version if pointer else None) != planned:
        raise PublishConflict(f"{where}: CURRENT is v{pointer.version if pointer else '-'} but this publish was "
                              f"planned against v{planned or '-'}; re-plan against CURRENT")

    entries = {shard: _shard_entry(shard, payload, where) for shard, payload in shard_payloads.items()}
    shards = _merge_shards(entries, previous, num_shards, where)
    forgotten = tuple(sorted(set(previous.forgotten if previous else ()) | {forgotten_id(u) for u in forgotten_users}))
    if previous is not None and (shards, fingerprint, watermark, forgotten) == (
        previous.shards, previous.fingerprint, previous.watermark, previous.forgotten
    ):
        log.info("%s: nothing changed since v%d; nothing published", where, previous.version)
        return previous

    objects = {}
    for shard, entry in entries.items():
        objects[entry.bundle_key] = shard_payloads[shard].bundle
        objects[entry.state_key] = shard_payloads[shard].state
    hook("write_objects")
    _write_objects(store, objects)
    hook("verify_objects")
    for entry in entries.values():
        _verified_bytes(store, entry.bundle_key, entry.bundle_bytes, entry.bundle_sha256)
        _verified_bytes(store, entry.state_key, entry.state_bytes, entry.state_sha256)

    draft = Manifest(
        schema_version=MANIFEST_SCHEMA_VERSION,
        version=planned + 1 if planned else 1,
        parent=planned,
        created_at=_utc_now().isoformat().replace("+00:00", "Z"),
        job_id=job_id,
        watermark=watermark,
        fingerprint=fingerprint,
        num_shards=num_shards,
        shards=shards,
        stats=dict(stats or {}),
        counts=dict(counts or {}),
        forgotten=forgotten,
    )
    draft.validate()
    hook("write_manifest")
    manifest = _write_manifest(store, draft, pointer)
    hook("swap_current")
    _swap_current(store, manifest, pointer.etag if pointer else None)
    hook("write_audit")
    _append_audit(store, "publish", actor=job_id, version=manifest.version, parent=manifest.parent,
                  manifest_key=manifest.key, changed_shards=sorted(entries), users=manifest.users,
                  facts=manifest.facts)
    log.info("%s: v%d is current (%d changed shards)", where, manifest.version, len(entries))
    return manifest


def _known_forgets(store: ObjectStore) -> set[str]:
    """Every forget recorded anywhere: readable manifests and forget audit records."""
    forgets = {h for m in _readable_manifests(store).values() for h in m.forgotten}
    forgets |= {r["forgotten"] for r in read_audit(store) if r.get("event") == "forget" and r.get("found")}
    return forgets


def rollback(store: ObjectStore, to_version: int, *, reason: str, actor: str) -> Manifest:
    """Move CURRENT to a retained published version (older or newer) and record who, when and why."""
    if not reason or not actor:
        raise ValueError("rollback: reason and actor are required (they go into the audit log)")
    pointer = _read_pointer(store)
    if pointer is None:
        raise UnknownVersion(f"{store.uri}: nothing is published yet; cannot roll back to version {to_version}")
    etag = pointer.etag
    try:
        manifest = read_manifest(store, pointer.version)
    except ManifestError as err:
        # Rolling back is the remedy for a damaged current version, so it must not need it.
        # Its forgets are then taken from everything else that records one (conservative).
        log.warning("%s: current manifest is damaged (%s); rolling back away from it", store.uri, err)
        manifest = None
    if manifest is not None and to_version == manifest.version:
        return manifest
    available = [info.version for info in list_versions(store)]
    if to_version not in available:
        raise UnknownVersion(f"{store.uri}: version {to_version} does not exist, was never published or was "
                             f"collected (available: {available})")
    target = read_manifest(store, to_version)
    for entry in target.shards:
        for key, size in ((entry.bundle_key, entry.bundle_bytes), (entry.state_key, entry.state_bytes)):
            info = store.head(key)
            if info is None or info.size != size:
                raise UnknownVersion(f"{store.uri}: version {to_version} was collected ({key} is missing or "
                                     f"damaged; available: {available})")
    forgets = set(manifest.forgotten) if manifest is not None else _known_forgets(store)
    lost_forgets = forgets - set(target.forgotten)
    if lost_forgets:
        raise PublishError(f"{store.uri}: version {to_version} predates the forget of {len(lost_forgets)} user(s) "
                           f"recorded in version {pointer.version}; rolling back to it would restore their data")
    _swap_current(store, target, etag)
    _append_audit(store, "rollback", actor=actor, reason=reason, from_version=pointer.version,
                  to_version=to_version)
    log.info("%s: rolled CURRENT from v%d to v%d (%s)", store.uri, pointer.version, to_version, reason)
    return target


# ---------------------------------------------------------------- rewrites (forget, gc)
# Public entry points for pipeline.forget and pipeline.gc, which write whole new versions
# derived from existing ones; they reuse the same write, verify, manifest and CAS steps.


def read_pointer(store: ObjectStore) -> CurrentPointer | None:
    """CURRENT as (version, manifest key, etag), or None when nothing is published."""
    return _read_pointer(store)


def manifest_versions_on_disk(store: ObjectStore) -> list[int]:
    """Every manifest's version number, published or not (orphans of crashed runs included)."""
    return _published_versions_on_disk(store)


def published_versions(store: ObjectStore) -> set[int]:
    """Published version numbers (see the module docstring) whose manifest still exists."""
    pointer = _read_pointer(store)
    manifests = {v: read_manifest(store, v) for v in _published_versions_on_disk(store)}
    return _published_set(store, manifests, pointer)


def shard_entry_for(shard: int, payload: ShardPayload, where: str) -> ShardEntry:
    """The manifest entry of a shard payload (keys are the payloads' sha256)."""
    return _shard_entry(shard, payload, where)


def write_verified_objects(store: ObjectStore, objects: dict[str, bytes]) -> None:
    """Write content-addressed objects (never overwriting) and read each back against its sha256."""
    _write_objects(store, objects)
    for key, data in objects.items():
        _verified_bytes(store, key, len(data), _sha256(data))


def write_derived_manifest(store: ObjectStore, draft: Manifest, pointer: CurrentPointer | None) -> Manifest:
    """Write ``draft`` under the first free version number from ``draft.version`` (same rules as publish)."""
    draft.validate()
    return _write_manifest(store, draft, pointer)


def swap_current(store: ObjectStore, manifest: Manifest, expected_etag: str | None) -> None:
    """The compare-and-swap of CURRENT (raises PublishConflict if it moved)."""
    _swap_current(store, manifest, expected_etag)


def append_audit(store: ObjectStore, event: str, **fields) -> dict:
    """Append one audit record; an int ``version`` field marks that version as published."""
    return _append_audit(store, event, **fields)
