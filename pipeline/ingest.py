"""Ingest: read the day's fact log, validate every row, apply it onto the prior fact state.

Accounting promise: every input row ends in exactly one place. ``accepted + rejected ==
batch.input_rows``, where a whole bad file (read with ``on_bad_file="reject"``) counts as one
input row and one reject (its rows are unknown).

Decisions worth knowing:

* A valid event that loses to a later one (in this batch, or already in the prior state) is a
  reject with reason SUPERSEDED, so the count of accepted rows is the number of events that
  took effect. Exact copies of one event keep one copy (the first by source file, then row)
  and reject the others as DUPLICATE. Events for the same (user, fact, event_time, op) with
  different content are all rejected as CONFLICTING_DUPLICATE: no winner can be chosen that
  does not depend on file order, and the operator has to look at them.
* Events apply in (event_time, op precedence) order: forget_user > delete > upsert at the same
  instant. Facts of the prior state behave as upserts at their own event_time that sort
  before any event of the batch at the same instant. The result depends only on the set of
  rows, never on the order of files or rows.
* Deletes and forgets leave no tombstone in the fact state (its schema holds live facts
  only), so an upsert older than a delete/forget that arrives on a later night is applied.
  Forgetting must therefore also be enforced by the forget job, not by ingest alone.
* By default a file that is not Parquet, or lacks a required column, stops the run with a
  FactLogError naming it; ``on_bad_file="reject"`` records it as one reject row instead
  (UNREADABLE_FILE / SCHEMA_MISMATCH) so one bad file does not block the night.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engram_core.text import canonical_fact, canonical_id, canonical_prompt, canonical_text
from pipeline.plan import user_fact_digest
from schemas import facts as F

logger = logging.getLogger(__name__)

FUTURE_TOLERANCE = timedelta(days=1)
REJECT_TEXT_LIMIT = 1024  # ids longer than this are shortened in the rejects table
TABLE_SOURCE = "<table>"


class FactLogError(RuntimeError):
    """The fact log cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class FactFile:
    path: str  # as written in the rows' _source: an absolute local path or s3://bucket/key
    size: int


@dataclass(frozen=True)
class FactLogBatch:
    rows: pa.Table  # FACT_LOG_BATCH_SCHEMA: the log columns plus _source, _row, _problem_*
    files: tuple[FactFile, ...]  # every file read (to skip next night)
    file_rejects: pa.Table = field(default_factory=F.empty_rejects)  # one row per bad file

    @property
    def input_rows(self) -> int:
        return self.rows.num_rows + self.file_rejects.num_rows


@dataclass(frozen=True)
class IngestResult:
    state: pa.Table  # FACT_STATE_SCHEMA, sorted by (user_id, fact_id)
    rejects: pa.Table  # REJECTS_SCHEMA, sorted by (source, row)
    changed_users: set[str]
    forgotten_users: set[str]
    accepted: int
    rejected: int
    watermark: str | None  # ISO-8601 of the latest event_time in the state or accepted rows


# --- Reading --------------------------------------------------------------------------------


def read_fact_log(
    source: str | list[str],
    *,
    filesystem: pafs.FileSystem | None = None,
    exclude_files: set[str] | frozenset[str] = frozenset(),
    on_bad_file: Literal["raise", "reject"] = "raise",
) -> FactLogBatch:
    """Read a Parquet file, a folder (e.g. hive ``day=.../part-0.parquet``) or a list of them.

    ``source`` may be local or ``s3://bucket/prefix``. Files in ``exclude_files`` (paths as
    they appear in ``FactLogBatch.files``) are skipped; so are names starting with ``_`` or
    ``.`` (``_SUCCESS``, checksums).
    """
    sources = [source] if isinstance(source, str) else list(source)
    tables, files = [], []
    file_rejects = []
    for fs, path, display in sorted(_list_files(sources, filesystem), key=lambda f: f[2]):
        if display in exclude_files:
            logger.info("fact log %s: already ingested, skipped", display)
            continue
        size, table, problem = _read_one(fs, path, display)
        if problem is not None:
            reason, detail = problem
            if on_bad_file == "raise":
                raise FactLogError(
                    f"fact log {display}: {detail} (fix or move the file, or rerun with "
                    f"on_bad_file='reject' to record it in rejects as {reason})"
                )
            logger.warning("fact log %s: %s; recorded in rejects as %s", display, detail, reason)
            file_rejects.append({"source": display, "row": None, "reason": reason, "detail": detail})
        else:
            tables.append(table)
        files.append(FactFile(display, size))
    rows = pa.concat_tables(tables) if tables else F.FACT_LOG_BATCH_SCHEMA.empty_table()
    rejects = pa.Table.from_pylist(file_rejects, schema=F.REJECTS_SCHEMA)
    logger.info("fact log: %d rows from %d files, %d bad files", rows.num_rows, len(files), len(file_rejects))
    return FactLogBatch(rows=rows, files=tuple(files), file_rejects=rejects)


