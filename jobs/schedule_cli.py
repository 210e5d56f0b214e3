"""`engram submit | schedule`: run the nightly job on a Ray cluster, or print a schedule that does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from jobs.nightly_cli import fail_json as _failed
from jobs.nightly_cli import seconds_option as _seconds
from jobs.schedule import FORMATS, ScheduleError, ScheduleOptions, SubmitError, local_paths, render_schedule, submit_spec
from jobs.spec import NightlySpec, SpecError

SPEC_HELP = "YAML job spec (see jobs/specs/nightly.example.yaml)."


def _load(spec_file: Path, as_json: bool = False, what: str = "submitted") -> NightlySpec:
    try:
        return NightlySpec.load(spec_file)
    except SpecError as exc:
        _failed(as_json, str(exc), 2, what)


def submit(
    spec_file: Path = typer.Option(..., "--spec", help=SPEC_HELP),
    address: str = typer.Option(..., help="Ray dashboard of the cluster, e.g. http://HEAD:8265."),
    wait: bool = typer.Option(False, "--wait", help="Poll until the job finishes; print its status and log tail."),
    wait_timeout: float = typer.Option(3600, "--wait-timeout", help="Seconds to wait with --wait.",
                                       callback=lambda v: _seconds(v, "--wait-timeout")),
    connect_timeout: float = typer.Option(5, "--connect-timeout", help="Seconds to wait for the dashboard to answer.",
                                          callback=lambda v: _seconds(v, "--connect-timeout")),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Submit the nightly job to a Ray cluster (Ray Jobs API). Example: engram submit --spec S --address http://HEAD:8265 --wait

    Local relative paths in the spec are made absolute (they must exist on the cluster's nodes);
    with --wait the exit code is 1 when the job did not succeed.
    """
    spec = _load(spec_file, as_json)
    try:
        result = submit_spec(spec, address, wait=wait, wait_timeout_s=wait_timeout, connect_timeout_s=connect_timeout)
    except SubmitError as exc:
        _failed(as_json, str(exc), 2, "submitted")
    failed = wait and result.status != "SUCCEEDED"
    if as_json:
        out = {"submitted": True, **result.to_dict()}
        if failed:  # the job ran and did not succeed: say why, as every --json failure object does
            out.update(error=result.error, exit_code=1)
        typer.echo(json.dumps(out, default=str))
    else:
        typer.echo(f"job {result.job_id} on {result.address}: {result.status}")
        if result.logs_tail:
            typer.echo(result.logs_tail)
        if not wait:
            typer.echo(f"follow it: ray job logs --address {result.address} --follow {result.job_id}")
    if failed:
        if result.error:
            typer.echo(f"error: job {result.job_id} {result.status}: {result.error}", err=True)
        raise typer.Exit(code=1)


def schedule(
    spec_file: Path = typer.Option(..., "--spec", help=SPEC_HELP),
    cron: str = typer.Option(..., help="5-field cron expression, e.g. '0 2 * * *' (02:00 daily)."),
    fmt: str = typer.Option(..., "--format", help=f"One of: {', '.join(FORMATS)}."),
    image: str = typer.Option("engram:latest", help="Container image with engram installed (k8s-cronjob, rayjob)."),
    namespace: str = typer.Option("default", help="Kubernetes namespace (k8s-cronjob, rayjob)."),
    name: str = typer.Option("engram-nightly", help="Name of the CronJob / RayCronJob / DAG."),
    address: str = typer.Option(None, help="Submit to this standing Ray cluster (http://HEAD:8265) instead of "
                                           "running in place (crontab, k8s-cronjob, airflow)."),
    as_json: bool = typer.Option(False, "--json", help="Print {scheduled, format, cron, text} as one JSON object."),
) -> None:
    """Print a ready schedule for the nightly job. Example: engram schedule --spec S --cron "0 2 * * *" --format k8s-cronjob"""
    spec = _load(spec_file, as_json, "scheduled")
    if fmt == "rayjob" and address:
        _failed(as_json, "--address does not apply to --format rayjob (each run creates its own RayCluster); leave it out",
                2, "scheduled")
    options = ScheduleOptions(cron=cron, spec_path=str(spec_file.resolve()), image=image, namespace=namespace,
                              name=name, address=address, workdir=str(Path.cwd()), engram_bin=_engram_bin())
    try:
        text = render_schedule(spec, fmt, options)
    except (ScheduleError, SubmitError) as exc:
        _failed(as_json, str(exc), 2, "scheduled")
    local = local_paths(spec)
    if fmt != "crontab" and local:
        typer.echo(f"note: {', '.join(local)} in {spec_file} are local paths; on the scheduler they must exist "
                   "(a mounted volume) or be s3:// URIs", err=True)
    typer.echo(json.dumps({"scheduled": True, "format": fmt, "cron": options.cron, "text": text}) if as_json else text,
               nl=False)


def _engram_bin() -> str:
    """The engram script of this environment (cron's PATH will not have it), else plain `engram`."""
    beside = Path(sys.executable).parent / "engram"
    return str(beside) if beside.exists() else "engram"


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("schedule")(schedule)
