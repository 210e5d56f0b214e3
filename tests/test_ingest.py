"""Ingest: every fact log row ends in the fact state or in rejects, with a reason."""

from __future__ import annotations

import io
import logging
import random
import re
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline.ingest import (FactLogBatch, FactLogError, RowRules, ingest, list_log_files, normalise_fact_log, read_fact_log,
                             read_log_file)
from schemas import facts as F
from versions.layout import forgotten_id
from tests.fixtures.bad_inputs.corpus import (
    FILE_CASES,
    MAX_TEXT_CHARS,
    MAX_TRIGGER_TOKENS,
    NOW,
    RAW_SCHEMA,
    ROW_CASES,
    T0,
    column_of,
    good_row,
    pandas_style_parquet,
    whitespace_tokens,
    write_file_case,
)


def run(log, prior=None, **kwargs):
    options = dict(max_trigger_tokens=MAX_TRIGGER_TOKENS, count_tokens=whitespace_tokens, max_text_chars=MAX_TEXT_CHARS, now=NOW)
    return ingest(log, prior, **(options | kwargs))


def table(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist([good_row(**row) for row in rows], schema=RAW_SCHEMA)


def live_facts(state: pa.Table) -> dict:
    return {(r["user_id"], r["fact_id"]): r["answer"] for r in state.to_pylist()}


# --- The bad-input corpus -------------------------------------------------------------------


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: c.name)
def test_every_malformed_row_is_rejected_with_its_named_reason(case, tmp_path):
    path = tmp_path / "part-0.parquet"
    case.write(path)
    result = run(read_fact_log(str(path)))
    reasons = {r["row"]: r["reason"] for r in result.rejects.to_pylist()}
    assert [reasons.get(i) for i in range(len(case.rows))] == case.expected
    assert result.accepted + result.rejected == len(case.rows)
    assert all(r["detail"] and r["source"] == str(path) for r in result.rejects.to_pylist())


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c.expected], ids=lambda c: c.name)
def test_a_broken_file_stops_the_run_with_an_error_naming_it(case, tmp_path):
    path = write_file_case(case, tmp_path)
    with pytest.raises(FactLogError, match=case.name) as error:
        read_fact_log(str(tmp_path))
    assert "on_bad_file='reject'" in str(error.value)


@pytest.mark.parametrize("case", [c for c in FILE_CASES if c.expected], ids=lambda c: c.name)
def test_a_broken_file_becomes_one_reject_when_asked_and_good_files_still_load(case, tmp_path):
    path = write_file_case(case, tmp_path)
    batch = read_fact_log(str(tmp_path), on_bad_file="reject")
    result = run(batch)
    file_rejects = [r for r in result.rejects.to_pylist() if r["row"] is None]
    assert [(r["source"], r["reason"]) for r in file_rejects] == [(str(path), case.expected)]
    assert result.accepted == 2  # the good file beside it
    assert result.accepted + result.rejected == batch.input_rows == 3
    assert {f.path for f in batch.files} == {str(path), str(path.parent / "good.parquet")}


def test_a_file_refused_for_its_columns_says_which_and_how_to_fix_it(tmp_path):
    by_name = {c.name: c for c in FILE_CASES}
    for name, message in (("uppercase_column_names", "the file's columns: ['USER_ID', 'FACT_ID'"),
                          ("uppercase_column_names", "column names are case-sensitive: rename 'USER_ID' to 'user_id'"),
                          ("bom_in_first_column_name", "invisible byte-order mark (U+FEFF: a CSV with a BOM read "
                                                       "without encoding='utf-8-sig'): rename '\\ufeffuser_id' to 'user_id'"),
                          ("answer_column_twice", "column 'answer' appears 2 times; keep one")):
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        write_file_case(by_name[name], folder)
        with pytest.raises(FactLogError, match=re.escape(message)):
            read_fact_log(str(folder))


@pytest.mark.parametrize("column, other", [("event_time", "timestamp"), ("event_time", "ts"), ("answer", "value"),
                                           ("trigger", "prompt"), ("op", "operation"), ("user_id", "uid"),
                                           ("fact_id", "memory_id")])
def test_a_file_holding_a_log_column_under_another_tools_name_is_refused_naming_the_rename(column, other, tmp_path):
    """A file whose column is named as another tool names it (``timestamp``, ``ts``, ``value``,
    ``prompt``, ``operation``, ``uid``) is refused naming that column and the rename; the refusal
    named only the missing column (and, for a column only upserts need, listed the file's columns
    without the one meant)."""
    row = {"user_id": "u1", "fact_id": "pet", "op": "upsert", "trigger": "My dog is", "answer": "Rex",
           "event_time": "2026-11-01T08:00:00Z", "source_system": "app"}
    folder = tmp_path / "log"
    folder.mkdir()
    pq.write_table(pa.table({(other if name == column else name): [value] for name, value in row.items()}),
                   folder / "part-0.parquet")
    with pytest.raises(FactLogError) as raised:
        read_fact_log(str(folder))
    message = str(raised.value)
    assert f"missing required column {column!r}" in message
    assert f"the file has {other!r}: if that is the {column}" in message and f"rename it to {column!r}" in message
    assert f"{other!r}, " in message and "'source_system'" in message  # the file's own columns, extra ones too
    batch = read_fact_log(str(folder), on_bad_file="reject")
    assert [r["reason"] for r in batch.file_rejects.to_pylist()] == ["SCHEMA_MISMATCH"]
    assert f"rename it to {column!r}" in batch.file_rejects.to_pylist()[0]["detail"]


@pytest.mark.parametrize("envelope", ["payload", "after", "value", "facts"])
def test_a_file_whose_log_columns_are_nested_in_a_struct_is_refused_naming_the_struct_and_how_to_flatten_it(
        envelope, tmp_path):
    """An export of a change stream or a message queue (Kafka Connect's S3 sink, a Debezium envelope with
    ``before``/``after``/``op``/``ts_ms``, a Firehose record) nests the row in a struct column. It was
    refused as "missing required column 'user_id' (the file's columns: ['payload'])", which did not say
    that the columns are there, one level down. The refusal names the struct column (or the list of
    structs: a document per user holding its facts), the log columns it holds and how to flatten it."""
    row = {"user_id": "u1", "fact_id": "pet", "op": "upsert", "trigger": "My dog is", "answer": "Rex",
           "event_time": datetime(2026, 11, 1, 8, tzinfo=timezone.utc)}
    columns = {envelope: pa.array([row])}
    if envelope == "facts":  # a document per user holding a list of its facts (a MongoDB or Firestore export)
        columns = {"account": ["u1"], envelope: pa.array([[row, row]])}
    if envelope == "after":  # Debezium: the change's own op and time beside the row
        columns |= {"before": pa.nulls(1, pa.array([row]).type), "op": ["c"], "ts_ms": [1793520000000]}
    folder = tmp_path / "log"
    folder.mkdir()
    pq.write_table(pa.table(columns), folder / "part-0.parquet")
    with pytest.raises(FactLogError) as raised:
        read_fact_log(str(folder))
    message = str(raised.value)
    assert "missing required column 'user_id'" in message
    assert f"struct column {envelope!r} holds the log's columns" in message and "'user_id', 'fact_id'" in message
    assert (f"SELECT {envelope}.* FROM" if envelope != "facts" else f"SELECT UNNEST({envelope}, recursive := true) FROM"
            ) in message
    batch = read_fact_log(str(folder), on_bad_file="reject")
    assert [r["reason"] for r in batch.file_rejects.to_pylist()] == ["SCHEMA_MISMATCH"]
    assert f"struct column {envelope!r}" in batch.file_rejects.to_pylist()[0]["detail"]


@pytest.mark.parametrize("ids, kind, row, message", [
    (pa.array([1.0, 2.0, 1.5]), "double", 2, "user_id 1.5 (row 2) in a double column is not a whole number"),
    (pa.array([1.0, 2.0, float("inf")]), "double", 2, "user_id inf (row 2) in a double column is not a whole number"),
    (pa.array([1.0, 2.5, 3.0], pa.float32()), "float", 1, "user_id 2.5 (row 1) in a float column is not a whole number"),
    (pa.array([Decimal("1.00"), Decimal("2.50"), Decimal("3.00")], pa.decimal128(10, 2)), "decimal", 1,
     "user_id 2.50 (row 1) in a decimal128(10, 2) column is not a whole number"),
])
@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_float_or_decimal_id_with_a_fraction_costs_only_its_row_naming_it_and_the_fix(ids, kind, row, message,
                                                                                       on_bad_file, tmp_path):
    """One id with a fraction used to refuse the whole file (one bad value must cost one row)."""
    raw = table({}, {"fact_id": "b"}, {"fact_id": "c"}).set_column(0, "user_id", ids)
    pq.write_table(raw, tmp_path / "part-0.parquet")
    result = run(read_fact_log(str(tmp_path / "part-0.parquet"), on_bad_file=on_bad_file))
    assert result.accepted == 2 and result.rejected == 1
    [reject] = result.rejects.to_pylist()
    assert reject["row"] == row and reject["reason"] == "BAD_USER_ID" and reject["source"].endswith("part-0.parquet")
    assert message in reject["detail"] and "export ids as strings or integers" in reject["detail"]
    good_ids = [str(int(v)) for i, v in enumerate(ids.to_pylist()) if i != row]
    assert sorted(user for user, _ in live_facts(result.state)) == sorted(good_ids)


@pytest.mark.parametrize("ids, kind, row, message", [
    ([1.0, float("nan"), 2.0 ** 53 + 2], pa.float64(), 2,
     "user_id 9007199254740994 (row 2) is a double id of magnitude 2^53 or more, which a double cannot hold exactly"),
    ([1.0, -(2.0 ** 53), 3.0], pa.float64(), 1, "user_id -9007199254740992 (row 1) is a double id of magnitude 2^53"),
    ([1.0, 2.0, 2.0 ** 24], pa.float32(), 2, "user_id 16777216 (row 2) is a float id of magnitude 2^24 or more, which a float cannot hold"),
    ([1.0, 2.0, 4096.0], pa.float16(), 2, "user_id 4096 (row 2) is a halffloat id of magnitude 2^11 or more, which a halffloat cannot hold"),
    ([1.0, 1e300, 3.0], pa.float64(), 1, "user_id 1e+300 (row 1) is a double id of magnitude 2^53 or more, which a double cannot hold"),
    ([7.0, 8.0, 1e20], pa.float64(), 2, "user_id 100000000000000000000 (row 2) is a double id of magnitude 2^53 or more"),
])
@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_float_id_too_large_to_be_exact_costs_only_its_row_naming_it_and_the_fix(ids, kind, row, message, on_bad_file,
                                                                                   tmp_path):
    """One float id of 2^53 or more (2^24 in a float32) used to refuse the whole file: it costs its row."""
    import numpy as np
    values = pa.array(np.array(ids, np.float16), kind) if kind == pa.float16() else pa.array(ids, kind)
    raw = table({}, {"fact_id": "b"}, {"fact_id": "c"}).set_column(0, "user_id", values)
    pq.write_table(raw, tmp_path / "part-0.parquet")
    result = run(read_fact_log(str(tmp_path / "part-0.parquet"), on_bad_file=on_bad_file))
    rejects = {r["row"]: r for r in result.rejects.to_pylist()}
    assert rejects[row]["reason"] == "BAD_USER_ID" and rejects[row]["source"].endswith("part-0.parquet")
    assert message in rejects[row]["detail"] and "export ids as strings or integers" in rejects[row]["detail"]
    good = [i for i, v in enumerate(ids) if v == v and i != row]
    assert sorted(r["fact_id"] for r in result.state.to_pylist()) == sorted(["pet", "b", "c"][i] for i in good)


@pytest.mark.parametrize("kind", [pa.float16(), pa.float32(), pa.float64()], ids=str)
def test_a_float_id_column_of_whole_numbers_reads_as_integer_text_at_every_width(kind, tmp_path):
    """float16/32/64 id columns (numpy and pandas write all three) read as their integers; an
    empty file of such a column is accepted."""
    import numpy as np
    ids = [1.0, float("nan"), 2047.0]
    values = pa.array(np.array(ids, np.float16), kind) if kind == pa.float16() else pa.array(ids, kind)
    raw = table({}, {"fact_id": "b"}, {"fact_id": "c"}).set_column(0, "user_id", values)
    pq.write_table(raw, tmp_path / "part-0.parquet")
    pq.write_table(raw.slice(0, 0), tmp_path / "part-1.parquet")
    assert read_fact_log(str(tmp_path)).rows.column("user_id").to_pylist() == ["1", None, "2047"]


def test_uuid_and_whole_number_decimal_ids_read_as_their_usual_text(tmp_path):
    by_name = {c.name: c for c in FILE_CASES}
    for name, ids in (("uuid_user_id_as_duckdb_writes_it", ["00010203-0405-0607-0809-0a0b0c0d0e0f",
                                                             "10111213-1415-1617-1819-1a1b1c1d1e1f"]),
                      ("whole_number_decimal_user_id_as_snowflake_writes_it", ["1", "2"]),
                      ("whole_decimal_user_id_with_places_as_spark_reads_oracle_number", ["1", "2"]),
                      ("pandas_integer_ids_with_a_missing_value", ["7", None])):
        folder = tmp_path / name
        folder.mkdir()
        path = write_file_case(by_name[name], folder)
        assert read_fact_log(str(path)).rows.column("user_id").to_pylist() == ids


def test_text_ids_that_are_uuids_in_another_form_are_read_as_written_with_one_warning_per_file(tmp_path, caplog):
    """A UUID-typed id column reads as lowercase hyphenated text; the same UUID exported as text in
    upper case (or in braces, as .NET and SQL Server write it) is another id, read as written: one
    warning per file names the file, the column, the row and the fix. Lowercase text: no warning."""
    lower = "6f9619ff-8b86-d011-b42d-00c04fc964ff"
    uuid_typed = pa.ExtensionArray.from_storage(pa.uuid(), pa.array([bytes.fromhex(lower.replace("-", ""))], pa.binary(16)))
    forms = {"typed": uuid_typed, "upper": pa.array([lower.upper()] * 2), "braces": pa.array(["{" + lower + "}"] * 2),
             "lower": pa.array([lower] * 2)}
    for name, ids in forms.items():
        rows = len(ids)
        raw = pa.table({"user_id": ids, "fact_id": [f"{name}-{i}" for i in range(rows)], "op": ["upsert"] * rows,
                        "trigger": ["My city is"] * rows, "answer": [" Ayr"] * rows,
                        "event_time": pa.array([T0] * rows, pa.timestamp("us", tz="UTC"))})
        pq.write_table(raw, tmp_path / f"{name}.parquet")
    with caplog.at_level("WARNING"):
        result = run(read_fact_log(str(tmp_path)))
    users = {user for user, _ in live_facts(result.state)}
    assert users == {lower, lower.upper(), "{" + lower + "}"}  # read as written: three ids
    warnings = [r.getMessage() for r in caplog.records if "is a UUID in another form" in r.getMessage()]
    assert len(warnings) == 2  # once per file, for the upper-case and the braces files only
    assert any("upper.parquet" in w and repr(lower.upper()) in w and "(row 0)" in w for w in warnings)
    assert any("braces.parquet" in w and "export the ids in one form" in w for w in warnings)


@pytest.mark.parametrize("kind", ["fixed_size_binary", "dictionary"])
@pytest.mark.parametrize("column", ["user_id", "fact_id", "scope", "answer"])
def test_uuid_bytes_without_the_uuid_annotation_read_as_a_uuid_column_does(column, kind, tmp_path, caplog):
    """16 fixed bytes are how Parquet stores a UUID; parquet-avro's fixed(16) UUIDs, Python's
    ``uuid.bytes`` in ``pa.binary(16)`` and pyarrow before 18 write them without the UUID
    annotation. Every such row was rejected (the bytes read as text: control characters or not
    UTF-8); they read as the UUID-typed export of the same rows does (one user, one fact: its copy
    is a DUPLICATE), with one warning naming the file and the column."""
    values = [bytes(range(16)), bytes(range(16, 32))]
    texts = ["00010203-0405-0607-0809-0a0b0c0d0e0f", "10111213-1415-1617-1819-1a1b1c1d1e1f"]
    raw = pa.array(values, pa.binary(16))
    arrays = {"typed": pa.ExtensionArray.from_storage(pa.uuid(), raw),
              "raw": raw.dictionary_encode() if kind == "dictionary" else raw}
    for name, array in arrays.items():
        rows = table({"fact_id": "a"}, {"fact_id": "b"})
        pq.write_table(rows.set_column(rows.schema.get_field_index(column), column, array), tmp_path / f"{name}.parquet")
    assert pa.types.is_fixed_size_binary(pq.read_schema(tmp_path / "raw.parquet").field(column).type)
    with caplog.at_level("WARNING"):
        batch = read_fact_log(str(tmp_path))
    assert batch.rows.column(column).to_pylist() == texts + texts
    result = run(batch)
    assert [(Path(r["source"]).name, r["reason"]) for r in result.rejects.to_pylist()] == [("typed.parquet", "DUPLICATE")] * 2
    assert result.accepted == 2
    [warning] = [r.getMessage() for r in caplog.records if "without Parquet's UUID annotation" in r.getMessage()]
    assert "raw.parquet" in warning and repr(column) in warning and "read as UUIDs" in warning


@pytest.mark.parametrize("case", [c for c in FILE_CASES if not c.expected], ids=lambda c: c.name)
def test_schema_drift_that_loses_nothing_is_read(case, tmp_path):
    path = write_file_case(case, tmp_path)
    batch = read_fact_log(str(path))
    assert batch.rows.num_rows == case.rows
    assert batch.rows.schema == F.FACT_LOG_BATCH_SCHEMA
    result = run(batch)
    assert result.accepted + result.rejected == case.rows