def _list_files(sources: list[str], filesystem: pafs.FileSystem | None):
    """Yield (filesystem, path, display name) for every data file under the sources."""
    for source in sources:
        fs, path, prefix = _resolve(source, filesystem)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise FactLogError(f"fact log {prefix}{path}: no such file or folder (check the path and credentials)")
        if info.type == pafs.FileType.File:
            yield fs, path, prefix + path
            continue
        for entry in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
            relative = entry.path[len(path):].lstrip("/")
            if entry.type != pafs.FileType.File or _is_hidden(relative):
                continue
            yield fs, entry.path, prefix + entry.path


def _resolve(source: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str, str]:
    if "://" in source:
        scheme = source.split("://", 1)[0]
        if filesystem is None:
            try:
                fs, path = pafs.FileSystem.from_uri(source)
            except (pa.ArrowInvalid, OSError) as err:
                raise FactLogError(f"fact log {source}: cannot open ({err})") from err
        else:
            fs, path = filesystem, source.split("://", 1)[1]
        prefix = f"{scheme}://" if scheme != "file" else ""
        return fs, path.rstrip("/"), prefix
    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        return pafs.LocalFileSystem(), os.path.abspath(source), ""
    return filesystem, source.rstrip("/"), ""


def _is_hidden(relative_path: str) -> bool:
    return any(part.startswith(("_", ".")) for part in relative_path.split("/"))


def _read_one(fs: pafs.FileSystem, path: str, display: str):
    """(size, normalised table or None, (reason, detail) or None)."""
    size = fs.get_file_info(path).size or 0
    try:
        with fs.open_input_file(path) as handle:
            table = pq.ParquetFile(handle).read()
    except (pa.ArrowException, OSError) as err:
        return size, None, (F.UNREADABLE_FILE, f"not a readable Parquet file ({err})")
    try:
        return size, normalise_fact_log(table, source=display), None
    except F.SchemaMismatch as err:
        return size, None, (F.SCHEMA_MISMATCH, str(err))


# --- Normalising ----------------------------------------------------------------------------


def normalise_fact_log(table: pa.Table, *, source: str = TABLE_SOURCE) -> pa.Table:
    """Conform a raw fact log table to FACT_LOG_BATCH_SCHEMA, adding provenance.

    Extra columns are dropped with a warning; a missing required column or a type that cannot
    be cast without loss raises SchemaMismatch naming the column. Values that cannot be read
    one by one (invalid UTF-8, an unparseable time string) become null with a per-row problem.
    """
    keep = set(F.FACT_LOG_BATCH_SCHEMA.names)
    extra = [name for name in table.column_names if name not in keep]
    if extra:
        logger.warning("fact log %s: ignoring extra columns %s", source, extra)
    missing = [name for name in F.REQUIRED_LOG_COLUMNS if name not in table.column_names]
    if missing:
        raise F.SchemaMismatch(f"missing required column {missing[0]!r} (columns found: {table.column_names})")
    n = table.num_rows
    problems: list[tuple[str, str] | None] = [None] * n
    columns = {}
    for name in ("user_id", "fact_id", "op", "trigger", "answer", "scope"):
        raw = table.column(name) if name in table.column_names else pa.nulls(n, pa.string())
        columns[name] = _to_text(raw, name, problems)
    columns["op"] = pc.utf8_lower(pc.utf8_trim_whitespace(columns["op"]))
    columns["event_time"] = _to_timestamp(table.column("event_time"), problems)
    columns["_source"] = table.column("_source") if "_source" in table.column_names else pa.array([source] * n, pa.string())
    columns["_row"] = table.column("_row") if "_row" in table.column_names else pa.array(range(n), pa.int64())
    if "_problem_reason" in table.column_names:  # an already-normalised batch
        problems = [old or new for old, new in zip(_pairs(table), problems)]
    columns["_problem_reason"] = pa.array([p[0] if p else None for p in problems], pa.string())
    columns["_problem_detail"] = pa.array([p[1] if p else None for p in problems], pa.string())
    return pa.Table.from_arrays(
        [pa.chunked_array(columns[f.name]).cast(f.type) for f in F.FACT_LOG_BATCH_SCHEMA],
        schema=F.FACT_LOG_BATCH_SCHEMA,
    )


