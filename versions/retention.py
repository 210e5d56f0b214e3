"""Retention: delete old versions and every object no retained version references.

Retained after ``collect(store, keep=N)``:

- the newest N published versions (by version number),
- CURRENT, always,
- every published version newer than CURRENT (the targets of a roll-forward after a rollback),
- manifests above CURRENT that were never published: they may belong to a publisher that has
  written its manifest and not yet swapped CURRENT, so they and their objects stay.

Everything else goes: manifests of the other published versions, orphan manifests below
CURRENT (left by crashed runs; never visible), and every bundle, fact-state, tombstones and stats
object that no retained manifest references (stats of version-1 stores live in folders
``stats/<table>/version=<N>/``, kept with their version). Manifests are deleted before the objects they name, so a rollback racing
the collection sees "collected" rather than a half-present version. The collection is recorded
in the audit log (not on a dry run).

What gc never deletes:

- a manifest it cannot read (truncated, not JSON, holding another version): it is not an orphan,
  and since the objects it names are unknown, no unreferenced object or stats part is deleted
  while one is on the store; each run warns naming it (restore it from a backup or the bucket's
  versioning, or delete it by hand if that version is not wanted, then run gc again);
- a key under ``objects/`` or ``stats/`` whose name the store does not write
  (:func:`versions.layout.is_collectable`): it is not the store's, and is named in a warning;
- keys the listings leave out (``.engram-*`` names, folder markers: see versions.store).

The whole plan is made and checked before the first delete. If a delete fails part-way,
:class:`GcIncomplete` says what was deleted (its ``report``), and the audit record is written
for what was done (``incomplete: true``); running gc again finishes the collection.

Run gc from the same scheduler as the nightly job, not concurrently with a publish: objects
written by a publish that has not yet written its manifest are not referenced by anything. The
objects to delete are recorded first (:data:`GC_DELETES`), so such a publish refuses to make its
version current and says gc ran beside it, rather than publish a version missing them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

from schemas.manifest import manifest_key
from versions.catalog import manifest_inventory, published_among, read_manifest, read_pointer
from versions.commit import append_audit
from versions.forget import references
from versions.layout import OBJECT_PREFIXES, is_collectable
from versions.store import ObjectStore, StoreError, check_key

log = logging.getLogger(__name__)

_STATS_VERSION = re.compile(r"^stats/[^/]+/version=(\d+)/")


@dataclass(frozen=True)
class GcReport:
    deleted_versions: list[int]
    deleted_objects: list[str]  # every key deleted (or that would be, on a dry run)
    kept_versions: list[int]
    dry_run: bool = False
    orphan_manifests: list[int] = field(default_factory=list)  # never-published manifests deleted
    unreadable_manifests: list[str] = field(default_factory=list)  # kept; while any, no object is collected
    foreign_keys: list[str] = field(default_factory=list)  # under objects/ or stats/, not the store's: kept

    def to_dict(self) -> dict:
        return {"deleted_versions": self.deleted_versions, "deleted_objects": self.deleted_objects,
                "kept_versions": self.kept_versions, "dry_run": self.dry_run,
                "orphan_manifests": self.orphan_manifests, "unreadable_manifests": self.unreadable_manifests,
                "foreign_keys": self.foreign_keys}


class GcIncomplete(StoreError):
    """A delete failed after gc had deleted some keys; ``report`` holds what was deleted (also
    recorded in the audit log, unless that write failed too, which the message says)."""

    def __init__(self, message: str, report: GcReport):
        super().__init__(message)
        self.report = report


def check_keep(keep: int) -> None:
    """Raise ValueError (a bad argument) unless ``keep`` is at least 1."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"gc: keep must be at least 1 (CURRENT is always kept), got {keep!r}; "
                         "to delete everything, delete the store")


def retained_versions(published: list[int], current: int, keep: int) -> list[int]:
    """The published versions that ``keep`` retains (see the module docstring)."""
    newest = sorted(published, reverse=True)[:keep]
    return sorted(set(newest) | {current} | {v for v in published if v > current})