# --- Values another writer produced: one bad value costs its row, never the file -----------


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_pandas_file_with_nanosecond_times_is_read_whole_truncated_to_microseconds(on_bad_file, tmp_path):
    path = tmp_path / "day=2026-11-20" / "part-00000.parquet"
    path.parent.mkdir()
    path.write_bytes(pandas_style_parquet(table({"fact_id": "a"}, {"fact_id": "b"}, {"fact_id": "c"})))
    written = pq.read_table(path).column("event_time")
    assert written.type == pa.timestamp("ns", tz="UTC")
    nanos = written.cast(pa.int64()).to_pylist()
    assert sum(ns % 1000 != 0 for ns in nanos) >= 2  # sub-microsecond digits, as pandas keeps them
    result = run(read_fact_log(str(tmp_path), on_bad_file=on_bad_file))
    assert (result.accepted, result.rejected) == (3, 0)
    assert result.state.column("event_time").cast(pa.int64()).to_pylist() == [ns // 1000 for ns in nanos]


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_latin1_bytes_in_one_answer_reject_that_row_naming_file_and_row(on_bad_file, tmp_path):
    raw = table({"fact_id": "a"}, {"fact_id": "b"}, {"fact_id": "c"})
    answers = column_of([" Rex", " Caf\xe9".encode("latin-1"), " Max"], pa.string())  # not validated by the writer
    path = tmp_path / "part-0.parquet"
    pq.write_table(raw.set_column(raw.schema.get_field_index("answer"), "answer", answers), path)
    result = run(read_fact_log(str(tmp_path), on_bad_file=on_bad_file))
    assert live_facts(result.state) == {("alice", "a"): " Rex", ("alice", "c"): " Max"}
    [reject] = result.rejects.to_pylist()
    assert (reject["source"], reject["row"], reject["reason"]) == (str(path), 1, "INVALID_UTF8")
    assert "answer is not valid UTF-8" in reject["detail"] and "Caf\\xe9" in reject["detail"]


_UTF8_REASON = {"user_id": "BAD_USER_ID", "fact_id": "BAD_FACT_ID", "scope": "BAD_SCOPE"}
_PHYSICAL_STRING_TYPES = {
    "string": pa.string(), "large_string": pa.large_string(), "string_view": pa.string_view(),
    "binary": pa.binary(), "large_binary": pa.large_binary(),
    "dictionary": pa.dictionary(pa.int32(), pa.string()), "dictionary_of_binary": pa.dictionary(pa.int16(), pa.binary()),
}


@pytest.mark.parametrize("kind", _PHYSICAL_STRING_TYPES, ids=str)
@pytest.mark.parametrize("column", ["user_id", "fact_id", "op", "trigger", "answer", "scope"])
def test_invalid_utf8_in_any_string_column_of_any_physical_type_costs_only_its_row(column, kind, tmp_path):
    raw = table({"fact_id": "a"}, {"fact_id": "b"}, {"fact_id": "c"})
    values = raw.column(column).to_pylist()
    values[1] = b"\xfe" + (values[1] or "org:acme").encode()  # scope is null in the good rows
    raw = raw.set_column(raw.schema.get_field_index(column), column, column_of(values, _PHYSICAL_STRING_TYPES[kind]))
    path = tmp_path / "part-0.parquet"
    pq.write_table(raw, path)
    assert pq.read_schema(path).field(column).type == _PHYSICAL_STRING_TYPES[kind]
    result = run(read_fact_log(str(path)))
    rejects = [(r["row"], r["reason"]) for r in result.rejects.to_pylist()]
    assert rejects == [(1, _UTF8_REASON.get(column, "INVALID_UTF8"))]
    assert result.accepted == 2


_EVENT_TIME_WRITERS = {  # how each writer stores a time of 1850 (ranges where the unit can hold one)
    "timestamp_s": (pa.timestamp("s", tz="UTC"), {}),
    "timestamp_ms_naive": (pa.timestamp("ms"), {}),
    "timestamp_us": (pa.timestamp("us", tz="UTC"), {}),
    "timestamp_ns": (pa.timestamp("ns", tz="UTC"), {}),
    "timestamp_ns_other_zone": (pa.timestamp("ns", tz="Europe/Paris"), {}),
    "int96_spark": (pa.timestamp("us"), {"use_deprecated_int96_timestamps": True}),
    "date32": (pa.date32(), {}),
    "date64": (pa.date64(), {}),
    "string": (pa.string(), {}),
}


@pytest.mark.parametrize("writer", _EVENT_TIME_WRITERS)
@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_an_event_time_before_1900_in_any_time_type_costs_only_its_row(writer, on_bad_file, tmp_path):
    kind, options = _EVENT_TIME_WRITERS[writer]
    times = [T0, datetime(1850, 6, 1, tzinfo=timezone.utc), T0 + timedelta(hours=1)]
    if pa.types.is_date32(kind) or pa.types.is_date64(kind):
        times = [t.date() for t in times]
    if pa.types.is_string(kind):
        times = [t.isoformat() for t in times]
    raw = table({"fact_id": "a"}, {"fact_id": "b"}, {"fact_id": "c"})
    raw = raw.set_column(raw.schema.get_field_index("event_time"), "event_time", pa.array(times, kind))
    path = tmp_path / "part-0.parquet"
    pq.write_table(raw, path, **options)
    result = run(read_fact_log(str(path), on_bad_file=on_bad_file))
    assert [(r["row"], r["reason"]) for r in result.rejects.to_pylist()] == [(1, "EVENT_TIME_OUT_OF_RANGE")]
    assert sorted(live_facts(result.state)) == [("alice", "a"), ("alice", "c")]


@pytest.mark.parametrize("kind", ["TIMESTAMPTZ", "TIMESTAMP", "TIMESTAMP_MS", "TIMESTAMP_NS", "DATE"])
def test_duckdbs_infinity_as_an_event_time_costs_its_row_and_is_named_as_such(kind, tmp_path):
    """DuckDB writes 'infinity' and '-infinity' (its own, or PostgreSQL's exported through it) to Parquet
    as the type's largest tick and its negation: each costs its row, saying it is that placeholder
    (it said "9223372036854775807 us since 1970-01-01", which named nothing a user would know)."""
    import duckdb

    path = tmp_path / "part-0.parquet"
    moment = "2026-11-20" if kind == "DATE" else "2026-11-20 08:00:00"
    duckdb.sql(f"COPY (SELECT 'ann' AS user_id, 'f' || x AS fact_id, 'upsert' AS op, 'My city is ' || x AS trigger, "
               f"' Ayr' AS answer, t::{kind} AS event_time FROM (VALUES (1, 'infinity'), (2, '-infinity'), "
               f"(3, '{moment}')) v(x, t)) TO '{path}' (FORMAT parquet)")
    result = run(read_fact_log(str(path)))
    rejects = [(r["row"], r["reason"], r["detail"]) for r in result.rejects.to_pylist()]
    assert [(row, reason) for row, reason, _ in rejects] == [(0, "EVENT_TIME_OUT_OF_RANGE"), (1, "EVENT_TIME_OUT_OF_RANGE")]
    what = "date" if kind == "DATE" else "timestamp"
    assert f"(DuckDB's and PostgreSQL's infinity {what}, a placeholder, not a moment" in rejects[0][2]
    assert f"(DuckDB's and PostgreSQL's -infinity {what}, a placeholder" in rejects[1][2]
    assert list(live_facts(result.state)) == [("ann", "f3")]


_NOT_A_MOMENT = {  # event_time columns that hold no moment: (writer, how the refusal names the type and why)
    "time32_s": (pa.array([9 * 3600], pa.time32("s")), "time32[ms]: a time of day with no date"),  # Parquet keeps ms
    "time32_ms": (pa.array([9 * 3600_000], pa.time32("ms")), "time32[ms]: a time of day with no date"),
    "time64_us": (pa.array([9 * 3600 * 10**6], pa.time64("us")), "time64[us]: a time of day with no date"),
    "time64_ns": (pa.array([9 * 3600 * 10**9], pa.time64("ns")), "time64[ns]: a time of day with no date"),
    "duration_s": (pa.array([3600], pa.duration("s")), "duration[s]: a length of time, not a moment"),
    "duration_ns": (pa.array([3600 * 10**9], pa.duration("ns")), "duration[ns]: a length of time, not a moment"),
    "float_seconds": (pa.array([1.7636256e9]), "double: a number, which is ambiguous (seconds or milliseconds"),
}


@pytest.mark.parametrize("writer", _NOT_A_MOMENT)
def test_an_event_time_of_day_or_duration_refuses_the_file_naming_its_type_and_the_fix(writer, tmp_path):
    """A time of day was refused as if it were a number ('seconds or ms?'): it names what the
    type is and what to write instead; with on_bad_file='reject' it is one SCHEMA_MISMATCH."""
    values, shown = _NOT_A_MOMENT[writer]
    raw = table({"fact_id": "a"})
    pq.write_table(raw.set_column(raw.schema.get_field_index("event_time"), "event_time", values), tmp_path / "bad.parquet")
    pq.write_table(table({"fact_id": "b"}), tmp_path / "good.parquet")
    with pytest.raises(FactLogError, match=re.escape(f"bad.parquet: column 'event_time' is {shown}") +
                       ".*write a timestamp with a time zone.*2026-11-20T08:00:00Z"):
        read_fact_log(str(tmp_path))
    result = run(read_fact_log(str(tmp_path), on_bad_file="reject"))
    assert [(Path(r["source"]).name, r["reason"]) for r in result.rejects.to_pylist()] == [("bad.parquet", "SCHEMA_MISMATCH")]
    assert result.accepted == 1


@pytest.mark.parametrize("sql, shown", [
    ("TIME '09:00:00'", "is time64[us]: a time of day with no date"),
    ("TIMETZ '09:00:00+00'", "is time64[us]: a time of day with no date"),
    # DuckDB writes INTERVAL as Parquet's INTERVAL, 12 raw bytes: every row was rejected as invalid UTF-8
    ("INTERVAL 3 HOUR", "is a Parquet INTERVAL (months, days, milliseconds; read as fixed_size_binary[12]): "
                        "a length of time, not a moment"),
])
@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_an_event_time_duckdb_wrote_as_time_or_interval_refuses_the_file_naming_its_type_and_the_fix(sql, shown, on_bad_file,
                                                                                                    tmp_path):
    import duckdb

    path = tmp_path / "part-0.parquet"
    duckdb.sql(f"""COPY (SELECT 'alice' AS user_id, 'pet' AS fact_id, 'upsert' AS op, 'My dog is called' AS trigger,
                        'Rex' AS answer, {sql} AS event_time) TO '{path}' (FORMAT parquet)""")
    message = re.escape(f"column 'event_time' {shown}") + ".*write a timestamp with a time zone"
    if on_bad_file == "raise":
        with pytest.raises(FactLogError, match=re.escape(str(path)) + ": " + message):
            read_fact_log(str(path))
        return
    batch = read_fact_log(str(path), on_bad_file="reject")
    [reject] = batch.file_rejects.to_pylist()
    assert reject["reason"] == "SCHEMA_MISMATCH" and re.search(message, reject["detail"])


def test_an_answer_duckdb_wrote_as_interval_refuses_the_file_not_each_row(tmp_path):
    import duckdb

    path = tmp_path / "part-0.parquet"
    duckdb.sql(f"""COPY (SELECT 'alice' AS user_id, 'f' || i AS fact_id, 'upsert' AS op, 'My shift is' AS trigger,
                        INTERVAL (i) HOUR AS answer, TIMESTAMPTZ '2026-11-20 08:00:00+00' AS event_time
                        FROM range(3) t(i)) TO '{path}' (FORMAT parquet)""")
    with pytest.raises(FactLogError, match=re.escape("column 'answer' is a Parquet INTERVAL") +
                       ".*not text; export answer as a string"):
        read_fact_log(str(path))


def test_event_times_duckdb_wrote_as_date_and_timestamptz_are_read(tmp_path):
    """A date is midnight UTC (README: Time types); DuckDB's TIMESTAMPTZ is a UTC timestamp."""
    import duckdb

    for name, sql in (("date", "DATE '2026-11-20'"), ("timestamptz", "TIMESTAMPTZ '2026-11-20 08:00:00+00'")):
        duckdb.sql(f"""COPY (SELECT 'alice' AS user_id, '{name}' AS fact_id, 'upsert' AS op, 'My dog is called' AS trigger,
                            'Rex' AS answer, {sql} AS event_time) TO '{tmp_path / name}.parquet' (FORMAT parquet)""")
    result = run(read_fact_log(str(tmp_path)))
    assert {r["fact_id"]: r["event_time"] for r in result.state.to_pylist()} == {
        "date": datetime(2026, 11, 20, tzinfo=timezone.utc), "timestamptz": T0}


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_event_time_text_with_a_bracketed_zone_as_java_writes_it_is_read_by_its_offset(on_bad_file, tmp_path):
    """Java's ZonedDateTime.toString() and JavaScript's Temporal write RFC 9557 text: the offset,
    then the zone's name in brackets. Every such row was rejected (BAD_EVENT_TIME); the offset gives
    the instant. A zone name without an offset costs its row, saying the offset is needed."""
    texts = ["2026-11-20T08:00Z[UTC]", "2026-11-20T09:00:00+01:00[Europe/Paris]",
             "2026-11-20T03:00:00.000-05:00[America/New_York][u-ca=iso8601]", "2026-11-20T08:00:00z[Etc/UTC]",
             "2026-11-20T09:00:00[Europe/Paris]", "2026-11-20[Europe/Paris]"]
    raw = table(*({"fact_id": f"f{i}"} for i in range(len(texts))))
    pq.write_table(raw.set_column(5, "event_time", pa.array(texts)), tmp_path / "java.parquet")
    result = run(read_fact_log(str(tmp_path), on_bad_file=on_bad_file))
    assert {r["fact_id"]: r["event_time"] for r in result.state.to_pylist()} == {f"f{i}": T0 for i in range(4)}
    rejects = {r["fact_id"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    assert set(rejects) == {"f4", "f5"}
    for reason, detail in rejects.values():
        assert reason == "BAD_EVENT_TIME" and "a zone name in brackets needs the UTC offset before it" in detail


def test_event_time_text_at_the_end_of_a_day_or_in_a_leap_second_is_read(tmp_path):
    """ISO 8601's end of a day (``24:00``) is the next day's midnight and RFC 3339's leap second
    (``23:59:60``) the last microsecond before the next minute: valid times that each cost their
    row (BAD_EVENT_TIME). A 25th hour or a 61st second still does."""
    texts = ["2026-11-19T24:00:00Z", "2026-11-19T24:00Z", "2026-11-19T24:00:00.000+01:00",
             "2026-11-19T23:59:60Z", "2026-11-19T23:59:60.5Z", "2026-11-19T24:00:01Z", "2026-11-19T23:59:61Z"]
    raw = table(*({"fact_id": f"f{i}"} for i in range(len(texts))))
    pq.write_table(raw.set_column(5, "event_time", pa.array(texts)), tmp_path / "edge.parquet")
    result = run(read_fact_log(str(tmp_path)))
    times = {r["fact_id"]: r["event_time"] for r in result.state.to_pylist()}
    midnight = datetime(2026, 11, 20, tzinfo=timezone.utc)
    assert times == {"f0": midnight, "f1": midnight, "f2": midnight - timedelta(hours=1),
                     "f3": midnight - timedelta(microseconds=1), "f4": midnight - timedelta(microseconds=1)}
    assert sorted((r["fact_id"], r["reason"]) for r in result.rejects.to_pylist()) == [
        ("f5", "BAD_EVENT_TIME"), ("f6", "BAD_EVENT_TIME")]


def test_event_time_text_that_is_a_missing_value_is_a_missing_event_time_per_row(tmp_path):
    """An event_time text column holding a missing time as text (pandas' ``astype(str)`` of a time
    column with NaT writes ``'NaT'``; ``'None'``, ``'null'``, empty or blank text, MySQL's zero date)
    rejects its row as ``MISSING_EVENT_TIME``, as a null does, saying so: it was ``BAD_EVENT_TIME``,
    "not an ISO-8601 timestamp", and a count of missing times left these out. A text that is a time
    in another format is still ``BAD_EVENT_TIME``; the other rows are read."""
    texts = ["NaT", "None", "null", "", "   ", "0000-00-00 00:00:00", "0000-00-00", None, "\\N", "20/11/2026 08:00",
             "2026-11-20T08:00:00Z"]
    raw = table(*({"fact_id": f"f{i}"} for i in range(len(texts))))
    pq.write_table(raw.set_column(5, "event_time", pa.array(texts, pa.string())), tmp_path / "times.parquet")
    result = run(read_fact_log(str(tmp_path)))
    rejects = {r["fact_id"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    assert {f: reason for f, (reason, _) in rejects.items()} == {
        **{f"f{i}": "MISSING_EVENT_TIME" for i in range(9)}, "f9": "BAD_EVENT_TIME"}
    assert "'NaT' is a missing time written as text" in rejects["f0"][1] and "export missing times as null" in rejects["f0"][1]
    assert "empty text, a missing time" in rejects["f3"][1] and "MySQL's zero date" in rejects["f5"][1]
    assert repr("\\N") + " is a missing time written as text" in rejects["f8"][1]  # MySQL's and PostgreSQL's text NULL
    assert [r["fact_id"] for r in result.state.to_pylist()] == ["f10"]
    assert result.accepted + result.rejected == len(texts)


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_event_time_text_as_go_email_http_javascript_and_java_write_it_is_read_by_its_offset(on_bad_file, tmp_path):
    """Go's time.Time.String() (a producer logging `%v` of a time), RFC 2822 and HTTP dates,
    JavaScript's Date.toString() and Java's Date.toString() in UTC: every such row was rejected
    (BAD_EVENT_TIME). The numeric offset gives the instant; a zone's name or abbreviation is not
    read, and without an offset it costs its row saying so, as does a bare number, and a weekday
    that is not the date's. Invisible characters around the text (a BOM) are dropped, as in ids."""
    texts = ["2026-11-20 08:00:00 +0000 UTC", "2026-11-20 08:00:00.000000999 +0000 UTC m=+0.001234567",
             "2026-11-20 01:00:00 -0700 MST", "2026-11-20 11:00:00 +0300 +03", "Fri, 20 Nov 2026 08:00:00 GMT",
             "20 Nov 2026 09:00:00 +0100", "Fri Nov 20 2026 09:00:00 GMT+0100 (Central European Standard Time)",
             "Fri Nov 20 08:00:00 UTC 2026", "\ufeff2026-11-20T08:00:00Z", "2026-11-20T08:00:00Z\u200b",
             "1763625600", "46346.3333", "Fri Nov 20 09:00:00 CET 2026", "2026-11-20 03:00:00 EST",
             "Thu, 20 Nov 2026 08:00:00 GMT"]
    raw = table(*({"fact_id": f"f{i}"} for i in range(len(texts))))
    pq.write_table(raw.set_column(5, "event_time", pa.array(texts)), tmp_path / "go.parquet")
    result = run(read_fact_log(str(tmp_path), on_bad_file=on_bad_file))
    assert {r["fact_id"]: r["event_time"] for r in result.state.to_pylist()} == {f"f{i}": T0 for i in range(10)}
    rejects = {r["fact_id"]: (r["reason"], r["row"], r["detail"]) for r in result.rejects.to_pylist()}
    assert {fact: (reason, row) for fact, (reason, row, _) in rejects.items()} == {
        f"f{i}": ("BAD_EVENT_TIME", i) for i in range(10, 15)}
    assert "is a bare number, which is ambiguous (seconds or milliseconds" in rejects["f10"][2]
    assert "a spreadsheet's day number" in rejects["f11"][2]
    for fact in ("f12", "f13"):
        assert "abbreviation without a UTC offset" in rejects[fact][2] and "+01:00" in rejects[fact][2]
    assert "a weekday that is not its date's" in rejects["f14"][2]
    # Go's zero time.Time (an unset field) is its row's EVENT_TIME_OUT_OF_RANGE, quoted as written
    pq.write_table(table({"fact_id": "zero"}).set_column(5, "event_time", pa.array(["0001-01-01 00:00:00 +0000 UTC"])),
                   tmp_path / "zero.parquet")
    result = run(read_fact_log(str(tmp_path / "zero.parquet"), on_bad_file=on_bad_file))
    assert [(r["reason"], r["detail"]) for r in result.rejects.to_pylist()] == [(
        "EVENT_TIME_OUT_OF_RANGE", "event_time '0001-01-01 00:00:00 +0000 UTC' is outside 1900-01-01..9999-12-31 (a "
        "wrapped, mis-scaled or placeholder time)")]


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_event_time_text_in_other_iso_8601_and_rfc_3339_forms_is_read_and_ambiguous_dates_cost_their_row(
        on_bad_file, tmp_path):
    """ISO 8601's ordinal dates (Python's fromisoformat refuses them) and offsets written after a
    zone's name (UTC+1, GMT+01:00: Java's ZoneId, people) were rejected rows (BAD_EVENT_TIME); week
    dates, +0100, UTC, a lowercase z, a space for T and a comma before the fraction are read too. A
    date whose day and month order cannot be told, and a bare number (Unix seconds or ms?), still
    cost their row, the reject naming file, row, value and the forms that are read."""
    texts = ["2026-324T08:00:00Z", "2026324T080000Z", "2026-W47-5T08:00:00Z", "2026-11-20T09:00:00 UTC+1",
             "2026-11-20T09:00:00GMT+01:00", "2026-11-20T03:00:00 UTC-05", "2026-11-20T09:00:00+0100",
             "2026-11-20T08:00:00 UTC", "2026-11-20t08:00:00z", "2026-11-20 08:00:00Z", "2026-11-20T07:59:59,5-00:00",
             "2026-324", "01/02/2026", "20.11.2026 08:00", "1795161600", "1795161600000", "2026-366"]
    raw = table(*({"fact_id": f"f{i}"} for i in range(len(texts))))
    path = tmp_path / "forms.parquet"
    pq.write_table(raw.set_column(5, "event_time", pa.array(texts)), path)
    result = run(read_fact_log(str(tmp_path), on_bad_file=on_bad_file))
    times = {r["fact_id"]: r["event_time"] for r in result.state.to_pylist()}
    assert times == {**{f"f{i}": T0 for i in range(10)}, "f10": T0 - timedelta(microseconds=500_000),
                     "f11": T0 - timedelta(hours=8)}, times
    rejects = {r["fact_id"]: (r["reason"], r["row"], r["source"], r["detail"]) for r in result.rejects.to_pylist()}
    assert {f: (reason, row, source) for f, (reason, row, source, _) in rejects.items()} == {
        f"f{i}": ("BAD_EVENT_TIME", i, str(path)) for i in range(12, 17)}
    assert rejects["f12"][3].startswith("event_time '01/02/2026' is '01/02/2026', 2026-02-01 or 2026-01-02: dates "
                                        "written with day and month as numbers are refused, because their order "
                                        "cannot be told in general"), rejects["f12"]
    assert rejects["f13"][3].startswith("event_time '20.11.2026 08:00' is '20.11.2026', which can only be 2026-11-20, "
                                        "but dates written with day and month as numbers are refused"), rejects["f13"]
    assert "seconds or milliseconds" in rejects["f14"][3]
    for fact in ("f12", "f13", "f16"):
        assert "ordinal dates 2026-324" in rejects[fact][3] and "2026-11-20T08:00:00Z" in rejects[fact][3]


def timed_as_text(texts: list[str]) -> pa.Table:
    """A log of one fact per text (f0, f1, ...), its event_time column that text."""
    raw = table(*({"fact_id": f"f{i}"} for i in range(len(texts))))
    return raw.set_column(raw.schema.get_field_index("event_time"), "event_time", pa.array(texts))


@pytest.mark.parametrize("text, words", [
    ("11/20/2026", "is '11/20/2026', which can only be 2026-11-20, but dates written with day and month as numbers "
                   "are refused, because their order cannot be told in general (01/02/2026: 1 February or January 2?)"
                   ", so the log's other dates would not be read safely either; write ISO 8601 (2026-11-20) with its "
                   "time after a 'T' and its UTC offset, e.g. 2026-11-20T08:00:00Z"),
    ("11/12/2026 08:00", "is '11/12/2026', 2026-12-11 or 2026-11-12: dates written with day and month as numbers are "
                         "refused, because their order cannot be told in general"),
    ("05/05/2026", "which can only be 2026-05-05, but dates written"),
    ("13/13/2026", "is no date in either order of day and month ('13/13/2026')"),
    ("1-2-26", "writes its year with 2 digits ('1-2-26': which century?)"),
])
def test_a_date_of_day_and_month_as_numbers_is_refused_saying_truly_what_it_is(text, words):
    """'11/20/2026' was refused as a date whose "day and month [are] in an order that cannot be told",
    which is false of it (20 cannot be a month). The reject now says what the date is (both readings,
    the one reading, or none), that such dates are refused because the order cannot be told in
    general, and the ISO 8601 date to write."""
    result = run(timed_as_text([text]))
    (reject,) = result.rejects.to_pylist()
    assert reject["reason"] == "BAD_EVENT_TIME" and reject["detail"].startswith(f"event_time {text!r} ")
    assert words in reject["detail"] and "ordinal dates 2026-324" in reject["detail"], reject["detail"]


@pytest.mark.parametrize("zero, day", [(pa.array([0] * 4, pa.timestamp("ms", tz="UTC")), "1970-01-01"),
                                       (pa.array([0] * 4, pa.date32()), "1970-01-01"),
                                       (pa.array(["1970-01-01T00:00:00Z"] * 4), "1970-01-01"),
                                       (pa.array([-2208988800] * 4, pa.timestamp("s")), "1900-01-01")])
def test_event_times_at_the_unix_epoch_or_sql_servers_zero_date_are_read_with_one_warning_naming_the_forget(
        zero, day, tmp_path, caplog):
    """A missing time filled with 0 (a nullable field's default, pandas' fillna(0), a Kafka record
    without a timestamp) is 1970-01-01T00:00:00Z exactly; SQL Server's zero datetime is 1900-01-01. Such a
    time is read as that instant, older than any real event, so a forget_user at it erased nothing the
    user wrote later while the night counted the user as forgotten, and nothing said why. The rows are
    read as before (a producer without times still gets its facts in), with one warning per file naming
    the count, the first row and, for a forget_user or delete, that it undoes nothing written later."""
    ops = ["upsert", "upsert", "forget_user", "upsert"]
    late = datetime(2026, 11, 1, 8, tzinfo=timezone.utc)
    raw = pa.table({"user_id": ["u1", "u2", "u1", "u3"], "fact_id": ["a", "b", None, "c"], "op": ops,
                    "trigger": ["My dog is", "My cat is", None, "My pin is"], "answer": ["Rex", "Tom", None, "1234"],
                    "event_time": zero})
    pq.write_table(raw, tmp_path / "zero.parquet")
    pq.write_table(table({"user_id": "u1", "fact_id": "later", "event_time": late}), tmp_path / "later.parquet")
    with caplog.at_level("WARNING"):
        result = run(read_fact_log(str(tmp_path)))
    # read as before: the forget at time zero took u1's fact of that instant, not the one written later
    assert sorted((r["user_id"], r["fact_id"]) for r in result.state.to_pylist()) == [("u1", "later"), ("u2", "b"),
                                                                                      ("u3", "c")]
    assert caplog.text.count("exactly: a missing time") == 1
    assert f"zero.parquet: 4 rows have event_time {day}T00:00:00Z (row 0 first)" in caplog.text
    assert "row 2 is a forget_user" in caplog.text and "undoes nothing written after it" in caplog.text


def test_year_0000_and_other_edge_years_get_one_verdict_whichever_parser_reads_them(tmp_path):
    """Year 0000 in RFC 3339 text was EVENT_TIME_OUT_OF_RANGE when Arrow read the whole column and
    BAD_EVENT_TIME "not an ISO-8601 timestamp" when the row parser did (a column where Arrow refused
    one text): Python's datetime has no year 0. Both read it (as Arrow's proleptic calendar does):
    out of range, quoted as written, in either column; the edge years around the range agree too."""
    from pipeline.ingest import _parse_time_micros, _parse_times

    edges = ["0000-01-01T00:00:00Z", "0000-02-29T12:00:00+01:00", "0000-12-31T23:59:59-01:00", "0000-06-15 08:00:00",
             "0001-01-01T00:00:00+01:00", "0001-01-01T00:00:00Z", "1899-12-31T23:59:59.999999Z",
             "1900-01-01T00:00:00Z", "1900-01-01T00:30:00+01:00", "1969-12-31T23:59:59.5Z", "1970-01-01T00:00:00Z",
             "2000-02-29T00:00:00Z", "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59-01:00", "0000-01-01"]
    for column in (edges, edges + ["2026-02-30T08:00:00Z"], edges + ["junk"]):
        problems = [None] * len(column)
        got = _parse_times(pa.chunked_array([pa.array(column)]), problems).to_pylist()
        assert got == [_parse_time_micros(t) for t in column]
        assert None not in got[:len(edges)]
    verdicts = []
    for name, column in (("arrow", edges), ("rows", edges + ["2026-02-30T08:00:00Z"])):
        result = run(timed_as_text(column))
        verdicts.append({r["fact_id"]: (r["reason"], r["detail"]) for r in result.rejects.to_pylist()
                         if r["fact_id"] != f"f{len(edges)}"})
    assert verdicts[0] == verdicts[1]
    out = {f for f, (reason, _) in verdicts[0].items() if reason == "EVENT_TIME_OUT_OF_RANGE"}
    assert out == {"f0", "f1", "f2", "f3", "f4", "f5", "f6", "f8", "f13", "f14"}, verdicts[0]  # f8: 23:30 UTC on 1899-12-31
    assert verdicts[0]["f0"][1] == ("event_time '0000-01-01T00:00:00Z' is outside 1900-01-01..9999-12-31 (a wrapped, "
                                    "mis-scaled or placeholder time)")
    assert {f: reason for f, (reason, _) in verdicts[0].items() if f not in out} == {"f12": "FUTURE_EVENT_TIME"}


def test_rfc_3339_event_times_read_for_the_whole_column_are_the_row_parsers_microseconds():
    """The column-at-once read of RFC 3339 text (Arrow's parser, ~200x faster than Python's row
    by row) gives each row what the row parser gives it, in a column mixing it with other forms,
    missing values, invalid dates (Arrow refuses the column: every row by Python's) and junk."""
    from pipeline.ingest import _parse_time_micros, _parse_times

    rng = random.Random(7)
    texts = []
    for _ in range(400):
        fraction = rng.choice(["", "." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 6)))])
        zone = rng.choice(["", "Z", "+00:00", "-00:00", f"+{rng.randint(0, 23):02d}:{rng.choice([0, 30, 45]):02d}",
                           f"-{rng.randint(0, 23):02d}:{rng.choice([0, 30]):02d}"])
        texts.append(f"{rng.randint(1900, 9999)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}{rng.choice('T ')}"
                     f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}{fraction}{zone}")
    mixed = texts[:50] + [None, "2026-W47-5", "2026-11-19T24:00:00Z", "\ufeff2026-11-20T08:00:00Z", "junk", "NaT"]
    for column in (texts, texts + [None], mixed, texts[:20] + ["2026-02-30T08:00:00Z"]):
        problems = [None] * len(column)
        got = _parse_times(pa.chunked_array([pa.array(column, pa.large_string())]), problems).to_pylist()
        assert got == [None if t is None else _parse_time_micros(t) for t in column]
        assert [p[0] if p else None for p in problems] == [
            None if t is None or _parse_time_micros(t) is not None else "MISSING_EVENT_TIME" if t == "NaT"
            else "BAD_EVENT_TIME" for t in column]


def test_a_column_of_naive_times_read_at_once_warns_once_naming_the_first_such_row(caplog):
    """The column-at-once read covers times without a zone (Python's str(datetime), pandas): read as
    UTC with the one warning per file, naming the first such row, as the row parser does."""
    from pipeline.ingest import _parse_times

    for column, first in ((["2026-11-20T08:00:00Z", "2026-11-20 08:00:00.5", "2026-11-20 09:00:00"], 1),
                          (["2026-11-20T08:00:00Z", "2026-11-20 08:00:00.5", "2026-11-20T08:00"], 1),
                          (["2026-11-20T08:00", "2026-11-20 08:00:00.5"], 0)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="pipeline.ingest"):
            got = _parse_times(pa.chunked_array([pa.array(column)]), [None] * len(column)).to_pylist()
        assert got[0] == 1795161600000000 and None not in got  # 2026-11-20T08:00 UTC
        warnings = [r.getMessage() for r in caplog.records if "has no time zone" in r.getMessage()]
        assert len(warnings) == 1 and f"{column[first]!r} (row {first})" in warnings[0], warnings


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_stray_files_without_a_parquet_name_are_skipped_and_exports_in_another_format_rejected(on_bad_file, tmp_path):
    """A README.txt, an empty marker without a '_' (SUCCESS), a JSON manifest or a checksum beside
    the log's Parquet files were read as Parquet: the night failed on them, or each became an
    UNREADABLE_FILE reject. They are skipped with a warning naming them (pyarrow.dataset's
    exclude_invalid_files); Hive's 000000_0 (Parquet, no suffix) is read. A file of rows in another
    format (a CSV export) and a .parquet file that is no Parquet are still refused: their rows would
    go unread without a word."""
    pq.write_table(table({"fact_id": "p"}), tmp_path / "part-0.parquet")
    pq.write_table(table({"fact_id": "hive"}), tmp_path / "000000_0")
    for name, content in (("README.txt", b"exported by job 7\n"), ("SUCCESS", b""), ("manifest.json", b'{"n": 1}'),
                          ("part-0.crc", b"\x00\x01crc"), ("empty.csv", b"")):
        (tmp_path / name).write_bytes(content)
    read = read_fact_log(str(tmp_path))
    assert sorted(r["fact_id"] for r in read.rows.to_pylist()) == ["hive", "p"]
    (tmp_path / "export.csv").write_text("user_id,fact_id,op\nu1,a,upsert\n")
    if on_bad_file == "raise":
        with pytest.raises(FactLogError, match=re.escape(str(tmp_path / "export.csv")) + ".*a file of another format"):
            read_fact_log(str(tmp_path))
        return
    read = read_fact_log(str(tmp_path), on_bad_file="reject")
    assert [(r["source"], r["reason"]) for r in read.file_rejects.to_pylist()] == [
        (str(tmp_path / "export.csv"), "UNREADABLE_FILE")]
    assert sorted(r["fact_id"] for r in read.rows.to_pylist()) == ["hive", "p"]


def _exports_in_other_formats() -> dict[str, tuple[bytes, str]]:
    """Files of rows in another format, as tools write them, each with words its reject must hold."""
    import bz2
    import gzip
    import lzma

    csv = b"user_id,fact_id,op,trigger,answer,event_time\nu1,a,upsert,My cat is,Tom,2026-11-20T08:00:00Z\n"
    jsonl = b'{"user_id": "u1", "fact_id": "a", "op": "upsert"}\n'
    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "zipped"}), buffer)
    return {
        "part-00000-1a2b-c000.json": (jsonl, "JSON text"),
        "part-00000-1a2b-c000.csv": (csv, "text (CSV"),
        "part-0.csv.gz": (gzip.compress(csv), "gzip-compressed data, and by its name csv compressed with gzip"),
        "part-0.json.gz": (gzip.compress(jsonl), "gzip-compressed data, and by its name json compressed with gzip"),
        "part-0.csv.bz2": (bz2.compress(csv), "bzip2-compressed data"),
        "part-0.xz": (lzma.compress(csv), "xz-compressed data"),
        "part-0.zst": (b"\x28\xb5\x2f\xfd\x24\x10\x81\x00" + csv, "zstd-compressed data"),
        "part-0.parquet.gz": (gzip.compress(buffer.getvalue()), "a Parquet file compressed whole with gzip (.gz); "
                                                                "Parquet compresses its own pages"),
        "000000_0": (b"ORC\x0a\x06\x08\x03\x10\x00" + csv, "an ORC file"),
        "000001_0": (b"u1\x01a\x01upsert\x01My cat is\x01Tom\n", "text (CSV"),  # Hive's text table, \x01 between fields
        "part-0.txt": (csv, "text (CSV"),
        "notes.txt": (b"exported by job 7; 3 files\n", "text (CSV"),  # a .txt is taken for rows unless a README
        "part-0.avro": (b"Obj\x01\x04\x14avro.codec" + csv, "an Avro file"),
        "part-0.arrow": (b"ARROW1\x00\x00\xff\xff\xff\xff" + csv, "an Arrow IPC (Feather) file"),
        "rejects-2026-11.xls": (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504), "a legacy Microsoft Office file (Excel .xls"),
    }


