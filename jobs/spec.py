"""The nightly job spec: every parameter of a run, typed, validated, round-tripping through YAML."""

from __future__ import annotations

import math
import os
import re
from decimal import Decimal
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from engram_core.options import CompileOptions


DEFAULT_NUM_SHARDS = 16

NEVER = "never"
DEFAULT_MAX_FILE_AGE = NEVER
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE_PATTERN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")


def parse_max_file_age(value: str) -> int | None:
    """The ``max_file_age`` of a job spec in nanoseconds: ``'<number><unit>'`` with unit ``s``,
    ``m``, ``h``, ``d`` or ``w`` (``'30d'``, ``'36h'``, ``'1.5d'``), or None for ``'never'`` (the
    ledger keeps every file, as before the option). Raises ValueError naming the value and the form
    for anything else (a bare number has no unit, 0 or less keeps no window)."""
    if isinstance(value, str) and value.strip().lower() == NEVER:
        return None
    match = _AGE_PATTERN.fullmatch(value) if isinstance(value, str) else None
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"'max_file_age' {value!r}: write a positive age with its unit, e.g. '30d', '36h' or '90m' "
                         f"(units s, m, h, d, w), or 'never' to keep every ingested file in the ledger")
    return int(Decimal(match.group(1)) * _AGE_UNITS[match.group(2)] * 1_000_000_000)


class SpecError(ValueError):
    """A job spec that is invalid; the message names the field."""


MAX_SHARDS = 65_536
"""The most shards (``num_shards``) a store may have: each shard is a task of every night and an
object of every version, and the shard column is int32. A spec or ``--num-shards`` above it is
refused before anything runs (100,000,000 was accepted and ran for minutes before doing anything)."""

