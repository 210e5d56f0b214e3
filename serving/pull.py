"""Serving-side pull: follow CURRENT, fetch changed shards, verify, hot-swap an in-memory index.

A serving node owns a set of shards. :class:`PullClient` polls the store:

1. ``head("CURRENT")``: an unchanged etag costs no download and changes nothing;
2. otherwise it reads the manifest (refused if its layer chain is broken, or compiled for another
   model fingerprint). A shard is a base bundle plus ordered layers (schemas.manifest). For each
   owned shard whose chain differs from the one it serves:

   * same base, the served layers followed by new ones (a night): it gets only the new layers
     and applies them, in order, to a copy of the shard's users;
   * otherwise (a compaction, a forget's rewrite, a rollback): it rebuilds the shard from the
     base and every layer, each from the local cache when a verified copy is there, so a
     rollback to a version whose objects the node holds downloads nothing;

   every object is checked for size and sha256 against the manifest, a layer also for the model
   fingerprint and the object it applies on (its parent), and every delta against the loaded
   model;
   the version's shared scopes (``manifest.scopes``: one object with every scope's delta) are
   pulled whole by every node when their object changed; a member's bundle row names its scope,
   and :meth:`ServingIndex.deltas_for` returns ``(scope_delta, member_delta)`` for it;
3. it builds the new :class:`ServingIndex` completely and then replaces one reference, so a
   reader sees either the old version or the new one, never a mix;
4. then it evicts, from the disk cache, every object of its shards that the version it now
   serves does not reference (the old index, and so the memory, is released with the swap).

Any failure keeps the version being served, logs why and sets ``last_error``; the next poll
tries again (the etag is only remembered after a successful swap). A client that has nothing
served yet and finds the store not answering (a restart during an outage) serves the version it
last confirmed instead, from its cache (serving.last_good), and reports it stale until the store
answers. Users the failed version's manifest forgets (and the served one does not) are dropped
from the served version all the same, with their shards' cached objects. A rollback is just CURRENT
pointing at an older manifest, and a forgotten user is absent from the rewritten objects: both
are followed on the next poll like any other change, and the eviction removes the forgotten
user's old objects from the node's disk.

The disk cache (``<cache_dir>/shards/<shard>/<sha256>.parquet``: base bundles and layers) is
content-addressed, written atomically (temp file, fsync, rename) and re-verified on every load; a
truncated or corrupted file is deleted and downloaded again. It is bounded: it holds exactly the
objects of the served version's chains of the node's shards (a second client with other shards
may share the folder; clients that own the same shards evict each other's older objects, which
costs a download, never a wrong answer). The model a manifest names by fingerprint is stored by
the nightly job under ``models/<fingerprint>/`` (:func:`versions.models.publish_model`) and fetched into the
same cache by :func:`versions.models.fetch_model`, verified by recomputing the fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Iterable, Iterator
from collections.abc import Mapping as AbstractMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

from engram_core.checkpoint import EngramModel, fingerprint
from engram_core.delta import Delta
from engram_core.memory_index import ServedDelta, served_delta
from engram_core.text import canonical_id
from engram_core.serving import DeltaMismatch
from serving.errors import seconds_from_env
from schemas.bundle import BundleSchemaError, bundle_deltas, bundle_scopes, decode_bundle, decode_layer, layer_parts
from schemas.manifest import Manifest, ManifestError, ShardEntry
from serving.last_good import (LastGood, fallback_candidates, iso, legacy_record_path, record_path, save_last_good,
                               store_identity)
from versions.catalog import read_current
from versions.errors import IntegrityError, PublishError
from versions.layout import CURRENT_KEY, check_shard_list, forgotten_id, shard_of
from versions.models import FetchProgress, ModelError, fetch_model
from versions.store import (ObjectNotFound, ObjectStore, StoreError, StoreUnreachable, remove_dead_temp_files,
                            write_file_atomic)

log = logging.getLogger(__name__)


class PullError(RuntimeError):
    """A version that cannot be served; the node keeps the version it has."""


class FingerprintMismatch(PullError):
    """A manifest (or a local model) for another model than the one loaded."""


def default_cache_dir() -> Path:
    return Path(os.environ.get("ENGRAM_CACHE_DIR") or Path.home() / ".cache" / "engram")  # "" is unset, not "."


SHARDS_FORMS = "shard numbers or ranges, e.g. 0-15 or 0-3,8"


def parse_shards(spec: str | None, num_shards: int | None = None, option: str = "--shards") -> list[int] | None:
    """``"0-15"``, ``"3"``, ``"0-3,8,10-11"`` -> sorted shard list; ``None``/``"all"`` -> None (every shard).

    ValueError naming ``option`` and the forms for anything else: an empty or blank value (``--shards
    ''``, an unset variable in ``--shards "$SHARDS"``: it selected every shard, a node meant for a
    few downloading and serving them all), an empty item (``0-3,``, ``,``), a reversed range, a
    negative number, a shard the store does not have (``num_shards``)."""
    if spec is None or spec.strip().lower() == "all":
        return None
    if not spec.strip():
        raise ValueError(f"{option} {spec!r} names no shard; give {SHARDS_FORMS}, or 'all' (the same as leaving "
                         f"{option} out) for every shard")
    shards: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            raise ValueError(f"{option} {spec!r}: an empty item (a doubled, leading or trailing comma); give "
                             f"{SHARDS_FORMS}")
        try:
            if "-" in part[1:]:
                lo, hi = (int(x) for x in part.split("-", 1))
                if lo > hi:
                    raise ValueError
                shards.update(range(lo, hi + 1))
            else:
                shards.add(int(part))
        except ValueError:
            raise ValueError(f"{option} {spec!r}: {part!r} is not a shard number or range like 0-15") from None
    if any(s < 0 for s in shards):
        raise ValueError(f"{option} {spec!r}: shard numbers must be non-negative")
    if num_shards is not None and max(shards) >= num_shards:
        raise ValueError(f"{option} {spec!r}: the store has {num_shards} shards (0-{num_shards - 1})")
    return sorted(shards)


DURATION_FORMS = "a number and a unit, s, m, h or d (e.g. 90s, 30m, 6h, 2d, 1h30m)"
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, name: str = "duration") -> float:
    """``"30m"``, ``"6h"``, ``"2d"``, ``"1h30m"``, ``"90s"`` -> seconds (float, above 0). ValueError
    naming ``name`` (if given) and :data:`DURATION_FORMS` for anything else (a bare number: seconds or minutes?)."""
    compact = text.strip().lower().replace(" ", "")
    parts = _DURATION_PART.findall(compact)
    what = f"{name} {text!r}" if name else repr(text)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{what} is not a duration; give {DURATION_FORMS}")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{what} must be above 0; give {DURATION_FORMS}")
    return seconds


def human_duration(seconds: float) -> str:
    """Seconds as the two largest units that are not 0: ``"2d 3h"``, ``"45m 10s"``; under a minute
    to a tenth (``"12.4s"``, ``"3s"``)."""
    if seconds < 59.95:
        return f"{round(seconds, 1):g}s"
    rest, parts = int(round(seconds)), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if rest >= size or (unit == "s" and not parts):
            parts.append(f"{rest // size}{unit}")
            rest %= size
    return " ".join(parts[:2])


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- object cache


SCOPES_CACHE = "scopes"  # the cache folder of the scopes object (shards/scopes/<sha256>.parquet)


class BundleCache:
    """Content-addressed local copies of a node's shard objects (base bundles and layers), one
    folder per shard, re-verified on every load and evicted once no served chain names them."""

    LEGACY = "bundles"  # the layout before layers: <cache>/bundles/<sha256>.parquet (evicted whole)

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, shard: int, sha256: str) -> Path:
        return self.root / "shards" / str(shard) / f"{sha256}.parquet"

    def load(self, shard: int, sha256: str, size: int) -> bytes | None:
        """The cached bytes if present and intact; a damaged copy is deleted (and None returned)."""
        path = self.path(shard, sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as err:  # unreadable (permissions of another node's user, a folder in its place, EIO)
            log.warning("cache %s: cannot read it (%s); downloading the object again", path, err.strerror or err)
            return None
        if len(data) == size and _sha256(data) == sha256:
            return data
        log.warning("cache %s: %d bytes that do not match sha256 %s; deleting it and downloading again",
                    path, len(data), sha256[:12])
        try:
            path.unlink(missing_ok=True)
        except OSError as err:  # a read-only cache: the copy is never used all the same (checked on every load)
            log.warning("cache %s: cannot delete the damaged copy (%s)", path, err.strerror or err)
        return None

    def save(self, shard: int, sha256: str, data: bytes) -> None:
        write_file_atomic(self.path(shard, sha256), data)

    def evict(self, keep: Mapping[int, set[str]]) -> list[Path]:
        """Delete every cached object of the shards in ``keep`` whose sha256 is not kept, and the
        legacy folder's objects; returns what was deleted. Only names the cache writes are touched
        (``<sha256>.parquet``; other files in its folders are not its own), and the temporary files
        of writers that were killed mid-write (:func:`versions.store.remove_dead_temp_files`)."""
        deleted = []
        for shard, kept in keep.items():
            folder = self.root / "shards" / str(shard)
            for tmp in remove_dead_temp_files(folder):
                log.info("cache %s: deleted %s, left by a writer that was killed mid-write", self.root, tmp.name)
            for path in _objects_in(folder):
                if path.stem not in kept:
                    path.unlink(missing_ok=True)
                    deleted.append(path)
        for path in _objects_in(self.root / self.LEGACY):
            path.unlink(missing_ok=True)
            deleted.append(path)
        return deleted


_OBJECT_NAME = re.compile(r"[0-9a-f]{64}\.parquet")


def _objects_in(folder: Path) -> list[Path]:
    """The cached objects in ``folder``: files named ``<sha256>.parquet``, as :meth:`BundleCache.save` names them."""
    return [p for p in folder.iterdir() if _OBJECT_NAME.fullmatch(p.name) and p.is_file()] if folder.is_dir() else []


@dataclass
class _Downloads:
    objects: int = 0
    bytes: int = 0
    cache_error: str | None = None  # the first object that could not be kept in the disk cache, and why
    answered: Callable[[], None] | None = None  # called at each object read, from the store or the cache: the poll's progress


def fetch_object(store: ObjectStore, key: str, sha256: str, size: int, shard: int, cache: BundleCache | None,
                 downloads: _Downloads | None = None, *, offline: bool = False) -> bytes:
    """One of a shard's objects, verified: from the cache if intact, else from the store (then cached).
    ``offline`` (the store does not answer): from the cache only, PullError naming the object if it
    holds no intact copy."""
    data = cache.load(shard, sha256, size) if cache is not None else None
    if data is not None:
        # Progress too: a restarted node loading a large version from its cache (51 s at 1M users)
        # is not a store that does not answer (nor, past wedged_after, a wedged poller).
        if downloads is not None and downloads.answered is not None:
            downloads.answered()
        return data
    where = f"{store.uri}/{key}"
    if offline:
        raise PullError(f"cache {cache.root if cache is not None else '(none)'}: holds no intact copy of {where} "
                        f"(shard {shard}), and the store does not answer")
    answered = downloads.answered if downloads is not None else None
    try:
        # Progress per MiB of the body: a large object downloading slowly is not a store that does
        # not answer (a poll is left behind as hung only after hung_after without a byte).
        data = store.get(key, progress=(lambda _got: answered()) if answered is not None else None)
    except ObjectNotFound:
        raise IntegrityError(f"{where}: missing (manifest shard {shard} references it)") from None
    if downloads is not None:
        downloads.objects += 1
        downloads.bytes += len(data)
        if downloads.answered is not None:
            downloads.answered()
    if len(data) != size:
        raise IntegrityError(f"{where}: {len(data)} bytes, manifest says {size} (refused)")
    actual = _sha256(data)
    if actual != sha256:
        raise IntegrityError(f"{where}: sha256 {actual[:16]}.. does not match the manifest's "
                             f"{sha256[:16]}.. (refused; the object was changed or damaged)")
    if cache is not None:
        try:
            cache.save(shard, sha256, data)
        except OSError as err:  # a full or read-only disk: the verified bytes serve from memory all the same
            problem = (f"cache {cache.root}: could not keep {key} ({err.strerror or err}); it is served from memory "
                       "and a restart downloads it again (free space on that disk, or give --cache-dir on a larger one)")
            first = downloads is None or downloads.cache_error is None
            log.log(logging.WARNING if first else logging.DEBUG, "%s", problem)  # once per poll
            if downloads is not None and first:
                downloads.cache_error = problem
    return data


# ---------------------------------------------------------------- the index


# The chain of a shard view that users were dropped from (PullClient._drop_forgotten): it names no
# object (so the cache keeps none of the shard's objects) and no manifest's chain starts with it (so
# the next version is rebuilt from its base, never layered onto the view).
_SCRUBBED = ("scrubbed",)


@dataclass(frozen=True)
class ShardView:
    """One shard of a served version: the chain it was built from and its users' checked deltas."""

    chain: tuple[str, ...]  # sha256 of the base bundle and of each layer applied, oldest first
    users: Mapping[str, ServedDelta]
    scope_of: Mapping[str, str] = field(default_factory=dict)  # member -> shared scope composed under its delta


