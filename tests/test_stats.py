"""Stats: per-version Parquet parts named by manifests, queried with DuckDB."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.stats import (
    StatsQueryError,
    format_table,
    query_stats,
    rows_as_json,
    write_stats_part,
)
from schemas.bundle import bundle_table, encode_bundle
from schemas.facts import empty_fact_state, encode_fact_state
from schemas.stats import STATS_SCHEMAS, queried_schema
from versions.catalog import read_manifest
from versions.publish import ShardPayload, publish_version
from tests.harness import rewrite_as_schema_1
from versions.store import LocalStore


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


def publish_stats(store, previous, **tables: pa.Table):
    """Publish a version (one empty shard) whose manifest names one part per given stats table."""
    payload = ShardPayload(encode_bundle(bundle_table({})), encode_fact_state(empty_fact_state()))
    return publish_version(store, shard_payloads={0: payload}, previous=previous, fingerprint="fp", num_shards=1,
                           job_id="test", watermark=f"w{previous.version + 1 if previous else 1}",
                           stats={name: [write_stats_part(store, name, table)] for name, table in tables.items()})


def test_a_part_is_content_addressed_the_same_rows_give_the_same_key(local_store):
    first = write_stats_part(local_store, "facts", facts(("a", "f", "ok", 0.1)))
    again = write_stats_part(local_store, "facts", facts(("a", "f", "ok", 0.1)))
    other = write_stats_part(local_store, "facts", facts(("a", "f", "ok", 0.2)))
    assert first == again != other and first.startswith("stats/facts/") and first.endswith(".parquet")
    assert local_store.list("stats/") == sorted([first, other])


def test_queries_see_every_published_version_with_its_version_column(any_store):
    v1 = publish_stats(any_store, None, facts=facts(("a", "f", "ok", 0.1), ("b", "g", "NOT_RECALLED", 2.0)))
    publish_stats(any_store, v1, facts=facts(("a", "f", "ok", 0.05)))
    result = query_stats(any_store, "SELECT version, count(*) AS n FROM facts GROUP BY version ORDER BY version")
    assert result.to_pylist() == [{"version": 1, "n": 2}, {"version": 2, "n": 1}]


def test_a_part_named_by_two_versions_is_counted_in_each(local_store):
    rows = facts(("a", "f", "ok", 0.1))
    v1 = publish_stats(local_store, None, facts=rows)
    v2 = publish_stats(local_store, v1, facts=rows)
    assert v1.stats_parts("facts") == v2.stats_parts("facts")  # carried by reference, written once
    result = query_stats(local_store, "SELECT version, user_id FROM facts ORDER BY version")
    assert result.to_pylist() == [{"version": 1, "user_id": "a"}, {"version": 2, "user_id": "a"}]


def test_stats_of_a_version_that_was_never_made_current_stay_invisible(local_store):
    v1 = publish_stats(local_store, None, facts=facts(("a", "f", "ok", 0.1)))

    def crash(step):
        if step == "swap_current":
            raise RuntimeError("the job died")

    with pytest.raises(RuntimeError):
        payload = ShardPayload(encode_bundle(bundle_table({})), encode_fact_state(empty_fact_state()))
        publish_version(local_store, shard_payloads={0: payload}, previous=v1, fingerprint="fp", num_shards=1,
                        job_id="crashed", watermark="w2",
                        stats={"facts": [write_stats_part(local_store, "facts", facts(("zz", "f", "ok", 1.0)))]},
                        crash_hook=crash)
    assert query_stats(local_store, "SELECT user_id FROM facts").column("user_id").to_pylist() == ["a"]


def test_the_version_column_never_comes_from_folder_names_above_the_store(tmp_path):
    store = LocalStore(tmp_path / "version=7" / "day=2026-11-20" / "store")
    publish_stats(store, None, facts=facts(("a", "f", "ok", 0.1)))
    result = query_stats(store, "SELECT * FROM facts")
    assert result.column_names == queried_schema("facts").names
    assert result.column("version").to_pylist() == [1]


def test_a_version_1_store_with_stats_in_hive_folders_is_still_read(local_store):
    v1 = publish_stats(local_store, None)
    rewrite_as_schema_1(local_store, v1)
    buffer = pa.BufferOutputStream()
    pq.write_table(facts(("old", "f", "ok", 0.3)), buffer)
    local_store.put("stats/facts/version=1/part-0.parquet", buffer.getvalue().to_pybytes())
    assert read_manifest(local_store, 1).schema_version == 1
    assert query_stats(local_store, "SELECT version, user_id FROM facts").to_pylist() == [{"version": 1, "user_id": "old"}]


def test_every_view_exists_with_its_columns_before_any_file_is_written(any_store):
    for table in STATS_SCHEMAS:
        result = query_stats(any_store, f"SELECT * FROM {table}")
        assert result.num_rows == 0
        assert result.column_names == queried_schema(table).names


def test_nested_and_timestamp_columns_round_trip(local_store):
    collisions = pa.table({"layer": [2], "row_id": [17], "owners": [2], "owner_kind": ["users"], "example_owners": [["a", "b"]]})
    started = datetime(2026, 11, 21, 2, 0, tzinfo=timezone.utc)
    runs = pa.table({"stage": ["ingest"], "seconds": [1.5], "started_at": pa.array([started], pa.timestamp("us", "UTC")), "items": [9]})
    publish_stats(local_store, None, collisions=collisions, runs=runs)
    assert query_stats(local_store, "SELECT example_owners FROM collisions").to_pylist() == [{"example_owners": ["a", "b"]}]
    started_at = query_stats(local_store, "SELECT started_at FROM runs").column(0)[0].as_py()
    assert started_at == started


def test_an_unknown_table_name_is_refused(local_store):
    with pytest.raises(ValueError, match="unknown stats tables \\['fact'\\]"):
        write_stats_part(local_store, "fact", facts())


def test_a_table_missing_a_column_is_refused_naming_it(local_store):
    with pytest.raises(ValueError, match="missing column 'loss'"):
        write_stats_part(local_store, "facts", facts(("a", "f", "ok", 0.1)).drop_columns(["loss"]))


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


@pytest.mark.parametrize("sql", ["COPY (SELECT * FROM facts) TO '{out}'", "SELECT * FROM read_text('{secret}')",
                                 "SET enable_external_access = true"])
def test_a_stats_query_reads_the_stats_views_and_no_file(any_store, tmp_path, sql):
    """`engram stats` may sit behind a dashboard: its SQL sees the views, never the machine's
    files (no COPY ... TO, no read_text, and the setting cannot be turned back on)."""
    publish_stats(any_store, None, facts=facts(("a", "f", "ok", 0.1)))
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    with pytest.raises(StatsQueryError):
        query_stats(any_store, sql.format(out=tmp_path / "out.csv", secret=secret))
    assert not (tmp_path / "out.csv").exists()
    assert query_stats(any_store, "SELECT count(*) AS n FROM facts").to_pylist() == [{"n": 1}]


def test_rows_as_json_writes_nan_and_infinities_as_null():
    table = pa.table({"x": [float("nan"), float("inf"), 1.5]})
    assert json.loads(rows_as_json(table)) == [{"x": None}, {"x": None}, {"x": 1.5}]


def test_a_query_naming_two_columns_alike_prints_and_writes_json_with_every_column(any_store):
    publish_stats(any_store, None, facts=facts(("a", "f", "ok", 0.1)))
    result = query_stats(any_store, "SELECT 1 AS a, 2 AS a, 3 AS a_2")
    lines = format_table(result).splitlines()
    assert lines[0].split() == ["a", "a", "a_2"] and lines[2].split() == ["1", "2", "3"]
    assert json.loads(rows_as_json(result)) == [{"a": 1, "a_2": 2, "a_2_2": 3}]


def test_rows_as_json_writes_nan_inside_lists_and_structs_as_null():
    table = pa.table({"s": [{"x": float("nan"), "y": [1.0, float("-inf")]}]})
    assert json.loads(rows_as_json(table)) == [{"s": {"x": None, "y": [1.0, None]}}]


def test_stats_refuse_a_damaged_current_manifest_naming_it_rather_than_answer_without_it(local_store):
    from versions.catalog import read_current
    from schemas.manifest import ManifestError
    from versions.errors import PublishError

    publish_stats(local_store, None, facts=facts(("a", "f", "ok", 0.1)))
    manifest, _ = read_current(local_store)
    (local_store.root / manifest.key).write_bytes(local_store.get(manifest.key)[:100])  # truncated at rest
    with pytest.raises((ManifestError, PublishError), match=manifest.key.split("/")[-1]):
        query_stats(local_store, "SELECT count(*) AS n FROM facts")


def test_a_missing_stats_part_is_a_damaged_store_naming_the_part_not_a_bad_query(any_store):
    """A part the manifest names was deleted behind the tool's back (on S3 too): the store is
    damaged, not the SQL: IntegrityError naming the part and its version (exit 1 on the CLI),
    not DuckDB's raw IOError as a query error (exit 2)."""
    import json as json_module

    from typer.testing import CliRunner

    from jobs.cli import app
    from versions.errors import IntegrityError

    v1 = publish_stats(any_store, None, facts=facts(("a", "f", "ok", 0.1)))
    key = v1.stats["facts"][0]
    any_store.delete(key)
    with pytest.raises(IntegrityError, match=rf"{key}: missing \(the manifest of v1 references it as a stats part\)"):
        query_stats(any_store, "SELECT count(*) AS n FROM facts")
    result = CliRunner().invoke(app, ["stats", "--store", any_store.uri, "--json", "select count(*) from facts"])
    assert result.exit_code == 1
    assert json_module.loads(result.stdout.strip().splitlines()[-1])["queried"] is False


