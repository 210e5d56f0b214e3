"""The bucket's layout: every key the versioned store writes, and how users map to shards.

    CURRENT                               {"version": N, "manifest_key": ...}, moved only by versions.commit
    manifests/v00000001.json              immutable, one per version (schemas.manifest)
    objects/bundles/<sha256>.parquet      shards' base bundles, content-addressed, shared between versions
    objects/layers/<sha256>.parquet       delta layers over a base (a night's changed users), content-addressed
    objects/state/<sha256>.parquet        per-shard fact state (a base, or a state layer), content-addressed
    objects/tombstones/<sha256>.parquet   per-shard delete and forget tombstones (a base, or a state layer's)
    stats/<table>/<sha256>.parquet        stats parts named by manifests, for DuckDB (pipeline.stats)
    models/<fingerprint>/...              checkpoints serving nodes load (versions.models)
    audit/<UTC timestamp>-<random>.json   one record per event (publish, rollback, forget, gc)
    partial/<sha256>/...                  compiled chunks of a night not yet published

Object keys never contain user ids: a user is found through its shard, ``xxh64(user_id) mod
num_shards``, and recorded as forgotten by the sha256 of its id.
"""

from __future__ import annotations

import hashlib
import operator
import re

import xxhash

from schemas.manifest import bundle_key, layer_key, manifest_key, state_key

__all__ = ["CURRENT_KEY", "PARTIAL_PREFIX", "AUDIT_PREFIX", "MANIFEST_PREFIX", "OBJECT_PREFIXES", "MODEL_PREFIX",
           "bundle_key", "layer_key", "manifest_key", "state_key", "manifest_version", "shard_hash", "shard_of", "forgotten_id",
           "is_collectable"]

CURRENT_KEY = "CURRENT"
PARTIAL_PREFIX = "partial/"  # compiled chunks of an unfinished night (pipeline.compile.ChunkCheckpoints)
AUDIT_PREFIX = "audit/"
MANIFEST_PREFIX = "manifests/"
OBJECT_PREFIXES = ("objects/bundles/", "objects/layers/", "objects/state/", "objects/tombstones/", "objects/scopes/",
                   "objects/scope_state/")
MODEL_PREFIX = "models"
_MANIFEST_NAME = re.compile(r"^manifests/v(\d{8})\.json$")
_COLLECTABLE = re.compile(
    "^(?:(?:" + "|".join(re.escape(p) for p in OBJECT_PREFIXES) + r")[0-9a-f]{64}\.parquet"  # content-addressed objects
    r"|stats/[^/]+/[0-9a-f]{64}\.parquet"  # stats parts (schemas.manifest.stats_part_key)
    r"|stats/[^/]+/version=\d+/.+\.parquet)$"  # stats parts of a schema-version-1 store (hive folders)
)


def manifest_version(key: str) -> int | None:
    """The version number of a manifest key (``manifests/v00000003.json`` -> 3), else None."""
    match = _MANIFEST_NAME.match(key)
    return int(match.group(1)) if match else None


def is_collectable(key: str) -> bool:
    """Whether ``key`` under ``objects/`` or ``stats/`` has a name the store itself writes (a
    content-addressed object or stats part, or a version-1 stats part), so that gc or forget may
    delete it once nothing references it. Any other key there (a file an operator or a tool put
    in the bucket) is not the store's: it is never deleted."""
    return _COLLECTABLE.match(key) is not None


def shard_hash(user_id: str) -> int:
    """xxh64 of the user_id (UTF-8): a user's shard is this mod num_shards, for any num_shards."""
    return xxhash.xxh64_intdigest(user_id.encode("utf-8"))


def shard_of(user_id: str, num_shards: int) -> int:
    return shard_hash(user_id) % num_shards


def forgotten_id(user_id: str) -> str:
    """How a forgotten user is recorded in manifests and audit records (never the raw id)."""
    return hashlib.sha256(user_id.encode("utf-8")).hexdigest()


def check_shard_list(shards, what: str = "shards") -> tuple[int, ...] | None:
    """``shards`` as a sorted tuple of shard numbers, None for every shard; ValueError for an empty
    list (a caller's list filtered down to nothing selected no shard: it is not 'all', and not a
    node serving nothing) or an item that is not a non-negative integer. Any integer type is one
    (``numpy.int64`` from an array, through ``operator.index``), returned as a plain int; a bool,
    a float (``1.0``) or a string (``"1"``) is not. ``shards`` is iterated once (a generator is fine)."""
    if shards is None:
        return None
    picked = tuple(shards)
    if not picked:
        raise ValueError(f"{what}: an empty list names no shard; give the shards, or None for every shard")
    numbers = []
    for s in picked:
        try:
            number = None if isinstance(s, bool) else operator.index(s)  # numpy.bool_ has no __index__
        except TypeError:
            number = None
        if number is None or number < 0:
            raise ValueError(f"{what}: {s!r} is not a shard number (an integer >= 0)")
        numbers.append(number)
    return tuple(sorted(set(numbers)))