_STRAYS = {"README": b"exported by job 7\n", "README.md": b"# log\n", "notes.md": b"n", "part-0.crc": b"\x00\x01crc",
           "part-0.parquet.md5": b"d41d8cd98f00b204e9800998ecf8427e", "SHA256SUMS": b"abc  part-0.parquet\n",
           "manifest.json": b'{"n": 1}', "manifest-2026-11-20.json": b"{}", "SUCCESS": b"", "DONE": b"2026-11-20",
           "day.done": b"ok", "export.lock": b"pid 7", "part-1.json": b"", "000002_0": b""}


@pytest.mark.parametrize("reader", ["read_fact_log", "read_log_file"])
def test_a_file_of_another_format_is_rejected_naming_what_it_is_whatever_its_name(reader, tmp_path):
    """A non-empty file that is no Parquet and whose name lacked one of a few data suffixes (Spark's
    part-00000-...-c000.json, a .csv.gz, .json.gz, .csv.bz2, .zst, a whole-file-gzipped
    part-0.parquet.gz, Hive's suffixless ORC or text 000000_0, a .txt holding CSV) was skipped as
    "not a data file", and a night recorded it as ingested: its rows were never read. Now only an
    empty file or a well-known name that holds no rows (README, *.md, checksums, manifest*.json,
    completion markers) is skipped; every other such file is UNREADABLE_FILE, the reject saying
    what it looks like by its first bytes and to convert it to Parquet. Both readers (the night's
    per-file read and read_fact_log) give each file the same verdict."""
    pq.write_table(table({"fact_id": "p"}), tmp_path / "part-0.parquet")
    exports = _exports_in_other_formats()
    for name, content in [*((n, c) for n, (c, _) in exports.items()), *_STRAYS.items()]:
        (tmp_path / name).write_bytes(content)
    verdicts, rows = {}, []
    if reader == "read_fact_log":
        read = read_fact_log(str(tmp_path), on_bad_file="reject")
        rows = read.rows.column("fact_id").to_pylist()
        verdicts = {r["source"].rsplit("/", 1)[1]: ("UNREADABLE_FILE", r["detail"]) for r in read.file_rejects.to_pylist()}
        read_names = {f.path.rsplit("/", 1)[1] for f in read.files}
        verdicts |= {n: ("NOT_DATA", None) for n in _STRAYS if n not in read_names}
    else:
        for file in list_log_files(str(tmp_path)):
            got, keyed = read_log_file(file, RowRules(max_trigger_tokens=64), 4, on_bad_file="reject")
            name = file.path.rsplit("/", 1)[1]
            if got.reject is not None:
                verdicts[name] = ("UNREADABLE_FILE", got.reject.column("detail")[0].as_py())
            elif got.skipped:
                verdicts[name] = ("NOT_DATA", None)
            rows += keyed.column("fact_id").to_pylist()
    assert rows == ["p"]
    assert {n: v[0] for n, v in verdicts.items()} == {**{n: "UNREADABLE_FILE" for n in exports},
                                                      **{n: "NOT_DATA" for n in _STRAYS}}
    for name, (_, words) in exports.items():
        detail = verdicts[name][1]
        assert "not a readable Parquet file" in detail and words in detail, (name, detail)
        assert "convert it" in detail or "decompress it to part-0.parquet" in detail, (name, detail)
    with pytest.raises(FactLogError, match=re.escape(str(tmp_path / "000000_0")) + ".*an ORC file"):
        read_fact_log(str(tmp_path))


# What an operating system, a file system or a NAS writes into a folder it mounts, shares or shows: files
# that hold no rows, and folders of deleted, recovered or snapshotted copies of the log's own files.
_OS_FILES = {"Thumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504),  # Windows Explorer's thumbnails
             "ehthumbs.db": b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(56),
             "desktop.ini": b"[.ShellClassInfo]\r\nIconResource=C:\\icons\\log.ico,0\r\n",
             "Icon\r": b"\x00\x00\x01\x00icns",  # macOS's custom folder icon
             "~$rejects.xlsx": b"\x05jdoe" + bytes(150)}  # Office's owner file beside an open workbook
_OS_FOLDERS = ("$RECYCLE.BIN/S-1-5-21-1004/$RX7Q2.parquet",  # a quarantined file "deleted" on a Windows share
               "#recycle/day=2026-11-19/part-0.parquet",  # Synology's recycle bin of a shared folder
               "@Recycle/part-0.parquet",  # QNAP's
               "@eaDir/part-0.parquet@SynoEAStream",  # Synology's per-folder metadata
               "#snapshot/GMT+00_2026.11.19-00.00.00/part-0.parquet",  # Synology's snapshots of the share
               "~snapshot/hourly.0/part-0.parquet",  # NetApp's snapshots over SMB
               "lost+found/#131077",  # fsck's recovered fragments at a volume's root
               "System Volume Information/IndexerVolumeGuid")


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_files_and_folders_an_os_or_nas_keeps_in_a_log_folder_are_not_read(on_bad_file, tmp_path):
    """A fact log on a mounted volume or a file share gets what the system keeps there: Windows
    Explorer's Thumbs.db and desktop.ini in every folder a user browsed, macOS's Icon\\r, Office's
    ~$ owner file, a recycle bin ($RECYCLE.BIN, Synology's #recycle, QNAP's @Recycle) holding the files
    an operator deleted from the log (a quarantine), snapshot folders (#snapshot, ~snapshot) holding
    old copies of every file, Synology's @eaDir, fsck's lost+found. Each was read as a log file: the
    night failed on Thumbs.db ("convert it to Parquet"), and a file quarantined by deleting it on the
    share came back from the recycle bin with its rows. The files are skipped as no data, with a
    warning naming them; the folders are not listed, as a '_' or '.' folder is not; both readers agree."""
    pq.write_table(table({"fact_id": "kept"}), tmp_path / "part-0.parquet")
    for name, content in _OS_FILES.items():
        (tmp_path / name).write_bytes(content)
    for relative in _OS_FOLDERS:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if relative.endswith(".parquet"):
            pq.write_table(table({"fact_id": "quarantined", "answer": " wrong"}), path)
        else:
            path.write_bytes(b"\x00\x01 fragment" * 8)
    listed = {Path(f.path).relative_to(tmp_path).as_posix() for f in list_log_files(str(tmp_path))}
    assert listed == {"part-0.parquet", *_OS_FILES}
    read = read_fact_log(str(tmp_path), on_bad_file=on_bad_file)
    assert read.rows.column("fact_id").to_pylist() == ["kept"] and read.file_rejects.num_rows == 0
    for file in list_log_files(str(tmp_path)):
        got, keyed = read_log_file(file, RowRules(max_trigger_tokens=64), 4, on_bad_file=on_bad_file)
        name = Path(file.path).name
        if name == "part-0.parquet":
            assert keyed.column("fact_id").to_pylist() == ["kept"]
        else:
            assert got.reject is None and got.skipped and "the operating system" in got.skipped, (name, got)


