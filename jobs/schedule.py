"""Run the nightly job elsewhere: submit it to a Ray cluster, or print a schedule that runs it.

Two ways a spec leaves this machine:

* ``submit_spec`` sends it through the Ray Jobs API (the head's dashboard, ``http://HEAD:8265``).
  The spec travels in the job's runtime_env as the env var ``ENGRAM_SPEC_YAML``; the entrypoint
  ``python -m jobs.schedule`` (this module's ``main``) reads it and runs ``run_nightly``. The
  engram package must be installed on the cluster (it is, in the image; and for a local test
  cluster started from this venv).
* ``render_schedule`` prints a crontab line, a Kubernetes CronJob (spec in a ConfigMap), a
  KubeRay RayCronJob (KubeRay >= 1.6, alpha; spec inline in the RayJob's runtimeEnvYAML) or an
  Airflow DAG file (spec inline; airflow is imported only inside that file).

Cron expressions are validated here (5 fields, ranges, steps, lists, month/day names) so a
typo fails at ``engram schedule`` time with the field named, not silently on the scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import pprint
import re
import shlex
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import yaml

from jobs.errors import exit_code, one_line
from jobs.spec import NightlySpec, load_yaml

log = logging.getLogger(__name__)

SPEC_ENV_VAR = "ENGRAM_SPEC_YAML"
ENTRYPOINT = "python -m jobs.schedule"
FORMATS = ("crontab", "k8s-cronjob", "rayjob", "airflow")
SPEC_MOUNT = "/etc/engram/nightly.yaml"


class ScheduleError(ValueError):
    """A schedule that cannot be made (bad cron expression, bad format); the message names the item."""


class SubmitError(RuntimeError):
    """A submission that could not reach or use the cluster; the message names the address and the fix."""


# --- cron -------------------------------------------------------------------------------------

_MONTHS = {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())}
_DAYS = {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())}


@dataclass(frozen=True)
class _CronField:
    name: str
    low: int
    high: int
    names: dict[str, int] = field(default_factory=dict)


CRON_FIELDS = (
    _CronField("minute", 0, 59),
    _CronField("hour", 0, 23),
    _CronField("day of month", 1, 31),
    _CronField("month", 1, 12, _MONTHS),
    _CronField("day of week", 0, 7, _DAYS),  # 0 and 7 are both Sunday
)


def validate_cron(expression: str) -> str:
    """The expression with single spaces, or ScheduleError naming the field that is wrong."""
    parts = str(expression).split()
    if len(parts) != 5:
        raise ScheduleError(
            f"cron {expression!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
            f"got {len(parts)}; e.g. '0 2 * * *' for 02:00 every day")
    for position, (text, spec) in enumerate(zip(parts, CRON_FIELDS), start=1):
        for item in text.split(","):
            problem = _cron_item_problem(item, spec)
            if problem:
                raise ScheduleError(f"cron {expression!r}: field {position} ({spec.name}) {text!r}: {problem}")
    if parts[4].startswith("*"):  # any day of the week (*, */1): days of the month alone decide: some must exist in one of the months
        days, months = _cron_values(parts[2], CRON_FIELDS[2]), _cron_values(parts[3], CRON_FIELDS[3])
        if not any(day <= _MONTH_DAYS[month] for month in months for day in days):
            raise ScheduleError(f"cron {expression!r}: day of month {parts[2]!r} never falls in month {parts[3]!r}, so "
                                "the schedule would never run; e.g. '0 2 28 2 *' for 28 February")
    return " ".join(parts)


_MONTH_DAYS = {1: 31, 2: 29, 3: 31, 4: 30, 5: 31, 6: 30, 7: 31, 8: 31, 9: 30, 10: 31, 11: 30, 12: 31}  # Feb: leap years


def _cron_values(text: str, spec: _CronField) -> set[int]:
    """The values a valid field (checked by :func:`_cron_item_problem`) matches."""
    values: set[int] = set()
    for item in text.split(","):
        base, _, step = item.partition("/")
        if base == "*":
            low, high = spec.low, spec.high
        else:
            low_text, dash, high_text = base.partition("-")
            low = _cron_value(low_text, spec)
            high = _cron_value(high_text, spec) if dash else (spec.high if step else low)
        values.update(range(low, high + 1, int(step) if step else 1))
    return values


def _cron_item_problem(item: str, spec: _CronField) -> str | None:
    """Why one comma-separated item of a field is invalid, or None."""
    if not item:
        return "empty list item"
    base, slash, step = item.partition("/")
    if slash:
        if not (step.isascii() and step.isdigit()) or int(step) < 1:
            return f"step {step!r} must be a positive number"
        if int(step) > spec.high - spec.low + 1:
            return f"step {step} is larger than the field's range {spec.low}-{spec.high}"
    if base == "*":
        return None
    low_text, dash, high_text = base.partition("-")
    if slash and not dash:
        return f"a step needs '*' or a range before it ('*/{step}' or 'a-b/{step}'), got {base!r}"
    try:
        low = _cron_value(low_text, spec)
        high = _cron_value(high_text, spec) if dash else low
    except ValueError as exc:
        return str(exc)
    if low > high:
        return f"range {base!r} runs backwards"
    return None


def _cron_value(text: str, spec: _CronField) -> int:
    if text.upper() in spec.names:
        return spec.names[text.upper()]
    if not (text.isascii() and text.isdigit()):
        names = f" or a name ({', '.join(spec.names)})" if spec.names else ""
        raise ValueError(f"{text!r} is not a number{names}")
    value = int(text)
    if not spec.low <= value <= spec.high:
        raise ValueError(f"value {value} is out of range {spec.low}-{spec.high}")
    return value


# --- submit (Ray Jobs API) --------------------------------------------------------------------

@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    address: str
    status: str
    """PENDING / RUNNING right after submit; the terminal status (SUCCEEDED, FAILED, STOPPED) with --wait."""
    logs_tail: str = ""
    report: dict | None = None
    """The job's NightlyReport (parsed from its last log line) once it succeeded; a failed night's
    failure object (``published: false, error, exit_code``)."""

    @property
    def error(self) -> str | None:
        """Why a finished job did not succeed: its own error line, else its status."""
        if self.status in ("PENDING", "RUNNING", "SUCCEEDED"):
            return None
        if self.report and self.report.get("error"):
            return str(self.report["error"])
        lines = [line for line in self.logs_tail.splitlines() if line.startswith("error:")]
        return lines[-1][len("error:"):].strip() if lines else f"the job ended {self.status}; see its logs"

    def to_dict(self) -> dict:
        return asdict(self)


def dashboard_address(address: str) -> str:
    """``HEAD:8265`` or ``http(s)://HEAD:8265`` -> an http(s) URL; ray:// and gcs addresses are refused."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise SubmitError(f"address {address}: the Jobs API talks to the dashboard; use http://HEAD:8265, not ray://")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise SubmitError(f"address {address}: expected http://HEAD:8265 (the Ray dashboard)")
    return address


