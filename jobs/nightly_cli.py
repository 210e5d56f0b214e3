"""`engram demo | run nightly | versions | rollback | stats`: the job and the operator's verbs."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import NoReturn

import typer

from jobs.errors import BAD_REQUEST_ERRORS, exit_code, one_line  # noqa: F401 - the commands import them from here
from jobs.spec import NightlySpec, SpecError

run_app = typer.Typer(help="Run a job here (local Ray cluster unless the spec names an address).", no_args_is_help=True)

STORE_HELP = "Store: a local directory or s3://bucket/prefix."


def _fail(message: str, code: int = 1) -> NoReturn:
    """One clear line and a non-zero exit: 2 for a bad spec or argument, 1 for a run that failed."""
    typer.echo(f"error: {one_line(message)}", err=True)
    raise typer.Exit(code=code)


def seconds_option(value: float, name: str, *, zero: bool = False) -> float:
    """A duration or timeout option (a typer callback): finite, and above 0 (at least 0 where
    ``zero``). NaN or inf would busy-poll the store, stop a thread or never time out."""
    import math

    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise typer.BadParameter(f"must be a finite number {'of at least 0' if zero else 'above 0'}, got {value}",
                                 param_hint=name)
    return value


def text_option(value: str, name: str) -> str:
    """A text option that must say something (a typer callback): ``--reason ""`` is refused, as the
    audit record it goes into needs one."""
    if not value.strip():
        raise typer.BadParameter("must not be empty (it goes into the audit log); say why, e.g. --reason \"ticket "
                                 "123\"", param_hint=name)
    return value


JSON_FAILURE_KEYS = {"run": "published", "demo": "published", "compact": "published", "versions": "listed",
                     "rollback": "rolled_back", "stats": "queried", "forget": "forgotten", "gc": "collected",
                     "pull": "pulled", "ask": "answered", "submit": "submitted", "schedule": "scheduled",
                     "model": "inspected"}
"""Per command (the first word after ``engram``), the key of its ``--json`` failure object:
``{key: false, "error": ..., "exit_code": ...}``. :func:`jobs.cli.run` uses it for an error that
escapes a command."""


def fail_json(as_json: bool, message: str, code: int = 1, what: str = "published") -> NoReturn:
    """:func:`_fail`; with ``--json`` stdout also gets ``{what: false, "error": ..., "exit_code": ...}``
    (``what`` from :data:`JSON_FAILURE_KEYS`), so a script that parses stdout always gets one JSON
    object, and every failure object holds ``error`` and ``exit_code``."""
    message = one_line(message)
    if as_json:
        typer.echo(json.dumps({what: False, "error": message, "exit_code": code}))
    _fail(message, code=code)


def actor() -> str:
    """Who runs the command, for audit records; "unknown" where the system cannot say (a container
    user without a passwd entry, no LOGNAME)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def text_argument_problem(value: str, what: str) -> str | None:
    """None where the command-line text ``value`` is Unicode; else one line naming ``what`` (``--user
    'u\\udcff'``) and where its bytes stop being UTF-8 (Python keeps such bytes as lone surrogates,
    which no id or prompt the store holds can contain: ingest rejects text that is not UTF-8)."""
    from engram_core.text import unpaired_surrogate

    at = unpaired_surrogate(value)
    if at is None:
        return None
    code = ord(value[at])
    byte = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
    return (f"{what} {ascii(value)} is not UTF-8 text ({byte} at character {at}); "
            "give it as UTF-8 (check the shell's or the script's encoding)")


