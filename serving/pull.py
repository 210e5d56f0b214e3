"""Serving-side pull: follow CURRENT, fetch changed shards, verify, hot-swap an in-memory index.

A serving node owns a set of shards. :class:`PullClient` polls the store:

1. ``head("CURRENT")``: an unchanged etag costs no download and changes nothing;
2. otherwise it reads the manifest, refuses one compiled for another model fingerprint, and
   for each owned shard whose bundle sha256 differs from the one it serves, gets the bundle
   (from the local cache if a verified copy is there, else from the store), checks size and
   sha256 against the manifest, decodes it, and checks every delta against the loaded model;
3. it builds the new :class:`ServingIndex` completely and then replaces one reference, so a
   reader sees either the old version or the new one, never a mix.

Any failure keeps the version being served, logs why and sets ``last_error``; the next poll
tries again (the etag is only remembered after a successful swap). A rollback is just CURRENT
pointing at an older manifest, and a forgotten user is absent from the new bundle: both are
followed on the next poll like any other change.

The disk cache (``<cache_dir>/bundles/<sha256>.parquet``) is content-addressed, written
atomically (temp file, fsync, rename) and re-verified on every load; a truncated or corrupted
file is deleted and downloaded again. The model a manifest names by fingerprint is stored by
the nightly job under ``models/<fingerprint>/`` (:func:`versions.models.publish_model`) and fetched into the
same cache by :func:`versions.models.fetch_model`, verified by recomputing the fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from engram_core.checkpoint import EngramModel, fingerprint
from engram_core.delta import Delta
from engram_core.memory_index import ServedDelta, served_delta
from engram_core.text import canonical_id
from engram_core.serving import DeltaMismatch
from schemas.bundle import BundleSchemaError, bundle_deltas, decode_bundle
from schemas.manifest import Manifest, ManifestError, ShardEntry
from versions.catalog import read_current
from versions.errors import IntegrityError, PublishError
from versions.layout import CURRENT_KEY, shard_of
from versions.models import fetch_model
from versions.store import ObjectNotFound, ObjectStore, StoreError, write_file_atomic

log = logging.getLogger(__name__)


class PullError(RuntimeError):
    """A version that cannot be served; the node keeps the version it has."""


class FingerprintMismatch(PullError):
    """A manifest (or a local model) for another model than the one loaded."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ENGRAM_CACHE_DIR", Path.home() / ".cache" / "engram"))


def parse_shards(spec: str | None, num_shards: int | None = None) -> list[int] | None:
    """``"0-15"``, ``"3"``, ``"0-3,8,10-11"`` -> sorted shard list; ``None``/``"all"`` -> None (every shard)."""
    if spec is None or spec.strip().lower() in ("", "all"):
        return None
    shards: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                shards.update(range(lo, hi + 1))
            else:
                shards.add(int(part))
        except ValueError:
            raise ValueError(f"shards {spec!r}: {part!r} is not a shard number or range like 0-15") from None
    if any(s < 0 for s in shards):
        raise ValueError(f"shards {spec!r}: shard numbers must be non-negative")
    if num_shards is not None and max(shards) >= num_shards:
        raise ValueError(f"shards {spec!r}: the store has {num_shards} shards (0-{num_shards - 1})")
    return sorted(shards)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- bundle cache


class BundleCache:
    """Content-addressed local copies of shard bundles, re-verified on every load."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "bundles"

    def path(self, sha256: str) -> Path:
        return self.root / f"{sha256}.parquet"

    def load(self, entry: ShardEntry) -> bytes | None:
        """The cached bytes if present and intact; a damaged copy is deleted (and None returned)."""
        path = self.path(entry.bundle_sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if len(data) == entry.bundle_bytes and _sha256(data) == entry.bundle_sha256:
            return data
        log.warning("cache %s: %d bytes that do not match sha256 %s; deleting it and downloading again",
                    path, len(data), entry.bundle_sha256[:12])
        path.unlink(missing_ok=True)
        return None

    def save(self, entry: ShardEntry, data: bytes) -> None:
        write_file_atomic(self.path(entry.bundle_sha256), data)


def fetch_bundle(store: ObjectStore, entry: ShardEntry, cache: BundleCache | None) -> bytes:
    """A shard's verified bundle bytes: from the cache if intact, else from the store (then cached)."""
    data = cache.load(entry) if cache is not None else None
    if data is not None:
        return data
    where = f"{store.uri}/{entry.bundle_key}"
    try:
        data = store.get(entry.bundle_key)
    except ObjectNotFound:
        raise IntegrityError(f"{where}: missing (manifest shard {entry.shard} references it)") from None
    if len(data) != entry.bundle_bytes:
        raise IntegrityError(f"{where}: {len(data)} bytes, manifest says {entry.bundle_bytes} (refused)")
    actual = _sha256(data)
    if actual != entry.bundle_sha256:
        raise IntegrityError(f"{where}: sha256 {actual[:16]}.. does not match the manifest's "
                             f"{entry.bundle_sha256[:16]}.. (refused; the object was changed or damaged)")
    if cache is not None:
        cache.save(entry, data)
    return data