def test_a_skipped_system_folder_is_named_and_folders_only_named_like_one_are_read(tmp_path, caplog):
    """A recycle bin or lost+found is not listed, with one warning naming it (it was dropped without a
    word); folders whose names only resemble one ('Recycled', 'snapshot', a partition 'team=recycler')
    are the log's own and are read."""
    for relative in ("$RECYCLE.BIN/S-1-5-21/part-0.parquet", "lost+found/part-1.parquet", "Recycled/part-2.parquet",
                     "snapshot/part-3.parquet", "team=recycler/part-4.parquet"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table({"fact_id": relative.split("/")[0]}), path)
    for source in (str(tmp_path), f"file://{tmp_path}"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
            read = read_fact_log(source)
        assert sorted(read.rows.column("fact_id").to_pylist()) == ["Recycled", "snapshot", "team=recycler"]
        named = [r.getMessage() for r in caplog.records if "a folder a file system or a NAS keeps" in r.getMessage()]
        assert sorted(m.split(" is a folder")[0].rsplit("/", 1)[-1] for m in named) == ["$RECYCLE.BIN", "lost+found"]


# The temporary names copy tools write a file under until it is whole, then rename it to its own.
_IN_FLIGHT = ("part-0.parquet.1a2b3c4d.partial",  # rclone
              "part-1.parquet.filepart",  # WinSCP
              "part-2.parquet.crdownload",  # Chrome
              "part-3.parquet.part",  # Firefox, curl -O with a resume wrapper, lftp
              "part-4.parquet_.gstmp",  # gsutil
              "part-5.parquet.inprogress",  # Flink's file sink without its '.' prefix
              "part-6.parquet.tmp", "part-7.parquet.download")


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_copy_tools_file_in_flight_is_skipped_and_its_rows_are_read_under_the_name_it_gets(on_bad_file, tmp_path):
    """rclone, WinSCP, gsutil and browsers write a file under a temporary name (``.partial``,
    ``.filepart``, ``.gstmp``, ``.crdownload``, ...) and rename it when it is whole; none can be told
    to write under a '_' or '.' name, which the refusal advised. A night that listed the log while such
    a copy was in flight failed on it (cut short, "still being written"), or with on_bad_file='reject'
    recorded it as UNREADABLE_FILE. It is skipped as no data, with a warning; once renamed, the file is
    read under its own name, its rows once."""
    whole = io.BytesIO()
    pq.write_table(table({"fact_id": "copied"}), whole)
    for name in _IN_FLIGHT:
        (tmp_path / name).write_bytes(whole.getvalue()[:len(whole.getvalue()) // 2])  # half copied
    pq.write_table(table({"fact_id": "kept"}), tmp_path / "part-9.parquet")
    read = read_fact_log(str(tmp_path), on_bad_file=on_bad_file)
    assert read.rows.column("fact_id").to_pylist() == ["kept"] and read.file_rejects.num_rows == 0
    for file in list_log_files(str(tmp_path)):
        got, keyed = read_log_file(file, RowRules(max_trigger_tokens=64), 4, on_bad_file=on_bad_file)
        if not file.path.endswith("part-9.parquet"):
            assert got.reject is None and got.skipped and "copy in progress" in got.skipped, (file.path, got)
    (tmp_path / _IN_FLIGHT[0]).write_bytes(whole.getvalue())  # the copy completes, then renames the file
    (tmp_path / _IN_FLIGHT[0]).rename(tmp_path / "part-0.parquet")
    read = read_fact_log(str(tmp_path), on_bad_file=on_bad_file)
    assert sorted(read.rows.column("fact_id").to_pylist()) == ["copied", "kept"]


def test_a_producers_own_data_name_ending_like_a_temporary_one_is_read(tmp_path):
    """The generic temporary suffixes (.part, .tmp, .temp, .download) mark a copy in flight only after a
    name with its own extension (part-0.parquet.tmp): a producer's whole Parquet file named
    ``events.part`` or ``2026-12.tmp`` is data, and was skipped unread as "a copy in progress"."""
    names = ("events.part", "2026-12.tmp", "export.download", "report.temp")
    for name in names:
        pq.write_table(table({"fact_id": name}), tmp_path / name)
    read = read_fact_log(str(tmp_path))
    assert sorted(read.rows.column("fact_id").to_pylist()) == sorted(names)
    assert read.file_rejects.num_rows == 0


def test_an_op_in_another_spelling_is_rejected_naming_the_op_to_write():
    result = run(table({"op": "forgetUser"}, {"op": "forget-user", "fact_id": "b"}, {"op": "UP SERT", "fact_id": "c"}))
    assert [(r["reason"], r["detail"]) for r in result.rejects.to_pylist()] == [
        ("UNKNOWN_OP", f"op {op!r} is not one of upsert, delete, forget_user (write {name!r}: another spelling of "
                       "an op is not read as it)")
        for op, name in (("forgetuser", "forget_user"), ("forget-user", "forget_user"), ("up sert", "upsert"))]


def test_an_op_in_quotes_is_read_and_another_word_for_an_op_is_rejected_naming_the_op_to_write():
    """A CSV's or JSON's quoting left in ('"upsert"', "'delete'": a CSV converted with its quotes, a JSON
    string dumped twice) cost every row as UNKNOWN_OP: an op in matching quotes is read as the op, as its case
    and width are. Another word for an op (add, set, remove, forget, erase, purge) and an op with punctuation
    left on ('upsert;') cost their row naming the op to write: a 'forget' or 'erase' of an erasure export said
    only "not one of upsert, delete, forget_user"."""
    quoted = ['"upsert"', "'delete'", '\u201cUPSERT\u201d', '"forget_user"']
    result = run(table(*({"op": op, "fact_id": f"q{i}", "user_id": f"u{i}"} for i, op in enumerate(quoted))))
    assert result.rejected == 0 and result.forgotten_users == {"u3"}
    assert sorted(live_facts(result.state)) == [("u0", "q0"), ("u2", "q2")]  # u1's delete, of nothing; u3 forgotten
    words = {"add": "upsert", "SET": "upsert", "create": "upsert", "remove": "delete", "deleted": "delete",
             "forget": "forget_user", "Erase": "forget_user", "purge": "forget_user", "upsert;": "upsert",
             '"upsert': "upsert"}
    result = run(table(*({"op": op, "fact_id": f"f{i}"} for i, op in enumerate(words))))
    rejects = result.rejects.to_pylist()
    assert [r["reason"] for r in rejects] == ["UNKNOWN_OP"] * len(words)
    for reject, (op, name) in zip(rejects, words.items()):
        assert reject["detail"].startswith(f"op {op.lower()!r} is not one of upsert, delete, forget_user (write {name!r}"), \
            reject["detail"]


def test_a_change_data_capture_exports_op_codes_are_rejected_naming_the_op_to_write():
    """A CDC export (SQL INSERT / UPDATE, Debezium c / u / r / d, AWS DMS I / U / D) had its deletes
    applied and every insert and update rejected as an unknown op, with no word of the mapping."""
    ops = {"INSERT": "upsert", "update": "upsert", "c": "upsert", "u": "upsert", "r": "upsert", "I": "upsert",
           "U": "upsert", "D": "delete"}
    result = run(table(*({"op": op, "fact_id": f"f{i}"} for i, op in enumerate(ops))))
    rejects = result.rejects.to_pylist()
    assert [r["reason"] for r in rejects] == ["UNKNOWN_OP"] * len(ops)
    for reject, (op, name) in zip(rejects, ops.items()):
        assert reject["detail"].startswith(f"op {op.lower()!r} is not one of upsert, delete, forget_user (write {name!r}: "
                                           "a change-data-capture export's operation codes")


def test_a_scope_that_is_a_word_for_the_users_own_facts_costs_its_row_instead_of_merging_users():
    """An export writing scope 'personal' (an enum's name) for users' own facts made one shared scope
    of every such user: their facts merged, each served the others' (measured: bob was answered
    ann's cat's name, ann bob's locker code). Such an upsert costs its row (BAD_SCOPE, saying why and
    what to write); null, empty, the user's id and a group's id are read as before; a delete still applies."""
    words = ["personal", "Private", "USER", "self", "own", "individual", "n/a", "-"]
    rows = [{"user_id": f"u{i}", "fact_id": "dentist", "scope": w} for i, w in enumerate(words)]
    rows += [{"user_id": "ann", "fact_id": f"f{i}", "scope": s} for i, s in enumerate([None, "", "ann", "org:a"])]
    rows += [{"user_id": "me", "fact_id": "own", "scope": "me"}]  # a user whose id is the word: its own scope
    result = run(table(*rows))
    rejects = result.rejects.to_pylist()
    assert [(r["user_id"], r["reason"]) for r in rejects] == [(f"u{i}", "BAD_SCOPE") for i in range(len(words))]
    assert rejects[0]["detail"].startswith("scope 'personal' is a word for the user's own facts, but a scope is shared: "
                                           "every user who writes it would be one scope")
    assert "leave scope null or empty for a user's own facts" in rejects[0]["detail"]
    assert {(r["user_id"], r["fact_id"]): r["scope"] for r in result.state.to_pylist()} == {
        ("ann", "f0"): "ann", ("ann", "f1"): "ann", ("ann", "f2"): "ann", ("ann", "f3"): "org:a", ("me", "own"): "me"}
    delete = run(table({"op": "delete", "scope": "personal", "trigger": None, "answer": None,
                        "event_time": T0 + timedelta(hours=1)}), run(table({})).state)
    assert delete.rejects.num_rows == 0 and delete.state.num_rows == 0


def test_a_scope_whose_fact_its_users_write_with_other_answers_is_warned_of_once_per_file(caplog):
    """A scope column holding the users' tenant ('acme') for their own facts merged them: each user
    was served the latest copy of 'dentist', another user's. Copies of one shared fact with the same
    text (a scope's opening hours in every member's row) get no warning."""
    rows = [{"user_id": "ann", "fact_id": "dentist", "answer": " Okafor", "scope": "acme"},
            {"user_id": "bob", "fact_id": "dentist", "answer": " Nguyen", "scope": "acme"},
            {"user_id": "ann", "fact_id": "hours", "answer": " 9-5", "scope": "org:a"},
            {"user_id": "bob", "fact_id": "hours", "answer": "9-5 ", "scope": "org:a"}]
    with caplog.at_level("WARNING"):
        normalise_fact_log(table(*rows), source="x.parquet")
    assert caplog.text.count("users with") == 1
    assert ("fact log x.parquet: scope 'acme''s fact 'dentist' is written by 2 users with 2 different answers: a shared "
            "scope's fact is one text served to every member") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        normalise_fact_log(table(*rows[2:]), source="x.parquet")
        normalise_fact_log(table(*(r | {"scope": "Personal"} for r in rows)), source="x.parquet")  # rows refused anyway
    assert "users with" not in caplog.text


def test_a_delete_without_a_fact_id_is_rejected_naming_forget_user_for_every_fact_of_the_user():
    """An export's 'delete this user' written as a delete without a fact_id was rejected as 'fact_id
    is empty on a delete', with no word of forget_user; the user's facts stayed served."""
    result = run(table({"op": "delete", "fact_id": None, "trigger": None, "answer": None},
                       {"op": "upsert", "fact_id": None}))
    assert [(r["reason"], r["detail"]) for r in result.rejects.to_pylist()] == [
        ("MISSING_FACT_ID", "fact_id is empty on a delete: a delete removes one fact; to remove every fact of the user "
                            "write op 'forget_user' (it also erases the user from older versions), or one delete per "
                            "fact_id"),
        ("MISSING_FACT_ID", "fact_id is empty on an upsert")]


@pytest.mark.parametrize("first", [0, 1])
def test_fact_ids_that_are_the_files_row_numbers_are_warned_of_once(first, caplog):
    """A DataFrame's index exported as fact_id: row 0 of the next night's file, the same user's
    fact_id '0', replaced this night's fact (a later upsert wins per user and fact_id), night after night."""
    rows = [{"user_id": "ann", "fact_id": str(first + i), "trigger": f"My thing {i} is"} for i in range(4)]
    with caplog.at_level("WARNING"):
        normalise_fact_log(table(*rows), source="x.parquet")
    assert caplog.text.count("fact_id is the file's row number") == 1
    assert f"fact_id is the file's row number ({first}, {first + 1}, {first + 2}, ...: a DataFrame's index?)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        normalise_fact_log(table(*(r | {"fact_id": str(7 + i)} for i, r in enumerate(rows))), source="y.parquet")
    assert "row number" not in caplog.text


def test_a_trigger_or_answer_that_is_a_missing_value_as_text_is_warned_of_once_per_file_and_column(caplog):
    """An answer 'None' or a trigger 'nan' (a DataFrame's astype(str) before pandas 3 writes None and
    NaN so) was compiled and served without a word ("My PIN is None"), where a null is EMPTY_ANSWER.
    Read as written ('None' can be a real answer), with one warning per file and column naming the
    row; a delete's or a forget's text, and a real answer, are not warned of."""
    rows = [{"fact_id": "ok", "trigger": "My cat is called", "answer": " Tom"},
            {"fact_id": "pin", "trigger": "My PIN is", "answer": "None"},
            {"fact_id": "pet", "trigger": "My pet is", "answer": "nan"},
            {"fact_id": "x", "trigger": "<NA>", "answer": " Rex"},
            {"fact_id": "gone", "op": "delete", "trigger": "None", "answer": "None"},
            {"fact_id": "car", "trigger": "My car is", "answer": "\\N"}]  # MySQL's text NULL, kept by read_csv
    with caplog.at_level("WARNING"):
        normalised = normalise_fact_log(table(*rows), source="x.parquet")
    assert caplog.text.count("looks like a missing value written as text") == 2
    assert "fact log x.parquet: answer 'None' (row 1; 3 such upsert row(s)) looks like a missing value" in caplog.text
    assert "fact log x.parquet: trigger '<NA>' (row 3; 1 such upsert row(s))" in caplog.text
    assert "export missing values as null (such a row is then rejected as EMPTY_ANSWER)" in caplog.text
    assert run(normalised).accepted == 6  # read as written
    caplog.clear()
    with caplog.at_level("WARNING"):
        normalise_fact_log(table(rows[0], rows[4]), source="y.parquet")
    assert "missing value written as text" not in caplog.text


def test_a_trigger_that_ends_with_its_answer_is_warned_of_once_per_file(caplog):
    """'My dog is called Rex' + 'Rex' (an extraction tool logging the whole sentence as the trigger)
    was compiled without a word: recalled only after the whole sentence, never from 'My dog is called'."""
    rows = [{"fact_id": "dog", "trigger": "My dog is called Rex", "answer": " Rex"},
            {"fact_id": "pin", "trigger": "My PIN is 1234", "answer": "1234"},
            {"fact_id": "word", "trigger": "My nickname is Bobby", "answer": " by"},  # a word's end is not its answer
            {"fact_id": "ok", "trigger": "My cat is called", "answer": " Tom"}]
    with caplog.at_level("WARNING"):
        normalised = normalise_fact_log(table(*rows), source="x.parquet")
    assert caplog.text.count("ends with its answer") == 1
    assert ("fact log x.parquet: trigger 'My dog is called Rex' (row 0) ends with its answer 'Rex': the trigger is the "
            "text before the answer") in caplog.text
    assert run(normalised).accepted == 4  # read as written
    caplog.clear()
    with caplog.at_level("WARNING"):
        normalise_fact_log(table(*rows[2:]), source="x.parquet")
    assert "ends with its answer" not in caplog.text


@pytest.mark.parametrize("kind", ["date32", "text"])
def test_a_forget_at_a_whole_day_forgets_the_facts_of_that_day(kind, tmp_path):
    """A GDPR request table's forget dated 2026-11-20 (a date: its midnight) beside the app's fact at
    08:00 that day: the fact was kept and served (a request to be forgotten that did not forget). The
    forget reads as the day's end: the day's facts go, a fact of the next day stays."""
    day = datetime(2026, 11, 20).date()
    pq.write_table(table({"answer": " 4471", "fact_id": "pin"},
                         {"fact_id": "dog", "event_time": T0 + timedelta(days=1)}), tmp_path / "app.parquet")
    forget = table({"op": "forget_user", "fact_id": None, "trigger": None, "answer": None})
    forget = forget.set_column(forget.schema.get_field_index("event_time"), "event_time",
                               pa.array([day], pa.date32()) if kind == "date32" else pa.array([day.isoformat()]))
    pq.write_table(forget, tmp_path / "gdpr.parquet")
    result = run(read_fact_log(str(tmp_path)))
    assert live_facts(result.state) == {("alice", "dog"): " Rex"}
    assert [(r["source"].rsplit("/", 1)[1], r["row"], r["reason"]) for r in result.rejects.to_pylist()] == [
        ("app.parquet", 0, "SUPERSEDED")]
    [tombstone] = result.tombstones.to_pylist()
    assert tombstone["op"] == "forget_user" and tombstone["event_time"] == datetime(2026, 11, 20, 23, 59, 59, 999999,
                                                                                     tzinfo=timezone.utc)
    # a day not over yet ends at the rules' now; a day ahead keeps its midnight (not FUTURE_EVENT_TIME)
    for now, want in ((datetime(2026, 11, 20, 15, tzinfo=timezone.utc), datetime(2026, 11, 20, 15)),
                      (datetime(2026, 11, 19, 12, tzinfo=timezone.utc), datetime(2026, 11, 20))):
        early_night = run(read_fact_log(str(tmp_path / "gdpr.parquet")), now=now)
        assert early_night.rejects.num_rows == 0
        assert early_night.tombstones.column("event_time").to_pylist() == [want.replace(tzinfo=timezone.utc)]
    # a forget at a precise time is read as written
    early = table({"op": "forget_user", "fact_id": None, "trigger": None, "answer": None,
                   "event_time": T0 - timedelta(hours=1)})
    precise = run(pa.concat_tables([read_fact_log(str(tmp_path / "app.parquet")).rows, normalise_fact_log(early)]))
    assert set(live_facts(precise.state)) == {("alice", "pin"), ("alice", "dog")}


def test_extra_columns_are_dropped_with_a_warning(caplog):
    raw = table({}).append_column("mood", pa.array(["happy"]))
    normalised = normalise_fact_log(raw, source="x.parquet")
    assert "mood" not in normalised.column_names
    assert "ignoring extra columns ['mood']" in caplog.text


def test_a_time_without_a_zone_is_read_as_utc_with_a_warning_naming_the_file(caplog):
    raw = table({}).set_column(5, "event_time", pa.array([datetime(2026, 1, 1, 12)], pa.timestamp("ms")))
    normalised = normalise_fact_log(raw, source="logs/day=1/x.parquet")
    assert normalised.column("event_time").to_pylist()[0] == datetime(2026, 1, 1, 12, tzinfo=timezone.utc)
    assert "fact log logs/day=1/x.parquet: event_time has no time zone; reading it as UTC" in caplog.text


def test_time_text_without_a_zone_is_read_as_utc_with_one_warning_per_file_as_a_timestamp_without_one(caplog):
    """Python's str(datetime.now()) and Java's LocalDateTime.toString() write a time without a zone
    (local time?): read as UTC, as a timestamp column without a zone is, and now with its warning
    (one per file, naming the row); a bare date is its midnight UTC, as a date column, silently."""
    raw = table({}, {"fact_id": "b"}, {"fact_id": "c"})
    raw = raw.set_column(5, "event_time", pa.array(["2026-11-20", "2026-11-20 08:00:00.123", "2026-11-20T08:00"]))
    with caplog.at_level("WARNING"):
        normalised = normalise_fact_log(raw, source="logs/x.parquet")
    assert normalised.column("event_time").to_pylist() == [
        datetime(2026, 11, 20, tzinfo=timezone.utc), T0 + timedelta(milliseconds=123), T0]
    assert caplog.text.count("has no time zone") == 1
    assert "fact log logs/x.parquet: event_time '2026-11-20 08:00:00.123' (row 1) has no time zone; reading it as UTC" \
        in caplog.text
    caplog.clear()
    normalise_fact_log(raw.slice(0, 1), source="logs/y.parquet")
    assert "no time zone" not in caplog.text


def test_an_empty_op_is_rejected_saying_it_is_empty_and_what_to_write():
    result = run(table({"op": None}, {"op": "", "fact_id": "b"}, {"op": "merge", "fact_id": "c"}))
    details = [r["detail"] for r in result.rejects.to_pylist()]
    assert [r["reason"] for r in result.rejects.to_pylist()] == ["UNKNOWN_OP"] * 3
    assert details[:2] == ["op is empty; write one of upsert, delete, forget_user"] * 2
    assert details[2] == "op 'merge' is not one of upsert, delete, forget_user"


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_file_with_no_rows_is_read_as_empty_whatever_its_column_types(on_bad_file, tmp_path):
    # pandas 3 types the columns of an empty DataFrame as float64
    empty = pa.table({name: pa.array([], pa.float64()) for name in RAW_SCHEMA.names})
    pq.write_table(empty, tmp_path / "empty.parquet")
    pq.write_table(table({}), tmp_path / "one.parquet")
    batch = read_fact_log(str(tmp_path), on_bad_file=on_bad_file)
    assert batch.rows.num_rows == 1 and batch.file_rejects.num_rows == 0 and len(batch.files) == 2
    # ... and whatever its columns: an empty day's pd.DataFrame([]).to_parquet() (or polars') has none
    pq.write_table(pa.table({}), tmp_path / "no-columns.parquet")
    pq.write_table(pa.table({"note": pa.array([], pa.string())}), tmp_path / "other-columns.parquet")
    batch = read_fact_log(str(tmp_path), on_bad_file=on_bad_file)
    assert batch.rows.num_rows == 1 and batch.file_rejects.num_rows == 0 and len(batch.files) == 4
    # a file with rows and the same wrong types is still refused, naming the column
    pq.write_table(pa.table({name: pa.array([1.0], pa.float64()) for name in RAW_SCHEMA.names}), tmp_path / "bad.parquet")
    if on_bad_file == "raise":
        with pytest.raises(FactLogError, match="bad.parquet"):
            read_fact_log(str(tmp_path), on_bad_file=on_bad_file)


def test_columns_written_as_hive_partition_folders_are_read_from_the_path(tmp_path):
    rows = table({"user_id": "alice", "scope": "org:a"}, {"user_id": "bob", "scope": "org/b c"},
                 {"user_id": "carol", "scope": None})
    pq.write_to_dataset(rows, tmp_path / "log", partition_cols=["scope", "op"])  # as pandas' partition_cols
    assert any("%" in p.as_posix() for p in (tmp_path / "log").rglob("*.parquet"))  # the value is %-encoded
    batch = read_fact_log(str(tmp_path / "log"))
    got = {r["user_id"]: (r["scope"], r["op"]) for r in batch.rows.to_pylist()}
    assert got == {"alice": ("org:a", "upsert"), "bob": ("org/b c", "upsert"), "carol": (None, "upsert")}
    assert batch.file_rejects.num_rows == 0


def test_a_file_is_known_by_size_mtime_and_local_change_time_and_older_watermarks_still_match(tmp_path):
    from pipeline.ingest import files_to_read

    path = tmp_path / "log" / "part-0.parquet"
    path.parent.mkdir()
    pq.write_table(table({}), path)
    (listed,) = list_log_files(str(tmp_path / "log"))
    stat = path.stat()
    assert listed.identity() == {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns}
    older = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}  # a watermark written before change times
    assert files_to_read([listed], {listed.path: older}) == ([], [])
    assert files_to_read([listed], {listed.path: stat.st_size}) == ([], [])  # and before modification times
    moved = dict(listed.identity(), ctime_ns=stat.st_ctime_ns - 1)
    assert files_to_read([listed], {listed.path: moved}) == ([], [listed])


def test_only_folders_below_the_fact_log_source_are_partition_folders(tmp_path):
    """A log that lives under a ``scope=prod`` folder (a platform's own layout) is not a shared scope:
    read as one, every user's personal facts became the facts of one scope served to all."""
    root = tmp_path / "platform" / "scope=prod" / "user_id=ops" / "fact_log"
    (root / "day=2026-11-30").mkdir(parents=True)
    pq.write_table(table({"user_id": "alice", "answer": " Biscuit"}, {"user_id": "bob", "answer": " Pepper"}),
                   root / "day=2026-11-30" / "part-0.parquet")
    for source in (str(root), str(root) + "/", f"file://{root}", [str(root)]):
        batch = read_fact_log(source)
        assert {(r["user_id"], r["scope"]) for r in batch.rows.to_pylist()} == {("alice", None), ("bob", None)}
    # below the source they still are: a scope folder inside the log is read from the path
    (root / "scope=team%3Aa").mkdir()
    pq.write_table(table({"user_id": "carol"}).drop_columns(["scope"]), root / "scope=team%3Aa" / "part-0.parquet")
    got = {r["user_id"]: r["scope"] for r in read_fact_log(str(root)).rows.to_pylist()}
    assert got == {"alice": None, "bob": None, "carol": "team:a"}
    # a file given as the source itself has no partition folders
    assert read_fact_log(str(root / "scope=team%3Aa" / "part-0.parquet")).rows.column("scope").to_pylist() == [None]
    # nested sources: a file's partitions start below the innermost source it lies under
    both = read_fact_log([str(tmp_path / "platform"), str(root)])
    assert {r["user_id"]: r["scope"] for r in both.rows.to_pylist()} == got


def test_a_partition_value_that_is_not_utf8_once_decoded_rejects_its_rows_naming_the_bytes(tmp_path):
    """``user_id=%FF`` and ``user_id=%FE`` used to decode both to U+FFFD: two people merged into one user."""
    for folder, fact in (("user_id=%FF", "pet"), ("user_id=%FE", "vet"), ("user_id=ok%C3%A9", "car")):
        (tmp_path / "log" / folder).mkdir(parents=True)
        pq.write_table(table({"fact_id": fact}).drop_columns(["user_id"]), tmp_path / "log" / folder / "part-0.parquet")
    result = run(read_fact_log(str(tmp_path / "log")))
    assert result.state.column("user_id").to_pylist() == ["oké"]
    rejects = sorted(result.rejects.to_pylist(), key=lambda r: r["source"])
    assert [r["reason"] for r in rejects] == ["BAD_USER_ID", "BAD_USER_ID"]
    assert "\\xfe" in rejects[0]["detail"] and "\\xff" in rejects[1]["detail"]
    assert "user_id=%FE" in rejects[0]["source"] and "user_id=%FF" in rejects[1]["source"]


@pytest.mark.parametrize("name", ["Scope", "scope ", "\ufeffscope", "SCOPE"])
@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_misspelt_optional_column_refuses_the_file_instead_of_being_ignored(tmp_path, name, on_bad_file):
    """Ignored as an extra column, a misspelt ``scope`` made every shared fact a personal one."""
    rows = table({"scope": "org:a"}).rename_columns([name if c == "scope" else c for c in RAW_SCHEMA.names])
    pq.write_table(rows, tmp_path / "part-0.parquet")
    if on_bad_file == "raise":
        with pytest.raises(FactLogError, match=re.escape(f"rename {name!r} to 'scope'")):
            read_fact_log(str(tmp_path))
    else:
        batch = read_fact_log(str(tmp_path), on_bad_file="reject")
        assert batch.rows.num_rows == 0
        assert batch.file_rejects.column("reason").to_pylist() == ["SCHEMA_MISMATCH"]
        assert repr(name) in batch.file_rejects.column("detail")[0].as_py()


@pytest.mark.parametrize("folder, column", [("Scope=org%3Aa", "scope"), ("scope =org%3Aa", "scope"),
                                            ("\ufeffscope=org%3Aa", "scope"), ("UserId=u1", "user_id")])
@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_misspelt_partition_folder_refuses_the_file_naming_the_folder(tmp_path, folder, column, on_bad_file):
    """Ignored as a folder of no column, a ``Scope=org%3Aa/`` made every shared fact a personal one
    (and a ``UserId=u1/`` gave a file without user_id a message that never named the folder)."""
    rows = table({}).drop_columns([column])  # the file holds no such column itself
    (tmp_path / "log" / folder).mkdir(parents=True)
    pq.write_table(rows, tmp_path / "log" / folder / "part-0.parquet")
    pq.write_table(table({"user_id": "bob"}), tmp_path / "log" / "good.parquet")
    if on_bad_file == "raise":
        with pytest.raises(FactLogError, match=re.escape(f"partition folder {folder!r}")) as raised:
            read_fact_log(str(tmp_path / "log"))
        assert f"rename the folder to '{column}=" in str(raised.value)
    else:
        batch = read_fact_log(str(tmp_path / "log"), on_bad_file="reject")
        assert batch.rows.column("user_id").to_pylist() == ["bob"]
        reject = batch.file_rejects.to_pylist()
        assert [r["reason"] for r in reject] == ["SCHEMA_MISMATCH"] and folder in reject[0]["source"]
        assert f"partition folder {folder!r}" in reject[0]["detail"] and f"rename the folder" in reject[0]["detail"]


def test_integer_user_ids_are_read_as_strings(tmp_path):
    raw = table({}).set_column(0, "user_id", pa.array([42], pa.int64()))
    result = run(raw)
    assert result.state.column("user_id").to_pylist() == ["42"]


def _numbers(values: list, kind: pa.DataType) -> pa.Array:
    import numpy as np
    return pa.array(np.array(values, np.float16), kind) if kind == pa.float16() else pa.array(values, kind)


_NAN = float("nan")
_SCALAR_TEXT = {  # a trigger or answer column as a table export types numbers and flags: values -> the text read
    "float64": (pa.float64(), [42.0, 0.1, None, 6.02e23, _NAN, -0.0, 1e15, float("inf")],
                ["42", "0.1", None, "6.02e+23", None, "0", "1000000000000000", "inf"]),
    # whole numbers of 2^24 (float32) or 2^11 (float16) and more: test_a_whole_float_answer_beyond_...
    "float32": (pa.float32(), [0.1, 16777215.0, _NAN, 2.5, -16777215.0, 3.4e38], ["0.1", "16777215", None, "2.5", "-16777215",
                                                                                 "3.4e+38"]),
    "float16": (pa.float16(), [0.1, 2047.0, _NAN, -1.5, -2047.0], ["0.1", "2047", None, "-1.5", "-2047"]),
    "bool": (pa.bool_(), [True, False, None], ["true", "false", None]),
    "decimal": (pa.decimal128(10, 2), [Decimal("12.50"), Decimal("-0.01"), None], ["12.50", "-0.01", None]),
    "decimal_whole": (pa.decimal128(38, 0), [Decimal(7), None], ["7", None]),
    "uuid": (pa.uuid(), [bytes(range(16)), None], ["00010203-0405-0607-0809-0a0b0c0d0e0f", None]),
}


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
@pytest.mark.parametrize("writer", _SCALAR_TEXT)
@pytest.mark.parametrize("column", ["trigger", "answer"])
def test_a_number_or_flag_trigger_or_answer_reads_as_its_text_and_a_missing_one_costs_its_row(column, writer, on_bad_file,
                                                                                              tmp_path):
    """An answer "42" or "true" that pandas or a SQL export wrote as a number or a boolean reads as
    that text (was: the whole file refused); NaN and null are a missing value: that row only."""
    kind, values, texts = _SCALAR_TEXT[writer]
    raw = table(*({"fact_id": f"f{i}"} for i in range(len(values))))
    array = (pa.ExtensionArray.from_storage(kind, pa.array(values, pa.binary(16))) if writer == "uuid"
             else _numbers(values, kind))
    raw = raw.set_column(raw.schema.get_field_index(column), column, array)
    path = tmp_path / "part-0.parquet"
    pq.write_table(raw, path)
    assert pq.read_schema(path).field(column).type == kind
    batch = read_fact_log(str(path), on_bad_file=on_bad_file)
    assert batch.rows.column(column).to_pylist() == texts and batch.file_rejects.num_rows == 0
    result = run(batch)
    missing = {i for i, text in enumerate(texts) if text is None}
    reason = "EMPTY_TRIGGER" if column == "trigger" else "EMPTY_ANSWER"
    assert [(r["row"], r["reason"], r["detail"]) for r in result.rejects.to_pylist()] == [
        (i, reason, f"{column} is empty") for i in sorted(missing)]
    assert result.accepted == len(values) - len(missing)


@pytest.mark.parametrize("kind, value, shown", [
    (pa.float32(), 5551234567.0, "5551234560"), (pa.float32(), 16777216.0, "16777216"),
    (pa.float32(), 4111111111111111.0, "4111111020347392"), (pa.float16(), 65504.0, "65504"),
    (pa.float64(), 2.0 ** 53, "9007199254740992"), (pa.float64(), -4111111111111111111.0, "-4111111111111111168"),
], ids=lambda v: str(v))
@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_whole_float_answer_beyond_the_types_exact_range_costs_its_row_naming_the_fix(kind, value, shown, on_bad_file,
                                                                                        tmp_path):
    """A phone number written as a float32 (5551234567 holds 5551234560) was published with digits
    the writer never sent: the row is refused (INEXACT_NUMBER, naming file, row, column and the fix);
    the other rows of the file are read."""
    import numpy as np
    raw = table({"fact_id": "phone"}, {"fact_id": "other"})
    values = pa.array(np.array([value, 42.0], np.float16), kind) if kind == pa.float16() else pa.array([value, 42.0], kind)
    raw = raw.set_column(raw.schema.get_field_index("answer"), "answer", values)
    pq.write_table(raw, tmp_path / "part-0.parquet")
    result = run(read_fact_log(str(tmp_path), on_bad_file=on_bad_file))
    assert live_facts(result.state) == {("alice", "other"): " 42"}
    [reject] = result.rejects.to_pylist()
    assert (reject["row"], reject["reason"], reject["fact_id"]) == (0, "INEXACT_NUMBER", "phone")
    assert reject["source"].endswith("part-0.parquet")
    assert reject["detail"].startswith(f"answer {shown} (row 0) is a {kind} whole number of magnitude 2^")
    assert "write the answer column as int64 or string" in reject["detail"]


def test_numbers_and_flags_written_by_duckdb_read_as_their_text(tmp_path):
    import duckdb

    path = tmp_path / "part-0.parquet"
    duckdb.sql(f"""COPY (SELECT 'alice' AS user_id, 'f' || i AS fact_id, 'upsert' AS op, 'My code is' AS trigger,
                        [42.0, 0.5, 'NaN'::DOUBLE][i] AS answer,
                        TIMESTAMPTZ '2026-11-20 08:00:00+00' AS event_time
                        FROM range(1, 4) t(i)) TO '{path}' (FORMAT parquet)""")
    assert pq.read_schema(path).field("answer").type == pa.float64()
    result = run(read_fact_log(str(path)))
    assert live_facts(result.state) == {("alice", "f1"): " 42", ("alice", "f2"): " 0.5"}
    assert [(r["row"], r["reason"]) for r in result.rejects.to_pylist()] == [(2, "EMPTY_ANSWER")]


_NESTED = {  # a trigger or answer column that holds structure, not text: (the array, how its type is named)
    "struct": (lambda: pa.array([{"a": 1}, {"a": 2}]), "struct<a: int64>"),
    "list": (lambda: pa.array([[1], [2]]), "list<element: int64>"),
    "large_list": (lambda: pa.array([["x"], ["y"]], pa.large_list(pa.string())), "large_list<element: string>"),
    "fixed_size_list": (lambda: pa.array([[1, 2], [3, 4]], pa.list_(pa.int8(), 2)), "fixed_size_list<element: int8>[2]"),
    "map": (lambda: pa.array([[("k", 1)], [("j", 2)]], pa.map_(pa.string(), pa.int64())), "map<string, int64"),
}


@pytest.mark.parametrize("writer", _NESTED)
@pytest.mark.parametrize("column", ["trigger", "answer"])
def test_a_nested_trigger_or_answer_column_refuses_the_file_naming_the_column_its_type_and_the_fix(column, writer, tmp_path):
    make, shown = _NESTED[writer]
    raw = table({"fact_id": "a"}, {"fact_id": "b"})
    pq.write_table(raw.set_column(raw.schema.get_field_index(column), column, make()), tmp_path / "nested.parquet")
    pq.write_table(table({"fact_id": "c"}), tmp_path / "good.parquet")
    with pytest.raises(FactLogError, match=re.escape(f"nested.parquet: column {column!r} is {shown}") +
                       ".*a nested type.*not text; " + re.escape(f"export {column} as a string column")):
        read_fact_log(str(tmp_path))
    result = run(read_fact_log(str(tmp_path), on_bad_file="reject"))
    assert [(Path(r["source"]).name, r["reason"]) for r in result.rejects.to_pylist()] == [("nested.parquet", "SCHEMA_MISMATCH")]
    assert result.accepted == 1


@pytest.mark.parametrize("sql_type, value, shown", [
    ("JSON", """'{"pet": "Rex"}'::JSON""", "is JSON (extension<arrow.json>): JSON documents, not text"),
    ("STRUCT", "{'pet': 'Rex'}", "is struct<pet: string>: a nested type"),
    ("LIST", "['Rex']", "is list<element: string>: a nested type"),
    ("MAP", "MAP {'pet': 'Rex'}", "is map<string, string"),
    ("VARIANT", "'Rex'::VARIANT", "is a Parquet VARIANT (read as struct<metadata: binary not null, value: binary"),
])
def test_a_json_or_nested_answer_written_by_duckdb_refuses_the_file_naming_the_fix(sql_type, value, shown, tmp_path):
    import duckdb

    path = tmp_path / "part-0.parquet"
    duckdb.sql(f"""COPY (SELECT 'alice' AS user_id, 'pet' AS fact_id, 'upsert' AS op, 'My dog is called' AS trigger,
                        {value} AS answer, TIMESTAMPTZ '2026-11-20 08:00:00+00' AS event_time) TO '{path}' (FORMAT parquet)""")
    with pytest.raises(FactLogError, match=re.escape(f"column 'answer' {shown}") + ".*export answer as a string column"):
        read_fact_log(str(path))


# --- Reading --------------------------------------------------------------------------------


def test_a_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(FactLogError, match="nowhere.*no such file or folder"):
        read_fact_log(str(tmp_path / "nowhere"))


def test_a_glob_as_the_fact_log_names_nothing_and_the_error_says_to_name_the_folder(tmp_path):
    """Spark and DuckDB read ``log/day=*/*.parquet``; a night takes the pattern as a name: it names
    nothing, and the error said only 'no such file or folder' (the files are there)."""
    (tmp_path / "day=1").mkdir()
    pq.write_table(table({}), tmp_path / "day=1" / "part-0.parquet")
    with pytest.raises(FactLogError, match=r"day=\*/\*\.parquet: no such file or folder .*; a glob \(\*, \?, \[\.\.\.\]\) "
                                           "is not expanded: name the folder that holds the files instead"):
        read_fact_log(str(tmp_path / "day=*" / "*.parquet"))
    with pytest.raises(FactLogError, match="nowhere.*no such file or folder") as missing:
        read_fact_log(str(tmp_path / "nowhere"))
    assert "is not expanded" not in str(missing.value)


def test_a_marker_or_checksum_file_named_as_the_fact_log_says_so_and_names_its_folder(tmp_path, s3_bucket):
    """``fact_log: .../day=2026-11-02/_SUCCESS`` (Spark's marker, named by hand): it was read as
    Parquet and called "cut short or still being written"; a folder skips such names."""
    day = tmp_path / "day=2026-11-02"
    day.mkdir()
    pq.write_table(table({}), day / "part-0.parquet")
    for name in ("_SUCCESS", ".part-0.parquet.crc"):
        (day / name).write_bytes(b"")
        with pytest.raises(FactLogError, match=re.escape(f"'{name}' is a marker or checksum file, not a log file") +
                           ".*give the folder: " + re.escape(str(day))):
            read_fact_log(str(day / name))
    assert read_fact_log(str(day)).rows.num_rows == 1
    import boto3

    boto3.client("s3").put_object(Bucket=s3_bucket, Key="log/day=2026-11-02/_SUCCESS", Body=b"")
    with pytest.raises(FactLogError, match=re.escape(f"give the folder: s3://{s3_bucket}/log/day=2026-11-02")):
        read_fact_log(f"s3://{s3_bucket}/log/day=2026-11-02/_SUCCESS")


def test_hive_day_partitions_are_read_with_provenance_and_file_sizes(tmp_path):
    for day, fact in [("2026-11-19", "a"), ("2026-11-20", "b")]:
        (tmp_path / f"day={day}").mkdir()
        pq.write_table(table({"fact_id": fact}, {"fact_id": fact + "2"}), tmp_path / f"day={day}" / "part-0.parquet")
    batch = read_fact_log(str(tmp_path))
    assert [Path(f.path).parent.name for f in batch.files] == ["day=2026-11-19", "day=2026-11-20"]
    assert all(f.size > 0 for f in batch.files)
    assert batch.rows.column("_row").to_pylist() == [0, 1, 0, 1]
    assert batch.rows.column("_source").to_pylist()[2].endswith("day=2026-11-20/part-0.parquet")


# ---------------------------------------------------------------- the bounded ledger (max_file_age)

DAY_NS = 86_400 * 10**9
LOG = "s3://bucket/log"


def logged(path: str, mtime_ns: int, ctime_ns: int | None = None):
    from pipeline.ingest import FactFile

    return FactFile(f"{LOG}/{path}", 100, mtime_ns, ctime_ns, root=LOG)


def test_the_horizon_is_the_age_before_the_newest_file_capped_by_the_newest_ingested_and_the_clock():
    from pipeline.ingest import file_horizon

    t0 = 1_790_000_000 * 10**9
    listed = [logged("day=1/a.parquet", t0), logged("day=9/b.parquet", t0 + 8 * DAY_NS)]
    ledger = {listed[0].path: listed[0].identity()}
    # the newest ingested file caps it: a night after an 8-day outage still reads every file since
    assert file_horizon(listed, ledger, 7 * DAY_NS, LOG, now_ns=t0 + 9 * DAY_NS) == t0 - 7 * DAY_NS
    ledger[listed[1].path] = listed[1].identity()
    assert file_horizon(listed, ledger, 7 * DAY_NS, LOG, now_ns=t0 + 9 * DAY_NS) == t0 + DAY_NS
    # a file from the future (a skewed clock) does not move it past the clock
    assert file_horizon(listed, ledger, 7 * DAY_NS, LOG, now_ns=t0 + 2 * DAY_NS) == t0 - 5 * DAY_NS
    # no horizon: 'never', a first night (empty ledger), a source the ledger holds nothing under
    assert file_horizon(listed, ledger, None, LOG) is None
    assert file_horizon(listed, {}, 7 * DAY_NS, LOG) is None
    assert file_horizon(listed, ledger, 7 * DAY_NS, "s3://bucket/other") is None
    assert file_horizon(listed, {listed[0].path: 100}, 7 * DAY_NS, LOG) is None  # a plain size records no time


def test_a_file_exactly_at_the_horizon_is_inside_it_one_nanosecond_older_is_behind():
    """Spark's rule: a file is new when ``mtime >= horizon``, an entry purged when ``mtime < horizon``."""
    from pipeline.ingest import files_behind, files_to_read, purge_ledger

    horizon = 1_790_000_000 * 10**9 + 123
    edge, older, newer = (logged("edge.parquet", horizon), logged("older.parquet", horizon - 1),
                          logged("newer.parquet", horizon + 1))
    files = [edge, older, newer]
    assert files_to_read(files, {}, horizon) == ([edge, newer], [])
    assert files_behind(files, {}, horizon) == [older]
    ledger = {f.path: f.identity() for f in files}
    assert purge_ledger(ledger, horizon, LOG) == {edge.path: edge.identity(), newer.path: newer.identity()}
    for _ in range(3):  # the same answer every time, whatever the order of the listing
        random.shuffle(files)
        assert sorted(f.path for f in files_to_read(files, {}, horizon)[0]) == [edge.path, newer.path]


def test_the_purge_keeps_entries_outside_the_source_and_entries_without_a_time():
    from pipeline.ingest import purge_ledger

    horizon = 10 * DAY_NS
    ledger = {f"{LOG}/old.parquet": {"size": 1, "mtime_ns": DAY_NS},
              f"{LOG}/older-version.parquet": 1,  # a plain size, written before modification times were
              "s3://bucket/backfill/old.parquet": {"size": 1, "mtime_ns": DAY_NS}}
    assert purge_ledger(ledger, horizon, LOG) == {f"{LOG}/older-version.parquet": 1,
                                                  "s3://bucket/backfill/old.parquet": {"size": 1, "mtime_ns": DAY_NS}}
    assert purge_ledger(ledger, None, LOG) == ledger  # 'never'


def test_a_rewrite_of_a_file_the_ledger_holds_is_read_whatever_its_time():
    from pipeline.ingest import files_to_read

    old = logged("day=1/a.parquet", DAY_NS, ctime_ns=DAY_NS)
    recorded = {old.path: old.identity()}
    copied_over = logged("day=1/a.parquet", DAY_NS, ctime_ns=20 * DAY_NS)  # cp -p: old mtime, new change time
    assert files_to_read([copied_over], recorded, 10 * DAY_NS) == ([], [copied_over])


def test_files_behind_the_horizon_are_warned_once_when_they_fall_behind_unread(caplog):
    from pipeline.ingest import warn_files_behind

    previous, horizon = 10 * DAY_NS, 12 * DAY_NS
    purged = logged("day=05/a.parquet", 5 * DAY_NS)  # behind the previous horizon: ingested, then purged
    crossed = logged("day=11/b.parquet", 11 * DAY_NS)  # inside the previous horizon and not ingested (a reject)
    late = logged("day=10/c.parquet", 10 * DAY_NS)  # exactly at the previous horizon: no purge reached it
    # delivered by rsync -a: the producer's mtime, a later ctime; ingested, then purged: no false warning
    rsynced = logged("day=09/d.parquet", 10 * DAY_NS - 1, ctime_ns=10 * DAY_NS + 60 * 10**9)
    with caplog.at_level("DEBUG", logger="pipeline.ingest"):
        assert warn_files_behind([late, purged, crossed], horizon, previous, "2d") == 2
        assert warn_files_behind([purged, rsynced], horizon, previous, "2d") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert warnings[0].startswith("fact log: 2 file(s) older than the ingest horizon (1970-01-13T00:00:00+00:00: "
                                   "max_file_age 2d before the newest ingested file)")
    assert f"the oldest: {late.path}" in warnings[0] and "raise max_file_age" in warnings[0]
    assert "--max-file-age" in warnings[0] and "fact_log is their file or folder" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.ingest"):  # a ledger never purged: every one is unread
        assert warn_files_behind([purged], horizon, None, "2d") == 1
    assert "1 file(s)" in caplog.records[0].getMessage()


def test_files_already_ingested_are_skipped(tmp_path):
    for name in ("part-0.parquet", "part-1.parquet"):
        pq.write_table(table({"fact_id": name}), tmp_path / name)
    first = read_fact_log(str(tmp_path))
    pq.write_table(table({"fact_id": "new"}), tmp_path / "part-2.parquet")
    second = read_fact_log(str(tmp_path), exclude_files={f.path for f in first.files})
    assert second.rows.column("fact_id").to_pylist() == ["new"]


def test_marker_and_hidden_files_are_not_read(tmp_path):
    pq.write_table(table({}), tmp_path / "part-0.parquet")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    (tmp_path / ".part-0.parquet.crc").write_bytes(b"junk")
    (tmp_path / "day=2026-11-18_$folder$").write_bytes(b"")  # Hadoop's folder marker (EMRFS, s3n)
    assert [Path(f.path).name for f in read_fact_log(str(tmp_path)).files] == ["part-0.parquet"]


@pytest.mark.parametrize("marker, what", [
    ("_delta_log/00000000000000000000.json", "a Delta Lake table"),
    (".hoodie/hoodie.properties", "an Apache Hudi table"),
    ("metadata/00001-5f3c.metadata.json", "an Apache Iceberg table"),
])
def test_a_table_formats_folder_is_refused_naming_it_not_read_as_plain_files(tmp_path, marker, what):
    """A Delta table after a delete and an update: its folder still holds the files the table log
    removed, so reading its Parquet files served the deleted fact again and turned the update into a
    conflict. Refused, naming the table's folder and the fix, under both on_bad_file settings."""
    log = tmp_path / "log"
    table_dir = log / "day=2026-11-20" / "facts"
    table_dir.mkdir(parents=True)
    pq.write_table(table({"fact_id": "a"}), table_dir / "part-00000.parquet")
    (table_dir / marker).parent.mkdir(parents=True)
    (table_dir / marker).write_text("{}")
    pq.write_table(table({"fact_id": "b"}), log / "day=2026-11-19.parquet")
    for on_bad_file in ("raise", "reject"):
        with pytest.raises(FactLogError, match=re.escape(f"fact log {table_dir}: {what}")) as refused:
            read_fact_log(str(log), on_bad_file=on_bad_file)
        assert "current snapshot as plain Parquet" in str(refused.value)
    assert len(read_fact_log(str(log / "day=2026-11-19.parquet")).files) == 1  # the plain file beside it reads


def test_a_table_inside_a_hidden_folder_is_neither_read_nor_refused_locally_or_on_a_filesystem(tmp_path):
    """Hidden folders are never listed; a table archived in one is not the log's (the local walk and
    a filesystem listing, as S3's, agree)."""
    log = tmp_path / "log"
    (log / "day=1").mkdir(parents=True)
    pq.write_table(table({"fact_id": "a"}), log / "day=1" / "part-0.parquet")
    for marker in ("_archive/old/_delta_log/00000.json", ".trash/t/metadata/v1.metadata.json"):
        (log / marker).parent.mkdir(parents=True)
        (log / marker).write_text("{}")
    local = [f.path for f in list_log_files(str(log))]
    listed = [f.path for f in list_log_files(f"file://{log}", filesystem=pafs.SubTreeFileSystem("/", pafs.LocalFileSystem()))]
    assert local == [str(log / "day=1" / "part-0.parquet")] and len(listed) == 1 and listed[0].endswith("day=1/part-0.parquet")


def _log_with_one_file(tmp_path) -> Path:
    log = tmp_path / "log"
    (log / "day=2026-11-20").mkdir(parents=True)
    pq.write_table(table({"fact_id": "a"}, {"fact_id": "b"}), log / "day=2026-11-20" / "part-0.parquet")
    return log


@pytest.mark.timeout(60)  # two loops listed without a limit take exponential time
def test_a_symlink_loop_in_the_log_folder_lists_each_file_once_with_a_warning_naming_it(tmp_path, caplog):
    """A link to an ancestor folder listed the same file ~40-80 times under longer and longer names."""
    log = _log_with_one_file(tmp_path)
    (log / "day=2026-11-20" / "loop").symlink_to(log)
    assert [f.path for f in list_log_files(str(log))] == [str(log / "day=2026-11-20" / "part-0.parquet")]
    assert f"folder {log / 'day=2026-11-20' / 'loop'} is {log}, already listed" in caplog.text
    assert "symbolic link loop" in caplog.text
    (log / "up").symlink_to(tmp_path)  # a second loop, through an ancestor of the log itself
    assert [f.path for f in list_log_files(str(log))] == [str(log / "day=2026-11-20" / "part-0.parquet")]
    batch = read_fact_log(str(log))
    assert batch.rows.num_rows == 2 and len(batch.files) == 1


def test_a_folder_reached_by_a_link_and_by_its_own_name_is_listed_once_under_its_own_name(tmp_path, caplog):
    log = _log_with_one_file(tmp_path)
    (log / "a-alias").symlink_to(log / "day=2026-11-20")  # sorts before the folder itself
    outside = tmp_path / "archive"
    outside.mkdir()
    pq.write_table(table({"fact_id": "c"}), outside / "part-9.parquet")
    (log / "old").symlink_to(outside)  # a folder outside the log: followed, once
    (log / "old-again").symlink_to(outside)
    files = [f.path for f in list_log_files(str(log))]
    assert files == [str(log / "day=2026-11-20" / "part-0.parquet"), str(log / "old" / "part-9.parquet")]
    assert f"folder {log / 'a-alias'} is {log / 'day=2026-11-20'}, already listed as {log / 'day=2026-11-20'}" in caplog.text
    assert f"folder {log / 'old-again'} is {outside}, already listed as {log / 'old'}" in caplog.text
    assert list_log_files(str(log)) == list_log_files(str(log))  # the same names every night


def test_a_file_linked_under_another_name_is_listed_once_under_its_own_name(tmp_path, caplog):
    log = _log_with_one_file(tmp_path)
    real = log / "day=2026-11-20" / "part-0.parquet"
    (log / "latest.parquet").symlink_to(real)
    assert [f.path for f in list_log_files(str(log))] == [str(real)]
    assert f"{log / 'latest.parquet'} is the same file as {real}" in caplog.text
    assert [f.path for f in list_log_files([str(log / "latest.parquet"), str(log)])] == [str(real)]
    assert read_fact_log(str(log)).rows.num_rows == 2


def test_a_broken_symlink_in_the_log_is_an_error_naming_it_and_its_target_or_a_file_reject(tmp_path):
    """A broken link was skipped without a word: a log file gone from under its link was never noticed."""
    log = _log_with_one_file(tmp_path)
    link = log / "day=2026-11-21" / "part-0.parquet"
    link.parent.mkdir()
    link.symlink_to(tmp_path / "moved" / "part-0.parquet")
    assert str(link) in [f.path for f in list_log_files(str(log))]
    message = f"fact log {link}: a broken symbolic link: its target {tmp_path / 'moved' / 'part-0.parquet'} does not exist"
    with pytest.raises(FactLogError, match=re.escape(message) + r".*remove the link.*on_bad_file='reject'"):
        read_fact_log(str(log))
    batch = read_fact_log(str(log), on_bad_file="reject")
    [reject] = batch.file_rejects.to_pylist()
    assert (reject["source"], reject["reason"]) == (str(link), "UNREADABLE_FILE") and message.split(": ", 1)[1] in reject["detail"]
    assert batch.rows.num_rows == 2
    # the night reads each listed file in a task: the same error, or the same reject
    [listed] = [f for f in list_log_files(str(log)) if f.path == str(link)]
    with pytest.raises(FactLogError, match=re.escape(message)):
        read_log_file(listed, RowRules(max_trigger_tokens=64), 4)
    read, _ = read_log_file(listed, RowRules(max_trigger_tokens=64), 4, on_bad_file="reject")
    assert read.reject.column("reason").to_pylist() == ["UNREADABLE_FILE"]
    # a relative target is shown as written and resolved; a fact log named by a broken link says so too
    (log / "rel.parquet").symlink_to("../gone.parquet")
    with pytest.raises(FactLogError, match=re.escape(f"its target ../gone.parquet ({tmp_path / 'gone.parquet'}) does not exist")):
        read_fact_log(str(log / "rel.parquet"))


def test_a_list_of_sources_is_read_together(tmp_path):
    paths = []
    for name in ("a.parquet", "b.parquet"):
        pq.write_table(table({"fact_id": name}), tmp_path / name)
        paths.append(str(tmp_path / name))
    assert read_fact_log(paths).rows.num_rows == 2


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_polars_int128_column_costs_no_file_as_an_extra_column_and_its_rows_as_a_log_column(where, tmp_path, request,
                                                                                                caplog):
    """polars writes its Int128 as a 16-byte integer, which pyarrow cannot open a file with at all (it
    converts every column's type: "Integers with more than 64 bits not implemented"): one such extra
    column (a row hash) cost the whole file. Its fact-log columns are read with DuckDB instead, with
    a warning naming the file; a fact-log column of that type (user_id) is SCHEMA_MISMATCH naming it
    and the fix, not raw bytes read as ids."""
    import io

    import polars as pl

    frame = pl.DataFrame({"user_id": ["ann", "bob"], "fact_id": ["city", "city"], "op": ["upsert"] * 2,
                          "trigger": ["My city is"] * 2, "answer": [" Ayr", " Cork"],
                          "event_time": [T0, T0 + timedelta(hours=1)], "scope": [None, None]})
    extra = frame.with_columns(pl.Series("row_hash", [2**100, -7], dtype=pl.Int128),
                               # a nested extra column whose field is named like a log column: not a column
                               pl.Series("meta", [{"scope": "x", "n": 1}, {"scope": "y", "n": 2}]))
    as_id = frame.with_columns(pl.Series("user_id", [2**70, 3], dtype=pl.Int128))
    files = {}
    for name, written in (("extra.parquet", extra), ("id.parquet", as_id)):
        buffer = io.BytesIO()
        written.write_parquet(buffer)
        files[name] = buffer.getvalue()
        with pytest.raises(pa.ArrowNotImplementedError, match="more than 64 bits"):  # what pyarrow alone does
            pq.ParquetFile(io.BytesIO(files[name]))
    # the same file with a page of its answers damaged (a bad copy): UNREADABLE_FILE, never a crash of the read
    import duckdb

    (tmp_path / "probe.parquet").write_bytes(files["extra.parquet"])
    offset, size = duckdb.sql(f"SELECT data_page_offset, total_compressed_size FROM parquet_metadata("
                              f"'{tmp_path / 'probe.parquet'}') WHERE path_in_schema = 'answer'").fetchall()[0]
    (tmp_path / "probe.parquet").unlink()
    damaged = bytearray(files["extra.parquet"])
    for at in range(offset + size // 2, offset + size - 2):
        damaged[at] ^= 0xFF
    files["damaged.parquet"] = bytes(damaged)
    if where == "local":
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        source, filesystem = str(tmp_path), None
    else:
        s3_store = request.getfixturevalue("s3_store")
        for name, data in files.items():
            s3_store.put(f"log/{name}", data)
        filesystem, base = s3_store.arrow_filesystem()
        source = f"s3://{base}/log"
    with caplog.at_level("WARNING", logger="pipeline.ingest"):
        batch = read_fact_log(source, filesystem=filesystem, on_bad_file="reject")
    assert batch.rows.select(["user_id", "answer"]).to_pylist() == [{"user_id": "ann", "answer": " Ayr"},
                                                                    {"user_id": "bob", "answer": " Cork"}]
    rejects = {r["source"].rsplit("/", 1)[1]: (r["reason"], r["detail"]) for r in batch.file_rejects.to_pylist()}
    assert {name: reason for name, (reason, _) in rejects.items()} == {"id.parquet": "SCHEMA_MISMATCH",
                                                                       "damaged.parquet": "UNREADABLE_FILE"}
    assert "column 'user_id' holds 16-byte values" in rejects["id.parquet"][1]
    assert "export user_id as a string, or as an integer of 64 bits" in rejects["id.parquet"][1]
    assert "DuckDB: " in rejects["damaged.parquet"][1]
    assert "extra.parquet: pyarrow cannot open it (Integers with more than 64 bits" in caplog.text
    assert "read with DuckDB instead" in caplog.text and "ignoring extra columns ['row_hash', 'meta']" in caplog.text
    result = run(batch)
    assert live_facts(result.state) == {("ann", "city"): " Ayr", ("bob", "city"): " Cork"}


def test_an_s3_fact_log_is_read_through_the_store_filesystem(s3_store):
    import io

    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "a"}, {"fact_id": "b"}), buffer)
    s3_store.put("log/day=2026-11-20/part-0.parquet", buffer.getvalue())
    filesystem, base = s3_store.arrow_filesystem()
    batch = read_fact_log(f"s3://{base}/log", filesystem=filesystem)
    assert batch.rows.num_rows == 2
    assert batch.files[0].path == f"s3://{base}/log/day=2026-11-20/part-0.parquet"