def spec_for_cluster(spec: NightlySpec, base_dir: Path | None = None) -> NightlySpec:
    """Local relative paths made absolute: the job runs in another working directory than ours."""
    base_dir = base_dir or Path.cwd()
    absolute = {}
    for name in ("store", "fact_log", "model"):
        value = getattr(spec, name)
        if "://" not in value and not Path(value).is_absolute():
            absolute[name] = str((base_dir / value).resolve())
    return replace(spec, **absolute)


def _auth_headers() -> dict[str, str]:
    """Ray token auth: the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, if any."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_reachable(address: str, timeout_s: float) -> None:
    """Fail fast and clearly when nothing answers at the dashboard address (any HTTP answer is fine)."""
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=timeout_s).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            return  # a dashboard with token auth: the client sends the token
        raise SubmitError(
            f"{address} answered HTTP {exc.code} to /api/version: not a Ray dashboard; use the head's dashboard "
            f"address (http://HEAD:8265)") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SubmitError(
            f"Ray dashboard {address} is unreachable ({reason}); check the address (http://HEAD:8265) and that "
            f"the head runs with --include-dashboard=true") from None


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError/AuthenticationError/RuntimeError here
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = " (set RAY_AUTH_TOKEN to the cluster's token)" if "auth" in first_line.lower() else ""
        raise SubmitError(f"Ray Jobs API at {address}: {first_line}{hint}") from None


AGENT_WAIT_S = 60.0


def _submit_when_ready(client, address: str, job: dict) -> str:
    """Submit, waiting a bounded time for the head's job agent: a freshly started head answers
    "No available agent to submit job, please try again later" until its agent is up."""
    deadline = time.monotonic() + AGENT_WAIT_S
    delay = 0.5
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as err:
            if "try again later" not in str(err) or time.monotonic() > deadline:
                raise
            log.info("%s: job agent not ready yet (%s); retrying in %.1f s", address, err, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def submit_spec(spec: NightlySpec, address: str, *, wait: bool = False, wait_timeout_s: float = 3600,
                connect_timeout_s: float = 5, poll_s: float = 1.0, tail_lines: int = 20) -> SubmitResult:
    """Submit the nightly job to the cluster whose dashboard is at ``address``; optionally wait for it."""
    address = dashboard_address(address)
    check_reachable(address, connect_timeout_s)
    client = _client(address)
    cluster_spec = spec_for_cluster(spec)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    submission_id = f"engram-nightly-{stamp}-{uuid.uuid4().hex[:6]}"
    job_id = _submit_when_ready(client, address, dict(
        entrypoint=ENTRYPOINT,
        submission_id=submission_id,
        runtime_env={"env_vars": {SPEC_ENV_VAR: cluster_spec.to_yaml(), "TOKENIZERS_PARALLELISM": "false"}},
        metadata={"engram_job": "nightly", "store": cluster_spec.store},
    ))
    log.info("submitted %s to %s", job_id, address)
    if not wait:
        return SubmitResult(job_id, address, str(client.get_job_status(job_id).value))
    deadline = time.monotonic() + wait_timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(poll_s)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    return SubmitResult(job_id, address, str(status.value), _tail(logs, tail_lines), _last_json_line(logs))


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _last_json_line(logs: str) -> dict | None:
    for line in reversed(logs.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def main() -> int:
    """The Ray job's entrypoint: run the spec in $ENGRAM_SPEC_YAML, print the report as one JSON line."""
    from jobs.nightly import run_nightly

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    text = os.environ.get(SPEC_ENV_VAR)
    if not text:
        print(f"error: {SPEC_ENV_VAR} is not set; submit with `engram submit --spec FILE`", file=sys.stderr)
        return 2
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as exc:
        print(f"error: job spec from ${SPEC_ENV_VAR}: not valid YAML ({one_line(str(exc))})", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")  # as `engram run nightly`: one line per failure
    try:
        spec = NightlySpec.from_dict(raw, source=f"job spec from ${SPEC_ENV_VAR}")
        report = run_nightly(spec)
    except Exception as exc:  # noqa: BLE001 - the job's boundary: one line and one JSON object, as the CLI
        code = exit_code(exc)  # 2 for a bad spec, fact_log path, model, ... as `engram run nightly`
        message = one_line(f"{type(exc).__name__}: {exc}")
        log.debug("the night failed", exc_info=True)
        print(json.dumps({"published": False, "error": message, "exit_code": code}), flush=True)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code
    print(json.dumps(report.to_dict(), default=str), flush=True)
    return 0


# --- schedules --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScheduleOptions:
    cron: str
    spec_path: str
    """How the spec file is named in a crontab line (absolute: cron starts in $HOME)."""
    image: str = "engram:latest"
    namespace: str = "default"
    name: str = "engram-nightly"
    address: str | None = None
    """Dashboard of a standing Ray cluster: crontab/CronJob/Airflow then submit there instead of running in place."""
    workdir: str = "."
    """crontab: the directory the job runs in (relative paths in the spec resolve against it)."""
    engram_bin: str = "engram"


_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")  # RFC 1123 label, as Kubernetes names namespaces


def render_schedule(spec: NightlySpec, fmt: str, options: ScheduleOptions) -> str:
    """The schedule in ``fmt`` (one of FORMATS) as text ready to install."""
    renderers = {"crontab": _crontab, "k8s-cronjob": _k8s_cronjob, "rayjob": _ray_cron_job, "airflow": _airflow_dag}
    if fmt not in renderers:
        raise ScheduleError(f"schedule format {fmt!r}: expected one of {', '.join(FORMATS)}")
    options = replace(options, cron=validate_cron(options.cron))
    if fmt in ("k8s-cronjob", "rayjob"):
        for what, value, longest in (("--namespace", options.namespace, 63), ("--name", options.name, 52)):
            if len(value) > longest or not _DNS_LABEL.fullmatch(value):
                raise ScheduleError(f"{what} {value!r} is not a Kubernetes name: lowercase letters, digits and '-', "
                                    f"starting and ending with a letter or digit, at most {longest} characters "
                                    "(e.g. 'ml-platform')")
    if options.address:
        options = replace(options, address=dashboard_address(options.address))
    return renderers[fmt](spec, options)


def local_paths(spec: NightlySpec) -> list[str]:
    """Spec fields that name local paths (fine for crontab; on Kubernetes they need a mounted volume)."""
    return [name for name in ("store", "fact_log", "model") if "://" not in getattr(spec, name)]


def _engram_args(options: ScheduleOptions, spec_file: str) -> list[str]:
    if options.address:
        return ["submit", "--spec", spec_file, "--address", options.address, "--wait", "--json"]
    return ["run", "nightly", "--spec", spec_file, "--json"]


CRONTAB_LOCK = "engram-nightly.lock"
CRONTAB_LOG = "engram-nightly.log"
_LOCK_BUSY = 75  # flock's exit code when the lock is held (engram itself exits 0, 1, 2, 130 or 143)


def _crontab(spec: NightlySpec, options: ScheduleOptions) -> str:
    """One crontab line. cron starts a run whether or not the last one ended: ``flock -n`` on
    ``engram-nightly.lock`` in the work directory skips a run while another holds it (a night that
    ran past the next start), and the skip is one line in ``engram-nightly.log``. The lock goes with
    the process (a killed run leaves no stale lock)."""
    args = " ".join(shlex.quote(a) for a in [options.engram_bin, *_engram_args(options, options.spec_path)])
    skipped = (f'echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) engram nightly skipped: the previous run still holds '
               f'{CRONTAB_LOCK} (flock -n); this run did not start"')
    command = (f"cd {shlex.quote(options.workdir)} && {{ flock -n -E {_LOCK_BUSY} {CRONTAB_LOCK} {args}; "
               f"[ $? -ne {_LOCK_BUSY} ] || {skipped}; }} >> {CRONTAB_LOG} 2>&1")
    return f"{options.cron} {command.replace('%', chr(92) + '%')}\n"  # cron turns a bare % into a newline


class _LiteralDumper(yaml.SafeDumper):
    """Multi-line strings (the embedded spec) as readable ``|`` blocks; no &anchors for shared dicts."""

    def ignore_aliases(self, data) -> bool:
        return True


def _represent_str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _represent_str)


