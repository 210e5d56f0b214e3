"""A serving node's last-good version: the manifest it last verified and served, kept in its cache.

A node that restarts while its store does not answer (versions.store.StoreUnreachable: connection
refused, timeouts, 5xx) serves this version from its cache, every object re-verified against the
sha256 the manifest names (serving.pull.PullClient.poll), and says it is stale until the store
answers again. One record per store, model and shard set:
``<cache_dir>/last-good/<sha256(store uri)[:16]>-<fingerprint[:16]>-<shards>.json`` (``all``, or
``s`` and 12 hex of the sha256 of the node's ``--shards`` list), written atomically (temp file,
fsync, rename) by every poll that confirms the served version, so two stores (an S3 store is its
URI and its endpoint: two servers may hold a bucket of the same name), two models or two nodes
with different ``--shards`` sharing a cache folder never read each other's version (a node falls
back to its own record, else to one whose shards cover its own, else to a record of the layout
before shard sets, ``<store>-<fingerprint>.json``, whose shards are unknown; every object is
verified whichever it is). The record holds the manifest's
JSON and its sha256 (checked, then the manifest parsed and validated, on every read), the time the
store last confirmed it CURRENT, and the forgotten users (sha256 of ids, as manifests keep them) of
later manifests the node read but could not load: a fallback never serves them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

from schemas.manifest import Manifest, ManifestError
from versions.store import remove_dead_temp_files, write_file_atomic

log = logging.getLogger(__name__)

LAST_GOOD_DIR = "last-good"
RECORD_SCHEMA = 1


class LastGoodError(ValueError):
    """A last-good record that cannot be trusted (damaged, for another store or model)."""


@dataclass(frozen=True)
class LastGood:
    """The version a node last verified for one store, model and shard set."""

    store_id: str
    manifest: Manifest
    confirmed_at: float  # unix seconds: the last poll that found this version CURRENT in the store
    forgotten: frozenset[str] = frozenset()  # sha256 of user ids forgotten since (manifest.forgotten included)
    shards: tuple[int, ...] | None = None  # the node's shards (None: every shard)
    legacy: bool = False  # read from a record of the layout before shard sets (its shards unknown)

    def covers(self, shards: Sequence[int] | None) -> bool:
        """Whether this record's node verified every one of ``shards`` (None: every shard)."""
        if self.legacy:
            return False
        if self.shards is None:
            return True
        return shards is not None and set(shards) <= set(self.shards)

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint


def store_identity(store) -> str:
    """What a record is kept for: a store's URI, and an S3 store's endpoint."""
    endpoint = getattr(store, "endpoint_url", None)
    return f"{store.uri} at {endpoint}" if endpoint else store.uri


