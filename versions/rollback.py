"""Rollback: move CURRENT to a retained published version (older or newer), with an audit record."""

from __future__ import annotations

import logging

from schemas.manifest import Manifest, ManifestError
from versions.catalog import (
    CurrentPointer,
    damaged_manifests,
    known_forgets,
    list_versions,
    read_audit,
    read_manifest,
    read_pointer,
    read_watermark,
)
from versions.commit import commit
from versions.errors import IntegrityError, PublishError, UnknownVersion
from versions.layout import CURRENT_KEY
from versions.store import ObjectNotFound, ObjectStore

log = logging.getLogger(__name__)

DAMAGED = -1  # the version of a CURRENT pointer that cannot be read


def files_read_again(before: Manifest | None, target: Manifest) -> list[str]:
    """The log files the next night reads again after CURRENT moves from ``before`` to ``target``:
    those ``before``'s watermark records as ingested (path, size, times) that ``target``'s does not
    record the same way. A night reads every file its CURRENT's watermark lacks, so a rollback past a
    night's files is undone by the next night unless they are moved out of the fact log (or
    corrected) first. Sorted paths; empty when ``before`` is unknown (a damaged CURRENT)."""
    def files(manifest: Manifest | None) -> dict:
        try:
            return dict(read_watermark(manifest).get("files") or {})
        except IntegrityError:  # a watermark that is not a night's: no file to name
            return {}

    kept = files(target)
    return sorted(path for path, identity in files(before).items() if kept.get(path) != identity)


def rollback(store: ObjectStore, to_version: int, *, reason: str, actor: str) -> Manifest:
    """Move CURRENT to a retained published version (older or newer) and record who, when and why."""
    if not reason or not actor:
        raise ValueError("rollback: reason and actor are required (they go into the audit log)")
    store.check_conditional_writes()  # the compare-and-swap of CURRENT needs them (once per store object)
    try:
        pointer = read_pointer(store)
    except PublishError as err:
        # A damaged CURRENT (not JSON, inconsistent): rollback is its remedy too. The swap is
        # conditional on the damaged object's etag, the forgets are everything recorded anywhere.
        log.warning("%s: CURRENT is damaged or missing (%s); rolling back away from it", store.uri, err)
        try:
            _, etag = store.get_with_etag(CURRENT_KEY)
        except ObjectNotFound:  # missing while versions were published: the swap creates it
            etag = None
        pointer = CurrentPointer(DAMAGED, "", etag)
    if pointer is None:
        raise UnknownVersion(f"{store.uri}: nothing is published yet; cannot roll back to version {to_version} (no "
                             "version exists: check --store; a night publishes the first)")
    try:
        if pointer.version == DAMAGED:
            raise ManifestError("CURRENT does not name a readable version")
        manifest = read_manifest(store, pointer.version)
    except (ManifestError, PublishError) as err:  # unreadable, missing, or holding another version
        # Rolling back is the remedy for a damaged current version, so it must not need it.
        # Its forgets are then taken from everything else that records one (conservative).
        log.warning("%s: current manifest is damaged (%s); rolling back away from it", store.uri, err)
        manifest = None
    if manifest is not None and to_version == manifest.version:
        return manifest
    available = [info.version for info in list_versions(store, pointer=None if pointer.version == DAMAGED else pointer)]
    if to_version not in available:
        rewritten_as = {}  # old version -> its rewrite, over every forget (a rewrite can be rewritten again)
        for record in read_audit(store):
            if record.get("event") == "forget" and isinstance(record.get("rewritten"), dict):
                rewritten_as.update({int(k): v for k, v in record["rewritten"].items()})
        if to_version in rewritten_as:
            chain, seen = [to_version], {to_version}
            while chain[-1] in rewritten_as and rewritten_as[chain[-1]] not in seen:
                chain.append(rewritten_as[chain[-1]])
                seen.add(chain[-1])
            final = chain[-1]
            hint = f"roll back to v{final}" if final in available else f"v{final} was collected too"
            raise UnknownVersion(f"{store.uri}: version {to_version} was rewritten by forgets as "
                                 f"{' -> '.join(f'v{v}' for v in chain[1:])} ({hint}; available: {available})")
        damaged = damaged_manifests(store).get(to_version)
        if damaged is not None:  # e.g. a broken layer chain: say what is wrong, not just "unknown"
            raise UnknownVersion(f"{store.uri}: version {to_version} cannot be rolled back to: {damaged}")
        raise UnknownVersion(f"{store.uri}: version {to_version} does not exist, was never published or was "
                             f"collected (available: {available}); roll back to one of those (engram versions "
                             "lists them)")
    target = read_manifest(store, to_version)
    for entry in target.shards:  # every object of every chain (base, layers, state), by size
        for key, size in entry.sized_objects().items():
            if size is None:
                continue
            info = store.head(key)
            if info is None or info.size != size:
                raise UnknownVersion(f"{store.uri}: version {to_version} was collected ({key} is missing or "
                                     f"damaged; available: {available})")
    forgets = set(manifest.forgotten) if manifest is not None else known_forgets(store)
    lost_forgets = forgets - set(target.forgotten)
    from_version = None if pointer.version == DAMAGED else pointer.version
    if lost_forgets:
        where = "the store" if from_version is None else f"version {from_version}"
        raise PublishError(f"{store.uri}: version {to_version} predates the forget of {len(lost_forgets)} user(s) "
                           f"recorded in {where}; rolling back to it would restore their data")
    commit(store, target, pointer, event="rollback", actor=actor, reason=reason, from_version=from_version,
           to_version=to_version)
    log.info("%s: rolled CURRENT from v%s to v%d (%s)", store.uri, from_version, to_version, reason)
    return target