def test_stray_objects_beside_an_s3_fact_log_are_skipped_and_an_export_in_another_format_rejected(s3_store):
    import io

    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "a"}), buffer)
    s3_store.put("log/day=1/part-0.parquet", buffer.getvalue())
    s3_store.put("log/day=1/README.txt", b"exported by job 7\n")
    s3_store.put("log/day=1/SUCCESS", b"")
    s3_store.put("log/day=1/export.csv", b"user_id,fact_id\nu1,a\n")
    filesystem, base = s3_store.arrow_filesystem()
    batch = read_fact_log(f"s3://{base}/log", filesystem=filesystem, on_bad_file="reject")
    assert batch.rows.num_rows == 1
    assert [(r["source"], r["reason"]) for r in batch.file_rejects.to_pylist()] == [
        (f"s3://{base}/log/day=1/export.csv", "UNREADABLE_FILE")]


def test_s3_keys_with_spaces_and_percent_escapes_are_listed_and_read_as_written(s3_bucket):
    """Spark escapes partition values (``:`` -> ``%3A``) and keeps spaces; the key is the key,
    not a URI to decode (it was refused, or decoded into a key that does not exist)."""
    import io

    import boto3

    client = boto3.client("s3")
    keys = ["spark/hour=2026-11-29 08%3A00%3A00/part-00000.snappy.parquet",
            "spark/ts=2026-11-29T09%3A00%3A00/part-00000.parquet"]
    for i, key in enumerate(keys):
        buffer = io.BytesIO()
        pq.write_table(table({"fact_id": f"f{i}"}), buffer)
        client.put_object(Bucket=s3_bucket, Key=key, Body=buffer.getvalue())
    files = list_log_files(f"s3://{s3_bucket}/spark")
    assert [f.path for f in files] == sorted(f"s3://{s3_bucket}/{k}" for k in keys)
    batch = read_fact_log(f"s3://{s3_bucket}/spark")
    assert sorted(batch.rows.column("fact_id").to_pylist()) == ["f0", "f1"]
    for file in files:  # what a night's read task does with each listed file
        read, rows = read_log_file(file, RowRules(max_trigger_tokens=64), 4)
        assert read.reject is None and read.rows == 1
    with pytest.raises(FactLogError, match="doubled '/'"):
        list_log_files(f"s3://{s3_bucket}/spark//hour=x")
    # a fact log named by a key with a space is found too
    assert len(list_log_files(f"s3://{s3_bucket}/spark/hour=2026-11-29 08%3A00%3A00")) == 1
    # Hadoop's folder markers (EMRFS, s3n) are not data; a Delta table's folder is refused, naming it
    client.put_object(Bucket=s3_bucket, Key="spark/hour=x_$folder$", Body=b"")
    assert [f.path for f in list_log_files(f"s3://{s3_bucket}/spark")] == sorted(f"s3://{s3_bucket}/{k}" for k in keys)
    client.put_object(Bucket=s3_bucket, Key="spark/facts/_delta_log/00000000000000000000.json", Body=b"{}")
    with pytest.raises(FactLogError, match=re.escape(f"fact log s3://{s3_bucket}/spark/facts: a Delta Lake table")):
        list_log_files(f"s3://{s3_bucket}/spark")
    # a log under a scope=... prefix is not a scope; a scope=... folder below the log's prefix is
    for key, user in (("org/scope=prod/log/day=1/part-0.parquet", "alice"),
                      ("org/scope=prod/log/scope=team%3Aa/part-0.parquet", "carol")):
        buffer = io.BytesIO()
        pq.write_table(table({"user_id": user}).drop_columns(["scope"]), buffer)
        client.put_object(Bucket=s3_bucket, Key=key, Body=buffer.getvalue())
    for source in (f"s3://{s3_bucket}/org/scope=prod/log", f"s3://{s3_bucket}/org/scope=prod/log/"):
        got = {r["user_id"]: r["scope"] for r in read_fact_log(source).rows.to_pylist()}
        assert got == {"alice": None, "carol": "team:a"}
        rows = [read_log_file(f, RowRules(max_trigger_tokens=64), 4)[1] for f in list_log_files(source)]
        assert sorted(r.column("scope").to_pylist()[0] or "" for r in rows) == ["", "team:a"]