# ---------------------------------------------------------------- the index


@dataclass(frozen=True)
class ServingIndex:
    """One published version's deltas for the shards a node owns (immutable once built)."""

    version: int
    fingerprint: str
    num_shards: int
    shards: tuple[int, ...]
    shard_sha256: Mapping[int, str]
    shard_users: Mapping[int, Mapping[str, ServedDelta]]
    users: Mapping[str, ServedDelta] = field(repr=False)

    def served_for(self, user_id: str | None) -> ServedDelta | None:
        """The checked, batch-ready delta of ``user_id`` (read in canonical form,
        :func:`engram_core.text.canonical_id`, as ingest stores ids); None for no user or an
        unknown one (the base model)."""
        return self.users.get(canonical_id(user_id)) if user_id else None

    def deltas_for(self, user_id: str | None) -> tuple[Delta, ...]:
        """The deltas a request of ``user_id`` is served with: () for no user or an unknown one (the base model)."""
        served = self.served_for(user_id)
        return (served.delta,) if served is not None else ()

    def owns(self, user_id: str) -> bool:
        return shard_of(canonical_id(user_id), self.num_shards) in self.shard_users

    @property
    def num_users(self) -> int:
        return len(self.users)

    @property
    def nbytes(self) -> int:
        """Bytes of delta arrays held (layers, row ids, values); Python object overhead excluded."""
        return sum(d.delta.nbytes for d in self.users.values())


def load_shard_deltas(em: EngramModel, shard: int, num_shards: int, data: bytes, source: str) -> dict[str, ServedDelta]:
    """Decode a verified bundle; check every delta against the loaded model and the shard, once."""
    served = {}
    for user, delta in bundle_deltas(decode_bundle(data, source=source)).items():
        if shard_of(user, num_shards) != shard:
            raise PullError(f"{source}: user {user!r} belongs to shard {shard_of(user, num_shards)}, not {shard}")
        served[user] = served_delta(em, delta, owner=f"{source} user {user!r}")
    return served


@dataclass(frozen=True)
class PollResult:
    changed: bool  # a new version is now served
    version: int | None  # the version served after this poll
    fetched_shards: tuple[int, ...] = ()  # shards whose bundle was (re)loaded
    error: str | None = None


