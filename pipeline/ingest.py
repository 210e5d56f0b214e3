"""Ingest: read the fact log, validate every row, apply it onto the prior fact state.

The night runs ingest in two parts, so that it scales out (pipeline.runner wires them on Ray):

* per log file, in parallel: :func:`read_log_file` reads and normalises one file, validates each
  row on its own (:func:`validate_rows`: ids, op, times, text, trigger tokens) and keys every row
  by the shard of its user (``xxh64(user_id) mod num_shards``; rows with no usable user_id go to
  :data:`UNROUTED`, where they can only be rejects);
* per shard: :func:`apply_events` applies the shard's valid events onto the shard's prior fact
  state and tombstones. Only the users the events touch are handled row by row; the rest of the
  shard is carried as Arrow data.

:func:`ingest` and :func:`read_fact_log` do both in one process over any table or folder.

Accounting promise: every input row ends in exactly one place. ``accepted + rejected ==
input rows``, where a whole bad file (read with ``on_bad_file="reject"``) counts as one input row
and one reject (its rows are unknown).

Decisions worth knowing:

* A valid event that loses to a later one (in this batch, in the prior state, or in a delete
  tombstone) is a reject with reason SUPERSEDED, so the count of accepted rows is the number of
  events that took effect. Exact copies of one event keep one copy (the first by source file,
  then row) and reject the others as DUPLICATE. Events for the same (user, fact, event_time, op)
  with different content are all rejected as CONFLICTING_DUPLICATE: no winner can be chosen that
  does not depend on file order, and the operator has to look at them; such a conflict acts as a
  delete of the fact at that instant (an earlier fact goes, a tombstone stays). The same holds across
  nights: an upsert at the very instant of a fact in the prior state, with other content, is
  rejected as CONFLICTING_DUPLICATE and the prior fact goes too, leaving a delete tombstone at that
  instant, so whichever night came first the fact is absent, and a re-read of either file
  (SUPERSEDED by the tombstone) changes nothing.
* Events apply in (event_time, op precedence) order: forget_user > delete > upsert at the same
  instant. Facts of the prior state behave as upserts at their own event_time that sort
  before any event of the batch at the same instant. The result depends only on the set of
  rows, never on the order of files or rows, nor on how the rows are split over nights.
* Deletes and forgets leave tombstones (schemas.facts.TOMBSTONE_SCHEMA), kept across versions:
  an event that arrives on a later night but is not later than a delete of its fact is
  SUPERSEDED, and one not later than a forget of its user is FORGOTTEN_USER. A forget is
  permanent unless the user writes again *after* it. A forget tombstone holds only the sha256 of
  the user_id; the user's delete tombstones up to the forget are dropped with their facts.
* By default a file that is not Parquet, or lacks a required column, stops the run with a
  FactLogError naming it; ``on_bad_file="reject"`` records it as one reject row instead
  (UNREADABLE_FILE / SCHEMA_MISMATCH) so one bad file does not block the night. A rejected
  file is not recorded as ingested: the next night reads it again.
* A file is known by its path, size, modification time and (local files) change time: a file
  rewritten in place (same path, other size or time; also one whose modification time a copy
  kept, as ``cp -p`` and ``rsync -t`` do) is read again on the next night; its events that were
  already applied come back as DUPLICATE or SUPERSEDED.
* The ledger of ingested files is bounded by an age (:func:`file_horizon`, the job spec's
  ``max_file_age``, as Spark's file source ``maxFileAge``): entries of files modified before the
  horizon are purged, and a file modified before it that the ledger lacks is not read
  (:func:`files_behind`, :func:`warn_files_behind`). A file exactly at the horizon is inside it.
"""

from __future__ import annotations

import calendar
import contextlib
import functools
import inspect
import logging
import threading
import math
import time
import os
import unicodedata
import urllib.parse
import uuid
import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from datetime import datetime, timedelta, timezone
from fractions import Fraction
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from engram_core.text import LINE_BREAKS, canonical_fact, canonical_id, canonical_prompt, canonical_text
from pipeline.plan import user_fact_digest
from schemas import facts as F
from versions.layout import forgotten_id, shard_hash, shard_of
from versions.store import arrow_checksum_env, arrow_env_checksum_settings, configured_s3_endpoint

logger = logging.getLogger(__name__)

FUTURE_TOLERANCE = F.FUTURE_TOLERANCE
REJECT_TEXT_LIMIT = 1024  # ids longer than this are shortened in the rejects table
TABLE_SOURCE = "<table>"
UNROUTED = -1  # the shard key of rows whose user_id is missing or unusable (they are all rejects)
SHARD_COLUMN = "_shard"


class FactLogError(RuntimeError):
    """The fact log cannot be read; the message names the file and what to do."""


class FactLogNotFound(FactLogError):
    """The fact log source names nothing to read: no such file or folder, a URI no filesystem
    opens (``s4://``), a path that is not valid UTF-8 (a bad argument; the message names it)."""


def _file_reject(file: "FactFile", problem: tuple[str, str], on_bad_file: str) -> dict:
    """The REJECTS_SCHEMA row of a file that cannot be read (``problem``: its reason and detail,
    from ``_read_listed``), logged; under ``on_bad_file="raise"`` a FactLogError naming it instead."""
    reason, detail = problem
    if on_bad_file == "raise":
        raise FactLogError(_unreadable_file_message(file.path, detail, reason))
    logger.warning("fact log %s: %s; rejected as %s (not ingested: read again by the next night; recorded in the rejects "
                   "of the version a night publishes)", file.path, detail, reason)
    return {"source": file.path, "row": None, "reason": reason, "detail": detail}


# ``_read_one``'s reason for a listed file that was no longer there when read (moved, renamed or deleted
# since the listing: a writer's temporary file renamed into place, a file quarantined, a retention
# rule): not a reject, not ingested; read when it is listed again.
GONE = "GONE"


def _gone_message(path: str) -> str:
    return (f"fact log {path}: listed, but gone when read (moved, renamed or deleted since the listing: a "
            "writer's temporary file renamed into place, a quarantine, a retention rule); skipped, not recorded "
            "as ingested: a file listed again under that name is read by a later night")


# ``_read_one``'s reason for a listed file that is no data file: a well-known name of a file that
# holds no rows (:func:`stray_name`: a README, a checksum, a manifest, a completion marker), told by
# its name alone, or an empty file (0 bytes, known from a local file's size or, on an object store, by
# reading it: a HEAD without Content-Length says 0 of every object) whose name is not Parquet's.
# Skipped like ``_SUCCESS`` (pyarrow.dataset's ``exclude_invalid_files``), under either on_bad_file:
# not a reject; recorded by a night that publishes, with its identity (a change under its name is read
# again as a rewritten file). Every other file
# that is no Parquet is UNREADABLE_FILE, whatever its name (Spark's ``part-00000-x-c000.json``, a
# ``.csv.gz``, Hive's suffixless text ``000000_0``): its rows would go unread without a reject.
NOT_DATA = "NOT_DATA"
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
# Names of files that hold no rows (case-insensitive): documentation, checksums, manifests and
# completion markers that tools leave without the '_' or '.' prefix that hides them.
_DOC_STEMS = ("readme", "license", "licence", "notice", "changelog", "copying", "authors")
_DOC_SUFFIXES = (".md", ".markdown", ".rst", ".html", ".htm", ".pdf")
_CHECKSUM_SUFFIXES = (".crc", ".md5", ".sha1", ".sha256", ".sha512", ".sha", ".checksum", ".etag")
_CHECKSUM_NAMES = ("md5sums", "sha1sums", "sha256sums", "sha512sums", "checksums", "checksums.txt")
_MARKER_NAMES = ("success", "done", "complete", "completed", "ready", "finished", "committed", "ok")
# Files an operating system or a desktop writes into a folder it shows or shares (Windows Explorer's
# thumbnail caches and folder settings, macOS's custom folder icon ``Icon\r``); ``~$`` names are the
# owner files Office keeps beside an open document. ``.DS_Store`` and the like start with '.'.
_OS_FILE_NAMES = ("thumbs.db", "ehthumbs.db", "ehthumbs_vista.db", "desktop.ini", "icon\r")
# The temporary names copy tools give a file until it is whole, then rename it to its own (rclone's
# ``.partial``, WinSCP's ``.filepart``, gsutil's ``.gstmp``, browsers' ``.crdownload`` / ``.part`` /
# ``.download``, Flink's ``.inprogress``, ``.tmp``): none can be told to write under a '_' or '.' name, and a
# night that listed the log mid-copy failed on the half-written file. Its rows are read under the name it gets.
_IN_FLIGHT_SUFFIXES = (".partial", ".filepart", ".gstmp", ".crdownload", ".inprogress")
# Generic ones count only after a name that has its own extension (``part-0.parquet.tmp``,
# ``x.snappy.parquet.part``): ``events.part`` or ``2026-12.tmp`` may be a producer's own data name.
_IN_FLIGHT_GENERIC_SUFFIXES = (".part", ".download", ".tmp", ".temp")
_MARKER_SUFFIXES = (".done", ".success", ".ready", ".complete", ".completed", ".lock", ".marker", ".flag", ".ok")
# Whole-file compression around a file (``part-0.csv.gz``): named in UNREADABLE_FILE's message.
_COMPRESSION_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bzip2", ".zst": "zstd", ".zstd": "zstd",
                         ".xz": "xz", ".lz4": "lz4", ".snappy": "snappy", ".zip": "zip", ".z": "compress"}


def stray_name(path: str) -> str | None:
    """Why a file is no data file by its name alone (a README, a checksum, a manifest, a completion
    marker), or None. Names starting with ``_`` or ``.`` are never listed (:func:`_is_hidden`)."""
    name = path.rsplit("/", 1)[-1].lower()
    if name.endswith(PARQUET_SUFFIXES):
        return None  # named as Parquet (``changelog.parquet``, ``notice.parquet``): read as data
    stem = name.split(".", 1)[0]
    if stem in _DOC_STEMS or name.endswith(_DOC_SUFFIXES):
        return "a documentation file by its name (README, LICENSE, *.md, ...)"
    if name in _CHECKSUM_NAMES or name.endswith(_CHECKSUM_SUFFIXES):
        return "a checksum file by its name (*.crc, *.md5, *.sha256, SHA256SUMS, ...)"
    if stem.startswith("manifest") and name.endswith(".json"):
        return "a manifest by its name (manifest*.json)"
    if name in _MARKER_NAMES or name.endswith(_MARKER_SUFFIXES):
        return "a completion marker by its name (SUCCESS, DONE, *.done, *.lock, ...)"
    if name.endswith(_IN_FLIGHT_SUFFIXES) or (name.endswith(_IN_FLIGHT_GENERIC_SUFFIXES)
                                               and "." in name.rsplit(".", 1)[0].lstrip(".")):
        return ("a copy in progress, by its name (rclone's *.partial, WinSCP's *.filepart, gsutil's *.gstmp, "
                "*.crdownload, *.part, *.tmp, ...): its rows are read under the name the copy renames it to")
    if name in _OS_FILE_NAMES or name.startswith("~$"):
        return "a file the operating system or Office keeps in folders, by its name (Thumbs.db, desktop.ini, Icon\\r, ~$...)"
    return None


def _named_as_parquet(path: str) -> bool:
    return path.rsplit("/", 1)[-1].lower().endswith(PARQUET_SUFFIXES)


def no_data_by_listing(file: "FactFile") -> str | None:
    """Why a listed file is no data file as its listing already tells (NOT_DATA, without reading it):
    a :func:`stray_name`, or a local file of 0 bytes not named as Parquet; else None. An object
    store's 0 is not trusted here (a HEAD without Content-Length says 0): reading it tells."""
    if file.unreadable is not None:
        return None
    if (why := stray_name(file.path)) is not None:
        return why
    if "://" not in file.path and file.size == 0 and not _named_as_parquet(file.path):
        return _EMPTY
    return None


_EMPTY = "an empty file (0 bytes), and its name has no Parquet suffix"


def not_data_message(path: str, detail: str) -> str:
    return (f"fact log {path}: not a data file ({detail}); skipped (read again if it "
            "changes). Log files are Parquet: keep other files out of the log, or name them with a leading '_' or '.'")


def _unreadable_file_message(path: str, detail: str, reason: str) -> str:
    """An unreadable log file under on_bad_file='raise': the file, why, and both ways to say
    'reject' instead (the job spec's field, the command line's flag of ``engram run nightly``)."""
    return (f"fact log {path}: {detail} (fix or move the file, or rerun with on_bad_file='reject' in the job "
            f"spec, --on-bad-file reject on the command line, to record it in rejects as {reason})")


@dataclass(frozen=True)
class FactFile:
    """A log file and its identity: a file whose size, modification time or (local) change time
    changed is new again."""

    path: str  # an absolute local path or s3://bucket/key
    size: int
    mtime_ns: int | None = None  # None where the filesystem reports no modification time
    # A local file's inode change time: set by the kernel on every write, rename into place or
    # metadata change, and not settable by ``cp -p``, ``rsync -t`` or ``tar x``, which keep the
    # modification time of a file they rewrite. None on object stores (their listings give no
    # ctime, and an object's LastModified cannot be set by a client).
    ctime_ns: int | None = None
    # The listed source (folder) the file lies under, as ``path`` writes it: only the folders
    # between it and the file are partition folders (``scope=.../``). Not part of its identity.
    root: str = field(default="", compare=False)
    # Why the file cannot be opened at all, known from its name alone (a name that is not UTF-8:
    # ``path`` then shows its bytes escaped); None for a file that is read.
    unreadable: str | None = field(default=None, compare=False)

    def identity(self) -> dict:
        out = {"size": self.size, "mtime_ns": self.mtime_ns}
        if self.ctime_ns is not None:
            out["ctime_ns"] = self.ctime_ns
        return out

    def ingested_as(self, recorded) -> bool:
        """Whether a watermark entry (``identity()``, or a plain size from older versions) is this file.
        An entry written before change times were recorded is compared on size and mtime alone."""
        if isinstance(recorded, dict):
            mine = self.identity()
            if "ctime_ns" not in recorded:
                mine.pop("ctime_ns", None)
            return recorded == mine
        return recorded == self.size  # written before modification times were recorded


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
    tombstones: pa.Table = field(default_factory=F.empty_tombstones)  # TOMBSTONE_SCHEMA
    forget_times: dict[str, int] = field(default_factory=dict)  # forgotten user -> their latest forget (us, UTC)


@dataclass(frozen=True)
class RowRules:
    """What :func:`validate_rows` checks a row against (the job spec's limits and the clock)."""

    max_trigger_tokens: int
    max_text_chars: int = 4096
    now: datetime | None = None  # None: the clock when the rows are checked
    model_dir: str | None = None  # whose tokenizer counts trigger and answer tokens; None: no token check
    max_answer_tokens: int | None = None  # the compiler's CompileOptions.max_answer_tokens

    def count_tokens(self) -> Callable[[list[str]], list[int]] | None:
        return token_counter(self.model_dir) if self.model_dir else None

    def count_answer_tokens(self) -> Callable[[list[str]], list[int]] | None:
        return token_counter(self.model_dir, special_tokens=False) if self.model_dir else None


@functools.lru_cache(maxsize=8)
def token_counter(model_dir: str, special_tokens: bool = True) -> Callable[[list[str]], list[int]]:
    """Token counts with the checkpoint's tokenizer, loaded once per process: with special tokens
    (a trigger, counted as a prompt) or without (an answer, as the compiler counts it).

    The ``tokenizers`` backend is used directly when the checkpoint has a ``tokenizer.json`` (a
    fast tokenizer: the same encoding transformers runs), so a read task does not pay the import of
    transformers (seconds on a machine with many ML libraries installed); otherwise transformers."""
    path = os.path.join(model_dir, "tokenizer", "tokenizer.json")
    if os.path.exists(path):
        from tokenizers import Tokenizer

        backend = Tokenizer.from_file(path)
        backend.no_padding()
        backend.no_truncation()
        return lambda texts: [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=special_tokens)]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(f"{model_dir}/tokenizer", local_files_only=True)
    return lambda texts: [len(ids) for ids in tokenizer(list(texts), add_special_tokens=special_tokens)["input_ids"]]


# --- Reading --------------------------------------------------------------------------------


def list_log_files(source: str | list[str], *, filesystem: pafs.FileSystem | None = None) -> list[FactFile]:
    """Every data file under a Parquet file, a folder (e.g. hive ``day=.../part-0.parquet``) or a
    list of them, local or ``s3://``, sorted by path. Names starting with ``_`` or ``.``
    (``_SUCCESS``, checksums) are skipped. Raises FactLogError for a source that does not exist.

    Local folders: a symbolic link to a folder is followed once (a folder already listed, by its
    real path, is not listed again: a link loop or a second link to it, with a warning naming it),
    and a real file reached under two names is listed once (the name without a link, else the
    first; a warning names both). A broken link is listed like a file, so that reading it fails
    naming the link and its missing target (or becomes a file reject with on_bad_file='reject')."""
    sources = [source] if isinstance(source, str) else list(source)
    roots = sorted({_source_root(s) for s in sources}, key=len, reverse=True)  # the innermost source first
    files = {}
    for fs, path, display, listed_size in _list_files(sources, filesystem):
        root = next((r for r in roots if display == r or display.startswith(r.rstrip("/") + "/")), display)
        if problem := _name_problem(display, root):  # never handed to pyarrow, Parquet, JSON or a log line
            files[_shown(display)] = FactFile(_shown(display), 0, None, None, _shown(root), unreadable=problem)
            continue
        try:
            files[display] = FactFile(display, *_identity(fs, path, listed_size), root)
        except OSError as err:
            raise _store_failed(display, err) from None
    return [files[p] for p in sorted(files)]


def _shown(path: str) -> str:
    """A path as text that can be written anywhere: bytes of a name that is not UTF-8 (which
    Python lists as lone surrogates) shown escaped (``d\\xeda.parquet``)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _name_problem(path: str, root: str) -> str | None:
    """Why a listed file cannot be read for its name: a file or folder name that is not UTF-8
    (a Latin-1 ``día.parquet`` copied from an old system) cannot be opened through pyarrow, nor
    written to the rejects table or the watermark. None for a name that is UTF-8."""
    try:
        path.encode("utf-8")
        return None
    except UnicodeEncodeError:
        pass
    below = path[len(root.rstrip("/")) + 1:] if path.startswith(root.rstrip("/") + "/") else path
    parts = below.split("/")
    bad = next(part for part in parts if _shown(part) != part)
    what = "file" if bad == parts[-1] else "folder"
    return (f"the {what} name '{_shown(bad)}' is not valid UTF-8 (the escaped bytes; written by a system "
            f"with another encoding, e.g. Latin-1), so the file cannot be read or named in the rejects; rename the "
            f"{what} to a UTF-8 name (e.g. convmv -f latin1 -t utf8 --notest)")


def _identity(fs: pafs.FileSystem, path: str, listed_size: int | None = None) -> tuple[int, int | None, int | None]:
    """(size, mtime_ns, ctime_ns) of a listed file: one ``stat`` of a local file (0, None, None
    for a broken link), the object's size and modification time elsewhere (no change time); the
    size the folder's listing gave (``listed_size``) where there is one: a store whose HEAD
    answers without Content-Length says 0 there."""
    if isinstance(fs, pafs.LocalFileSystem):
        try:
            st = os.stat(path)
        except OSError:
            return 0, None, None
        return st.st_size, st.st_mtime_ns, st.st_ctime_ns
    info = fs.get_file_info(path)
    return listed_size if listed_size is not None else info.size or 0, info.mtime_ns, None


def _source_root(root: str) -> str:
    """A fact-log source as the listing writes its files' paths (absolute local path, or
    ``scheme://bucket/prefix`` without a trailing slash)."""
    if "://" in root:
        scheme, rest = root.split("://", 1)
        return rest.rstrip("/") if scheme == "file" else f"{scheme}://{rest.rstrip('/')}"
    return os.path.abspath(root)


def under_sources(path: str, source: str | list[str]) -> bool:
    """Whether a listed file's path (as :func:`list_log_files` writes it) lies under one of the
    sources: the sources a night lists are the only place it can see files disappear."""
    roots = [source] if isinstance(source, str) else list(source)
    for root in map(_source_root, roots):
        if path == root or path.startswith(root.rstrip("/") + "/"):
            return True
    return False


def files_to_read(files: list[FactFile], ingested: Mapping[str, object],
                  horizon_ns: int | None = None) -> tuple[list[FactFile], list[FactFile]]:
    """(new files, files rewritten since they were ingested) among ``files``, given the watermark's
    ``{path: identity}``; a file whose path and identity are recorded is skipped, and so is a file
    the ledger lacks whose modification time is before ``horizon_ns`` (:func:`files_behind`). A
    rewrite of a file the ledger holds is read whatever its time."""
    new = [f for f in files if f.path not in ingested and not _behind(f, horizon_ns)]
    changed = [f for f in files if f.path in ingested and not f.ingested_as(ingested[f.path])]
    return new, changed


# --- The bounded ledger (max_file_age) ---------------------------------------------------------

def _recorded_mtime(identity) -> int | None:
    """The modification time a ledger entry records (None: a plain size from an older version)."""
    return identity.get("mtime_ns") if isinstance(identity, dict) else None


def file_horizon(listed: list[FactFile], ingested: Mapping[str, object], max_age_ns: int | None,
                 source: str | list[str], *, now_ns: int | None = None) -> int | None:
    """The ingest horizon of a night, in ns since the epoch (None: no horizon, every file counts).

    ``min(newest listed file's mtime, newest mtime the ledger records under `source`, now) -
    max_age_ns``. The ledger's newest file caps it, so a night after an outage longer than the age
    still reads every file that arrived since the last night; a source the ledger has no entry
    under (a first night, a backfill of another folder) has no horizon, so its history is read
    whole; ``max_age_ns`` None (``'never'``) has none either."""
    if max_age_ns is None:
        return None
    recorded = [t for path, identity in ingested.items()
                if (t := _recorded_mtime(identity)) is not None and under_sources(path, source)]
    listed_times = [f.mtime_ns for f in listed if f.mtime_ns is not None]
    if not recorded or not listed_times:
        return None
    now_ns = time.time_ns() if now_ns is None else now_ns
    return min(max(listed_times), max(recorded), now_ns) - max_age_ns


def _behind(file: FactFile, horizon_ns: int | None) -> bool:
    """A file older than the horizon: modification time strictly before it (a file exactly at
    the horizon is inside it). A file without a modification time is never behind."""
    return horizon_ns is not None and file.mtime_ns is not None and file.mtime_ns < horizon_ns


def files_behind(files: list[FactFile], ingested: Mapping[str, object], horizon_ns: int | None) -> list[FactFile]:
    """The listed files a night does not read for their age: not in the ledger and modified before
    the horizon (ingested and purged from the ledger since, or never ingested), oldest first."""
    return sorted((f for f in files if f.path not in ingested and _behind(f, horizon_ns)),
                  key=lambda f: (f.mtime_ns, f.path))