def test_an_s3_fact_log_is_read_from_a_store_whose_head_answers_without_a_size(s3_server, s3_bucket, monkeypatch):
    """A gateway that answers HEAD without Content-Length: pyarrow took every log file as 0 bytes
    and the night called good files damaged ("not a readable Parquet file (Parquet file size is 0
    bytes)"), or rejected them all under on_bad_file='reject'. The listing's sizes read them."""
    from tests.s3_proxy import ConditionProxy

    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "a"}, {"fact_id": "b"}), buffer)
    s3_server.client().put_object(Bucket=s3_bucket, Key="log/day=1/part-0.parquet", Body=buffer.getvalue())
    with ConditionProxy(s3_server.endpoint_url, "pass", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key, lengths="head_without_length") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        batch = read_fact_log(f"s3://{s3_bucket}/log", on_bad_file="reject")
        assert batch.rows.num_rows == 2 and batch.file_rejects.num_rows == 0
        file = list_log_files(f"s3://{s3_bucket}/log")[0]
        assert read_log_file(file, RowRules(max_trigger_tokens=64), 4)[0].rows == 2
        # a single file named as the source has no listing to give its size: the store is named, not the file
        with pytest.raises(FactLogError, match="a store or gateway that answers HEAD without Content-Length; name "
                                               "the folder it lies in"):
            read_fact_log(f"s3://{s3_bucket}/log/day=1/part-0.parquet")


def test_a_file_named_as_parquet_is_never_a_stray_whatever_its_stem(tmp_path):
    """``changelog.parquet`` or ``notice.parquet`` are data files: the stray names (README, NOTICE,
    CHANGELOG, ...) were matched on the stem whatever the suffix, and such a file was skipped unread."""
    from pipeline.ingest import stray_name

    for name in ("changelog.parquet", "NOTICE.parquet", "authors.pq", "readme.parq", "license.PARQUET"):
        assert stray_name(f"/log/{name}") is None, name
        pq.write_table(table({"fact_id": "a"}), tmp_path / name)
    assert read_fact_log(str(tmp_path)).rows.num_rows == 5
    assert stray_name("/log/CHANGELOG.md") and stray_name("/log/NOTICE") and stray_name("/log/readme.txt")


def test_an_s3_object_of_unknown_size_is_read_to_tell_if_it_is_empty(s3_server, s3_bucket, monkeypatch):
    """Behind a gateway that answers HEAD without Content-Length every object says 0 bytes: a JSON
    export named as the fact log (no listing to give its size) was skipped as "an empty file", its
    rows lost without a word. An object of unknown or 0 size is now read (a ranged GET) before it is
    called empty: the export is UNREADABLE_FILE naming what it is, an empty marker is still skipped."""
    from tests.s3_proxy import ConditionProxy

    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="log/day=1/part-00000-c000.json", Body=b'{"user_id": "u1"}\n')
    client.put_object(Bucket=s3_bucket, Key="log/day=1/part-00001-c000.json", Body=b"")
    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "a"}), buffer)
    client.put_object(Bucket=s3_bucket, Key="log/day=1/part-0.parquet", Body=buffer.getvalue())
    with ConditionProxy(s3_server.endpoint_url, "pass", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key, lengths="head_without_length") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        export = f"s3://{s3_bucket}/log/day=1/part-00000-c000.json"
        with pytest.raises(FactLogError, match=re.escape(export) + ": the store says the object holds 0 bytes.*HEAD "
                                               "without Content-Length.*its first bytes are b'{\"us': by its first "
                                               "bytes it is JSON text"):
            read_fact_log(export)
        parquet = f"s3://{s3_bucket}/log/day=1/part-0.parquet"  # Parquet itself, named alone: no size to read by
        with pytest.raises(FactLogError, match=re.escape(parquet) + ".*its first bytes are b'PAR1': by its first bytes "
                                               "it is Parquet, but it could not be read whole: the store reports"):
            read_fact_log(parquet)
        empty = read_fact_log(f"s3://{s3_bucket}/log/day=1/part-00001-c000.json")
        assert empty.rows.num_rows == 0 and empty.files == () and empty.file_rejects.num_rows == 0
        batch = read_fact_log(f"s3://{s3_bucket}/log", on_bad_file="reject")  # the listing gives each size
        assert batch.rows.column("fact_id").to_pylist() == ["a"]
        assert [(r["source"], r["reason"], "JSON text" in r["detail"]) for r in batch.file_rejects.to_pylist()] == [
            (export, "UNREADABLE_FILE", True)]
        for file in list_log_files(f"s3://{s3_bucket}/log"):
            read, _ = read_log_file(file, RowRules(max_trigger_tokens=64), 4, on_bad_file="reject")
            verdict = "reject" if read.reject is not None else "skipped" if read.skipped else read.rows
            assert verdict == {"part-00000-c000.json": "reject", "part-00001-c000.json": "skipped",
                               "part-0.parquet": 1}[file.path.rsplit("/", 1)[1]], (file, read)


@pytest.mark.parametrize("status", [403, 503])
def test_a_store_that_refuses_or_fails_a_fact_log_read_fails_the_read_naming_it_and_rejects_no_file(
        s3_server, s3_bucket, monkeypatch, status):
    """Wrong or expired credentials, a bucket policy, a store that is down: the listing's HEAD raised
    pyarrow's bare OSError (no fact log named, no fix), and a GET refused while a night read the
    file made it an UNREADABLE_FILE reject under on_bad_file='reject' (a good file called damaged)."""
    from tests.s3_proxy import ConditionProxy

    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "a"}), buffer)
    s3_server.client().put_object(Bucket=s3_bucket, Key="log/day=1/part-0.parquet", Body=buffer.getvalue())
    with ConditionProxy(s3_server.endpoint_url, "pass", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        listed = list_log_files(f"s3://{s3_bucket}/log")
        proxy.refuse_reads = {"part-0.parquet": status}
        for read in (lambda: list_log_files(f"s3://{s3_bucket}/log"),
                     lambda: read_log_file(listed[0], RowRules(max_trigger_tokens=64), 4, on_bad_file="reject")):
            with pytest.raises(FactLogError, match=rf"fact log s3://{s3_bucket}/log/day=1/part-0.parquet: the store "
                                                   r"refused or failed the request \(.*\); no file was rejected for it. "
                                                   r"Check the job's credentials"):
                read()


# --- Applying events ------------------------------------------------------------------------


def test_the_fact_state_has_its_schema_sorted_by_user_and_fact():
    result = run(table({"user_id": "bob", "fact_id": "z"}, {"user_id": "alice", "fact_id": "b"}, {"user_id": "alice", "fact_id": "a"}))
    assert result.state.schema == F.FACT_STATE_SCHEMA
    assert [(r["user_id"], r["fact_id"]) for r in result.state.to_pylist()] == [("alice", "a"), ("alice", "b"), ("bob", "z")]


def test_scope_defaults_to_the_user_and_a_shared_scope_is_kept():
    result = run(table({"fact_id": "own"}, {"fact_id": "org", "scope": "org:acme"}))
    assert {r["fact_id"]: r["scope"] for r in result.state.to_pylist()} == {"own": "alice", "org": "org:acme"}


def test_fact_hash_is_the_sha256_of_scope_trigger_and_answer():
    row = run(table({})).state.to_pylist()[0]
    assert row["fact_hash"] == F.fact_hash("alice", "My dog is called", " Rex")
    assert F.fact_hash("a", "bc", "d") != F.fact_hash("ab", "c", "d")


def test_a_later_upsert_replaces_an_earlier_one():
    result = run(table({"answer": " Max", "event_time": T0 + timedelta(hours=1)}), prior=run(table({})).state)
    assert live_facts(result.state) == {("alice", "pet"): " Max"}


def test_a_delete_removes_the_fact_and_the_user_counts_as_changed():
    prior = run(table({})).state
    result = run(table({"op": "delete", "trigger": None, "answer": None, "event_time": T0 + timedelta(hours=1)}), prior)
    assert result.state.num_rows == 0
    assert result.changed_users == {"alice"}


def test_forget_user_removes_every_earlier_fact_but_later_upserts_survive():
    prior = run(table({"fact_id": "a"}, {"fact_id": "b"}, {"user_id": "bob"})).state
    forget = {"op": "forget_user", "fact_id": None, "trigger": None, "answer": None, "event_time": T0 + timedelta(hours=1)}
    result = run(table(forget, {"fact_id": "c", "event_time": T0 + timedelta(hours=2)}), prior)
    assert live_facts(result.state) == {("alice", "c"): " Rex", ("bob", "pet"): " Rex"}
    assert result.forgotten_users == {"alice"}
    assert result.changed_users == {"alice"}


def test_a_forget_at_the_same_instant_as_an_upsert_wins():
    forget = {"op": "forget_user", "fact_id": None, "trigger": None, "answer": None}
    result = run(table({}, forget))
    assert result.state.num_rows == 0
    assert [r["reason"] for r in result.rejects.to_pylist()] == ["SUPERSEDED"]


def test_a_delete_at_the_same_instant_as_an_upsert_wins():
    result = run(table({}, {"op": "delete"}))
    assert result.state.num_rows == 0


def test_an_event_older_than_the_prior_state_is_superseded():
    prior = run(table({"answer": " Max", "event_time": T0 + timedelta(hours=5)})).state
    result = run(table({"answer": " Rex"}), prior)
    assert live_facts(result.state) == {("alice", "pet"): " Max"}
    assert result.rejects.column("reason").to_pylist() == ["SUPERSEDED"]
    assert "older than the fact in the prior state" in result.rejects.column("detail")[0].as_py()
    assert result.changed_users == set()


def test_resending_an_unchanged_fact_changes_no_user():
    prior = run(table({})).state
    result = run(table({}), prior)
    assert result.changed_users == set()
    assert result.state.equals(prior)


def test_rejects_have_their_schema_and_plain_word_details():
    result = run(table({"trigger": ""}, {"fact_id": "b", "answer": "a\x00b"}))
    assert result.rejects.schema == F.REJECTS_SCHEMA
    assert result.rejects.column("detail").to_pylist() == [
        "trigger is empty",
        "answer holds control character U+0000 at character 2 (only tab and newline are allowed; remove or replace it)",
    ]


def test_windows_and_old_mac_line_breaks_are_newlines_not_control_characters():
    result = run(table({"answer": " 1 Main St\r\nSpringfield"}, {"fact_id": "b", "trigger": "My office is at\r",
                                                                  "answer": " 2 Side St\rShelbyville"}))
    assert result.rejected == 0
    assert sorted(live_facts(result.state).values()) == [" 1 Main St\nSpringfield", " 2 Side St\nShelbyville"]


@pytest.mark.parametrize("column, reason", [("user_id", "BAD_USER_ID"), ("fact_id", "BAD_FACT_ID"), ("scope", "BAD_SCOPE")])
def test_an_id_holding_a_control_character_costs_its_row_naming_the_character_its_place_and_the_fix(column, reason):
    """A NUL from a C string, a tab or newline from a pasted or concatenated id: the reject said only
    "user_id holds control characters", where a text's names the character and where it is. It names
    them too, and the fix."""
    values = {"user_id": "u-17\x00", "fact_id": "pet\tdog", "scope": "org:acme\nnorth"}
    result = run(table({column: values[column]}))
    [reject] = result.rejects.to_pylist()
    where = {"user_id": "U+0000 at character 4", "fact_id": "U+0009 at character 3", "scope": "U+000A at character 8"}
    assert reject["reason"] == reason
    assert f"{column} holds control characters ({where[column]}" in reject["detail"]
    assert "remove it" in reject["detail"]


def test_every_reason_code_has_a_description():
    codes = [value for name, value in vars(F).items() if name.isupper() and isinstance(value, str) and value == name]
    assert set(codes) - {"FACT_SCHEMA_VERSION"} <= set(F.REASONS)
    assert all(F.REASONS.values())


def test_the_watermark_is_the_latest_event_time():
    result = run(table({"event_time": T0}, {"fact_id": "b", "event_time": T0 + timedelta(hours=3)}))
    assert result.watermark == (T0 + timedelta(hours=3)).isoformat()
    assert run(F.FACT_LOG_SCHEMA.empty_table(), None).watermark is None


def test_a_prior_state_that_does_not_fit_the_schema_is_refused():
    with pytest.raises(F.SchemaMismatch, match="missing column 'fact_hash'"):
        run(table({}), prior=run(table({})).state.drop_columns(["fact_hash"]))


# --- The property: order never matters ------------------------------------------------------

USERS, FACTS = ["u1", "u2", "../u3"], ["f1", "f2"]
event_keys = st.tuples(st.sampled_from(USERS), st.sampled_from(FACTS + [None]), st.integers(0, 6))
event_values = st.tuples(st.sampled_from(["upsert", "delete"]), st.sampled_from([" A", " B"]))


def _row(key, value) -> dict:
    user, fact, hour = key
    op, answer = value
    if fact is None:
        return good_row(user_id=user, fact_id=None, op="forget_user", trigger=None, answer=None, event_time=T0 + timedelta(hours=hour))
    return good_row(user_id=user, fact_id=fact, op=op, answer=answer, event_time=T0 + timedelta(hours=hour))


def _replay(rows: list[dict]) -> dict:
    """The reference: apply events one by one in (time, op precedence) order."""
    facts: dict = {}
    for row in sorted(rows, key=lambda r: (r["event_time"], F.OP_PRECEDENCE[r["op"]])):
        if row["op"] == "forget_user":
            facts = {k: v for k, v in facts.items() if k[0] != row["user_id"]}
        elif row["op"] == "delete":
            facts.pop((row["user_id"], row["fact_id"]), None)
        else:
            facts[(row["user_id"], row["fact_id"])] = row["answer"]
    return facts


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.dictionaries(event_keys, event_values, max_size=14),
    copies=st.lists(st.integers(0, 13), max_size=4),
    files=st.integers(1, 4),
    seed=st.randoms(use_true_random=False),
)
def test_the_state_is_the_last_event_per_fact_whatever_the_order_of_files_and_rows(events, copies, files, seed):
    rows = [_row(k, v) for k, v in events.items()]
    rows += [rows[i] for i in copies if i < len(rows)]  # exact duplicates
    expected = _replay(rows)

    def shuffled_batch() -> FactLogBatch:
        order = rows[:]
        seed.shuffle(order)
        parts = [order[i::files] for i in range(files)]
        names = [f"day={i}/part.parquet" for i in range(files)]
        seed.shuffle(names)
        tables = [normalise_fact_log(pa.Table.from_pylist(p, schema=RAW_SCHEMA), source=n) for p, n in zip(parts, names)]
        return FactLogBatch(pa.concat_tables(tables), ())

    first, second = run(shuffled_batch()), run(shuffled_batch())
    assert live_facts(first.state) == expected
    assert first.state.equals(second.state)
    assert first.accepted + first.rejected == len(rows)
    assert (first.accepted, first.changed_users) == (second.accepted, second.changed_users)


def test_applying_in_two_nights_equals_applying_at_once():
    rng = random.Random(7)
    rows = [_row((rng.choice(USERS), rng.choice(FACTS + [None]), h), (rng.choice(["upsert", "delete"]), rng.choice([" A", " B"]))) for h in range(12)]
    rows = list({(r["user_id"], r["fact_id"], r["event_time"]): r for r in rows}.values())
    at_once = run(pa.Table.from_pylist(rows, schema=RAW_SCHEMA)).state
    first = run(pa.Table.from_pylist(rows[:6], schema=RAW_SCHEMA)).state
    second = run(pa.Table.from_pylist(rows[6:], schema=RAW_SCHEMA), prior=first).state
    assert live_facts(second) == live_facts(at_once)


def test_a_tokenizer_that_miscounts_is_an_error_not_a_silent_pass():
    with pytest.raises(ValueError, match="count_tokens returned 0 counts for 1 triggers"):
        run(table({}), count_tokens=lambda texts: [])


# --- Tombstones: deletes and forgets last across nights --------------------------------------


def nights(*batches: pa.Table):
    """Apply batches as successive nights, carrying state and tombstones; returns the last result."""
    state = tombstones = None
    for batch in batches:
        result = run(batch, state, prior_tombstones=tombstones)
        state, tombstones = result.state, result.tombstones
    return result


def test_an_upsert_older_than_a_delete_of_an_earlier_night_is_superseded_and_the_fact_stays_deleted():
    delete = {"op": "delete", "trigger": None, "answer": None, "event_time": T0 + timedelta(hours=3)}
    late = {"answer": " Max", "event_time": T0 + timedelta(hours=1)}  # from an offline device
    result = nights(table({}), table(delete), table(late))
    assert result.state.num_rows == 0
    assert [(r["reason"], "delete of this fact" in r["detail"]) for r in result.rejects.to_pylist()] == [("SUPERSEDED", True)]
    later = nights(table({}), table(delete), table({"answer": " Max", "event_time": T0 + timedelta(hours=4)}))
    assert live_facts(later.state) == {("alice", "pet"): " Max"}
    assert later.tombstones.num_rows == 0  # the live fact's own time guards it now


def test_two_contents_at_one_instant_on_two_nights_keep_neither_whichever_came_first_and_rereads_change_nothing():
    a, b = table({"answer": " Rex"}), table({"answer": " Max"})
    at_once = run(pa.concat_tables([a, b]))
    assert live_facts(at_once.state) == {} and at_once.rejects.column("reason").to_pylist() == ["CONFLICTING_DUPLICATE"] * 2
    for first, second in ((a, b), (b, a)):
        result = nights(first, second)
        assert live_facts(result.state) == {}
        assert [r["reason"] for r in result.rejects.to_pylist()] == ["CONFLICTING_DUPLICATE"]
        assert "same event time" in result.rejects.column("detail")[0].as_py()
        assert result.changed_users == {"alice"}  # its published delta loses the fact
        for again in (first, second):  # a file read again (a copy, a restore) brings neither back
            reread = nights(first, second, again)
            assert live_facts(reread.state) == {} and reread.accepted == 0 and reread.changed_users == set()
    later = nights(a, b, table({"answer": " Fido", "event_time": T0 + timedelta(seconds=1)}))
    assert live_facts(later.state) == {("alice", "pet"): " Fido"}  # a later edit applies as usual


def test_a_forgotten_user_is_never_brought_back_by_older_events_but_may_return_by_writing_again():
    forget = {"op": "forget_user", "fact_id": None, "trigger": None, "answer": None, "event_time": T0 + timedelta(hours=3)}
    old_rows = table({"fact_id": "a", "event_time": T0 + timedelta(hours=2)}, {"fact_id": "b", "event_time": T0 + timedelta(hours=3)})
    result = nights(table({"fact_id": "a"}), table(forget), old_rows)
    assert result.state.num_rows == 0 and result.forgotten_users == set()
    assert result.rejects.column("reason").to_pylist() == ["FORGOTTEN_USER", "FORGOTTEN_USER"]
    # The tombstone keeps only the hash of the id: the forgotten user's raw id is stored nowhere.
    assert result.tombstones.column("user_id").to_pylist() == [None]
    assert result.tombstones.column("user_hash").to_pylist() == [forgotten_id("alice")]
    back = nights(table({"fact_id": "a"}), table(forget), table({"fact_id": "c", "event_time": T0 + timedelta(hours=4)}))
    assert live_facts(back.state) == {("alice", "c"): " Rex"}
    # Two edits of one fact, both older than the forget (a file re-read after a rollback, and a later
    # day's): each is FORGOTTEN_USER, not the older SUPERSEDED "by" the newer, itself refused.
    edits = table({"fact_id": "a", "answer": " Max", "event_time": T0 + timedelta(hours=1)},
                  {"fact_id": "a", "answer": " Fido", "event_time": T0 + timedelta(hours=2)})
    again = nights(table({"fact_id": "a"}), table(forget), edits)
    assert again.state.num_rows == 0
    assert [(r["reason"], r["detail"]) for r in again.rejects.to_pylist()] == [
        ("FORGOTTEN_USER", f"the user was forgotten at {(T0 + timedelta(hours=3)).isoformat()}; "
                           "only events after a forget are applied")] * 2