@dataclass(frozen=True)
class NightlySpec:
    store: str
    """Where versions are published: a local directory or s3://bucket/prefix."""
    fact_log: str
    """The fact log: a Parquet file, a folder (hive day=... partitions) or s3://... prefix."""
    model: str
    """Checkpoint directory (base/, tokenizer/, engram/, adapter/)."""
    num_shards: int | None = None
    """Bundles per version (shard = xxh64(user_id) mod num_shards). None: the store's current
    number (DEFAULT_NUM_SHARDS for a new store); another number moves every user in one night."""
    workers: int = 2
    """Ray compile actors (0 = compile in the driver process, no Ray)."""
    gpus_per_worker: float | None = None
    """GPUs per actor; None = 1 if the cluster has GPUs, else 0."""
    batches_per_chunk: int = 1
    """Compile batches (``compile.facts_per_batch`` facts each) per Ray task. More than one: the
    next batch is tokenized while one compiles and per-task costs are paid less often (use 4 on
    GPU workers); one: finer checkpoints and more tasks to spread over CPU workers."""
    min_chunks: int = 1
    """Split a night into at least this many compile chunks when it has enough batches: chunks of
    fewer than ``batches_per_chunk`` batches when the night's facts would give fewer chunks (set it
    to the number of compile workers, e.g. GPUs, so that a small night, 5% of users changed, keeps
    every worker busy). The plan depends on the night's facts and the spec alone, never on the
    cluster, so a resumed or re-run night with the same spec compiles the same chunks."""
    apply_in_flight: int | None = None
    """Apply tasks (one per changed shard) running at once. None: as many as the night's new rows
    need, ``max(8, ceil(rows / 4096))`` up to the number of shards: a night of 2,500 new rows
    over 64 shards starts 8 Ray worker processes, not one per CPU, so that their start (imports
    of pyarrow and the pipeline, seconds each on a busy host) does not slow the compile actors'
    own start, the longest fixed cost of a small night; a full night's, and those of a night that
    visits every shard (a recompile, a reshard), are all in flight. A number: at most that many."""
    ray_address: str | None = None
    """None = a local Ray cluster; else a cluster address (e.g. ray://head:10001 or auto)."""
    recompile_all: bool = False
    on_bad_file: str = "raise"
    """'raise' stops the run at an unreadable log file; 'reject' records it in rejects."""
    max_file_age: str = DEFAULT_MAX_FILE_AGE
    """The ingest ledger's window: the watermark keeps the files modified within this age before the
    newest file already ingested and forgets older ones, and a log file older than that which the
    ledger lacks is not read (counted, and warned about). ``'<number><unit>'`` (s, m, h, d, w: '30d',
    '36h') or ``'never'`` (the default: keep every file ever ingested, and read every file the
    ledger lacks whatever its age). Not bounded by default: a file that arrives with an old
    modification time kept (``tar x``, ``cp -p``, ``rsync -t`` of a backfill) would be skipped."""
    max_trigger_tokens: int = 256
    """Triggers longer than this (in tokens, counted as a prompt) are rejected (TRIGGER_TOO_LONG); the
    compiler reads a long trigger's last ``compile.trigger_window`` tokens (64)."""
    check_users_per_chunk: int = 2
    """Users of each compiled chunk whose deltas are checked for locality and isolation on real
    forwards before anything is published (engram_core.verify.check_invariants); 0 turns it off."""
    job_id: str | None = None
    compact_after_layers: int = 8
    """A shard holds at most this many layers over its base: the night that would add one more
    writes a new base instead (the merged view; see README, Layers and compaction)."""
    compact_layer_share: float = 0.5
    """...or once its layers weigh more than this share of its base's bytes."""
    compile: dict = field(default_factory=dict)
    """Overrides of engram_core.compiler.CompileOptions (steps, lr, facts_per_batch, ...)."""

    def __post_init__(self) -> None:
        for name in ("store", "fact_log", "model"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise SpecError(f"job spec: field '{name}' must be a non-empty string")
        from versions.store import BadStoreURI, parse_store_uri, unexpanded_variable

        try:  # s3:// without a bucket, a prefix with an empty segment, ...: refused here, not by the night
            parse_store_uri(self.store)
        except BadStoreURI as exc:
            raise SpecError(f"job spec: field 'store': {exc}") from None
        for name in ("fact_log", "model"):  # ``$HOME/log`` read as written named a folder '$HOME' under the cwd
            if problem := unexpanded_variable(getattr(self, name), name):
                raise SpecError(f"job spec: field {name!r}: {problem}")
        try:  # before the type check: a bare number (``max_file_age: 30``) is told its missing unit
            self.max_file_age_ns()
        except ValueError as exc:
            raise SpecError(f"job spec: field {exc}") from None
        for f in fields(self):  # YAML reads yes/no as booleans and 20261130 as an int: refuse them where they do not belong
            _check_field_type(f.name, f.type, getattr(self, f.name))
        if self.num_shards is not None and (not isinstance(self.num_shards, int) or self.num_shards < 1):
            raise SpecError(f"job spec: field 'num_shards' must be a positive int or null, got {self.num_shards!r}")
        if self.num_shards is not None and self.num_shards > MAX_SHARDS:
            raise SpecError(f"job spec: field 'num_shards' is {self.num_shards:,}, over the {MAX_SHARDS:,} shards a store "
                            "may have (each shard is a task and objects per version; a few hundred serve millions of "
                            "users); give a number from 1 to 65,536")
        if not isinstance(self.batches_per_chunk, int) or self.batches_per_chunk < 1:
            raise SpecError(f"job spec: field 'batches_per_chunk' must be a positive int, got {self.batches_per_chunk!r}")
        if not isinstance(self.min_chunks, int) or isinstance(self.min_chunks, bool) or self.min_chunks < 1:
            raise SpecError(f"job spec: field 'min_chunks' must be a positive int, got {self.min_chunks!r}")
        if self.apply_in_flight is not None and (not isinstance(self.apply_in_flight, int)
                                                 or isinstance(self.apply_in_flight, bool) or self.apply_in_flight < 1):
            raise SpecError(f"job spec: field 'apply_in_flight' must be a positive int or null (by the night's rows), "
                            f"got {self.apply_in_flight!r}")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise SpecError(f"job spec: field 'workers' must be an int >= 0, got {self.workers!r}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise SpecError(f"job spec: field 'gpus_per_worker' must be 0 or more (or null: 1 where the cluster has "
                            f"GPUs), got {self.gpus_per_worker!r}")
        if self.on_bad_file not in ("raise", "reject"):
            raise SpecError(f"job spec: field 'on_bad_file' must be 'raise' or 'reject', got {self.on_bad_file!r}")
        if not isinstance(self.max_trigger_tokens, int) or self.max_trigger_tokens < 1:
            raise SpecError("job spec: field 'max_trigger_tokens' must be a positive int")
        if not isinstance(self.check_users_per_chunk, int) or self.check_users_per_chunk < 0:
            raise SpecError(f"job spec: field 'check_users_per_chunk' must be an int >= 0, got {self.check_users_per_chunk!r}")
        if not isinstance(self.compact_after_layers, int) or isinstance(self.compact_after_layers, bool) \
                or self.compact_after_layers < 1:
            raise SpecError(f"job spec: field 'compact_after_layers' must be a positive int (1: every change writes "
                            f"a new base), got {self.compact_after_layers!r}")
        if not isinstance(self.compact_layer_share, (int, float)) or isinstance(self.compact_layer_share, bool) \
                or not self.compact_layer_share > 0:
            raise SpecError(f"job spec: field 'compact_layer_share' must be a number above 0 (e.g. 0.5: compact once "
                            f"layers weigh half their base), got {self.compact_layer_share!r}")
        self.compile_options()  # validates the overrides
        for name in ("store", "model"):
            if _inside(getattr(self, name), self.fact_log):
                raise SpecError(f"job spec: field '{name}' ({getattr(self, name)}) is inside field 'fact_log' "
                                f"({self.fact_log}): a night would list its files as fact-log files (and fail on "
                                f"them, or with on_bad_file: reject, record them as rejects every night); keep the "
                                f"{name} outside the fact log's folder")
        if _inside(self.fact_log, self.store):
            raise SpecError(f"job spec: field 'fact_log' ({self.fact_log}) is inside field 'store' ({self.store}): "
                            "keep the fact log outside the store (forget, gc and rollback rewrite the store)")

    def max_file_age_ns(self) -> int | None:
        """``max_file_age`` in nanoseconds; None for ``'never'``. ValueError for a bad value."""
        return parse_max_file_age(self.max_file_age)

    def compile_options(self) -> CompileOptions:
        known = {f.name for f in fields(CompileOptions)}
        unknown = sorted(set(self.compile) - known)
        if unknown:
            raise SpecError(f"job spec: unknown key(s) {unknown} in 'compile'; known: {sorted(known)}")
        overrides = dict(self.compile)
        defaults = {f.name: f.default for f in fields(CompileOptions)}
        for key, value in overrides.items():
            _check_compile_value(key, value, defaults[key])
        overrides.setdefault("max_trigger_tokens", self.max_trigger_tokens)
        options = CompileOptions(**overrides)
        if options.stop_margin is not None and options.stop_margin < options.min_margin:
            raise SpecError(f"job spec: compile.stop_margin ({options.stop_margin}) must be at least compile.min_margin "
                            f"({options.min_margin}): steps stopped below it leave facts that verification fails")
        return options

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "job spec") -> "NightlySpec":
        if raw is None:  # an empty file, or comments alone (a spec not saved, a template not filled in)
            raise SpecError(f"{source}: holds no fields (an empty file?); give at least store, fact_log and model "
                            "(e.g. jobs/specs/nightly.example.yaml)")
        if not isinstance(raw, dict):
            raise SpecError(f"{source}: expected a mapping of fields (key: value lines), got "
                            f"{'a list' if isinstance(raw, list) else repr(raw)[:60]}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise SpecError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        missing = sorted(k for k in ("store", "fact_log", "model") if k not in raw)
        if missing:
            raise SpecError(f"{source}: missing required key(s) {missing}")
        return cls(**raw)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> "NightlySpec":
        try:
            raw = load_yaml(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SpecError(f"job spec {path}: file not found") from None
        except IsADirectoryError:
            raise SpecError(f"job spec {path}: is a directory; give the spec's YAML file "
                            "(e.g. jobs/specs/nightly.example.yaml)") from None
        except UnicodeDecodeError as exc:
            raise SpecError(f"job spec {path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset "
                            f"{exc.start}); save the spec as UTF-8 YAML") from None
        except OSError as exc:  # permission denied, a folder above it that is a file, ...
            raise SpecError(f"job spec {path}: cannot read it ({exc.strerror or exc}); check the path and "
                            "its permissions") from None
        except yaml.YAMLError as exc:
            raise SpecError(f"job spec {path}: not valid YAML ({_yaml_problem(exc)}); fix the file "
                            "(e.g. jobs/specs/nightly.example.yaml)") from None
        return cls.from_dict(raw, source=f"job spec {path}")


def _location(path: str) -> str:
    """A store, model or fact-log location compared as a path: ``scheme://bucket/prefix`` or an
    absolute local path with its links resolved, without a trailing slash."""
    if "://" in path and not path.startswith("file://"):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.strip('/')}"
    return os.path.realpath(path.removeprefix("file://"))


def _inside(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or lies under it."""
    inner, outer = _location(path), _location(folder)
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a mapping holding one key twice (plain YAML keeps the last, so a
    spec with ``workers: 0`` and later ``workers: 3``, or two ``store:`` lines, would silently run
    on the other one)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (keep one)", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parser's error in one line: what is wrong and where (``line 2, column 1: expected ',' or
    ']', but got '<stream end>' (while parsing a flow sequence from line 1, column 8)``)."""
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if mark is None or not problem:
        return " ".join(str(exc).split())
    said = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context:
        said += f" ({context}{f' from line {context_mark.line + 1}, column {context_mark.column + 1}' if context_mark else ''})"
    return said


def load_yaml(text: str):
    """``yaml.safe_load`` that refuses duplicate keys (yaml.YAMLError naming the key and line)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


_KINDS = {
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an int"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v), "a finite number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "dict": (lambda v: isinstance(v, dict), "a mapping"),
}


def _check_field_type(name: str, annotation: str, value) -> None:
    """Refuse a value whose type is not the field's (``int | None``: a whole number or null; a YAML
    ``yes`` is a boolean, not a count; a quoted 'false' is a string, not false)."""
    kinds = [k.strip() for k in str(annotation).split("|")]
    if "None" in kinds and value is None:
        return
    checks = [_KINDS[k] for k in kinds if k in _KINDS]
    if checks and not any(check(value) for check, _ in checks):
        wanted = " or ".join([what for _, what in checks] + (["null"] if "None" in kinds else []))
        raise SpecError(f"job spec: field '{name}' must be {wanted}, got {value!r} ({type(value).__name__})")


# CompileOptions fields that must be at least 1 (a count of steps, facts or tokens).
_POSITIVE_COMPILE_FIELDS = ("steps", "facts_per_batch", "max_rounds", "max_trigger_tokens", "max_answer_tokens",
                            "prefix_groups", "trigger_window")
# CompileOptions fields that are a text or None (context_text: the context copies' text).
_TEXT_COMPILE_FIELDS = ("context_text",)
# CompileOptions fields that are a number or null (off) by default.
_OPTIONAL_NUMBER_COMPILE_FIELDS = ("stop_margin",)
# CompileOptions fields whose documented automatic setting is -1 (tokenize_workers: min(8, cores // 2) on a GPU).
_AUTOMATIC_COMPILE_FIELDS = ("tokenize_workers",)


def _check_compile_value(key: str, value, default) -> None:
    """Refuse a 'compile' override whose type is not its CompileOptions default's (a bool for a
    switch, an int for a count, a number for a rate), or a count below 1, before any work."""
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, kind = isinstance(value, int) and not isinstance(value, bool), "an int"
    elif isinstance(default, float):
        ok, kind = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                    "a finite number")
    elif key in _OPTIONAL_NUMBER_COMPILE_FIELDS:
        ok, kind = (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                      and math.isfinite(value)), "a finite number or null (off)")
    elif key in _TEXT_COMPILE_FIELDS:
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise SpecError(f"job spec: compile.{key} must be a non-empty string (or null for the default), got {value!r}")
        return
    else:
        return  # optional settings (None by default) are checked where they are used
    if not ok:
        raise SpecError(f"job spec: compile.{key} must be {kind}, got {value!r}")
    if key in _POSITIVE_COMPILE_FIELDS and value < 1:
        raise SpecError(f"job spec: compile.{key} must be at least 1, got {value!r}")
    if key in _AUTOMATIC_COMPILE_FIELDS and value < -1:
        raise SpecError(f"job spec: compile.{key} must be -1 (automatic) or more, got {value!r}")
    if key not in _AUTOMATIC_COMPILE_FIELDS and isinstance(value, (int, float)) and not isinstance(value, bool) \
            and value < 0:
        raise SpecError(f"job spec: compile.{key} must not be negative, got {value!r}")