def _yaml_documents(header: str, documents: list[dict]) -> str:
    body = "---\n".join(yaml.dump(d, Dumper=_LiteralDumper, sort_keys=False) for d in documents)
    return "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines()) + body


def _labels(options: ScheduleOptions) -> dict:
    return {"app.kubernetes.io/name": "engram", "app.kubernetes.io/component": options.name}


def _k8s_cronjob(spec: NightlySpec, options: ScheduleOptions) -> str:
    meta = {"name": options.name, "namespace": options.namespace, "labels": _labels(options)}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {**meta, "name": f"{options.name}-spec"},
                  "data": {"nightly.yaml": spec.to_yaml()}}
    container = {
        "name": "engram",
        "image": options.image,
        "command": ["engram", *_engram_args(options, SPEC_MOUNT)],
        "env": [{"name": "TOKENIZERS_PARALLELISM", "value": "false"}],
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}},
        "volumeMounts": [{"name": "spec", "mountPath": str(Path(SPEC_MOUNT).parent), "readOnly": True}],
    }
    cron_job = {
        "apiVersion": "batch/v1", "kind": "CronJob", "metadata": meta,
        "spec": {
            "schedule": options.cron,
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",  # two runs would race for the same CURRENT pointer
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 5,
            "jobTemplate": {"spec": {"backoffLimit": 1, "template": {
                "metadata": {"labels": _labels(options)},
                "spec": {"restartPolicy": "Never", "containers": [container],
                         "volumes": [{"name": "spec", "configMap": {"name": f"{options.name}-spec"}}]},
            }}},
        },
    }
    where = f"submits it to the Ray cluster at {options.address}" if options.address else "runs it in place"
    header = (f"engram nightly job as a Kubernetes CronJob ({options.cron}, UTC): the spec is in the ConfigMap; the "
              f"pod {where}.\nGenerated by `engram schedule --format k8s-cronjob`. Apply: kubectl apply -f FILE\n"
              "store/fact_log should be s3:// URIs (credentials via env or IRSA) or paths on a mounted volume; model a "
              "checkpoint directory on a mounted volume (it is read from a local path only).")
    return _yaml_documents(header, [config_map, cron_job])