def collect(store: ObjectStore, keep: int, *, dry_run: bool = False, actor: str = "gc") -> GcReport:
    """Delete versions beyond the newest ``keep`` and the objects only they referenced."""
    check_keep(keep)
    if not dry_run:
        store.check_conditional_writes()  # gc deletes what it read CURRENT to keep (once per store object)
    pointer = read_pointer(store)
    if pointer is None:
        return GcReport([], [], [], dry_run)
    manifests, unreadable = manifest_inventory(store)
    published = sorted(published_among(store, manifests, pointer))
    kept = retained_versions(published, pointer.version, keep)
    orphans = sorted(set(manifests) - set(published))  # readable and never published: an unreadable one is no orphan
    live_orphans = [v for v in orphans if v > pointer.version]  # a night's candidate above CURRENT
    dead_orphans = [v for v in orphans if v < pointer.version]
    deleted_versions = sorted(set(published) - set(kept))
    # CURRENT is always kept: an unreadable current manifest raises here (roll back first)
    kept_manifests = [manifests[v] if v in manifests else read_manifest(store, v) for v in kept]
    kept_manifests += [manifests[v] for v in live_orphans]
    referenced = references(kept_manifests)
    keep_stats = set(kept) | set(live_orphans)

    doomed = [manifest_key(v) for v in deleted_versions + dead_orphans]
    candidates = store.list("stats/") + [k for prefix in OBJECT_PREFIXES for k in store.list(prefix)]
    candidates = [k for k in candidates if k not in referenced
                  and not ((m := _STATS_VERSION.match(k)) and int(m.group(1)) in keep_stats)]
    foreign = sorted(k for k in candidates if not is_collectable(k))
    damaged = [manifest_key(v) for v in sorted(unreadable)]
    if damaged:
        for version in sorted(unreadable):
            log.warning("gc on %s: %s is unreadable (%s); it is kept, and no unreferenced object is deleted while "
                        "the objects it names are unknown: restore it from a backup (or the bucket's versioning), "
                        "or delete it by hand if that version is not wanted, then run gc again",
                        store.uri, manifest_key(version), unreadable[version])
    else:
        doomed += [k for k in candidates if is_collectable(k)]
    if foreign:
        log.warning("gc on %s: kept %d key(s) whose names the store does not write (not its objects): %s",
                    store.uri, len(foreign), ", ".join(foreign[:10]) + (", ..." if len(foreign) > 10 else ""))
    for key in doomed:  # the whole plan is checked before the first delete
        check_key(key)
    report = GcReport(deleted_versions, doomed, kept, dry_run, dead_orphans, damaged, foreign)
    if dry_run:
        return report
    manifest_keys = {manifest_key(v) for v in deleted_versions + dead_orphans}
    objects = [k for k in doomed if k not in manifest_keys]
    if objects:
        # Recorded before the first delete, and the manifests read again after the record: a night
        # that wrote its manifest meanwhile keeps its objects (see GC_DELETES).
        append_audit(store, GC_DELETES, actor=actor, keys=objects)
        named = _named_since(store, set(manifests) | set(unreadable))
        spared = set(objects) if named is None else set(objects) & named
        if spared:
            doomed = [k for k in doomed if k not in spared]
            report = replace(report, deleted_objects=doomed)
    extra = {"unreadable_manifests": damaged} if damaged else {}
    deleted: list[str] = []
    try:
        for key in doomed:  # manifests first (see the module docstring)
            store.delete(key)
            deleted.append(key)
    except (StoreError, ValueError, OSError) as err:
        raise _incomplete(store, err, report, deleted, keep=keep, actor=actor, extra=extra) from err
    append_audit(store, "gc", actor=actor, keep=keep, deleted_versions=deleted_versions,
                 kept_versions=kept, deleted_objects=len(doomed), **extra)
    log.info("gc on %s: deleted versions %s and %d object(s); kept %s", store.uri, deleted_versions, len(doomed), kept)
    return report


GC_DELETES = "gc_deletes"
"""Audit event gc appends *before* it deletes objects (``keys``, manifests aside): an object no
manifest names may be a night's in progress, written and not yet named by its manifest. gc reads
the manifests again after the record and keeps what one written meanwhile names; a night that
writes its manifest later finds the record before it moves CURRENT (jobs.nightly) and, if it
names an object the version needs, publishes nothing and says gc ran beside it."""


def _named_since(store: ObjectStore, seen: set[int]) -> set[str] | None:
    """The keys the manifests written since gc read them (not in ``seen``) reference; None if one
    of them cannot be read (what it names is unknown: no object is deleted)."""
    manifests, unreadable = manifest_inventory(store)
    if set(unreadable) - seen:
        log.warning("gc on %s: a manifest written during this gc is unreadable; no object is deleted", store.uri)
        return None
    return references([m for v, m in manifests.items() if v not in seen])


def _incomplete(store: ObjectStore, err: BaseException, plan: GcReport, deleted: list[str], *, keep: int, actor: str,
                extra: dict) -> GcIncomplete:
    """The error of a gc whose delete failed part-way: what was deleted, recorded in the audit log."""
    gone = set(deleted)
    versions = [v for v in plan.deleted_versions if manifest_key(v) in gone]
    done = GcReport(versions, list(deleted), plan.kept_versions, False,
                    [v for v in plan.orphan_manifests if manifest_key(v) in gone], plan.unreadable_manifests,
                    plan.foreign_keys)
    try:
        append_audit(store, "gc", actor=actor, keep=keep, deleted_versions=versions, kept_versions=plan.kept_versions,
                     deleted_objects=len(deleted), incomplete=True, error=str(err), **extra)
        recorded = "recorded in the audit log"
    except (StoreError, ValueError, OSError) as audit_err:
        recorded = f"the audit record could not be written ({audit_err})"
    return GcIncomplete(
        f"gc on {store.uri} stopped after deleting {len(deleted)} of {len(plan.deleted_objects)} key(s) "
        f"(versions deleted: {versions or 'none'}; {recorded}): {err}. Fix the cause and run gc again; it "
        "finishes the collection", done)
