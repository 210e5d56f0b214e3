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

Run gc from the same scheduler as the nightly job, not concurrently with a publish: objects
written by a publish that has not yet written its manifest are not referenced by anything.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from schemas.manifest import ManifestError, manifest_key
from versions.catalog import list_versions, manifest_versions_on_disk, read_manifest, read_pointer
from versions.commit import append_audit
from versions.errors import PublishError
from versions.forget import references
from versions.layout import OBJECT_PREFIXES
from versions.store import ObjectStore

log = logging.getLogger(__name__)

_STATS_VERSION = re.compile(r"^stats/[^/]+/version=(\d+)/")


@dataclass(frozen=True)
class GcReport:
    deleted_versions: list[int]
    deleted_objects: list[str]  # every key deleted (or that would be, on a dry run)
    kept_versions: list[int]
    dry_run: bool = False
    orphan_manifests: list[int] = field(default_factory=list)  # never-published manifests deleted

    def to_dict(self) -> dict:
        return {"deleted_versions": self.deleted_versions, "deleted_objects": self.deleted_objects,
                "kept_versions": self.kept_versions, "dry_run": self.dry_run,
                "orphan_manifests": self.orphan_manifests}


def retained_versions(published: list[int], current: int, keep: int) -> list[int]:
    """The published versions that ``keep`` retains (see the module docstring)."""
    newest = sorted(published, reverse=True)[:keep]
    return sorted(set(newest) | {current} | {v for v in published if v > current})


def collect(store: ObjectStore, keep: int, *, dry_run: bool = False, actor: str = "gc") -> GcReport:
    """Delete versions beyond the newest ``keep`` and the objects only they referenced."""
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"gc: keep must be at least 1 (CURRENT is always kept), got {keep!r}; "
                         "to delete everything, delete the store")
    if not dry_run:
        store.check_conditional_writes()  # gc deletes what it read CURRENT to keep (once per store object)
    pointer = read_pointer(store)
    if pointer is None:
        return GcReport([], [], [], dry_run)
    published = [info.version for info in list_versions(store)]
    kept = retained_versions(published, pointer.version, keep)
    on_disk = manifest_versions_on_disk(store)
    orphans = sorted(set(on_disk) - set(published))
    live_orphans = [v for v in orphans if v > pointer.version]
    dead_orphans = [v for v in orphans if v < pointer.version]
    deleted_versions = sorted(set(published) - set(kept))
    kept_manifests = [read_manifest(store, v) for v in kept]
    for version in live_orphans:  # a night's candidate above CURRENT, or a damaged version rolled back away from
        try:
            kept_manifests.append(read_manifest(store, version))
        except (ManifestError, PublishError) as err:  # unreadable: it names nothing anyone can use; its file stays
            log.warning("gc on %s: manifest v%d above CURRENT is unreadable (%s); kept, its objects are not",
                        store.uri, version, err)
    referenced = references(kept_manifests)
    keep_stats = set(kept) | set(live_orphans)

    doomed = [manifest_key(v) for v in deleted_versions + dead_orphans]
    doomed += [k for k in store.list("stats/") if k not in referenced
               and not ((m := _STATS_VERSION.match(k)) and int(m.group(1)) in keep_stats)]
    doomed += [k for prefix in OBJECT_PREFIXES for k in store.list(prefix) if k not in referenced]
    report = GcReport(deleted_versions, doomed, kept, dry_run, dead_orphans)
    if dry_run:
        return report
    for key in doomed:  # manifests first (see the module docstring)
        store.delete(key)
    append_audit(store, "gc", actor=actor, keep=keep, deleted_versions=deleted_versions,
                 kept_versions=kept, deleted_objects=len(doomed))
    log.info("gc on %s: deleted versions %s and %d object(s); kept %s", store.uri, deleted_versions, len(doomed), kept)
    return report
