"""Arrow schemas of the fact log, the fact state and the rejects table, with reason codes.

The fact log is what customers write (one row per event); the fact state is the set of live
facts after applying every accepted event; the rejects table holds every input row (or bad
input file) that did not make it into the state, each with a reason code from ``REASONS``.
"""

from __future__ import annotations

import hashlib
import json
import re

import pyarrow as pa

from engram_core.text import canonical_id

FACT_SCHEMA_VERSION = 1

OP_UPSERT = "upsert"
OP_DELETE = "delete"
OP_FORGET_USER = "forget_user"
OPS = (OP_UPSERT, OP_DELETE, OP_FORGET_USER)
# Order of application among events with the same event_time: a forget beats a delete beats
# an upsert, so "forget me" sent in the same instant as a new fact is never undone.
OP_PRECEDENCE = {OP_UPSERT: 0, OP_DELETE: 1, OP_FORGET_USER: 2}

MAX_ID_CHARS = 256

TIMESTAMP = pa.timestamp("us", tz="UTC")

# The fact log as normalised by ingest (columns a customer writes).
FACT_LOG_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string()),
        pa.field("fact_id", pa.string()),
        pa.field("op", pa.string()),
        pa.field("trigger", pa.string()),
        pa.field("answer", pa.string()),
        pa.field("event_time", TIMESTAMP),
        pa.field("scope", pa.string()),
    ],
    metadata={"engram.schema": "fact_log", "engram.schema_version": str(FACT_SCHEMA_VERSION)},
)
REQUIRED_LOG_COLUMNS = ("user_id", "fact_id", "op", "trigger", "answer", "event_time")
OPTIONAL_LOG_COLUMNS = ("scope",)

# Provenance and per-row read problems added by ingest.read_fact_log.
PROVENANCE_FIELDS = [
    pa.field("_source", pa.string()),
    pa.field("_row", pa.int64()),
    # A problem found while normalising the row (e.g. invalid UTF-8), as reason + detail.
    pa.field("_problem_reason", pa.string()),
    pa.field("_problem_detail", pa.string()),
]
FACT_LOG_BATCH_SCHEMA = pa.schema(list(FACT_LOG_SCHEMA) + PROVENANCE_FIELDS)

FACT_STATE_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("fact_id", pa.string(), nullable=False),
        pa.field("scope", pa.string(), nullable=False),
        pa.field("trigger", pa.string(), nullable=False),
        pa.field("answer", pa.string(), nullable=False),
        pa.field("event_time", TIMESTAMP, nullable=False),
        pa.field("fact_hash", pa.string(), nullable=False),
    ],
    metadata={"engram.schema": "fact_state", "engram.schema_version": str(FACT_SCHEMA_VERSION)},
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string()),
        pa.field("row", pa.int64()),  # null when a whole file was rejected (rows unknown)
        pa.field("user_id", pa.string()),
        pa.field("fact_id", pa.string()),
        pa.field("op", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ],
    metadata={"engram.schema": "rejects", "engram.schema_version": str(FACT_SCHEMA_VERSION)},
)

# --- Reason codes -------------------------------------------------------------------------
MISSING_USER_ID = "MISSING_USER_ID"
BAD_USER_ID = "BAD_USER_ID"
MISSING_FACT_ID = "MISSING_FACT_ID"
BAD_FACT_ID = "BAD_FACT_ID"
BAD_SCOPE = "BAD_SCOPE"
UNKNOWN_OP = "UNKNOWN_OP"
EMPTY_TRIGGER = "EMPTY_TRIGGER"
EMPTY_ANSWER = "EMPTY_ANSWER"
TRIGGER_TOO_LONG = "TRIGGER_TOO_LONG"
ANSWER_TOO_LONG = "ANSWER_TOO_LONG"
CONTROL_CHARACTERS = "CONTROL_CHARACTERS"
INVALID_UTF8 = "INVALID_UTF8"
MISSING_EVENT_TIME = "MISSING_EVENT_TIME"
BAD_EVENT_TIME = "BAD_EVENT_TIME"
FUTURE_EVENT_TIME = "FUTURE_EVENT_TIME"
DUPLICATE = "DUPLICATE"
CONFLICTING_DUPLICATE = "CONFLICTING_DUPLICATE"
SUPERSEDED = "SUPERSEDED"
UNREADABLE_FILE = "UNREADABLE_FILE"
SCHEMA_MISMATCH = "SCHEMA_MISMATCH"

