"""Arrow schemas of the fact log, the fact state and the rejects table, with reason codes.

The fact log is what customers write (one row per event); the fact state is the set of live
facts after applying every accepted event; the rejects table holds every input row (or bad
input file) that did not make it into the state, each with a reason code from ``REASONS``.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.compute as pc

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
# The event times ingest accepts. Earlier or later values come from a wrapped or mis-scaled
# conversion (INT96 read in nanoseconds, seconds taken for ms) or a placeholder (.NET's
# 0001-01-01), never from a person stating a fact; 1900 is also where Spark's legacy calendar
# rebasing of timestamps starts to matter.
MIN_EVENT_TIME = datetime(1900, 1, 1, tzinfo=timezone.utc)
MAX_EVENT_TIME = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MIN_EVENT_MICROS = (MIN_EVENT_TIME - _EPOCH) // timedelta(microseconds=1)
MAX_EVENT_MICROS = (MAX_EVENT_TIME - _EPOCH) // timedelta(microseconds=1)

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

# Tombstones: what a shard remembers of deletes and forgets, so that an older event arriving on
# a later night cannot bring a deleted fact or a forgotten user back. A delete tombstone holds the
# (user_id, fact_id) and the delete's event_time while the fact stays deleted (a later upsert
# replaces it with the live fact, whose own event_time then guards). A forget tombstone holds only
# the sha256 of the user_id (versions.layout.forgotten_id: the raw id is erased) and the time of
# the latest forget; it is kept for good. ``user_xxh64`` (the user's shard hash, xxh64 of the id)
# routes every tombstone to its shard whatever the number of shards (resharding).
TOMBSTONE_SCHEMA = pa.schema(
    [
        pa.field("user_hash", pa.string(), nullable=False),  # sha256 hex of user_id
        pa.field("user_xxh64", pa.uint64(), nullable=False),  # xxh64 of user_id: shard = this mod num_shards
        pa.field("user_id", pa.string()),  # null on a forget tombstone
        pa.field("fact_id", pa.string()),  # null on a forget tombstone
        pa.field("op", pa.string(), nullable=False),  # OP_DELETE or OP_FORGET_USER
        pa.field("event_time", TIMESTAMP, nullable=False),
    ],
    metadata={"engram.schema": "tombstones", "engram.schema_version": str(FACT_SCHEMA_VERSION)},
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
INEXACT_NUMBER = "INEXACT_NUMBER"
MISSING_EVENT_TIME = "MISSING_EVENT_TIME"
BAD_EVENT_TIME = "BAD_EVENT_TIME"
EVENT_TIME_OUT_OF_RANGE = "EVENT_TIME_OUT_OF_RANGE"
FUTURE_EVENT_TIME = "FUTURE_EVENT_TIME"
DUPLICATE = "DUPLICATE"
CONFLICTING_DUPLICATE = "CONFLICTING_DUPLICATE"
SUPERSEDED = "SUPERSEDED"
FORGOTTEN_USER = "FORGOTTEN_USER"
UNREADABLE_FILE = "UNREADABLE_FILE"
SCHEMA_MISMATCH = "SCHEMA_MISMATCH"

REASONS: dict[str, str] = {
    MISSING_USER_ID: "user_id is null or empty",
    BAD_USER_ID: "user_id is unusable: over 256 chars, control characters or invalid UTF-8 (invisible format "
                 "characters are removed first: engram_core.text.canonical_id), a float id too large to be exact, or "
                 "a missing value written as text ('nan', 'None', 'null', '<NA>', 'NaT'; on an upsert also 'undefined', "
                 "'#N/A', ...), on an upsert a placeholder for no one in particular ('anonymous', 'guest', 'unknown') "
                 "or U+FFFD (bytes an earlier tool could not decode)",
    MISSING_FACT_ID: "fact_id is null or empty on an upsert or delete",
    BAD_FACT_ID: "fact_id is unusable: over 256 chars, control characters or invalid UTF-8, a float id too large "
                 "to be exact, a missing value written as text ('nan', 'None', ...; on an upsert also 'undefined', "
                 "'#N/A', ...), or on an upsert U+FFFD",
    BAD_SCOPE: "scope is unusable: over 256 chars, control characters or invalid UTF-8, a float id too large to be "
               "exact, or on an upsert U+FFFD or a word for the user's own facts ('personal', 'private', 'user', ...)",
    UNKNOWN_OP: "op is not one of upsert, delete, forget_user",
    EMPTY_TRIGGER: "trigger of an upsert is null, empty or only whitespace",
    EMPTY_ANSWER: "answer of an upsert is null, empty or only whitespace",
    TRIGGER_TOO_LONG: "trigger is over the token limit or over max_text_chars characters",
    ANSWER_TOO_LONG: "answer is over the compiler's token limit (max_answer_tokens, 128 by default) or over "
                     "max_text_chars characters",
    CONTROL_CHARACTERS: "trigger or answer holds control characters other than tab and newline",
    INVALID_UTF8: "op, trigger or answer is not valid UTF-8 (whatever the column's physical type), or an upsert's "
                  "trigger or answer holds U+FFFD, the replacement character a decoder wrote for bytes that were not "
                  "UTF-8 before the log was written",
    INEXACT_NUMBER: "trigger or answer is a float whole number beyond the type's exact range (float16 2^11, float32 "
                    "2^24, float64 2^53; below 1e21): the digits the writer meant are lost; write the column as int64 "
                    "or string",
    MISSING_EVENT_TIME: "event_time is null, or a text that is a missing value ('', NaT, None, null, nan, 0000-00-00)",
    BAD_EVENT_TIME: "event_time text is not ISO-8601 / RFC 3339 / RFC 2822 (or not UTF-8); numbers (seconds or ms?) "
                    "and day/month dates (01/02/2026) are refused",
    EVENT_TIME_OUT_OF_RANGE: "event_time is before 1900-01-01 or after 9999-12-31: a wrapped, mis-scaled or placeholder time",
    FUTURE_EVENT_TIME: "event_time is more than a day after the run's clock",
    DUPLICATE: "exact copy of another event (same user, fact, time, content); one copy kept",
    CONFLICTING_DUPLICATE: "same user, fact and event_time as another event with other content",
    SUPERSEDED: "valid, but a later event (in the batch, the prior state or a delete tombstone) for the fact wins",
    FORGOTTEN_USER: "an event of a forgotten user that is not later than the forget (forgetting is permanent)",
    UNREADABLE_FILE: "a whole input file is not readable Parquet, or a broken symbolic link (its rows are unknown)",
    SCHEMA_MISMATCH: "a whole input file lacks a required column or has an uncastable type",
}

# Control characters (C0 and DEL, C1) other than tab and newline.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
CONTROL_CHARS_REGEX = r"[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # the same, for pyarrow.compute


FUTURE_TOLERANCE = timedelta(days=1)
"""How far past the ingest's clock an event_time may be (client clocks run ahead): later ones are
rejected (FUTURE_EVENT_TIME). An operator's forget covers events up to this far past its own time."""