def _cli_stats(store, *args: str):
    from typer.testing import CliRunner

    from jobs.cli import app

    return CliRunner().invoke(app, ["stats", "--store", store.uri, *args])


@pytest.mark.parametrize("damage", ["another_parts_bytes", "truncated"])
def test_a_stats_part_whose_bytes_are_not_the_ones_its_key_names_is_refused_naming_it_the_version_and_the_fix(
        any_store, damage):
    """A bad restore or sync put another valid part's bytes under a part's key, or cut it short: the
    query is refused (IntegrityError, exit 1) naming the key, its version and the fix, never
    answered from the other bytes (exit 0, wrong numbers) nor taken for a bad query (exit 2)."""
    from versions.errors import IntegrityError

    v1 = publish_stats(any_store, None, facts=facts(("a", "f", "ok", 0.1)))
    v2 = publish_stats(any_store, v1, facts=facts(("b", "g", "ok", 0.2), ("c", "h", "ok", 0.3)))
    key = v2.stats["facts"][0]
    good = any_store.get(key)
    any_store.put(key, any_store.get(v1.stats["facts"][0]) if damage == "another_parts_bytes" else good[:100])
    sha256 = key.rsplit("/", 1)[1].removesuffix(".parquet")
    with pytest.raises(IntegrityError) as info:
        query_stats(any_store, "SELECT version, count(*) AS n FROM facts GROUP BY 1")
    message = str(info.value)
    assert message.startswith(f"{any_store.uri}/{key}: sha256 ") and f"does not match the manifest's {sha256}" in message
    assert "the manifest of v2 references it as a stats part" in message
    assert f"engram rollback --store {any_store.uri} --to 1" in message  # v1 does not name it
    result = _cli_stats(any_store, "--json", "select count(*) n from facts")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout) == {"queried": False, "error": json.loads(result.stdout)["error"], "exit_code": 1}
    assert key in result.stderr and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    any_store.put(key, good)  # the part's own bytes back: answered again
    assert query_stats(any_store, "SELECT count(*) AS n FROM facts WHERE version = 2").to_pylist() == [{"n": 2}]


