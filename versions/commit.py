"""The one path that changes what readers see: writing objects and manifests, and moving CURRENT.

:func:`swap_current` is the only compare-and-swap of CURRENT in the product; publish, rollback
and forget all end in :func:`commit`, which performs it and appends the audit record. Objects are
content-addressed and never overwritten; a manifest takes the first free version number from its
draft's (see versions.publish for how crashed runs and competitors are told apart).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from dataclasses import replace
from datetime import datetime, timezone
from typing import Callable

from schemas.manifest import Manifest, ManifestError
from versions.catalog import CurrentPointer, read_manifest, read_pointer, verified_bytes
from versions.errors import IntegrityError, PublishConflict, PublishError
from versions.layout import AUDIT_PREFIX, CURRENT_KEY
from versions.store import ObjectStore, PreconditionFailed

log = logging.getLogger(__name__)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def swap_current(store: ObjectStore, manifest: Manifest, expected_etag: str | None) -> None:
    """The one compare-and-swap of CURRENT: point it at ``manifest`` if it still has ``expected_etag``."""
    body = json.dumps({"version": manifest.version, "manifest_key": manifest.key}, sort_keys=True).encode()
    try:
        if expected_etag is None:
            store.put(CURRENT_KEY, body, if_none_match=True)
        else:
            store.put(CURRENT_KEY, body, if_match=expected_etag)
    except PreconditionFailed:
        now = read_pointer(store)
        if now is not None and now.version == manifest.version:
            return  # our write landed; a retried request then saw its own result
        seen = f"v{now.version}" if now else "nothing"
        raise PublishConflict(f"{store.uri}: CURRENT moved (now {seen}) before version {manifest.version} "
                              "could be made current; re-plan against the new CURRENT") from None


def append_audit(store: ObjectStore, event: str, **fields) -> dict:
    now = utc_now()
    record = {"event": event, "at": now.isoformat().replace("+00:00", "Z"), **fields}
    key = f"{AUDIT_PREFIX}{now.strftime('%Y%m%dT%H%M%S%fZ')}-{secrets.token_hex(4)}.json"
    store.put(key, json.dumps(record, sort_keys=True).encode(), if_none_match=True)
    return record


def write_objects(store: ObjectStore, objects: dict[str, bytes]) -> None:
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


def write_verified_objects(store: ObjectStore, objects: dict[str, bytes]) -> None:
    """Write content-addressed objects (never overwriting) and read each back against its sha256."""
    write_objects(store, objects)
    for key, data in objects.items():
        verified_bytes(store, key, len(data), _sha256(data))


def _same_content(a: Manifest, b: Manifest) -> bool:
    """Whether two manifests publish the same thing: everything but their number, time, job and
    stats parts (a re-run's ``runs`` part holds its own timings) is equal."""
    ignore = {"version": 0, "created_at": "", "job_id": "", "stats": {}}
    return replace(a, **ignore) == replace(b, **ignore)


def write_manifest(store: ObjectStore, draft: Manifest, pointer: CurrentPointer | None) -> Manifest:
    """Write ``draft`` under the first free version number from ``draft.version`` (see module
    docstring). Raises ManifestError, before anything is written, for a draft that the store's
    readers would refuse (its JSON is read back with the readers' own checks): a version nobody
    can read must never become a candidate for CURRENT."""
    Manifest.from_json(draft.to_json(), source=f"{draft.key} (to be written)")
    version = draft.version
    while True:
        candidate = replace(draft, version=version)
        try:
            store.put(candidate.key, candidate.to_json().encode(), if_none_match=True)
            return candidate
        except PreconditionFailed:
            pass
        now = read_pointer(store)
        if (now and now.etag) != (pointer and pointer.etag):
            raise PublishConflict(f"{store.uri}: version {version} was published by another publisher "
                                  f"(CURRENT is now v{now.version if now else '-'}); re-plan against it")
        try:
            existing = read_manifest(store, version)
        except (ManifestError, PublishError) as err:  # a damaged manifest above CURRENT (rolled back away from)
            log.warning("%s: %s is taken by an unreadable manifest (%s); trying the next number", store.uri,
                        candidate.key, err)
            version += 1
            continue
        if _same_content(existing, candidate):
            log.info("%s: adopting %s left by an earlier run with the same content", store.uri, candidate.key)
            return existing
        version += 1


def commit(store: ObjectStore, manifest: Manifest, expected: CurrentPointer | None, *, event: str, actor: str,
           hook: Callable[[str], None] = lambda step: None, **audit_fields) -> Manifest:
    """Make ``manifest`` (already written) current if CURRENT is still ``expected``, then record
    ``event`` in the audit log. Raises PublishConflict if CURRENT moved. ``hook(step)`` runs before
    the ``swap_current`` and ``write_audit`` steps (crash tests)."""
    hook("swap_current")
    swap_current(store, manifest, expected.etag if expected is not None else None)
    hook("write_audit")
    append_audit(store, event, actor=actor, **audit_fields)
    return manifest