def iso(seconds: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC (``2026-12-01T22:03:04Z``); None stays None."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def shard_key(shards: Sequence[int] | None) -> str:
    """A shard set's part of a record's file name: ``all`` (None), else ``s`` + 12 hex of the
    sha256 of the sorted shard numbers."""
    if shards is None:
        return "all"
    return "s" + _sha256(",".join(str(s) for s in sorted(set(shards))))[:12]


def record_path(cache_dir: str | Path, store_id: str, fingerprint: str, shards: Sequence[int] | None = None) -> Path:
    """The record of a node owning ``shards`` (None: every shard) of ``store_id`` for model ``fingerprint``."""
    return Path(cache_dir) / LAST_GOOD_DIR / f"{_sha256(store_id)[:16]}-{fingerprint[:16]}-{shard_key(shards)}.json"


def legacy_record_path(cache_dir: str | Path, store_id: str, fingerprint: str) -> Path:
    """The one record per store and model of the layout before shard sets (any node's shards)."""
    return Path(cache_dir) / LAST_GOOD_DIR / f"{_sha256(store_id)[:16]}-{fingerprint[:16]}.json"


def save_last_good(cache_dir: str | Path, record: LastGood) -> Path:
    """Write ``record`` atomically as its shard set's record; OSError (a read-only or full disk)
    is the caller's to report."""
    manifest_json = record.manifest.to_json()
    body = {"schema": RECORD_SCHEMA, "store": record.store_id, "fingerprint": record.fingerprint,
            "version": record.manifest.version, "confirmed_at": record.confirmed_at,
            "shards": list(record.shards) if record.shards is not None else None,
            "forgotten": sorted(record.forgotten), "manifest_sha256": _sha256(manifest_json),
            "manifest": manifest_json}
    path = record_path(cache_dir, record.store_id, record.fingerprint, record.shards)
    remove_dead_temp_files(path.parent)  # of a node killed mid-write (nothing else removes them)
    write_file_atomic(path, json.dumps(body, indent=1).encode())
    return path


def load_last_good(cache_dir: str | Path, store_id: str, fingerprint: str,
                   shards: Sequence[int] | None = None) -> LastGood | None:
    """The record of a node owning ``shards`` (None: every shard) for ``store_id`` and model
    ``fingerprint``, checked; None if there is none. LastGoodError naming the file for one that is
    damaged or names another store, model or shard set."""
    shards = tuple(sorted(set(shards))) if shards is not None else None
    record = _read(record_path(cache_dir, store_id, fingerprint, shards), store_id, fingerprint)
    if record is not None and (record.legacy or record.shards != shards):
        raise LastGoodError(f"last-good record {record_path(cache_dir, store_id, fingerprint, shards)}: is for shards "
                            f"{_shards_text(record)}, not {_shards_text(shards)}; delete it (the next successful poll "
                            "writes it again)")
    return record


def _shards_text(record_or_shards) -> str:
    if isinstance(record_or_shards, LastGood):
        if record_or_shards.legacy:
            return "unknown (a record of the layout before shard sets)"
        record_or_shards = record_or_shards.shards
    return "all" if record_or_shards is None else ",".join(map(str, record_or_shards))


def fallback_candidates(cache_dir: str | Path, store_id: str, fingerprint: str,
                        shards: Sequence[int] | None) -> tuple[list[LastGood], list[str]]:
    """(records, problems): the records a node owning ``shards`` may fall back to, in the order to
    try them: its own (:func:`load_last_good`), then the records of other shard sets that cover
    its shards (the most recently confirmed first), then the record of the layout before shard
    sets (its shards unknown: its objects may not be in the cache, which the build says). A
    damaged record, or one for another store or model, is left out and its LastGoodError message
    is in ``problems`` (the node's own first)."""
    shards = tuple(sorted(set(shards))) if shards is not None else None
    problems: list[str] = []
    records = _records(cache_dir, store_id, problems, fingerprint)
    own = [r for r in records if not r.legacy and r.shards == shards]
    others = [r for r in records if r.covers(shards) and r.shards != shards]
    legacy = [r for r in records if r.legacy]
    own_path = str(record_path(cache_dir, store_id, fingerprint, shards))
    problems.sort(key=lambda problem: own_path not in problem)  # the node's own record's first
    return own + others + legacy, problems


def has_records(cache_dir: str | Path, store_id: str) -> bool:
    """Whether ``cache_dir`` holds a last-good record of ``store_id`` (intact or not; none is read)."""
    folder = Path(cache_dir) / LAST_GOOD_DIR
    try:
        return folder.is_dir() and next(folder.glob(f"{_sha256(store_id)[:16]}-*.json"), None) is not None
    except OSError:
        return False


def last_goods_of(cache_dir: str | Path, store_id: str) -> list[LastGood]:
    """Every intact record for ``store_id`` (of every model and shard set), the most recently
    confirmed first; damaged ones are logged and left out. For a node that does not know its model yet."""
    problems: list[str] = []
    found = _records(cache_dir, store_id, problems)
    for problem in problems:
        log.warning("%s", problem)
    return found


def _records(cache_dir: str | Path, store_id: str, problems: list[str], fingerprint: str | None = None) -> list[LastGood]:
    """The intact records of ``store_id`` (and model ``fingerprint`` if given), the most recently
    confirmed first; a damaged one's message goes to ``problems``."""
    folder = Path(cache_dir) / LAST_GOOD_DIR
    pattern = f"{_sha256(store_id)[:16]}-{fingerprint[:16] if fingerprint else ''}*.json"
    found = []
    try:
        paths = sorted(folder.glob(pattern)) if folder.is_dir() else []
    except OSError as err:  # a folder that cannot be listed
        problems.append(f"last-good folder {folder}: cannot list it ({err.strerror or err})")
        paths = []
    for path in paths:
        legacy = path.stem.count("-") == 1  # <store>-<fingerprint>: the layout before shard sets
        try:
            record = _read(path, store_id, fingerprint, legacy=legacy)
        except (LastGoodError, OSError) as err:
            problems.append(str(err))
            continue
        if record is not None:
            found.append(record)
    return sorted(found, key=lambda r: r.confirmed_at, reverse=True)


def _read(path: Path, store_id: str, fingerprint: str | None, *, legacy: bool = False) -> LastGood | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as err:
        why = getattr(err, "strerror", None) or err
        raise LastGoodError(f"last-good record {path}: cannot read it ({why})") from None
    try:
        raw = json.loads(text)
        manifest_json, confirmed_at = raw["manifest"], float(raw["confirmed_at"])
        if raw["schema"] != RECORD_SCHEMA:
            raise ValueError(f"schema {raw['schema']!r}, this engram reads {RECORD_SCHEMA}")
        if raw["manifest_sha256"] != _sha256(manifest_json):
            raise ValueError("its manifest does not match the sha256 recorded with it")
        manifest = Manifest.from_json(manifest_json, source=str(path))
        forgotten = frozenset(raw["forgotten"])
        shards = raw.get("shards")  # absent in a record of the layout before shard sets
        shards = tuple(int(s) for s in shards) if shards is not None else None
    except (ValueError, KeyError, TypeError, ManifestError) as err:
        raise LastGoodError(f"last-good record {path}: damaged ({err}); delete it (the next successful poll writes "
                            "it again)") from None
    if raw.get("store") != store_id or (fingerprint is not None and manifest.fingerprint != fingerprint):
        raise LastGoodError(f"last-good record {path}: is for store {raw.get('store')} model "
                            f"{manifest.fingerprint[:16]}.., not {store_id}" + (f" model {fingerprint[:16]}.."
                                                                                 if fingerprint else ""))
    return LastGood(store_id, manifest, confirmed_at, forgotten | frozenset(manifest.forgotten), shards,
                    legacy=legacy or "shards" not in raw)