@pytest.mark.parametrize("column, values", [("loss", pa.array(["x"])), ("steps", pa.array([[1]]))])
def test_a_part_another_tool_wrote_with_other_column_types_is_refused_naming_it_not_the_query(local_store, column,
                                                                                              values):
    """A part whose bytes are its key's (content-addressed) but whose column does not convert to
    the view's type (written by another tool or release): DuckDB failed mid-query naming its own
    stream (`_facts_v1_0`) and the CLI said "fix the query" with exit 2. Now: the part, the column,
    the version that names it, exit 1."""
    import hashlib
    import io

    table = facts(("a", "f", "ok", 0.1))
    table = table.set_column(table.schema.get_field_index(column), column, values)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    key = f"stats/facts/{hashlib.sha256(buffer.getvalue()).hexdigest()}.parquet"
    local_store.put(key, buffer.getvalue())
    payload = ShardPayload(encode_bundle(bundle_table({})), encode_fact_state(empty_fact_state()))
    publish_version(local_store, shard_payloads={0: payload}, previous=None, fingerprint="fp", num_shards=1,
                    job_id="test", watermark="w1", stats={"facts": [key]})
    result = _cli_stats(local_store, "select * from facts")
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f"{key}: column {column!r} is " in result.output and "the facts view's is" in result.output
    assert "(the manifest of v1 references it as a stats part)" in result.output and "fix the query" not in result.output