class PullClient:
    """Follows a store's CURRENT for the shards one serving node owns (``shards=None``: all)."""

    _FAILURES = (PullError, PublishError, StoreError, ManifestError, BundleSchemaError, DeltaMismatch, OSError, ValueError)

    def __init__(
        self,
        store: ObjectStore,
        em: EngramModel,
        *,
        shards: Sequence[int] | None = None,
        cache_dir: str | Path | None = None,
        interval: float = 30.0,
        jitter: float = 0.1,
    ) -> None:
        self.store = store
        self.em = em
        self.shards = None if shards is None else tuple(sorted(set(shards)))
        self.cache = BundleCache(cache_dir) if cache_dir is not None else None
        self.interval = interval
        self.jitter = jitter
        self.last_error: str | None = None
        self.last_poll_at: float | None = None
        self._index: ServingIndex | None = None
        self._etag: str | None = None
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def index(self) -> ServingIndex | None:
        """The version being served (one reference, replaced whole on a swap)."""
        return self._index

    def deltas_for(self, user_id: str | None) -> tuple[Delta, ...]:
        index = self._index
        return index.deltas_for(user_id) if index is not None else ()

    def poll(self) -> PollResult:
        """Check CURRENT once; load and swap in a new version if it changed. Never raises for a bad version."""
        with self._poll_lock:
            self.last_poll_at = time.time()
            try:
                result = self._poll()
            except self._FAILURES as e:
                served = self._index.version if self._index is not None else None
                message = f"{type(e).__name__}: {e}"
                log.error("pull from %s failed, still serving %s: %s", self.store.uri,
                          f"v{served}" if served is not None else "nothing", message)
                self.last_error = message
                return PollResult(False, served, error=message)
            self.last_error = None
            return result

    def _poll(self) -> PollResult:
        served = self._index.version if self._index is not None else None
        head = self.store.head(CURRENT_KEY)
        if head is None:
            raise PullError(f"{self.store.uri}: no CURRENT pointer (nothing published yet)")
        if head.etag == self._etag:
            return PollResult(False, served)
        current = read_current(self.store)
        if current is None:
            raise PullError(f"{self.store.uri}: CURRENT disappeared while reading it")
        manifest, etag = current
        index, fetched = self._build(manifest)
        self._index = index  # the swap: readers hold either the old index or this one
        self._etag = etag
        log.info("serving v%d from %s (%d users in %d shards; loaded shards %s)", manifest.version,
                 self.store.uri, index.num_users, len(index.shards), list(fetched))
        return PollResult(served != manifest.version or bool(fetched), manifest.version, fetched)

    def _build(self, manifest: Manifest) -> tuple[ServingIndex, tuple[int, ...]]:
        where = f"{self.store.uri}/{manifest.key}"
        if manifest.fingerprint != self.em.fingerprint:
            raise FingerprintMismatch(
                f"{where}: compiled for model {manifest.fingerprint[:16]}.., this node serves "
                f"{self.em.fingerprint[:16]}.. (restart the node with the manifest's model)")
        owned = self.shards if self.shards is not None else tuple(range(manifest.num_shards))
        beyond = [s for s in owned if s >= manifest.num_shards]
        if beyond:
            raise PullError(f"{where}: has {manifest.num_shards} shards; this node owns {beyond} too "
                            "(fix the node's --shards)")
        previous = self._index
        reuse = previous is not None and previous.num_shards == manifest.num_shards
        shard_users: dict[int, Mapping[str, ServedDelta]] = {}
        fetched = []
        for shard in owned:
            entry = manifest.shard(shard)
            if reuse and previous.shard_sha256.get(shard) == entry.bundle_sha256:
                shard_users[shard] = previous.shard_users[shard]
                continue
            data = fetch_bundle(self.store, entry, self.cache)
            source = f"{self.store.uri}/{entry.bundle_key}"
            shard_users[shard] = load_shard_deltas(self.em, shard, manifest.num_shards, data, source)
            fetched.append(shard)
        users = {u: d for part in shard_users.values() for u, d in part.items()}
        index = ServingIndex(manifest.version, manifest.fingerprint, manifest.num_shards, tuple(owned),
                             {s: manifest.shard(s).bundle_sha256 for s in owned}, shard_users, users)
        return index, tuple(fetched)

    # -- background polling ---------------------------------------------------------------
    def next_delay(self) -> float:
        return max(0.0, self.interval * (1 + random.uniform(-self.jitter, self.jitter)))

    def start(self) -> None:
        """Poll in a daemon thread every ``interval`` seconds (with jitter) until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="engram-pull", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.next_delay()):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


# ---------------------------------------------------------------- the model


def resolve_model(store: ObjectStore, manifest: Manifest, *, model_dir: str | Path | None,
                  cache_dir: str | Path, device: str = "cpu") -> EngramModel:
    """Load the model a manifest was compiled for: ``model_dir`` if given (must match), else from the store."""
    from engram_core.checkpoint import load_checkpoint

    if model_dir is not None:
        local = fingerprint(model_dir)
        if local != manifest.fingerprint:
            raise FingerprintMismatch(
                f"model {model_dir}: fingerprint {local[:16]}.. but {store.uri} v{manifest.version} was compiled "
                f"for {manifest.fingerprint[:16]}.. (use that model, or leave out --model to fetch it)")
        return load_checkpoint(model_dir, device=device)
    return load_checkpoint(fetch_model(store, manifest.fingerprint, cache_dir), device=device)