def purge_ledger(ingested: Mapping[str, object], horizon_ns: int | None, source: str | list[str]) -> dict:
    """The ledger without the entries under ``source`` whose recorded modification time is before
    the horizon (Spark's seen-files purge); entries elsewhere, and entries without a time (a plain
    size from an older version), are kept."""
    if horizon_ns is None:
        return dict(ingested)
    return {path: identity for path, identity in ingested.items()
            if not (under_sources(path, source) and (t := _recorded_mtime(identity)) is not None and t < horizon_ns)}


def warn_files_behind(behind: list[FactFile], horizon_ns: int | None, previous_horizon_ns: int | None,
                      max_file_age: str) -> int:
    """Log once the files a night skips for their age that cannot have been ingested before: those
    modified at or after the previous night's horizon (no purge reached them: a reject that fell
    behind, a file that came late), or all of them when the ledger was never purged (no previous
    horizon). The others were ingested and purged, or warned about on the night they fell behind:
    one debug line. (Not a local file's change time: a log delivered by ``rsync -a`` keeps the
    producer's mtime and gets a later ctime, so each purge would come back as a false warning.)
    Returns the number warned about."""
    if not behind:
        return 0
    fresh = [f for f in behind if previous_horizon_ns is None or f.mtime_ns >= previous_horizon_ns]
    if fresh:
        oldest = fresh[0]
        logger.warning(
            "fact log: %d file(s) older than the ingest horizon (%s: max_file_age %s before the newest ingested file) are "
            "not in the ledger and were not read; the oldest: %s (modified %s). To read them, raise max_file_age in the job "
            "spec (--max-file-age on the command line) to cover them, or ingest them explicitly with a night whose "
            "fact_log is their file or folder",
            len(fresh), _iso_ns(horizon_ns), max_file_age, oldest.path, _iso_ns(oldest.mtime_ns))
    if len(fresh) < len(behind):
        logger.debug("fact log: %d file(s) older than the ingest horizon were ingested and purged from the ledger "
                     "(or skipped on an earlier night, or came later than max_file_age with their old modification "
                     "time): not read", len(behind) - len(fresh))
    return len(fresh)