def directory_problem(path: Path | str, what: str) -> str | None:
    """None where ``path`` is a directory this process can write in, or can be made one; else the
    one line that says why not (it, or a folder above it, is a file; it, or the folder it would be
    made in, is not writable, it holds an environment variable nothing expanded), naming the path and
    the fix. Creates nothing."""
    import os

    from versions.store import unexpanded_variable

    if problem := unexpanded_variable(str(path), what):
        return problem
    path = Path(path).expanduser()
    for part in (path, *path.parents):
        try:
            exists = part.exists()
        except PermissionError:  # a folder above it cannot be entered by this user
            return (f"{what} {path} cannot be reached (permission denied for this user on a folder above it); give "
                    "a directory it can write, or fix the permissions")
        if exists:
            if part.is_dir():
                if os.access(part, os.W_OK | os.X_OK):
                    return None
                where = "is not writable" if part == path else f"cannot be made: {part} is not writable"
                return (f"{what} {path} {where} (permission denied for this user); give a directory it can "
                        "write, or fix the permissions")
            where = "is a file" if part == path else f"is inside {part}, which is a file"
            return f"{what} {path} {where}, not a directory; give a directory (a new one is created)"
    return None


CHECKPOINT_PARTS = ("base", "tokenizer", "engram")
"""The folders of a checkpoint directory (engram_core.checkpoint); one of them at least."""


def checkpoint_problem(path: Path | str, what: str, missing: str = "no such file or directory",
                       complete: bool = False) -> str | None:
    """None where ``path`` is a directory holding a checkpoint's folders (``base/``, ``tokenizer/``,
    ``engram/``; a checkpoint missing some is a damaged one, reported when it is read); else the one
    line that says why it is no checkpoint (not there, a file, a folder of something else), naming
    ``what`` (``--model PATH``, ``model PATH``, ...) and what to give instead. ``complete``: also
    the files a load needs (:func:`engram_core.fingerprint.check_checkpoint_files`: an incomplete
    copy or an interrupted build). Reads no file."""
    from versions.store import unexpanded_variable

    if problem := unexpanded_variable(str(path), what.split(" ", 1)[0]):
        return problem
    path = Path(path).expanduser() if "://" not in str(path) else None  # Path would read s3://b/m as s3:/b/m
    try:
        found = path is not None and path.exists()
    except PermissionError:
        found = None
    if path is None:
        why = "a URI, not a local path (a checkpoint is read from a local directory: copy it there first)"
    elif found is None:
        why = "cannot be reached (permission denied for this user on a folder above it)"
    elif not found:
        why = missing
    elif not path.is_dir():
        why = "is a file, not a checkpoint directory"
    elif not any((path / part).is_dir() for part in CHECKPOINT_PARTS):
        why = "not a checkpoint (it has none of base/, tokenizer/, engram/)"
    elif complete:
        from engram_core.fingerprint import CheckpointError, check_checkpoint_files

        try:
            check_checkpoint_files(path)
        except CheckpointError as err:
            return f"{what}: {str(err).removeprefix(f'checkpoint {path}: ')}"
        return None
    else:
        return None
    return (f"{what}: {why}; give a checkpoint's directory (base/, tokenizer/, engram/, adapter/; "
            "engram model init DIR --tiny makes one)")


def store_problem(uri: str, what: str = "store") -> str | None:
    """The one line that says why ``uri`` names no store (versions.store.parse_store_uri), or for a
    local one :func:`directory_problem`; None where it is fine. Opens and creates nothing."""
    from versions.store import BadStoreURI, parse_store_uri

    try:
        kind, location, _ = parse_store_uri(uri)
    except BadStoreURI as exc:
        return str(exc)
    return directory_problem(location, what) if kind == "local" else None


def _print(obj, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(obj, default=str) if as_json else text)


def _run(spec: NightlySpec, as_json: bool):
    import os

    from jobs.nightly import run_nightly

    # The night reads every task result it uses and reports the first failure in one line; once it
    # has failed, the tasks it abandons would each print Ray's "Unhandled error" traceback as the
    # driver exits. An operator's own setting wins.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    report = run_nightly(spec, progress=not as_json and sys.stderr.isatty())
    return report