@dataclass(frozen=True)
class ScopesView:
    """A served version's shared scopes: every scope's checked delta (schemas.manifest.ScopesEntry)."""

    sha256: str | None  # of the scopes object (None: the version has no scope)
    deltas: Mapping[str, ServedDelta]


NO_SCOPES = ScopesView(None, {})


class _Users(AbstractMapping):
    """user_id -> ServedDelta over every shard view (a user is looked up in its own shard)."""

    def __init__(self, views: Mapping[int, ShardView], num_shards: int):
        self._views, self._num_shards = views, num_shards

    def __getitem__(self, user_id: str) -> ServedDelta:
        view = self._views.get(shard_of(user_id, self._num_shards))
        if view is None:
            raise KeyError(user_id)
        return view.users[user_id]

    def __iter__(self) -> Iterator[str]:
        for view in self._views.values():
            yield from view.users

    def __len__(self) -> int:
        return sum(len(view.users) for view in self._views.values())


@dataclass(frozen=True)
class ServingIndex:
    """One published version's deltas for the shards a node owns (immutable once built)."""

    version: int
    fingerprint: str
    num_shards: int
    shards: tuple[int, ...]
    views: Mapping[int, ShardView] = field(repr=False)
    scopes: ScopesView = field(default=NO_SCOPES, repr=False)
    forgotten: frozenset[str] = field(default=frozenset(), repr=False)  # the manifest's (sha256 of ids)

    @property
    def users(self) -> Mapping[str, ServedDelta]:
        return _Users(self.views, self.num_shards)

    @property
    def shard_users(self) -> Mapping[int, Mapping[str, ServedDelta]]:
        return {shard: view.users for shard, view in self.views.items()}

    def served_for(self, user_id: str | None) -> ServedDelta | None:
        """The checked, batch-ready delta of ``user_id`` (read in canonical form,
        :func:`engram_core.text.canonical_id`, as ingest stores ids); None for no user or an
        unknown one (the base model)."""
        if not user_id:
            return None
        user_id = canonical_id(user_id)
        view = self.views.get(shard_of(user_id, self.num_shards))
        return view.users.get(user_id) if view is not None else None

    def scope_of(self, user_id: str | None) -> str | None:
        """The shared scope whose delta is composed under ``user_id``'s (None: none)."""
        if not user_id:
            return None
        user_id = canonical_id(user_id)
        view = self.views.get(shard_of(user_id, self.num_shards))
        return view.scope_of.get(user_id) if view is not None else None

    def served_parts_for(self, user_id: str | None) -> tuple[ServedDelta, ...]:
        """The checked deltas a request of ``user_id`` is served with, summed: ``(scope, own)`` for a
        member of a shared scope (pipeline.scopes: the scope's delta compiled once, the member's own
        compiled over it), ``(own,)`` for any other user, () for no user or an unknown one."""
        served = self.served_for(user_id)
        if served is None:
            return ()
        scope = self.scope_of(user_id)
        shared = self.scopes.deltas.get(scope) if scope is not None else None
        return (shared, served) if shared is not None else (served,)

    def deltas_for(self, user_id: str | None) -> tuple[Delta, ...]:
        """The deltas a request of ``user_id`` is served with: ``(scope_delta, user_delta)`` for a
        member of a shared scope, ``(user_delta,)`` otherwise, () for no user or an unknown one (the
        base model)."""
        return tuple(part.delta for part in self.served_parts_for(user_id))

    def owns(self, user_id: str) -> bool:
        return shard_of(canonical_id(user_id), self.num_shards) in self.views

    @property
    def num_users(self) -> int:
        return sum(len(view.users) for view in self.views.values())

    @property
    def nbytes(self) -> int:
        """Bytes of delta arrays held (layers, row ids, values; scopes' too); Python object overhead excluded."""
        return (sum(d.delta.nbytes for view in self.views.values() for d in view.users.values())
                + sum(d.delta.nbytes for d in self.scopes.deltas.values()))