def _iso_ns(ns: int | None) -> str:
    return "-" if ns is None else datetime.fromtimestamp(ns / 1e9, timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class FileRead:
    """What the driver learns from reading one log file (no rows)."""

    file: FactFile
    rows: int
    slices: dict[int, tuple[int, int]]  # shard -> (offset, length) of its rows in the keyed table
    reject: pa.Table | None = None  # one REJECTS_SCHEMA row when the whole file was rejected
    gone: bool = False  # listed, but no longer there when read: no rows, no reject, not ingested
    skipped: str | None = None  # why the file is no data file (NOT_DATA): no rows, no reject
    warnings: tuple[str, ...] = ()  # what reading it warned of, for the driver to log (:func:`read_log_file`)


def read_log_file(
    file: FactFile,
    rules: RowRules,
    num_shards: int,
    on_bad_file: Literal["raise", "reject"] = "raise",
    filesystem: pafs.FileSystem | None = None,
) -> tuple[FileRead, pa.Table]:
    """Read, normalise and validate one log file; key its rows by shard.

    Returns ``(read, rows)``: ``rows`` is FACT_LOG_BATCH_SCHEMA plus ``_shard`` (int32,
    :data:`UNROUTED` for rows with no usable user_id), sorted by shard then row, with each invalid
    row's reason in ``_problem_reason``; ``read`` says where each shard's rows are, or holds the
    file's reject row when the whole file is unreadable and ``on_bad_file="reject"``. Raises
    FactLogError for an unreadable file under ``on_bad_file="raise"``.

    The warnings reading the file gives (extra columns, a time without a zone, ids in another form,
    escaped or garbled text) are not logged here but returned in ``read.warnings``, for the caller
    to log (:func:`log_read_warnings`): a night's read task on Ray logs to a worker's file, which
    the night does not forward, and every such warning was lost there.
    """
    with _held_warnings() as held:
        table, problem, file = _read_listed(file, filesystem)
        if problem is not None and problem[0] == GONE:
            logger.warning("%s", _gone_message(file.path))
            read = FileRead(file, 0, {}, gone=True)
            keyed = key_by_shard(F.FACT_LOG_BATCH_SCHEMA.empty_table(), num_shards)
        elif problem is not None and problem[0] == NOT_DATA:  # read as a file of no rows (an empty export)
            logger.warning("%s", not_data_message(file.path, problem[1]))
            read = FileRead(file, 0, {}, skipped=problem[1])
            keyed = key_by_shard(F.FACT_LOG_BATCH_SCHEMA.empty_table(), num_shards)
        elif problem is not None:
            reject = pa.Table.from_pylist([_file_reject(file, problem, on_bad_file)], schema=F.REJECTS_SCHEMA)
            read = FileRead(file, 0, {}, reject)
            keyed = key_by_shard(F.FACT_LOG_BATCH_SCHEMA.empty_table(), num_shards)
        else:
            keyed = key_by_shard(validate_rows(table, rules), num_shards)
            read = FileRead(file, keyed.num_rows, shard_slices(keyed))
    return replace(read, warnings=tuple(held)), keyed


@contextlib.contextmanager
def _held_warnings():
    """The warnings this module logs inside the block, held (not emitted) in the list it yields."""
    held: list[str] = []
    reader = threading.get_ident()  # another thread's reads (an API caller's pool) keep their own

    def hold(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.thread != reader:
            return True
        held.append(record.getMessage())
        return False

    logger.addFilter(hold)
    try:
        yield held
    finally:
        logger.removeFilter(hold)


def log_read_warnings(read: FileRead) -> None:
    """Log the warnings :func:`read_log_file` returned, here (the night's driver: where the operator
    reads them, whichever process read the file)."""
    for message in read.warnings:
        logger.warning("%s", message)


def _read_listed(file: FactFile, filesystem: pafs.FileSystem | None
                 ) -> tuple[pa.Table | None, tuple[str, str] | None, FactFile]:
    """(normalised table or None, (reason, detail) or None, the file as read) of a listed file.
    An object replaced since its listing (another size or modification time when read: an export
    re-run in place) is the file as read: the watermark records what was read, so a later night
    does not read the same rows again (each came back as a DUPLICATE)."""
    if file.unreadable is not None:
        return None, (F.UNREADABLE_FILE, file.unreadable), file
    if (why := stray_name(file.path)) is not None:  # by its name alone: never opened
        return None, (NOT_DATA, why), file
    fs, path = _filesystem_for(file.path, filesystem)
    info, table, problem = _read_one(fs, path, file.path, file.root, listed_size=file.size)
    if (table is not None and not isinstance(fs, pafs.LocalFileSystem) and (info.size or 0) > 0
            and (info.size, info.mtime_ns) != (file.size, file.mtime_ns)):
        file = replace(file, size=info.size, mtime_ns=info.mtime_ns)
    return table, problem, file


def _filesystem_for(display: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    if filesystem is not None:
        return filesystem, display.split("://", 1)[1] if "://" in display else display
    if "://" in display:
        return _from_uri(display)
    return pafs.LocalFileSystem(), display


def _from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path) of a fact-log URI. On an object store (``s3://``, ``gs://``) the key is
    taken as written: keys may hold spaces, ``%``, ``?`` and ``#`` (Spark writes partition values
    escaped, ``hour=2026-11-29 08%3A00%3A00/``), which URI parsing refuses, decodes or cuts off.
    Only the bucket goes through ``FileSystem.from_uri`` (region and credentials come from the
    environment; the endpoint as the store resolves it, :func:`configured_s3_endpoint`). Other schemes (``hdfs://host:port/path``,
    ``file://``) are parsed whole. Raises FactLogError naming the URI."""
    scheme, rest = uri.split("://", 1)
    try:
        if scheme not in ("s3", "gs", "gcs"):
            return pafs.FileSystem.from_uri(uri)
        bucket, options, settings = rest.split("/", 1)[0], "", {}
        if scheme == "s3":  # the store's endpoint (pyarrow reads no profile's), and its request form
            endpoint = _s3_endpoint(uri)
            if endpoint is not None:
                parsed = urllib.parse.urlparse(endpoint)
                options = "?" + urllib.parse.urlencode({"endpoint_override": parsed.netloc,
                                                         "scheme": parsed.scheme or "https"})
            settings = arrow_env_checksum_settings(endpoint)
        with arrow_checksum_env(settings):
            filesystem, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}{options}")
        return filesystem, rest
    except pa.ArrowInvalid as err:  # "Unrecognized filesystem type in URI", a URI pyarrow cannot parse
        raise FactLogNotFound(f"fact log {uri}: cannot open ({err}); give a local path or an s3:// URI") from err
    except OSError as err:
        raise FactLogError(f"fact log {uri}: cannot open ({err})") from err


def _s3_endpoint(uri: str) -> str | None:
    from botocore.exceptions import BotoCoreError

    try:
        return configured_s3_endpoint()
    except BotoCoreError as err:  # ProfileNotFound, a config file that does not parse
        raise FactLogError(f"fact log {uri}: cannot open ({err}); check AWS_PROFILE and the AWS config file") from None


def key_by_shard(rows: pa.Table, num_shards: int) -> pa.Table:
    """``rows`` plus an int32 ``_shard`` column, sorted by (shard, source, row)."""
    users = rows.column("user_id")
    unique = pc.unique(users).to_pylist()
    shard_of_user = {u: (UNROUTED if u is None or F.id_problem("user_id", u) else shard_of(u, num_shards))
                     for u in unique}
    keys = pa.array([shard_of_user[u] for u in unique], pa.int32())
    shards = pc.take(keys, pc.index_in(users, pa.array(unique, users.type)))
    keyed = rows.append_column(pa.field(SHARD_COLUMN, pa.int32()), shards)
    return keyed.sort_by([(SHARD_COLUMN, "ascending"), ("_source", "ascending"), ("_row", "ascending")])


def shard_slices(keyed: pa.Table) -> dict[int, tuple[int, int]]:
    """shard -> (offset, length) of its rows in a table sorted by ``_shard``."""
    if keyed.num_rows == 0:
        return {}
    counts = pc.value_counts(keyed.column(SHARD_COLUMN)).to_pylist()
    slices, offset = {}, 0
    for item in sorted(counts, key=lambda c: c["values"]):
        slices[item["values"]] = (offset, item["counts"])
        offset += item["counts"]
    return slices


def read_fact_log(
    source: str | list[str],
    *,
    filesystem: pafs.FileSystem | None = None,
    exclude_files: set[str] | frozenset[str] = frozenset(),
    on_bad_file: Literal["raise", "reject"] = "raise",
) -> FactLogBatch:
    """Read a Parquet file, a folder (e.g. hive ``day=.../part-0.parquet``) or a list of them, in
    this process (the night reads files in parallel with :func:`read_log_file`).

    ``source`` may be local or ``s3://bucket/prefix``. Files in ``exclude_files`` (paths as
    they appear in ``FactLogBatch.files``) are skipped; so are names starting with ``_`` or
    ``.`` (``_SUCCESS``, checksums). Rows are normalised, not validated (:func:`ingest` does).
    """
    tables, files, file_rejects = [], [], []
    for file in list_log_files(source, filesystem=filesystem):
        if file.path in exclude_files:
            logger.info("fact log %s: already ingested, skipped", file.path)
            continue
        table, problem, file = _read_listed(file, filesystem)
        if problem is not None and problem[0] == GONE:
            logger.warning("%s", _gone_message(file.path))
            continue  # not read: not in ``files``, so not skipped next time
        if problem is not None and problem[0] == NOT_DATA:
            logger.warning("%s", not_data_message(file.path, problem[1]))
            continue
        if problem is not None:
            file_rejects.append(_file_reject(file, problem, on_bad_file))
        else:
            tables.append(table)
        files.append(file)
    rows = pa.concat_tables(tables) if tables else F.FACT_LOG_BATCH_SCHEMA.empty_table()
    rejects = pa.Table.from_pylist(file_rejects, schema=F.REJECTS_SCHEMA)
    logger.info("fact log: %d rows from %d files, %d bad files", rows.num_rows, len(files), len(file_rejects))
    return FactLogBatch(rows=rows, files=tuple(files), file_rejects=rejects)


def _list_files(sources: list[str], filesystem: pafs.FileSystem | None):
    """Yield (filesystem, path, display name, size in bytes as a folder's listing gave it or None)
    for every data file under the sources."""
    local = None  # one listing of the local sources: a real folder or file is listed once in all
    for source in sources:
        if _shown(source) != source:
            raise FactLogNotFound(f"fact log {_shown(source)}: the path is not valid UTF-8 (the escaped bytes); rename it "
                               "to a UTF-8 name (e.g. convmv -f latin1 -t utf8 --notest) and point fact_log at that")
        fs, path, prefix = _resolve(source, filesystem)
        try:
            info = fs.get_file_info(path)
        except pa.ArrowInvalid as err:  # e.g. "Empty path component" for s3://bucket/a//b
            raise FactLogNotFound(f"fact log {source}: not a usable path ({err}); check for a doubled '/'") from None
        except OSError as err:
            raise _store_failed(source, err) from None
        if info.type == pafs.FileType.NotFound:
            if isinstance(fs, pafs.LocalFileSystem) and os.path.islink(path):
                raise FactLogNotFound(f"fact log {path}: {_broken_link(path)}")
            raise FactLogNotFound(f"fact log {prefix}{path}: no such file or folder (check the path and credentials)"
                                  f"{glob_hint(source)}")
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if info.type == pafs.FileType.File and _is_hidden(name):  # a marker named as the log: never Parquet
            folder = (prefix + path).rstrip("/").rsplit("/", 1)[0]
            raise FactLogNotFound(f"fact log {prefix}{path}: {name!r} is a marker or checksum file, not a log file (names "
                                  f"starting with '_' or '.' are skipped in a folder); give the folder: {folder}")
        if isinstance(fs, pafs.LocalFileSystem):
            local, local_fs = local or _LocalListing(), fs
            local.add(path, is_file=info.type == pafs.FileType.File)
            continue
        if info.type == pafs.FileType.File:
            yield fs, path, prefix + path, None
            continue
        seen: set[str] = set()  # system folders named (once each)
        try:
            listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        except OSError as err:
            raise _store_failed(source, err) from None
        for entry in listing:
            relative = entry.path[len(path):].lstrip("/")
            if entry.type == pafs.FileType.File and (table := _table_format(relative.split("/"))):
                raise _table_format_error(prefix + "/".join(p for p in (path, table[0]) if p), table[1])
            if entry.type != pafs.FileType.File or _is_hidden(relative):
                if entry.type == pafs.FileType.File and (system := _system_folder_of(relative)) and system not in seen:
                    seen.add(system)
                    _system_folder_skipped(prefix + "/".join(p for p in (path, system) if p))
                continue
            yield fs, entry.path, prefix + entry.path, entry.size
    for path in local.files() if local else ():
        yield local_fs, path, path, None


def _resolve(source: str, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str, str]:
    if "://" in source:
        scheme = source.split("://", 1)[0]
        if filesystem is None:
            fs, path = _from_uri(source)
        else:
            fs, path = filesystem, source.split("://", 1)[1]
        prefix = f"{scheme}://" if scheme != "file" else ""
        return fs, path.rstrip("/"), prefix
    if filesystem is None or isinstance(filesystem, pafs.LocalFileSystem):
        return pafs.LocalFileSystem(), os.path.abspath(source), ""
    return filesystem, source.rstrip("/"), ""


def glob_hint(source: str) -> str:
    """"; ..." for a fact_log that names nothing because it is a glob (Spark and DuckDB expand
    ``log/day=*/*.parquet``; a night reads a file or a folder, and the pattern was taken as a name), else ""."""
    if not any(c in source for c in "*?["):
        return ""
    return ("; a glob (*, ?, [...]) is not expanded: name the folder that holds the files instead (every file below "
            "it is read, partition folders such as day=.../ included)")


def _broken_link(path: str) -> str:
    target = os.readlink(path)
    shown = target if os.path.isabs(target) else f"{target} ({os.path.normpath(os.path.join(os.path.dirname(path), target))})"
    return f"a broken symbolic link: its target {shown} does not exist (restore the target, or remove the link)"


class _LocalListing:
    """The files under local sources, each real folder walked once and each real file listed once.

    Folders are walked by name; links to folders are followed only after every real folder below
    a source is walked, so a folder keeps its own name and a link to it is the one skipped."""

    def __init__(self) -> None:
        self.visited: dict[str, str] = {}  # real path of a walked folder -> the name it was walked as
        self.kept: dict[str, tuple[str, bool]] = {}  # a listed file's real path -> (its name, reached through a link)

    def add(self, root: str, *, is_file: bool) -> None:
        """List ``root``: a file, or a folder walked with the links below it."""
        if is_file:
            self._file(root, os.path.realpath(root), os.path.islink(root))
            return
        links: list[str] = []  # links to folders met on the way, followed after the real walk
        self._walk(root, False, links)
        while links:
            self._walk(links.pop(0), True, links)

    def files(self) -> list[str]:
        return [name for name, _ in self.kept.values()]

    def _walk(self, folder: str, through_link: bool, links: list[str]) -> None:
        real = os.path.realpath(folder)
        if real in self.visited:
            logger.warning("fact log: folder %s is %s, already listed as %s; not listed again (a symbolic link loop, "
                           "or a second link to one folder)", folder, real, self.visited[real])
            return
        self.visited[real] = folder
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise FactLogError(f"fact log {folder}: cannot list this folder ({err})") from None
        for entry in entries:
            if entry.name in _TABLE_LOGS and entry.is_dir():
                raise _table_format_error(folder, _TABLE_LOGS[entry.name])
            if entry.name.endswith(".metadata.json") and os.path.basename(folder) == "metadata":
                raise _table_format_error(os.path.dirname(folder), "an Apache Iceberg table")
            if _is_hidden(entry.name):
                if entry.name.lower() in _SYSTEM_FOLDERS:
                    _system_folder_skipped(entry.path)
                continue
            link = entry.is_symlink()
            if link and not os.path.exists(entry.path):  # broken: listed, so that reading it says so
                self.kept.setdefault(f"broken link {entry.path}", (entry.path, True))
            elif entry.is_dir():
                if link:
                    links.append(entry.path)
                else:
                    self._walk(entry.path, through_link, links)
            elif entry.is_file():
                self._file(entry.path, os.path.realpath(entry.path), through_link or link)

    def _file(self, name: str, real: str, through_link: bool) -> None:
        if real not in self.kept:
            self.kept[real] = (name, through_link)
            return
        kept, kept_through_link = self.kept[real]
        if kept == name:
            return
        if kept_through_link and not through_link:  # the file's own name wins over a link's
            self.kept[real] = (name, False)
            name, kept = kept, name
        logger.warning("fact log: %s is the same file as %s (%s); listed once, as %s", name, kept, real, kept)


# Folders a file system, an operating system or a NAS keeps inside a volume or a share (case-insensitive):
# recycle bins (Windows' $RECYCLE.BIN and RECYCLER, Synology's #recycle, QNAP's @Recycle) hold the files
# deleted from the log (a quarantine done by deleting a file on a share), snapshot folders (Synology's
# #snapshot, NetApp's ~snapshot over SMB, QNAP's @Recently-Snapshot) old copies of every file, fsck's
# lost+found fragments, Synology's @eaDir and Windows' System Volume Information metadata. None is part
# of the log; each was read as log files (the deleted file's rows came back). ``.snapshot``, ``.zfs``,
# ``.Trash-1000``, ``.Trashes`` start with '.'.
_SYSTEM_FOLDERS = frozenset(("$recycle.bin", "recycler", "#recycle", "@recycle", "#snapshot", "~snapshot",
                             "@recently-snapshot", "lost+found", "@eadir", "system volume information"))


def _system_folder_of(relative_path: str) -> str | None:
    """The first folder of ``relative_path`` that is one of :data:`_SYSTEM_FOLDERS` (its path), or None."""
    parts = relative_path.split("/")[:-1]
    for i, part in enumerate(parts):
        if part.startswith(("_", ".")):
            return None  # hidden by its own name first
        if part.lower() in _SYSTEM_FOLDERS:
            return "/".join(parts[: i + 1])
    return None


def _system_folder_skipped(display: str) -> None:
    logger.warning("fact log: %s is a folder a file system or a NAS keeps (a recycle bin, a snapshot, lost+found, "
                   "...): not read; move any log file in it out into the log", display)


def _is_hidden(relative_path: str) -> bool:
    """Not data by the writers' conventions: names starting with ``_`` or ``.`` (``_SUCCESS``,
    ``_temporary/``, ``.crc`` checksums), Hadoop's folder markers (``day=1_$folder$``, the
    empty objects EMRFS and s3n write for a folder), and the folders a file system or a NAS keeps
    (:data:`_SYSTEM_FOLDERS`: recycle bins, snapshots, ``lost+found``) and what is in them."""
    return any(part.startswith(("_", ".")) or part.endswith("_$folder$") or part.lower() in _SYSTEM_FOLDERS
               for part in relative_path.split("/"))


# Folders that make their parent a table of a table format, whose data files are not the table:
# a delete or update adds files and marks old ones removed in the log, so plain reading of the
# Parquet files serves deleted rows again and keeps replaced ones beside their replacements.
_TABLE_LOGS = {"_delta_log": "a Delta Lake table", ".hoodie": "an Apache Hudi table"}


def _table_format(parts: list[str]) -> tuple[str, str] | None:
    """(the table's folder, what it is) when a listed path's ``parts`` (relative to the source, the
    file last) lie in a table format's log (Delta Lake ``_delta_log/``, Hudi ``.hoodie/``) or in an
    Iceberg table's ``metadata/`` (its ``*.metadata.json``); else None."""
    for i, part in enumerate(parts[:-1]):
        if part in _TABLE_LOGS:
            return None if _is_hidden("/".join(parts[:i])) else ("/".join(parts[:i]), _TABLE_LOGS[part])
    if len(parts) >= 2 and parts[-2] == "metadata" and parts[-1].endswith(".metadata.json") \
            and not _is_hidden("/".join(parts[:-2])):  # a hidden folder is never listed, nor a table in it
        return "/".join(parts[:-2]), "an Apache Iceberg table"
    return None


def _table_format_error(folder: str, what: str) -> FactLogError:
    return FactLogError(
        f"fact log {folder}: {what}; its Parquet files still hold the rows the table has deleted or replaced, "
        "so they cannot be read as a fact log. Export the table's current snapshot as plain Parquet files (e.g. "
        "with DuckDB or the table format's own reader) into a folder of its own and point fact_log at that")


def _read_one(fs: pafs.FileSystem, path: str, display: str, root: str = "", listed_size: int = 0):
    """(its FileInfo when read, normalised table or None, (reason, detail) or None). ``root``: the listed source
    ``display`` lies under (only the folders below it are partition folders; "": none are).
    ``listed_size``: the file's size in bytes as its listing gave it (0: not known), read by
    :func:`_parquet_file` where the store's HEAD does not say it.

    Only the fact log's own columns are read: an extra column of a type this pyarrow cannot
    convert does not cost the file, and a column named like our provenance (``_row``) is never
    taken from a customer's file. INT96 timestamps (Spark, Hive, Impala) are read in
    microseconds: read in nanoseconds, dates outside 1677-2262 would wrap around silently.
    """
    try:
        info = fs.get_file_info(path)
    except OSError as err:
        raise _store_failed(display, err) from None
    size = info.size or 0
    if isinstance(fs, pafs.LocalFileSystem) and os.path.islink(path) and not os.path.exists(path):
        return info, None, (F.UNREADABLE_FILE, _broken_link(path))
    if info.type == pafs.FileType.NotFound:  # listed, then moved or deleted: no file to reject
        return info, None, (GONE, "")
    try:
        with fs.open_input_file(path) as handle, contextlib.ExitStack() as stack:
            try:
                parquet = _parquet_file(fs, path, handle, display, listed_size)
            except pa.ArrowNotImplementedError as err:  # a column type pyarrow cannot convert, in any column
                parquet = _DuckDBParquet.open(fs, path, handle, display, err)
            if isinstance(parquet, _DuckDBParquet):
                stack.callback(parquet.close)  # its connection and temporary copy
            present = parquet.schema_arrow.names
            partitions = {k: v for k, v in _hive_partitions(display, root).items() if k not in present}
            if problem := (getattr(parquet, "problem", None) or _partition_problem(display, root, present + list(partitions))
                           or _column_problem(present + list(partitions), _struct_fields(parquet.schema_arrow))):
                if parquet.metadata.num_rows == 0:  # an empty export (pandas' DataFrame([])): no row to lose
                    logger.warning("fact log %s: no rows; its columns are not the fact log's (%s), ignored", display,
                                   problem)
                    return info, normalise_fact_log(F.FACT_LOG_SCHEMA.empty_table(), source=display), None
                return info, None, (F.SCHEMA_MISMATCH, problem)
            table = parquet.read(columns=[name for name in present if name in F.FACT_LOG_SCHEMA.names])
            # Parquet's INTERVAL (DuckDB writes its INTERVAL so) reads as 12 raw bytes: never text or a time
            intervals = [c.path for c in parquet.schema if c.converted_type == "INTERVAL" and c.path in table.column_names]
    except (pa.ArrowException, OSError) as err:
        if not isinstance(fs, pafs.LocalFileSystem) and _AWS_ERROR in str(err):  # the store's answer, not the file
            raise _store_failed(display, err) from None
        if _gone(fs, path):  # moved or deleted between the look above and the read
            return info, None, (GONE, "")
        local = isinstance(fs, pafs.LocalFileSystem)
        head = _first_bytes(fs, path, size if local else max(size, listed_size or 0))
        if head == b"" and not _named_as_parquet(display):
            return info, None, (NOT_DATA, _EMPTY)
        if not local and not listed_size and not size:
            shown = f"; its first bytes are {head[:4]!r}: {_looks_like(head, display)}" if head else ""
            return info, None, (F.UNREADABLE_FILE, f"the store says the object holds 0 bytes ({err}): an empty "
                                "object, or a store or gateway that answers HEAD without Content-Length; name the "
                                "folder it lies in as the fact log (a listing gives each file's size) or fix the "
                                f"store{shown}")
        return info, None, (F.UNREADABLE_FILE,
                            f"not a readable Parquet file ({err})"
                            f"{_damaged(err) or _cut_short(head, err, info, display) or _unsupported(err)}")
    for name, value in partitions.items():  # a column written as a folder (pandas/Spark partition_cols)
        # bytes that are not UTF-8 once %-decoded stay bytes: each row is rejected naming them
        kind = pa.binary() if isinstance(value, bytes) else pa.string()
        table = table.append_column(name, pa.array([value] * table.num_rows, kind))
    extra = [name for name in present if name not in F.FACT_LOG_SCHEMA.names]
    if extra:
        logger.warning("fact log %s: ignoring extra columns %s", display, extra)
    try:
        if intervals:
            raise F.SchemaMismatch(_parquet_interval(intervals[0], table.column(intervals[0]).type))
        return info, normalise_fact_log(table, source=display, file_columns=present + list(partitions)), None
    except F.SchemaMismatch as err:
        if table.num_rows == 0:  # no value to lose: tools type an empty export's columns as they like
            logger.warning("fact log %s: no rows; its column types (%s) are not the fact log's, ignored", display, err)
            return info, normalise_fact_log(F.FACT_LOG_SCHEMA.empty_table(), source=display), None
        return info, None, (F.SCHEMA_MISMATCH, str(err))


def _first_bytes(fs: pafs.FileSystem, path: str, size: int, n: int = 16) -> bytes | None:
    """The first ``n`` bytes of a file that did not read as Parquet (b"": it is empty), or None where
    they cannot be read. ``size``: what the listing or HEAD said. On S3 an object read as empty is
    not taken on trust (a gateway that answers HEAD without Content-Length says 0 of every object,
    and pyarrow then reads nothing): its first bytes are asked for by a ranged GET."""
    try:
        with fs.open_input_file(path) as handle:
            head = handle.read(n)
    except (pa.ArrowException, OSError):
        return None
    if head or isinstance(fs, pafs.LocalFileSystem):
        return head
    if fs.type_name != "s3":
        return None if size > 0 else head  # another store: its 0 bytes taken as they are only where nothing said more
    return _s3_first_bytes(fs, path, n)


def _s3_first_bytes(fs: pafs.FileSystem, path: str, n: int) -> bytes | None:
    """The first ``n`` bytes of an S3 object by a ranged GET (botocore, the job's credentials and
    endpoint as the store resolves it); b"" for an empty object (416 or an empty body); None where
    the GET fails otherwise."""
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, _, key = path.partition("/")
    try:
        endpoint = configured_s3_endpoint()
        region = getattr(fs, "region", None) or None
        from botocore.config import Config

        # As the product's S3 store builds its client (versions/store.py): path-style addressing (a
        # custom endpoint rarely resolves bucket subdomains), bounded timeouts and attempts.
        config = Config(s3={"addressing_style": "path"} if endpoint else {}, connect_timeout=10, read_timeout=30,
                        retries={"max_attempts": 3, "mode": "standard"})
        client = boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)
        answer = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{n - 1}")
        return answer["Body"].read(n)
    except ClientError as err:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return b"" if status == 416 or err.response.get("Error", {}).get("Code") == "InvalidRange" else None
    except (BotoCoreError, OSError):
        return None


# The first bytes of the formats a file in the log may be in instead of Parquet.
_MAGIC = ((b"\x1f\x8b", "gzip-compressed data"), (b"BZh", "bzip2-compressed data"),
          (b"\x28\xb5\x2f\xfd", "zstd-compressed data"), (b"\xfd7zXZ\x00", "xz-compressed data"),
          (b"\x04\x22\x4d\x18", "lz4-compressed data"), (b"PK\x03\x04", "a zip archive (or an Excel .xlsx)"),
          (b"ORC", "an ORC file"), (b"Obj\x01", "an Avro file"), (b"ARROW1", "an Arrow IPC (Feather) file"),
          (b"\xff\xff\xff\xff", "an Arrow IPC stream"), (b"SEQ", "a Hadoop SequenceFile"),
          (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "a legacy Microsoft Office file (Excel .xls, Word .doc; Windows' "
                                                "Thumbs.db too)"))


def _looks_like(head: bytes, display: str) -> str:
    """What a file that is no Parquet is, by its first bytes and its name (a compression suffix around
    a data suffix: ``part-0.parquet.gz``, ``part-0.csv.gz``), and what to do: convert it to Parquet."""
    name = display.rsplit("/", 1)[-1]
    if head.startswith((b"PAR1", b"PARE")):  # a Parquet file the store says less of than it holds (or one cut short)
        return ("by its first bytes it is Parquet, but it could not be read whole: the store reports another size "
                "than the object holds, or the file was cut short; read it from a store that gives sizes, or "
                "rewrite it")
    what = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if what is None:
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if text[:1] in (b"{", b"["):
            what = "JSON text"
        elif text and all(32 <= c < 127 or c in (1, 9, 10, 13) or c >= 128 for c in text):  # \x01: Hive text
            what = "text (CSV, TSV, JSON lines or another text)"
        else:
            what = "no format this reader knows"
    stem, _, suffix = name.rpartition(".")
    compression = _COMPRESSION_SUFFIXES.get(f".{suffix.lower()}") if stem else None
    if compression and _named_as_parquet(stem):
        return (f"by its first bytes it is {what}, and by its name a Parquet file compressed whole with {compression} "
                f"(.{suffix}); Parquet compresses its own pages, so a reader cannot open it: decompress it to {stem} "
                "(or re-export it as plain Parquet) and move the compressed file out of the log")
    inner = stem.rpartition(".")[2] if compression and "." in stem else ""
    named = f", and by its name {inner} compressed with {compression}" if inner else ""
    return (f"by its first bytes it is {what}{named}. Log files are Parquet: convert it (e.g. DuckDB: COPY (SELECT * "
            f"FROM '{name}') TO 'x.parquet') and move this file out of the log; a file that holds no rows can stay "
            "under a name starting with '_' or '.'")


# pyarrow's words for a file without its footer: empty, shorter than a footer, or ending elsewhere
_NO_FOOTER = ("file size is 0 bytes", "smaller than the minimum file footer", "magic bytes not found in footer")
IN_FLIGHT_S = 600  # a file modified this recently and cut short may still be being written


def _cut_short(head: bytes | None, err: Exception, info: pafs.FileInfo, display: str) -> str:
    """What a file without a Parquet footer likely is, and what to do: one that begins as Parquet
    does (or is empty) was cut short, or is still being written (Parquet writes its footer last);
    another is no Parquet at all (:func:`_looks_like`, by ``head``, its first bytes). "" for another
    error, or a file whose first bytes could not be read."""
    if not any(words in str(err) for words in _NO_FOOTER) or head is None:
        return ""
    if head and not head.startswith((b"PAR1", b"PARE")):  # PARE: an encrypted footer
        return (f": it does not begin as a Parquet file does (its first bytes: {head[:4]!r}): a file of another format "
                f"(CSV, JSON, text) in the log? Move it out; {_looks_like(head, display)}")
    age = (time.time_ns() - info.mtime_ns) / 1e9 if info.mtime_ns is not None else None
    recent = f"; it was modified {max(age, 0):.0f} s ago" if age is not None and age < IN_FLIGHT_S else ""
    return (f": the file ends before its Parquet footer, which is written last: cut short by an interrupted copy or "
            f"upload, or still being written{recent}. A night reads it again once it is whole (it is not recorded "
            "as ingested); have writers write under a name starting with '_' or '.' and rename it into place")


# pyarrow's own words (libparquet) for an encrypted file read without keys: never the bare word, which
# an error's text may hold in its path ("Failed to open local file '/data/encrypted/part-0.parquet'").
_ENCRYPTED = re.compile(r"no decryption found in reader's properties|FileDecryption is not setup correctly"
                        r"|noted as encrypted but no file decryptor|Could not read encrypted metadata", re.IGNORECASE)
# LZO (Hadoop-era Hive tables) is in the format but not in Arrow's C++ reader.
_LZO = re.compile(r"(\w+) compression is supported by the Parquet format in general", re.IGNORECASE)
# A pyarrow built without a codec the file uses: the reader's build, not the file, is at fault.
_NOT_BUILT = re.compile(r"Support for codec '(\w+)' not built", re.IGNORECASE)


def _unsupported(err: Exception) -> str:
    """What to do with a whole, undamaged Parquet file the night cannot read: encrypted (Parquet
    modular encryption: the night holds no keys), or compressed with a codec pyarrow cannot
    decompress (LZO). "" for another error. Such a file is not recorded as ingested: rewritten in
    place, a night reads it."""
    text = str(err)
    if _ENCRYPTED.search(text):
        return (": the file is encrypted (Parquet modular encryption) and a night holds no keys to read it: have its "
                "writer write the fact log unencrypted and encrypt it at rest instead (the store's server-side "
                "encryption, an encrypted volume). It is not recorded as ingested: a night reads it once it is "
                "rewritten")
    if match := _LZO.search(text):
        return (f": its pages are compressed with {match.group(1).upper()}, which the night's Parquet reader (pyarrow) "
                "cannot decompress: rewrite the file with zstd, snappy or gzip (Spark: "
                "spark.sql.parquet.compression.codec; Hive: parquet.compression). It is not recorded as ingested: a "
                "night reads it once it is rewritten")
    if match := _NOT_BUILT.search(text):
        return (f": the pyarrow this night runs was built without {match.group(1)}, which the file is compressed with: "
                "install the standard pyarrow wheel (pip install pyarrow) on the nodes that read the log. It is not "
                "recorded as ingested: a night reads it once it can")
    return ""


# pyarrow's words for a page it cannot decode: its compressed bytes, its header or its encoded values
# damaged (measured 2026-12-03: four bytes flipped at ~150 places of files of each codec, with and
# without dictionaries; the errors seen). Not "Exceeded size limit": a whole file whose metadata is
# larger than the reader's Thrift limits says that.
_UNDECODABLE = re.compile(
    r"Corrupt \w+ compressed data|ZSTD decompression failed|GZipCodec failed|didn't decompress to expected size"
    r"|LZ4 decompression failed|Unexpected end of stream|Index not in dictionary bounds|Invalid or truncated PLAIN"
    r"|Invalid BYTE_ARRAY value|Invalid number of indices|corrupt data page|Invalid page header"
    r"|(Invalid data|No more data to read|invalid TType|don't know what type)\W+Deserializing page header failed",
    re.IGNORECASE)


def _damaged(err: Exception) -> str:
    """What a damaged file is, and what to do; "" for another error: a page that fails its CRC (Spark,
    parquet-mr and pyarrow's write_page_checksum store one per page; pages are read checked,
    :func:`_parquet_file`; unchecked, a flipped byte in an uncompressed page read as other text, 'Lisbon'
    as 'Misbon', and was published), or a page that cannot be decoded (its compressed bytes, header or
    values damaged)."""
    text = str(err)
    if _UNDECODABLE.search(text):
        return (": a page of it cannot be decoded (its bytes are not what was written)" + _DAMAGED_FIX
                + "its writer wrote it so: write it again")
    if "checksum verification failed" not in text.lower():
        return ""
    return (": a page's checksum does not match its bytes" + _DAMAGED_FIX + "its writer computed the checksums "
            "wrongly: rewrite the file without page checksums (e.g. pyarrow write_table(..., write_page_checksum=False))")


_DAMAGED_FIX = (", so the file was damaged after it was written (a bad disk, copy or transfer); copy it again from its "
                "source. It is not recorded as ingested: a night reads it once it is replaced. If a fresh copy fails "
                "the same way, ")


def _gone(fs: pafs.FileSystem, path: str) -> bool:
    """Whether ``path`` is no longer there (a read of it failed); a link counts as there."""
    if isinstance(fs, pafs.LocalFileSystem):
        return not os.path.lexists(path)
    try:
        return fs.get_file_info(path).type == pafs.FileType.NotFound
    except OSError:
        return False


_AWS_ERROR = "AWS Error"  # how pyarrow's S3 filesystem words an error answer (403, 503, no connection)


def _store_failed(uri: str, err: OSError) -> FactLogError:
    """FactLogError for an object store that refused or failed a request on a fact log (wrong or
    expired credentials, a bucket policy, a store that is down): the night fails naming the URI and
    the fix, never a file rejected for the store's answer. Another OSError is named as it is."""
    text = " ".join(str(err).split())
    if _AWS_ERROR not in text:
        return FactLogError(f"fact log {uri}: cannot read ({text})")
    return FactLogError(f"fact log {uri}: the store refused or failed the request ({text}); no file was rejected for "
                        "it. Check the job's credentials and the endpoint (AWS_ENDPOINT_URL, the profile), or that the "
                        "store is up, then run the night again")


def _parquet_file(fs: pafs.FileSystem, path: str, handle: pa.NativeFile, display: str, listed_size: int):
    """``pq.ParquetFile`` of an open log file; on an object store whose HEAD answered without
    ``Content-Length`` (some gateways answer HEAD chunked: pyarrow then takes every object as 0
    bytes, "Parquet file size is 0 bytes", and a good file was called damaged) the same reading
    API over a dataset fragment given the listing's size, which reads with ranged GETs alone. An
    object whose HEAD gives another size than its listing was replaced since: read as it is now."""
    if listed_size <= 0 or handle.size() == listed_size or isinstance(fs, pafs.LocalFileSystem):
        return pq.ParquetFile(handle, coerce_int96_timestamp_unit="us", page_checksum_verification=True, **_EXTENSIONS)
    if handle.size() > 0:  # replaced since the listing (an export re-run in place): read it as it is now
        # (read at the listed size, its footer was missed and a good file called "not a readable Parquet file")
        logger.warning("fact log %s: %d bytes when listed, %d when read: replaced since the listing; read as it is "
                       "now (and recorded as read so)", display, listed_size, handle.size())
        return pq.ParquetFile(handle, coerce_int96_timestamp_unit="us", page_checksum_verification=True, **_EXTENSIONS)
    logger.warning("fact log %s: the store answered HEAD with %d bytes, its listing with %d; read at the listed size "
                   "(a store or gateway that answers HEAD without Content-Length)", display, handle.size(), listed_size)
    return _SizedParquet(fs, path, listed_size)


class _SizedParquet:
    """The part of ``pq.ParquetFile``'s API :func:`_read_one` uses, over a fragment of known size."""

    def __init__(self, fs: pafs.FileSystem, path: str, size: int) -> None:
        options = pads.ParquetReadOptions(coerce_int96_timestamp_unit="us")
        checked = pads.ParquetFragmentScanOptions(page_checksum_verification=True)
        self._fragment = pads.ParquetFileFormat(read_options=options, default_fragment_scan_options=checked
                                                ).make_fragment(path, filesystem=fs, file_size=size)
        self.metadata = self._fragment.metadata  # pq.FileMetaData
        self.schema = self.metadata.schema  # pq.ParquetSchema
        self.schema_arrow = self._fragment.physical_schema

    def read(self, columns: list[str]) -> pa.Table:
        return self._fragment.to_table(columns=columns)


class _DuckDBParquet:
    """The part of ``pq.ParquetFile``'s API :func:`_read_one` uses, read by DuckDB: for a file pyarrow
    cannot open at all because one of its columns has a type pyarrow does not convert (polars'
    ``Int128``, written as a 16-byte integer: "Integers with more than 64 bits not implemented"). pyarrow
    converts the whole schema when it opens a file, so one such extra column cost the whole file;
    DuckDB converts only the columns read. Its reader does not check page checksums (pyarrow's does):
    the file is named in a warning. A file on a store is copied to a temporary local file first."""

    def __init__(self, source: str, keep: object = None) -> None:
        import duckdb

        self._keep = keep  # the temporary copy's folder, removed by :meth:`close`
        self._db = duckdb.connect()
        try:
            quoted = "'" + source.replace("'", "''") + "'"
            self._from = f"read_parquet({quoted})"
            top = self._db.sql(f"SELECT * FROM {self._from} LIMIT 0")  # the top-level columns, as DuckDB types them
            kinds = dict(zip(top.columns, (str(kind) for kind in top.types)))
            self.schema_arrow = pa.schema([pa.field(name, pa.null()) for name in top.columns])  # names only
            self.metadata = _RowCount(self._db.sql(f"SELECT count(*) FROM {self._from}").fetchall()[0][0])
            self.schema: list = []  # no INTERVAL check: DuckDB reads one as an interval, which the types refuse
            # A fixed-size column with no type DuckDB knows is raw bytes (BLOB) to it (polars' Int128 is one: 16
            # bytes, an integer's two's complement): read as text, its bytes became ids. A log column so is refused.
            elements = self._db.sql(f"SELECT name, type, type_length, logical_type, converted_type "
                                    f"FROM parquet_schema({quoted})").fetchall()
            opaque = [(name, width) for name, kind, width, logical, converted in elements
                      if kind == "FIXED_LEN_BYTE_ARRAY" and logical is None and converted is None
                      and name in F.FACT_LOG_SCHEMA.names and kinds.get(name) == "BLOB"]
        except BaseException:
            self.close()
            raise
        self.problem = None if not opaque else (
            f"column {opaque[0][0]!r} holds {opaque[0][1]}-byte values of a type the reader cannot convert (polars' "
            f"Int128 writes a 16-byte integer so): export {opaque[0][0]} as a string, or as an integer of 64 bits")

    def close(self) -> None:
        self._db.close()
        if self._keep is not None:
            self._keep.cleanup()
            self._keep = None

    @classmethod
    def open(cls, fs: pafs.FileSystem, path: str, handle: pa.NativeFile, display: str, err: Exception):
        """A reader of the file, or ``err`` raised again where DuckDB cannot read it either."""
        import tempfile

        import duckdb

        keep = None
        try:
            if isinstance(fs, pafs.LocalFileSystem):
                source = path
            else:
                keep = tempfile.TemporaryDirectory(prefix="engram-log-")
                source = os.path.join(keep.name, "log.parquet")
                handle.seek(0)
                with open(source, "wb") as copy:
                    while chunk := handle.read(1 << 24):
                        copy.write(chunk)
            reader = cls(source, keep)
        except (duckdb.Error, OSError, pa.ArrowException):
            if keep is not None:
                keep.cleanup()
            raise err from None
        logger.warning("fact log %s: pyarrow cannot open it (%s: a column of a type it does not convert); its fact "
                       "log columns are read with DuckDB instead, without checking page checksums", display, err)
        return reader

    def read(self, columns: list[str]) -> pa.Table:
        """The ``columns`` (top-level names); a page DuckDB cannot decode (damaged, cut short) raises
        ``pa.ArrowInvalid`` with DuckDB's words, so the file is ``UNREADABLE_FILE`` as with pyarrow."""
        import duckdb

        listed = ", ".join('"' + name.replace('"', '""') + '"' for name in columns)
        try:
            relation = self._db.sql(f"SELECT {listed} FROM {self._from}")
            return (getattr(relation, "to_arrow_table", None) or relation.arrow)()  # duckdb 2 / 1.x
        except duckdb.Error as err:
            raise pa.ArrowInvalid(f"DuckDB: {err}") from None


@dataclass(frozen=True)
class _RowCount:
    num_rows: int


def _parquet_interval(name: str, kind: pa.DataType) -> str:
    what = f"column {name!r} is a Parquet INTERVAL (months, days, milliseconds; read as {kind})"
    if name == "event_time":
        return f"{what}: a length of time, not a moment; {_TIME_FIX}"
    return f"{what}, not text; export {name} as a string"


_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def _hive_partitions(path: str, root: str) -> dict[str, str | bytes | None]:
    """Fact-log columns written as ``column=value`` folders of ``path`` below its listed source
    ``root`` (Hive partitioning, as pandas' and Spark's ``partition_cols`` write it; the value
    %-decoded, Hive's null folder as None; a value whose decoded bytes are not UTF-8 as those
    bytes). The innermost folder wins. Folders at or above ``root`` are where the log lives, not
    partitions: ``/data/scope=prod/fact_log`` does not make every row a ``prod`` scope fact."""
    if not root or not path.startswith(root.rstrip("/") + "/"):
        return {}
    out: dict[str, str | bytes | None] = {}
    for part in path[len(root.rstrip("/")) + 1:].split("/")[:-1]:
        name, sep, value = part.partition("=")
        if sep and name in F.FACT_LOG_SCHEMA.names:
            if value == _HIVE_NULL:
                out[name] = None
                continue
            raw = urllib.parse.unquote_to_bytes(value)
            try:
                out[name] = raw.decode("utf-8")
            except UnicodeDecodeError:
                out[name] = raw
    return out


def _partition_problem(path: str, root: str, present: list[str]) -> str | None:
    """Why a partition folder of ``path`` below ``root`` cannot be read: its key is a near miss of a
    fact-log column that neither the file nor an exact partition folder gives (``Scope=org%3Aa/``,
    ``UserId=u1/``, ``'scope '``, a BOM-prefixed key). Ignored as a folder of no column, it read
    every row without that column (shared facts as personal ones), as a misspelt column would."""
    if not root or not path.startswith(root.rstrip("/") + "/"):
        return None
    ours = {_folded_name(name): name for name in F.FACT_LOG_SCHEMA.names}
    for part in path[len(root.rstrip("/")) + 1:].split("/")[:-1]:
        key, sep, value = part.partition("=")
        wanted = ours.get(_folded_name(key)) if sep else None
        if wanted is None or key == wanted or wanted in present:
            continue
        why = _near_miss(key, wanted).split(": rename ", 1)[0].replace("column names are", "partition keys are")
        return (f"partition folder {part!r} is not a {wanted!r} folder, and without it every row would be read as "
                f"having no {wanted}; {why}: rename the folder to {wanted + sep + value!r}")
    return None


def _column_problem(present: list[str], structs: Mapping[str | tuple[str, str], list[str]] | None = None) -> str | None:
    """Why a file's columns cannot be read as a fact log (a log column twice, a required one
    missing), naming the file's own columns and a near miss (``USER_ID``, ``userId``), or a struct
    column holding the log's columns (``structs``: :func:`_struct_fields`), or None."""
    ours = set(F.FACT_LOG_SCHEMA.names)
    twice = sorted({name for name in present if name in ours and present.count(name) > 1})
    if twice:
        return f"column {twice[0]!r} appears {present.count(twice[0])} times; keep one"
    fold = {_folded_name(name): name for name in present}
    # a column only some ops need (a file of forget_user rows alone need not hold fact_id, trigger,
    # answer): left to normalise_fact_log, which reads the ops; unless a near miss of it is there
    missing = [name for name in F.REQUIRED_LOG_COLUMNS if name not in present
               and (name not in _NEEDED_BY or _folded_name(name) in fold)]
    if not missing:
        # An optional column under a near-miss name would be ignored as an extra column, and every
        # row read without it (a misspelt ``scope``: shared facts read as personal ones): refused.
        for name in F.OPTIONAL_LOG_COLUMNS:
            near = fold.get(_folded_name(name))
            if name not in present and near is not None:
                return (f"column {near!r} is not the optional column {name!r}, and without it every row would be "
                        f"read as having no {name}; {_near_miss(near, name)} (or drop the column)")
        return None
    return (f"missing required column {missing[0]!r} (the file's columns: {_shown_columns(present)})"
            f"{_missing_hint(missing[0], present, structs)}")


_LISTS = (pa.types.is_list, pa.types.is_large_list, pa.types.is_list_view, pa.types.is_large_list_view,
          pa.types.is_fixed_size_list)


def _struct_fields(schema: pa.Schema) -> dict[str | tuple[str, str], list[str]]:
    """{struct column: its fields' names} of a file's schema; a list of structs (a document per user
    holding its facts) as ``(name, "list")``."""
    out: dict[str | tuple[str, str], list[str]] = {}
    for f in schema:
        kind = f.type
        if any(is_list(kind) for is_list in _LISTS) and pa.types.is_struct(kind.value_type):
            out[(f.name, "list")] = [child.name for child in kind.value_type]
        elif pa.types.is_struct(kind):
            out[f.name] = [child.name for child in kind]
    return out


def _nested_hint(missing: str, structs: Mapping[str | tuple[str, str], list[str]] | None) -> str:
    """"; ..." for a file whose log columns are one level down, in a struct column holding ``missing``
    (a Kafka Connect or Firehose record ``payload``/``value``, a Debezium envelope's ``after``): it was
    refused as missing the column, with the struct's name alone among the file's columns; else ""."""
    for key, fields in (structs or {}).items():
        folded = {_folded_name(field) for field in fields}
        if missing not in fields and _folded_name(missing) not in folded:
            continue
        held = ", ".join(repr(c) for c in F.FACT_LOG_SCHEMA.names if c in fields or _folded_name(c) in folded)
        if isinstance(key, tuple):  # a list of structs: one row of the file holds many rows of the log
            name = key[0]
            return (f"; struct column {name!r} holds the log's columns ({held}) in a list: each of the file's rows "
                    f"holds a list of log rows (a document per user); write one log row per element as "
                    f"top-level columns, e.g. DuckDB: COPY (SELECT UNNEST({name}, recursive := true) FROM 'in.parquet') "
                    f"TO 'out.parquet', Spark: df.select(explode('{name}').alias('r')).select('r.*')")
        return (f"; struct column {key!r} holds the log's columns ({held}): the rows are "
                f"nested one level down (a Kafka Connect, Debezium or Firehose envelope); write them as top-level "
                f"columns, e.g. DuckDB: COPY (SELECT {key}.* FROM 'in.parquet') TO 'out.parquet', Spark: "
                f"df.select('{key}.*')")
    return ""


def _shown_columns(present: list[str]) -> list[str]:
    return present[:20] + ([f"... {len(present) - 20} more"] if len(present) > 20 else [])


# What other tools and schemas call each log column (folded as by _folded_name). A file that holds one
# of these and not the log's column is refused naming it and the rename, as a near miss is: the refusal
# named only the missing column, and which of the file's columns was meant was left to guess.
_OTHER_NAMES = {
    "user_id": ("user", "uid", "userkey", "customerid", "accountid", "memberid", "personid", "subjectid", "clientid"),
    "fact_id": ("id", "fact", "factkey", "key", "memoryid", "memory", "itemid", "recordid", "entryid", "slot"),
    "op": ("operation", "action", "optype", "operationtype", "eventtype", "change", "changetype", "kind", "type",
           "verb", "cdcop"),
    "trigger": ("prompt", "cue", "prefix", "question", "context", "key", "input", "lefttext", "triggertext"),
    "answer": ("value", "response", "completion", "target", "output", "text", "reply", "answertext", "fact",
               "memory"),
    "event_time": ("time", "timestamp", "ts", "eventts", "eventtimestamp", "eventat", "datetime", "date",
                   "createdat", "updatedat", "modifiedat", "occurredat", "loggedat", "eventdate",
                   "createdtime", "updatedtime", "ingestedat", "sourcets", "tsms", "timestamputc", "eventtimeutc"),
}


def _missing_hint(missing: str, present: list[str], structs: Mapping[str | tuple[str, str], list[str]] | None = None) -> str:
    """"; ..." naming the fix for a file without the log column ``missing``: the rename of a near
    miss of it (``USER_ID``, ``'user_id '``), else of a column other tools call it by (``timestamp``,
    ``value``, ``operation``) that the log does not hold under its own name; else ""."""
    fold = {_folded_name(name): name for name in present}
    if (near := fold.get(_folded_name(missing))) is not None:
        return f"; {_near_miss(near, missing)}"
    if nested := _nested_hint(missing, structs):
        return nested
    ours = set(F.FACT_LOG_SCHEMA.names)
    candidates = [name for name in present if name not in ours and _folded_name(name) in _OTHER_NAMES[missing]]
    if not candidates:
        return ""
    shown = " or ".join(repr(name) for name in candidates[:3])
    return (f"; the file has {shown}: if that is the {missing} (what another tool calls it), rename it to "
            f"{missing!r}")


def _folded_name(name: str) -> str:
    """A column name's letters and digits, NFKC and case-folded: ``USER_ID``, ``userId``,
    ``user-id``, ``'user_id '`` and a BOM-prefixed ``'\ufeffuser_id'`` all fold to ``userid``."""
    return "".join(c for c in unicodedata.normalize("NFKC", name) if c.isalnum()).casefold()


def _near_miss(near: str, wanted: str) -> str:
    """Why ``near`` is not the column ``wanted``, and the rename."""
    hidden = sorted({f"U+{ord(c):04X}" for c in near if unicodedata.category(c) in ("Cf", "Cc", "Zs", "Zl", "Zp")
                     or c.isspace()})
    if "U+FEFF" in hidden:
        why = ("the name starts with an invisible byte-order mark (U+FEFF: a CSV with a BOM read without "
               "encoding='utf-8-sig')")
    elif hidden:
        why = f"the name holds invisible or space characters ({', '.join(hidden)})"
    elif near.lower() == wanted:
        why = "column names are case-sensitive"
    else:
        why = "column names are matched exactly"
    return f"{why}: rename {near!r} to {wanted!r}"


# --- Normalising ----------------------------------------------------------------------------


def normalise_fact_log(table: pa.Table, *, source: str = TABLE_SOURCE, file_columns: list[str] | None = None) -> pa.Table:
    """Conform a raw fact log table to FACT_LOG_BATCH_SCHEMA, adding provenance.

    Extra columns are dropped with a warning; a missing required column, or a column whose
    type cannot hold its kind of value (a float user_id, an integer event_time), raises
    SchemaMismatch naming the column. A single value that cannot be read (invalid UTF-8 in
    any physical string type, a time string in another format, a time outside
    ``F.MIN_EVENT_TIME``..``F.MAX_EVENT_TIME``) never costs the file: it becomes null with a
    per-row problem (reason + detail) that ingest turns into a reject of that row.
    Timestamps finer than a microsecond (pandas' ``datetime64[ns]``) are truncated to it.
    ``file_columns``: the file's own columns (extra ones too), which a refusal for a missing column
    names; by default the table's.
    """
    keep = set(F.FACT_LOG_BATCH_SCHEMA.names)
    extra = [name for name in table.column_names if name not in keep]
    if extra:
        logger.warning("fact log %s: ignoring extra columns %s", source, extra)
    file_columns = list(table.column_names if file_columns is None else file_columns)
    missing = [name for name in F.REQUIRED_LOG_COLUMNS if name not in table.column_names]
    if [name for name in missing if name not in _NEEDED_BY]:
        raise F.SchemaMismatch(f"missing required column {missing[0]!r} (columns found: "
                               f"{_shown_columns(file_columns)}){_missing_hint(missing[0], file_columns, _struct_fields(table.schema))}")
    n = table.num_rows
    problems: list[tuple[str, str] | None] = [None] * n
    columns = {}
    for name in ("user_id", "fact_id", "op", "trigger", "answer", "scope"):
        raw = table.column(name) if name in table.column_names else pa.chunked_array([pa.nulls(n, pa.string())])
        columns[name] = _to_text(raw, name, problems)
    if missing:
        _check_ops_without(missing, _canonical_op(columns["op"]), file_columns)
    for name in _ID_COLUMNS:
        if name in table.column_names and not pa.types.is_floating(table.column(name).type):
            _warn_float_text_ids(columns[name], name, source)
        if name in table.column_names and not isinstance(table.column(name).type, _UUID_TYPE):
            _warn_uuid_text_ids(columns[name], name, source)
        if name in table.column_names and _is_text_type(table.column(name).type):
            _warn_other_forms_of_ids(columns[name], name, source)
    for name in ("user_id", "scope"):
        _warn_ids_differing_in_case(columns[name], name, source)
    for name in _TEXT_COLUMNS:
        _warn_escaped_text(columns[name], name, source)
    _warn_scope_of_own_facts(columns, source)
    _warn_row_number_fact_ids(columns["fact_id"], source)
    _warn_trigger_holding_its_answer(columns["trigger"], columns["answer"], source)
    for name in _TEXT_COLUMNS:
        _warn_missing_text_values(columns[name], name, columns["op"], source)
    for name in _ID_COLUMNS + _TEXT_COLUMNS:
        kind = table.column(name).type if name in table.column_names else pa.null()
        if _raw_uuid(kind.value_type if pa.types.is_dictionary(kind) else kind):
            logger.warning("fact log %s: column %r is %s without Parquet's UUID annotation: read as UUIDs (lowercase "
                           "hyphenated text, as a UUID column reads); write 16-character texts as a string column",
                           source, name, kind)
    columns["op"] = _canonical_op(columns["op"])
    times = _to_timestamp(table.column("event_time"), problems, source)
    _warn_zero_times(times, columns["op"], source)
    columns["event_time"] = _whole_day_forgets_at_day_end(table.column("event_time"), columns["op"], times, source)
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


# The log columns only some ops need, and those ops: a file whose rows are all of other ops (an
# erasure export of user_id, op and event_time alone) may leave the column out; it was refused.
_NEEDED_BY = {"fact_id": (F.OP_UPSERT, F.OP_DELETE), "trigger": (F.OP_UPSERT,), "answer": (F.OP_UPSERT,)}


def _check_ops_without(missing: list[str], ops: pa.ChunkedArray, present: list[str]) -> None:
    """Raise SchemaMismatch naming the first row whose op needs a column of ``missing`` (columns of
    ``_NEEDED_BY`` the file leaves out); a row of another op (or of none: it is ``UNKNOWN_OP``) needs none."""
    for name in missing:
        needing = pc.is_in(ops, value_set=pa.array(_NEEDED_BY[name], pa.string()))
        if pc.any(needing).as_py():
            row = pc.index(needing, True).as_py()
            raise F.SchemaMismatch(
                f"missing required column {name!r} (the file's columns: {_shown_columns(present)}); row {row} is "
                f"{ops[row].as_py()!r}, which needs it (only a file of {' and '.join(_needless(name))} rows alone "
                f"may leave it out): add the column, or write those rows to a file of their own"
                f"{_missing_hint(name, present)}")


def _needless(name: str) -> list[str]:
    return [op for op in F.OPS if op not in _NEEDED_BY[name]]


def _canonical_op(ops: pa.ChunkedArray) -> pa.ChunkedArray:
    """``op`` (string) as the keyword it names, in Arrow: compatibility forms folded (NFKC: the
    full-width ``ｕｐｓｅｒｔ`` of a Japanese input method), invisible format characters removed
    (Unicode Cf: a zero-width space, a byte-order mark, a soft hyphen), surrounding whitespace
    (tab, no-break space) trimmed, lower case (``Upsert``, ``UPSERT`` as Java enums and C# write
    them). Each of these cost its row as UNKNOWN_OP; what is left is checked against F.OPS."""
    if not _all_ascii(ops):  # the common case: nothing to fold or remove (format characters are not ASCII)
        ops = pc.replace_substring_regex(pc.utf8_normalize(ops, "NFKC"), r"\p{Cf}", "")
    ops = pc.utf8_lower(pc.utf8_trim_whitespace(ops))
    # a CSV's or JSON's quoting left in ('"upsert"', a JSON string dumped twice): a keyword in matching quotes
    if not pc.any(pc.match_substring_regex(ops, r"^[\"'`\x{201C}\x{2018}]")).as_py():
        return ops  # nothing quoted (the common case: no regex replace over every row)
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(ops, _QUOTED_OP, r"\1\2\3\4\5"))