def _ray_pod(name: str, image: str, resources: dict) -> dict:
    return {"spec": {"containers": [{"name": name, "image": image, "resources": resources}]}}


RAYJOB_DEADLINE_S = 6 * 3600  # a run's activeDeadlineSeconds
RAYJOB_TTL_S = 3600  # its cluster is deleted this long after the run ends (ttlSecondsAfterFinished)


def shortest_interval_minutes(expression: str) -> int:
    """The shortest time between two starts of a valid cron expression, in minutes (over the
    eight years from 2026, which covers leap years and every weekday of every date). Cron's rule
    for days: with both day of month and day of week restricted, a day matching either runs."""
    from datetime import date, timedelta

    parts = expression.split()
    minutes, hours, days, months, weekdays = (_cron_values(p, f) for p, f in zip(parts, CRON_FIELDS))
    weekdays = {d % 7 for d in weekdays}
    times = sorted(h * 60 + m for h in hours for m in minutes)
    either = not parts[2].startswith("*") and not parts[4].startswith("*")
    gaps = [b - a for a, b in zip(times, times[1:])]
    previous = None
    day = date(2026, 1, 1)
    while day < date(2034, 1, 1):
        on_day, on_weekday = day.day in days, (day.isoweekday() % 7) in weekdays
        if day.month in months and ((on_day or on_weekday) if either else (on_day and on_weekday)):
            if previous is not None:
                gaps.append((day - previous).days * 1440 + times[0] - times[-1])
            previous = day
        day += timedelta(days=1)
    return min(gaps)