def load_shard_deltas(em: EngramModel, shard: int, num_shards: int, data: bytes, source: str,
                      scope_of: dict[str, str] | None = None) -> dict[str, ServedDelta]:
    """Decode a verified bundle; check every delta against the loaded model and the shard, once.
    ``scope_of`` (if given) receives the members' scopes (the bundle's ``scope`` column)."""
    served = {}
    table = decode_bundle(data, source=source)
    for user, delta in bundle_deltas(table).items():
        _check_shard(user, shard, num_shards, source)
        served[user] = served_delta(em, delta, owner=f"{source} user {user!r}")
    if scope_of is not None:
        scope_of.update(bundle_scopes(table))
    return served


def load_scope_deltas(em: EngramModel, data: bytes, source: str) -> dict[str, ServedDelta]:
    """Decode a verified scopes object (a bundle, user_id = scope id); check every scope's delta."""
    return {scope: served_delta(em, delta, owner=f"{source} scope {scope!r}")
            for scope, delta in bundle_deltas(decode_bundle(data, source=source)).items()}


def apply_layer(em: EngramModel, users: dict[str, ServedDelta], shard: int, num_shards: int, layer,
                source: str, scope_of: dict[str, str] | None = None) -> None:
    """Apply a decoded, verified layer to ``users`` (in place): its tombstones remove users, its
    other rows replace them whole (and their scope, in ``scope_of`` if given), each delta checked
    against the model."""
    upserts, removed = layer_parts(layer)
    scope_of = scope_of if scope_of is not None else {}
    for user in removed.to_pylist():
        _check_shard(user, shard, num_shards, source)
        users.pop(user, None)
        scope_of.pop(user, None)
    named = bundle_scopes(upserts)
    for user, delta in bundle_deltas(upserts).items():
        _check_shard(user, shard, num_shards, source)
        users[user] = served_delta(em, delta, owner=f"{source} user {user!r}")
        scope_of.pop(user, None)
        if user in named:
            scope_of[user] = named[user]


def _check_shard(user: str, shard: int, num_shards: int, source: str) -> None:
    if shard_of(user, num_shards) != shard:
        raise PullError(f"{source}: user {user!r} belongs to shard {shard_of(user, num_shards)}, not {shard}")


@dataclass(frozen=True)
class PollResult:
    changed: bool  # a new version is now served
    version: int | None  # the version served after this poll
    fetched_shards: tuple[int, ...] = ()  # shards whose deltas were (re)loaded or had layers applied
    error: str | None = None
    downloaded_objects: int = 0  # objects this poll got from the store (not from the cache)
    downloaded_bytes: int = 0
    layers_applied: int = 0  # layers applied onto a shard the node already served
    rebuilt_shards: tuple[int, ...] = ()  # shards built from their base (cache or store)
    evicted_objects: int = 0  # cached objects no served chain names any more, deleted
    cache_error: str | None = None  # an object that could not be kept in the disk cache (served from memory)
    stale: dict | None = None  # PullClient.stale(): the served version is not confirmed CURRENT (None: it is)
    hung: bool = False  # the poll had no answer from the store for hung_after and was left behind (error says so)


def store_fix(uri: str, error: Exception) -> str:
    """What an operator does about a version whose pointer, manifest or objects are damaged or
    missing (a serving node can only keep what it serves), to append to ``error``'s message; ""
    for other failures, which say their own fix (another model, --shards, the network, the disk)."""
    if not isinstance(error, (PublishError, ManifestError, BundleSchemaError, DeltaMismatch)) \
            or isinstance(error, ModelError) or "engram rollback" in str(error):
        return ""
    return (f" (fix the store: restore it from a backup, or make an intact version current: engram versions "
            f"--store {uri} lists them, engram rollback --store {uri} --to N)")


_MOVES_FOLLOWED = 3  # polls in a row that find CURRENT moved under them before one reports the error


class _Abandoned(Exception):
    """The poll this thread runs was left behind as hung (PullClient.poll_bounded): what it finds is dropped."""


@dataclass(eq=False)
class _Attempt:
    """One poll: when it started, when the store (or the cache) last answered it, whether it was left
    behind as hung (its outcome then changes nothing) or has committed its outcome (no longer left)."""

    started: float
    answered: float
    thread: threading.Thread
    abandoned: bool = False
    committed: bool = False
    ended: bool = False


MAX_LEFT_POLLS = 16
"""Polls left behind as hung that may still run (each ends once botocore's timeouts and retries fail
it, about 6 minutes: 3 or 4 at the default interval and bound): while this many run, the poller
starts no other one (threads and connections stay bounded whatever the hang)."""