# the pairs (RE2 has no backreferences): "...", '...', `...`, and typographic double and single quotes
_QUOTED_OP = (r"""^(?:"(.*)"|'(.*)'|`(.*)`|\x{201C}(.*)\x{201D}|\x{2018}(.*)\x{2019})$""")


def _all_ascii(texts: pa.ChunkedArray) -> bool:
    return pc.all(pc.string_is_ascii(texts)).as_py() is not False


def _warn_float_text_ids(column: pa.ChunkedArray, name: str, source: str) -> None:
    """Warn once per file when a text id column holds a float's text of an integer ("7.0") or a
    decimal's ("7.00", "7.0000000000"): a float id column (pandas' integers with a NaN) or a
    decimal one (Oracle NUMBER through Spark, decimal(38, 10)) turned to text, whose ids are not
    the integer ids ("7") the same users had before (a decimal column of them reads as "7")."""
    looks = pc.fill_null(pc.match_substring_regex(column, r"^-?[0-9]+\.0+$"), False)
    if pc.any(looks).as_py():
        row = pc.index(looks, True).as_py()
        logger.warning("fact log %s: %s %r (row %d) looks like a float's text of an integer (or a decimal's): a number "
                       "id column turned to text (pandas astype(str), a cast to string) reads as other ids than the "
                       "integers ('7.0' is not '7'); export the ids as integers or strings of the integers", source,
                       name, column[row].as_py(), row)


_UUID_TEXT = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"


def _warn_uuid_text_ids(column: pa.ChunkedArray, name: str, source: str) -> None:
    """Warn once per file when a text id column holds a UUID in another form than the lowercase
    hyphenated text a Parquet UUID column reads as (upper-case hex, or in braces as .NET and SQL
    Server write it): ids are compared as written, so the same user exported once as a UUID column
    and once as such text would be two users."""
    looks = pc.fill_null(pc.and_(pc.match_substring_regex(column, rf"^(\{{{_UUID_TEXT}\}}|{_UUID_TEXT})$"),
                                 pc.match_substring_regex(column, r"[A-F{]")), False)
    if pc.any(looks).as_py():
        row = pc.index(looks, True).as_py()
        logger.warning("fact log %s: %s %r (row %d) is a UUID in another form than lowercase hyphenated text: ids are "
                       "read as written, and a UUID-typed export of the same user (DuckDB, Postgres, Spark) reads as "
                       "lowercase, another user; export the ids in one form (lowercase, no braces)",
                       source, name, column[row].as_py(), row)


def _is_text_type(kind: pa.DataType) -> bool:
    kind = kind.value_type if pa.types.is_dictionary(kind) else kind
    return any(is_kind(kind) for is_kind in _BYTES_KINDS) and not _raw_uuid(kind)


def _warn_other_forms_of_ids(column: pa.ChunkedArray, name: str, source: str) -> None:
    """Warn once per file for each kind of text id that another export of the same id may write in
    another form, which is another id: an integer with leading zeros ("007": an integer-typed
    column writes 7), an id in double quotes ('"u1"': a CSV's or JSON's quoting left in) and
    compatibility characters (full-width digits and letters "７", ligatures,
    superscripts: NFKC reads "７" as "7"). Ids are read as written, never folded: folding would
    move ids already stored to another user, or merge two users."""
    padded = pc.fill_null(pc.match_substring_regex(column, r"^\s*0[0-9]+\s*$"), False)
    if pc.any(padded).as_py():
        row = pc.index(padded, True).as_py()
        logger.warning("fact log %s: %s %r (row %d) is an integer with leading zeros: ids are read as written, and an "
                       "export that types the ids as integers (which drops the zeros) reads as another id; export the "
                       "ids in one form", source, name, column[row].as_py(), row)
    quoted = pc.fill_null(pc.match_substring_regex(column, r'^\s*"[^"]*"\s*$'), False)
    if pc.any(quoted).as_py():
        row = pc.index(quoted, True).as_py()
        logger.warning("fact log %s: %s %r (row %d) is wrapped in double quotes (a CSV's or JSON's quoting left "
                       "in): ids are read as written, so it is not the id %r that other exports write; strip the quotes",
                       source, name, column[row].as_py(), row, column[row].as_py().strip()[1:-1])
    if _all_ascii(column):  # no compatibility character (nor mojibake) is ASCII
        return
    row, undone = _first_mojibake(column)
    if row is not None:
        logger.warning("fact log %s: %s %r (row %d) holds %s: ids are read as written, so it is not the id%s that "
                       "other exports write; decode the source as UTF-8", source, name, column[row].as_py(), row,
                       _ESCAPES[2][1], f" {undone!r}" if undone else "")
    spaced = pc.replace_substring_regex(column, r"\p{Zs}", " ")  # as the canonical form has them
    plain = pc.utf8_normalize(spaced, "NFKC")
    compatible = pc.fill_null(pc.not_equal(plain, pc.utf8_normalize(spaced, "NFC")), False)
    if pc.any(compatible).as_py():
        row = pc.index(compatible, True).as_py()
        logger.warning("fact log %s: %s %r (row %d) holds compatibility characters (full-width digits or letters, "
                       "ligatures, superscripts): ids are read as written, so it is not the id %r that other exports "
                       "may write; export the ids in one form", source, name, column[row].as_py(), row,
                       plain[row].as_py().strip())


# The zeros a missing time is written as: the Unix epoch (a null filled with 0, a nullable field's default, a
# Kafka record without a timestamp) and SQL Server's (and Sybase's) zero datetime, 1900-01-01.
_ZERO_TIMES = {0: "the Unix epoch", -2_208_988_800_000_000: "SQL Server's zero datetime"}  # us since 1970 of 1900-01-01


def _warn_zero_times(times: pa.ChunkedArray, ops: pa.ChunkedArray, source: str) -> None:
    """Warn once per file of rows whose event_time is a zero time exactly (:data:`_ZERO_TIMES`), naming
    their count, the first one and the first forget_user or delete among them: read as that instant, older
    than any real event, such a forget erased nothing the user wrote later (the night counted the user as
    forgotten) and such a delete removed nothing written later, and nothing said why. Read as before (a
    producer without times still gets its facts in)."""
    micros = times.cast(pa.int64())
    for value, what in _ZERO_TIMES.items():
        zero = pc.fill_null(pc.equal(micros, value), False)
        count = pc.sum(zero).as_py() or 0
        if not count:
            continue
        rows = pc.indices_nonzero(zero.combine_chunks())
        undoing = pc.is_in(pc.take(ops, rows), value_set=pa.array([F.OP_FORGET_USER, F.OP_DELETE]))
        undo = ""
        if pc.any(undoing).as_py():
            row = rows[pc.index(undoing, True).as_py()].as_py()
            undo = (f"; row {row} is a {ops[row].as_py()}, which at that time undoes nothing written after it (a forget "
                    "erases none of the user's later facts)")
        logger.warning("fact log %s: %s event_time %s (row %d first), %s exactly: a missing time filled with a "
                       "zero? %s read as that instant, older than every real event%s; write each event's own time",
                       source, f"{count} rows have" if count > 1 else "1 row has", _iso(value).replace("+00:00", "Z"),
                       rows[0].as_py(), what, "They are" if count > 1 else "It is", undo)


