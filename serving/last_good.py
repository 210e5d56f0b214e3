"""A serving node's last-good version: the manifest it last verified and served, kept in its cache.

A node that restarts while its store does not answer (versions.store.StoreUnreachable: connection
refused, timeouts, 5xx) serves this version from its cache, every object re-verified against the
sha256 the manifest names (serving.pull.PullClient.poll), and says it is stale until the store
answers again. One record per store and model:
``<cache_dir>/last-good/<sha256(store uri)[:16]>-<fingerprint[:16]>.json``, written atomically
(temp file, fsync, rename) by every poll that confirms the served version, so two stores (an S3
store is its URI and its endpoint: two servers may hold a bucket of the same name) or two models
sharing a cache folder never read each other's version. The record holds the manifest's
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

from schemas.manifest import Manifest, ManifestError
from versions.store import remove_dead_temp_files, write_file_atomic

log = logging.getLogger(__name__)

LAST_GOOD_DIR = "last-good"
RECORD_SCHEMA = 1


class LastGoodError(ValueError):
    """A last-good record that cannot be trusted (damaged, for another store or model)."""


@dataclass(frozen=True)
class LastGood:
    """The version a node last verified for one store and model."""

    store_id: str
    manifest: Manifest
    confirmed_at: float  # unix seconds: the last poll that found this version CURRENT in the store
    forgotten: frozenset[str] = frozenset()  # sha256 of user ids forgotten since (manifest.forgotten included)

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


def record_path(cache_dir: str | Path, store_id: str, fingerprint: str) -> Path:
    return Path(cache_dir) / LAST_GOOD_DIR / f"{_sha256(store_id)[:16]}-{fingerprint[:16]}.json"


def save_last_good(cache_dir: str | Path, record: LastGood) -> Path:
    """Write ``record`` atomically; OSError (a read-only or full disk) is the caller's to report."""
    manifest_json = record.manifest.to_json()
    body = {"schema": RECORD_SCHEMA, "store": record.store_id, "fingerprint": record.fingerprint,
            "version": record.manifest.version, "confirmed_at": record.confirmed_at,
            "forgotten": sorted(record.forgotten), "manifest_sha256": _sha256(manifest_json),
            "manifest": manifest_json}
    path = record_path(cache_dir, record.store_id, record.fingerprint)
    remove_dead_temp_files(path.parent)  # of a node killed mid-write (nothing else removes them)
    write_file_atomic(path, json.dumps(body, indent=1).encode())
    return path


def load_last_good(cache_dir: str | Path, store_id: str, fingerprint: str) -> LastGood | None:
    """The record for ``store_id`` and model ``fingerprint``, checked; None if there is none.
    LastGoodError naming the file for one that is damaged or names another store or model."""
    return _read(record_path(cache_dir, store_id, fingerprint), store_id, fingerprint)


def last_goods_of(cache_dir: str | Path, store_id: str) -> list[LastGood]:
    """Every intact record for ``store_id`` (one per model), the most recently confirmed first;
    damaged ones are logged and left out. For a node that does not know its model yet."""
    folder = Path(cache_dir) / LAST_GOOD_DIR
    found = []
    for path in sorted(folder.glob(f"{_sha256(store_id)[:16]}-*.json")) if folder.is_dir() else ():
        try:
            record = _read(path, store_id, None)
        except (LastGoodError, OSError) as err:
            log.warning("%s", err)
            continue
        if record is not None:
            found.append(record)
    return sorted(found, key=lambda r: r.confirmed_at, reverse=True)


def _read(path: Path, store_id: str, fingerprint: str | None) -> LastGood | None:
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
    except (ValueError, KeyError, TypeError, ManifestError) as err:
        raise LastGoodError(f"last-good record {path}: damaged ({err}); delete it (the next successful poll writes "
                            "it again)") from None
    if raw.get("store") != store_id or (fingerprint is not None and manifest.fingerprint != fingerprint):
        raise LastGoodError(f"last-good record {path}: is for store {raw.get('store')} model "
                            f"{manifest.fingerprint[:16]}.., not {store_id}" + (f" model {fingerprint[:16]}.."
                                                                                 if fingerprint else ""))
    return LastGood(store_id, manifest, confirmed_at, forgotten | frozenset(manifest.forgotten))