def _ray_cron_job(spec: NightlySpec, options: ScheduleOptions) -> str:
    import ray

    # KubeRay's RayCronJob (alpha) has no concurrencyPolicy: it creates a RayJob at every start, even
    # while the last one runs. Overlap is ruled out by the schedule instead: a run is stopped at its
    # deadline and its cluster gone an hour later, so starts must be further apart than both.
    gap = shortest_interval_minutes(options.cron)
    if gap * 60 < RAYJOB_DEADLINE_S + RAYJOB_TTL_S:
        raise ScheduleError(
            f"cron {options.cron!r} starts runs {gap} minute(s) apart: a RayCronJob cannot forbid two runs at once "
            f"(KubeRay has no concurrencyPolicy for it), so its starts must be at least "
            f"{(RAYJOB_DEADLINE_S + RAYJOB_TTL_S) // 3600} hours apart (the run's {RAYJOB_DEADLINE_S // 3600} h deadline "
            "plus the hour its cluster stays); schedule it less often, or use --format k8s-cronjob --address "
            "(concurrencyPolicy: Forbid)")

    runtime_env = {"env_vars": {SPEC_ENV_VAR: spec.to_yaml(), "TOKENIZERS_PARALLELISM": "false"}}
    gpus = 1 if spec.gpus_per_worker is None else spec.gpus_per_worker
    worker_resources = {"limits": {"cpu": "4", "memory": "16Gi"}, "requests": {"cpu": "4", "memory": "16Gi"}}
    if gpus:
        worker_resources["limits"]["nvidia.com/gpu"] = int(max(1, gpus))
    job_spec = {
        "entrypoint": ENTRYPOINT,
        "runtimeEnvYAML": yaml.dump(runtime_env, Dumper=_LiteralDumper, sort_keys=False),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": RAYJOB_TTL_S,
        "activeDeadlineSeconds": RAYJOB_DEADLINE_S,
        "rayClusterSpec": {
            "rayVersion": ray.__version__,
            "headGroupSpec": {"rayStartParams": {}, "template": _ray_pod(
                "ray-head", options.image, {"limits": {"cpu": "2", "memory": "8Gi"},
                                            "requests": {"cpu": "2", "memory": "8Gi"}})},
            "workerGroupSpecs": [{
                "groupName": "compile", "replicas": max(spec.workers, 1), "minReplicas": max(spec.workers, 1),
                "maxReplicas": max(spec.workers, 1), "rayStartParams": {},
                "template": _ray_pod("ray-worker", options.image, worker_resources),
            }],
        },
    }
    ray_cron_job = {"apiVersion": "ray.io/v1", "kind": "RayCronJob",
                    "metadata": {"name": options.name, "namespace": options.namespace, "labels": _labels(options)},
                    "spec": {"schedule": options.cron, "jobTemplate": job_spec}}
    header = (f"engram nightly job as a KubeRay RayCronJob ({options.cron}): each run creates a RayJob (a fresh "
              "RayCluster that is deleted after the job).\nRayCronJob needs KubeRay >= 1.6 (alpha); the schedule "
              "follows the operator's time zone. On older KubeRay, apply spec.jobTemplate as a RayJob\n"
              "(kind: RayJob, spec: <jobTemplate>) from a CronJob, or use --format k8s-cronjob --address.\n"
              f"The spec travels inline in runtimeEnvYAML (${SPEC_ENV_VAR}); the entrypoint `{ENTRYPOINT}` runs it.\n"
              "Generated by `engram schedule --format rayjob`. Apply: kubectl apply -f FILE")
    return _yaml_documents(header, [ray_cron_job])


