"""`engram forget` and `engram gc`: the operator's erasure and retention verbs."""

from __future__ import annotations

import json

import typer

from jobs.nightly_cli import actor as _actor
from jobs.nightly_cli import exit_code, fail_json, text_option


def forget(
    users: list[str] = typer.Argument(..., metavar="USER...", help="user_id(s) to forget."),
    store: str = typer.Option(..., "--store", help="Store URI: a local path or s3://bucket/prefix."),
    reason: str = typer.Option("erasure request", "--reason", help="Why (goes into the audit log).",
                               callback=lambda v: text_option(v, "--reason")),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (every user's report under users)."),
) -> None:
    """Erase a user from every retained version, for good. Example: engram forget --store s3://b/engram user-42 --reason "ticket 7" """
    from versions.errors import PublishError
    from versions.forget import forget_user
    from versions.store import StoreError, open_store

    try:
        target = open_store(store, create=False)
    except StoreError as err:
        fail_json(as_json, str(err), exit_code(err), "forgotten")
    from engram_core.text import canonical_id

    from jobs.nightly_cli import text_argument_problem

    problem = next(filter(None, (text_argument_problem(u, "user id") for u in users)), None)
    if problem:
        fail_json(as_json, problem + "; nothing was forgotten", 2, "forgotten")
    empty = [u for u in users if not canonical_id(u)]
    if empty:
        fail_json(as_json, f"user id {empty[0]!r} is empty once invisible characters are removed; nothing was forgotten",
                  2, "forgotten")
    reports = []
    for user in users:
        try:
            report = forget_user(target, user, actor=_actor(), reason=reason)
        except (PublishError, StoreError) as err:  # the users before it are forgotten (printed); this one and the rest not
            if as_json and reports:  # one object: the failure, and what was done before it
                typer.echo(json.dumps({**_forget_summary(reports), "forgotten": False, "error": str(err),
                                       "exit_code": exit_code(err)}, sort_keys=True))
                as_json = False  # fail_json below: the error line on stderr only
            fail_json(as_json, str(err), exit_code(err), "forgotten")
        reports.append(report)
        if not as_json:
            typer.echo(f"{user}: {report.message}")
            if report.rewritten:
                moves = ", ".join(f"v{a}->v{b}" for a, b in sorted(report.rewritten.items()))
                typer.echo(f"  rewrote {moves}; deleted {len(report.deleted_objects)} object(s)")
                typer.echo(f"  later nights refuse this user's events stamped up to {report.refused_until} "
                           "(FORGOTTEN_USER: the forget's time plus the day of clock skew ingest accepts); "
                           "events after it are the id writing again")
    if as_json:
        typer.echo(json.dumps({"forgotten": True, **_forget_summary(reports)}, sort_keys=True))


def _forget_summary(reports: list) -> dict:
    """One object for the users of one ``engram forget --json`` (in argument order): ``users`` holds
    each one's report (versions.forget.ForgetReport.to_dict: hashes, never the raw ids); the top
    level sums them up (``found``: any was, ``current_version`` after the last, ``rewritten`` and
    ``deleted_objects`` of all, the latest ``refused_until``), and for one user is its report."""
    done = [r.to_dict() for r in reports]
    out = dict(done[0]) if len(done) == 1 else {
        "user_hashes": [h for d in done for h in d["user_hashes"]],
        "found": any(d["found"] for d in done),
        "current_version": done[-1]["current_version"] if done else None,
        "rewritten": {k: v for d in done for k, v in d["rewritten"].items()},
        "deleted_objects": [k for d in done for k in d["deleted_objects"]],
        "message": "; ".join(d["message"] for d in done),
        "refused_until": max((d["refused_until"] for d in done if d["refused_until"]), default=None),
    }
    out["users"] = done
    return out


def gc(
    store: str = typer.Option(..., "--store", help="Store URI: a local path or s3://bucket/prefix."),
    keep: int = typer.Option(..., "--keep", help="Keep the newest N versions (CURRENT and newer are always kept)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would be deleted; delete nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Delete old versions and unreferenced objects. Example: engram gc --store s3://b/engram --keep 7 --dry-run"""
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