def _warn_ids_differing_in_case(column: pa.ChunkedArray, name: str, source: str) -> None:
    """Warn once per file when two of its ids differ only in case ('Ana.Silva@Example.com' and
    'ana.silva@example.com': one producer keeps what the user typed, another lowercases it), naming
    both and their rows: they are two users (or scopes), each served part of the facts. Ids are read
    as written, never folded (folding would move a stored user's facts to another user, or merge two)."""
    trimmed = pc.utf8_trim_whitespace(column)
    lowered = pc.utf8_lower(trimmed)
    # the common case in one vector pass: no id changes under lower-casing (lower-case emails and
    # UUIDs, numbers), so none can clash; the rest is vectorised too (a Python loop over the rows of
    # one clashing id took seconds on a 2M-row file)
    if not pc.any(pc.fill_null(pc.not_equal(trimmed, lowered), False)).as_py():
        return
    spelled = pa.table({"row": pa.array(range(len(trimmed)), pa.int64()), "id": trimmed, "key": lowered})
    spelled = spelled.filter(pc.is_valid(spelled["id"]))
    # each spelling's first row, then the keys held in two spellings or more
    firsts = spelled.group_by(["key", "id"], use_threads=False).aggregate([("row", "min")])
    clashes = firsts.group_by("key", use_threads=False).aggregate([("id", "count")])
    clashing = clashes.filter(pc.greater(clashes["id_count"], 1))["key"]
    if len(clashing) == 0:
        return
    firsts = firsts.filter(pc.is_in(firsts["key"], value_set=clashing)).sort_by([("row_min", "ascending")])
    # the first id (by row) that has another spelling, and that spelling's first row
    key = firsts["key"][0].as_py()
    pair = firsts.filter(pc.equal(firsts["key"], key)).slice(0, 2)
    (first, first_row), (other, other_row) = zip(pair["id"].to_pylist(), pair["row_min"].to_pylist())
    logger.warning("fact log %s: %s %r (row %d) and %r (row %d) differ only in case: ids are read as written, "
                   "so they are two %s, each served only its own facts; export the ids in one case", source,
                   name, first, first_row, other, other_row, "users" if name == "user_id" else "shared scopes")


# Text a producer escaped for HTML or JSON and did not unescape: "Tom &amp; Jerry", "caf\\u00e9".
# UTF-8 read as Windows-1252 or Latin-1 (mojibake: a CSV or a MySQL latin1 connection on the way): a lead
# byte of a 2-byte (C2-DF: "Ã") or 3-byte (E0-EF: "â") sequence followed by its continuation bytes
# 80-BF as those encodings show them ("é" as "Ã©", "’" as "â€™").
_CONTINUATION = ("[\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013\u2014"
                 "\u2018-\u201a\u201c-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]")
_ESCAPES = ((r"&(?:amp|lt|gt|quot|apos|nbsp|#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6});", "an HTML entity"),
            (r"\\u[0-9a-fA-F]{4}", "a JSON escape"),
            (f"[\u00c2-\u00c5\u00d0\u00d1]{_CONTINUATION}|\u00e2{_CONTINUATION}{{2}}",
             "UTF-8 read as Windows-1252 or Latin-1 (mojibake: \u00c3\u00a9 for \u00e9, \u00e2\u20ac\u2122 for \u2019)"))


def _warn_escaped_text(column: pa.ChunkedArray, name: str, source: str) -> None:
    """Warn once per file for each kind of escape found in trigger or answer text (an HTML entity
    such as ``&amp;``, a JSON ``\\u00e9`` as six characters): text is read as written, so the fact
    is compiled and recalled with the escape (a user typing "Tom & Jerry" does not recall "Tom
    &amp; Jerry"). Unescaping is the producer's to do: a text may hold such characters on purpose.
    Likewise UTF-8 text decoded as Windows-1252 or Latin-1 before the log ("Caf\u00c3\u00a9"): read as
    written, with the text it likely was; and a column whose every value (two or more) is wrapped in
    double quotes (a CSV's or JSON's quoting left in: one quoted answer may be meant, all are not)."""
    quoted = pc.match_substring_regex(column, r'(?s)^\s*".*"\s*$')
    if column.length() - column.null_count >= 2 and pc.all(quoted).as_py():
        row = pc.index(pc.fill_null(quoted, False), True).as_py()
        logger.warning("fact log %s: every %s of the file is wrapped in double quotes (%r, row %d: a CSV's or JSON's "
                       "quoting left in): text is read as written and recalled with the quotes; strip them before "
                       "writing the log", source, name, column[row].as_py()[:64], row)
    if not pc.any(pc.match_substring_regex(column, "&|\\\\u|[\u00c2-\u00ef]")).as_py():  # the common case: one pass
        return
    for pattern, what in _ESCAPES:
        if "mojibake" in what:
            row, undone = _first_mojibake(column)
            if row is None:
                continue
            text, fix = column[row].as_py(), f"decode the source as UTF-8 (it reads {undone[:64]!r})"
        else:
            found = pc.fill_null(pc.match_substring_regex(column, pattern), False)
            if not pc.any(found).as_py():
                continue
            row = pc.index(found, True).as_py()
            text, fix = column[row].as_py(), "unescape the text"
        logger.warning("fact log %s: %s %r (row %d) holds %s: text is read as written and recalled with it; "
                       "%s before writing the log", source, name, text[:64], row, what, fix)


def _first_mojibake(column: pa.ChunkedArray, tries: int = 50) -> tuple[int | None, str | None]:
    """The first row (of the first ``tries`` that look so) whose text is UTF-8 read as Windows-1252
    or Latin-1, and that text decoded back; (None, None) if none. Both must hold: the look alone
    ("Ã©", "â€™") also matches real text now and then ("té\u00a0»" of French typography)."""
    found = pc.fill_null(pc.match_substring_regex(column, _ESCAPES[2][0]), False)
    if not pc.any(found).as_py():
        return None, None
    for row in pc.indices_nonzero(found.combine_chunks()).to_pylist()[:tries]:
        text = column[row].as_py()
        undone = _undone(text)
        if undone is not None and undone != text:
            return row, undone
    return None, None


def _undone(text: str) -> str | None:
    """``text`` with UTF-8 read as Windows-1252 or Latin-1 undone, or None where it cannot be."""
    for encoding in ("cp1252", "latin-1"):
        try:
            return text.encode(encoding).decode("utf-8")
        except UnicodeError:
            continue
    return None


_DAY_MICROS = 86_400_000_000


def _whole_day_forgets_at_day_end(raw: pa.ChunkedArray, ops: pa.ChunkedArray, times: pa.ChunkedArray,
                                  source: str) -> pa.ChunkedArray:
    """``times`` (timestamp[us, UTC]) with each forget_user whose time is a whole day (a date column,
    a bare date as text, read as its midnight UTC) moved to the end of that day (23:59:59.999999):
    "forget me" dated 2026-12-01 (a request table's date beside an app's log with times of day) kept
    and served the user's facts written later that day. :func:`validate_rows` brings a day's end
    that is after its ``now`` back to ``now`` (a day not over yet), or to the day's midnight for a
    day ahead, so the result depends on the rules' ``now``, never on the wall clock here."""
    kind = raw.type.value_type if pa.types.is_dictionary(raw.type) else raw.type
    forgets = pc.fill_null(pc.equal(ops, F.OP_FORGET_USER), False)
    if not pc.any(forgets).as_py():
        return times
    if pa.types.is_date(kind):
        days = forgets
    elif any(is_kind(kind) for is_kind in _BYTES_KINDS):
        try:
            texts = raw.cast(pa.string())
        except pa.ArrowException:  # bytes that are not UTF-8: those rows are rejected anyway
            return times
        days = pc.and_(forgets, pc.fill_null(pc.match_substring_regex(texts, r"^\s*\d{4}-?\d\d-?\d\d\s*$"), False))
    else:
        return times
    if not pc.any(days).as_py():
        return times
    first = pc.index(days, True).as_py()
    logger.info("fact log %s: forget_user at a whole day (row %d: %s) read as that day's end", source, first,
                raw[first].as_py())
    micros = times.cast(pa.int64())
    return pc.if_else(days, pc.add(micros, _DAY_MICROS - 1), micros).cast(F.TIMESTAMP)


def _day_ends_not_past(ops: list, times: list, now: int) -> bool:
    """In place: each forget_user at a day's end (:func:`_whole_day_forgets_at_day_end`) later than
    ``now`` (µs) moved to ``now``, or to that day's midnight if ``now`` is before it (a day ahead, as
    the future-time check reads it). True if any moved."""
    moved = False
    for i, (op, t) in enumerate(zip(ops, times)):
        if op == F.OP_FORGET_USER and t is not None and t > now and t % _DAY_MICROS == _DAY_MICROS - 1:
            times[i], moved = max(t - _DAY_MICROS + 1, now), True
    return moved


def _warn_trigger_holding_its_answer(triggers: pa.ChunkedArray, answers: pa.ChunkedArray, source: str) -> None:
    """Warn once per file where a trigger ends with its own answer ("My dog is called Rex" + "Rex": the
    whole sentence logged as the trigger): the fact is recalled only after the whole sentence, and
    then says the answer again; the prompt a user types ("My dog is called") recalls nothing."""
    for row, (trigger, answer) in enumerate(zip(triggers.to_pylist(), answers.to_pylist())):
        trigger, answer = (trigger or "").rstrip(), (answer or "").strip()
        if len(answer) >= 2 and len(trigger) > len(answer) and trigger.endswith(answer) and (
                not trigger[-len(answer) - 1].isalnum() or not answer[0].isalnum()):
            logger.warning("fact log %s: trigger %r (row %d) ends with its answer %r: the trigger is the text before "
                           "the answer, so the fact is recalled only after the whole sentence (and says the answer "
                           "again); write the trigger without the answer", source, trigger[:64], row, answer[:64])
            return


# A missing value as pandas' astype(str) (before pandas 3), Python's str(), SQL and JavaScript write it, in their case
_MISSING_TEXT_SPELLINGS = ("nan", "NaN", "None", "<NA>", "NaT", "null", "NULL", "undefined", "\\N", "[NULL]", "<null>",
                           "#NULL!")


def _warn_missing_text_values(texts: pa.ChunkedArray, name: str, ops: pa.ChunkedArray, source: str) -> None:
    """Warn once per file and column where an upsert's trigger or answer is a missing value written
    as text (``'None'``, ``'nan'``, ``'<NA>'``: a DataFrame's ``astype(str)`` before the export, in
    pandas before 3): it is compiled and served as written ("My PIN is None"), where a null is
    ``EMPTY_TRIGGER`` / ``EMPTY_ANSWER``. A warning, not a reject: "None" and "Nan" can be real text."""
    upserts = pc.fill_null(pc.equal(_canonical_op(ops), F.OP_UPSERT), False)
    spelled = pc.fill_null(pc.is_in(pc.utf8_trim_whitespace(texts.cast(pa.string())),
                                    value_set=pa.array(_MISSING_TEXT_SPELLINGS)), False)
    hits = pc.and_(upserts, spelled)
    if not pc.any(hits).as_py():
        return
    row = pc.index(hits, True).as_py()
    logger.warning("fact log %s: %s %r (row %d; %d such upsert row(s)) looks like a missing value written as text "
                   "(pandas' astype(str) before pandas 3 writes None as 'None', NaN as 'nan', pd.NA as '<NA>'): it is "
                   "compiled and served as written; export missing values as null (such a row is then rejected as "
                   "EMPTY_%s), or ignore this if it is the real text", source, name, texts[row].as_py(), row,
                   pc.sum(hits).as_py(), name.upper())


def _warn_row_number_fact_ids(fact_ids: pa.ChunkedArray, source: str) -> None:
    """Warn once per file whose fact_ids are its row numbers (0, 1, 2, ... or 1, 2, 3, ...: a
    DataFrame's index exported as the id): another file's row 0 of the same user is the same fact_id,
    so each night's facts replaced the last night's (a later upsert wins per user and fact_id)."""
    n = len(fact_ids)
    if n < 3 or fact_ids.null_count or not pa.types.is_string(fact_ids.type):
        return
    for first in (0, 1):
        if pc.all(pc.equal(fact_ids, pa.array(range(first, first + n)).cast(pa.string()))).as_py():
            logger.warning("fact log %s: fact_id is the file's row number (%d, %d, %d, ...: a DataFrame's index?): "
                           "another file's row of the same user has the same fact_id and replaces this fact; write "
                           "an id that is stable per fact (e.g. a hash of the user and the trigger)", source, first,
                           first + 1, first + 2)
            return


def _warn_scope_of_own_facts(columns: dict, source: str) -> None:
    """Warn once per file when a shared scope's fact is written by several users with other answers:
    a scope's fact is one text served to every member (the latest copy wins for all), so a scope
    column holding the users' tenant or organisation for their own facts served each user another's
    answer. Read as written: copies of one fact at different times may be a scope's update."""
    scope = columns["scope"]
    if scope.null_count == len(scope):
        return
    rows = pa.table({"scope": scope, "user_id": columns["user_id"], "fact_id": columns["fact_id"],
                     "answer": pc.utf8_trim_whitespace(columns["answer"])})
    rejected = pa.array(sorted(_OWN_SCOPE_WORDS | _PLACEHOLDER_IDS | _MISSING_AS_TEXT
                               | (_MORE_MISSING_AS_TEXT - _SCOPE_WORDS_KEPT)))  # their upserts are refused
    shared = pc.and_(pc.not_equal(rows["scope"], rows["user_id"]),
                     pc.invert(pc.is_in(pc.utf8_lower(pc.utf8_trim_whitespace(rows["scope"])), rejected)))
    rows = rows.filter(pc.fill_null(pc.and_(pc.not_equal(rows["scope"], ""), shared), False))
    if rows.num_rows < 2:
        return
    copies = rows.group_by(["scope", "fact_id"]).aggregate([("user_id", "count_distinct"), ("answer", "count_distinct")])
    mixed = copies.filter(pc.and_(pc.greater(copies["user_id_count_distinct"], 1),
                                  pc.greater(copies["answer_count_distinct"], 1)))
    if mixed.num_rows:
        first = mixed.slice(0, 1).to_pylist()[0]
        logger.warning("fact log %s: scope %r's fact %r is written by %d users with %d different answers: a shared "
                       "scope's fact is one text served to every member (the latest copy, to all of them); if %r names "
                       "the users' tenant or organisation rather than facts they share, their own facts need scope "
                       "null, or each is served another's answer", source, first["scope"], first["fact_id"],
                       first["user_id_count_distinct"], first["answer_count_distinct"], first["scope"])


def _pairs(table: pa.Table) -> list[tuple[str, str] | None]:
    reasons = table.column("_problem_reason").to_pylist()
    details = table.column("_problem_detail").to_pylist()
    return [(r, d) if r else None for r, d in zip(reasons, details)]


def _note(problems: list, row: int, reason: str, detail: str) -> None:
    """Record a row's first problem (later ones for the same row are not reported)."""
    if problems[row] is None:
        problems[row] = (reason, detail)


# The reason an unreadable (not UTF-8) value gets, per column: ids keep their own codes.
_BAD_UTF8_REASON = {"user_id": F.BAD_USER_ID, "fact_id": F.BAD_FACT_ID, "scope": F.BAD_SCOPE,
                    "event_time": F.BAD_EVENT_TIME}
_BYTES_KINDS = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view, pa.types.is_binary,
                pa.types.is_large_binary, pa.types.is_binary_view, pa.types.is_fixed_size_binary)


_ID_COLUMNS = ("user_id", "fact_id", "scope")
_TEXT_COLUMNS = ("trigger", "answer")  # free text: numbers and booleans in them read as their canonical text


def _whole_float_ids(column: pa.ChunkedArray, name: str, problems: list) -> pa.ChunkedArray:
    """A float id column as pandas writes an integer column with a missing value (1.0, NaN,
    3.0): whole numbers read as their integer text, NaN as a missing id (its row is rejected,
    not the file). A value with a fraction (1.5) or an infinity is no id: it costs its row
    (BAD_USER_ID / BAD_FACT_ID / BAD_SCOPE naming the row and the fix). An id of
    magnitude 2^bits or more (float64 2^53), which the type cannot hold exactly, costs its row
    (BAD_USER_ID / BAD_FACT_ID / BAD_SCOPE naming the row and the fix), not the file."""
    bits = {16: 11, 32: 24}.get(column.type.bit_width, 53)  # float16/32/64 hold every integer below 2^bits
    values = pa.chunked_array([pc.if_else(pc.is_nan(chunk), None, chunk) for chunk in column.cast(pa.float64()).chunks],
                              pa.float64())
    infinite = pc.fill_null(pc.is_inf(values), False)
    fraction = pc.fill_null(pc.or_(infinite, pc.not_equal(pc.floor(values), values)), False)
    for row in pc.indices_nonzero(fraction.combine_chunks()).to_pylist():
        _note(problems, row, _BAD_UTF8_REASON[name],
              f"{name} {values[row].as_py()!r} (row {row}) in a {column.type} column is not a whole number: not an id; "
              "export ids as strings or integers")
    values = pc.if_else(fraction, pa.scalar(None, pa.float64()), values)
    # 2^bits itself is ambiguous: 2^bits + 1 rounds to it
    beyond = pc.fill_null(pc.greater_equal(pc.abs(values), float(2 ** bits)), False)
    for row in pc.indices_nonzero(beyond.combine_chunks()).to_pylist():
        _note(problems, row, _BAD_UTF8_REASON[name],
              f"{name} {_magnitude(values[row].as_py())} (row {row}) is a {column.type} id of magnitude 2^{bits} or more, "
              f"which a {column.type} cannot hold exactly (two ids may have become one); export ids as strings or "
              "integers (int64)")
    values = pc.if_else(beyond, pa.scalar(None, pa.float64()), values)
    return values.cast(pa.int64()).cast(pa.string())


def _magnitude(value: float) -> str:
    return f"{value:.0f}" if abs(value) < 1e21 else f"{value:.6g}"  # 1e300 is not 301 digits


_UUID_TYPE = getattr(pa, "UuidType", ())  # pyarrow >= 18


def _raw_uuid(kind: pa.DataType) -> bool:
    """Whether ``kind`` is how a UUID is stored: 16 fixed bytes (Parquet's UUID type is exactly this,
    and writers without that annotation, such as parquet-avro's ``fixed(16)`` UUIDs, Python's
    ``uuid.bytes`` in ``pa.binary(16)`` and older pyarrow, write the same bytes without it)."""
    return pa.types.is_fixed_size_binary(kind) and kind.byte_width == 16
# Parquet's UUID logical type read as arrow.uuid (the default where the option exists; asked for
# explicitly so that an id column of UUIDs is never read as raw 16-byte binary).
_EXTENSIONS = ({"arrow_extensions_enabled": True}
               if "arrow_extensions_enabled" in inspect.signature(pq.ParquetFile.__init__).parameters else {})


def _to_text(column: pa.ChunkedArray, name: str, problems: list) -> pa.ChunkedArray:
    """Any string-like column (string, large_string, string_view, binary, dictionary of these,
    integers; in trigger and answer also floats, booleans and decimals: :func:`_scalars_as_text`)
    -> string; a value that is not valid UTF-8 becomes null with a problem. In ids, trigger and
    answer a UUID (Parquet's UUID type, or 16 fixed bytes without it) reads as lowercase hyphenated
    text. Other types (nested, JSON, VARIANT, times) raise SchemaMismatch naming the column, its
    type and the fix.

    Writers that do not validate (and Parquet itself) can put any bytes in a string column, so
    every physical type is read as bytes and checked: a chunk at a time in Arrow, and value by
    value only in a chunk that fails the check.
    """
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_null(kind) or pa.types.is_integer(kind):
        return column.cast(pa.string())
    if isinstance(kind, _UUID_TYPE) and name in _ID_COLUMNS + _TEXT_COLUMNS:  # DuckDB, Postgres, Spark: Parquet UUID
        column, kind = pa.chunked_array([chunk.storage for chunk in column.chunks], kind.storage_type), kind.storage_type
    if _raw_uuid(kind) and name in _ID_COLUMNS + _TEXT_COLUMNS:  # also 16 bytes without the UUID annotation
        return pa.chunked_array([pa.array([None if b is None else str(uuid.UUID(bytes=b)) for b in chunk.to_pylist()],
                                          pa.string()) for chunk in column.chunks], pa.string())
    if pa.types.is_decimal(kind) and name in _ID_COLUMNS:  # Snowflake and Oracle NUMBER(p, 0) ids
        if kind.scale > 0:  # Oracle NUMBER through Spark's JDBC is decimal(38, 10), BigQuery NUMERIC (38, 9)
            digits = (pa.decimal128 if kind.precision <= 38 else pa.decimal256)(kind.precision, 0)
            whole = pc.cast(column, digits, safe=False)  # truncated
            fraction = pc.fill_null(pc.not_equal(pc.cast(whole, kind), column), False)
            for row in pc.indices_nonzero(fraction.combine_chunks()).to_pylist():
                _note(problems, row, _BAD_UTF8_REASON[name],
                      f"{name} {column[row].as_py()} (row {row}) in a {kind} column is not a whole number: not an id; "
                      "export ids as strings or integers")
            # whole values: the integer's digits, as NUMBER(p, 0) ("7.00" -> "7"); a fraction costs its row
            column = pc.if_else(fraction, pa.scalar(None, whole.type), whole)
        return column.cast(pa.string())
    if pa.types.is_floating(kind) and name in _ID_COLUMNS:
        return _whole_float_ids(column, name, problems)
    if name in _TEXT_COLUMNS and (pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_decimal(kind)):
        return _scalars_as_text(column, name, problems)
    if not any(is_kind(kind) for is_kind in _BYTES_KINDS):
        raise F.SchemaMismatch(_not_text(name, kind))
    chunks, offset = [], 0
    for chunk in column.cast(pa.large_binary()).chunks:
        text = chunk.view(pa.large_string())
        try:
            text.validate(full=True)  # checks UTF-8
        except pa.ArrowInvalid:
            text = _decode_each(chunk, name, offset, problems)
        chunks.append(text.cast(pa.string()))
        offset += len(chunk)
    return pa.chunked_array(chunks, pa.string())


_NESTED_KINDS = (pa.types.is_struct, pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list,
                 pa.types.is_list_view, pa.types.is_large_list_view, pa.types.is_map, pa.types.is_union)
_JSON_TYPE = getattr(pa, "JsonType", ())  # pyarrow >= 19: Parquet's JSON logical type (DuckDB's JSON columns)


