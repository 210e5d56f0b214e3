"""Arrow schemas of the stats tables (parts named by manifests; see pipeline.stats).

The ``version`` column is not stored in the files: it comes from the manifest that names the part
when the tables are queried, so a part can never claim another version. A part written before a
column was added reads it as null.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.facts import REJECTS_SCHEMA

STATS_SCHEMA_VERSION = 1

FACTS_STATS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("fact_id", pa.string()),
        pa.field("status", pa.string()),  # "ok" or the failure reason
        pa.field("loss", pa.float64()),
        pa.field("steps", pa.int64()),
        pa.field("rows", pa.int64()),
        # the shared scope a member's copy of a scope fact compiled in, once (null: compiled in
        # the user's own delta); parts written before scopes read as null
        pa.field("scope", pa.string()),
        # the compiler's word on the fact (engram_core.options.FactResult.detail: why it failed, a
        # low margin, "... not after a conversation's opening (its context copy) ...", the scope it
        # compiled once in; "" when there is nothing to say); parts written before it read as null
        pa.field("detail", pa.string()),
    ]
)
USERS_STATS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("shard", pa.int64()),
        pa.field("facts", pa.int64()),
        pa.field("facts_ok", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("bytes", pa.int64()),
    ]
)
SHARDS_STATS_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.int64()),
        pa.field("users", pa.int64()),
        pa.field("facts", pa.int64()),
        pa.field("rows", pa.int64()),
        pa.field("bytes", pa.int64()),  # the shard's deltas: base bundle and layers (what a serving node holds)
        pa.field("bundle_key", pa.string()),  # the base bundle
        pa.field("base_bytes", pa.int64()),
        pa.field("layers", pa.int64()),  # delta layers over the base
        pa.field("layer_bytes", pa.list_(pa.int64())),  # bytes of each layer, oldest first
        pa.field("layer_users", pa.list_(pa.int64())),  # deltas each layer holds
        pa.field("tombstones", pa.int64()),  # users the layers remove, summed over the layers
        pa.field("state_layers", pa.int64()),  # fact-state layers over the base state
        pa.field("compactions", pa.int64()),  # bases written to replace a chain, up to this version
        pa.field("compacted", pa.bool_()),  # this version wrote the shard a new base by compaction
    ]
)
COLLISIONS_STATS_SCHEMA = pa.schema(
    [
        pa.field("layer", pa.int64()),
        pa.field("row_id", pa.int64()),
        pa.field("owners", pa.int64()),
        pa.field("owner_kind", pa.string()),  # e.g. "users", "user+scope"
        pa.field("example_owners", pa.list_(pa.string())),
    ]
)
RUNS_STATS_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string()),
        pa.field("seconds", pa.float64()),
        pa.field("started_at", pa.timestamp("us", tz="UTC")),
        pa.field("items", pa.int64()),
    ]
)

CHECKS_STATS_SCHEMA = pa.schema(
    [
        pa.field("chunk", pa.int64()),  # compile chunk of the night
        pa.field("users_checked", pa.int64()),
        pa.field("locality_positions", pa.int64()),  # probe positions bit-identical to the base model
        pa.field("isolation_positions", pa.int64()),  # other users' positions bit-identical with this delta beside
        pa.field("ok", pa.bool_()),
        pa.field("problems", pa.string()),
    ]
)

STATS_SCHEMAS: dict[str, pa.Schema] = {
    "facts": FACTS_STATS_SCHEMA,
    "users": USERS_STATS_SCHEMA,
    "shards": SHARDS_STATS_SCHEMA,
    "collisions": COLLISIONS_STATS_SCHEMA,
    "rejects": REJECTS_SCHEMA,
    "runs": RUNS_STATS_SCHEMA,
    "checks": CHECKS_STATS_SCHEMA,
}

VERSION_FIELD = pa.field("version", pa.int64())


def queried_schema(table: str) -> pa.Schema:
    """The schema a stats table has when queried: its columns plus ``version``."""
    return STATS_SCHEMAS[table].append(VERSION_FIELD)
