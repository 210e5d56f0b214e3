"""Publish: content-addressed shard objects, an immutable manifest per version, and the CURRENT pointer.

The key layout is versions.layout's. A version becomes visible only through
``versions.commit.commit`` (its one compare-and-swap of CURRENT), and only after every object it
names was written and read back with the right size and sha256 (invariant 5: complete or
invisible). Everything else is immutable.

Version numbers and crashed runs. Manifests are named by version. A publish reads CURRENT (and
its etag) first and proposes ``previous.version + 1``. If that manifest already exists:

- CURRENT changed since we read it -> a competitor published: ``PublishConflict``;
- CURRENT unchanged and the existing manifest has our content (same parent, fingerprint,
  watermark, shards, counts, forgotten; creation time, job id and stats parts aside) -> it was left by
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

If a rollback (versions.rollback) leaves CURRENT below a version that users were forgotten in, ``rollback`` refuses
targets whose manifest does not carry every forget recorded in the current manifest, so a
rollback never restores a forgotten user's data.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import pyarrow.compute as pc

from schemas.bundle import decode_bundle
from schemas.manifest import MANIFEST_SCHEMA_VERSION, Manifest, ScopesEntry, ShardEntry, bundle_key, state_key
from versions.catalog import read_pointer, verified_bytes
from versions.commit import commit, utc_now, write_manifest, write_objects
from versions.errors import IntegrityError, PublishConflict
from versions.layout import forgotten_id
from versions.store import ObjectStore

log = logging.getLogger(__name__)

PUBLISH_STEPS = ("write_objects", "verify_objects", "write_manifest", "swap_current", "write_audit")


@dataclass(frozen=True)
class ShardPayload:
    """The encoded objects of one changed shard."""

    bundle: bytes  # schemas.bundle.encode_bundle output
    state: bytes  # the shard's fact state, Parquet


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def shard_entry_for(shard: int, payload: ShardPayload, where: str) -> ShardEntry:
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


def publish_version(
    store: ObjectStore,
    *,
    shard_payloads: dict[int, ShardPayload],
    previous: Manifest | None,
    fingerprint: str,
    num_shards: int,
    job_id: str,
    watermark: str | None,
    stats: dict[str, list[str]] | None = None,
    counts: dict[str, int] | None = None,
    forgotten_users: Iterable[str] = (),
    crash_hook: Callable[[str], None] | None = None,
) -> Manifest:
    """Publish changed shards given as encoded objects (``shard_payloads``) as the next version and
    make it current; returns its manifest. See :func:`publish_entries`."""
    where = f"publish to {store.uri}"
    entries = {shard: shard_entry_for(shard, payload, where) for shard, payload in shard_payloads.items()}
    objects = {}
    for shard, entry in entries.items():
        objects[entry.bundle_key] = shard_payloads[shard].bundle
        objects[entry.state_key] = shard_payloads[shard].state
    return publish_entries(store, entries=entries, objects=objects, previous=previous, fingerprint=fingerprint,
                           num_shards=num_shards, job_id=job_id, watermark=watermark, stats=stats, counts=counts,
                           forgotten_users=forgotten_users, crash_hook=crash_hook)


def _check_planned(store: ObjectStore, previous: Manifest | None, where: str):
    pointer = read_pointer(store)
    planned = previous.version if previous is not None else None
    if (pointer.version if pointer else None) != planned:
        raise PublishConflict(f"{where}: CURRENT moved to v{pointer.version if pointer else '-'} while this publish "
                              f"was planned against v{planned or '-'} (another night, compact, rollback or forget "
                              "published meanwhile); nothing was published. Run it again (a night reads what the new "
                              "CURRENT has not), and schedule nights so that two never run at once")
    return pointer


def _forgotten(previous: Manifest | None, forgotten_users: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(previous.forgotten if previous else ()) | {forgotten_id(u) for u in forgotten_users}))


def _unchanged(previous: Manifest | None, shards, fingerprint: str, watermark: str | None, forgotten, scopes) -> bool:
    return previous is not None and (shards, fingerprint, watermark, forgotten, scopes) == (
        previous.shards, previous.fingerprint, previous.watermark, previous.forgotten, previous.scopes)


CARRY = "carry"
"""``publish_entries(scopes=CARRY)``: the new version keeps the previous version's scopes."""