def _is_variant(kind: pa.DataType) -> bool:
    """Whether ``kind`` is Parquet's VARIANT as this pyarrow reads it: an extension named so, or its
    storage, a struct of the binary ``metadata`` and ``value`` (and, shredded, ``typed_value``)."""
    if isinstance(kind, pa.BaseExtensionType):
        return "variant" in kind.extension_name.lower()
    if not pa.types.is_struct(kind):
        return False
    names = {kind.field(i).name for i in range(kind.num_fields)}
    return {"metadata", "value"} <= names <= {"metadata", "value", "typed_value"} and pa.types.is_binary(
        kind.field("metadata").type)


def _not_text(name: str, kind: pa.DataType) -> str:
    """Why a column of ``kind`` cannot be read as the text column ``name``, naming the fix."""
    fix = (f"export {name} as a string column holding the exact text to recall" if name in _TEXT_COLUMNS
           else f"export {name} as a string")
    if isinstance(kind, _JSON_TYPE):
        return (f"column {name!r} is JSON ({kind}): JSON documents, not text; {fix} (DuckDB: {name}->>'$' gives "
                "a JSON string's text without its quotes)")
    if _is_variant(kind):
        return (f"column {name!r} is a Parquet VARIANT (read as {kind}): semi-structured values (DuckDB's and Spark's "
                f"VARIANT), not text; {fix} (DuckDB: {name}::VARCHAR)")
    if any(is_kind(kind) for is_kind in _NESTED_KINDS):
        return f"column {name!r} is {kind}: a nested type (struct, list, map, union), not text; {fix}"
    if pa.types.is_temporal(kind):
        return f"column {name!r} is {kind}, a time type, not text; {fix}, written as it should read"
    return f"column {name!r} is {kind}, expected a string; {fix}"


def _scalars_as_text(column: pa.ChunkedArray, name: str = "answer", problems: list | None = None) -> pa.ChunkedArray:
    """A float, boolean or decimal trigger/answer column (a table export's number or flag) as its
    canonical text: integers without ".0" (42.0 -> "42"), other floats in their shortest
    round-trip form at the column's width (0.1 -> "0.1", 6.02e23 -> "6.02e+23"; inf -> "inf"),
    booleans as "true"/"false", decimals with their places up to two ("12.50"), of a larger scale in
    their shortest form ("2", not decimal(38, 10)'s "2.0000000000"). NaN and null are a missing
    value (an upsert's row is then rejected as empty, as for a null string)."""
    kind = column.type
    if pa.types.is_boolean(kind):
        return column.cast(pa.string())
    if pa.types.is_decimal(kind):
        return pa.chunked_array([pa.array([None if v is None else _decimal_text(v, kind.scale) for v in chunk.to_pylist()],
                                          pa.string()) for chunk in column.chunks], pa.string())
    bits = {16: 11, 32: 24}.get(kind.bit_width, 53)  # every integer below 2^bits is exact in this float type
    texts, row = [], 0
    for chunk in column.chunks:
        for value in chunk.to_pylist():
            if value is not None and value == value and float(value).is_integer() and 2 ** bits <= abs(value) < 1e21:
                # printed as an integer, it would show digits the writer never sent (a float32 5551234567 is
                # 5551234560): the row is refused, not the value published
                if problems is not None:
                    _note(problems, row, F.INEXACT_NUMBER,
                          f"{name} {int(value)} (row {row}) is a {kind} whole number of magnitude 2^{bits} or more, which "
                          f"a {kind} holds only approximately: the digits written may not be these; write the {name} "
                          "column as int64 or string")
                value = None
            texts.append(None if value is None else _float_text(value, kind))
            row += 1
    return pa.chunked_array([pa.array(texts, pa.string())], pa.string())


# Places a decimal column is shown with: money's cents (NUMBER(10, 2): 12.50, 7.00). A larger scale is a
# type's padding, not what was written: Spark reads Oracle NUMBER as decimal(38, 10) and Python Decimals
# as (38, 18), BigQuery's NUMERIC is (38, 9), DuckDB's DECIMAL (18, 3); an answer 2 read "2.0000000000".
_DISPLAY_SCALE = 2


def _decimal_text(value: Decimal, scale: int) -> str:
    """A decimal trigger/answer as its text: with its places up to :data:`_DISPLAY_SCALE` places
    (``12.50``), else in its shortest exact form (``12.5``, ``2``; never an exponent)."""
    if scale <= 0:
        return str(int(value))
    text = f"{value:f}"  # exact: no context precision, no rounding
    if scale <= _DISPLAY_SCALE:
        return text
    text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _float_text(value, kind: pa.DataType) -> str | None:
    """A whole float as its integer ("42", "-0" as "0"); another as Python's repr, shortest at the
    column's width (a float32 0.1 is "0.1", not 0.10000000149011612); NaN is None (a missing value)."""
    import numpy as np

    if value != value:  # NaN
        return None
    if float(value).is_integer() and abs(value) < 1e21:  # a whole number is exactly the integer it holds
        return str(int(value))  # (float16 65504 is "65504", not the shortest "65500")
    if kind.bit_width < 64:  # the shortest digits that give back this float16/float32
        value = float(str({16: np.float16, 32: np.float32}[kind.bit_width](value)))
    return repr(float(value))  # not whole (or past 1e21): no ".0" to drop


def _decode_each(chunk: pa.Array, name: str, offset: int, problems: list) -> pa.Array:
    values = []
    for i, raw in enumerate(chunk.to_pylist()):
        try:
            values.append(None if raw is None else raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            values.append(None)
            _note(problems, offset + i, _BAD_UTF8_REASON.get(name, F.INVALID_UTF8),
                  f"{name} is not valid UTF-8 ({err.reason} at byte {err.start} of {raw[:48]!r})")
    return pa.array(values, pa.large_string())


# Microseconds per tick of each time unit a writer may use (exact, so range bounds are exact).
_MICROS_PER_TICK = {"s": Fraction(10**6), "ms": Fraction(10**3), "us": Fraction(1), "ns": Fraction(1, 1000),
                    "day": Fraction(86_400 * 10**6)}


def _to_timestamp(column: pa.ChunkedArray, problems: list, source: str = TABLE_SOURCE) -> pa.ChunkedArray:
    """event_time of any time type (timestamp of any unit and zone, INT96, date) or ISO-8601
    text -> microseconds UTC. Finer units are truncated (floored) to the microsecond; a value
    outside F.MIN_EVENT_TIME..F.MAX_EVENT_TIME or text that is not ISO-8601 becomes null with a
    per-row problem. Numbers are refused for the whole column (seconds or milliseconds?), and so
    are times of day, durations and intervals (no moment): SchemaMismatch naming the type and the fix."""
    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_null(kind):
        return column.cast(F.TIMESTAMP)
    if pa.types.is_timestamp(kind):
        if kind.tz is None:
            logger.warning("fact log %s: event_time has no time zone; reading it as UTC (write a UTC timestamp "
                           "to silence this)", source)
        ticks, unit = column.cast(pa.int64()), kind.unit
    elif pa.types.is_date32(kind):
        ticks, unit = column.cast(pa.int32()).cast(pa.int64()), "day"
    elif pa.types.is_date64(kind):
        ticks, unit = column.cast(pa.int64()), "ms"
    elif any(is_kind(kind) for is_kind in _BYTES_KINDS):
        texts = _to_text(column, "event_time", problems)
        ticks, unit = pa.chunked_array([_parse_times(texts, problems, source)]), "us"
        return _ticks_to_micros(ticks, unit, problems, texts).cast(F.TIMESTAMP)
    else:
        raise F.SchemaMismatch(_not_a_moment(kind))
    return _ticks_to_micros(ticks, unit, problems).cast(F.TIMESTAMP)


_TIME_FIX = ("write a timestamp with a time zone (Arrow timestamp[us, tz=UTC], DuckDB TIMESTAMPTZ, pandas "
             "datetime64[ns, UTC]) or ISO-8601 text such as 2026-11-20T08:00:00Z")


def _not_a_moment(kind: pa.DataType) -> str:
    """Why an event_time column of ``kind`` (not a timestamp, date or text) is refused, and the fix."""
    if pa.types.is_time(kind):
        why = "a time of day with no date"
    elif pa.types.is_duration(kind) or pa.types.is_interval(kind):
        why = "a length of time, not a moment"
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        why = "a number, which is ambiguous (seconds or milliseconds since 1970?)"
    else:
        why = "not a time"
    return f"column 'event_time' is {kind}: {why}; {_TIME_FIX}"


def _ticks_to_micros(ticks: pa.ChunkedArray, unit: str, problems: list,
                     texts: pa.ChunkedArray | None = None) -> pa.ChunkedArray:
    """Scale int64 ``ticks`` of ``unit`` since the epoch to microseconds, in Arrow.

    The range check comes first, in the column's own unit, so that scaling never overflows. A
    time read from text (``texts``) out of range is quoted as written (Go's zero time
    "0001-01-01 00:00:00 +0000 UTC"), not as a count of ticks.
    """
    per_tick = _MICROS_PER_TICK[unit]
    lowest = max(math.ceil(F.MIN_EVENT_MICROS / per_tick), -(2**63))
    highest = min(math.floor(F.MAX_EVENT_MICROS / per_tick), 2**63 - 1)
    in_range = pc.and_(pc.greater_equal(ticks, lowest), pc.less_equal(ticks, highest))
    # DuckDB's 'infinity' and '-infinity' (PostgreSQL's, exported through it) in Parquet: the type's largest
    # value and its negation (a timestamp's int64, a date's int32), or its smallest; out of range in every unit
    # (a nanosecond one's largest is still a year in range, 2262)
    bound = 2**31 if unit == "day" else 2**63
    infinite = {bound - 1, 1 - bound, -bound} if texts is None else set()
    if infinite:
        in_range = pc.and_(in_range, pc.invert(pc.is_in(ticks, value_set=pa.array(sorted(infinite), pa.int64()))))
    outside = pc.fill_null(pc.invert(in_range), False)
    for row in pc.indices_nonzero(outside.combine_chunks()).to_pylist():
        tick = ticks[row].as_py()
        shown = (f"{texts[row].as_py()[:64]!r}" if texts is not None
                 else f"{tick} {unit}{'s' if unit == 'day' else ''} since 1970-01-01")
        why = (f"DuckDB's and PostgreSQL's {'-' if tick < 0 else ''}infinity {'date' if unit == 'day' else 'timestamp'}, "
               "a placeholder, not a moment; give the row its real time" if tick in infinite
               else "a wrapped, mis-scaled or placeholder time")
        _note(problems, row, F.EVENT_TIME_OUT_OF_RANGE,
              f"event_time {shown} is outside {F.MIN_EVENT_TIME:%Y-%m-%d}..{F.MAX_EVENT_TIME:%Y-%m-%d} ({why})")
    kept = pc.if_else(in_range, ticks, pa.scalar(None, pa.int64()))
    if per_tick < 1:  # nanoseconds: floor, not Arrow's truncation toward zero (stay in 1969 before the epoch)
        return pc.divide(pc.subtract(kept, pc.if_else(pc.less(kept, 0), per_tick.denominator - 1, 0)),
                         per_tick.denominator)
    return pc.multiply(kept, int(per_tick))


_FRACTION = re.compile(r"\.(\d+)")
_UTC_SUFFIX = re.compile(r"\s*(?:Z|UTC|GMT)$", re.IGNORECASE)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_END_OF_DAY = re.compile(r"[T ]24:00(?::00(?:\.0+)?)?(?=$|[+-]\d)")
_LEAP_SECOND = re.compile(r"(?<=[T ])(\d\d:\d\d):60(?:\.\d+)?(?=$|[+-]\d)")


# RFC 9557 suffixes: a time zone name and other annotations in brackets after the offset, as Java's
# ZonedDateTime.toString() and JavaScript's Temporal write them ("2026-11-20T09:00+01:00[Europe/Paris]").
_ANNOTATIONS = re.compile(r"(?:\[[^\[\]]*\])+$")
_OFFSET = re.compile(r"(?::\d\d|T\d{2,6})(?:[.,]\d+)?\s*(?:Z|[+-]\d\d(?::?\d\d)?)$", re.IGNORECASE)  # after a time


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY, _MONTH = r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun)", r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)"
# Go's time.Time.String() (fmt.Println, %v of a time): the numeric offset, then the zone's abbreviation
# (or the offset again, "+03", for a zone without one) and, for a time read from the clock, the
# monotonic reading: "2026-11-30 14:03:07.123456789 +0000 UTC", "2026-11-30 07:03:07.5 -0700 MST m=+0.0012".
_GO_TIME = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) ([+-]\d\d)(\d\d) (?:[A-Za-z]{1,5}|[+-]\d\d(?:\d\d)?)"
                      r"(?: m=[+-]\d+(?:\.\d+)?)?")
# RFC 2822 (email, Python's email.utils.format_datetime) and the HTTP date of RFC 9110 (JavaScript's
# Date.toUTCString(), Java's DateTimeFormatter.RFC_1123_DATE_TIME): "Mon, 30 Nov 2026 14:03:07 GMT",
# "30 Nov 2026 14:03:07 +0100", "... +0000 (UTC)" (a mail header's comment, not read).
_RFC_2822 = re.compile(_DAY.join(["(?:", ", )?"]) + r"(\d{1,2}) " + _MONTH + r" (\d{4}) (\d\d:\d\d(?::\d\d)?) "
                       r"(GMT|UTC|UT|Z|[+-]\d{4})(?: \([^()]*\))?", re.IGNORECASE)
# JavaScript's Date.prototype.toString(): "Mon Nov 30 2026 14:03:07 GMT+0100 (Central European Standard Time)"
# (the offset is the instant's; the name in parentheses is for people, and in the runtime's language).
_JS_DATE = re.compile(_DAY + " " + _MONTH + r" (\d\d) (\d{4}) (\d\d:\d\d:\d\d) GMT([+-]\d{4})(?: \([^()]*\))?",
                      re.IGNORECASE)
# Java's java.util.Date.toString() in UTC (a server's default zone) or a zone of a fixed offset:
# "Mon Nov 30 14:03:07 UTC 2026", "Mon Nov 30 14:03:07 GMT+01:00 2026".
_JAVA_DATE = re.compile(_DAY + " " + _MONTH + r" (\d\d) (\d\d:\d\d:\d\d) (UTC|GMT(?:[+-]\d\d:\d\d)?) (\d{4})",
                        re.IGNORECASE)
# A time followed by a zone's abbreviation and no offset (Java's Date.toString() "... CET 2026",
# "2026-11-30 14:03:07 EST"): CST is three zones, IST three, and the abbreviation does not say
# which side of a daylight-saving change the time is on.
_ZONE_NAME_ONLY = re.compile(r"\d\d:\d\d(?::\d\d(?:\.\d+)?)? \(?(?!(?:AM|PM)\b)[A-Za-z]{2,5}\)?(?: \d{4})?$",
                             re.IGNORECASE)
# The forms event_time text is read in, for the messages of the rows that are none of them.
TIME_FORMS = ("ISO 8601 / RFC 3339 text such as 2026-11-20T08:00:00Z or 2026-11-20 09:00:00+01:00 (also week "
              "dates 2026-W47-5, ordinal dates 2026-324, UTC+1 / GMT+01:00 offsets, a comma before the fraction), "
              "RFC 2822 (Fri, 20 Nov 2026 08:00:00 GMT), or a timestamp column")
# A date of day and month as numbers (01/02/2026, 11/20/2026, 02.12.2026, 1-2-26): refused, as the order of
# the two cannot be told in general (_day_month_problem says what each such date is).
_DAY_MONTH = re.compile(r"\d{1,2}[/.-]\d{1,2}[/.-]\d{2,4}(?!\d)")
# An offset after a zone's name (UTC+1, GMT+01:00, UTC -0500; Java's ZoneId, people): the offset is
# the instant's in ISO's sense (east of UTC is +), never POSIX's inverted Etc/GMT+1.
_NAMED_OFFSET = re.compile(r"(?<=\d)\s*(?:UTC|GMT)\s*([+-])(\d{1,2})(?::?(\d\d))?$", re.IGNORECASE)
# ISO 8601's ordinal date (year and day of the year: 2026-336, 2026336T10:00:00Z), which Python's
# fromisoformat does not read; a bare 7-digit number stays a number (refused: it may be one).
_ORDINAL = re.compile(r"(\d{4})(?:-(\d{3})(?=$|[T ])|(\d{3})(?=T))")
_DATE_ONLY = re.compile(r"\d{4}-?\d\d-?\d\d|\d{4}-?W\d\d(?:-?\d)?")  # a day, read as its midnight UTC
_NUMBER = re.compile(r"[+-]?\d+(?:[.,]\d+)?(?:[eE][+-]?\d+)?")


# RFC 3339 as most writers give it (a 'T' or a space, up to six digits of a second, Z or an offset;
# or no zone, as Python's str(datetime) and pandas write a naive time: read as UTC, with the warning):
# read by Arrow's parser for the whole column at once (~0.1 us a row; Python's, below, ~6 us). Anything
# else (other ISO 8601 forms, RFC 2822, a BOM, an hour 24, a leap second) goes through
# _parse_time_micros row by row; so do the rows of a form whose Arrow cast refuses one text (2026-02-30).
_RFC_3339_TIME = r"^\d{4}-\d\d-\d\d[T ](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?"
_RFC_3339 = _RFC_3339_TIME + r"(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)$"
_RFC_3339_NAIVE = _RFC_3339_TIME + "$"


def _cast_matching(texts: pa.Array, pattern: str, kind: pa.DataType) -> tuple[pa.Array, pa.Array | None]:
    """(mask of the texts matching ``pattern``, their int64 ticks cast as ``kind``, null elsewhere;
    None where no text matches or Arrow refuses one of them)."""
    mask = pc.fill_null(pc.match_substring_regex(texts, pattern), False)
    if not pc.any(mask).as_py():
        return mask, None
    try:
        return mask, pc.cast(pc.if_else(mask, texts, pa.scalar(None, texts.type)), kind).cast(pa.int64())
    except pa.ArrowInvalid:  # a text of the form that is no date (2026-02-30): these rows by Python's parser
        return mask, None


def _parse_times(texts: pa.ChunkedArray, problems: list, source: str = TABLE_SOURCE) -> pa.Array:
    """Microseconds UTC (int64) per event_time text (null with a BAD_EVENT_TIME problem where it is
    not a time); one warning per file when a time (not a bare date) has no zone and is read as UTC,
    as for a timestamp column without one (Python's str(datetime.now()), Java's LocalDateTime: local
    time?). RFC 3339 text is read by Arrow for the whole column (:data:`_RFC_3339`), the rest row by
    row (:func:`_parse_time_micros`): both give the same microseconds."""
    texts = texts.combine_chunks() if isinstance(texts, pa.ChunkedArray) else texts
    zoned, zoned_ticks = _cast_matching(texts, _RFC_3339, pa.timestamp("us", tz="UTC"))
    naive, naive_ticks = _cast_matching(texts, _RFC_3339_NAIVE, pa.timestamp("us"))
    first_naive = None
    if naive_ticks is not None:
        first_naive = pc.index(naive, True).as_py()
    quick = [t for t in (zoned_ticks, naive_ticks) if t is not None]
    quick = pc.coalesce(*quick) if len(quick) > 1 else quick[0] if quick else None
    micros, zoneless = [], []
    if quick is not None and quick.null_count == texts.null_count:  # every text read (nulls: missing times)
        micros = quick
    else:
        read = quick.to_pylist() if quick is not None else None
        for row, text in enumerate(texts.to_pylist()):
            if read is not None and read[row] is not None:
                micros.append(read[row])
                continue
            micros.append(None if text is None else _parse_time_micros(text, zoneless))
            if zoneless and zoneless[0] is True:
                zoneless[0] = (row, text)
            if text is not None and micros[-1] is None:
                if missing := _time_missing_as_text(canonical_id(text)):
                    _note(problems, row, F.MISSING_EVENT_TIME, f"event_time {text[:64]!r} {missing}")
                else:
                    _note(problems, row, F.BAD_EVENT_TIME,
                          f"event_time {text[:64]!r} {_not_a_time(canonical_id(text))}")
        micros = pa.array(micros, pa.int64())
    if first_naive is not None and (not zoneless or first_naive < zoneless[0][0]):
        zoneless = [(first_naive, texts[first_naive].as_py())]
    if zoneless:
        logger.warning("fact log %s: event_time %r (row %d) has no time zone; reading it as UTC (write the offset or "
                       "Z, e.g. 2026-11-20T08:00:00Z, to silence this)", source, zoneless[0][1][:64], zoneless[0][0])
    return micros


# MySQL's zero date and datetime (what a NOT NULL column holds for "no time"), as text
_ZERO_DATES = frozenset({"0000-00-00", "0000-00-00 00:00:00", "0000-00-00t00:00:00"})


def _time_missing_as_text(text: str) -> str | None:
    """Why an event_time text (canonical) is a missing time rather than a time in another format
    (empty or blank text, pandas' ``'NaT'`` from ``astype(str)``, ``'None'``, ``'null'``, MySQL's
    zero date), or None. Such a row is ``MISSING_EVENT_TIME``, as a null is: it was
    ``BAD_EVENT_TIME`` "not an ISO-8601 timestamp", counted apart from the missing times it is."""
    word = text.strip().casefold()
    if not word:
        return "is empty text, a missing time; export missing times as null, or give the row its time"
    if word in _MISSING_AS_TEXT or word in _MORE_MISSING_AS_TEXT or word in _ZERO_DATES or word.startswith("0000-00-00 00:00:00."):
        return ("is a missing time written as text (pandas' astype(str) writes NaT as 'NaT', None as 'None'; SQL "
                "'null'; MySQL's and PostgreSQL's text NULL '\\N'; MySQL's zero date 0000-00-00), not a time; export "
                "missing times as null, or give the row its time")
    return None


def _not_a_time(text: str) -> str:
    """Why ``text`` (canonical, as :func:`_parse_time_micros` read it) is not read as a time."""
    if _NUMBER.fullmatch(text):
        return ("is a bare number, which is ambiguous (seconds or milliseconds since 1970? a spreadsheet's day "
                "number?): write ISO-8601 text such as 2026-11-20T08:00:00Z or a timestamp column")
    if (annotated := _ANNOTATIONS.search(text)) and not _OFFSET.search(text[:annotated.start()]):
        return ("is not an ISO-8601 timestamp (a zone name in brackets needs the UTC offset before it, as Java's "
                "ZonedDateTime writes it: 2026-11-20T09:00:00+01:00[Europe/Paris]; write e.g. 2026-11-20T08:00:00Z)")
    if _weekday(text) is None:
        return ("names a weekday that is not its date's (which of the two is wrong?); write ISO-8601 text such as "
                "2026-11-20T08:00:00Z")
    if _ZONE_NAME_ONLY.search(text) and not _UTC_SUFFIX.search(text):
        return ("names its zone by an abbreviation without a UTC offset, which is ambiguous (CST and IST are three "
                "zones each; an abbreviation does not tell a daylight-saving change's repeated hour): write the "
                "offset (2026-11-20T09:00:00+01:00) or UTC (2026-11-20T08:00:00Z)")
    if match := _DAY_MONTH.match(text):
        return _day_month_problem(match.group(0))
    return f"is not an ISO-8601 timestamp; write {TIME_FORMS}"


