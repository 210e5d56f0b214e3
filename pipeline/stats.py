"""Stats: per-version Parquet tables in a hive layout, queried with DuckDB.

Layout under a store root: ``stats/<table>/version=<N>/part-0.parquet``. DuckDB reads local
stores directly with ``read_parquet(..., hive_partitioning=true)``; for an S3 store the files
are opened through the store's pyarrow filesystem as a pyarrow dataset and registered with
DuckDB (no DuckDB extension is downloaded at run time: these machines reach no internet).
"""

from __future__ import annotations

import datetime
import decimal
import io
import json
import logging

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.facts import SchemaMismatch, conform
from schemas.stats import STATS_SCHEMAS, queried_schema

logger = logging.getLogger(__name__)

STATS_PREFIX = "stats"


class StatsQueryError(RuntimeError):
    """A stats query failed; the message holds DuckDB's own."""


def stats_prefix(table: str, version: int) -> str:
    return f"{STATS_PREFIX}/{table}/version={version}/"


def write_stats(store, version: int, tables: dict[str, pa.Table]) -> dict[str, str]:
    """Write each stats table for ``version``; returns table name -> key prefix.

    Tables are conformed to their schema first (a ``version`` column, if any, is dropped: the
    partition holds it). Rewriting a version's table replaces it, so a rerun is idempotent.
    """
    if version < 0:
        raise ValueError(f"stats version must be >= 0, got {version}")
    unknown = sorted(set(tables) - set(STATS_SCHEMAS))
    if unknown:
        raise ValueError(f"unknown stats tables {unknown}; known: {sorted(STATS_SCHEMAS)}")
    prefixes = {}
    for name, table in sorted(tables.items()):
        try:
            rows = conform(table, STATS_SCHEMAS[name], f"stats table {name!r}")
        except SchemaMismatch as err:
            raise ValueError(str(err)) from err
        buffer = io.BytesIO()
        pq.write_table(rows, buffer, compression="zstd")
        prefix = stats_prefix(name, version)
        store.put(prefix + "part-0.parquet", buffer.getvalue())
        prefixes[name] = prefix
        logger.info("stats: wrote %s (%d rows) to %s", name, rows.num_rows, prefix)
    return prefixes


def query_stats(store, sql: str) -> pa.Table:
    """Run ``sql`` over views facts, users, shards, collisions, rejects, runs of every version."""
    import duckdb  # only the query side needs DuckDB (compile workers and the GPU job do not)

    connection = duckdb.connect(":memory:")
    try:
        filesystem, base_path = store.arrow_filesystem()
        for table in STATS_SCHEMAS:
            _create_view(connection, store, filesystem, base_path.rstrip("/"), table)
        try:
            relation = connection.sql(sql)
            if relation is None:  # a statement with no result rows
                return pa.table({})
            # duckdb 2 names it to_arrow_table; 1.x names it arrow.
            fetch = getattr(relation, "to_arrow_table", None) or relation.arrow
            return fetch()
        except duckdb.Error as err:
            raise StatsQueryError(f"stats query failed on {store.uri}: {err}\n  query: {sql}") from err
    finally:
        connection.close()


def _create_view(connection, store, filesystem: pafs.FileSystem, base_path: str, table: str) -> None:
    keys = [key for key in store.list(f"{STATS_PREFIX}/{table}/") if key.endswith(".parquet")]
    schema = queried_schema(table)
    if not keys:
        connection.register(table, schema.empty_table())
    elif isinstance(filesystem, pafs.LocalFileSystem):
        # The store's own listing rather than a glob: a reader sees exactly the objects the
        # store reports, never a file half-way through being written.
        files = ", ".join("'" + f"{base_path}/{key}".replace("'", "''") + "'" for key in keys)
        connection.execute(
            f"CREATE VIEW {table} AS SELECT * FROM read_parquet([{files}], "
            "hive_partitioning=true, union_by_name=true)"
        )
    else:
        partitioning = ds.partitioning(pa.schema([schema.field("version")]), flavor="hive")
        dataset = ds.dataset(
            [f"{base_path}/{key}" for key in keys],
            schema=schema,
            format="parquet",
            filesystem=filesystem,
            partitioning=partitioning,
            partition_base_dir=f"{base_path}/{STATS_PREFIX}/{table}",
        )
        connection.register(table, dataset)


def format_table(table: pa.Table, *, max_width: int = 60) -> str:
    """A plain aligned text table (numbers right-aligned), for the CLI."""
    names = table.column_names
    cells = [[_cell(value, max_width) for value in row.values()] for row in table.to_pylist()]
    numeric = [pa.types.is_integer(f.type) or pa.types.is_floating(f.type) for f in table.schema]
    widths = [max([len(name)] + [len(row[i]) for row in cells]) for i, name in enumerate(names)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    lines = [line(names), "  ".join("-" * w for w in widths)] + [line(row) for row in cells]
    lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
    return "\n".join(lines)


def _cell(value, max_width: int) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (datetime.datetime, datetime.date)):
        text = value.isoformat()
    else:
        text = str(value)
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= max_width else text[: max_width - 1] + "…"


def rows_as_json(table: pa.Table) -> str:
    """The rows as a JSON array of objects (timestamps ISO-8601, decimals as strings)."""
    return json.dumps(table.to_pylist(), default=_json_value, ensure_ascii=False)


def _json_value(value):
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, datetime.timedelta)):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
