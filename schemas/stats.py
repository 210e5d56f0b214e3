"""Arrow schemas of the per-version stats tables (``stats/<table>/version=<N>/part-0.parquet``).

The ``version`` column is not stored in the files: it comes from the hive partition when the
tables are queried, so a table written for version N can never claim another version.
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
        pa.field("bytes", pa.int64()),
        pa.field("bundle_key", pa.string()),
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