def _day_month_problem(date: str) -> str:
    """Why a date written as two numbers of day and month and a year (``11/20/2026``, ``20.11.2026``,
    ``1-2-26``) is refused, true of this date: such dates are refused whatever their numbers, because
    the order of day and month cannot be told in general (``01/02/2026``) and the log's other rows
    may be read the wrong way; the message says what this one is, in ISO 8601 where it is one date."""
    first, second, year = re.split(r"[/.-]", date)
    why = ("dates written with day and month as numbers are refused, because their order cannot be told in general "
           "(01/02/2026: 1 February or January 2?)")
    if len(year) != 4:
        return (f"writes its year with {len(year)} digits ({date!r}: which century?), and {why}; write ISO 8601 with "
                f"the four-digit year, e.g. 2026-11-20T08:00:00Z ({TIME_FORMS})")
    readings = []
    for day, month in ((int(first), int(second)), (int(second), int(first))):
        try:
            readings.append(f"{datetime(int(year), month, day):%Y-%m-%d}")
        except ValueError:
            continue
    readings = list(dict.fromkeys(readings))
    example = "with its time after a 'T' and its UTC offset, e.g. 2026-11-20T08:00:00Z"
    if not readings:
        return f"is no date in either order of day and month ({date!r}); write ISO 8601 {example} ({TIME_FORMS})"
    if len(readings) == 2:
        return (f"is {date!r}, {readings[0]} or {readings[1]}: {why}; write ISO 8601, {readings[0]} or {readings[1]} "
                f"as meant, {example} ({TIME_FORMS})")
    return (f"is {date!r}, which can only be {readings[0]}, but {why}, so the log's other dates would not be read "
            f"safely either; write ISO 8601 ({readings[0]}) {example} ({TIME_FORMS})")


def _weekday(text: str) -> bool | None:
    """For RFC 2822 / JavaScript / Java date text that names a weekday: whether it is the date's
    (None: it is not); True for any other text."""
    for pattern, day, month, date, year in ((_RFC_2822, 1, 3, 2, 4), (_JS_DATE, 1, 2, 3, 4), (_JAVA_DATE, 1, 2, 3, 6)):
        if (match := pattern.fullmatch(text)) and match.group(day):
            try:
                moment = datetime(int(match.group(year)), _MONTHS.index(match.group(month).lower()) + 1,
                                  int(match.group(date)))
            except ValueError:
                return True  # not a date at all: refused as such
            return True if _WEEKDAYS[moment.weekday()] == match.group(day).lower() else None
    return True


def _as_iso(text: str) -> str:
    """Go's, RFC 2822's, JavaScript's and Java's time text as ISO-8601 with its offset (the same
    text if it is none of these). The offset gives the instant; zone names and abbreviations are
    not read (Go's "MST", JavaScript's "(Central European Standard Time)"). ISO 8601's minus sign
    U+2212 (as some locales format a negative offset, "−05:00") is read as a hyphen-minus."""
    text = text.replace("\u2212", "-")
    if match := _GO_TIME.fullmatch(text):
        return f"{match.group(1)}{match.group(2)}:{match.group(3)}"
    if _weekday(text) is None:
        return text  # a weekday that is not the date's: refused
    month = lambda name: _MONTHS.index(name.lower()) + 1  # noqa: E731
    if match := _RFC_2822.fullmatch(text):
        zone = match.group(6)
        zone = "+00:00" if zone.upper() in ("GMT", "UTC", "UT", "Z") else f"{zone[:3]}:{zone[3:]}"
        return f"{match.group(4)}-{month(match.group(3)):02d}-{int(match.group(2)):02d}T{match.group(5)}{zone}"
    if match := _JS_DATE.fullmatch(text):
        zone = match.group(6)
        return f"{match.group(4)}-{month(match.group(2)):02d}-{match.group(3)}T{match.group(5)}{zone[:3]}:{zone[3:]}"
    if match := _JAVA_DATE.fullmatch(text):
        zone = match.group(5)[3:] or "+00:00"
        return f"{match.group(6)}-{month(match.group(2)):02d}-{match.group(3)}T{match.group(4)}{zone}"
    return text


def _parse_time_micros(text: str, zoneless: list | None = None) -> int | None:
    """Microseconds since the epoch of an ISO-8601 time ('Z', '+hh:mm' or ' UTC'; no zone: UTC;
    digits beyond the microsecond dropped), or None. Bare numbers are refused (s or ms?). RFC 9557
    annotations after an offset (``+01:00[Europe/Paris]``, ``Z[UTC]``) are dropped: the offset
    gives the instant; a zone name without an offset is refused (None): the offset is not known
    in a daylight-saving change's repeated hour. Also read, by their numeric offset: Go's
    ``time.Time.String()`` (``2026-11-30 14:03:07.123456789 +0000 UTC m=+0.0012``), RFC 2822 and
    HTTP dates (``Mon, 30 Nov 2026 14:03:07 GMT``), JavaScript's ``Date.toString()`` (``Mon Nov
    30 2026 14:03:07 GMT+0100 (Central European Standard Time)``) and Java's ``Date.toString()``
    in UTC (a weekday that is not the date's: None). Invisible format characters (a byte-order
    mark, a zero-width space) and surrounding spaces are dropped first, as in ids. A time (not a
    bare date) read without a zone appends True to ``zoneless``, once. Full-width digits and signs
    (a Japanese input method's ``２０２６－１１－３０``) read as theirs (NFKC)."""
    cleaned = canonical_id(text)
    if not cleaned.isascii():
        cleaned = unicodedata.normalize("NFKC", cleaned)
    micros = _iso_micros(cleaned, zoneless)
    if micros is None and (written := _as_iso(cleaned)) != cleaned:
        micros = _iso_micros(written, zoneless)
    return micros


# 400 Gregorian years, in microseconds: the calendar (weekdays and leap years included) repeats after them.
_GREGORIAN_CYCLE_MICROS = 146_097 * 86_400 * 1_000_000
_YEAR_ZERO = re.compile(r"0000(?=[-W\d])")


def _iso_micros(cleaned: str, zoneless: list | None = None) -> int | None:
    # Year 0000 (a placeholder, or 1 BC) is a time in Arrow's proleptic Gregorian calendar, which reads
    # RFC 3339 text for the whole column, but not in Python's: read as year 400, one calendar cycle later,
    # so that both give the same microseconds and the row is EVENT_TIME_OUT_OF_RANGE whichever read it.
    shift = 0
    if _YEAR_ZERO.match(cleaned):
        cleaned, shift = "0400" + cleaned[4:], _GREGORIAN_CYCLE_MICROS
    if annotated := _ANNOTATIONS.search(cleaned):
        cleaned = cleaned[:annotated.start()]
        if not _OFFSET.search(cleaned):
            return None
    cleaned = _NAMED_OFFSET.sub(lambda m: f"{m.group(1)}{int(m.group(2)):02d}:{m.group(3) or '00'}", cleaned)
    if ordinal := _ORDINAL.match(cleaned):
        day = int(ordinal.group(2) or ordinal.group(3))
        try:
            date = datetime(int(ordinal.group(1)), 1, 1) + timedelta(days=day - 1)
        except (ValueError, OverflowError):
            return None
        if not 1 <= day <= 365 + calendar.isleap(int(ordinal.group(1))):
            return None
        cleaned = f"{date:%Y-%m-%d}" + cleaned[ordinal.end():]
    cleaned = _UTC_SUFFIX.sub("+00:00", cleaned)
    cleaned = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], cleaned, count=1)
    if cleaned.lstrip("+-").isdigit():
        return None
    # ISO 8601's end of a day (24:00, 24:00:00, 24:00:00.000) is the next day's midnight, and RFC
    # 3339's leap second (23:59:60) reads as the last microsecond before the next minute: both are
    # valid times that Python's parser refuses (each cost its row as BAD_EVENT_TIME).
    after = timedelta(0)
    if end_of_day := _END_OF_DAY.search(cleaned):
        cleaned, after = cleaned[:end_of_day.start()] + "T00:00:00" + cleaned[end_of_day.end():], timedelta(days=1)
    elif leap := _LEAP_SECOND.search(cleaned):
        cleaned = cleaned[:leap.start()] + leap.group(1) + ":59.999999" + cleaned[leap.end():]
    try:
        moment = datetime.fromisoformat(cleaned) + after
    except (ValueError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
        if zoneless is not None and not zoneless and not _DATE_ONLY.fullmatch(cleaned):
            zoneless.append(True)
    return (moment - _EPOCH) // timedelta(microseconds=1) - shift


# --- Validating -----------------------------------------------------------------------------


_CANONICAL_COLUMNS = ("user_id", "fact_id", "trigger", "answer", "scope")


def validate_rows(rows: pa.Table, rules: RowRules, *, count_tokens: Callable[[list[str]], list[int]] | None = None,
                  count_answer_tokens: Callable[[list[str]], list[int]] | None = None) -> pa.Table:
    """Put every row in canonical form (:func:`canonical_row`) and check it on its own (ids, op,
    event time, trigger and answer text, trigger and answer tokens); returns ``rows`` in canonical
    form with the first problem of each invalid row in ``_problem_reason`` / ``_problem_detail``
    (a problem already there, from normalising, is kept).

    ``count_tokens`` / ``count_answer_tokens`` override the rules' tokenizer (tests use a
    stand-in). Raises ValueError if a token counter returns counts that do not match.
    """
    count_tokens = count_tokens or rules.count_tokens()
    if rules.max_answer_tokens is not None:
        count_answer_tokens = count_answer_tokens or rules.count_answer_tokens()
    now = rules.now or datetime.now(timezone.utc)
    now = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now
    cols = {name: rows.column(name).to_pylist() for name in ("user_id", "fact_id", "op", "trigger", "answer", "scope")}
    times = rows.column("event_time").cast(pa.int64()).to_pylist()
    if _day_ends_not_past(cols["op"], times, int(now.timestamp() * 1_000_000)):
        rows = rows.set_column(rows.schema.get_field_index("event_time"), "event_time",
                               pa.array(times, pa.int64()).cast(rows.schema.field("event_time").type))
    verdicts = _validate(rows, cols, times, now, rules.max_trigger_tokens, count_tokens, rules.max_text_chars,
                         rules.max_answer_tokens, count_answer_tokens)
    for name in _CANONICAL_COLUMNS:
        rows = rows.set_column(rows.schema.get_field_index(name), name, pa.array(cols[name], pa.string()))
    reasons = pa.array([v[0] if v else None for v in verdicts], pa.string())
    details = pa.array([v[1] if v else None for v in verdicts], pa.string())
    rows = rows.set_column(rows.schema.get_field_index("_problem_reason"), "_problem_reason", reasons)
    return rows.set_column(rows.schema.get_field_index("_problem_detail"), "_problem_detail", details)


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
        _token_limit(verdicts, cols, "trigger", count_tokens, "count_tokens", max_trigger_tokens, F.TRIGGER_TOO_LONG, "")
    if count_answer_tokens is not None and max_answer_tokens is not None:
        _token_limit(verdicts, cols, "answer", count_answer_tokens, "count_answer_tokens", max_answer_tokens,
                     F.ANSWER_TOO_LONG, ", CompileOptions.max_answer_tokens")
    return verdicts


def _token_limit(verdicts: list, cols: dict, column: str, count: Callable[[list[str]], list[int]], name: str,
                 limit: int, reason: str, where: str) -> None:
    """Reject (``reason``) every still-accepted upsert whose ``column`` is over ``limit`` tokens."""
    pending = [i for i in range(len(verdicts)) if verdicts[i] is None and cols["op"][i] == F.OP_UPSERT]
    counts = list(count([cols[column][i] for i in pending])) if pending else []
    if len(counts) != len(pending):
        raise ValueError(f"{name} returned {len(counts)} counts for {len(pending)} {column}s")
    for i, tokens in zip(pending, counts):
        if tokens > limit:
            verdicts[i] = (reason, f"{column} is {tokens} tokens (limit {limit}{where})")


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


# How pandas, numpy and SQL clients write a missing value as text (``df.user_id.astype(str)`` turns
# NaN into "nan", None into "None", pd.NA into "<NA>"), and other languages and tools (JavaScript's
# String(undefined), Go's "<nil>", Ruby's and Lisp's "nil", C's printf of NULL "(null)", R's "NA",
# spreadsheets' "N/A" and "#N/A", Excel's "#NULL!"; the text NULL of MySQL's INTO OUTFILE and mysqldump
# --tab, PostgreSQL's text COPY and Hive's text tables, "\N", which pandas' read_csv keeps as text; a
# SQL client's grid copied out, "[NULL]" in DBeaver, "<null>" in others): as an id, every missing one
# became one id (a scope "\N" shared every such user's facts with the others).
_MISSING_AS_TEXT = frozenset({"nan", "none", "null", "<na>", "nat"})
# The same from other languages and tools: refused on upserts only (as U+FFFD), so that a forget or
# delete of such an id, accepted before these were refused, still erases what is stored under it.
_MORE_MISSING_AS_TEXT = frozenset({"undefined", "<nil>", "nil", "(null)", "na", "n/a", "#n/a", "#null!", "\\n", "[null]",
                                  "<null>"})
# Not read as missing in a scope: "NA" names a region (North America), "Nil" a person or a group.
_SCOPE_WORDS_KEPT = frozenset({"na", "nil"})
# A user_id or scope that stands for no one in particular (a logged-out session's): one id for every such
# user, so what one told about themselves was served to all the others. Upserts only, as above.
_PLACEHOLDER_IDS = frozenset({"anonymous", "anon", "guest", "unknown"})


def _missing_as_text(name: str, value: str | None, upsert: bool = True) -> str | None:
    """Why an id is a missing value written as text (or, for a user_id or scope on an upsert, a
    placeholder that stands for no one in particular), or None. ``upsert`` False (a delete or a
    forget): only pandas' and SQL's spellings (``'nan'``, ``'None'``, ...), as before the others
    were refused, so ids stored under the others can still be erased."""
    if value is None:
        return None
    word = value.casefold()
    if upsert and word in _PLACEHOLDER_IDS and name in ("user_id", "scope"):
        return (f"{name} {value!r} stands for no one in particular (a logged-out or unknown user's placeholder), not "
                f"an id: every such row would be one {name}, and what one such user told would be served to all the "
                f"others; drop the rows without a real {name}, or give each such user an id of their own")
    missing = word in _MISSING_AS_TEXT or (upsert and word in _MORE_MISSING_AS_TEXT
                                          and not (name == "scope" and word in _SCOPE_WORDS_KEPT))
    if not missing:
        return None
    return (f"{name} {value!r} is a missing value written as text (pandas' astype(str) writes NaN as 'nan', None as "
            f"'None', pd.NA as '<NA>'; JavaScript 'undefined', Go '<nil>', R 'NA', spreadsheets '#N/A', MySQL's and "
            f"PostgreSQL's text exports '\\N'), not an id: "
            f"every such row would be one {name}; export missing values as null, or drop the rows without a {name}")


def _check_row(cols, times, i, future_limit, max_text_chars) -> tuple[str, str] | None:
    user_id, op = cols["user_id"][i], cols["op"][i]
    if user_id is None or user_id == "":
        return F.MISSING_USER_ID, "user_id is empty"
    if problem := F.id_problem("user_id", user_id) or _missing_as_text("user_id", user_id, op == F.OP_UPSERT):
        return F.BAD_USER_ID, problem
    if op is None or op == "":
        return F.UNKNOWN_OP, f"op is empty; write one of {', '.join(F.OPS)}"
    if op not in F.OPS:
        word = re.sub(r"[\W_]", "", op)  # its letters and digits: 'forget-user', 'upsert;', 'insert;'
        near = [name for name in F.OPS if word == name.replace("_", "")]
        hint = f" (write {near[0]!r}: another spelling of an op is not read as it)" if near else ""
        if not near and word in _OP_WORDS:
            hint = (f" (write {_OP_WORDS[word]!r}: another word for an op is not read as it; "
                    "upsert adds or replaces a fact, delete removes one fact, forget_user erases every fact of the user)")
        if (code := op if op in _CHANGE_OPS else word) in _CHANGE_OPS:
            hint = (f" (write {_CHANGE_OPS[code]!r}: a change-data-capture export's operation codes, SQL's INSERT / UPDATE "
                    "/ DELETE, Debezium's c / u / r / d, AWS DMS's I / U / D, are not read as ops; map them when "
                    "exporting: insert and update are 'upsert', delete is 'delete')")
        return F.UNKNOWN_OP, f"op {str(op)[:64]!r} is not one of {', '.join(F.OPS)}{hint}"
    if times[i] is None:
        return F.MISSING_EVENT_TIME, "event_time is empty"
    if times[i] > future_limit:
        return F.FUTURE_EVENT_TIME, f"event_time {_iso(times[i])} is more than {FUTURE_TOLERANCE} in the future"
    if op == F.OP_FORGET_USER:
        return None
    fact_id = cols["fact_id"][i]
    if fact_id is None or fact_id == "":
        if op == F.OP_DELETE:  # an export's "delete everything of this user" (a delete without a fact)
            return F.MISSING_FACT_ID, ("fact_id is empty on a delete: a delete removes one fact; to remove every fact "
                                       "of the user write op 'forget_user' (it also erases the user from older "
                                       "versions), or one delete per fact_id")
        return F.MISSING_FACT_ID, f"fact_id is empty on an {op}"
    if problem := F.id_problem("fact_id", fact_id) or _missing_as_text("fact_id", fact_id, op == F.OP_UPSERT):
        return F.BAD_FACT_ID, problem
    if cols["scope"][i] not in (None, "") and (problem := F.id_problem("scope", cols["scope"][i])
                                               or _missing_as_text("scope", cols["scope"][i], op == F.OP_UPSERT)):
        return F.BAD_SCOPE, problem
    if op == F.OP_DELETE:
        return None
    if (cols["scope"][i] or "").casefold() in _OWN_SCOPE_WORDS and cols["scope"][i] != user_id:
        return F.BAD_SCOPE, (f"scope {cols['scope'][i]!r} is a word for the user's own facts, but a scope is shared: "
                             "every user who writes it would be one scope, their facts merged and each served the "
                             "others' answers; leave scope null or empty for a user's own facts (or write the "
                             "user_id), and name a shared scope by its group (e.g. org:clinic-north)")
    return _replaced_text(cols, i) or _check_text(cols["trigger"][i], "trigger", F.EMPTY_TRIGGER, F.TRIGGER_TOO_LONG,
                                                  max_text_chars) or _check_text(
        cols["answer"][i], "answer", F.EMPTY_ANSWER, F.ANSWER_TOO_LONG, max_text_chars
    )


# Scope values an export writes for "this user's own" (an enum's name, a placeholder): a scope is shared,
# so each such value made one scope of every user writing it, served each other's answers.
_OWN_SCOPE_WORDS = frozenset({"user", "personal", "private", "self", "own", "individual", "n/a", "-"})
_REPLACEMENT = "\ufffd"
_REPLACED_REASON = {"user_id": F.BAD_USER_ID, "fact_id": F.BAD_FACT_ID, "scope": F.BAD_SCOPE, "trigger": F.INVALID_UTF8,
                    "answer": F.INVALID_UTF8}


def _replaced_text(cols: dict, i: int) -> tuple[str, str] | None:
    """Why an upsert's value holds U+FFFD, the character a decoder writes for bytes that were not
    UTF-8 (Java's and Spark's default decoding, Python's errors='replace': a Latin-1 or Windows-1252
    export read as UTF-8 upstream), or None. Such text is not what was written (published, "Café"
    was answered as "Caf" and U+FFFD), and ids that lost different letters become one id ("José"
    and "Josè" are both "Jos" and U+FFFD: one user's facts served to the other). Only upserts are
    refused: a delete or forget of such an id still removes what an earlier night stored."""
    for name, reason in _REPLACED_REASON.items():
        value = cols[name][i]
        if value is not None and (where := value.find(_REPLACEMENT)) >= 0:
            return reason, (f"{name} holds U+FFFD (the replacement character) at character {where}: a tool before this "
                            "log decoded bytes that were not UTF-8 and replaced them, so the text is not what was "
                            "written (and two ids that lost different letters would be one); re-export it decoding the "
                            "source in its real encoding (e.g. Spark option('encoding', 'windows-1252'), Python "
                            "encoding='cp1252')")
    return None


# Other words for the ops (folded to letters), named in their UNKNOWN_OP reject as the op to write.
_OP_WORDS = {**dict.fromkeys(("add", "set", "create", "put", "save", "store", "write", "new", "replace",
                              "upsertfact", "addfact", "setfact"), F.OP_UPSERT),
             **dict.fromkeys(("remove", "del", "deleted", "drop", "unset", "retract", "deletefact", "removefact"),
                             F.OP_DELETE),
             **dict.fromkeys(("forget", "forgetme", "erase", "eraseuser", "erasure", "purge", "purgeuser",
                              "deleteuser", "removeuser", "gdprdelete", "gdpr", "anonymize", "anonymise",
                              "forgetuser"), F.OP_FORGET_USER)}
# A change-data-capture export's operation codes (op is read in lower case): each is named with the op to
# write, not read as it. Such an export had its deletes applied and every insert and update rejected.
_CHANGE_OPS = {"insert": F.OP_UPSERT, "update": F.OP_UPSERT,
               "c": F.OP_UPSERT, "u": F.OP_UPSERT, "r": F.OP_UPSERT, "i": F.OP_UPSERT, "d": F.OP_DELETE}


def _check_text(text, name, empty_reason, long_reason, max_chars) -> tuple[str, str] | None:
    if text is None or not text.strip():
        return empty_reason, f"{name} is empty"
    if len(text) > max_chars:
        return long_reason, f"{name} is {len(text)} characters (limit {max_chars})"
    if (where := F.first_control_character(text)) >= 0:
        return F.CONTROL_CHARACTERS, (f"{name} holds control character U+{ord(text[where]):04X} at character {where} "
                                      "(only tab and newline are allowed; remove or replace it)")
    return None


# --- Applying -------------------------------------------------------------------------------


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
    prior_tombstones: pa.Table | None = None,
    max_answer_tokens: int | None = None,
    count_answer_tokens: Callable[[list[str]], list[int]] | None = None,
) -> IngestResult:
    """Validate a whole batch and apply it onto ``prior_state`` (and its tombstones), in this
    process: :func:`validate_rows` then :func:`apply_events`. See the module doc.

    Ids, triggers and answers are put in canonical form first (:func:`canonical_row`).
    ``count_tokens`` counts a trigger's tokens as a prompt (special tokens included);
    ``count_answer_tokens`` (with ``max_answer_tokens``, the compiler's
    ``CompileOptions.max_answer_tokens``) an answer's, without special tokens
    (:func:`answer_token_counter`): an answer over the limit is rejected ``ANSWER_TOO_LONG``."""
    batch = log if isinstance(log, FactLogBatch) else FactLogBatch(normalise_fact_log(log), ())
    rules = RowRules(max_trigger_tokens=max_trigger_tokens, max_text_chars=max_text_chars, now=now,
                     max_answer_tokens=max_answer_tokens if count_answer_tokens is not None else None)
    rows = validate_rows(batch.rows, rules, count_tokens=count_tokens, count_answer_tokens=count_answer_tokens)
    result = apply_events(rows, prior_state, prior_tombstones, file_rejects=batch.file_rejects)
    if result.accepted + result.rejected != batch.input_rows:  # a bug here, never the data's fault
        raise RuntimeError(f"ingest lost track of rows: {result.accepted} + {result.rejected} != {batch.input_rows}")
    return result