def has_control_characters(text: str) -> bool:
    """True if ``text`` holds a control character other than tab and newline."""
    return _CONTROL_RE.search(text) is not None


def first_control_character(text: str) -> int:
    """Index of the first control character other than tab and newline (-1: none)."""
    match = _CONTROL_RE.search(text)
    return match.start() if match else -1


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
        at = min(i for i in (first_control_character(value), value.find("\t"), value.find("\n")) if i >= 0)
        code = ord(value[at])
        what = {0: "a C string's NUL", 9: "a tab pasted or joined into the id", 10: "a newline pasted or joined into the id",
                13: "a carriage return (a Windows line end) pasted or joined into the id"}.get(code, "a control character")
        return (f"{name} holds control characters (U+{code:04X} at character {at}: {what}; ids allow none, tab and "
                f"newline included): remove it")
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


def empty_tombstones() -> pa.Table:
    return TOMBSTONE_SCHEMA.empty_table()


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


def encode_table(table: pa.Table, schema: pa.Schema, what: str, sort_keys: list[str]) -> bytes:
    """Parquet (zstd) bytes of ``table`` conformed to ``schema`` and sorted: the same rows always
    give the same bytes (so the same content-addressed key)."""
    import io

    import pyarrow.parquet as pq

    table = conform(table, schema, what).sort_by([(key, "ascending") for key in sort_keys])
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", compression_level=3, use_dictionary=False,
                   row_group_size=max(table.num_rows, 1))
    return sink.getvalue()


