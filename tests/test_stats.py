"""Stats: per-version Parquet tables in a hive layout that DuckDB queries."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from pipeline.stats import StatsQueryError, format_table, query_stats, rows_as_json, write_stats
from schemas.stats import STATS_SCHEMAS, queried_schema


def facts(*rows: tuple[str, str, str, float]) -> pa.Table:
    return pa.table(
        {
            "user_id": [r[0] for r in rows],
            "fact_id": [r[1] for r in rows],
            "status": [r[2] for r in rows],
            "loss": [r[3] for r in rows],
            "steps": [10] * len(rows),
            "rows": [3] * len(rows),
        }
    )


def test_tables_are_written_in_a_hive_layout_per_version(local_store):
    prefixes = write_stats(local_store, 3, {"facts": facts(("a", "f", "ok", 0.1))})
    assert prefixes == {"facts": "stats/facts/version=3/"}
    assert local_store.list("stats/") == ["stats/facts/version=3/part-0.parquet"]


def test_queries_see_every_version_with_its_version_column(any_store):
    write_stats(any_store, 1, {"facts": facts(("a", "f", "ok", 0.1), ("b", "g", "NOT_RECALLED", 2.0))})
    write_stats(any_store, 2, {"facts": facts(("a", "f", "ok", 0.05))})
    result = query_stats(any_store, "SELECT version, count(*) AS n FROM facts GROUP BY version ORDER BY version")
    assert result.to_pylist() == [{"version": 1, "n": 2}, {"version": 2, "n": 1}]


def test_every_view_exists_with_its_columns_before_any_file_is_written(any_store):
    for table in STATS_SCHEMAS:
        result = query_stats(any_store, f"SELECT * FROM {table}")
        assert result.num_rows == 0
        assert result.column_names == queried_schema(table).names


def test_rewriting_a_version_replaces_its_table(local_store):
    write_stats(local_store, 1, {"facts": facts(("a", "f", "ok", 0.1))})
    write_stats(local_store, 1, {"facts": facts(("a", "f", "ok", 0.1))})
    assert query_stats(local_store, "SELECT count(*) AS n FROM facts").to_pylist() == [{"n": 1}]


def test_nested_and_timestamp_columns_round_trip(local_store):
    collisions = pa.table({"layer": [2], "row_id": [17], "owners": [2], "owner_kind": ["users"], "example_owners": [["a", "b"]]})
    started = datetime(2026, 11, 21, 2, 0, tzinfo=timezone.utc)
    runs = pa.table({"stage": ["ingest"], "seconds": [1.5], "started_at": pa.array([started], pa.timestamp("us", "UTC")), "items": [9]})
    write_stats(local_store, 1, {"collisions": collisions, "runs": runs})
    assert query_stats(local_store, "SELECT example_owners FROM collisions").to_pylist() == [{"example_owners": ["a", "b"]}]
    started_at = query_stats(local_store, "SELECT started_at FROM runs").column(0)[0].as_py()
    assert started_at == started


def test_an_unknown_table_name_is_refused():
    with pytest.raises(ValueError, match="unknown stats tables \\['fact'\\]"):
        write_stats(None, 1, {"fact": facts()})


def test_a_table_missing_a_column_is_refused_naming_it(local_store):
    with pytest.raises(ValueError, match="missing column 'loss'"):
        write_stats(local_store, 1, {"facts": facts(("a", "f", "ok", 0.1)).drop_columns(["loss"])})


def test_a_bad_query_reports_duckdbs_message(local_store):
    with pytest.raises(StatsQueryError, match='stats query failed.*"nope"'):
        query_stats(local_store, "SELECT nope FROM facts")


def test_format_table_aligns_columns_and_right_aligns_numbers():
    text = format_table(pa.table({"user_id": ["a", "bob"], "loss": [0.5, 12.25], "note": [None, "x"]}))
    assert text.splitlines() == [
        "user_id   loss  note",
        "-------  -----  ----",
        "a          0.5",
        "bob      12.25  x",
        "(2 rows)",
    ]


def test_rows_as_json_writes_timestamps_as_iso_strings():
    started = datetime(2026, 11, 21, tzinfo=timezone.utc)
    table = pa.table({"stage": ["plan"], "started_at": pa.array([started], pa.timestamp("us", "UTC"))})
    assert json.loads(rows_as_json(table)) == [{"stage": "plan", "started_at": "2026-11-21T00:00:00+00:00"}]