def apply_events(
    rows: pa.Table,
    prior_state: pa.Table | None,
    prior_tombstones: pa.Table | None = None,
    *,
    file_rejects: pa.Table | None = None,
) -> IngestResult:
    """Apply validated rows (FACT_LOG_BATCH_SCHEMA, problems marked by :func:`validate_rows`) onto
    a prior fact state and its tombstones: one shard's, or everything's.

    Only users with a valid event are handled row by row; the prior rows of every other user are
    carried as they are (a filter and a sort, no Python per row). ``file_rejects`` (whole bad
    files) are added to the rejects. Returns the new state, tombstones and rejects, the users whose
    live facts changed and those forgotten, and the counts (``accepted + rejected`` is the number
    of rows plus file rejects).
    """
    prior = F.validate_fact_state(prior_state) if prior_state is not None else F.empty_fact_state()
    tombstones = F.conform(prior_tombstones, F.TOMBSTONE_SCHEMA, "tombstones") if prior_tombstones is not None \
        else F.empty_tombstones()
    cols = {name: rows.column(name).to_pylist() for name in ("user_id", "fact_id", "op", "trigger", "answer", "scope", "_source", "_row")}
    times = rows.column("event_time").cast(pa.int64()).to_pylist()
    reasons, details = rows.column("_problem_reason").to_pylist(), rows.column("_problem_detail").to_pylist()
    verdicts: list[tuple[str, str] | None] = [(r, d) if r else None for r, d in zip(reasons, details)]

    events = [_event(i, cols, times) for i in range(rows.num_rows) if verdicts[i] is None]
    winners = _dedupe(events, verdicts)
    touched = sorted({e.user_id for e in winners})
    prior_touched, prior_rest = _split_by_users(prior, "user_id", touched)
    hashes = {u: forgotten_id(u) for u in touched}
    tomb_touched, tomb_rest = _split_by_users(tombstones, "user_hash", sorted(hashes.values()))
    new_facts, new_tombs, forget_times = _apply(winners, _state_to_dict(prior_touched),
                                                _tombstones_by_user(tomb_touched, hashes), verdicts)
    forgotten = set(forget_times)

    state = pa.concat_tables([prior_rest, _dict_to_state(new_facts)]).sort_by(
        [("user_id", "ascending"), ("fact_id", "ascending")])
    tombstones = pa.concat_tables([tomb_rest, _tombstones_table(new_tombs)]).sort_by(
        [("user_hash", "ascending"), ("fact_id", "ascending")])
    rejects = _rejects_table(file_rejects, cols, verdicts, _forgotten_rows(cols, times, verdicts, tombstones))
    accepted = sum(v is None for v in verdicts)
    before, after = user_fact_digest(prior_touched), user_fact_digest(_dict_to_state(new_facts))
    changed = {u for u in before.keys() | after.keys() if before.get(u) != after.get(u)} | forgotten
    accepted_max = max((times[i] for i, v in enumerate(verdicts) if v is None), default=None)
    prior_max = pc.max(prior.column("event_time").cast(pa.int64())).as_py()
    result = IngestResult(
        state=state,
        rejects=rejects,
        changed_users=changed,
        forgotten_users=forgotten,
        accepted=accepted,
        rejected=rejects.num_rows,
        watermark=_iso(max((t for t in (accepted_max, prior_max) if t is not None), default=None)),
        tombstones=tombstones,
        forget_times=forget_times,
    )
    expected = rows.num_rows + (file_rejects.num_rows if file_rejects is not None else 0)
    if result.accepted + result.rejected != expected:  # a bug here, never the data's fault
        raise RuntimeError(f"ingest lost track of rows: {result.accepted} + {result.rejected} != {expected}")
    logger.info("ingest: %d accepted, %d rejected, %d users changed, %d forgotten",
                result.accepted, result.rejected, len(changed), len(forgotten))
    return result


def _split_by_users(table: pa.Table, column: str, users: list[str]) -> tuple[pa.Table, pa.Table]:
    """(rows whose ``column`` is in ``users``, the other rows)."""
    if not users or table.num_rows == 0:
        return table.slice(0, 0), table
    mask = pc.is_in(table.column(column), pa.array(users, pa.string()))
    return table.filter(mask), table.filter(pc.invert(mask))


def _event(i: int, cols: dict, times: list) -> _Event:
    op, user_id = cols["op"][i], cols["user_id"][i]
    if op == F.OP_UPSERT:
        content = (cols["scope"][i] or user_id, cols["trigger"][i], cols["answer"][i])
    else:
        content = ()
    fact_id = None if op == F.OP_FORGET_USER else cols["fact_id"][i]
    return _Event(i, user_id, fact_id, op, times[i], cols["_source"][i], cols["_row"][i], content)


def _dedupe(events: list[_Event], verdicts: list) -> list[_Event]:
    """Keep one event per (user, fact, time, op); reject copies and conflicts in verdicts.

    Upserts of one fact at one instant with other content are all CONFLICTING_DUPLICATE, and stand
    for a delete of the fact at that instant (:func:`_conflict`, an event of no row): the same
    effect as when the copies arrive on different nights (the second one meets the first in the
    prior state), so the result does not depend on how the events are split over nights, and a
    copy sent again later is not newer than that delete."""
    groups: dict[tuple, list[_Event]] = defaultdict(list)
    for event in events:
        groups[(event.user_id, event.fact_id, event.time, event.op)].append(event)
    kept = []
    for (user_id, fact_id, time, op), group in groups.items():
        group.sort(key=lambda e: (e.source, e.row))
        first = group[0]
        keys = _fact_keys([e.content for e in group], user_id) if op == F.OP_UPSERT else [e.content for e in group]
        if len(set(keys)) == 1:
            # one fact: keep the first copy that carries the fact's shared scope (a copy without one
            # is the same fact read from an export without the scope column), else the first
            kept_event = next((e for e in group if e.content[:1] == keys[0][:1]), first)
            kept.append(kept_event)
            for copy in group:
                if copy is not kept_event:
                    verdicts[copy.index] = (F.DUPLICATE, _copy_of(copy.content, kept_event.content,
                                                                  f"{kept_event.source} row {kept_event.row}"))
            continue
        for event in group:
            verdicts[event.index] = (
                F.CONFLICTING_DUPLICATE,
                f"{len(group)} {op} events for user {user_id[:64]!r} fact {fact_id!r} at {_iso(time)} "
                "differ in content; none applied and the fact is deleted at that time (event times are compared "
                "to the microsecond, a date column's to the day: give each edit its own time, or send only the "
                "one that holds, with a later time)",
            )
        if (user_id, fact_id, time, F.OP_DELETE) not in groups:  # a delete at that instant says the same
            kept.append(_conflict(first))
    return kept


def _conflict(first: _Event) -> _Event:
    """The delete a same-instant conflict stands for: applied like a delete at its instant (the
    fact goes, a tombstone stays) but with no row of its own (``index`` -1: it gets no verdict)."""
    return _Event(-1, first.user_id, first.fact_id, F.OP_DELETE, first.time, first.source, first.row, ())


@dataclass
class _UserTombstones:
    forget_time: int | None = None  # latest forget recorded before this batch
    deletes: dict[str, int] = field(default_factory=dict)  # fact_id -> delete time


def _tombstones_by_user(table: pa.Table, hashes: dict[str, str]) -> dict[str, _UserTombstones]:
    user_of_hash = {h: u for u, h in hashes.items()}
    out: dict[str, _UserTombstones] = {}
    times = table.column("event_time").cast(pa.int64()).to_pylist()
    for user_hash, fact_id, op, time in zip(table.column("user_hash").to_pylist(), table.column("fact_id").to_pylist(),
                                             table.column("op").to_pylist(), times):
        user = out.setdefault(user_of_hash[user_hash], _UserTombstones())
        if op == F.OP_FORGET_USER:
            user.forget_time = max(time, user.forget_time if user.forget_time is not None else time)
        else:
            user.deletes[fact_id] = time
    return out


def _apply(events: list[_Event], prior: dict, tombstones: dict[str, _UserTombstones],
           verdicts: list) -> tuple[dict, dict[str, _UserTombstones], dict[str, int]]:
    """Apply deduplicated events onto the prior facts and tombstones of the users they touch;
    mark losers SUPERSEDED (or FORGOTTEN_USER). Returns (facts, tombstones, forgotten user -> the
    time of their latest forget in this batch)."""
    batch_forget: dict[str, int] = {}
    per_fact: dict[tuple[str, str], list[_Event]] = defaultdict(list)
    for event in events:
        if event.op != F.OP_FORGET_USER:
            per_fact[(event.user_id, event.fact_id)].append(event)
            continue
        recorded = tombstones.get(event.user_id, _UserTombstones()).forget_time
        if recorded is not None and recorded >= event.time:  # a log file read again, or an older forget
            verdicts[event.index] = ((F.DUPLICATE, "this forget is already recorded") if recorded == event.time else
                                     (F.SUPERSEDED, f"the user was already forgotten at {_iso(recorded)}"))
            continue
        batch_forget[event.user_id] = max(event.time, batch_forget.get(event.user_id, event.time))
    never = -(2**63)
    forget_time = {u: t.forget_time for u, t in tombstones.items() if t.forget_time is not None}
    for user, time in batch_forget.items():
        forget_time[user] = max(time, forget_time.get(user, never))
    facts = {key: fact for key, fact in prior.items() if fact["event_time"] > forget_time.get(key[0], never)}
    deletes = {(u, f): t for u, user in tombstones.items() for f, t in user.deletes.items()
               if t > forget_time.get(u, never)}
    for key, group in per_fact.items():
        group.sort(key=lambda e: e.order)
        last = group[-1]
        recorded = tombstones.get(key[0], _UserTombstones()).forget_time
        for loser in group[:-1]:
            if loser.index >= 0 and recorded is not None and recorded >= loser.time:
                # refused for the forget whatever came after it (it was SUPERSEDED "by" a row refused so too)
                verdicts[loser.index] = _forgotten_verdict(recorded)
            elif loser.index >= 0:
                by = (f"the {last.op} at {_iso(last.time)} ({last.source} row {last.row})" if last.index >= 0 else
                      f"the conflicting upserts at {_iso(last.time)} ({last.source} row {last.row}, ...), which delete the fact")
                verdicts[loser.index] = (F.SUPERSEDED, f"superseded by {by}")
        verdict, effect = _verdict(last, key, prior, deletes, tombstones, batch_forget, never)
        if last.index >= 0:  # a conflict's delete (-1) has no row: its events are CONFLICTING_DUPLICATE already
            verdicts[last.index] = verdict
        if effect == "delete":
            facts.pop(key, None)
            deletes[key] = last.time
        elif effect == "upsert":
            scope, trigger, answer = last.content
            facts[key] = {"scope": scope, "trigger": trigger, "answer": answer, "event_time": last.time}
            deletes.pop(key, None)
    new_tombstones: dict[str, _UserTombstones] = {}
    for user, time in forget_time.items():
        new_tombstones.setdefault(user, _UserTombstones()).forget_time = time
    for (user, fact_id), time in deletes.items():
        new_tombstones.setdefault(user, _UserTombstones()).deletes[fact_id] = time
    return facts, new_tombstones, batch_forget


def _forgotten_verdict(forget_time: int) -> tuple[str, str]:
    """The reject of an event not later than its user's recorded forget."""
    return F.FORGOTTEN_USER, f"the user was forgotten at {_iso(forget_time)}; only events after a forget are applied"


def _verdict(last: _Event, key: tuple, prior: dict, deletes: dict, tombstones: dict[str, _UserTombstones],
             batch_forget: dict[str, int], never: int) -> tuple[tuple[str, str] | None, str | None]:
    """(verdict, effect) of the latest event of one fact against the prior state, the delete
    tombstones and the forgets: effect "delete", "upsert" or None (no change)."""
    earlier_forget = tombstones.get(last.user_id, _UserTombstones()).forget_time
    if earlier_forget is not None and earlier_forget >= last.time:
        return _forgotten_verdict(earlier_forget), None
    if batch_forget.get(last.user_id, never) >= last.time:
        return (F.SUPERSEDED, f"removed by forget_user at {_iso(batch_forget[last.user_id])}"), None
    if key in deletes and deletes[key] == last.time and last.op == F.OP_DELETE:
        return (F.DUPLICATE, "this delete is already recorded"), None
    if key in deletes and deletes[key] >= last.time:
        return (F.SUPERSEDED, f"not later than the delete of this fact at {_iso(deletes[key])}"), None
    if key in prior and prior[key]["event_time"] > last.time:
        return (F.SUPERSEDED, f"older than the fact in the prior state ({_iso(prior[key]['event_time'])})"), None
    if key in prior and prior[key]["event_time"] == last.time and last.op == F.OP_UPSERT:
        stored = (prior[key]["scope"], prior[key]["trigger"], prior[key]["answer"])
        same = _same_fact(stored, last.content, last.user_id)
        if same == "same":
            how = "" if last.content == stored else _differences(last.content, stored)
            return (F.DUPLICATE, f"this upsert is already applied (the fact in the prior state{how})"), None
        if same == "scope":  # the published copy came without its scope column: this one has it
            return None, last.op
        # Another content at the prior fact's own instant: as within one batch, there is no
        # order to pick one by, so neither is kept; a delete tombstone at that instant keeps a
        # re-read of either file from bringing one back (which night came first must not matter).
        return (F.CONFLICTING_DUPLICATE,
                f"the fact in the prior state has the same event time ({_iso(last.time)}) and other content; "
                "neither is kept and the fact is deleted at that time (give each edit its own time, or send only "
                "the one that holds, with a later time)"), "delete"
    return None, last.op


_NUMBER_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")


def _answer_key(answer: str | None):
    """What makes two answers the same: the text without the boundary space (ingest's choice,
    engram_core.text rule 5, not the log's), and a number as written by a numeric column (no
    leading zero, no '+': ``12.50``, ``12.5``, ``1e+20``) by its value, so that a re-export whose
    column went from decimal(10, 2) to double (``12.50`` -> ``12.5``) is the same fact. A text such
    as ``0123`` (a zip code) is compared as text."""
    if answer is None:
        return None
    text = answer.lstrip(" ")
    if not _NUMBER_TEXT.fullmatch(text):
        return ("text", text)
    try:
        sign, digits, exponent = Decimal(text).as_tuple()
    except InvalidOperation:
        return ("text", text)
    digits = list(digits)
    while len(digits) > 1 and digits[-1] == 0:  # 12.50 -> 125e-1, exactly (no context, no rounding)
        digits.pop()
        exponent += 1
    if digits == [0]:
        return ("number", 0, (0,), 0)
    return ("number", sign, tuple(digits), exponent)


def _fact_keys(contents: list[tuple], user_id: str) -> list[tuple]:
    """One key per (scope, trigger, answer) content of one user's fact at one instant: equal keys
    are the same fact (the texts read with Unicode's line breaks as newlines, as ingest now writes
    them). A content without a shared scope (its scope is the user) whose trigger and
    answer match those of exactly one shared scope's copy takes that scope: the same row exported
    without the optional scope column is that copy, not a conflicting personal fact. Texts are
    read in today's canonical form: one stored under an earlier rule (a typographic apostrophe in a
    trigger, NEL / U+2028 / U+2029 kept as written, before 2026-12-02) is the fact its log line,
    read again, now gives."""
    keys = [(scope, trigger and canonical_prompt(trigger), _answer_key(answer and answer.translate(LINE_BREAKS)))
            for scope, trigger, answer in contents]
    shared: dict[tuple, set] = defaultdict(set)
    for scope, trigger, answer in keys:
        if scope != user_id:
            shared[(trigger, answer)].add(scope)
    return [((next(iter(shared[(t, a)])), t, a) if s == user_id and len(shared.get((t, a), ())) == 1 else (s, t, a))
            for s, t, a in keys]


def _copy_of(copy: tuple, kept: tuple, where: str) -> str:
    """A DUPLICATE's detail: which copy it is the same fact as, and how it differs, if at all."""
    if copy == kept:
        return f"exact copy of {where}"
    return f"the same fact as {where}{_differences(copy, kept)}"


def _differences(copy: tuple, kept: tuple) -> str:
    """How a copy that is the same fact (:func:`_fact_keys`) differs from the kept one, as a suffix
    of a detail."""
    why = []
    if copy[0] != kept[0]:
        why.append(f"this row has no scope, the copy has scope {kept[0][:64]!r} (a re-export without the scope "
                   "column? the scope is kept; to make the fact personal, send it with a later time)")
    if copy[2] != kept[2] and _answer_key(copy[2]) == _answer_key(kept[2]) and copy[2].lstrip(" ") != kept[2].lstrip(" "):
        why.append(f"the answer {copy[2].strip()[:64]!r} is the same number as {kept[2].strip()[:64]!r} (kept as published)")
    if not why and (copy[1] != kept[1] or (copy[2] or "").lstrip(" ") != (kept[2] or "").lstrip(" ")):
        return " (but for line breaks: U+2028, U+2029 and NEL read as newlines since 2026-12-02)"
    return f": {'; '.join(why)}" if why else " (but for the boundary space)"


def _same_fact(stored: tuple, event: tuple, user_id: str) -> str | None:
    """Whether an event's (scope, trigger, answer) is the fact stored at the same instant:
    "same" (a DUPLICATE: equal, or equal by :func:`_fact_keys`: the answer's boundary space, a
    number's digits, a copy without the scope column), "scope" (the same fact, and the event
    carries the shared scope the stored copy lacked: the event replaces it, as in one batch the
    scoped copy is kept), or None (other content)."""
    if stored == event:
        return "same"
    stored_key, event_key = _fact_keys([stored, event], user_id)
    if stored_key != event_key:
        return None
    return "scope" if stored[0] == user_id and event[0] != user_id else "same"


def _tombstones_table(tombstones: dict[str, _UserTombstones]) -> pa.Table:
    rows = []
    for user, entry in tombstones.items():
        user_hash, routing = forgotten_id(user), shard_hash(user)
        if entry.forget_time is not None:
            rows.append({"user_hash": user_hash, "user_xxh64": routing, "user_id": None, "fact_id": None,
                         "op": F.OP_FORGET_USER, "event_time": entry.forget_time})
        rows += [{"user_hash": user_hash, "user_xxh64": routing, "user_id": user, "fact_id": fact_id,
                  "op": F.OP_DELETE, "event_time": time} for fact_id, time in entry.deletes.items()]
    return pa.table({
        "user_hash": pa.array([r["user_hash"] for r in rows], pa.string()),
        "user_xxh64": pa.array([r["user_xxh64"] for r in rows], pa.uint64()),
        "user_id": pa.array([r["user_id"] for r in rows], pa.string()),
        "fact_id": pa.array([r["fact_id"] for r in rows], pa.string()),
        "op": pa.array([r["op"] for r in rows], pa.string()),
        "event_time": pa.array([r["event_time"] for r in rows], pa.int64()).cast(F.TIMESTAMP),
    }, schema=F.TOMBSTONE_SCHEMA)


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


def _forgotten_rows(cols: dict, times: list, verdicts: list, tombstones: pa.Table) -> set[int]:
    """Rejected rows of a forgotten user (a forget in ``tombstones``, this batch's or an earlier
    night's) that are not later than the forget, or have no valid time to tell: their rejects must
    not store the user's id again (the source file and row still say where they came from)."""
    rejected = {cols["user_id"][i] for i, verdict in enumerate(verdicts) if verdict is not None and cols["user_id"][i]}
    if not rejected:
        return set()
    hashes = {u: forgotten_id(u) for u in rejected}
    forgets = tombstones.filter(pc.and_(pc.equal(tombstones.column("op"), F.OP_FORGET_USER),
                                        pc.is_in(tombstones.column("user_hash"), pa.array(list(hashes.values()), pa.string()))))
    forget_at = {u: t.forget_time for u, t in _tombstones_by_user(forgets, hashes).items()}
    return {i for i, verdict in enumerate(verdicts) if verdict is not None and cols["user_id"][i] in forget_at
            and (times[i] is None or times[i] <= forget_at[cols["user_id"][i]])}


def _rejects_table(file_rejects: pa.Table | None, cols: dict, verdicts: list, redacted: set[int] = frozenset()) -> pa.Table:
    def short(value):
        return value if value is None or len(value) <= REJECT_TEXT_LIMIT else value[:REJECT_TEXT_LIMIT] + "…"

    def detail(i: int, text: str) -> str:  # the ids as messages quote them, nothing else of the text
        if i not in redacted:
            return text
        text = text.replace(f"user {cols['user_id'][i][:64]!r}", "user <forgotten user>")
        return text.replace(f"fact {cols['fact_id'][i]!r}", "fact <forgotten>") if cols["fact_id"][i] else text

    records = [
        {
            "source": cols["_source"][i],
            "row": cols["_row"][i],
            "user_id": None if i in redacted else short(cols["user_id"][i]),
            "fact_id": None if i in redacted else short(cols["fact_id"][i]),
            "op": short(cols["op"][i]),
            "reason": verdict[0],
            "detail": detail(i, verdict[1]),
        }
        for i, verdict in enumerate(verdicts)
        if verdict is not None
    ]
    parts = [pa.Table.from_pylist(records, schema=F.REJECTS_SCHEMA)]
    if file_rejects is not None:
        parts.insert(0, file_rejects.cast(F.REJECTS_SCHEMA))
    return pa.concat_tables(parts).sort_by([("source", "ascending"), ("row", "ascending")])


def _iso(micros: int | None) -> str | None:
    if micros is None:
        return None
    return (datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=micros)).isoformat()