class _CurrentMoved(Exception):
    """A version's object was missing or changed and CURRENT no longer names that version."""

    def __init__(self, error: IntegrityError):
        super().__init__(str(error))
        self.error = error


HUNG_POLL_S = 60.0
"""A poll whose store has not answered any of its requests for this long counts as failing for
/healthz and ``max_stale`` (a CURRENT read is one small request; a download of many objects is not
hung while they keep coming); a node's first read of CURRENT is given this long (answered_within)."""
HUNG_POLL_ENV = "ENGRAM_HUNG_POLL_S"
WEDGED_POLL_FACTOR = 10
WEDGED_POLL_MIN_S = 600.0
"""A poll whose store has answered none of its requests for ``WEDGED_POLL_FACTOR`` times the hung-poll
bound, and at least ``WEDGED_POLL_MIN_S`` (longer than botocore's connect and read timeouts times the
store's 5 attempts for one request, about 6 minutes: a store that never answers fails a poll before
then), is a wedged poller: the node's liveness fails (serving.http ``/livez``)."""
REPEAT_LOG_S = 600.0
"""A poll failing as the one before it did is logged at DEBUG, and at ERROR again once per this many
seconds (a node waiting for a first night, or for a store down for hours, logged an ERROR per poll)."""


def hung_poll_seconds() -> float:
    """:data:`HUNG_POLL_S`, or ``$ENGRAM_HUNG_POLL_S`` (seconds, above 0) where set; ValueError
    naming the variable for any other value."""
    return seconds_from_env(HUNG_POLL_ENV, HUNG_POLL_S)