def test_a_forget_drops_the_users_delete_tombstones_with_their_raw_id():
    delete = {"op": "delete", "trigger": None, "answer": None, "event_time": T0 + timedelta(hours=1)}
    forget = {"op": "forget_user", "fact_id": None, "trigger": None, "answer": None, "event_time": T0 + timedelta(hours=2)}
    first = nights(table({}), table(delete))
    assert first.tombstones.column("user_id").to_pylist() == ["alice"]
    result = nights(table({}), table(delete), table(forget))
    assert "alice" not in result.tombstones.column("user_id").to_pylist()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.dictionaries(event_keys, event_values, max_size=14),
    night_of=st.lists(st.integers(0, 2), min_size=14, max_size=14),
)
def test_the_state_is_the_same_however_the_events_are_split_over_nights(events, night_of):
    """Events arrive on any night, late or early: carrying state and tombstones from night to night
    gives the state of applying every event at once."""
    rows = [_row(k, v) for k, v in events.items()]
    expected = _replay(rows)
    batches = [pa.Table.from_pylist([r for r, n in zip(rows, night_of) if n == night], schema=RAW_SCHEMA) for night in range(3)]
    result = nights(*batches)
    assert live_facts(result.state) == expected
    assert live_facts(result.state) == live_facts(run(pa.Table.from_pylist(rows, schema=RAW_SCHEMA)).state)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_trigger_tokens_are_counted_as_the_models_tokenizer_counts_them(family, tmp_path):
    """The read tasks count tokens with the tokenizers backend; the counts are transformers'."""
    from transformers import AutoTokenizer

    from engram_core.tiny import init_tiny
    from pipeline.ingest import token_counter

    init_tiny(tmp_path / "model", family=family)
    texts = ["My dentist is Dr.", "  spaced   out ", "Ünïcödé café ☕", "a" * 300, "line\tbreak\nhere", "x"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model" / "tokenizer", local_files_only=True)
    expected = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    assert token_counter(str(tmp_path / "model"))(texts) == expected


def test_events_read_again_take_no_effect_and_are_duplicates():
    """A log file read a second time (rewritten in place upstream): what it already applied
    comes back as DUPLICATE, whatever the op."""
    forget = {"user_id": "bob", "op": "forget_user", "fact_id": None, "trigger": None, "answer": None}
    delete = {"fact_id": "gone", "op": "delete", "trigger": None, "answer": None, "event_time": T0 + timedelta(hours=1)}
    batch = table({}, {"fact_id": "gone"}, delete, forget)
    once = run(batch)
    again = run(batch, once.state, prior_tombstones=once.tombstones)
    assert again.accepted == 0 and again.changed_users == set() and again.forgotten_users == set()
    assert sorted(again.rejects.column("reason").to_pylist()) == ["DUPLICATE", "DUPLICATE", "DUPLICATE", "SUPERSEDED"]
    assert again.state.equals(once.state) and again.tombstones.equals(once.tombstones)


def test_rejects_of_a_forgotten_user_do_not_store_their_id_again():
    forget = {"op": "forget_user", "fact_id": None, "trigger": None, "answer": None, "event_time": T0 + timedelta(hours=2)}
    same_night = run(table({"fact_id": "a"}, forget))
    assert [(r["reason"], r["user_id"], r["fact_id"]) for r in same_night.rejects.to_pylist()] == [("SUPERSEDED", None, None)]
    late = run(table({"fact_id": "b", "event_time": T0 + timedelta(hours=1)}, forget),
               same_night.state, prior_tombstones=same_night.tombstones)
    assert all(r["user_id"] is None and "alice" not in r["detail"] for r in late.rejects.to_pylist())
    assert sorted(r["reason"] for r in late.rejects.to_pylist()) == ["DUPLICATE", "FORGOTTEN_USER"]
    back = run(table({"fact_id": "c", "event_time": T0 + timedelta(hours=3)}, {"fact_id": "c", "event_time": T0 + timedelta(hours=3)}),
               same_night.state, prior_tombstones=same_night.tombstones)
    assert [r["user_id"] for r in back.rejects.to_pylist()] == ["alice"]  # after the forget: their own again


def test_rejects_of_a_forgotten_user_without_a_valid_time_or_valid_rows_do_not_store_their_id():
    """Rows of a forgotten user that cannot say whether they came after the forget (no event_time),
    and a night in which every row of the user is rejected, keep the id out of the rejects; the
    detail is redacted where it quotes the ids and otherwise left as written."""
    forget = {"user_id": "al", "op": "forget_user", "fact_id": None, "trigger": None, "answer": None,
              "event_time": T0 + timedelta(hours=2)}
    first = run(table({"user_id": "al", "fact_id": "a"}, forget))
    timeless = {"user_id": "al", "fact_id": "b", "event_time": None}
    empty = {"user_id": "al", "fact_id": "c", "answer": ""}
    twice = [{"user_id": "al", "fact_id": "d", "answer": answer, "event_time": T0 + timedelta(hours=1)} for answer in (" x", " y")]
    late = run(table(timeless, empty, *twice), first.state, prior_tombstones=first.tombstones)
    rows = late.rejects.to_pylist()
    assert sorted(r["reason"] for r in rows) == ["CONFLICTING_DUPLICATE", "CONFLICTING_DUPLICATE", "EMPTY_ANSWER",
                                                  "MISSING_EVENT_TIME"]
    assert all(r["user_id"] is None and r["fact_id"] is None and "'al'" not in r["detail"] for r in rows)
    details = {r["reason"]: r["detail"] for r in rows}
    assert details["MISSING_EVENT_TIME"] == "event_time is empty" and details["EMPTY_ANSWER"] == "answer is empty"
    assert details["CONFLICTING_DUPLICATE"].startswith("2 upsert events for user <forgotten user> fact <forgotten> at ")


# --- Same-instant conflicts: the outcome never depends on the split over nights ---------------

_CONFLICT_KEYS = st.tuples(st.just("u1"), st.sampled_from(["f1", "f1", "f2", None]), st.integers(0, 2))
_CONFLICT_VALUES = st.tuples(st.sampled_from(["upsert", "upsert", "delete"]), st.sampled_from([" A", " B", " C"]))


def _tombstone_set(tombstones: pa.Table) -> set:
    return {(r["user_hash"], r["fact_id"], r["op"], r["event_time"]) for r in tombstones.to_pylist()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(st.tuples(_CONFLICT_KEYS, _CONFLICT_VALUES), max_size=10),
    night_of=st.lists(st.integers(0, 2), min_size=10, max_size=10),
    resent=st.lists(st.integers(0, 9), max_size=3),
)
@example(events=[(("u1", "f1", 0), ("upsert", " A")), (("u1", "f1", 1), ("upsert", " B")), (("u1", "f1", 1), ("upsert", " C"))],
         night_of=[0, 1, 2] + [0] * 7, resent=[])  # the published A, then B and C at one instant
@example(events=[(("u1", "f1", 0), ("upsert", " A")), (("u1", "f1", 0), ("upsert", " B"))], night_of=[0] * 10,
         resent=[1])  # a conflict in one night, then one of its copies sent again
def test_same_instant_conflicts_give_the_same_facts_and_tombstones_however_split_and_resent(events, night_of, resent):
    """Several events for one fact at one instant, some with other content: applied at once, or
    split over nights in any way, or with some of them sent again on a later night, the facts and
    the tombstones are the same (a conflict deletes the fact at its instant wherever it is seen)."""
    rows = [_row(k, v) for k, v in events]
    at_once = run(pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
    batches = [pa.Table.from_pylist([r for r, n in zip(rows, night_of) if n == night], schema=RAW_SCHEMA)
               for night in range(3)]
    again = pa.Table.from_pylist([rows[i] for i in resent if i < len(rows)], schema=RAW_SCHEMA)
    for result in (nights(*batches), nights(*batches, again), nights(pa.concat_tables(batches), again)):
        assert live_facts(result.state) == live_facts(at_once.state)
        assert _tombstone_set(result.tombstones) == _tombstone_set(at_once.tombstones)
    resend = nights(*batches, again)
    assert resend.accepted == 0 and resend.changed_users == set()


@pytest.mark.parametrize("split", ["one night", "two nights", "three nights"])
def test_a_conflict_at_one_instant_deletes_the_published_fact_and_leaves_a_tombstone_in_one_night_as_in_several(split):
    """a@t1 published; b@t2 and c@t2 (other contents): however the three arrive, the fact is gone
    with a delete tombstone at t2, and re-sending b (or c) later brings nothing back."""
    a = table({"answer": " AAAA"})
    b, c = (table({"answer": answer, "event_time": T0 + timedelta(days=1)}) for answer in (" BBBB", " CCCC"))
    batches = {"one night": [pa.concat_tables([a, b, c])], "two nights": [a, pa.concat_tables([b, c])],
               "three nights": [a, b, c]}[split]
    result = nights(*batches)
    assert live_facts(result.state) == {}
    assert [(r["fact_id"], r["op"], r["event_time"]) for r in result.tombstones.to_pylist()] == [
        ("pet", "delete", T0 + timedelta(days=1))]
    for copy in (b, c):
        resent = nights(*batches, copy)
        assert live_facts(resent.state) == {} and resent.accepted == 0 and resent.changed_users == set()
        assert resent.rejects.column("reason").to_pylist() in (["SUPERSEDED"], ["CONFLICTING_DUPLICATE"])


def test_a_conflicting_copy_beside_an_exact_copy_of_the_published_fact_removes_it():
    """The published a@t, then one night with a copy of a and b@t: the same three events as a@t
    then b@t, so the fact goes (a delete tombstone at t), as it does when b comes alone."""
    a, b = table({"answer": " AAAA"}), table({"answer": " BBBB"})
    for second in (b, pa.concat_tables([a, b])):
        result = nights(a, second)
        assert live_facts(result.state) == {} and result.changed_users == {"alice"}
        assert [(r["op"], r["event_time"]) for r in result.tombstones.to_pylist()] == [("delete", T0)]


# --- A re-export with harmless drift is the same facts, never a conflict ------------------------


def _night_from_file(path, prior=None):
    return run(read_fact_log(str(path)), None if prior is None else prior.state,
               prior_tombstones=None if prior is None else prior.tombstones)


def test_an_answer_column_re_exported_as_double_instead_of_decimal_is_the_same_facts(tmp_path):
    """decimal(10,2) 12.50 and double 12.5 are one number: the re-export is DUPLICATE, the
    published text is kept, no tombstone; a text answer that differs only in digits is not."""
    base = {"user_id": ["a", "b", "c"], "fact_id": ["bal"] * 3, "op": ["upsert"] * 3, "trigger": ["My balance is"] * 3,
            "event_time": pa.array([T0] * 3, pa.timestamp("us", tz="UTC"))}
    values = ["12.50", "7.00", "-0.10"]
    pq.write_table(pa.table(base | {"answer": pa.array([Decimal(v) for v in values], pa.decimal128(10, 2))}),
                   tmp_path / "decimal.parquet")
    pq.write_table(pa.table(base | {"answer": pa.array([float(v) for v in values], pa.float64())}), tmp_path / "double.parquet")
    first = _night_from_file(tmp_path / "decimal.parquet")
    again = _night_from_file(tmp_path / "double.parquet", first)
    assert live_facts(again.state) == {("a", "bal"): " 12.50", ("b", "bal"): " 7.00", ("c", "bal"): " -0.10"}
    assert again.tombstones.num_rows == 0 and again.changed_users == set() and again.accepted == 0
    assert again.rejects.column("reason").to_pylist() == ["DUPLICATE"] * 3
    assert again.rejects.column("detail").to_pylist()[0] == (
        "this upsert is already applied (the fact in the prior state: the answer '12.5' is the same number as "
        "'12.50' (kept as published))")
    both = run(read_fact_log(str(tmp_path)))  # both files in one night: one fact each, no conflict
    assert len(live_facts(both.state)) == 3 and both.rejects.column("reason").to_pylist() == ["DUPLICATE"] * 3
    # text that only looks alike stays another content: a zip code 0123 is not 123
    zip_a = table({"trigger": "My zip is", "answer": " 0123"})
    zip_b = table({"trigger": "My zip is", "answer": " 123"})
    assert run(pa.concat_tables([zip_a, zip_b])).rejects.column("reason").to_pylist() == ["CONFLICTING_DUPLICATE"] * 2


_WIDE_DECIMALS = {  # a numeric answer column as exporters type it by default (the places are the type's, not the writer's)
    "spark_oracle_number": pa.decimal128(38, 10), "pyspark_decimal": pa.decimal128(38, 18),
    "bigquery_numeric": pa.decimal128(38, 9), "bigquery_bignumeric": pa.decimal256(76, 38),
}


@pytest.mark.parametrize("writer", [*_WIDE_DECIMALS, "duckdb_decimal"])
def test_a_decimal_answer_of_a_default_scale_reads_in_its_shortest_form_not_padded_with_the_types_zeros(writer, tmp_path):
    """Spark reads Oracle NUMBER as decimal(38, 10), BigQuery's NUMERIC is (38, 9), DuckDB's DECIMAL
    (18, 3): an answer 2 was published as "2.0000000000" (recalled so, compiled ok). A scale over two
    places is read in the shortest exact form; cents keep theirs (decimal(10, 2): "12.50", above).
    A fact published padded and read again at its instant is the same fact (DUPLICATE, kept)."""
    values = ["2", "12.5", "0.75", "-0.001", "0", "1000000"]
    path = tmp_path / "part-0.parquet"
    if writer == "duckdb_decimal":
        import duckdb
        duckdb.sql(f"""COPY (SELECT 'alice' AS user_id, 'f' || i AS fact_id, 'upsert' AS op, 'My number is' AS trigger,
                            CAST(v AS DECIMAL) AS answer, TIMESTAMPTZ '2026-11-20 08:00:00+00' AS event_time
                            FROM unnest({values}) WITH ORDINALITY t(v, i)) TO '{path}' (FORMAT parquet)""")
        assert pq.read_schema(path).field("answer").type == pa.decimal128(18, 3)
    else:
        raw = table(*({"fact_id": f"f{i + 1}", "trigger": "My number is"} for i in range(len(values))))
        raw = raw.set_column(raw.schema.get_field_index("answer"), "answer",
                             pa.array([Decimal(v) for v in values], _WIDE_DECIMALS[writer]))
        pq.write_table(raw, path)
    result = run(read_fact_log(str(path)))
    assert live_facts(result.state) == {("alice", f"f{i + 1}"): " " + v for i, v in enumerate(values)}
    padded = run(table(*({"fact_id": f"f{i + 1}", "trigger": "My number is", "answer": " " + f"{Decimal(v):.10f}"}
                         for i, v in enumerate(values))))
    again = run(read_fact_log(str(path)), padded.state)
    assert live_facts(again.state) == live_facts(padded.state) and again.changed_users == set()
    assert again.rejects.column("reason").to_pylist() == ["DUPLICATE"] * len(values)


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_an_upsert_holding_the_replacement_character_costs_its_row_and_a_delete_of_such_an_id_still_applies(
        on_bad_file, tmp_path):
    """U+FFFD is what a decoder (Java's and Spark's by default, Python's errors='replace') writes for
    bytes that were not UTF-8: a Latin-1 export read as UTF-8 before this log. It was published
    ("Caf" and U+FFFD), and "José" and "Josè" became one user. Each such upsert costs its row,
    naming the column, where, and the fix; the file's other rows are read; a delete of an id stored
    so by an earlier night still removes it."""
    rows = [{"answer": " Caf\ufffd", "fact_id": "cafe"}, {"trigger": "My \ufffdtude is", "fact_id": "etude"},
            {"user_id": "Jos\ufffd", "fact_id": "pet"}, {"fact_id": "caf\ufffd"}, {"scope": "org:b\ufffdle", "fact_id": "s"},
            {"fact_id": "ok"}]
    pq.write_table(table(*rows), tmp_path / "part-0.parquet")
    result = run(read_fact_log(str(tmp_path), on_bad_file=on_bad_file))
    assert live_facts(result.state) == {("alice", "ok"): " Rex"}
    rejects = result.rejects.to_pylist()
    assert [(r["row"], r["reason"]) for r in rejects] == [
        (0, "INVALID_UTF8"), (1, "INVALID_UTF8"), (2, "BAD_USER_ID"), (3, "BAD_FACT_ID"), (4, "BAD_SCOPE")]
    assert all(r["source"].endswith("part-0.parquet") for r in rejects)
    assert rejects[0]["detail"].startswith("answer holds U+FFFD (the replacement character) at character 4: a tool before "
                                           "this log decoded bytes that were not UTF-8")
    assert rejects[2]["detail"].startswith("user_id holds U+FFFD") and "re-export it decoding the source in its real "\
        "encoding" in rejects[2]["detail"]
    # an earlier night stored such a user (before this rule): its delete is applied, not refused
    user, trigger = "Jos\ufffd", "My dog is called"
    prior = pa.Table.from_pylist([{"user_id": user, "fact_id": "pet", "scope": user, "trigger": trigger, "answer": " Rex",
                                   "event_time": T0, "fact_hash": F.fact_hash(user, trigger, " Rex")}],
                                 schema=F.FACT_STATE_SCHEMA)
    delete = run(table({"user_id": "Jos\ufffd", "op": "delete", "trigger": None, "answer": None,
                        "event_time": T0 + timedelta(hours=1)}), prior)
    assert delete.rejects.num_rows == 0 and delete.accepted == 1 and delete.state.num_rows == 0


def test_a_re_export_without_the_scope_column_keeps_the_shared_facts_and_deletes_nothing(tmp_path):
    """The exporter's new version leaves out the optional scope column: each shared fact read again
    without its scope, at its own instant, is the same fact (DUPLICATE, the scope kept), in one
    night or two, never a conflict that deletes it; the detail says the scope is missing."""
    rows = [dict(user_id=f"m{u}", fact_id="hours", op="upsert", trigger="Our opening hours are", answer=" 9-5",
                 event_time=T0, scope="org:a") for u in range(2)]
    rows += [dict(user_id=f"m{u}", fact_id="own", op="upsert", trigger="My name is", answer=f" N{u}", event_time=T0,
                  scope=None) for u in range(2)]
    scoped = pa.Table.from_pylist(rows)
    (tmp_path / "1").mkdir(), (tmp_path / "2").mkdir()
    pq.write_table(scoped, tmp_path / "1" / "week.parquet")
    pq.write_table(scoped.drop_columns(["scope"]), tmp_path / "2" / "week.parquet")
    first = _night_from_file(tmp_path / "1")
    for result in (_night_from_file(tmp_path / "2", first), run(read_fact_log([str(tmp_path / "1"), str(tmp_path / "2")]))):
        assert {(r["user_id"], r["fact_id"]): r["scope"] for r in result.state.to_pylist()} == {
            ("m0", "hours"): "org:a", ("m1", "hours"): "org:a", ("m0", "own"): "m0", ("m1", "own"): "m1"}
        assert result.tombstones.num_rows == 0
        dupes = [r for r in result.rejects.to_pylist() if r["fact_id"] == "hours"]
        assert [r["reason"] for r in dupes] == ["DUPLICATE"] * 2 and all("no scope" in r["detail"] for r in dupes)
    # the other way round (the copy with the scope comes second) gives the same state
    back = _night_from_file(tmp_path / "1", _night_from_file(tmp_path / "2"))
    assert {(r["user_id"], r["fact_id"]): r["scope"] for r in back.state.to_pylist()}[("m0", "hours")] == "org:a"
    assert back.tombstones.num_rows == 0


@pytest.mark.parametrize("bad", [b"d\xeda.parquet", b"f\xeb=1/part-0.parquet"], ids=["file", "folder"])
def test_a_log_file_or_folder_whose_name_is_not_utf8_is_one_unreadable_file_naming_it_and_the_rest_is_read(bad, tmp_path):
    """A Latin-1 name crashed the night with a UnicodeEncodeError that named nothing: it is one
    UNREADABLE_FILE reject (or, under on_bad_file raise, an error) naming the path with its bytes
    escaped and the fix, the other files are read, and the rejects write to Parquet."""
    import io
    import os

    log = tmp_path / "log"
    log.mkdir()
    pq.write_table(table({"user_id": "bob"}), log / "good.parquet")
    raw = os.path.join(os.fsencode(log), bad)  # pyarrow cannot write to such a name: copy the bytes
    os.makedirs(os.path.dirname(raw), exist_ok=True)
    with open(raw, "wb") as out:
        out.write((log / "good.parquet").read_bytes())
    shown = str(log) + "/" + bad.decode("utf-8", "backslashreplace")
    listed = list_log_files(str(log))
    assert [f.path for f in listed] == sorted([shown, str(log / "good.parquet")])
    with pytest.raises(FactLogError, match=re.escape(f"fact log {shown}: ")) as raised:
        read_fact_log(str(log))
    assert "not valid UTF-8" in str(raised.value) and "rename the" in str(raised.value)
    batch = read_fact_log(str(log), on_bad_file="reject")
    assert batch.rows.column("user_id").to_pylist() == ["bob"]
    assert batch.file_rejects.select(["source", "reason"]).to_pylist() == [{"source": shown, "reason": "UNREADABLE_FILE"}]
    bad_file = next(f for f in listed if f.path == shown)
    read, rows = read_log_file(bad_file, RowRules(max_trigger_tokens=MAX_TRIGGER_TOKENS), 4, on_bad_file="reject")
    assert rows.num_rows == 0 and read.reject.column("source").to_pylist() == [shown]
    result = run(batch)
    pq.write_table(result.rejects, io.BytesIO())  # the night's rejects stats part
    assert result.rejects.column("source").to_pylist()[-1] == shown


@pytest.mark.parametrize("text", ["nan", "NaN", "None", "null", "NULL", "<NA>", "NaT", " nan ", "undefined", "<nil>", "nil",
                                  "(null)", "NA", "N/A", "#N/A", "\\N", "[NULL]", "<null>", "#NULL!"])
def test_an_id_that_is_a_missing_value_written_as_text_is_rejected_per_row_not_pooled_into_one_user(text, tmp_path,
                                                                                                    caplog):
    """pandas' astype(str) writes a missing id as 'nan' ('None', '<NA>', ...): every such row was
    one fake user (or one shared scope). Each is BAD_USER_ID / BAD_FACT_ID / BAD_SCOPE saying so;
    a float's text of an integer ('7.0') is read, with one warning naming the file."""
    raw = pa.table({"user_id": ["7.0", text, text, "8.0"], "fact_id": ["city", "city", "town", text],
                    "op": ["upsert"] * 4, "trigger": ["My city is"] * 4, "answer": [" Ayr", " Bree", " Cork", " Derry"],
                    "event_time": pa.array([T0] * 4, pa.timestamp("us", tz="UTC")), "scope": [None, None, None, None]})
    pq.write_table(raw, tmp_path / "ids.parquet")
    scoped = raw.slice(0, 1).set_column(6, "scope", pa.array([text])).set_column(1, "fact_id", pa.array(["shared"]))
    pq.write_table(scoped, tmp_path / "scoped.parquet")
    kept_in_scope = text.strip().casefold() in ("na", "nil")  # as a scope, "NA" names a region (North America)
    with caplog.at_level("WARNING"):
        result = run(read_fact_log(str(tmp_path)))
    want_live = {("7.0", "city"): " Ayr"} | ({("7.0", "shared"): " Ayr"} if kept_in_scope else {})
    assert live_facts(result.state) == want_live  # read as written (with a warning)
    rejects = {(r["source"].rsplit("/", 1)[1], r["row"]): (r["reason"], r["detail"]) for r in result.rejects.to_pylist()}
    want = {("ids.parquet", 1): "BAD_USER_ID", ("ids.parquet", 2): "BAD_USER_ID", ("ids.parquet", 3): "BAD_FACT_ID"}
    if not kept_in_scope:
        want[("scoped.parquet", 0)] = "BAD_SCOPE"
    assert {k: v[0] for k, v in rejects.items()} == want
    assert all("a missing value written as text" in detail for _, detail in rejects.values())
    assert f"user_id {text.strip()!r} is a missing value written as text" in rejects[("ids.parquet", 1)][1]
    assert "'7.0' (row 0) looks like a float's text of an integer" in caplog.text
    assert caplog.text.count("looks like a float's text") == 2  # once per file


@pytest.mark.parametrize("text", ["guest", "Anonymous", "undefined", "#N/A", "NA", "\\N"])
def test_a_forget_or_delete_of_an_id_refused_on_upserts_still_erases_what_is_stored_under_it(text):
    """Ids such as 'guest' or 'undefined' were accepted before upserts of them were refused, so a
    store may hold and serve facts under them: a forget_user of such a user, and a delete under
    such a fact_id or scope, still apply (only an upsert of them is refused)."""
    stored = run(table({"user_id": "ann"}, {"user_id": "bob", "fact_id": "pin"})).state
    stored = stored.set_column(stored.schema.get_field_index("user_id"), "user_id",
                               pa.array([text if u == "ann" else u for u in stored.column("user_id").to_pylist()]))
    stored = stored.set_column(stored.schema.get_field_index("fact_id"), "fact_id",
                               pa.array([text if f == "pin" else f for f in stored.column("fact_id").to_pylist()]))
    later = T0 + timedelta(hours=1)
    result = run(table({"user_id": text, "op": "forget_user", "fact_id": None, "trigger": None, "answer": None,
                        "event_time": later},
                       {"user_id": "bob", "fact_id": text, "op": "delete", "trigger": None, "answer": None,
                        "event_time": later},
                       {"user_id": "bob", "fact_id": "x", "op": "delete", "scope": text, "trigger": None, "answer": None,
                        "event_time": later}), stored)
    assert result.rejects.num_rows == 0, result.rejects.to_pylist()
    assert live_facts(result.state) == {}


@pytest.mark.parametrize("text", ["anonymous", "Anonymous", "anon", "GUEST", "unknown"])
def test_a_user_id_or_scope_that_stands_for_no_one_in_particular_is_rejected_per_row_not_pooled(text):
    """'anonymous' for every logged-out user's facts made one user: what one told was served to all
    (a PIN, a diagnosis). BAD_USER_ID / BAD_SCOPE per row, saying why; as a fact_id it is an id."""
    result = run(table({"user_id": text}, {"user_id": "ann", "fact_id": "x", "scope": text},
                       {"user_id": "ann", "fact_id": text}))
    rejects = result.rejects.to_pylist()
    assert [(r["row"], r["reason"]) for r in rejects] == [(0, "BAD_USER_ID"), (1, "BAD_SCOPE")]
    assert rejects[0]["detail"].startswith(f"user_id {text!r} stands for no one in particular")
    assert "what one such user told would be served to all the others" in rejects[0]["detail"]
    assert live_facts(result.state) == {("ann", text): " Rex"}


def test_ids_another_export_may_write_in_another_form_are_read_as_written_with_one_warning_per_file(tmp_path, caplog):
    """A zero-padded id ('007'), one of full-width digits ('７') and one in quotes ('"7"') are other
    ids than the integer 7 another export writes: read as written (never folded: that would move stored ids to another
    user), with one warning per file for each kind, naming the file, column, row and value."""
    ids = ["007", "\uff17", "7", "0", "\uff17", "008", "7.0000000000", '"7"']
    raw = table(*({"user_id": user, "fact_id": f"f{i}"} for i, user in enumerate(ids)))
    pq.write_table(raw, tmp_path / "text.parquet")
    pq.write_table(raw.set_column(0, "user_id", pa.array([7, 7, 7, 0, 7, 8, 7, 7])), tmp_path / "int.parquet")
    with caplog.at_level("WARNING"):
        result = run(read_fact_log(str(tmp_path)))
    assert sorted({r["user_id"] for r in result.state.to_pylist()}) == ['"7"', "0", "007", "008", "7", "7.0000000000",
                                                                        "8", "\uff17"]
    assert """user_id '"7"' (row 7) is wrapped in double quotes""" in caplog.text and "not the id '7'" in caplog.text
    # a decimal(38, 10) column cast to text: another id than the 7 a decimal column reads as
    assert "user_id '7.0000000000' (row 6) looks like a float's text of an integer (or a decimal's)" in caplog.text
    assert caplog.text.count("is an integer with leading zeros") == 1
    assert "text.parquet: user_id '007' (row 0) is an integer with leading zeros" in caplog.text
    assert caplog.text.count("holds compatibility characters") == 1
    assert "user_id '\uff17' (row 1) holds compatibility characters" in caplog.text and "not the id '7'" in caplog.text


@pytest.mark.parametrize("column", ["user_id", "scope"])
def test_ids_of_one_file_that_differ_only_in_case_are_two_ids_with_one_warning_naming_both(column, tmp_path, caplog):
    """Emails and names as ids: one producer keeps the case a user typed ('Ana.Silva@Example.com'),
    another lowercases it. Ids are read as written (never folded: that would move a stored user's
    facts to another user, or merge two), so they are two users (or two shared scopes), each served
    part of the facts, and nothing said so. One warning per file and column names both ids and their
    rows; ids differing otherwise, and the same id twice, give none."""
    ids = ["ana.silva@example.com", "bo", "Ana.Silva@Example.com", "bo", "ANA.SILVA@EXAMPLE.COM", "Bob"]
    rows = [{column: value, "fact_id": f"f{i}", "user_id": "u1" if column == "scope" else value}
            for i, value in enumerate(ids)]
    pq.write_table(table(*rows), tmp_path / "part-0.parquet")
    with caplog.at_level("WARNING"):
        result = run(read_fact_log(str(tmp_path)))
    owners = {r[column] for r in result.state.to_pylist()}
    assert {"ana.silva@example.com", "Ana.Silva@Example.com", "ANA.SILVA@EXAMPLE.COM"} <= owners  # never folded
    assert caplog.text.count("differ only in case") == 1
    assert (f"part-0.parquet: {column} 'ana.silva@example.com' (row 0) and 'Ana.Silva@Example.com' (row 2) differ only "
            "in case") in caplog.text and "export the ids in one case" in caplog.text
    caplog.clear()
    pq.write_table(table(*[r | {column: r[column].lower()} | ({"user_id": r["user_id"].lower()})
                           for r in rows]), tmp_path / "part-0.parquet")
    with caplog.at_level("WARNING"):
        run(read_fact_log(str(tmp_path)))
    assert "differ only in case" not in caplog.text


def test_text_escaped_for_html_or_json_is_read_as_written_with_one_warning_per_file(tmp_path, caplog):
    """'Tom &amp; Jerry' and 'caf\\u00e9' (six characters) are what a producer that escaped its text
    and did not unescape it writes: compiled as written (a text may hold them on purpose), and
    recalled only with the escape, so the file gets one warning per kind naming column and row."""
    answers = [" AT&T", " Tom &amp; Jerry", " caf\\u00e9", " &#233;t&#233;"]
    pq.write_table(table(*({"fact_id": f"f{i}", "answer": a} for i, a in enumerate(answers))), tmp_path / "x.parquet")
    with caplog.at_level("WARNING"):
        result = run(read_fact_log(str(tmp_path)))
    assert sorted(r["answer"] for r in result.state.to_pylist()) == sorted(answers)
    assert caplog.text.count("holds an HTML entity") == 1 and caplog.text.count("holds a JSON escape") == 1
    assert "answer ' Tom &amp; Jerry' (row 1) holds an HTML entity" in caplog.text
    assert "(row 2) holds a JSON escape" in caplog.text


def test_utf8_text_read_as_windows_1252_upstream_is_read_as_written_with_one_warning_per_file_naming_what_it_was(
        tmp_path, caplog):
    """'CafÃ©' and 'Itâ€™s' are UTF-8 decoded as Windows-1252 or Latin-1 before the log (a CSV, a MySQL
    latin1 connection): valid UTF-8 Parquet, so it was compiled and recalled garbled without a word.
    It is read as written (it could be meant), with one warning per file naming column, row and the
    text it likely was; accented text of real languages gets none."""
    garbled = {"f0": " CafÃ© CrÃ¨me", "f1": " Itâ€™s 5 â‚¬"}
    clean = {"f2": " SÃO PAULO", "f3": " « café »", "f4": " Übermaß", "f5": " Ørsted, Ægir", "f6": " naïve ×2",
             "f7": " Crème brûlée", "f8": " Đà Nẵng", "f9": " la télé\u00a0»", "f10": " CAFÉ’s"}
    rows = [{"fact_id": k, "trigger": f"My word {k} is", "answer": v} for k, v in (garbled | clean).items()]
    pq.write_table(table(*rows), tmp_path / "latin1.parquet")
    with caplog.at_level("WARNING"):
        result = run(read_fact_log(str(tmp_path)))
    stored = garbled | clean | {"f9": " la télé »"}  # the no-break space as every text stores it
    assert live_facts(result.state) == {("alice", k): v for k, v in stored.items()}
    assert caplog.text.count("holds UTF-8 read as Windows-1252 or Latin-1") == 1
    assert "answer ' CafÃ© CrÃ¨me' (row 0) holds UTF-8 read as Windows-1252 or Latin-1" in caplog.text
    assert "decode the source as UTF-8 (it reads ' Café Crème') before writing the log" in caplog.text
    caplog.clear()
    pq.write_table(table({"user_id": "JosÃ©"}), tmp_path / "latin1.parquet")  # an id: another user than José
    with caplog.at_level("WARNING"):
        run(read_fact_log(str(tmp_path)))
    assert ("user_id 'JosÃ©' (row 0) holds UTF-8 read as Windows-1252 or Latin-1 (mojibake: Ã© for é, â€™ for ’): ids "
            "are read as written, so it is not the id 'José' that other exports write") in caplog.text
    caplog.clear()
    pq.write_table(table(*[r for r in rows if r["fact_id"] in clean]), tmp_path / "latin1.parquet")
    with caplog.at_level("WARNING"):
        run(read_fact_log(str(tmp_path)))
    assert "Windows-1252" not in caplog.text


def test_a_text_column_whose_every_value_is_in_double_quotes_is_read_as_written_with_one_warning_naming_it(tmp_path,
                                                                                                          caplog):
    """'"Rex"' in every answer is a CSV's or JSON's quoting left in (ids in quotes were warned of,
    text was not): compiled and recalled with the quotes. One warning per file and column; a file
    where one answer is quoted (a motto) gets none."""
    quoted = {"f0": ' "Rex"', "f1": ' "Tom"', "f2": ' "He said ""hi"""'}
    pq.write_table(table(*({"fact_id": k, "trigger": f"My {k} is", "answer": v} for k, v in quoted.items())),
                   tmp_path / "x.parquet")
    with caplog.at_level("WARNING"):
        result = run(read_fact_log(str(tmp_path)))
    assert live_facts(result.state) == {("alice", k): v for k, v in quoted.items()}
    assert caplog.text.count("wrapped in double quotes") == 1
    assert "every answer of the file is wrapped in double quotes (' \"Rex\"', row 0: a CSV's or JSON's quoting left in)" \
        in caplog.text
    caplog.clear()
    pq.write_table(table({"fact_id": "motto", "answer": ' "Carpe diem"'}, {"fact_id": "dog"}), tmp_path / "x.parquet")
    with caplog.at_level("WARNING"):
        run(read_fact_log(str(tmp_path)))
    assert "double quotes" not in caplog.text


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_file_gone_between_listing_and_reading_is_skipped_not_rejected_nor_a_failure(where, on_bad_file, tmp_path,
                                                                                       request, caplog):
    """A listed file moved or deleted before it is read (a writer's temporary file renamed into
    place, a quarantine, a retention rule on the log bucket) has no rows to reject: it was called
    "not a readable Parquet file", failing the night under on_bad_file='raise' and recording a
    reject for a file that is not there under 'reject'."""
    import io

    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "a"}), buffer)
    if where == "local":
        root = tmp_path / "log"
        root.mkdir()
        for name in ("part-0.parquet", "part-1.parquet"):
            (root / name).write_bytes(buffer.getvalue())
        source = str(root)

        def remove():
            (root / "part-1.parquet").rename(tmp_path / "quarantined.parquet")
    else:
        import boto3

        bucket = request.getfixturevalue("s3_bucket")
        client = boto3.client("s3")
        for name in ("part-0.parquet", "part-1.parquet"):
            client.put_object(Bucket=bucket, Key=f"log/{name}", Body=buffer.getvalue())
        source = f"s3://{bucket}/log"

        def remove():
            client.delete_object(Bucket=bucket, Key="log/part-1.parquet")
    files = list_log_files(source)
    assert len(files) == 2
    remove()
    with caplog.at_level("WARNING", logger="pipeline.ingest"):
        reads = [read_log_file(f, RowRules(max_trigger_tokens=64), 4, on_bad_file=on_bad_file)[0] for f in files]
    assert [(r.rows, r.reject, r.gone) for r in reads] == [(1, None, False), (0, None, True)]
    assert any(f"{files[1].path}: listed, but gone when read" in w for w in reads[1].warnings)
    # the in-process reader, given the same stale listing: the gone file is not among those read
    import pipeline.ingest as ingest_module

    monkeypatch = request.getfixturevalue("monkeypatch")
    monkeypatch.setattr(ingest_module, "list_log_files", lambda source, filesystem=None: files)
    batch = read_fact_log(source, on_bad_file=on_bad_file)
    assert batch.rows.num_rows == 1 and batch.file_rejects.num_rows == 0
    assert [f.path for f in batch.files] == [files[0].path]


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_file_of_forgets_or_deletes_alone_may_leave_out_the_columns_only_upserts_need(on_bad_file, tmp_path):
    """An erasure export holds user_id, op and event_time (a delete export adds fact_id): the
    columns a forget or a delete does not use were required, and the whole file was refused, its
    forgets never applied. A file with a row that needs a left-out column is refused naming the
    row, and a near miss of it (``Answer``) is still refused naming the rename."""
    prior = run(table({"user_id": "alice", "fact_id": "pet"}, {"user_id": "alice", "fact_id": "car"},
                      {"user_id": "bob", "fact_id": "pet"}, {"user_id": "carol", "fact_id": "pet"})).state
    later = pa.array([T0 + timedelta(hours=1)] * 2, pa.timestamp("us", tz="UTC"))
    log = tmp_path / "log"
    log.mkdir()
    pq.write_table(pa.table({"user_id": ["bob", "carol"], "op": ["forget_user", "FORGET_USER"], "event_time": later}),
                   log / "erasures.parquet")
    pq.write_table(pa.table({"user_id": ["alice", "alice"], "fact_id": ["car", "car"], "op": ["delete", "forget_user"],
                             "event_time": later}).slice(0, 1), log / "deletes.parquet")
    batch = read_fact_log(str(log), on_bad_file=on_bad_file)
    assert batch.file_rejects.num_rows == 0 and batch.rows.num_rows == 3
    result = run(batch, prior)
    assert result.accepted == 3 and result.rejected == 0
    assert live_facts(result.state) == {("alice", "pet"): " Rex"} and result.forgotten_users == {"bob", "carol"}

    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"user_id": ["bob", "alice"], "fact_id": ["x", "pet"], "op": ["forget_user", "upsert"],
                             "event_time": later}), bad / "part-0.parquet")
    pq.write_table(pa.table({"user_id": ["bob"], "op": ["delete"], "event_time": later[:1]}), bad / "part-1.parquet")
    pq.write_table(pa.table({"user_id": ["bob"], "fact_id": [None], "op": ["forget_user"], "trigger": [None],
                             "Answer": [None], "event_time": later[:1]}, ), bad / "part-2.parquet")
    expected = [("part-0", "missing required column 'trigger'.*row 1 is 'upsert', which needs it"),
                ("part-1", "missing required column 'fact_id'.*row 0 is 'delete', which needs it"),
                ("part-2", "missing required column 'answer'.*rename 'Answer' to 'answer'")]
    if on_bad_file == "raise":
        for name, message in expected:
            with pytest.raises(FactLogError, match=f"{name}.parquet: {message}"):
                read_fact_log(str(bad / f"{name}.parquet"))
    else:
        rejects = read_fact_log(str(bad), on_bad_file="reject").file_rejects.to_pylist()
        assert [r["reason"] for r in rejects] == ["SCHEMA_MISMATCH"] * 3
        for reject, (name, message) in zip(rejects, expected):
            assert reject["source"].endswith(f"{name}.parquet") and re.search(message, reject["detail"])


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_an_s3_log_object_replaced_between_listing_and_reading_is_read_as_it_is_now(on_bad_file, s3_bucket, caplog):
    """An export re-run in place (Spark's overwrite, a re-sent day) replaces an object after the
    night listed it: it was read at the listed size, its footer missed, and the good file failed
    the night (or was rejected) as "not a readable Parquet file"."""
    import io

    import boto3

    def parquet(*fact_ids):
        buffer = io.BytesIO()
        pq.write_table(table(*({"fact_id": f} for f in fact_ids)), buffer)
        return buffer.getvalue()

    client = boto3.client("s3")
    client.put_object(Bucket=s3_bucket, Key="log/part-0.parquet", Body=parquet("a"))
    [listed] = list_log_files(f"s3://{s3_bucket}/log")
    client.put_object(Bucket=s3_bucket, Key="log/part-0.parquet", Body=parquet("a", "b", "c"))
    read, rows = read_log_file(listed, RowRules(max_trigger_tokens=64), 4, on_bad_file=on_bad_file)
    assert read.reject is None and read.rows == 3
    assert sorted(rows.column("fact_id").to_pylist()) == ["a", "b", "c"]
    assert any("replaced since the listing; read as it is now" in w for w in read.warnings)
    # the file as read is what a night records as ingested: the next listing finds it so, reads nothing again
    [relisted] = list_log_files(f"s3://{s3_bucket}/log")
    assert read.file.size == relisted.size != listed.size and relisted.ingested_as(read.file.identity())


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_a_damaged_byte_in_a_log_file_with_page_checksums_rejects_the_file_not_publishes_the_damage(on_bad_file,
                                                                                                   tmp_path):
    """Spark and parquet-mr (and pyarrow with write_page_checksum) store a CRC of every page. A byte
    flipped after the file was written (a bad disk, copy or transfer) in an uncompressed page read as
    other text: 'Lisbon' became 'Misbon' and was published, as pyarrow does not check the CRCs unless
    asked. Pages are checked: the file is UNREADABLE_FILE saying it is damaged and to copy it again,
    not ingested (read again once replaced); the other files are read."""
    rows = table({"fact_id": "dentist", "answer": " Akeredolu"}, {"fact_id": "city", "answer": " Lisbon"},
                 {"fact_id": "bank", "answer": " Monzo"})  # Lisbon neither min nor max: only in the page's data
    pq.write_table(rows, tmp_path / "part-0.parquet", compression="none", use_dictionary=False,
                   write_page_checksum=True)
    pq.write_table(table({"fact_id": "kept"}), tmp_path / "part-1.parquet")
    data = bytearray((tmp_path / "part-0.parquet").read_bytes())
    data[data.index(b"Lisbon")] ^= 0x01  # 'L' -> 'M'
    (tmp_path / "part-0.parquet").write_bytes(bytes(data))
    if on_bad_file == "raise":
        with pytest.raises(FactLogError, match=re.escape(str(tmp_path / "part-0.parquet")) + ".*checksum"):
            read_fact_log(str(tmp_path))
        return
    read = read_fact_log(str(tmp_path), on_bad_file="reject")
    assert read.rows.column("fact_id").to_pylist() == ["kept"]
    [reject] = read.file_rejects.to_pylist()
    assert reject["source"] == str(tmp_path / "part-0.parquet") and reject["reason"] == "UNREADABLE_FILE"
    assert "checksum" in reject["detail"] and "damaged" in reject["detail"] and "copy it again" in reject["detail"]
    for file in list_log_files(str(tmp_path)):
        got, keyed = read_log_file(file, RowRules(max_trigger_tokens=64), 4, on_bad_file="reject")
        assert (got.reject is not None) == file.path.endswith("part-0.parquet")
        assert "Misbon" not in str(keyed.column("answer").to_pylist())