def decode_table(data: bytes, schema: pa.Schema, what: str, source: str) -> pa.Table:
    """Parse Parquet bytes written by :func:`encode_table` and conform them to ``schema``; raises
    SchemaMismatch naming ``source`` for unreadable bytes or a missing column."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as err:
        raise SchemaMismatch(f"{source}: not a readable Parquet {what} ({err})") from None
    return conform(table, schema, source)


def encode_fact_state(table: pa.Table) -> bytes:
    """Parquet (zstd) bytes of a fact-state shard; the same table always gives the same bytes."""
    return encode_table(table, FACT_STATE_SCHEMA, "fact state", ["user_id", "fact_id"])


def decode_fact_state(data: bytes, *, source: str = "fact state") -> pa.Table:
    """Parse a fact-state shard and conform it to FACT_STATE_SCHEMA (errors name ``source``)."""
    return decode_table(data, FACT_STATE_SCHEMA, "fact state", source)


def encode_tombstones(table: pa.Table) -> bytes:
    """Parquet (zstd) bytes of a shard's tombstones, sorted; the same table always gives the same bytes."""
    return encode_table(table, TOMBSTONE_SCHEMA, "tombstones", ["user_hash", "fact_id"])


def decode_tombstones(data: bytes, *, source: str = "tombstones") -> pa.Table:
    """Parse a shard's tombstones object and conform it to TOMBSTONE_SCHEMA (errors name ``source``)."""
    return decode_table(data, TOMBSTONE_SCHEMA, "tombstones", source)


# --- Layered fact state ---------------------------------------------------------------------
#
# A shard's fact state and tombstones are a base plus state layers. A layer holds, for every user
# whose facts or tombstones changed that night, all of the user's facts and all of its tombstones
# (either may be empty). Which users a layer replaces follows from its rows: a user with facts or a
# delete tombstone in it (by user_id), and for tombstones every user_hash in it or of a user with
# facts in it. A forget tombstone holds only the hash, so it removes the user's older facts by the
# hash of their user_id (computed only for layers that hold a forget).