def answered_within(store: ObjectStore, action: str, request: Callable[[], object], seconds: float):
    """``request()`` (a call that asks ``store``), given ``seconds`` to return: its result, or the
    exception it raised; StoreUnreachable naming the store, ``action`` and the wait when it has not
    returned by then (a store that accepts connections and never answers holds one request for
    botocore's timeouts and retries, 5 minutes and more). The request goes on in a daemon thread
    until it fails; what it returns then is dropped."""
    outcome: dict[str, object] = {}

    def run() -> None:
        try:
            outcome["value"] = request()
        except BaseException as err:  # handed to the caller below
            outcome["error"] = err

    thread = threading.Thread(target=run, name="engram-store-read", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StoreUnreachable(f"{store.describe()}: {action} failed: no answer for {human_duration(seconds)} (it "
                               "accepts connections and does not answer? a frozen server or a load balancer with no "
                               "live backend); the store does not answer")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class PullClient:
    """Follows a store's CURRENT for the shards one serving node owns (``shards=None``: all).

    With a ``cache_dir``, every poll that confirms the served version keeps its manifest as the
    node's last-good (serving.last_good); a poll that finds the store unreachable (no answer,
    versions.store.StoreUnreachable) before anything is served loads that version from the cache
    instead, every object re-verified, and serves it as stale until a poll reaches the store.
    ``current``: the CURRENT manifest the caller read before the first poll (engram serve reads it
    to pick the model); a fallback never serves the users it forgets, nor a last-good version newer
    than it (CURRENT was rolled back from it). ``max_stale`` (seconds; None: no bound): once the
    served version is stale and its last confirmation is older than that, :meth:`over_max_stale`
    says why, and the server answers no user's request (serving.http) until a poll confirms a version.
    A poll still running after ``hung_after`` seconds (default :func:`hung_poll_seconds`) counts as
    failing (a store that accepts connections and never answers holds a poll for botocore's timeouts
    and retries, minutes, and the node said ``ok`` meanwhile, whatever ``max_stale``).
    """

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
        current: Manifest | None = None,
        max_stale: float | None = None,
        hung_after: float | None = None,
        wedged_after: float | None = None,
    ) -> None:
        if max_stale is not None and not 0 < max_stale < float("inf"):
            raise ValueError(f"max_stale {max_stale!r}: give seconds above 0, or None for no bound")
        self.store = store
        self.max_stale = max_stale
        self.em = em
        self.shards = check_shard_list(shards, "PullClient shards")
        self.cache = BundleCache(cache_dir) if cache_dir is not None else None
        self.interval = interval
        self.jitter = jitter
        self.last_error: str | None = None
        self.last_poll_at: float | None = None
        self.hung_after = hung_poll_seconds() if hung_after is None else hung_after
        self.wedged_after = (max(WEDGED_POLL_FACTOR * self.hung_after, WEDGED_POLL_MIN_S) if wedged_after is None
                             else wedged_after)
        self.last_unreachable = False  # the last poll failed because the store did not answer
        self._said: tuple[str, float, float] | None = None  # (failure logged at ERROR, when, since): repeats at DEBUG
        self.polling_since: float | None = None  # the poll in progress: its start, or the store's last answer in it
        self.confirmed_at: float | None = None  # when a poll last found the served version CURRENT in the store
        self.stale_since: float | None = None  # the first failed poll since then (None: the last poll succeeded)
        self.loaded_from: str | None = None  # "store", or "last-good cache" (loaded so while the store was unreachable)
        self._index: ServingIndex | None = None
        self._manifest: Manifest | None = None  # the served index's
        self._seen: Manifest | None = current  # the last CURRENT manifest read from the store
        self._recorded: tuple | None = None  # (version, forgotten, confirmed_at) as the last-good record holds them
        self._record_failed = False  # the last write of the record failed (said once, at WARNING)
        self._etag: str | None = None
        self._poll_lock = threading.Lock()  # fall_back (a start's outage) against itself
        self._attempts = threading.Condition()  # the live poll (one at a time) and the polls left behind
        self._live: _Attempt | None = None
        self._left: list[_Attempt] = []  # polls left behind as hung that still run
        self._local = threading.local()  # .attempt: the poll this thread runs
        self._swap_lock = threading.Lock()  # a poll's swap against a fallback while it hangs (fall_back_if_hung)
        self._fell_back_for: float | None = None  # the hung poll (its polling_since) a fallback was tried for
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def index(self) -> ServingIndex | None:
        """The version being served (one reference, replaced whole on a swap)."""
        return self._index

    def deltas_for(self, user_id: str | None) -> tuple[Delta, ...]:
        """``(scope_delta, user_delta)`` for a member of a shared scope, ``(user_delta,)`` for another
        user, () for no user, an unknown one, or before a version is loaded (see ServingIndex)."""
        index = self._index
        return index.deltas_for(user_id) if index is not None else ()

    def poll(self) -> PollResult:
        """Check CURRENT once; load and swap in a new version if it changed. Never raises for a bad version.
        A failure keeps the served version, now stale (:meth:`stale`); with nothing served yet and the
        store unreachable, the last-good version is loaded from the cache (see the class)."""
        attempt = self._begin()
        try:
            now = self.last_poll_at = attempt.started
            try:
                result = self._poll()
                self._claim()
            except _Abandoned:
                return self._left_result()
            except self._FAILURES as e:
                return self._failed(f"{type(e).__name__}: {e}{store_fix(self.store.uri, e)}",
                                    isinstance(e, StoreUnreachable), now)
            self.last_error, self.stale_since, self.polling_since = None, None, None
            self.last_unreachable, self._said = False, None
            self.confirmed_at, self.loaded_from = now, "store"
            cache_error = self._remember()
            return replace(result, cache_error="; ".join(filter(None, (result.cache_error, cache_error))) or None)
        finally:
            self._end(attempt)

    def poll_bounded(self) -> PollResult | None:
        """:meth:`poll`, left behind once it has had no answer from the store for ``hung_after``: the
        poll's PollResult, or (left behind) a failed one with ``hung`` set, its ``error`` saying so, as
        a poll that found the store unreachable (the served version stale; with nothing served yet,
        the cache's last-good). A poll left behind goes on in its daemon thread until the store's
        timeouts fail it; what it finds then is dropped, and the next poll asks again (before, one
        hung poll held the poller for botocore's timeouts and retries, minutes, and a store that
        came back meanwhile was not seen until then). A poll left by another caller (the first pull)
        that hangs is left behind too. While :data:`MAX_LEFT_POLLS` polls left behind still run, no
        other is started and a failed ``hung`` result says so; None once :meth:`stop` is called."""
        left = self._leave_if_hung()
        with self._attempts:
            running = len(self._left)
        if running >= MAX_LEFT_POLLS:
            log.debug("pull from %s: %d polls left behind as hung still run; not starting another",
                      self.store.uri, running)
            if left is not None:
                return left[1]
            # Said as a failed poll (stale, max_stale enforced): the last poll may have succeeded.
            message = (f"{self.error() or 'StoreUnreachable: the store does not answer'}; {running} polls left behind "
                       "as hung still run, so no other is started until one ends")
            return replace(self._failed(message, True, time.time(), still_polling=True), hung=True)
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["value"] = self.poll()
            except BaseException as err:  # a bug: raised again in the caller's thread, as poll() raises it
                outcome["error"] = err

        worker = threading.Thread(target=run, name="engram-poll", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(min(0.2, self.hung_after / 4))
            if self._stop.is_set() and worker.is_alive():
                return None
            if worker.is_alive():
                left = self._leave_if_hung()
                if left is not None and left[0].thread is worker:
                    return left[1]
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _begin(self) -> _Attempt:
        """Wait for the live poll to end (or be left behind); this thread's poll is the live one now."""
        with self._attempts:
            while self._live is not None:
                self._attempts.wait()
            now = time.time()
            attempt = self._live = _Attempt(now, now, threading.current_thread())
            self.polling_since = now
        self._local.attempt = attempt
        return attempt

    def _end(self, attempt: _Attempt) -> None:
        self._local.attempt = None
        with self._attempts:
            attempt.ended = True
            if self._live is attempt:
                self._live = None
                self._attempts.notify_all()
            elif attempt in self._left:
                self._left.remove(attempt)
                log.debug("pull from %s: a poll left behind as hung (started at %s) has ended; its outcome is dropped",
                          self.store.uri, iso(attempt.started))

    def _claim(self) -> None:
        """Before this thread's poll changes what is served or said: _Abandoned if it was left
        behind as hung (its outcome is dropped); else it can no longer be left behind."""
        attempt = getattr(self._local, "attempt", None)
        if attempt is None:  # not a poll (fall_back at start)
            return
        with self._attempts:
            if attempt.abandoned:
                raise _Abandoned()
            attempt.committed = True

    def _is_left(self) -> bool:
        attempt = getattr(self._local, "attempt", None)
        return attempt is not None and attempt.abandoned

    def _left_result(self) -> PollResult:
        served = self._index.version if self._index is not None else None
        return PollResult(False, served, error="this poll was left behind as hung; its outcome is dropped", hung=True)

    def _leave_if_hung(self) -> tuple[_Attempt, PollResult] | None:
        """Leave the live poll behind if it has had no answer for ``hung_after``: (it, the failed
        PollResult that says so, as :meth:`_failed` makes it); else None."""
        with self._attempts:
            attempt = self._live
            if attempt is None or attempt.committed or time.time() - attempt.answered <= self.hung_after:
                return None
            attempt.abandoned = True  # from now on its outcome changes nothing (_claim)
            # In the same lock: /livez (wedged) never sees a moment with no poll in progress.
            self.polling_since = attempt.answered  # still in progress, left behind, until the next poll
            if not attempt.ended:  # (it may have ended meanwhile: nothing left to wait for)
                self._left.append(attempt)
        message = (f"StoreUnreachable: store {self.store.uri}: the poll in progress has had no answer for over "
                   f"{human_duration(self.hung_after)} (it accepts connections and does not answer? a frozen server or "
                   "a load balancer with no live backend); left behind, the next poll asks again")
        # Stale since the store's last answer, not since the poll was given up on.
        result = replace(self._failed(message, True, attempt.answered, still_polling=True), hung=True)
        with self._attempts:
            if self._live is attempt:
                self._live = None
                self._attempts.notify_all()
        return attempt, result

    def fall_back(self, error: str) -> PollResult:
        """What :meth:`poll` does when the store does not answer, without asking it again: the
        caller's own read at start had no answer (``error``, its message: e.g. a hung read that
        :func:`answered_within` gave up on, which a poll would wait out again for minutes). With
        nothing served yet, the cache's last-good is served (see the class); the next poll asks the store."""
        with self._poll_lock:
            now = self.last_poll_at = time.time()
            return self._failed(f"StoreUnreachable: {error}", True, now)

    def fall_back_if_hung(self) -> PollResult | None:
        """While nothing is served and the poll in progress has had no answer from the store for
        ``hung_after`` (a store that answered the read of CURRENT, then hangs: the poll fails only
        after botocore's timeouts and retries, minutes): serve the cache's last-good now, as a poll
        that found the store unreachable does (see the class), and return that fallback's
        PollResult (``error`` saying the wait and what is served). The poll goes on: a version it
        loads replaces the last-good, a failure leaves it served, stale. None while nothing is
        hung, something is served, or the fallback was tried for this poll (no last-good: the error
        says so in the log)."""
        started, error = self.polling_since, self._error()
        if (self._index is not None or started is None or self.last_error is not None or error is None
                or self._fell_back_for == started):
            return None
        self._fell_back_for = started
        with self._swap_lock:
            if self._index is not None or self.polling_since is None:  # the poll ended meanwhile
                return None
            build, message = self._serve_last_good(error)
            if build is not None:  # under the lock: a poll that succeeds now clears it after, not before
                self.stale_since = self.stale_since or started
                result = PollResult(True, self._index.version, tuple(build.fetched), error=message,
                                    rebuilt_shards=tuple(build.rebuilt), stale=self.stale())
        if build is None:
            log.error("pull from %s: %s", self.store.uri, message)
            return PollResult(False, None, error=message)
        return result

    def _failed(self, message: str, unreachable: bool, now: float, still_polling: bool = False) -> PollResult:
        """A poll that failed with ``message`` (``unreachable``: the store did not answer) at ``now``
        (the start of staleness, if it begins here). ``still_polling``: a poll left behind as hung, which
        still runs (``polling_since`` stays its last answer, so /livez keeps seeing it)."""
        try:
            self._claim()
        except _Abandoned:
            return self._left_result()
        build = None
        if self._index is None and unreachable:
            with self._swap_lock:  # (a fallback while this poll hung may have served it already)
                if self._index is None:
                    build, message = self._serve_last_good(message)
        served = self._index.version if self._index is not None else None
        said, clock = self._said, time.monotonic()
        repeat = said is not None and said[0] == message
        if repeat and clock - said[1] < REPEAT_LOG_S:
            level = logging.DEBUG
        else:
            level, self._said = logging.ERROR, (message, clock, said[2] if repeat else now)
        log.log(level, "pull from %s failed, %s %s: %s%s", self.store.uri,
                "serving the cache's last-good" if build is not None else "still serving",
                f"v{served}" if served is not None else "nothing", message,
                f" (every poll since {iso(self._said[2])}; repeats are logged at DEBUG, at ERROR once per "
                f"{human_duration(REPEAT_LOG_S)})" if repeat else "")
        self.last_error, self.last_unreachable = message, unreachable
        self.stale_since = self.stale_since or now
        cache_error = self._remember()  # the forgets of a version that failed to load, if any
        if not still_polling:
            self.polling_since = None
        if build is None:
            return PollResult(False, served, error=message, cache_error=cache_error, stale=self.stale())
        return PollResult(True, served, tuple(build.fetched), error=message,
                          rebuilt_shards=tuple(build.rebuilt), cache_error=cache_error, stale=self.stale())

    def stale(self) -> dict | None:
        """None while the last poll confirmed the served version as CURRENT (or nothing is served);
        else what is served and why it may be out of date: ``version``, ``loaded_from`` ("store", or
        "last-good cache" when loaded at start with the store unreachable), ``confirmed_at`` (ISO UTC:
        when the store last named it CURRENT), ``since`` (the first failed poll), ``error``,
        ``max_stale_s`` (the bound, seconds; None: none) and ``over_max_stale`` (:meth:`over_max_stale`
        is not None)."""
        index, error = self._index, self._error()
        if index is None or error is None:
            return None
        since = self.stale_since or self.polling_since
        return {"version": index.version, "loaded_from": self.loaded_from, "confirmed_at": iso(self.confirmed_at),
                "since": iso(since), "error": error, "max_stale_s": self.max_stale,
                "over_max_stale": self.over_max_stale() is not None}

    def over_max_stale(self, now: float | None = None) -> str | None:
        """None while the served version may be served (confirmed by the last poll, or stale for no
        longer than ``max_stale``); else one line saying the version, when the store last confirmed
        it, how long ago and the bound: no user's memory is served until a poll confirms a version."""
        index, confirmed_at, error = self._index, self.confirmed_at, self._error(now)
        if self.max_stale is None or index is None or error is None or confirmed_at is None:
            return None
        age = (time.time() if now is None else now) - confirmed_at
        if age <= self.max_stale:
            return None
        return (f"v{index.version} was last confirmed CURRENT in {self.store.uri} at {iso(confirmed_at)}, "
                f"{human_duration(age)} ago, over --max-stale {human_duration(self.max_stale)}: no user's memory is "
                "served until the store answers (the last poll: " + error + ")")

    def error(self, now: float | None = None) -> str | None:
        """Why the served version (or the first one) may not be current: the last poll's error, or
        one saying the poll in progress has had no answer for longer than ``hung_after``; None
        while the last poll succeeded and the one in progress (if any) is not hung."""
        return self._error(now)

    def wedged(self, now: float | None = None) -> str | None:
        """None while the poller is alive (its thread, once :meth:`start` ran, is running, and no
        poll has gone without an answer from the store for ``wedged_after`` seconds: a store that
        never answers fails a poll long before); else one line saying what is wedged. A store
        that does not answer is no wedged node: it waits for it (stale or no_version)."""
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set():
            return f"the poller thread of {self.store.uri} has died; restart the node"
        with self._attempts:  # the live poll, and those left behind as hung (the store's timeouts end them)
            answers = [a.answered for a in self._left] + ([self.polling_since] if self.polling_since else [])
        if not answers:
            return None
        started = min(answers)
        running = (time.time() if now is None else now) - started
        if running <= self.wedged_after:
            return None
        return (f"the poll of {self.store.uri} in progress has not come back for {human_duration(running)}, since "
                f"{iso(started)}, over {human_duration(self.wedged_after)} (a store that never answers fails a poll "
                "before then); restart the node")

    def _answered(self) -> None:
        """The poll in progress read an object, from the store or the disk cache (a download of a
        new version's objects, or a load of a large one from the cache, takes as long as they are
        large: it is not hung while objects keep coming)."""
        now = time.time()
        attempt = getattr(self._local, "attempt", None)
        if attempt is not None:
            attempt.answered = now
            if attempt.abandoned:
                return
        self.polling_since = now

    def _error(self, now: float | None = None) -> str | None:
        """The last poll's error; else, while a poll has run longer than ``hung_after``, one saying
        the store has not answered it for that long (the poll itself fails only after botocore's
        timeouts and retries)."""
        started = self.polling_since
        if self.last_error is not None or started is None:
            return self.last_error
        running = (time.time() if now is None else now) - started
        if running <= self.hung_after:
            return None
        return (f"StoreUnreachable: store {self.store.uri}: the poll in progress has had no answer for "
                f"{human_duration(running)}, since {iso(started)} (a store that does not answer); still waiting")

    def _remember(self) -> str | None:
        """Keep the served version as this store's and model's last-good in the cache (its manifest,
        when it was confirmed, and the users forgotten since); a message if the cache cannot hold it."""
        index, manifest = self._index, self._manifest
        if self.cache is None or index is None or manifest is None or self.confirmed_at is None:
            return None
        state = (manifest.version, index.forgotten, self.confirmed_at)
        if state == self._recorded:
            return None
        record = LastGood(store_identity(self.store), manifest, self.confirmed_at, index.forgotten, self.shards)
        try:
            save_last_good(self.cache.root, record)
        except OSError as err:  # a read-only or full disk: the version is served all the same
            path = record_path(self.cache.root, record.store_id, record.fingerprint, record.shards)
            try:  # an older record would serve, after a restart in an outage, what this node knows is superseded
                path.unlink(missing_ok=True)
                legacy_record_path(self.cache.root, record.store_id, record.fingerprint).unlink(missing_ok=True)
                kept = "a restart while the store does not answer will serve nothing"
            except OSError:
                kept = (f"{path} keeps an older version, which a restart while the store does not answer would "
                        "serve (delete it)")
            problem = (f"cache {self.cache.root}: could not keep v{manifest.version} as the last-good "
                       f"({err.strerror or err}); {kept} (make the folder writable, or free space on that disk)")
            log.log(logging.DEBUG if self._record_failed else logging.WARNING, "%s", problem)
            self._record_failed = True
            return problem
        self._recorded, self._record_failed = state, False
        return None

    def _serve_last_good(self, message: str) -> tuple["_Build | None", str]:
        """Nothing served yet and the store does not answer: load this store's and model's last-good
        version from the cache (every object re-verified, none downloaded). (the build or None, the
        poll's error message, saying which)."""
        if self.cache is None:
            return None, f"{message}; no --cache-dir, so no last-good version to serve"
        store_id = store_identity(self.store)
        records, problems = fallback_candidates(self.cache.root, store_id, self.em.fingerprint, self.shards)
        if not records:
            if problems:
                return None, f"{message}; {problems[0]}"
            return None, (f"{message}; cache {self.cache.root} holds no last-good version of this store for model "
                          f"{self.em.fingerprint[:16]}.. (a node must reach the store once to start)")
        for problem in problems:
            log.warning("%s (another record is tried)", problem)
        refusals = []
        for record in records:  # its own first, then records of nodes whose shards cover its own
            build, refusal = self._load_last_good(record, records)
            if build is not None:
                return build, (f"{message}; serving v{record.manifest.version} from the cache's last-good (last "
                               f"confirmed CURRENT at {iso(record.confirmed_at)}), which may be stale")
            refusals.append(refusal)
        return None, f"{message}; " + "; ".join(dict.fromkeys(refusals))

    def _load_last_good(self, record: LastGood, records: Sequence[LastGood]) -> tuple["_Build | None", str | None]:
        """Serve ``record`` (its objects from the cache only): (the build, None), or (None, why not).
        Users forgotten by any record of this store and model (another node may have seen a later
        forget) or by the CURRENT read at start are never served."""
        manifest, seen = record.manifest, self._seen
        if seen is not None and seen.version < manifest.version:
            return None, (f"the cache's last-good v{manifest.version} is not served: CURRENT named "
                          f"v{seen.version} when this node started (a rollback moved it back)")
        erased = set().union(*(r.forgotten for r in records)) | (set(seen.forgotten) if seen is not None else set())
        build = _Build(offline=True)
        try:
            index = self._build(manifest, build)
        except self._FAILURES as err:
            return None, f"the cache's last-good v{manifest.version} cannot be served: {err}"
        self._index, self._manifest = index, manifest
        self.confirmed_at, self.loaded_from = record.confirmed_at, "last-good cache"
        self._recorded = (manifest.version, index.forgotten, record.confirmed_at)
        self._drop_forgotten(frozenset(erased), manifest.version)
        log.warning("%s does not answer: serving the cache's last-good v%d (last confirmed CURRENT at %s; %d users "
                    "in %d shards, every object verified); polling until the store answers", self.store.uri,
                    manifest.version, iso(record.confirmed_at), index.num_users, len(index.shards))
        return build, None

    def _poll(self) -> PollResult:
        for attempt in range(1, _MOVES_FOLLOWED + 1):
            try:
                return self._poll_once()
            except _CurrentMoved as moved:
                if attempt == _MOVES_FOLLOWED:
                    raise IntegrityError(f"{moved.error}; CURRENT moved {attempt} times while this node pulled (a "
                                         "publish, rollback, forget or gc each time); the next poll tries again") from None
                log.info("%s: %s; CURRENT moved meanwhile (a publish, rollback, forget or gc), pulling again",
                         self.store.uri, moved.error)

    def _poll_once(self) -> PollResult:
        served = self._index.version if self._index is not None else None
        head = self.store.head(CURRENT_KEY)
        if head is not None and head.etag == self._etag:
            return PollResult(False, served)
        current = read_current(self.store)  # a missing CURRENT of a store with published versions: the fix named
        if current is None:
            raise PullError(f"{self.store.uri}: no CURRENT pointer (nothing published yet)")
        manifest, etag = current
        if not self._is_left():
            self._seen = manifest
        self._answered()  # the store answered: a hung poll is one with no answer for hung_after
        build = _Build()
        build.downloads.answered = self._answered
        try:
            index = self._build(manifest, build)
        except self._FAILURES as err:
            self._drop_forgotten(manifest.forgotten, manifest.version)  # not servable; its erasures are honoured
            if isinstance(err, IntegrityError) and self._moved_from(etag):
                raise _CurrentMoved(err) from err  # its objects were rewritten or collected under it: not damage
            raise
        with self._swap_lock:  # not while a fallback to the last-good (fall_back_if_hung) is being swapped in
            self._claim()  # a poll left behind as hung swaps nothing in
            self._index, self._manifest = index, manifest  # the swap: readers hold either the old index or this one
        self._etag = etag
        evicted = self._evict(index)
        log.info("serving v%d from %s (%d users in %d shards; loaded shards %s, %d layer(s) applied, %d bytes "
                 "downloaded)", manifest.version, self.store.uri, index.num_users, len(index.shards), build.fetched,
                 build.layers_applied, build.downloads.bytes)
        return PollResult(served != manifest.version or bool(build.fetched), manifest.version, tuple(build.fetched),
                          downloaded_objects=build.downloads.objects, downloaded_bytes=build.downloads.bytes,
                          layers_applied=build.layers_applied, rebuilt_shards=tuple(build.rebuilt),
                          evicted_objects=len(evicted), cache_error=build.downloads.cache_error)

    def _moved_from(self, etag: str) -> bool:
        try:
            head = self.store.head(CURRENT_KEY)
        except StoreError:
            return False
        return head is None or head.etag != etag

    def _drop_forgotten(self, forgotten: Iterable[str], version: int) -> None:
        """Stop serving the users that ``forgotten`` (sha256 of ids, as manifests hold them; of
        manifest ``version``) names and the served version does not (an erasure since), when that
        manifest itself cannot be loaded (a damaged object, another model, a disk error, a store that
        does not answer): they leave memory now and their shards' cached objects (which hold their
        rows; the forget rewrote every retained version without them) leave the disk; the other users
        keep being served from memory. Their shards are rebuilt from the base on the next good poll."""
        index = self._index
        erased = set(forgotten) - index.forgotten if index is not None else set()
        if not erased or self._is_left():
            return
        views, dropped = dict(index.views), 0
        for shard, view in index.views.items():
            gone = {user for user in view.users if forgotten_id(user) in erased}
            if gone:
                users = {u: d for u, d in view.users.items() if u not in gone}
                scope_of = {u: s for u, s in view.scope_of.items() if u not in gone}
                views[shard] = ShardView(_SCRUBBED, users, scope_of)
                dropped += len(gone)
        self._index = replace(index, views=views, forgotten=index.forgotten | erased)
        if dropped:
            log.warning("%s v%d forgets %d user(s) that served v%d holds; they are no longer served, though v%d "
                        "could not be loaded (see the error)", self.store.uri, version, dropped, index.version, version)
            self._evict(self._index)

    def _evict(self, index: ServingIndex) -> list[Path]:
        """Delete the cached objects of this node's shards that the served version does not name."""
        if self.cache is None:
            return []
        try:
            keep = {shard: set(view.chain) for shard, view in index.views.items()}
            keep[SCOPES_CACHE] = {index.scopes.sha256} if index.scopes.sha256 else set()
            return self.cache.evict(keep)
        except OSError as err:  # the version is served; the next successful poll evicts again
            log.error("cache %s: could not evict unreferenced objects: %s", self.cache.root, err)
            return []

    def _build(self, manifest: Manifest, build: "_Build") -> ServingIndex:
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
        views: dict[int, ShardView] = {}
        for shard in owned:
            held = previous.views.get(shard) if reuse else None
            views[shard] = self._shard_view(manifest, manifest.shard(shard), held, build)
        scopes = self._scopes_view(manifest, previous.scopes if previous is not None else NO_SCOPES, build)
        return ServingIndex(manifest.version, manifest.fingerprint, manifest.num_shards, tuple(owned), views, scopes,
                            frozenset(manifest.forgotten))

    def _scopes_view(self, manifest: Manifest, held: ScopesView, build: "_Build") -> ScopesView:
        """The version's shared scopes: ``held`` if the same object, else fetched (cache or store),
        verified and checked. Every node holds every scope (members live in every shard)."""
        entry = manifest.scopes
        if entry is None:
            return NO_SCOPES
        if held.sha256 == entry.sha256:
            return held
        data = fetch_object(self.store, entry.key, entry.sha256, entry.bytes, SCOPES_CACHE, self.cache, build.downloads,
                            offline=build.offline)
        return ScopesView(entry.sha256, load_scope_deltas(self.em, data, f"{self.store.uri}/{entry.key}"))

    def _shard_view(self, manifest: Manifest, entry: ShardEntry, held: ShardView | None, build: "_Build") -> ShardView:
        """The shard's view of ``entry``'s chain: ``held`` itself if unchanged, ``held`` plus the
        new layers if the chain extends it, else built from the base."""
        chain = entry.delta_chain
        if held is not None and held.chain == chain:
            return held
        shard, num_shards = entry.shard, manifest.num_shards
        incremental = held is not None and chain[:len(held.chain)] == held.chain
        if incremental:
            users, scope_of = dict(held.users), dict(held.scope_of)
            start = len(held.chain) - 1  # layers the node already applied
        else:
            data = fetch_object(self.store, entry.bundle_key, entry.bundle_sha256, entry.bundle_bytes, shard,
                                self.cache, build.downloads, offline=build.offline)
            scope_of = {}
            users = load_shard_deltas(self.em, shard, num_shards, data, f"{self.store.uri}/{entry.bundle_key}", scope_of)
            start = 0
            build.rebuilt.append(shard)
        for i in range(start, len(entry.layers)):
            layer = entry.layers[i]
            source = f"{self.store.uri}/{layer.key}"
            data = fetch_object(self.store, layer.key, layer.sha256, layer.bytes, shard, self.cache, build.downloads,
                                offline=build.offline)
            table = decode_layer(data, source=source, fingerprint=manifest.fingerprint, parent_sha256=chain[i])
            apply_layer(self.em, users, shard, num_shards, table, source, scope_of)
            build.layers_applied += incremental
        build.fetched.append(shard)
        return ShardView(chain, users, scope_of)

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
            self.poll_bounded()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop polling: wait at most ``timeout`` seconds for a poll in progress (one on a store
        that does not answer runs for minutes; left behind, the daemon thread ends with the process,
        and what it wrote to the cache is whole: every write is atomic)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None


@dataclass
class _Build:
    """What one poll's build did (for its PollResult)."""

    downloads: _Downloads = field(default_factory=_Downloads)
    offline: bool = False  # the store does not answer: objects from the cache only
    fetched: list[int] = field(default_factory=list)
    rebuilt: list[int] = field(default_factory=list)
    layers_applied: int = 0


# ---------------------------------------------------------------- the model


_MODEL_FETCHES: dict[tuple[str, str], tuple[threading.Thread, FetchProgress, dict]] = {}
_MODEL_FETCHES_LOCK = threading.Lock()


def fetch_model_within(store: ObjectStore, fp: str, cache_dir: str | Path, seconds: float,
                       said: Callable[[str], None] | None = None) -> Path:
    """versions.models.fetch_model, given ``seconds`` without an answer from the store: the model's
    folder, or the fetch's own error; StoreUnreachable naming the object it waits for and since when
    once the store has sent nothing of it for that long (a store that accepts connections and never
    answers held the fetch for botocore's timeouts and retries, minutes, and the node said
    ``starting`` with no reason). A slow download is not hung while its bytes keep coming. The fetch
    goes on in a daemon thread, one per cache and model in this process: a later call waits for the
    one under way (its download is not lost). ``said(line)``: where the fetch is, every 0.2 s."""
    entry_key = (str(Path(cache_dir).expanduser().resolve()), fp)
    with _MODEL_FETCHES_LOCK:
        entry = _MODEL_FETCHES.get(entry_key)
        if entry is None or (not entry[0].is_alive() and "error" in entry[2]):  # none, or one that failed: again
            progress, outcome = FetchProgress(), {}

            def run() -> None:
                try:
                    outcome["value"] = fetch_model(store, fp, cache_dir, progress)
                except BaseException as err:  # handed to the caller
                    outcome["error"] = err

            thread = threading.Thread(target=run, name="engram-model-fetch", daemon=True)
            entry = _MODEL_FETCHES[entry_key] = (thread, progress, outcome)
            thread.start()
    thread, progress, outcome = entry
    while thread.is_alive():
        thread.join(0.2)
        if not thread.is_alive():
            break
        key, since = progress.key, progress.since
        if progress.locked_out:
            where = f"waiting for another fetch of model {fp[:16]}.. into {cache_dir} (its lock)"
        elif key is None:
            where = f"checking model {fp[:16]}.. in {cache_dir}"
        else:
            waited = time.time() - since
            files = f"file {progress.files + 1} of {progress.total}" if progress.total else "its file list"
            where = (f"fetching model {fp[:16]}.. from {store.uri}: {key} ({files}, {progress.got} bytes so far), "
                     f"last answer {human_duration(waited)} ago, at {iso(since)}")
            if waited > seconds:
                raise StoreUnreachable(
                    f"{store.describe()}: fetch of model {fp[:16]}.. failed: {key} has had no answer for "
                    f"{human_duration(waited)}, since {iso(since)} ({progress.got} bytes of it came; it accepts "
                    "connections and does not answer? a frozen server or a load balancer with no live backend); the "
                    "store does not answer")
        if said is not None:
            said(where)
    with _MODEL_FETCHES_LOCK:
        if _MODEL_FETCHES.get(entry_key) is entry and "value" in outcome:
            del _MODEL_FETCHES[entry_key]  # done: the next fetch finds the model in the cache
    if "error" in outcome:
        with _MODEL_FETCHES_LOCK:
            if _MODEL_FETCHES.get(entry_key) is entry:
                del _MODEL_FETCHES[entry_key]
        raise outcome["error"]
    return outcome["value"]


def resolve_model(store: ObjectStore, manifest: Manifest, *, model_dir: str | Path | None,
                  cache_dir: str | Path, device: str = "cpu", hung_after: float | None = None,
                  said: Callable[[str], None] | None = None) -> EngramModel:
    """Load the model a manifest was compiled for: ``model_dir`` if given (must match), else from the
    store (with ``hung_after``: :func:`fetch_model_within` those seconds, saying where it is to ``said``)."""
    from engram_core.checkpoint import load_checkpoint

    if model_dir is not None:
        local = fingerprint(model_dir)
        if local != manifest.fingerprint:
            raise FingerprintMismatch(
                f"model {model_dir}: fingerprint {local[:16]}.. but {store.uri} v{manifest.version} was compiled "
                f"for {manifest.fingerprint[:16]}..; point --model at the checkpoint with that fingerprint (engram "
                "model info DIR shows a checkpoint's), or leave --model out to fetch the store's model")
        return load_checkpoint(model_dir, device=device)
    if hung_after is None:
        return load_checkpoint(fetch_model(store, manifest.fingerprint, cache_dir), device=device)
    folder = fetch_model_within(store, manifest.fingerprint, cache_dir, hung_after, said)
    if said is not None:
        said(f"loading model {manifest.fingerprint[:16]}.. from {folder}")
    return load_checkpoint(folder, device=device)
