"""Compaction by hand: write shards' layer chains as new bases, published as a new version.

The nightly compacts a shard by itself when its chain passes the job spec's limits
(``compact_after_layers``, ``compact_layer_share``); :func:`compact` does it when an operator asks
(``engram compact --store URI [--shards ...]``), for instance before adding serving nodes, whose
first pull then downloads one base per shard and no layers. Each chosen shard that has layers gets
new bases (deltas, fact state, stats; pipeline.shards.compact_shard) holding exactly its merged view,
so no user is served anything else; the version is published through versions.publish (objects
written and verified, then the one compare-and-swap of CURRENT), with the previous version's
watermark and forgets. A shard without layers is carried as it is; if no chosen shard has layers,
nothing is published.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Callable, Sequence

import pyarrow as pa

from pipeline.shards import NightContext, compact_shard
from pipeline.stats import encode_stats_part, shards_table
from versions.catalog import read_current
from versions.errors import UnknownVersion
from versions.layout import check_shard_list
from versions.publish import publish_entries
from versions.store import ObjectStore


@dataclass(frozen=True)
class CompactReport:
    version: int | None  # CURRENT after the command
    published: bool
    compacted_shards: list[int] = field(default_factory=list)  # shards whose delta layers got a new base
    layers_merged: int = 0  # delta layers folded into the new bases
    # shards that had fact-state layers only: their state got a new base, their deltas did not (the
    # ``shards`` view shows them not compacted), so they are not among compacted_shards
    state_only_shards: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def compact(store: ObjectStore, shards: Sequence[int] | None = None, *, job_id: str | None = None,
            crash_hook: Callable[[str], None] | None = None) -> CompactReport:
    """Compact ``shards`` (default: every shard with layers) of CURRENT into a new version.

    Raises UnknownVersion when nothing is published, ValueError for a shard the store does not
    have, PublishConflict when CURRENT moved meanwhile (run it again)."""
    start = time.perf_counter()
    # once (a generator is consumed): an empty list is no selection, refused before any request
    picked = check_shard_list(shards, "compact shards")
    store.check_conditional_writes()
    current = read_current(store)
    if current is None:
        raise UnknownVersion(f"{store.uri}: nothing is published yet; nothing to compact")
    previous = current[0]
    chosen = range(previous.num_shards) if shards is None else list(picked)
    beyond = [s for s in chosen if not 0 <= s < previous.num_shards]
    if beyond:
        raise ValueError(f"compact: {store.uri} v{previous.version} has shards 0-{previous.num_shards - 1}, "
                         f"not {beyond}")
    ctx = NightContext(store_uri=store.uri, num_shards=previous.num_shards, recompile=False,
                       prior_version=previous.version, prior_schema=previous.schema_version,
                       prior_num_shards=previous.num_shards, fingerprint=previous.fingerprint)
    with_layers = [s for s in chosen if previous.shard(s).layers or previous.shard(s).state_layers]
    if not with_layers:
        return CompactReport(previous.version, False, seconds=round(time.perf_counter() - start, 3))
    entries = {s: compact_shard(ctx, s, previous.shard(s), previous.scopes) for s in with_layers}
    seconds = round(time.perf_counter() - start, 3)
    job_id = job_id or f"compact-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"
    objects, stats = _version_stats(previous, entries, seconds)
    manifest = publish_entries(
        store, entries=entries, objects=objects, previous=previous, fingerprint=previous.fingerprint,
        num_shards=previous.num_shards, job_id=job_id, watermark=previous.watermark, stats=stats,
        counts={"compacted_shards": len(entries)}, crash_hook=crash_hook)
    compacted = sorted(s for s in entries if entries[s].compactions > previous.shard(s).compactions)
    return CompactReport(manifest.version, manifest.version != previous.version, compacted_shards=compacted,
                         layers_merged=sum(len(previous.shard(s).layers) for s in entries),
                         seconds=round(time.perf_counter() - start, 3),
                         state_only_shards=sorted(set(entries) - set(compacted)))


def _version_stats(previous, entries: dict, seconds: float) -> tuple[dict[str, bytes], dict[str, list[str]]]:
    """The compaction version's own stats parts: its run and its shards (no rejects: no log was read)."""
    shards = [entries.get(s) or previous.shard(s) for s in range(previous.num_shards)]
    runs = pa.table({"stage": ["compact"], "seconds": [float(seconds)],
                     "started_at": pa.array([datetime.now(timezone.utc)], pa.timestamp("us", tz="UTC")),
                     "items": [len(entries)]})
    objects, stats = {}, {}
    for name, table in (("runs", runs), ("shards", shards_table(shards, previous))):
        key, data = encode_stats_part(name, table)
        objects[key] = data
        stats[name] = [key]
    return objects, stats