def publish_entries(
    store: ObjectStore,
    *,
    entries: dict[int, ShardEntry],
    objects: dict[str, bytes] | None = None,
    previous: Manifest | None,
    fingerprint: str,
    num_shards: int,
    job_id: str,
    watermark: str | None,
    stats: dict[str, list[str]] | None = None,
    counts: dict[str, int] | None = None,
    forgotten_users: Iterable[str] = (),
    crash_hook: Callable[[str], None] | None = None,
    scopes: ScopesEntry | None | str = CARRY,
    record: bool = False,
    before_swap: Callable[[Manifest], None] | None = None,
) -> Manifest:
    """Publish the changed shards' entries as the next version and make it current; returns its manifest.

    ``objects`` (key -> bytes) are written here and read back against their sha256; every other
    object the new entries and ``stats`` name must already be in the store (the night's shard
    tasks write and read back their own) and is checked by size, without downloading it.
    Shards missing from ``entries`` are carried over from ``previous`` by reference. ``stats``
    maps a stats table to the keys of this version's version-level parts.
    ``forgotten_users`` are user_ids forgotten by this run (recorded hashed, cumulatively). If
    nothing changed (shards, fingerprint, watermark, forgets), nothing is written and
    ``previous`` is returned. Every object the new entries and ``stats`` name is checked to be in
    the store with its size before the manifest is written. ``crash_hook(step)`` runs before each
    of ``PUBLISH_STEPS``. Raises PublishConflict if CURRENT is not (or no longer) ``previous``,
    IntegrityError if an object is missing or of the wrong size. ``scopes``: the version's shared
    scopes (schemas.manifest.ScopesEntry, None for none), by default the previous version's.
    ``record``: publish even if nothing else changed (a night whose only news is rejected rows: they
    are recorded in the new version; a night's files rejected whole alone are not, see jobs.nightly).
    ``before_swap(manifest)`` runs once the manifest is written, before CURRENT moves to it: an
    exception it raises leaves the version unpublished (the night's check that no forget beside it
    deleted an object the version names).
    """
    hook = crash_hook or (lambda step: None)
    if isinstance(scopes, str):
        if scopes != CARRY:
            raise ValueError(f"publish_entries: scopes must be a ScopesEntry, None or CARRY, got {scopes!r}")
        scopes = previous.scopes if previous is not None else None
    where = f"publish to {store.uri}"
    store.check_conditional_writes()  # the compare-and-swap below needs them (once per store object)
    pointer = _check_planned(store, previous, where)
    shards = _merge_shards(entries, previous, num_shards, where)
    forgotten = _forgotten(previous, forgotten_users)
    if not record and _unchanged(previous, shards, fingerprint, watermark, forgotten, scopes):
        log.info("%s: nothing changed since v%d; nothing published", where, previous.version)
        return previous
    objects = dict(objects or {})
    hook("write_objects")
    write_objects(store, objects)
    hook("verify_objects")
    for key, data in objects.items():
        verified_bytes(store, key, len(data), _sha256(data))
    sizes: dict[str, int | None] = {key: None for keys in (stats or {}).values() for key in keys}
    for entry in entries.values():
        sizes |= entry.sized_objects()
    if scopes is not None:
        sizes |= scopes.sized_objects()
    for key, size in sorted(sizes.items()):
        if key not in objects:
            _check_size(store, key, size)

    planned = previous.version if previous is not None else None
    draft = Manifest(
        schema_version=MANIFEST_SCHEMA_VERSION,
        version=planned + 1 if planned else 1,
        parent=planned,
        created_at=utc_now().isoformat().replace("+00:00", "Z"),
        job_id=job_id,
        watermark=watermark,
        fingerprint=fingerprint,
        num_shards=num_shards,
        shards=shards,
        stats={table: tuple(keys) for table, keys in (stats or {}).items()},
        counts=dict(counts or {}),
        forgotten=forgotten,
        scopes=scopes,
    )
    draft.validate()
    hook("write_manifest")
    manifest = write_manifest(store, draft, pointer)
    if before_swap is not None:
        before_swap(manifest)
    commit(store, manifest, pointer, event="publish", actor=job_id, hook=hook, version=manifest.version,
           parent=manifest.parent, manifest_key=manifest.key, changed_shards=sorted(entries), users=manifest.users,
           facts=manifest.facts)
    log.info("%s: v%d is current (%d shard entries written: deltas, fact state or stats; the others carried)", where,
             manifest.version, len(entries))
    return manifest


def _check_size(store: ObjectStore, key: str, size: int | None) -> None:
    info = store.head(key)
    if info is None:
        raise IntegrityError(f"{store.uri}/{key}: missing (the new version references it)")
    if size is not None and info.size != size:
        raise IntegrityError(f"{store.uri}/{key}: {info.size} bytes, the new version says {size}")