_AIRFLOW_DAG = '''"""Airflow DAG: the engram nightly job on cron {cron!r} (UTC).

Generated by `engram schedule --format airflow`; drop this file in the DAGs folder. The task
{where}. The engram package must be installed on the Airflow workers
(only this file imports airflow; engram does not depend on it).
"""

from datetime import timedelta

import pendulum

try:  # Airflow 3
    from airflow.sdk import DAG, task
except ImportError:  # Airflow 2
    from airflow import DAG
    from airflow.decorators import task

SPEC = {spec}
RAY_DASHBOARD = {address!r}

with DAG(
    dag_id={dag_id!r},
    schedule={cron!r},
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,  # two runs would race for the same CURRENT pointer
    default_args={{"retries": 1, "retry_delay": timedelta(minutes=10)}},
    tags=["engram"],
) as dag:

    @task(execution_timeout=timedelta(hours=6))
    def engram_nightly() -> dict:
        from jobs.spec import NightlySpec

        spec = NightlySpec.from_dict(SPEC, source="DAG {dag_id}")
        if RAY_DASHBOARD is None:
            from jobs.nightly import run_nightly

            return run_nightly(spec).to_dict()
        from jobs.schedule import submit_spec

        result = submit_spec(spec, RAY_DASHBOARD, wait=True, wait_timeout_s=6 * 3600)
        if result.status != "SUCCEEDED":
            raise RuntimeError(f"Ray job {{result.job_id}} ended {{result.status}}:\\n{{result.logs_tail}}")
        return result.report or {{}}

    engram_nightly()
'''


def _airflow_dag(spec: NightlySpec, options: ScheduleOptions) -> str:
    where = f"submits the job to the Ray cluster at {options.address}" if options.address else "runs the job in place"
    return _AIRFLOW_DAG.format(cron=options.cron, where=where, spec=pprint.pformat(spec.to_dict(), sort_dicts=False, width=100), address=options.address,
                               dag_id=options.name.replace("-", "_"))


# --- committed examples -----------------------------------------------------------------------

EXAMPLE_SPEC = Path(__file__).parent / "specs" / "nightly.example.yaml"
EXAMPLE_DIR = Path(__file__).parent / "schedules"
EXAMPLE_FILES = {"crontab": "nightly.crontab", "k8s-cronjob": "nightly.k8s-cronjob.yaml",
                 "rayjob": "nightly.rayjob.yaml", "airflow": "engram_nightly_dag.py"}


def example_schedules() -> dict[str, str]:
    """file name -> text of the examples in jobs/schedules/ (02:00 daily, from the example spec)."""
    spec = NightlySpec.load(EXAMPLE_SPEC)
    options = ScheduleOptions(cron="0 2 * * *", spec_path="/opt/engram/jobs/specs/nightly.example.yaml",
                              image="ghcr.io/example/engram:0.1.0", namespace="ml-platform", workdir="/opt/engram",
                              engram_bin="/opt/engram/.venv/bin/engram")
    return {name: render_schedule(spec, fmt, options) for fmt, name in EXAMPLE_FILES.items()}


def write_example_schedules() -> None:
    for name, text in example_schedules().items():
        (EXAMPLE_DIR / name).write_text(text)


if __name__ == "__main__":
    sys.exit(main())