REASONS: dict[str, str] = {
    MISSING_USER_ID: "user_id is null or empty",
    BAD_USER_ID: "user_id is unusable: over 256 chars, control characters or invalid UTF-8 (invisible format "
                 "characters are removed first: engram_core.text.canonical_id)",
    MISSING_FACT_ID: "fact_id is null or empty on an upsert or delete",
    BAD_FACT_ID: "fact_id is unusable: over 256 chars, control characters or invalid UTF-8",
    BAD_SCOPE: "scope is unusable: over 256 chars, control characters or invalid UTF-8",
    UNKNOWN_OP: "op is not one of upsert, delete, forget_user",
    EMPTY_TRIGGER: "trigger of an upsert is null, empty or only whitespace",
    EMPTY_ANSWER: "answer of an upsert is null, empty or only whitespace",
    TRIGGER_TOO_LONG: "trigger is over the token limit or over max_text_chars characters",
    ANSWER_TOO_LONG: "answer is over the compiler's token limit (max_answer_tokens, 128 by default) or over "
                     "max_text_chars characters",
    CONTROL_CHARACTERS: "trigger or answer holds control characters other than tab and newline",
    INVALID_UTF8: "trigger or answer is not valid UTF-8",
    MISSING_EVENT_TIME: "event_time is null",
    BAD_EVENT_TIME: "event_time could not be read as a timestamp",
    FUTURE_EVENT_TIME: "event_time is more than a day after the run's clock",
    DUPLICATE: "exact copy of another event (same user, fact, time, content); one copy kept",
    CONFLICTING_DUPLICATE: "same user, fact and event_time as another event with other content",
    SUPERSEDED: "valid, but a later event (in the batch or the prior state) for the fact wins",
    UNREADABLE_FILE: "a whole input file is not readable Parquet (its rows are unknown)",
    SCHEMA_MISMATCH: "a whole input file lacks a required column or has an uncastable type",
}

# Control characters (C0 and DEL, C1) other than tab and newline.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
CONTROL_CHARS_REGEX = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # the same, for pyarrow.compute


def has_control_characters(text: str) -> bool:
    """True if ``text`` holds a control character other than tab and newline."""
    return _CONTROL_RE.search(text) is not None


def id_problem(name: str, value: str | None) -> str | None:
    """Why an identifier (user_id, fact_id, scope) is unusable, in plain words, or None.

    Path-like ids (``../x``, ``a/b``) are deliberately allowed: they are opaque ids and the
    modules that build keys from them must encode them, never use them raw.
    """
    if value is None or value == "":
        return f"{name} is empty"
    if len(value) > MAX_ID_CHARS:
        return f"{name} is {len(value)} characters long (limit {MAX_ID_CHARS})"
    if has_control_characters(value) or "\t" in value or "\n" in value:
        return f"{name} holds control characters"
    if value != canonical_id(value):
        return f"{name} is not in canonical form (invisible characters, NFD, or surrounding spaces: see engram_core.text)"
    return None


def fact_hash(scope: str, trigger: str, answer: str) -> str:
    """sha256 of (scope, trigger, answer); JSON framing so no two triples share an encoding."""
    framed = json.dumps([scope, trigger, answer], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(framed.encode("utf-8")).hexdigest()


def empty_fact_state() -> pa.Table:
    return FACT_STATE_SCHEMA.empty_table()


def empty_rejects() -> pa.Table:
    return REJECTS_SCHEMA.empty_table()


class SchemaMismatch(ValueError):
    """A table does not conform to a schema; the message names the column and the fix."""


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Select and safely cast ``table``'s columns to ``schema`` (extra columns dropped).

    Raises SchemaMismatch naming the missing column or the column whose cast would lose data.
    """
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaMismatch(f"{what}: missing column {field.name!r} ({field.type})")
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
                raise SchemaMismatch(
                    f"{what}: column {field.name!r} is {column.type}, expected {field.type} "
                    f"and it cannot be cast without loss ({err})"
                ) from err
        if not field.nullable and column.null_count:
            raise SchemaMismatch(f"{what}: column {field.name!r} holds {column.null_count} nulls")
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=schema)


def validate_fact_state(table: pa.Table) -> pa.Table:
    """Conform a fact state read back from storage; raises SchemaMismatch if it cannot."""
    return conform(table, FACT_STATE_SCHEMA, "fact state")


def encode_fact_state(table: pa.Table) -> bytes:
    """Parquet (zstd) bytes of a fact-state shard; the same table always gives the same bytes."""
    import io

    import pyarrow.parquet as pq

    table = validate_fact_state(table).sort_by([("user_id", "ascending"), ("fact_id", "ascending")])
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=3, use_dictionary=False,
                   row_group_size=max(table.num_rows, 1))
    return sink.getvalue()


def decode_fact_state(data: bytes, *, source: str = "fact state") -> pa.Table:
    """Parse a fact-state shard and conform it to FACT_STATE_SCHEMA (errors name ``source``)."""
    import pyarrow as _pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(_pa.BufferReader(data))
    except _pa.ArrowInvalid as err:
        raise SchemaMismatch(f"{source}: not a readable Parquet fact state ({err})") from err
    return conform(table, FACT_STATE_SCHEMA, source)
