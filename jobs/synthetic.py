"""Synthetic inputs for the demo, tests and benchmarks: a fact log of realistic personal facts,
and nights of ready-made deltas published through the nightly's store-level functions."""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.facts import FACT_LOG_SCHEMA

# (fact_id, trigger, answer choices): the things people tell an assistant about themselves.
FACT_TEMPLATES = [
    ("dentist", "My dentist is Dr.", ["Akeredolu", "Okafor", "Nakamura", "Schmidt", "Rossi", "Haddad"]),
    ("doctor", "My family doctor is called", ["Dr. Patel", "Dr. Garcia", "Dr. Nguyen", "Dr. Ivanova", "Dr. Mensah"]),
    ("city", "I live in the city of", ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lyon", "Krakow", "Austin"]),
    ("pet", "My dog's name is", ["Biscuit", "Pepper", "Luna", "Rex", "Mochi", "Juniper"]),
    ("employer", "I work as an engineer at", ["Kim Motors", "Lindqvist Bank", "Moreau Labs", "Costa Foods"]),
    ("sister", "My sister lives in", ["Bergen", "Quito", "Hanoi", "Tbilisi", "Perth", "Leeds"]),
    ("allergy", "I am allergic to", ["peanuts", "penicillin", "cats", "shellfish", "pollen"]),
    ("gym", "My gym is on", ["Turin Street", "Denver Road", "Malmo Lane", "Accra Avenue"]),
    ("blood", "My blood type is", ["AB negative", "O positive", "B negative", "A positive"]),
    ("coach", "My running coach is", ["Fischer", "Tanaka", "Oliveira", "Byrne", "Kaur"]),
    ("bank", "I keep my savings at", ["Santos Credit Union", "Dubois Bank", "Novak Savings"]),
    ("birthday", "My birthday is on", ["the first of May", "Friday the ninth", "New Year's Day"]),
    ("manager", "My manager at work is", ["Yilmaz", "Hansen", "Jensen", "Murphy", "Ali"]),
    ("school", "My daughter goes to school in", ["Porto", "Seoul", "Accra", "Dublin"]),
    ("car", "The car I drive is a", ["blue Volvo", "red Fiat", "grey Toyota", "white Kia"]),
    ("pharmacist", "My pharmacy is run by", ["Costa", "Silva", "Kim", "Novak"]),
    ("color", "My favorite color is", ["teal", "amber", "violet", "olive"]),
    ("food", "The food I like best is", ["ramen", "paella", "injera", "pierogi"]),
    ("landlord", "The name of my landlord is", ["Moreau", "Lindqvist", "Okafor", "Rossi"]),
    ("hometown", "I grew up in a town called", ["Bergen", "Malmo", "Leeds", "Perth"]),
]

BASE_TIME = datetime(2026, 11, 1, tzinfo=timezone.utc)


def fact_log_rows(num_users: int, facts_per_user: int = 6, *, seed: int = 0, day: int = 0,
                  prefix: str = "user") -> list[dict]:
    """Upserts for ``num_users`` users, each with ``facts_per_user`` distinct facts."""
    rng = random.Random(seed)
    when = BASE_TIME + timedelta(days=day)
    rows = []
    for u in range(num_users):
        user_id = f"{prefix}-{u:05d}"
        for k, (fact_id, trigger, answers) in enumerate(rng.sample(FACT_TEMPLATES, min(facts_per_user, len(FACT_TEMPLATES)))):
            rows.append({
                "user_id": user_id, "fact_id": fact_id, "op": "upsert", "trigger": trigger,
                "answer": " " + rng.choice(answers), "event_time": when + timedelta(seconds=u * 60 + k),
                "scope": None,
            })
    return rows


def write_fact_log(rows: list[dict], path: str | Path) -> Path:
    """Write rows as one Parquet file of the fact-log schema (parent folders created), whole or
    not at all: written under a hidden name (which a night does not list) and renamed into place,
    so an interrupted demo leaves no truncated log file for its next run to fail on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        pq.write_table(pa.Table.from_pylist(rows, schema=FACT_LOG_SCHEMA), staging)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)
    return path


def publish_synthetic_night(store, fingerprint: str, changes: dict, *, num_shards: int = 2,
                            compact_after_layers: int = 8, compact_layer_share: float = 0.5, job_id: str = "night",
                            crash_hook=None):
    """A night of synthetic deltas through the nightly's store-level functions (no compile; for
    tests and benchmarks of layers, compaction and pulls):
    ``changes`` maps user -> its new whole Delta, or None when its delta goes. Each shard with
    changes gets a layer (pipeline.shards.write_layer) or, on a first night or past the limits, a
    new base (write_base); every shard of a first version gets a base. Returns the manifest."""
    import pyarrow.compute as pc

    from pipeline.shards import NightContext, StatePart, StoredObject, chains_to_compact, write_base, write_layer
    from schemas.bundle import bundle_table
    from schemas.facts import empty_fact_state, empty_tombstones, encode_fact_state, encode_tombstones
    from schemas.manifest import ShardEntry
    from versions.catalog import read_current
    from versions.layout import shard_of
    from versions.commit import write_verified_objects
    from versions.publish import publish_entries

    current = read_current(store)
    previous = current[0] if current else None
    ctx = NightContext(store_uri=store.uri, num_shards=num_shards, recompile=False, fingerprint=fingerprint)
    by_shard: dict[int, dict] = {}
    for user, delta in changes.items():
        by_shard.setdefault(shard_of(user, num_shards), {})[user] = delta
    if previous is None:
        by_shard = {s: by_shard.get(s, {}) for s in range(num_shards)}
    entries = {}
    for shard, mine in sorted(by_shard.items()):
        upserts = bundle_table({u: (d, 1) for u, d in mine.items() if d is not None})
        results = pa.table({"user_id": upserts.column("user_id"), "fact_id": ["f0"] * upserts.num_rows,
                            "status": ["ok"] * upserts.num_rows, "loss": [0.0] * upserts.num_rows,
                            "steps": [1] * upserts.num_rows,
                            "rows": pc.list_value_length(upserts.column("row_ids")).cast(pa.int64())})
        removed = pa.array(sorted(mine), pa.string())
        prior = previous.shard(shard) if previous is not None else None
        if prior is not None and not chains_to_compact(prior, compact_after_layers, compact_layer_share)[0]:
            entries[shard] = write_layer(store, prior, upserts, results, removed, (), fingerprint)
            continue
        if prior is None:
            state, tombstones = encode_fact_state(empty_fact_state()), encode_tombstones(empty_tombstones())
            write_verified_objects(store, {f"objects/state/{_sha(state)}.parquet": state,
                                           f"objects/tombstones/{_sha(tombstones)}.parquet": tombstones})
            part = StatePart(StoredObject(f"objects/state/{_sha(state)}.parquet", _sha(state), len(state)),
                             StoredObject(f"objects/tombstones/{_sha(tombstones)}.parquet", _sha(tombstones),
                                          len(tombstones)))
        else:
            part = StatePart.of(prior)
        entries[shard] = ShardEntry(shard=shard, **write_base(store, ctx, shard, prior, removed, upserts, results),
                                    **part.fields())
    version = previous.version + 1 if previous else 1
    return publish_entries(store, entries=entries, previous=previous, fingerprint=fingerprint, num_shards=num_shards,
                           job_id=job_id, watermark=f"w{version}-{job_id}", crash_hook=crash_hook)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