def test_a_damaged_part_named_by_every_version_says_to_restore_it(local_store):
    rows = facts(("a", "f", "ok", 0.1))
    v1 = publish_stats(local_store, None, facts=rows)
    publish_stats(local_store, v1, facts=rows)  # the same part, carried by reference
    key = v1.stats["facts"][0]
    (local_store.root / key).write_bytes(local_store.get(key)[:-1])
    from versions.errors import IntegrityError

    with pytest.raises(IntegrityError, match=r"references it as a stats part, as do those of v2\); the query cannot be "
                                        r"answered\. Put the part's own bytes back") as info:
        query_stats(local_store, "SELECT * FROM facts")
    assert "rollback" not in str(info.value)  # no version without it to roll back to


def test_each_stats_part_is_read_and_checked_once_per_query(tmp_path, monkeypatch):
    """Verification costs one read of each part a query uses, through the store, however many
    versions name it (not a read to check it and another by DuckDB)."""
    log = tmp_path / "access.log"
    monkeypatch.setenv("ENGRAM_STORE_ACCESS_LOG", str(log))
    store = LocalStore(tmp_path / "store")
    rows = facts(("a", "f", "ok", 0.1))
    v1 = publish_stats(store, None, facts=rows)
    v2 = publish_stats(store, v1, facts=rows)  # the same facts part, carried by reference
    log.write_text("")
    query_stats(store, "SELECT version, count(*) AS n FROM facts GROUP BY 1")
    gets = sorted(key for op, _, key in (line.split() for line in log.read_text().splitlines())
                  if op == "get" and key.startswith("stats/"))
    expected = sorted({k for m in (v1, v2) for table in STATS_SCHEMAS for k in m.stats_parts(table)})
    assert v1.stats["facts"] == v2.stats["facts"] and gets == expected


def test_a_damaged_layer_the_views_read_is_refused_naming_it_not_a_bad_query(local_store, tiny):
    """The facts and users views read each layer object's user_id column (to hide the rows it
    replaces): a layer missing or of another size than its manifest records is a damaged store
    (exit 1) naming it, before the query runs, not a query error (exit 2)."""
    import numpy as np

    from tests.harness import publish_night, random_delta
    from versions.errors import IntegrityError

    rng = np.random.default_rng(0)
    users = [f"user-{i}" for i in range(6)]
    publish_night(local_store, tiny.fingerprint, {u: random_delta(tiny, rng) for u in users}, compact_layer_share=1e3)
    v2 = publish_night(local_store, tiny.fingerprint, {users[0]: random_delta(tiny, rng)}, compact_layer_share=1e3)
    (entry, layer), = [(e, layer) for e in v2.shards for layer in e.layers]
    good = local_store.get(layer.key)
    for damaged in (good[:100], None):
        if damaged is None:
            local_store.delete(layer.key)
        else:
            local_store.put(layer.key, damaged)
        with pytest.raises(IntegrityError, match=rf"{layer.key}: (100 bytes, manifest says {layer.bytes}|missing) "
                                                 rf"\(the manifest of v2 references it as a layer of shard {entry.shard}"):
            query_stats(local_store, "SELECT count(*) FROM facts")
        result = _cli_stats(local_store, "select count(*) from facts")
        assert result.exit_code == 1 and layer.key in result.stderr, result.output
    local_store.put(layer.key, good)
    assert query_stats(local_store, "SELECT count(*) AS n FROM users WHERE version = 2").to_pylist() == [{"n": 6}]


def test_an_older_facts_part_without_a_detail_column_reads_it_as_null(local_store):
    """``facts.detail`` came after the table: a part written before it (no such column) is read
    with ``detail`` null, and a query naming it still runs."""
    import hashlib
    import io

    from schemas.manifest import stats_part_key
    from versions.commit import write_verified_objects

    sink = io.BytesIO()
    pq.write_table(facts(("a", "f", "ok", 0.1)), sink)  # the columns of a part written before `detail`
    key = stats_part_key("facts", hashlib.sha256(sink.getvalue()).hexdigest())
    write_verified_objects(local_store, {key: sink.getvalue()})
    payload = ShardPayload(encode_bundle(bundle_table({})), encode_fact_state(empty_fact_state()))
    publish_version(local_store, shard_payloads={0: payload}, previous=None, fingerprint="fp", num_shards=1,
                    job_id="test", watermark="w1", stats={"facts": [key]})
    rows = query_stats(local_store, "SELECT user_id, detail FROM facts WHERE detail IS NULL OR detail LIKE '%context copy%'")
    assert rows.to_pylist() == [{"user_id": "a", "detail": None}]


def _readme_stats_queries() -> list[str]:
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return [" ".join(q.split()) for q in re.findall(r'engram stats --store \S+ (?:--json )?"([^"]+)"', text)]


