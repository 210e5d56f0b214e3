"""`engram forget` and `engram gc`: the operator's erasure and retention verbs."""

from __future__ import annotations

import json
import shlex

import typer

from jobs.nightly_cli import actor as _actor
from jobs.nightly_cli import exit_code, fail_json, text_option


def forget(
    users: list[str] = typer.Argument(..., metavar="USER...", help="user_id(s) to forget (all in one rewrite)."),
    store: str = typer.Option(..., "--store", help="Store URI: a local path or s3://bucket/prefix."),
    reason: str = typer.Option("erasure request", "--reason", help="Why (goes into the audit log).",
                               callback=lambda v: text_option(v, "--reason")),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (every user's report under users)."),
) -> None:
    """Erase users from every retained version, for good, in one new version. Example: engram forget --store s3://b/engram user-42 user-43 --reason "ticket 7" """
    from versions.errors import PublishError
    from versions.forget import forget_users
    from versions.store import StoreError, open_store

    try:
        target = open_store(store, create=False)
    except StoreError as err:
        fail_json(as_json, str(err), exit_code(err), "forgotten")

    from jobs.nightly_cli import text_argument_problem

    # every id is checked before anything is rewritten: one bad id refuses the whole command
    problem = next(filter(None, (text_argument_problem(u, "user id") for u in users)), None)
    if problem:
        fail_json(as_json, problem + "; nothing was forgotten", 2, "forgotten")
    from versions.forget import forget_id_problem

    problem = next(filter(None, map(forget_id_problem, users)), None)  # empty once invisible characters go
    if problem:
        fail_json(as_json, f"{problem}; nothing was forgotten", 2, "forgotten")
    before = _current_version(target)
    try:
        report = forget_users(target, users, actor=_actor(), reason=reason)
    except (PublishError, StoreError) as err:
        fail_json(as_json, f"{err}{_forget_failure_state(target, before, users)}", exit_code(err), "forgotten")
    per_user = _forget_per_user(report, users)
    from pipeline.stats import stored_in_other_case

    other_case = stored_in_other_case(target, [u for u, e in zip(users, per_user) if not e["found"]])
    for user, entry in zip(users, per_user):
        entry["stored_in_other_case"] = len(other_case.get(user, ()))
        for stored in other_case.get(user, ()):
            typer.echo(f"note: {user!r} is not stored, but {stored!r} is: it differs only in case (ids are case-"
                       f"sensitive and never folded); if it is the same person, forget it too: engram forget "
                       f"--store {shlex.quote(str(store))} {shlex.quote(stored)}", err=True)
    if as_json:
        typer.echo(json.dumps({"forgotten": True, **report.to_dict(), "users": per_user}, sort_keys=True))
        return
    if len(users) == 1:
        typer.echo(f"{users[0]}: {report.message}")
    else:
        for user, entry in zip(users, per_user):
            typer.echo(f"{user}: {entry['message']}")
        typer.echo(report.message)
    if report.rewritten:
        moves = ", ".join(f"v{a}->v{b}" for a, b in sorted(report.rewritten.items()))
        typer.echo(f"  rewrote {moves}; deleted {len(report.deleted_objects)} object(s)")
        who = "this user's" if len(set(report.user_hashes)) == 1 else "these users'"
        typer.echo(f"  later nights refuse {who} events stamped up to {report.refused_until} "
                   "(FORGOTTEN_USER: the forget's time plus the day of clock skew ingest accepts); "
                   "events after it are the id writing again")


def _current_version(target) -> int | None:
    """CURRENT's version, None where nothing is published or it cannot be read (forget then says why)."""
    from versions.catalog import read_pointer
    from versions.errors import PublishError
    from versions.store import StoreError

    try:
        pointer = read_pointer(target)
    except (StoreError, PublishError, ValueError, OSError):
        return None
    return pointer.version if pointer is not None else None


def _forget_failure_state(target, before: int | None, users: list[str]) -> str:
    """What a failed ``engram forget`` left, for its error line ("; ..."; "" on a store with nothing
    published, whose error says it all): all its users are forgotten in one rewrite, so either CURRENT
    carries every one's forget (the failure came after the compare-and-swap, while deleting old
    objects) or none of them is forgotten."""
    from engram_core.text import canonical_id
    from versions.catalog import read_manifest, read_pointer
    from versions.errors import PublishError
    from versions.layout import forgotten_id
    from versions.store import StoreError

    try:
        pointer = read_pointer(target)
        if pointer is None:
            return ""
        recorded = pointer.version != before and \
            {forgotten_id(canonical_id(u)) for u in users} <= set(read_manifest(target, pointer.version).forgotten)
    except (StoreError, PublishError, ValueError, OSError):  # the store is failing: say what is known
        return "; whether CURRENT moved is unknown (the store could not be read): run the same forget again"
    if recorded:
        return (f"; the forget of every user given is recorded in v{pointer.version} (CURRENT), but old objects may "
                "still hold them: run the same forget again to finish deleting them")
    return "; nothing was forgotten (CURRENT did not move): run the same forget again"


def _forget_per_user(report, users: list[str]) -> list[dict]:
    """Per user given (argument order; a repeated id repeats its entry): its hash, whether a retained
    version held it (``found``), until when later nights refuse its events (``refused_until``: set
    where this forget recorded it, or where CURRENT already held its forget), CURRENT after the forget
    and one line. Hashes only, never the ids."""
    from engram_core.text import canonical_id
    from versions.layout import forgotten_id

    out = []
    for user in users:
        user_hash = forgotten_id(canonical_id(user))
        found = user_hash in report.found_hashes if len(set(report.user_hashes)) > 1 else report.found
        if found:
            message = "found and erased from every retained version"
        elif report.rewritten:
            message = ("not found in any retained version (no data of it is stored); the forget is recorded, so its "
                       "events up to the forget's time are refused (FORGOTTEN_USER) when they arrive")
        else:
            message = "not found in any retained version; its forget was already recorded" + (
                f" (its events up to {report.recorded_until[user_hash]} are refused)"
                if user_hash in report.recorded_until else "")
        out.append({"user_hash": user_hash, "user_hashes": [user_hash], "found": found,
                    "refused_until": report.refused_until if report.rewritten else report.recorded_until.get(user_hash),
                    "current_version": report.current_version, "message": message})
    return out


def gc(
    store: str = typer.Option(..., "--store", help="Store URI: a local path or s3://bucket/prefix."),
    keep: int = typer.Option(..., "--keep", help="Keep the newest N versions (CURRENT and newer are always kept)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be deleted; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Delete old versions and unreferenced objects. Example: engram gc --store s3://b/engram --keep 7 --dry-run"""
    from versions.errors import NOT_A_STORE_HINT
    from versions.retention import GcIncomplete, check_keep, collect
    from versions.store import StoreError, open_store

    try:
        check_keep(keep)
    except ValueError as err:  # --keep below 1: a bad argument
        fail_json(as_json, str(err), 2, "collected")
    try:
        report = collect(open_store(store, create=False), keep, dry_run=dry_run, actor=_actor())
    except GcIncomplete as err:  # a store problem part-way: say what is already gone
        if as_json:
            done = err.report
            typer.echo(json.dumps({"collected": False, "error": str(err), "exit_code": 1,
                                   "deleted_versions": done.deleted_versions, "deleted_objects": done.deleted_objects}))
        typer.echo(f"error: {err}", err=True)
        for key in err.report.deleted_objects:
            typer.echo(f"  deleted {key}", err=True)
        raise typer.Exit(code=1)
    except (StoreError, ValueError) as err:  # a damaged store (a manifest, Parquet, a store key): 1
        fail_json(as_json, str(err), exit_code(err), "collected")
    if as_json:
        typer.echo(json.dumps({"collected": True, **report.to_dict()}, sort_keys=True))
        return
    verb = "would delete" if dry_run else "deleted"
    typer.echo(f"kept versions {report.kept_versions}; {verb} versions {report.deleted_versions} "
               f"and {len(report.deleted_objects)} object(s)")
    if not report.kept_versions and not report.deleted_versions:  # a typo'd --store collects nothing, silently
        typer.echo(f"note: nothing is published at {store} {NOT_A_STORE_HINT}", err=True)
    if dry_run:
        for key in report.deleted_objects:
            typer.echo(f"  {key}")


def compact(
    store: str = typer.Option(..., "--store", help="Store URI: a local path or s3://bucket/prefix."),
    shards: str = typer.Option(None, "--shards", help="Shards to compact, e.g. 0-15 or 0-3,8 (default: every shard "
                                                      "with layers)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Write shards' layers into new bases, as a new version (what users are served does not change). Example: engram compact --store s3://b/engram --shards 0-3"""
    from jobs.compact import compact as do_compact
    from serving.pull import parse_shards
    from versions.errors import PublishError
    from versions.store import StoreError, open_store

    try:
        chosen = parse_shards(shards)
        report = do_compact(open_store(store, create=False), chosen)
    except ValueError as err:  # --shards, a bad store URI: 2; a damaged manifest, Parquet: a damaged store, 1
        fail_json(as_json, str(err), 2 if type(err) is ValueError else exit_code(err), "published")
    except (PublishError, StoreError) as err:
        fail_json(as_json, str(err), exit_code(err), "published")
    if as_json:
        typer.echo(json.dumps(report.to_dict(), sort_keys=True))
    elif report.published:
        said = [f"compacted shards {report.compacted_shards} ({report.layers_merged} layer(s) merged)"
                if report.compacted_shards else "no chosen shard has delta layers"]
        if report.state_only_shards:  # not compacted (the shards view agrees): only their fact state was
            said.append(f"merged the fact-state layers of shards {report.state_only_shards} (they have no delta "
                        "layers to compact)")
        typer.echo(f"{'; '.join(said)}; CURRENT is v{report.version}")
    else:
        typer.echo(f"no chosen shard has layers; v{report.version} stays current")


def register(app: typer.Typer) -> None:
    app.command("forget")(forget)
    app.command("gc")(gc)
    app.command("compact")(compact)