def _user_hashes(user_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    return pa.array([hashlib.sha256(u.encode("utf-8")).hexdigest() for u in user_ids.to_pylist()], pa.string())


def _unique(values) -> pa.Array:
    return pc.unique(values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values)


def merge_state_chain(state: pa.Table, tombstones: pa.Table, layers: list[tuple[pa.Table, pa.Table]]) -> tuple[pa.Table, pa.Table]:
    """The merged fact state and tombstones of a base (``state``, ``tombstones``) and its state
    layers ((facts, tombstones) per layer, oldest first), sorted as the encoders sort them."""
    for layer_state, layer_tombstones in layers:
        layer_users = _unique(layer_state.column("user_id"))
        ids = _unique(pa.chunked_array([layer_users, pc.drop_null(layer_tombstones.column("user_id"))], pa.string()))
        hashes = _unique(pa.chunked_array([layer_tombstones.column("user_hash").cast(pa.string()),
                                           _user_hashes(layer_users)], pa.string()))
        forgets = pc.filter(layer_tombstones.column("user_hash"), pc.equal(layer_tombstones.column("op"), OP_FORGET_USER))
        if state.num_rows:
            state = state.filter(pc.invert(pc.is_in(state.column("user_id"), ids)))
        if len(forgets) and state.num_rows:
            users = _unique(state.column("user_id"))
            gone = pc.filter(users, pc.is_in(_user_hashes(users), forgets.combine_chunks()))
            state = state.filter(pc.invert(pc.is_in(state.column("user_id"), gone)))
        if tombstones.num_rows:
            tombstones = tombstones.filter(pc.invert(pc.is_in(tombstones.column("user_hash"), hashes)))
        state = pa.concat_tables([conform(state, FACT_STATE_SCHEMA, "fact state"), conform(layer_state, FACT_STATE_SCHEMA, "state layer")])
        tombstones = pa.concat_tables([conform(tombstones, TOMBSTONE_SCHEMA, "tombstones"),
                                       conform(layer_tombstones, TOMBSTONE_SCHEMA, "tombstones layer")])
    state = conform(state, FACT_STATE_SCHEMA, "fact state").sort_by([("user_id", "ascending"), ("fact_id", "ascending")])
    tombstones = conform(tombstones, TOMBSTONE_SCHEMA, "tombstones").sort_by(
        [("user_hash", "ascending"), ("fact_id", "ascending")])
    return state.combine_chunks(), tombstones.combine_chunks()


def _key_column(table: pa.Table, names: list[str]) -> pa.Array:
    """One string per row joining ``names`` (nulls as empty), for set differences of rows."""
    parts = [pc.fill_null(table.column(n).cast(pa.string()), "") for n in names]
    return pc.binary_join_element_wise(*parts, "\x1f")


def state_layer(prior_state: pa.Table, prior_tombstones: pa.Table, state: pa.Table,
                tombstones: pa.Table) -> tuple[pa.Table, pa.Table] | None:
    """The state layer that turns the prior (merged) state and tombstones into the new ones: all
    facts and tombstones of every user whose facts or tombstones differ; None if nothing differs.

    Raises RuntimeError if merging the layer onto the prior does not give the new state exactly
    (a bug, never the data's fault: the layer is checked before it is written)."""
    fact_cols = ["user_id", "fact_id", "fact_hash", "event_time"]
    tomb_cols = ["user_hash", "user_id", "fact_id", "op", "event_time"]
    old_facts, new_facts = _key_column(prior_state, fact_cols), _key_column(state, fact_cols)
    old_tombs, new_tombs = _key_column(prior_tombstones, tomb_cols), _key_column(tombstones, tomb_cols)
    changed_ids = _unique(pa.chunked_array([
        pc.filter(state.column("user_id"), pc.invert(pc.is_in(new_facts, old_facts))),
        pc.filter(prior_state.column("user_id"), pc.invert(pc.is_in(old_facts, new_facts)))], pa.string()))
    changed_tombs = pa.concat_tables([
        tombstones.filter(pc.invert(pc.is_in(new_tombs, old_tombs))),
        prior_tombstones.filter(pc.invert(pc.is_in(old_tombs, new_tombs)))])
    if len(changed_ids) == 0 and changed_tombs.num_rows == 0:
        return None
    # A user with a new forget tombstone that is older than facts they keep (a late forget) is in
    # the layer with those facts: merging a forget drops the user's facts of the layers below.
    new_forgets = pc.filter(changed_tombs.column("user_hash"), pc.equal(changed_tombs.column("op"), OP_FORGET_USER))
    kept_after_forget = pa.array([], pa.string())
    if len(new_forgets):
        live = _unique(state.column("user_id"))
        kept_after_forget = pc.filter(live, pc.is_in(_user_hashes(live), new_forgets.combine_chunks().cast(pa.string())))
    ids = _unique(pa.chunked_array([changed_ids, pc.drop_null(changed_tombs.column("user_id")), kept_after_forget],
                                   pa.string()))
    hashes = _unique(pa.chunked_array([changed_tombs.column("user_hash"), _user_hashes(ids)], pa.string()))
    layer = (state.filter(pc.is_in(state.column("user_id"), ids)),
             tombstones.filter(pc.is_in(tombstones.column("user_hash"), hashes)))
    merged_state, merged_tombstones = merge_state_chain(prior_state, prior_tombstones, [layer])
    expected_state, expected_tombstones = merge_state_chain(state, tombstones, [])
    if not (merged_state.equals(expected_state) and merged_tombstones.equals(expected_tombstones)):
        raise RuntimeError("state layer: merging it onto the prior state does not give the new state "
                           "(a bug in engram; the night stops before writing anything)")
    return layer