def _encrypted_parquet(rows: pa.Table, path: Path, plaintext_footer: bool) -> None:
    """``rows`` written with Parquet modular encryption (pyarrow's; keys wrapped by an in-memory KMS:
    the night holds none either way). With ``plaintext_footer`` the schema reads, the pages do not."""
    import base64

    import pyarrow.parquet.encryption as pe

    class Kms(pe.KmsClient):
        def __init__(self, config):
            super().__init__()

        def wrap_key(self, key_bytes, master_key_identifier):
            return base64.b64encode(key_bytes)

        def unwrap_key(self, wrapped_key, master_key_identifier):
            return base64.b64decode(wrapped_key)

    config = pe.EncryptionConfiguration(footer_key="footer", column_keys={"answers": ["answer"]},
                                        plaintext_footer=plaintext_footer)
    props = pe.CryptoFactory(Kms).file_encryption_properties(pe.KmsConnectionConfig(), config)
    with pq.ParquetWriter(path, rows.schema, encryption_properties=props) as writer:
        writer.write_table(rows)


def _lzo_parquet(rows: pa.Table, path: Path) -> None:
    """``rows`` in a file whose column chunks say LZO (as Hadoop-era Hive tables are written; pyarrow
    writes no LZO): written with gzip, then each column chunk's codec field in the footer (Thrift compact:
    field header 0x15, zigzag varint 2 = gzip) set to 3 = LZO, where that changes the codec alone."""
    import struct

    pq.write_table(rows, path, compression="gzip")
    data = bytearray(path.read_bytes())
    start = len(data) - 8 - struct.unpack("<i", data[-8:-4])[0]
    want = pq.ParquetFile(path)
    patched = bytearray(data)
    for i in range(start, len(data) - 9):
        if data[i:i + 2] != b"\x15\x04":
            continue
        trial = bytearray(data)
        trial[i + 1] = 0x06
        path.write_bytes(bytes(trial))
        try:
            got = pq.ParquetFile(path)
        except Exception:
            continue
        codecs = [got.metadata.row_group(0).column(c).compression for c in range(got.metadata.num_columns)]
        if got.schema_arrow == want.schema_arrow and "LZO" in codecs:
            patched[i + 1] = 0x06
    path.write_bytes(bytes(patched))
    meta = pq.ParquetFile(path).metadata
    assert {meta.row_group(0).column(c).compression for c in range(meta.num_columns)} == {"LZO"}


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_encrypted_and_lzo_files_are_rejected_saying_what_they_are_and_how_to_rewrite_them(on_bad_file, tmp_path):
    """Other tools write Parquet the night cannot read though nothing is damaged: with modular
    encryption (its footer encrypted, or plaintext with encrypted pages) and compressed with LZO
    (Hadoop-era Hive tables). Each was UNREADABLE_FILE with pyarrow's words alone ("no decryption found
    in reader's properties", "currently not supported by the C++ implementation"); the message says
    what the file is and how to write it instead, and the other files are read."""
    _encrypted_parquet(table({"fact_id": "a"}), tmp_path / "part-0.parquet", plaintext_footer=False)
    _encrypted_parquet(table({"fact_id": "b"}), tmp_path / "part-1.parquet", plaintext_footer=True)
    _lzo_parquet(table({"fact_id": "c"}), tmp_path / "part-2.parquet")
    pq.write_table(table({"fact_id": "kept"}), tmp_path / "part-3.parquet")
    encrypted = r"encrypted \(Parquet modular encryption\).*write the fact log unencrypted"
    lzo = "compressed with LZO.*rewrite the file with zstd, snappy or gzip"
    if on_bad_file == "raise":
        for name, words in [("part-0", encrypted), ("part-1", encrypted), ("part-2", lzo)]:
            with pytest.raises(FactLogError, match=re.escape(str(tmp_path / name)) + ".*" + words):
                read_fact_log(str(tmp_path / f"{name}.parquet"))
        return
    read = read_fact_log(str(tmp_path), on_bad_file="reject")
    assert read.rows.column("fact_id").to_pylist() == ["kept"]
    rejects = {Path(r["source"]).stem: r for r in read.file_rejects.to_pylist()}
    assert sorted(rejects) == ["part-0", "part-1", "part-2"]
    assert {r["reason"] for r in rejects.values()} == {"UNREADABLE_FILE"}
    for name, words in [("part-0", encrypted), ("part-1", encrypted), ("part-2", lzo)]:
        assert re.search(words, rejects[name]["detail"]), rejects[name]["detail"]
        assert "not recorded as ingested" in rejects[name]["detail"]


@pytest.mark.parametrize("codec, where", [(codec, "page end") for codec in ["snappy", "zstd", "gzip", "brotli", "lz4"]]
                         + [("none", "page header"), ("none", "page size")])
def test_a_page_damaged_after_writing_is_called_damaged_with_the_fix(codec, where, tmp_path):
    """Bytes flipped inside a page (no page checksums) failed with pyarrow's words alone: in a compressed
    page the codec's ("Corrupt snappy compressed data.", "ZSTD decompression failed", "GZipCodec
    failed", "Page didn't decompress to expected size"), in a page header Thrift's ("Deserializing page
    header failed", "Unexpected end of stream: Page was smaller than expected"). The file is
    UNREADABLE_FILE saying it was damaged and to copy it again, not ingested; the other files are read."""
    rows = table(*({"fact_id": f"fact-{i:05d}", "answer": " " + "x" * 40 + str(i)} for i in range(2000)))
    path = tmp_path / "part-0.parquet"
    pq.write_table(rows, path, compression=codec, use_dictionary=False)
    pq.write_table(table({"fact_id": "kept"}), tmp_path / "part-1.parquet")
    meta = pq.ParquetFile(path).metadata.row_group(0)
    column = meta.column(rows.column_names.index("answer"))
    end = column.data_page_offset + column.total_compressed_size
    first = {"page end": end - 200, "page header": column.data_page_offset, "page size": column.data_page_offset + 20}[where]
    data = bytearray(path.read_bytes())
    for i in range(first, first + (100 if where == "page end" else 4)):
        data[i] ^= 0x5A if where == "page end" else 0xA5
    path.write_bytes(bytes(data))
    read = read_fact_log(str(tmp_path), on_bad_file="reject")
    assert read.rows.column("fact_id").to_pylist() == ["kept"]
    [reject] = read.file_rejects.to_pylist()
    assert reject["source"] == str(path) and reject["reason"] == "UNREADABLE_FILE"
    assert "damaged after it was written" in reject["detail"] and "copy it again" in reject["detail"], reject["detail"]


def test_the_unreadable_file_hints_read_pyarrows_words_not_the_path():
    """Errors whose text holds the path (a local open refused; the sized reader of a store without
    Content-Length: "Could not open Parquet input source '<path>': ...") get no encryption hint for a
    folder named encrypted; a pyarrow built without a codec says to install the standard wheel, not to
    rewrite the file with the codec it lacks."""
    from pipeline.ingest import _unsupported

    assert _unsupported(OSError("[Errno 13] Failed to open local file '/data/encrypted/part-0.parquet'. "
                                "Detail: [errno 13] Permission denied")) == ""
    assert _unsupported(OSError("Could not open Parquet input source 's3://b/decrypted/part-0.parquet': Parquet "
                                "magic bytes not found in footer.")) == ""
    assert "modular encryption" in _unsupported(OSError(
        "Could not open Parquet input source 's3://b/x/part-0.parquet': Could not read encrypted metadata, no "
        "decryption found in reader's properties"))
    hint = _unsupported(OSError("Support for codec 'zstd' not built"))
    assert "built without zstd" in hint and "install the standard pyarrow wheel" in hint and "rewrite" not in hint


def test_a_file_under_a_folder_named_encrypted_is_not_called_encrypted(tmp_path):
    """The encryption hint reads pyarrow's own words, not the word anywhere in the error (whose text
    may hold the path): a file cut short and a CSV named .parquet under ``encrypted/`` get their own
    messages. An encrypted file cut short (it begins with PARE, not PAR1) is called cut short, not a
    file of another format."""
    import io

    folder = tmp_path / "encrypted"
    folder.mkdir()
    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "a"}, {"fact_id": "b"}), buffer)
    (folder / "part-0.parquet").write_bytes(buffer.getvalue()[:-40])
    (folder / "part-1.parquet").write_text("user_id,fact_id\nu1,a\n")
    _encrypted_parquet(table({"fact_id": "c"}), tmp_path / "whole.parquet", plaintext_footer=False)
    (folder / "part-2.parquet").write_bytes((tmp_path / "whole.parquet").read_bytes()[:-40])
    (tmp_path / "whole.parquet").unlink()
    read = read_fact_log(str(folder), on_bad_file="reject")
    details = {Path(r["source"]).stem: r["detail"] for r in read.file_rejects.to_pylist()}
    assert sorted(details) == ["part-0", "part-1", "part-2"]
    assert not any("modular encryption" in d for d in details.values()), details
    assert "ends before its Parquet footer" in details["part-0"] and "ends before its Parquet footer" in details["part-2"]
    assert "does not begin as a Parquet file does" in details["part-1"]


def test_a_file_cut_short_or_still_being_written_is_told_from_a_file_of_another_format(tmp_path):
    """A Parquet file without its footer (written last: a writer still at work, an interrupted copy)
    and a CSV named .parquet were both "not a readable Parquet file" with pyarrow's words alone
    ("magic bytes not found in footer"), and the fix said to fix or move the file: a file in flight
    needs neither. The message says which it is, and for one in flight that a later night reads it."""
    import io
    import os
    import time

    buffer = io.BytesIO()
    pq.write_table(table({"fact_id": "a"}, {"fact_id": "b"}), buffer)
    whole = buffer.getvalue()
    (tmp_path / "writing.parquet").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "copied.parquet").write_bytes(whole[:-20])
    hours_ago = time.time() - 7200
    os.utime(tmp_path / "copied.parquet", (hours_ago, hours_ago))
    (tmp_path / "export.parquet").write_text("user_id,fact_id,op\nu1,a,upsert\n")
    (tmp_path / "started.parquet").write_bytes(b"")
    cut_short = "the file ends before its Parquet footer, which is written last: cut short by an interrupted copy"
    for name, expected, unexpected in (
            ("writing", [cut_short, r"still being written; it was modified \d+ s ago. A night reads it again once "
                                    "it is whole"], []),
            ("copied", [cut_short, "or still being written. A night reads it again"], ["modified"]),
            ("started", [cut_short, r"it was modified \d+ s ago"], []),
            ("export", ["it does not begin as a Parquet file does (its first bytes: b'user'): a file of another "
                        "format (CSV, JSON, text) in the log? Move it out"], [cut_short])):
        with pytest.raises(FactLogError) as raised:
            read_fact_log(str(tmp_path / f"{name}.parquet"))
        for words in expected:
            assert re.search(words if "\\d" in words else re.escape(words), str(raised.value)), str(raised.value)
        for words in unexpected:
            assert words not in str(raised.value), str(raised.value)
    rejects = read_fact_log(str(tmp_path), on_bad_file="reject").file_rejects.to_pylist()
    assert [(r["reason"], cut_short in r["detail"]) for r in rejects] == [
        ("UNREADABLE_FILE", True), ("UNREADABLE_FILE", False), ("UNREADABLE_FILE", True), ("UNREADABLE_FILE", True)]