@run_app.command("nightly")
def run_nightly_cmd(
    spec_file: Path = typer.Option(None, "--spec", help="YAML job spec (see jobs/specs/nightly.example.yaml)."),
    store: str = typer.Option(None, help=STORE_HELP),
    fact_log: str = typer.Option(None, "--fact-log", help="Parquet file, folder or s3:// prefix of the fact log."),
    model: str = typer.Option(None, help="Checkpoint directory."),
    num_shards: int = typer.Option(None, "--num-shards",
                                   help="Shards (default: the store's; 16 for a new store). Another number moves every user."),
    workers: int = typer.Option(None, help="Ray compile workers (0 = the whole night in this process, no Ray)."),
    on_bad_file: str = typer.Option(None, "--on-bad-file", help="'raise' (stop at an unreadable log file) or 'reject'."),
    max_file_age: str = typer.Option(None, "--max-file-age",
                                     help="The ingest ledger's window, e.g. 30d, 36h (default never: keep every file): log "
                                          "files modified longer than this before the newest ingested one leave the "
                                          "ledger, and such a file not in it is not read (warned)."),
    ray_address: str = typer.Option(None, "--ray-address", help="A Ray cluster to run on (e.g. auto, ray://head:10001)."),
    recompile_all: bool = typer.Option(False, "--recompile-all", help="Recompile every user (e.g. after a model change)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Run the nightly compile job. Example: engram run nightly --spec jobs/specs/nightly.example.yaml"""
    try:
        raw = NightlySpec.load(spec_file).to_dict() if spec_file else {}
        flags = {"store": store, "fact_log": fact_log, "model": model, "num_shards": num_shards, "workers": workers,
                 "on_bad_file": on_bad_file, "max_file_age": max_file_age, "ray_address": ray_address}
        raw.update({k: v for k, v in flags.items() if v is not None})
        if recompile_all:
            raw["recompile_all"] = True
        missing = [f"--{key.replace('_', '-')}" for key in ("store", "fact_log", "model") if key not in raw]
        if not spec_file and missing:  # named as the flags to type, not as the spec's keys
            fail_json(as_json, f"run nightly: missing {', '.join(missing)}; give --spec FILE (e.g. "
                               "jobs/specs/nightly.example.yaml), or --store, --fact-log and --model", code=2)
        spec = NightlySpec.from_dict(raw, source=f"job spec {spec_file}" if spec_file else "flags")
    except SpecError as exc:
        fail_json(as_json, str(exc), code=2)
    # a local path that is not there, or a model path that holds no checkpoint: a bad argument, before any work
    if "://" not in spec.fact_log and not Path(spec.fact_log).exists():
        from pipeline.ingest import glob_hint

        fail_json(as_json, f"fact_log {spec.fact_log}: no such file or directory{glob_hint(spec.fact_log)}", code=2)
    problem = store_problem(spec.store)  # a store path that is a file: refused before any work too
    if problem:
        fail_json(as_json, problem, code=2)
    problem = checkpoint_problem(spec.model, f"model {spec.model}", complete=True)
    if problem:
        fail_json(as_json, problem, code=2)
    try:
        report = _run(spec, as_json)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary: one clear line, non-zero exit
        fail_json(as_json, f"{type(exc).__name__}: {exc}", code=exit_code(exc))  # 2: an unreachable ray_address
    text = (f"published v{report.version}" if report.published else f"nothing changed; v{report.version} stays current"
            if report.version is not None else "nothing to publish (the new log files hold no rows); no version yet")
    if report.rejected_files and not report.published:
        text = text.replace(" (the new log files hold no rows)", " (no rows read from the new log files)")
    text += (f": {report.users} users, {report.facts} facts; compiled {report.compiled_users} users "
             f"({report.facts_ok} facts ok, {report.facts_failed} failed), carried {report.carried_users}, "
             f"dropped {report.dropped_users}; {report.rejects} rejected rows")
    if report.scopes or report.compiled_scopes:
        text += f"; {report.scopes} shared scopes ({report.scope_members} members), {report.compiled_scopes} compiled"
    if report.rejected_files:
        text += (f"\n{len(report.rejected_files)} log file(s) rejected whole (not ingested; read again by the next night"
                 + ("; in this version's rejects table" if report.published else "") + "):")
        text += "".join(f"\n  {f['path']}: {f['reason']}: {f['detail']}" for f in report.rejected_files)
    if report.skipped_files:
        text += f"\n{len(report.skipped_files)} file(s) in the log are no data files, skipped:"
        text += "".join(f"\n  {f['path']}: {f['detail']}" for f in report.skipped_files)
    _print(report.to_dict(), as_json, text)


def demo(
    store: str = typer.Option("./engram-demo/store", help=STORE_HELP),
    users: int = typer.Option(200, help="Synthetic users in the fact log."),
    workdir: Path = typer.Option(Path("./engram-demo"), help="Where the tiny model and the fact log go."),
    workers: int = typer.Option(2, help="Ray compile workers."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Make a tiny model and a synthetic fact log, run the nightly job on local Ray, show answers.

    Example: engram demo --users 200
    """
    from engram_core.tiny import init_tiny
    from jobs.synthetic import fact_log_rows, write_fact_log

    if users < 1:
        fail_json(as_json, "--users must be at least 1", 2)
    for problem in (directory_problem(workdir, "--workdir"), store_problem(store, "--store")):
        if problem:
            fail_json(as_json, problem, 2)
    model_dir = workdir / "model"
    try:  # a bad --workers: refused before anything is written
        spec = NightlySpec(store=store, fact_log=str(workdir / "fact_log"), model=str(model_dir), num_shards=8,
                           workers=workers, job_id=None)
    except SpecError as exc:
        fail_json(as_json, str(exc), exit_code(exc))
    if not (model_dir / "engram" / "config.json").exists():
        init_tiny(model_dir)
    log_file = workdir / "fact_log" / "day=2026-11-01" / f"users-{users}.parquet"
    if not log_file.exists():
        write_fact_log(fact_log_rows(users), log_file)
    try:
        report = _run(spec, as_json)
    except Exception as exc:  # noqa: BLE001
        fail_json(as_json, f"{type(exc).__name__}: {exc}", exit_code(exc))
    answers = _answer_sample(store, str(model_dir), report.sample)
    out = {"version": report.version, "published": report.published, "users": report.users, "facts": report.facts,
           "facts_ok": report.facts_ok, "facts_failed": report.facts_failed, "rejects": report.rejects,
           "seconds": report.seconds, "sample": answers, "store": report.store}
    lines = [
        (f"published v{report.version}" if report.published else f"nothing new; v{report.version} is current"
         if report.version is not None else "nothing to publish; no version yet")
        + f" to {report.store}: {report.users} users, {report.facts} facts "
        f"({report.facts_ok} compiled ok, {report.facts_failed} failed this run), {report.rejects} rejected rows",
        "seconds per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in report.seconds.items()),
        "answers from the published bundle (tiny random model: only the remembered answer is meaningful):",
    ] + [f"  {a['user_id']}: {a['trigger']!r} -> {a['with_memory']!r} "
         f"({'recalled' if a['recalled'] else 'NOT recalled'}; without memory: {a['without_memory']!r})" for a in answers]
    _print(out, as_json, "\n".join(lines))


def _answer_sample(store_uri: str, model_dir: str, sample: list[dict]) -> list[dict]:
    """Answer a few published users' triggers with their delta read back from the store."""
    from engram_core.checkpoint import load_checkpoint
    from engram_core.serving import generate
    from schemas.bundle import bundle_deltas
    from versions.catalog import load_shard_bundle, read_current
    from versions.layout import shard_of
    from versions.store import open_store

    store = open_store(store_uri)
    current = read_current(store)
    if current is None:
        return []
    manifest = current[0]
    if not sample:  # nothing compiled this run: answer from the state of a published shard
        sample = _published_sample(store, manifest)
    em = load_checkpoint(model_dir)
    deltas = []
    for item in sample:
        entry = manifest.shards[shard_of(item["user_id"], manifest.num_shards)]
        deltas.append(bundle_deltas(load_shard_bundle(store, entry)).get(item["user_id"]))
    prompts = [s["trigger"] for s in sample]
    new_tokens = max(len(em.encode_answer(s["answer"])) for s in sample) + 4  # the whole answer, then a little
    # as engram ask answers: up to the memory's last token (engram_core.serving.MemoryEnd), no run-on after it
    with_memory = generate(em, prompts, [[d] if d is not None else [] for d in deltas], max_new_tokens=new_tokens,
                           stop_at_memory_end=True)
    without = generate(em, prompts, None, max_new_tokens=new_tokens)
    return [dict(s, with_memory=w, without_memory=b, recalled=w.startswith(s["answer"]))
            for s, w, b in zip(sample, with_memory, without)]


def _published_sample(store, manifest, n: int = 5) -> list[dict]:
    from versions.catalog import load_shard_state

    for entry in manifest.shards:
        state = load_shard_state(store, entry)
        if state.num_rows:
            rows = state.select(["user_id", "trigger", "answer"]).slice(0, n).to_pylist()
            return rows
    return []


def versions(store: str = typer.Option(..., help=STORE_HELP),
             as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List published versions. Example: engram versions --store ./engram-demo/store"""
    from versions.catalog import damaged_manifests, list_versions
    from versions.errors import NOT_A_STORE_HINT, PublishError
    from versions.store import StoreError, open_store

    try:
        the_store = open_store(store, create=False)
        pointer_damaged = False
        try:
            infos = list_versions(the_store)
        except (PublishError, ValueError) as exc:  # a damaged CURRENT: list what a rollback can go to
            typer.echo(f"error: CURRENT is damaged ({exc}); listing the intact versions, none current "
                       "(engram rollback --to N makes one current)", err=True)
            infos = list_versions(the_store, pointer=None)
            pointer_damaged = True
        damaged = damaged_manifests(the_store)
    except (StoreError, PublishError, ValueError) as exc:
        fail_json(as_json, str(exc), exit_code(exc), "listed")
    for version, why in sorted(damaged.items()):  # e.g. a broken layer chain: never listed, never served
        typer.echo(f"error: v{version} refused: {why}", err=True)
    rows = [{"version": i.version, "current": i.current, "created_at": i.created_at, "parent": i.parent,
             "users": i.users, "facts": i.facts, "bytes": i.bytes} for i in infos]
    text = "\n".join(f"{'*' if r['current'] else ' '} v{r['version']:<4} {r['created_at']}  parent {r['parent'] or '-':<4} "
                     f"users {r['users']:<7} facts {r['facts']:<8} bytes {r['bytes']}" for r in rows) or (
        f"no versions: nothing is published at {the_store.uri} {NOT_A_STORE_HINT}; a night publishes the first")
    _print(rows, as_json, text)
    if pointer_damaged:  # listed for choosing a rollback target; still a store that needs repair
        raise typer.Exit(code=1)


def _version_number(value: str) -> int:
    """``--to``'s version: ``3`` or ``v3`` (as ``engram versions`` prints it); a usage error (exit 2)
    naming the value and the forms otherwise."""
    text = value.strip() if isinstance(value, str) else str(value)
    digits = text[1:] if text[:1] in ("v", "V") else text
    if not digits.isascii() or not digits.isdigit():
        raise typer.BadParameter(f"{value!r}: give a version number, e.g. 3 or v3 (engram versions lists them)")
    return int(digits)


def rollback(store: str = typer.Option(..., help=STORE_HELP),
             to: str = typer.Option(..., "--to", help="Version to make current (older or newer): 3, or v3 as "
                                                           "'engram versions' prints it.", callback=lambda v: _version_number(v)),
             reason: str = typer.Option("manual rollback", help="Why (recorded in the audit log).",
                                        callback=lambda v: text_option(v, "--reason")),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Move CURRENT to a retained version, atomically, with an audit record. Example: engram rollback --store S --to 3"""
    from versions.catalog import read_current
    from versions.errors import PublishError
    from versions.rollback import rollback as do_rollback
    from versions.store import StoreError, open_store

    try:
        the_store = open_store(store, create=False)
        try:
            before = read_current(the_store)
        except (PublishError, ValueError):  # a damaged CURRENT or current manifest: rolling back is its remedy
            before = None
        manifest = do_rollback(the_store, to, reason=reason, actor=actor())
    except (PublishError, StoreError, ValueError) as exc:
        fail_json(as_json, str(exc), exit_code(exc), "rolled_back")
    from versions.rollback import files_read_again

    previous = before[0].version if before else None
    again = files_read_again(before[0] if before else None, manifest)
    text = f"CURRENT: {f'v{previous}' if previous else 'unreadable'} -> v{manifest.version}"
    if again:  # the watermark moved back with CURRENT: the next night ingests these files again
        text += (f"\nthe next night reads these {len(again)} log file(s) again (v{manifest.version}'s watermark does "
                 "not hold them as they are now recorded); to keep their rows out, move them out of the fact log "
                 "(or correct them) before it runs:\n" + "\n".join(f"  {path}" for path in again))
    _print({"rolled_back": True, "from": previous, "to": manifest.version, "reread_files": again}, as_json, text)


def stats(sql: str = typer.Argument(..., help="SQL over views facts, users, shards, collisions, rejects, runs, checks."),
          store: str = typer.Option(..., help=STORE_HELP),
          as_json: bool = typer.Option(False, "--json", help="Print result rows as JSON objects.")) -> None:
    """Query per-version stats in DuckDB. Example: engram stats --store S "select status, count(*) from facts group by 1" """
    from pipeline.stats import StatsQueryError, query_stats
    from versions.store import StoreError, open_store

    from versions.errors import PublishError

    try:
        table = query_stats(open_store(store, create=False), sql, require_published=True)
        if table.num_columns == 0:  # no result set (a CREATE, SET, ... last): not "(0 rows)"
            message = ("the query's last statement returned no result set (it is not a SELECT); end the query with a "
                       "SELECT to get rows")
            typer.echo(json.dumps({"queried": True, "result_set": False, "rows": None, "message": message})
                       if as_json else message)
            return
        text = _stats_text(table, as_json)
    except (StatsQueryError, StoreError, PublishError) as exc:
        fail_json(as_json, str(exc), exit_code(exc), "queried")
    typer.echo(text)


def _stats_text(table, as_json: bool) -> str:
    """The result as JSON or a text table; StatsQueryError naming the column where a value is a date
    or time Python cannot hold (before year 1 or after 9999, DuckDB's infinity): the query's to change."""
    from pipeline.stats import StatsQueryError, format_table, rows_as_json

    try:
        return rows_as_json(table) if as_json else format_table(table)
    except OverflowError:
        pass
    for i, name in enumerate(table.column_names):
        try:
            table.column(i).to_pylist()
        except OverflowError as exc:
            quoted = name.replace('"', '""')
            raise StatsQueryError(
                f"stats query: column {name!r} holds a date or time outside years 1-9999 (or infinity), which "
                f"cannot be printed ({exc}); select it as text, e.g. CAST(\"{quoted}\" AS VARCHAR), or filter "
                "those rows out") from None
    raise StatsQueryError("stats query: a value of the result is a date or time outside years 1-9999 (or "
                          "infinity), which cannot be printed; select it as text (CAST(... AS VARCHAR))")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.add_typer(run_app, name="run")
    app.command("versions")(versions)
    app.command("rollback")(rollback)
    app.command("stats")(stats)
