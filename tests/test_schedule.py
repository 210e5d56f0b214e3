"""`engram submit` (real Ray head with its dashboard, real Jobs API) and `engram schedule` artifacts."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from jobs.cli import app
from jobs.schedule import ScheduleError, ScheduleOptions, example_schedules, render_schedule, validate_cron
from jobs.spec import NightlySpec
from jobs.synthetic import fact_log_rows, write_fact_log
from tests.conftest import free_port

runner = CliRunner()
EXAMPLE_SPEC = Path(__file__).parents[1] / "jobs" / "specs" / "nightly.example.yaml"


def engram(*args: str):
    return runner.invoke(app, list(args))


def schedule_text(fmt: str, *extra: str) -> str:
    result = engram("schedule", "--spec", str(EXAMPLE_SPEC), "--cron", "30 2 * * 1-5", "--format", fmt, *extra)
    assert result.exit_code == 0, result.output
    return result.stdout


# --- cron -------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression", ["0 2 * * *", "*/15 0-6 1,15 * MON-FRI", "0 0 1 jan,jul 0", "5 4 * * 7",
                                        "0 1-23/2 * * *", "0 2 29 2 *", "0 2 31 1-3 *", "0 2 30 2 MON",
                                        "0 2 31 */2 *"])
def test_valid_cron_expressions_pass(expression):
    assert validate_cron(expression) == expression


@pytest.mark.parametrize("expression, named", [
    ("0 25 * * *", "field 2 (hour)"),
    ("60 2 * * *", "field 1 (minute)"),
    ("0 2 0 * *", "field 3 (day of month)"),
    ("0 2 * 13 *", "field 4 (month)"),
    ("0 2 * * 8", "field 5 (day of week)"),
    ("*/0 2 * * *", "field 1 (minute)"),
    ("0 5-2 * * *", "field 2 (hour)"),
    ("0 2 * * FUNDAY", "field 5 (day of week)"),
    ("0 2,,3 * * *", "field 2 (hour)"),
    ("0 2 * *", "expected 5 fields"),
    ("0 2 30 2 *", "day of month '30' never falls in month '2', so the schedule would never run"),
    ("0 2 31 apr,jun,sep,nov *", "never falls in month 'apr,jun,sep,nov'"),
    ("0 2 30 2 */1", "never falls in month '2'"),  # */1 is every day of the week, as *
])
def test_bad_cron_is_refused_naming_the_field(expression, named):
    with pytest.raises(ScheduleError, match=named.replace("(", r"\(").replace(")", r"\)")):
        validate_cron(expression)


def test_schedule_cli_with_bad_cron_exits_2_with_one_line():
    result = engram("schedule", "--spec", str(EXAMPLE_SPEC), "--cron", "0 24 * * *", "--format", "crontab")
    assert result.exit_code == 2
    assert result.stderr.strip().count("\n") == 0 and "field 2 (hour)" in result.stderr


def test_schedule_refuses_a_spec_with_an_unknown_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE_SPEC.read_text() + "nums_shards: 3\n")
    result = engram("schedule", "--spec", str(bad), "--cron", "0 2 * * *", "--format", "crontab")
    assert result.exit_code == 2 and "unknown key(s) ['nums_shards']" in result.stderr


# --- artifacts --------------------------------------------------------------------------------

def test_crontab_is_one_line_of_five_fields_and_the_run_command():
    line = schedule_text("crontab")
    assert line.endswith("\n") and line.count("\n") == 1
    fields = line.split()
    assert fields[:5] == ["30", "2", "*", "*", "1-5"]
    command = " ".join(fields[5:])
    assert "run nightly --spec" in command and str(EXAMPLE_SPEC.resolve()) in command


def _as_cron_runs_it(line: str) -> str:
    """The shell command of a crontab line, as cron hands it to /bin/sh (``\\%`` is a literal %)."""
    return line.split(None, 5)[5].rstrip("\n").replace("\\%", "%")


def test_a_crontab_run_is_skipped_with_a_log_line_while_the_previous_night_still_runs(tmp_path):
    """cron starts the next run whether or not the last one ended; two nights at once both compiled
    the whole night for one CURRENT move (a night that runs past 24 h, or an hourly schedule). The
    line now takes ``flock -n`` on engram-nightly.lock: the second run does not start, and says so
    in the log; once the first ends, the next run starts again."""
    fake = tmp_path / "engram"  # stands in for the nightly: a run that takes a while
    fake.write_text("#!/bin/sh\necho \"start $$\" >> runs.txt\nsleep 3\necho \"end $$\" >> runs.txt\n")
    fake.chmod(0o755)
    options = ScheduleOptions(cron="* * * * *", spec_path=str(EXAMPLE_SPEC), workdir=str(tmp_path),
                              engram_bin=str(fake))
    command = _as_cron_runs_it(render_schedule(NightlySpec.load(EXAMPLE_SPEC), "crontab", options))
    first = subprocess.Popen(["/bin/sh", "-c", command])
    deadline = time.monotonic() + 10
    while not (tmp_path / "runs.txt").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    second = subprocess.run(["/bin/sh", "-c", command], timeout=30)
    assert first.wait(timeout=30) == 0 and second.returncode == 0
    runs = (tmp_path / "runs.txt").read_text().split()
    assert runs[0::2] == ["start", "end"], runs  # one run only
    log = (tmp_path / "engram-nightly.log").read_text()
    assert "engram nightly skipped: the previous run still holds engram-nightly.lock" in log
    subprocess.run(["/bin/sh", "-c", command], timeout=30, check=True)  # the lock went with the first run
    assert (tmp_path / "runs.txt").read_text().split()[0::2] == ["start", "end", "start", "end"]


@pytest.mark.parametrize("cron", ["*/30 * * * *", "0 */4 * * *", "0 1,5 * * *", "0 23 * * 1 ", "0 2,23 * * *"])
def test_a_rayjob_schedule_whose_runs_could_overlap_is_refused(cron):
    """KubeRay's RayCronJob has no concurrencyPolicy: it starts a RayJob at every tick even while
    the last one runs. Starts closer than a run's deadline plus its cluster's hour are refused."""
    result = engram("schedule", "--spec", str(EXAMPLE_SPEC), "--cron", cron, "--format", "rayjob")
    if cron.startswith("0 23"):  # weekly: fine
        assert result.exit_code == 0, result.output
        return
    assert result.exit_code == 2 and "cannot forbid two runs at once" in result.output
    assert "--format k8s-cronjob --address" in result.output


def test_every_schedule_format_forbids_two_runs_at_once():
    spec = NightlySpec.load(EXAMPLE_SPEC)
    options = ScheduleOptions(cron="0 2 * * *", spec_path="/s.yaml")
    assert "flock -n" in render_schedule(spec, "crontab", options)
    cron_job = list(yaml.safe_load_all(render_schedule(spec, "k8s-cronjob", options)))[1]
    assert cron_job["spec"]["concurrencyPolicy"] == "Forbid"
    assert "max_active_runs=1," in render_schedule(spec, "airflow", options)
    (ray_cron_job,) = yaml.safe_load_all(render_schedule(spec, "rayjob", options))
    job = ray_cron_job["spec"]["jobTemplate"]
    assert job["activeDeadlineSeconds"] + job["ttlSecondsAfterFinished"] <= 24 * 3600


def test_crontab_with_an_address_submits_and_waits():
    line = schedule_text("crontab", "--address", "head.example:8265")
    assert "submit --spec" in line and "--address http://head.example:8265 --wait" in line


@pytest.mark.parametrize("fmt", ["k8s-cronjob", "rayjob"])
@pytest.mark.parametrize("option, value", [("--namespace", "ml; rm -rf /"), ("--namespace", "ML"),
                                           ("--name", "engram_nightly"), ("--name", "x" * 53)])
def test_a_kubernetes_schedule_refuses_a_name_kubernetes_would_refuse(fmt, option, value):
    result = engram("schedule", "--spec", str(EXAMPLE_SPEC), "--cron", "30 2 * * 1-5", "--format", fmt, option, value)
    assert result.exit_code == 2 and f"{option} {value!r} is not a Kubernetes name" in result.output


def test_k8s_cronjob_parses_and_carries_the_spec_in_a_config_map():
    docs = list(yaml.safe_load_all(schedule_text("k8s-cronjob", "--namespace", "ml", "--image", "reg/engram:1")))
    config_map, cron_job = docs
    assert (config_map["kind"], cron_job["kind"], cron_job["apiVersion"]) == ("ConfigMap", "CronJob", "batch/v1")
    assert cron_job["spec"]["schedule"] == "30 2 * * 1-5" and cron_job["metadata"]["namespace"] == "ml"
    assert cron_job["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron_job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "reg/engram:1"
    assert pod["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]
    spec = NightlySpec.from_dict(yaml.safe_load(config_map["data"]["nightly.yaml"]))
    assert spec == NightlySpec.load(EXAMPLE_SPEC)


def test_rayjob_is_a_ray_cron_job_whose_runtime_env_carries_the_spec():
    (ray_cron_job,) = yaml.safe_load_all(schedule_text("rayjob"))
    assert (ray_cron_job["apiVersion"], ray_cron_job["kind"]) == ("ray.io/v1", "RayCronJob")
    assert ray_cron_job["spec"]["schedule"] == "30 2 * * 1-5"
    job = ray_cron_job["spec"]["jobTemplate"]
    assert job["entrypoint"] == "python -m jobs.schedule" and job["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    spec = NightlySpec.from_dict(yaml.safe_load(runtime_env["env_vars"]["ENGRAM_SPEC_YAML"]))
    assert spec == NightlySpec.load(EXAMPLE_SPEC)
    assert job["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == spec.workers


def test_airflow_dag_compiles_and_imports_airflow_only_inside_the_file():
    text = schedule_text("airflow", "--address", "http://head:8265")
    compile(text, "engram_nightly_dag.py", "exec")
    tree = ast.parse(text)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert {"airflow.sdk", "airflow"} <= imported
    assigned = {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    assert NightlySpec.from_dict(assigned["SPEC"]) == NightlySpec.load(EXAMPLE_SPEC)
    assert assigned["RAY_DASHBOARD"] == "http://head:8265"
    assert "schedule='30 2 * * 1-5'" in text
    assert "airflow" not in sys.modules  # rendering did not need it


def test_unknown_format_exits_2():
    result = engram("schedule", "--spec", str(EXAMPLE_SPEC), "--cron", "0 2 * * *", "--format", "systemd")
    assert result.exit_code == 2 and "crontab, k8s-cronjob, rayjob, airflow" in result.stderr


def test_committed_example_schedules_are_what_the_code_generates():
    folder = EXAMPLE_SPEC.parents[1] / "schedules"
    for name, text in example_schedules().items():
        assert (folder / name).read_text() == text, f"jobs/schedules/{name} is stale: run write_example_schedules()"


def test_example_spec_loads_with_the_demo_paths():
    spec = NightlySpec.load(EXAMPLE_SPEC)
    assert (spec.store, spec.fact_log, spec.model) == (
        "./engram-demo/store", "./engram-demo/fact_log", "./engram-demo/model")


def test_render_schedule_refuses_bad_cron_before_rendering():
    options = ScheduleOptions(cron="0 2 * * * *", spec_path="spec.yaml")
    with pytest.raises(ScheduleError, match="expected 5 fields"):
        render_schedule(NightlySpec.load(EXAMPLE_SPEC), "crontab", options)


# --- submit -----------------------------------------------------------------------------------

def test_submit_to_an_unreachable_address_fails_fast_and_clearly():
    started = time.monotonic()
    result = engram("submit", "--spec", str(EXAMPLE_SPEC), "--address", f"http://127.0.0.1:{free_port()}",
                    "--connect-timeout", "2")
    assert result.exit_code == 2
    assert time.monotonic() - started < 10
    message = result.stderr.strip()
    assert "\n" not in message and "unreachable" in message and "--include-dashboard=true" in message


def test_submit_refuses_a_ray_client_address():
    result = engram("submit", "--spec", str(EXAMPLE_SPEC), "--address", "ray://head:10001")
    assert result.exit_code == 2 and "http://HEAD:8265" in result.stderr


def test_submit_and_schedule_with_json_print_one_json_object_when_they_fail(tmp_path):
    bad_spec = tmp_path / "spec.yaml"
    bad_spec.write_text("store: s\nfact_log: l\nmodel: m\nbogus: 1\n")
    for args, what, message in (
            (["submit", "--spec", str(EXAMPLE_SPEC), "--address", "ray://head:10001"], "submitted", "http://HEAD:8265"),
            (["submit", "--spec", str(bad_spec), "--address", "http://head:8265"], "submitted", "unknown key"),
            (["schedule", "--spec", str(EXAMPLE_SPEC), "--cron", "0 25 * * *", "--format", "crontab"], "scheduled", "hour"),
            (["schedule", "--spec", str(bad_spec), "--cron", "0 2 * * *", "--format", "crontab"], "scheduled",
             "unknown key")):
        result = engram(*args, "--json")
        assert result.exit_code == 2, (args, result.output)
        out = json.loads(result.stdout)
        assert out[what] is False and out["exit_code"] == 2 and message in out["error"], (args, out)
        assert out["error"] in result.stderr


def test_a_spec_path_that_is_a_directory_or_not_utf8_is_a_spec_error_naming_it(tmp_path):
    """A directory or a non-UTF-8 file given as --spec: exit 2 with one line naming the path and
    the fix (and, with --json, the command's failure object), never a raw IsADirectoryError or
    UnicodeDecodeError."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(EXAMPLE_SPEC.read_bytes() + "job_id: caf\u00e9\n".encode("latin-1"))
    for spec, message in ((tmp_path, "is a directory; give the spec's YAML file"),
                          (latin1, "not UTF-8 text (byte 0xe9")):
        for args, what in ((["submit", "--spec", str(spec), "--address", "http://head:8265"], "submitted"),
                           (["schedule", "--spec", str(spec), "--cron", "0 2 * * *", "--format", "crontab"], "scheduled"),
                           (["run", "nightly", "--spec", str(spec)], "published")):
            result = engram(*args, "--json")
            assert result.exit_code == 2, (args, result.output)
            out = json.loads(result.stdout)
            assert out == {what: False, "error": out["error"], "exit_code": 2}, (args, out)
            assert f"job spec {spec}: {message}" in out["error"] and out["error"] in result.stderr, (args, out)
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_submit_and_schedule_json_say_what_happened(monkeypatch):
    """Their success objects carry ``submitted: true`` / ``scheduled: true``, the failure objects' key."""
    from jobs.schedule import SubmitResult

    monkeypatch.setattr("jobs.schedule_cli.submit_spec",
                        lambda spec, address, **kw: SubmitResult("raysubmit_1", address, "PENDING"))
    result = engram("submit", "--spec", str(EXAMPLE_SPEC), "--address", "http://head:8265", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["submitted"] is True and out["job_id"] == "raysubmit_1" and out["status"] == "PENDING"
    result = engram("schedule", "--spec", str(EXAMPLE_SPEC), "--cron", "0 2 * * *", "--format", "crontab", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["scheduled"] is True and out["format"] == "crontab" and out["cron"] == "0 2 * * *" and out["text"]


def test_a_submitted_night_that_fails_says_why_in_one_line_and_in_its_json(monkeypatch, tmp_path, capsys):
    """The job's entrypoint prints the night's failure as one JSON object and one `error:` line (no
    traceback); `engram submit --wait --json` carries that error and exit_code 1."""
    from jobs import schedule
    from jobs.schedule import SPEC_ENV_VAR, SubmitResult

    spec = {"store": str(tmp_path / "store"), "fact_log": str(tmp_path / "no-such-log"), "model": str(tmp_path / "m"),
            "workers": 0}
    monkeypatch.setenv(SPEC_ENV_VAR, yaml.safe_dump(spec))
    assert schedule.main() == 2  # a fact_log that is not there: a bad spec, as `engram run nightly` says (exit 2)
    out, err = capsys.readouterr()
    failure = json.loads(out.strip().splitlines()[-1])
    assert failure["published"] is False and failure["exit_code"] == 2 and "no-such-log" in failure["error"]
    assert err.startswith("error: ") and "Traceback" not in err

    logs = out + err
    monkeypatch.setattr("jobs.schedule_cli.submit_spec", lambda spec, address, **kw: SubmitResult(
        "raysubmit_2", address, "FAILED", logs, schedule._last_json_line(logs)))
    result = engram("submit", "--spec", str(EXAMPLE_SPEC), "--address", "http://head:8265", "--wait", "--json")
    assert result.exit_code == 1
    reported = json.loads(result.stdout)
    assert reported["status"] == "FAILED" and reported["exit_code"] == 1 and reported["error"] == failure["error"]


@pytest.fixture
def ray_head(tmp_path_factory):
    """A real Ray head with its dashboard, in its own process group; torn down by that group only.

    `ray stop --force` would kill every Ray process on the machine (other tests' in-process
    clusters, colleagues' clusters), so the head runs with --block and we signal its group.
    """
    temp_dir = tmp_path_factory.mktemp("ray-head")
    dashboard = free_port()
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # `python` = this venv
    env.pop("RAY_ADDRESS", None)
    command = [str(Path(bin_dir) / "ray"), "start", "--head", "--block", f"--port={free_port()}",
               f"--dashboard-port={dashboard}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
               "--num-cpus=2", f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}",
               # Agents on their own ports too, so another Ray on this machine cannot take them.
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               "--disable-usage-stats"]
    log_file = open(temp_dir / "ray-start.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_jobs_api(address, process, temp_dir / "ray-start.log")
        yield address
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                continue
        log_file.close()


def _wait_for_jobs_api(address: str, process: subprocess.Popen, log_path: Path, timeout: float = 60) -> None:
    from jobs.schedule import _client

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"ray start exited {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            _client(address).list_jobs()
            return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(1)
    pytest.fail(f"Ray Jobs API at {address} not ready in {timeout}s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_submit_runs_the_job_on_the_cluster_and_publishes_a_version(tmp_path, tiny_dir, ray_head):
    from versions.catalog import read_current
    from versions.store import open_store

    write_fact_log(fact_log_rows(3, 2), tmp_path / "log" / "day=2026-11-01" / "part-0.parquet")
    spec = NightlySpec(store=str(tmp_path / "store"), fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                       num_shards=2, workers=0)
    spec_file = tmp_path / "nightly.yaml"
    spec_file.write_text(spec.to_yaml())

    result = engram("submit", "--spec", str(spec_file), "--address", ray_head, "--wait", "--wait-timeout", "120",
                    "--json")

    assert result.exit_code == 0, result.output
    submitted = json.loads(result.stdout)
    assert submitted["status"] == "SUCCEEDED", submitted["logs_tail"]
    assert submitted["report"]["version"] == 1 and submitted["report"]["facts"] == 6
    manifest, _ = read_current(open_store(str(tmp_path / "store")))
    assert manifest.version == 1


def test_submit_makes_local_relative_paths_absolute_and_leaves_uris(tmp_path):
    from jobs.schedule import spec_for_cluster

    spec = NightlySpec(store="s3://bucket/engram", fact_log="./log", model="/models/tiny")
    moved = spec_for_cluster(spec, base_dir=tmp_path)
    assert (moved.store, moved.fact_log, moved.model) == ("s3://bucket/engram", str(tmp_path / "log"), "/models/tiny")