def _pairs(table: pa.Table) -> list[tuple[str, str] | None]:
    reasons = table.column("_problem_reason").to_pylist()
    details = table.column("_problem_detail").to_pylist()
    return [(r, d) if r else None for r, d in zip(reasons, details)]


_BAD_UTF8_REASON = {"user_id": F.BAD_USER_ID, "fact_id": F.BAD_FACT_ID, "scope": F.BAD_SCOPE}


def _to_text(column: pa.ChunkedArray, name: str, problems: list) -> pa.ChunkedArray:
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return column.cast(pa.string())
    if pa.types.is_string_view(kind) or pa.types.is_integer(kind):
        return column.cast(pa.string())
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        values = []
        for i, raw in enumerate(column.to_pylist()):
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
            except UnicodeDecodeError:
                values.append(None)
                if problems[i] is None:
                    reason = _BAD_UTF8_REASON.get(name, F.INVALID_UTF8)
                    problems[i] = (reason, f"{name} is not valid UTF-8")
        return pa.chunked_array([pa.array(values, pa.string())])
    raise F.SchemaMismatch(f"column {name!r} is {kind}, expected a string")


def _to_timestamp(column: pa.ChunkedArray, problems: list) -> pa.ChunkedArray:
    kind = column.type
    if pa.types.is_timestamp(kind) or pa.types.is_date(kind) or pa.types.is_null(kind):
        if pa.types.is_timestamp(kind) and kind.tz is None:
            logger.warning("fact log: event_time has no time zone; reading it as UTC")
        try:
            return column.cast(F.TIMESTAMP, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
            raise F.SchemaMismatch(f"column 'event_time' ({kind}) cannot be cast to {F.TIMESTAMP} without loss ({err})") from err
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise F.SchemaMismatch(
            f"column 'event_time' is {kind}; write a UTC timestamp (numbers are ambiguous: seconds or ms?)"
        )
    values = []
    for i, text in enumerate(column.to_pylist()):
        values.append(None if text is None else _parse_time(text))
        if text is not None and values[-1] is None and problems[i] is None:
            problems[i] = (F.BAD_EVENT_TIME, f"event_time {text[:64]!r} is not an ISO-8601 timestamp")
    return pa.chunked_array([pa.array(values, F.TIMESTAMP)])


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


# --- Validating and applying ----------------------------------------------------------------


@dataclass(frozen=True)
class _Event:
    index: int  # row index in the batch
    user_id: str
    fact_id: str | None
    op: str
    time: int  # microseconds since the epoch, UTC
    source: str
    row: int
    content: tuple  # what makes two events at one instant the same event

    @property
    def order(self) -> tuple:
        return (self.time, F.OP_PRECEDENCE[self.op], self.source, self.row)


def ingest(
    log: FactLogBatch | pa.Table,
    prior_state: pa.Table | None,
    *,
    max_trigger_tokens: int,
    count_tokens: Callable[[list[str]], list[int]] | None = None,
    max_text_chars: int = 4096,
    now: datetime | None = None,
    max_answer_tokens: int | None = None,
    count_answer_tokens: Callable[[list[str]], list[int]] | None = None,
) -> IngestResult:
    """Validate the batch, apply accepted events onto ``prior_state``; see the module doc.

    Ids, triggers and answers are put in canonical form first (:func:`canonical_row`).
    ``count_tokens`` counts a trigger's tokens as a prompt (special tokens included);
    ``count_answer_tokens`` (with ``max_answer_tokens``, the compiler's
    ``CompileOptions.max_answer_tokens``) an answer's, without special tokens
    (:func:`answer_token_counter`): an answer over the limit is rejected ``ANSWER_TOO_LONG``."""
    batch = log if isinstance(log, FactLogBatch) else FactLogBatch(normalise_fact_log(log), ())
    prior = F.validate_fact_state(prior_state) if prior_state is not None else F.empty_fact_state()
    rows = batch.rows
    now = now or datetime.now(timezone.utc)
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now
    cols = {name: rows.column(name).to_pylist() for name in ("user_id", "fact_id", "op", "trigger", "answer", "scope", "_source", "_row")}
    times = rows.column("event_time").cast(pa.int64()).to_pylist()
    verdicts = _validate(rows, cols, times, now, max_trigger_tokens, count_tokens, max_text_chars,
                         max_answer_tokens, count_answer_tokens)

    events = [_event(i, cols, times) for i in range(rows.num_rows) if verdicts[i] is None]
    winners = _dedupe(events, verdicts)
    prior_facts = _state_to_dict(prior)
    new_facts, forgotten = _apply(winners, prior_facts, verdicts)

    state = _dict_to_state(new_facts)
    rejects = _rejects_table(batch, cols, verdicts)
    accepted = sum(v is None for v in verdicts)
    before, after = user_fact_digest(prior), user_fact_digest(state)
    changed = {u for u in before.keys() | after.keys() if before.get(u) != after.get(u)} | forgotten
    accepted_times = [times[i] for i, v in enumerate(verdicts) if v is None]
    prior_times = prior.column("event_time").cast(pa.int64()).to_pylist()
    result = IngestResult(
        state=state,
        rejects=rejects,
        changed_users=changed,
        forgotten_users=forgotten,
        accepted=accepted,
        rejected=rejects.num_rows,
        watermark=_iso(max(accepted_times + prior_times, default=None)),
    )
    if result.accepted + result.rejected != batch.input_rows:  # a bug here, never the data's fault
        raise RuntimeError(f"ingest lost track of rows: {result.accepted} + {result.rejected} != {batch.input_rows}")
    logger.info("ingest: %d accepted, %d rejected, %d users changed, %d forgotten",
             result.accepted, result.rejected, len(changed), len(forgotten))
    return result


def _validate(rows, cols, times, now, max_trigger_tokens, count_tokens, max_text_chars,
              max_answer_tokens=None, count_answer_tokens=None) -> list:
    """One (reason, detail) or None per row (rows are put in canonical form in ``cols`` first)."""
    n = rows.num_rows
    reasons = rows.column("_problem_reason").to_pylist()
    details = rows.column("_problem_detail").to_pylist()
    verdicts: list[tuple[str, str] | None] = [(r, d) if r else None for r, d in zip(reasons, details)]
    future = int((now + FUTURE_TOLERANCE).timestamp() * 1_000_000)
    for i in range(n):
        canonical_row(cols, i)
        if verdicts[i] is None:
            verdicts[i] = _check_row(cols, times, i, future, max_text_chars)
    if count_tokens is not None:
        pending = [i for i in range(n) if verdicts[i] is None and cols["op"][i] == F.OP_UPSERT]
        counts = list(count_tokens([cols["trigger"][i] for i in pending])) if pending else []
        if len(counts) != len(pending):
            raise ValueError(f"count_tokens returned {len(counts)} counts for {len(pending)} triggers")
        for i, tokens in zip(pending, counts):
            if tokens > max_trigger_tokens:
                verdicts[i] = (F.TRIGGER_TOO_LONG, f"trigger is {tokens} tokens (limit {max_trigger_tokens})")
    if count_answer_tokens is not None and max_answer_tokens is not None:
        pending = [i for i in range(n) if verdicts[i] is None and cols["op"][i] == F.OP_UPSERT]
        counts = list(count_answer_tokens([cols["answer"][i] for i in pending])) if pending else []
        if len(counts) != len(pending):
            raise ValueError(f"count_answer_tokens returned {len(counts)} counts for {len(pending)} answers")
        for i, tokens in zip(pending, counts):
            if tokens > max_answer_tokens:
                verdicts[i] = (F.ANSWER_TOO_LONG, f"answer is {tokens} tokens (limit {max_answer_tokens}, "
                                                  "CompileOptions.max_answer_tokens)")
    return verdicts


def canonical_row(cols: dict, i: int) -> None:
    """Put row ``i`` of the batch's columns in canonical form, in place: ids (user_id, fact_id,
    scope) by :func:`engram_core.text.canonical_id` (so ``u-sam``, ``u-sam`` + U+200B and U+FEFF +
    ``u-sam`` are one user), trigger and answer by :func:`engram_core.text.canonical_fact` (NFC,
    invisible format characters removed, the boundary space on the answer). Nulls stay null;
    what the canonical form leaves empty is rejected by the checks that follow."""
    for name in ("user_id", "fact_id", "scope"):
        value = cols[name][i]
        if value is not None:
            cols[name][i] = canonical_id(value)
    trigger, answer = cols["trigger"][i], cols["answer"][i]
    if trigger is not None and answer is not None:
        cols["trigger"][i], cols["answer"][i] = canonical_fact(trigger, answer)
    elif trigger is not None:
        cols["trigger"][i] = canonical_prompt(trigger)
    elif answer is not None:
        cols["answer"][i] = canonical_text(answer).strip()


def answer_token_counter(tokenizer) -> Callable[[list[str]], list[int]]:
    """``count_answer_tokens`` for :func:`ingest`: answer tokens as the compiler counts them
    (no special tokens), for a Hugging Face tokenizer."""
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _check_row(cols, times, i, future_limit, max_text_chars) -> tuple[str, str] | None:
    user_id, op = cols["user_id"][i], cols["op"][i]
    if user_id is None or user_id == "":
        return F.MISSING_USER_ID, "user_id is empty"
    if problem := F.id_problem("user_id", user_id):
        return F.BAD_USER_ID, problem
    if op not in F.OPS:
        return F.UNKNOWN_OP, f"op {str(op)[:64]!r} is not one of {', '.join(F.OPS)}"
    if times[i] is None:
        return F.MISSING_EVENT_TIME, "event_time is empty"
    if times[i] > future_limit:
        return F.FUTURE_EVENT_TIME, f"event_time {_iso(times[i])} is more than {FUTURE_TOLERANCE} in the future"
    if op == F.OP_FORGET_USER:
        return None
    fact_id = cols["fact_id"][i]
    if fact_id is None or fact_id == "":
        return F.MISSING_FACT_ID, f"fact_id is empty on a {op}"
    if problem := F.id_problem("fact_id", fact_id):
        return F.BAD_FACT_ID, problem
    if cols["scope"][i] not in (None, "") and (problem := F.id_problem("scope", cols["scope"][i])):
        return F.BAD_SCOPE, problem
    if op == F.OP_DELETE:
        return None
    return _check_text(cols["trigger"][i], "trigger", F.EMPTY_TRIGGER, F.TRIGGER_TOO_LONG, max_text_chars) or _check_text(
        cols["answer"][i], "answer", F.EMPTY_ANSWER, F.ANSWER_TOO_LONG, max_text_chars
    )


def _check_text(text, name, empty_reason, long_reason, max_chars) -> tuple[str, str] | None:
    if text is None or not text.strip():
        return empty_reason, f"{name} is empty"
    if len(text) > max_chars:
        return long_reason, f"{name} is {len(text)} characters (limit {max_chars})"
    if F.has_control_characters(text):
        return F.CONTROL_CHARACTERS, f"{name} holds control characters other than tab and newline"
    return None


def _event(i: int, cols: dict, times: list) -> _Event:
    op, user_id = cols["op"][i], cols["user_id"][i]
    if op == F.OP_UPSERT:
        content = (cols["scope"][i] or user_id, cols["trigger"][i], cols["answer"][i])
    else:
        content = ()
    fact_id = None if op == F.OP_FORGET_USER else cols["fact_id"][i]
    return _Event(i, user_id, fact_id, op, times[i], cols["_source"][i], cols["_row"][i], content)


def _dedupe(events: list[_Event], verdicts: list) -> list[_Event]:
    """Keep one event per (user, fact, time, op); reject copies and conflicts in verdicts."""
    groups: dict[tuple, list[_Event]] = defaultdict(list)
    for event in events:
        groups[(event.user_id, event.fact_id, event.time, event.op)].append(event)
    kept = []
    for (user_id, fact_id, time, op), group in groups.items():
        group.sort(key=lambda e: (e.source, e.row))
        first = group[0]
        if all(e.content == first.content for e in group):
            kept.append(first)
            for copy in group[1:]:
                verdicts[copy.index] = (F.DUPLICATE, f"exact copy of {first.source} row {first.row}")
            continue
        for event in group:
            verdicts[event.index] = (
                F.CONFLICTING_DUPLICATE,
                f"{len(group)} {op} events for user {user_id[:64]!r} fact {fact_id!r} at {_iso(time)} "
                "differ in content; none applied",
            )
    return kept


def _apply(events: list[_Event], prior: dict, verdicts: list) -> tuple[dict, set[str]]:
    """Apply deduplicated events onto the prior facts; mark losers SUPERSEDED."""
    forget_time: dict[str, int] = {}
    per_fact: dict[tuple[str, str], list[_Event]] = defaultdict(list)
    for event in events:
        if event.op == F.OP_FORGET_USER:
            forget_time[event.user_id] = max(event.time, forget_time.get(event.user_id, event.time))
        else:
            per_fact[(event.user_id, event.fact_id)].append(event)
    facts = {key: fact for key, fact in prior.items() if fact["event_time"] > forget_time.get(key[0], -(2**63))}
    for key, group in per_fact.items():
        group.sort(key=lambda e: e.order)
        last = group[-1]
        for loser in group[:-1]:
            verdicts[loser.index] = (F.SUPERSEDED, f"superseded by the {last.op} at {_iso(last.time)} ({last.source} row {last.row})")
        forgotten_at = forget_time.get(last.user_id)
        if forgotten_at is not None and forgotten_at >= last.time:
            verdicts[last.index] = (F.SUPERSEDED, f"removed by forget_user at {_iso(forgotten_at)}")
        elif key in prior and prior[key]["event_time"] > last.time:
            verdicts[last.index] = (F.SUPERSEDED, f"older than the fact in the prior state ({_iso(prior[key]['event_time'])})")
        elif last.op == F.OP_DELETE:
            facts.pop(key, None)
        else:
            scope, trigger, answer = last.content
            facts[key] = {"scope": scope, "trigger": trigger, "answer": answer, "event_time": last.time}
    return facts, set(forget_time)


def _state_to_dict(state: pa.Table) -> dict:
    columns = {name: state.column(name).to_pylist() for name in ("user_id", "fact_id", "scope", "trigger", "answer")}
    times = state.column("event_time").cast(pa.int64()).to_pylist()
    return {
        (u, f): {"scope": s, "trigger": t, "answer": a, "event_time": time}
        for u, f, s, t, a, time in zip(*columns.values(), times)
    }


def _dict_to_state(facts: dict) -> pa.Table:
    keys = sorted(facts)
    values = [facts[k] for k in keys]
    return pa.table(
        {
            "user_id": pa.array([k[0] for k in keys], pa.string()),
            "fact_id": pa.array([k[1] for k in keys], pa.string()),
            "scope": pa.array([v["scope"] for v in values], pa.string()),
            "trigger": pa.array([v["trigger"] for v in values], pa.string()),
            "answer": pa.array([v["answer"] for v in values], pa.string()),
            "event_time": pa.array([v["event_time"] for v in values], pa.int64()).cast(F.TIMESTAMP),
            "fact_hash": pa.array([F.fact_hash(v["scope"], v["trigger"], v["answer"]) for v in values], pa.string()),
        },
        schema=F.FACT_STATE_SCHEMA,
    )


def _rejects_table(batch: FactLogBatch, cols: dict, verdicts: list) -> pa.Table:
    def short(value):
        return value if value is None or len(value) <= REJECT_TEXT_LIMIT else value[:REJECT_TEXT_LIMIT] + "…"

    records = [
        {
            "source": cols["_source"][i],
            "row": cols["_row"][i],
            "user_id": short(cols["user_id"][i]),
            "fact_id": short(cols["fact_id"][i]),
            "op": short(cols["op"][i]),
            "reason": verdict[0],
            "detail": verdict[1],
        }
        for i, verdict in enumerate(verdicts)
        if verdict is not None
    ]
    rejects = pa.concat_tables([batch.file_rejects.cast(F.REJECTS_SCHEMA), pa.Table.from_pylist(records, schema=F.REJECTS_SCHEMA)])
    return rejects.sort_by([("source", "ascending"), ("row", "ascending")])


def _iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=micros)).isoformat()