def test_the_readme_stats_queries_run_on_a_nights_store_and_find_the_facts_recalled_only_at_the_start(
        tmp_path, tiny_dir, local_store, monkeypatch):
    """A fact recalled at the start of a sequence but not in its context copy says so in its
    compiler detail; the night carries each fact's detail into the ``facts`` view, so the
    README's query lists exactly those facts. Every other README stats query runs too."""
    import dataclasses

    import engram_core.compiler as compiler
    from jobs.nightly import run_nightly
    from jobs.spec import NightlySpec
    from jobs.synthetic import fact_log_rows, write_fact_log

    compile_facts = compiler.compile_facts

    def copy_failed_for_user_1(em, facts, options=compiler.CompileOptions(), *args, **kwargs):
        """The compile, with user-00001's recalled facts reported as the compiler reports a fact
        whose context copy failed (its own words, from compiler._detail)."""
        result = compile_facts(em, facts, options, *args, **kwargs)
        return dataclasses.replace(result, facts=[
            dataclasses.replace(r, detail=compiler._detail(True, r.margin, options.min_margin, r.steps, True))
            if r.user_id == "user-00001" and r.status == "ok" else r for r in result.facts])

    monkeypatch.setattr(compiler, "compile_facts", copy_failed_for_user_1)
    rows = fact_log_rows(3, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    run_nightly(NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                            num_shards=2, workers=0))
    ok = query_stats(local_store, "SELECT user_id, fact_id FROM facts WHERE status = 'ok' ORDER BY 1, 2").to_pylist()
    assert {r["user_id"] for r in ok} == {"user-00000", "user-00001", "user-00002"}
    queries = _readme_stats_queries()
    detail_query = next(q for q in queries if "context copy" in q)
    assert detail_query == "select user_id, fact_id from facts where detail like '%context copy%'"
    found = query_stats(local_store, detail_query + " order by 1, 2").to_pylist()
    assert found == [r for r in ok if r["user_id"] == "user-00001"] and found
    assert query_stats(local_store, "SELECT DISTINCT detail FROM facts WHERE user_id <> 'user-00001' "
                                    "AND status = 'ok'").to_pylist() == [{"detail": ""}]
    assert len(queries) >= 4
    for sql in queries:
        result = _cli_stats(local_store, sql)
        assert result.exit_code == 0, (sql, result.output)


@pytest.mark.parametrize("sql", ["CREATE TEMP VIEW v AS SELECT * FROM facts",
                                 "CREATE TEMP VIEW v AS SELECT 1 AS n; CREATE TEMP TABLE t AS SELECT * FROM v"])
def test_a_statement_that_returns_no_result_set_says_so_and_json_tells_it_from_no_rows(local_store, sql):
    """A query whose last statement returns no result set (CREATE ... alone) printed "(0 rows)", as a
    SELECT that matched nothing does, and --json printed the same empty list: a dashboard read "no
    rows". Now the text says the statement returned no result set and to end with a SELECT; --json
    prints an object ({"queried": true, "result_set": false, "rows": null}), never a list."""
    publish_stats(local_store, None, facts=facts(("a", "f", "ok", 0.1)))
    text = _cli_stats(local_store, sql)
    assert text.exit_code == 0, text.output
    assert "(0 rows)" not in text.stdout and "returned no result set" in text.stdout, text.stdout
    assert "end the query with a SELECT" in text.stdout, text.stdout
    out = _cli_stats(local_store, "--json", sql)
    assert out.exit_code == 0 and json.loads(out.stdout) == {
        "queried": True, "result_set": False, "rows": None,
        "message": "the query's last statement returned no result set (it is not a SELECT); end the query with a "
                   "SELECT to get rows"}, out.stdout
    none = _cli_stats(local_store, "--json", "select * from facts where false")  # rows: none, a result set all the same
    assert none.exit_code == 0 and json.loads(none.stdout) == []
    assert "(0 rows)" in _cli_stats(local_store, "select * from facts where false").stdout
    # Statements that return rows though they are no plain SELECT (DuckDB types PIVOT as MULTI; an
    # INSERT ... RETURNING): their rows are shown.
    pivot = _cli_stats(local_store, "--json", "PIVOT (select user_id, status from facts) ON status USING count(*)")
    assert pivot.exit_code == 0 and json.loads(pivot.stdout) == [{"user_id": "a", "ok": 1}], pivot.stdout
    returning = _cli_stats(local_store, "--json", "create temp table t (x int); insert into t values (7) returning x")
    assert returning.exit_code == 0 and json.loads(returning.stdout) == [{"x": 7}], returning.stdout
