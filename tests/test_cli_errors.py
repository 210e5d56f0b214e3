"""The CLI's contract on bad input: one line on stderr, exit 2 for a bad argument (1 for a run
that failed), and with --json one JSON object on stdout even when the night fails."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from jobs.cli import app

runner = CliRunner()


def engram(*args: str):
    return runner.invoke(app, list(args))


def test_a_night_with_a_missing_fact_log_or_model_exits_2_before_creating_the_store(tmp_path, tiny_dir):
    store = tmp_path / "store"
    (tmp_path / "log").mkdir()
    for flags in (["--fact-log", str(tmp_path / "nope"), "--model", str(tiny_dir)],
                  ["--fact-log", str(tmp_path / "log"), "--model", str(tmp_path / "no-model")]):
        result = engram("run", "nightly", "--store", str(store), *flags, "--workers", "0", "--json")
        assert result.exit_code == 2, result.output
        assert "no such file or directory" in result.stderr
        assert json.loads(result.stdout) == {"published": False, "error": result.stderr.strip()[len("error: "):],
                                             "exit_code": 2}
    assert not store.exists()
    (tmp_path / "log" / "day=1").mkdir()
    result = engram("run", "nightly", "--store", str(store), "--fact-log", str(tmp_path / "log" / "day=*"), "--model",
                    str(tiny_dir), "--workers", "0")
    assert result.exit_code == 2 and "no such file or directory; a glob (*, ?, [...]) is not expanded" in result.stderr
    assert not store.exists()


def test_a_night_without_spec_or_paths_names_the_flags_to_give(tmp_path):
    """`engram run nightly` alone said `flags: missing required key(s) ['fact_log', 'model', 'store']`:
    the spec's key names, not the flags to type, and no word of --spec."""
    for args, missing in (([], "--store, --fact-log, --model"), (["--store", str(tmp_path / "s")], "--fact-log, --model")):
        result = engram("run", "nightly", *args, "--json")
        assert result.exit_code == 2, result.output
        assert f"missing {missing}; give --spec FILE" in result.stderr
        assert json.loads(result.stdout)["exit_code"] == 2
    assert not (tmp_path / "s").exists()


def test_a_bad_spec_with_json_prints_one_json_object_and_exits_2(tmp_path):
    spec = tmp_path / "spec.yaml"
    for text, message in (("store: s\nfact_log: l\nmodel: m\nbogus: 1\n", "unknown key"),
                          ("store: s\nfact_log: l\nmodel: m\ncompile: {steps: 0}\n", "compile.steps must be at least 1")):
        spec.write_text(text)
        result = engram("run", "nightly", "--spec", str(spec), "--json")
        assert result.exit_code == 2, result.output
        out = json.loads(result.stdout)
        assert out["published"] is False and out["exit_code"] == 2 and message in out["error"]


def test_a_failed_night_prints_one_json_object_on_stdout(tmp_path, tiny_dir):
    log = tmp_path / "log" / "day=1"
    log.mkdir(parents=True)
    (log / "part-0.parquet").write_bytes(b"")  # unreadable, and on_bad_file is 'raise'
    result = engram("run", "nightly", "--store", str(tmp_path / "store"), "--fact-log", str(tmp_path / "log"),
                    "--model", str(tiny_dir), "--workers", "0", "--json")
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["published"] is False and "part-0.parquet" in out["error"] and out["exit_code"] == 1


def test_read_only_commands_on_a_missing_store_exit_2(tmp_path):
    missing = str(tmp_path / "nope")
    for args in (["versions", "--store", missing], ["stats", "--store", missing, "select 1"],
                 ["forget", "--store", missing, "u1"], ["gc", "--store", missing, "--keep", "1"],
                 ["compact", "--store", missing]):
        result = engram(*args)
        assert result.exit_code == 2 and "no such directory" in result.stderr, (args, result.output)
    assert not (tmp_path / "nope").exists()  # a mistyped path is not created


def test_forget_of_an_id_that_is_empty_once_canonical_exits_2_with_one_line(tmp_path):
    (tmp_path / "store").mkdir()
    for user in ("", "\u200b"):
        result = engram("forget", "--store", str(tmp_path / "store"), user)
        assert result.exit_code == 2 and "empty once invisible characters are removed" in result.stderr
        assert "Traceback" not in result.output


def test_a_forget_on_a_store_with_nothing_published_fails_saying_it_was_not_recorded(tmp_path):
    """Before the first night there is no version to carry a forget tombstone: forget said "user not
    found ... nothing to forget", exit 0, and the first night then published the user. Now: exit 1,
    one line saying nothing was forgotten and how to forget them (a forget_user event in the log)."""
    from versions.catalog import read_audit
    from versions.store import open_store

    (tmp_path / "store").mkdir()
    result = engram("forget", "--store", str(tmp_path / "store"), "user-00001", "--json")
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert "nothing is published yet, so the forget of the user cannot be recorded" in result.stderr
    assert "forget_user event" in result.stderr and json.loads(result.stdout)["forgotten"] is False
    assert "run the same forget again" not in result.stderr  # (said of a failure with a version to record in)
    assert read_audit(open_store(str(tmp_path / "store"))) == []


def test_ask_with_an_empty_prompt_exits_2_with_one_line(tmp_path):
    result = engram("ask", "--store", str(tmp_path), "--user", "u1", "  ")
    assert result.exit_code == 2 and "the prompt is empty" in result.stderr and "Traceback" not in result.output


def test_spec_values_of_the_wrong_type_are_refused_before_any_work(tmp_path):
    """YAML reads yes/no as booleans, 20261130 as an int and 'false' (quoted) as a string: each
    is refused with the field's name (one once published a manifest its readers refuse)."""
    spec = tmp_path / "spec.yaml"
    for line, message in (("job_id: 20261130", "field 'job_id' must be a non-empty string or null"),
                          ("num_shards: yes", "field 'num_shards' must be an int or null"),
                          ("num_shards: 100000000", "field 'num_shards' is 100,000,000, over the 65,536 shards"),
                          ("max_trigger_tokens: true", "field 'max_trigger_tokens' must be an int"),
                          ("batches_per_chunk: yes", "field 'batches_per_chunk' must be an int"),
                          ("check_users_per_chunk: no", "field 'check_users_per_chunk' must be an int"),
                          ("recompile_all: 'false'", "field 'recompile_all' must be true or false"),
                          ("gpus_per_worker: yes", "field 'gpus_per_worker' must be a finite number or null"),
                          ("gpus_per_worker: -1", "field 'gpus_per_worker' must be 0 or more"),
                          ("workers: 2.5", "field 'workers' must be an int"),
                          ("compile: {lr: .nan}", "compile.lr must be a finite number"),
                          ("compile: {lr: .inf}", "compile.lr must be a finite number"),
                          ("compile: {context_text: 5}", "compile.context_text must be a non-empty string"),
                          ("compile: {context_text: '  '}", "compile.context_text must be a non-empty string")):
        spec.write_text(f"store: {tmp_path / 's'}\nfact_log: {tmp_path}\nmodel: {tmp_path}\n{line}\n")
        result = engram("run", "nightly", "--spec", str(spec), "--json")
        assert result.exit_code == 2, (line, result.output)
        assert message in json.loads(result.stdout)["error"], line
    assert not (tmp_path / "s").exists()


def test_a_max_file_age_without_a_unit_is_refused_naming_the_field_and_the_forms(tmp_path):
    """``max_file_age: 30`` (days? seconds?) is refused before any work, in a spec and as a flag."""
    spec = tmp_path / "spec.yaml"
    for value in ("30", "0d", "1y", "'-2h'"):
        spec.write_text(f"store: {tmp_path / 's'}\nfact_log: {tmp_path}\nmodel: {tmp_path}\nmax_file_age: {value}\n")
        result = engram("run", "nightly", "--spec", str(spec), "--json")
        assert result.exit_code == 2, (value, result.output)
        error = json.loads(result.stdout)["error"]
        assert "field 'max_file_age'" in error and "'30d', '36h'" in error and "'never'" in error, error
    result = engram("run", "nightly", "--store", str(tmp_path / "s"), "--fact-log", str(tmp_path), "--model",
                    str(tmp_path), "--max-file-age", "7 days")
    assert result.exit_code == 2 and "field 'max_file_age' '7 days'" in result.stderr
    assert not (tmp_path / "s").exists()
    assert "--max-file-age" in engram("run", "nightly", "--help").output


def test_a_spec_with_a_key_given_twice_is_refused_naming_it(tmp_path):
    """Plain YAML keeps the last of two equal keys: `workers: 0` then `workers: 3` would run on Ray,
    two `store:` lines would publish to the second store."""
    spec = tmp_path / "spec.yaml"
    for text, key in ((f"store: {tmp_path / 's'}\nfact_log: {tmp_path}\nmodel: {tmp_path}\nworkers: 0\nworkers: 3\n", "workers"),
                      (f"store: {tmp_path / 's'}\nfact_log: {tmp_path}\nmodel: {tmp_path}\nstore: {tmp_path / 't'}\n", "store"),
                      (f"store: {tmp_path / 's'}\nfact_log: {tmp_path}\nmodel: {tmp_path}\ncompile: {{steps: 2, steps: 20}}\n", "steps")):
        spec.write_text(text)
        result = engram("run", "nightly", "--spec", str(spec), "--json")
        assert result.exit_code == 2, (text, result.output)
        assert f"key '{key}' appears twice" in json.loads(result.stdout)["error"], text
    assert not (tmp_path / "s").exists() and not (tmp_path / "t").exists()


def test_a_damaged_store_gets_one_line_from_every_command_never_a_traceback(local_store, tiny):
    """CURRENT garbage, then a truncated audit record: each operator command says what is wrong in
    one line (exit 1), and `versions` still lists the intact versions a rollback can go to."""
    import numpy as np

    from tests.harness import publish_deltas, random_delta

    rng = np.random.default_rng(8)
    for _ in range(2):
        publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    cli = _cli_here

    local_store.put("CURRENT", b"garbage")
    listed = cli("versions", "--store", local_store.uri, "--json")
    assert listed.returncode == 1 and "CURRENT is damaged" in listed.stderr and "Traceback" not in listed.stderr
    assert [r["version"] for r in json.loads(listed.stdout)] == [1, 2]
    for args in (["stats", "--store", local_store.uri, "select count(*) from facts"],
                 ["gc", "--store", local_store.uri, "--keep", "1"]):
        result = cli(*args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        assert "CURRENT" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert cli("rollback", "--store", local_store.uri, "--to", "2").returncode == 0

    audit = local_store.list("audit/")[-1]
    local_store.put(audit, local_store.get(audit)[:10])
    for args in (["versions", "--store", local_store.uri], ["rollback", "--store", local_store.uri, "--to", "1"]):
        result = cli(*args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        assert audit in result.stderr, result.stderr


def test_durations_that_are_not_finite_positive_numbers_are_refused_naming_the_option(tmp_path):
    """NaN, inf or negative durations busy-looped the store or stopped a serving thread (0 polls
    again at once: asked for, e.g. in tests)."""
    for args, option in ((["pull", "--store", str(tmp_path), "--interval", "nan"], "--interval"),
                         (["pull", "--store", str(tmp_path), "--interval", "-1"], "--interval"),
                         (["serve", "--store", str(tmp_path), "--interval", "inf"], "--interval"),
                         (["serve", "--store", str(tmp_path), "--batch-wait-ms", "nan"], "--batch-wait-ms"),
                         (["serve", "--store", str(tmp_path), "--batch-wait-ms", "-1"], "--batch-wait-ms"),
                         (["submit", "--spec", "s.yaml", "--address", "http://h:8265", "--connect-timeout", "nan"],
                          "--connect-timeout")):
        result = engram(*args)
        assert result.exit_code == 2, (args, result.output)
        assert option in result.output, (args, result.output)


def test_model_configs_and_cron_fields_of_the_wrong_kind_are_refused():
    import pytest

    from engram_core.config import ConfigError, EngramConfig
    from jobs.schedule import ScheduleError, validate_cron

    good = EngramConfig().to_dict()
    for bad in ({"layers": ["1", 3]}, {"layers": [True, 3]}, {"layers": [1.0]}, {"write_layer": True},
                {"write_layer": 3.0}):
        with pytest.raises(ConfigError):
            EngramConfig.from_dict({**good, **bad})
    for cron in ("*/\u00b2 * * * *", "\u0663 * * * *"):  # a superscript two, an Arabic-Indic three
        with pytest.raises(ScheduleError):
            validate_cron(cron)


def test_every_json_command_prints_one_failure_object_with_its_exit_code(tmp_path):
    """--json promises one JSON object on stdout: a refused rollback, gc, versions, stats, forget,
    pull, compact or ask prints ``{key: false, "error", "exit_code"}`` (key per command, as
    submit/schedule/run nightly do), with the same exit code and the human line on stderr."""
    from jobs.nightly_cli import JSON_FAILURE_KEYS

    store, missing = tmp_path / "store", str(tmp_path / "nope")
    store.mkdir()
    for args, code in ((["rollback", "--store", str(store), "--to", "9"], 2),  # no version 9: a bad request
                       (["gc", "--store", str(store), "--keep", "0"], 2),
                       (["versions", "--store", missing], 2),
                       (["stats", "--store", str(store), "select bogus"], 2),
                       (["forget", "--store", missing, "u1"], 2),
                       (["forget", "--store", str(store), "\u200b"], 2),
                       (["pull", "--store", missing], 2),
                       (["compact", "--store", str(store), "--shards", "x"], 2),
                       (["compact", "--store", missing], 2),
                       (["ask", "--store", missing, "--user", "u1", "hi"], 2)):
        result = engram(*args, "--json")
        assert result.exit_code == code, (args, result.output)
        lines = result.stdout.strip().splitlines()
        assert len(lines) == 1, (args, result.stdout)
        out = json.loads(lines[0])
        assert out == {JSON_FAILURE_KEYS[args[0]]: False, "error": out["error"], "exit_code": code}, (args, out)
        assert out["error"] and result.stderr.startswith(f"error: {out['error']}"), (args, result.stderr)
        plain = engram(*args)  # without --json: the same line and code, nothing on stdout
        assert plain.exit_code == code and plain.stdout == "" and plain.stderr == result.stderr, args


def test_an_error_that_escapes_a_json_command_still_prints_its_failure_object(local_store, tiny):
    """The console script's last resort (a damaged store: one line, exit 1) prints the command's
    failure object too; a damaged manifest is exit 1 (a damaged store) for gc and compact, not 2."""
    import numpy as np

    from tests.harness import publish_deltas, random_delta

    publish_deltas(local_store, tiny, {"alice": random_delta(tiny, np.random.default_rng(3))})
    cli = _cli_here

    local_store.put("CURRENT", b"garbage")
    for args, key in ((["stats", "--store", local_store.uri, "select 1"], "queried"),
                      (["gc", "--store", local_store.uri, "--keep", "1"], "collected")):
        result = cli(*args, "--json")
        assert result.returncode == 1 and "Traceback" not in result.stderr, (args, result.stderr)
        out = json.loads(result.stdout)
        assert out[key] is False and out["exit_code"] == 1 and "CURRENT" in out["error"], (args, out)
    assert cli("rollback", "--store", local_store.uri, "--to", "1").returncode == 0
    manifest = local_store.list("manifests/")[-1]
    local_store.put(manifest, local_store.get(manifest)[:200])
    for args, key in ((["gc", "--store", local_store.uri, "--keep", "1"], "collected"),
                      (["compact", "--store", local_store.uri], "published")):
        result = cli(*args, "--json")
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        assert json.loads(result.stdout) == {key: False, "error": json.loads(result.stdout)["error"], "exit_code": 1}


def test_stats_with_a_date_python_cannot_hold_is_a_clear_error_naming_the_column(local_store, tiny):
    """DuckDB holds dates past 9999 and infinity, Python does not: the result's column is named with
    the fix (exit 2, a query to change), never an OverflowError traceback; the fix works. (On a store
    with a version: where nothing is published, stats refuses any query that runs.)"""
    import numpy as np

    from tests.harness import publish_deltas, random_delta

    publish_deltas(local_store, tiny, {"alice": random_delta(tiny, np.random.default_rng(4))})
    store = local_store.uri
    for sql, column in (("select 1 as n, timestamp '294247-01-10 04:00:54' as t", "t"),
                        ("select 'infinity'::date as d", "d"),
                        ("select '-infinity'::timestamptz as \"when\"", "when"),
                        ("select [date '0001-01-01' - 1] as l", "l")):
        for flags in ([], ["--json"]):
            result = engram("stats", "--store", store, *flags, sql)
            assert result.exit_code == 2, (sql, result.output, result.exception)
            line = result.stderr.strip()
            assert "\n" not in line and f"column '{column}'" in line and f'CAST("{column}" AS VARCHAR)' in line, line
            if flags:
                assert json.loads(result.stdout) == {"queried": False, "error": line[len("error: "):], "exit_code": 2}
    fixed = engram("stats", "--store", store, "--json", "select CAST(\"t\" AS VARCHAR) as t from "
                                                        "(select 'infinity'::timestamp as t)")
    assert fixed.exit_code == 0 and json.loads(fixed.stdout) == [{"t": "infinity"}], fixed.output


def test_serve_with_a_bad_or_busy_port_says_so_in_one_line_naming_it(tmp_path):
    """Out of range: exit 2 before anything loads (was an OverflowError traceback); in use: exit 2
    naming the port and --port (was '[Errno 98] Address already in use'), also before the model loads."""
    import socket

    for port in ("99999", "-1"):
        result = engram("serve", "--store", str(tmp_path), "--port", port)
        assert result.exit_code == 2, result.output
        assert result.stderr == f"error: --port {port} is not a port; give one from 1 to 65535 (0: any free port)\n"
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = engram("serve", "--store", str(tmp_path / "nope"), "--port", str(port))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "--port" in result.stderr
    result = engram("serve", "--store", str(tmp_path), "--host", "no-such-host.invalid")
    assert result.exit_code == 2 and "--host no-such-host.invalid: not a known address" in result.stderr


def test_paths_that_are_files_where_a_directory_belongs_get_one_line_naming_them(tmp_path):
    """A store, --cache-dir, --workdir, model directory or checkpoint that is a regular file (or
    inside one): exit 2, one `error:` line naming the path and what to give, nothing created."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    store = tmp_path / "store"
    store.mkdir()
    log = tmp_path / "log"
    log.mkdir()
    for args, message in (
            (["versions", "--store", str(a_file)], f"store {a_file}: is a file, not a directory"),
            (["stats", "--store", str(a_file), "select 1"], f"store {a_file}: is a file, not a directory"),
            (["forget", "--store", str(a_file), "u1"], f"store {a_file}: is a file, not a directory"),
            (["gc", "--store", str(a_file), "--keep", "1"], f"store {a_file}: is a file, not a directory"),
            (["compact", "--store", str(a_file)], f"store {a_file}: is a file, not a directory"),
            (["rollback", "--store", str(a_file), "--to", "1"], f"store {a_file}: is a file, not a directory"),
            (["pull", "--store", str(a_file)], f"store {a_file}: is a file, not a directory"),
            (["run", "nightly", "--store", str(a_file), "--fact-log", str(log), "--model", str(tmp_path)],
             f"store {a_file} is a file, not a directory"),
            (["run", "nightly", "--store", str(store), "--fact-log", str(log), "--model", str(a_file)],
             f"model {a_file}: is a file, not a checkpoint directory"),
            (["pull", "--store", str(store), "--cache-dir", str(a_file)], f"--cache-dir {a_file} is a file"),
            (["ask", "--store", str(store), "--user", "u1", "--cache-dir", str(a_file / "sub"), "hi"],
             f"--cache-dir {a_file / 'sub'} is inside {a_file}, which is a file"),
            (["serve", "--store", str(store), "--cache-dir", str(a_file)], f"--cache-dir {a_file} is a file"),
            (["demo", "--workdir", str(a_file)], f"--workdir {a_file} is a file"),
            (["demo", "--workdir", str(tmp_path / "w"), "--store", str(a_file)], f"--store {a_file} is a file"),
            (["model", "init", str(a_file), "--tiny"], f"model directory {a_file} is a file"),
            (["model", "init", str(a_file / "m"), "--tiny"], f"model directory {a_file / 'm'} is inside {a_file}"),
            (["model", "init", str(tmp_path), "--tiny"], f"model directory {tmp_path} is not empty"),
            (["model", "info", str(a_file)], f"checkpoint {a_file}: is a file, not a checkpoint directory"),
            (["model", "info", str(tmp_path / "nope")], f"checkpoint {tmp_path / 'nope'}: no such directory"),
            (["model", "accept-adapter", str(a_file)], f"checkpoint {a_file}: is a file")):
        result = engram(*args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, (args, result.stderr)
    assert a_file.read_text() == "not a directory" and not (tmp_path / "w").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "log", "store"]


def test_an_unreadable_log_file_names_the_spec_field_and_the_flag_that_rejects_it(tmp_path, tiny_dir):
    """The error suggests on_bad_file='reject' (the spec) and --on-bad-file reject (the command
    line); the flag, as spelled there, turns the file into one reject row and the night succeeds."""
    log = tmp_path / "log" / "day=1"
    log.mkdir(parents=True)
    (log / "part-0.parquet").write_bytes(b"not parquet")
    args = ["run", "nightly", "--store", str(tmp_path / "store"), "--fact-log", str(tmp_path / "log"),
            "--model", str(tiny_dir), "--workers", "0", "--json"]
    result = engram(*args)
    assert result.exit_code == 1, result.output
    error = json.loads(result.stdout)["error"]
    assert "on_bad_file='reject' in the job spec, --on-bad-file reject on the command line" in error, error
    flag = error.split("the job spec, ")[1].split(" on the command line")[0].split()
    assert flag == ["--on-bad-file", "reject"]
    rejected = engram(*args, *flag)
    assert rejected.exit_code == 0, rejected.output
    assert json.loads(rejected.stdout)["rejects"] == 1


def test_a_model_change_names_the_flag_and_the_spec_field_that_allow_it():
    import pytest

    from pipeline.plan import FingerprintMismatch, check_model_change

    with pytest.raises(FingerprintMismatch, match=r"rerun with --recompile-all \(recompile_all: true in the job spec\)"):
        check_model_change("m1", "m2", recompile_all=False)


def test_a_pull_that_loads_nothing_flags_its_poll_object_as_the_failure(local_store, tiny, tiny_dir, tmp_path):
    """`pull --json` prints one object per poll; when the command fails (exit 1: nothing could be
    loaded), its one object is also the failure object (pulled: false, exit_code: 1), and the
    error line is on stderr as without --json."""
    import numpy as np

    from tests.harness import publish_deltas, random_delta

    manifest = publish_deltas(local_store, tiny, {"alice": random_delta(tiny, np.random.default_rng(5))})
    local_store.delete(manifest.shards[0].bundle_key)
    result = engram("pull", "--store", local_store.uri, "--model", str(tiny_dir), "--cache-dir",
                    str(tmp_path / "cache"), "--json")
    assert result.exit_code == 1, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout
    out = json.loads(lines[0])
    assert out["pulled"] is False and out["exit_code"] == 1 and out["error"] and out["version"] is None, out
    assert f"error: {out['error']} (still serving nothing)" in result.stderr, result.stderr


def test_a_config_or_chat_template_that_is_not_utf8_is_named_not_a_codec_error(tmp_path, tiny):
    import pytest

    from serving.chat import ChatTemplate

    checkpoint = tmp_path / "model"
    (checkpoint / "engram").mkdir(parents=True)
    (checkpoint / "engram" / "config.json").write_bytes(b'{"seed": "caf\xe9"}')
    result = engram("model", "info", str(checkpoint), "--json")
    assert result.exit_code == 1, (result.output, result.exception)
    out = json.loads(result.stdout)
    assert out["inspected"] is False and out["exit_code"] == 1
    assert f"engram config {checkpoint / 'engram' / 'config.json'}: not UTF-8 JSON (byte 0xe9" in out["error"], out
    template = tmp_path / "chat.jinja"
    template.write_bytes("{{ messages[0]['content'] }} \u00e9".encode("latin-1"))
    with pytest.raises(ValueError, match=f"chat template {template}: not UTF-8 text \\(byte 0xe9"):
        ChatTemplate(tiny.tokenizer, template)


def test_a_command_line_that_cannot_be_parsed_with_json_still_prints_one_json_object(tmp_path):
    """The console script (jobs.cli.run), as a user runs it: an unknown option, a missing argument
    or option, a value of the wrong type, each with --json: one failure object on stdout (exit 2)
    and click's usage message on stderr; without --json, stdout stays empty."""
    import subprocess
    import sys

    def process(*args):
        return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path)

    cases = [(["run", "nightly", "--json", "--bogus"], "published", "No such option: --bogus"),
             (["stats", "--json"], "queried", "Missing argument"),
             (["gc", "--json", "--store", str(tmp_path), "--keep", "abc"], "collected", "'--keep'"),
             (["versions", "--json"], "listed", "Missing option '--store'")]
    for args, key, message in cases:
        cli = process if key == "published" else _cli_here  # the real process once; the function for the rest
        result = cli(*args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        out = json.loads(result.stdout)
        assert out[key] is False and out["exit_code"] == 2 and message in out["error"], (args, out)
        assert "Usage: " in result.stderr and message in result.stderr and "Traceback" not in result.stderr
        plain = cli(*[a for a in args if a != "--json"])
        assert plain.returncode == 2 and plain.stdout == "" and "Usage: " in plain.stderr
    helped = _cli_here("versions", "--json", "--help")  # --help is not a failure
    assert helped.returncode == 0 and "Usage: " in helped.stdout and "exit_code" not in helped.stdout


def test_a_store_uri_that_names_no_store_is_a_bad_argument_for_every_command(tmp_path):
    """`s3://` (no bucket), an S3 prefix with an empty or '.' segment, a bucket name S3 cannot
    have, another scheme, a file URI naming a host: exit 2 (a bad argument, not a store that
    failed), one `error:` line naming the URI and what to give, with --json one failure object
    with that exit_code; refused before any request, nothing created."""
    from jobs.nightly_cli import JSON_FAILURE_KEYS

    log = tmp_path / "log"
    log.mkdir()
    spec = tmp_path / "spec.yaml"
    for uri in ("s3://", "s3:///engram", "s3://bkt/a//b", "s3://bkt/./b", "s3://my bucket/engram", "http://host/store",
                "file://host/store"):
        spec.write_text(f"store: '{uri}'\nfact_log: {log}\nmodel: {tmp_path}\n")
        for args in (["versions", "--store", uri], ["stats", "--store", uri, "select 1"],
                     ["rollback", "--store", uri, "--to", "1"], ["forget", "--store", uri, "u1"],
                     ["gc", "--store", uri, "--keep", "1"], ["compact", "--store", uri],
                     ["pull", "--store", uri], ["ask", "--store", uri, "--user", "u1", "hi"],
                     ["run", "nightly", "--store", uri, "--fact-log", str(log), "--model", str(tmp_path), "--workers", "0"],
                     ["run", "nightly", "--spec", str(spec)],
                     ["demo", "--store", uri, "--workdir", str(tmp_path / "w")],
                     ["submit", "--spec", str(spec), "--address", "http://127.0.0.1:9"]):
            result = engram(*args, "--json")
            assert result.exit_code == 2, (uri, args, result.output)
            out = json.loads(result.stdout)
            assert out == {JSON_FAILURE_KEYS[args[0]]: False, "error": out["error"], "exit_code": 2}, (uri, args, out)
            assert f"store URI {uri!r}: " in out["error"] and "; give " in out["error"], (uri, args, out)
            assert result.stderr == f"error: {out['error']}\n", (uri, args, result.stderr)
            plain = engram(*args)
            assert plain.exit_code == 2 and plain.stdout == "" and plain.stderr == result.stderr, (uri, args)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "spec.yaml"]


def test_a_location_holding_an_unexpanded_environment_variable_is_refused_and_nothing_is_made(tmp_path, tiny_dir,
                                                                                                 monkeypatch):
    """A job spec (or a quoted argument) with ``store: $HOME/engram-store`` is read as written: the
    night created a folder named ``$HOME`` under the working directory and published there, where
    no serving node looked. A store, fact_log or model holding ``$NAME`` or ``${NAME}`` is exit 2
    naming the field, the variable (and its value here) and the fix; nothing is created."""
    from jobs.nightly_cli import JSON_FAILURE_KEYS

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ENGRAM_TEST_LOGS", str(tmp_path / "log"))
    monkeypatch.delenv("ENGRAM_TEST_UNSET", raising=False)
    (tmp_path / "log").mkdir()
    spec = tmp_path / "spec.yaml"
    cases = [("store", "$HOME/engram-store", "store URI '$HOME/engram-store' holds '$HOME'"),
             ("store", "s3://bkt/${ENGRAM_TEST_UNSET}/engram", "holds '${ENGRAM_TEST_UNSET}'"),
             ("fact_log", "${ENGRAM_TEST_LOGS}", f"(here ENGRAM_TEST_LOGS is {str(tmp_path / 'log')!r})"),
             ("model", "$ENGRAM_TEST_LOGS/model", "holds '$ENGRAM_TEST_LOGS'")]
    for field, value, words in cases:
        paths = {"store": str(tmp_path / "store"), "fact_log": str(tmp_path / "log"), "model": str(tiny_dir)}
        paths[field] = value
        spec.write_text("".join(f"{key}: '{path}'\n" for key, path in paths.items()) + "workers: 0\n")
        result = engram("run", "nightly", "--spec", str(spec), "--json")
        assert result.exit_code == 2, (field, result.output)
        out = json.loads(result.stdout)
        assert out == {"published": False, "error": out["error"], "exit_code": 2}
        assert words in out["error"] and "an environment variable that is not expanded" in out["error"], out
        assert "write the path itself" in out["error"] and field in out["error"]
    for args in (["versions", "--store", "$HOME/engram-store"], ["stats", "--store", "$HOME/engram-store", "select 1"],
                 ["forget", "--store", "$HOME/engram-store", "u1"], ["pull", "--store", "$HOME/engram-store"],
                 ["pull", "--store", str(tmp_path / "log"), "--cache-dir", "$HOME/cache"],
                 ["ask", "--store", str(tmp_path / "log"), "--user", "u1", "--model", "$HOME/model", "hi"],
                 ["model", "info", "$HOME/model"]):
        result = engram(*args, "--json")
        assert result.exit_code == 2, (args, result.output)
        assert json.loads(result.stdout)[JSON_FAILURE_KEYS[args[0]]] is False
        assert "holds '$HOME', an environment variable that is not expanded" in json.loads(result.stdout)["error"]
    result = engram("model", "init", "$HOME/model", "--tiny")
    assert result.exit_code == 2 and "model directory '$HOME/model' holds '$HOME'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "spec.yaml"]
    # A '$' that is no variable set here, or a local path that exists as written, is a name: S3 keys and
    # file names may hold one (Hadoop's _$folder$ markers, 'team$prod', Windows' $RECYCLE.BIN).
    from versions.store import parse_store_uri, unexpanded_variable

    monkeypatch.delenv("folder", raising=False)
    monkeypatch.delenv("prod", raising=False)
    assert parse_store_uri("s3://bkt/logs_$folder$/engram") == ("s3", "bkt", "logs_$folder$/engram")
    assert parse_store_uri("s3://bkt/team$prod") == ("s3", "bkt", "team$prod")
    literal = tmp_path / "$HOME"
    literal.mkdir()
    assert unexpanded_variable(str(literal), "store URI") is None
    assert unexpanded_variable(str(tmp_path / "$HOME-not-there"), "store URI") is not None


def test_a_store_uri_error_that_escapes_a_command_is_still_exit_2():
    """The console script's last resort maps a bad store URI to 2 as the commands do (with --json
    in the failure object too)."""
    import subprocess
    import sys

    code = ("import sys, typer\n"
            "from versions.store import open_store\n"
            "from jobs import cli\n"
            "@cli.app.command('probe-uri')\n"
            "def probe(as_json: bool = typer.Option(False, '--json')):\n"
            "    open_store('s3://bkt/a//b')  # not caught by the command\n"
            "sys.argv = ['engram', 'probe-uri', '--json']\n"
            "cli.run()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    out = json.loads(result.stdout)
    assert out["exit_code"] == 2 and "store URI 's3://bkt/a//b'" in out["error"]
    assert result.stderr.startswith("error: BadStoreURI: store URI 's3://bkt/a//b'") and result.stderr.count("\n") == 1


import pytest  # noqa: E402


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_an_interrupted_night_with_json_prints_one_failure_object_and_exits_128_plus_the_signal(
        tmp_path, tiny_dir, signum, code):
    """Ctrl-C (SIGINT to the process group) or SIGTERM of `engram run nightly --json`: stdout holds one
    JSON object, the failure object with the resume hint, and the exit code is 130 / 143 (it was
    click's "Aborted!" with exit 1, or Ray's SIGTERM handler's bare exit, and no object)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from jobs.synthetic import fact_log_rows, write_fact_log

    # 600 users: the compile runs ~30 s after the marker below (60 users finished first once under
    # load); the night is interrupted at the marker (~1 s in), so the larger log costs nothing
    write_fact_log(fact_log_rows(600, 6), tmp_path / "log" / "day=1" / "part-0.parquet")
    store = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # The night gets Ctrl-C's default disposition, as from a terminal or a service manager: a test run
    # started in the background by a non-interactive shell (`pytest ... &`) has SIGINT ignored, which
    # its children inherit, and a program started so keeps ignoring it (Python's rule, and ours): the
    # night then ran to the end and published, and this test failed for that reason alone.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from jobs.cli import run; sys.argv[0] = 'engram'; run()", "run", "nightly",
         "--store", str(store), "--fact-log", str(tmp_path / "log"), "--model", str(tiny_dir), "--workers", "0",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list((store / "objects").glob("state/*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)  # the apply stage has written state: the compile is under way
    assert proc.poll() is None, "the night ended before it could be interrupted"
    os.killpg(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, (out, err[-2000:])
    assert out.strip(), err[-3000:]
    reported = json.loads(out)  # one object, nothing else on stdout
    assert reported["published"] is False and reported["exit_code"] == code
    assert reported["error"].startswith(f"interrupted ({signal.Signals(signum).name})") and "run the night again" \
        in reported["error"]


def test_ray_log_lines_forwarded_to_the_driver_stay_off_stdout_under_json(tmp_path):
    """Under --json stdout holds the command's JSON and nothing else. Ray's driver forwards its
    workers' and raylet's log lines to sys.stdout from a thread of its own: after a Ctrl-C of
    `engram run nightly --json` on Ray, two `(raylet) Task CompileWorker.compile failed ... will be
    retried` lines followed the failure object on stdout. A real local Ray cluster; a task prints."""
    import subprocess
    import sys
    from pathlib import Path

    script = (
        "import json, time\n"
        "from jobs.cli import _stdout_for_json_only\n"
        "_stdout_for_json_only()\n"
        "import ray  # as the CLI imports it: with the command\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False)\n"
        "@ray.remote(num_cpus=0)\n"
        "class Chatty:\n"
        "    def say(self):\n"
        "        print('a line a task printed', flush=True)\n"
        "actors = [Chatty.remote() for _ in range(3)]  # one line from three processes: deduplicated\n"
        "ray.get([a.say.remote() for a in actors])\n"
        "deadline = time.monotonic() + 30\n"
        "while time.monotonic() < deadline and open(%r).read().count('a line a task printed') < 3:\n"
        "    time.sleep(0.2)  # the driver's log thread has forwarded them\n"
        "print(json.dumps({'published': True}), flush=True)\n"
        "ray.shutdown()\n")
    err_file = tmp_path / "stderr.txt"
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    with open(err_file, "w") as err:
        proc = subprocess.run([sys.executable, "-c", script % str(err_file)], stdout=subprocess.PIPE, stderr=err,
                              env=env, timeout=180, text=True)
    stderr = err_file.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert stderr.count("a line a task printed") == 3  # forwarded, to stderr
    assert json.loads(proc.stdout) == {"published": True}, proc.stdout


def test_a_missing_path_or_a_bad_choice_is_a_bad_argument_with_one_line_naming_it_and_the_fix(tmp_path):
    """A --chat-template that is no file, a --model / model / checkpoint that is no checkpoint
    (not there, a folder of something else), a --family engram cannot build: exit 2 and one
    `error:` line naming the item and what to give, before any model loads (was exit 1 with the
    loader's or a ValueError's words)."""
    store, empty = tmp_path / "store", tmp_path / "empty"
    store.mkdir()
    empty.mkdir()
    (tmp_path / "log").mkdir()
    missing = tmp_path / "nope"
    partial, unweighted = tmp_path / "partial", tmp_path / "unweighted"  # an interrupted build or copy
    for root in (partial, unweighted):
        for name in ("base/config.json", "tokenizer/tokenizer.json", "engram/config.json"):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text("{}")
    (unweighted / "engram" / "weights.safetensors").write_bytes(b"")
    for args, message in (
            (["run", "nightly", "--store", str(store), "--fact-log", str(tmp_path / "log"), "--model", str(partial)],
             f"model {partial}: missing engram/weights.safetensors (an incomplete copy or an interrupted build: copy "
             "the whole checkpoint again"),
            (["serve", "--store", str(store), "--port", "0", "--model", str(unweighted)],
             f"--model {unweighted}: base/ holds no weights (*.safetensors or *.bin)"),
            (["serve", "--store", str(store), "--port", "0", "--chat-template", str(missing / "t.jinja")],
             f"--chat-template {missing / 't.jinja'}: no such file; give a Jinja chat template file"),
            (["serve", "--store", str(store), "--port", "0", "--chat-template", str(empty)],
             f"--chat-template {empty}: is a directory; give a Jinja chat template file"),
            (["ask", "--store", str(store), "--user", "u1", "--model", str(missing), "hi"],
             f"--model {missing}: no such file or directory; give a checkpoint's directory"),
            (["pull", "--store", str(store), "--model", str(empty)],
             f"--model {empty}: not a checkpoint (it has none of base/, tokenizer/, engram/); give a checkpoint's"),
            (["serve", "--store", str(store), "--port", "0", "--model", str(missing)], f"--model {missing}: no such"),
            (["run", "nightly", "--store", str(store), "--fact-log", str(tmp_path / "log"), "--model", str(empty)],
             f"model {empty}: not a checkpoint"),
            (["model", "info", str(empty)], f"checkpoint {empty}: not a checkpoint"),
            (["model", "init", str(tmp_path / "m3"), "--tiny", "--family", "mistral"],
             "--family mistral: unknown model family; choose one of llama, qwen2, gpt2")):
        result = engram(*args)
        assert result.exit_code == 2, (args, result.output, result.exception)
        assert result.stderr.startswith(f"error: {message}") and result.stderr.count("\n") == 1, (args, result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "log", "partial", "store", "unweighted"]
    assert list(store.iterdir()) == []


def test_an_unreachable_ray_address_is_a_bad_argument_named_with_the_fix_at_once(tmp_path, tiny_dir):
    """--ray-address of a port nothing listens on (Ray Client retried 30 s, then `ConnectionError:
    ray client connection timeout`, exit 1) or of a host that does not resolve: exit 2 at once, one
    line naming the address and what to do; with --json the failure object says the same."""
    import subprocess
    import sys
    import time

    from jobs.synthetic import fact_log_rows, write_fact_log
    from tests.conftest import free_port

    write_fact_log(fact_log_rows(1, 1), tmp_path / "log" / "part-0.parquet")
    for address in (f"ray://127.0.0.1:{free_port()}", "no-such-host.invalid:6379", "localhost"):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "jobs.cli", "run", "nightly", "--store", str(tmp_path / "store"),
                                 "--fact-log", str(tmp_path / "log"), "--model", str(tiny_dir), "--workers", "1",
                                 "--ray-address", address, "--json"],
                                capture_output=True, text=True, timeout=120, env={**__import__("os").environ,
                                                                                  "RAY_ADDRESS": ""})
        assert result.returncode == 2 and time.monotonic() - started < 25, (address, result.stderr)
        out = json.loads(result.stdout)
        assert out["published"] is False and out["exit_code"] == 2
        assert f"ray_address {address}: cannot reach the Ray cluster (" in out["error"], out
        assert "or leave ray_address out (no --ray-address) to start a local cluster" in out["error"]
        assert result.stderr == f"error: {out['error']}\n", result.stderr
        if address == "localhost":  # no port: Ray's "ValueError: Invalid address format: localhost", exit 1
            assert "(no port: a cluster's address is localhost:6379 (its head node's GCS port))" in out["error"]


def test_verbose_is_taken_after_the_subcommand_too(tmp_path, tiny_dir, monkeypatch, capsys):
    """`engram model info DIR -v` said "No such option: -v": -v/--verbose worked only before the
    subcommand. The console script (jobs.cli.run) takes it after any subcommand as well."""
    import logging
    import sys

    import pytest

    from jobs.cli import run

    import signal

    root = logging.getLogger()
    monkeypatch.setattr(root, "level", logging.WARNING)
    # run() sets this process's SIGTERM and SIGINT handlers (to ignore them once the command ends):
    # put back, or every process this test session starts later would inherit SIGTERM ignored
    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        for args, code in ((["model", "info", str(tiny_dir), "-v"], 0),
                           (["versions", "--store", str(tmp_path), "--verbose"], 0),
                           (["-v", "model", "info", str(tiny_dir)], 0),
                           (["versions", "--store", str(tmp_path / "nope"), "-v"], 2)):
            root.setLevel(logging.WARNING)
            monkeypatch.setattr(sys, "argv", ["engram", *args])
            with pytest.raises(SystemExit) as exited:
                run()
            err = capsys.readouterr().err
            assert exited.value.code == code and "No such option" not in err, (args, err)
            assert root.level == logging.INFO, args
        monkeypatch.setattr(sys, "argv", ["engram", "gc", "--help"])
        with pytest.raises(SystemExit):
            run()
        assert "--verbose" in capsys.readouterr().out
    finally:
        for number, handler in saved.items():
            signal.signal(number, handler)


def test_the_cli_prints_no_library_progress_bars_or_harmless_library_warnings(tmp_path, tiny_dir):
    """`model init` printed transformers' "Writing model shards" bar; a night (and ask, pull, serve)
    its "Loading weights" bar and peft's `is_gradient_checkpointing` FutureWarning. The console
    script's stderr has none of them; a real problem still gets its line."""
    import subprocess
    import sys

    from jobs.synthetic import fact_log_rows, write_fact_log

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True, timeout=300,
                              env={k: v for k, v in __import__("os").environ.items()
                                   if k != "HF_HUB_DISABLE_PROGRESS_BARS"})

    noise = ("Loading weights", "Writing model shards", "is_gradient_checkpointing", "it/s]")
    made = cli("model", "init", str(tmp_path / "m"), "--tiny")
    assert made.returncode == 0 and made.stderr == "", made.stderr
    write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "part-0.parquet")
    night = cli("run", "nightly", "--store", str(tmp_path / "store"), "--fact-log", str(tmp_path / "log"),
                "--model", str(tiny_dir), "--workers", "0", "--num-shards", "1")
    assert night.returncode == 0 and "published v1" in night.stdout, night.stderr
    assert not [line for line in night.stderr.splitlines() if any(n in line for n in noise)], night.stderr
    refused = cli("model", "init", str(tmp_path / "m2"), "--tiny", "--family", "mistral")
    assert refused.returncode == 2 and refused.stderr.startswith("error: --family mistral"), refused.stderr


def test_an_s3_clients_connection_pool_holds_every_thread_that_shares_it(monkeypatch):
    """The stats query reads parts on 16 threads through one S3 client: with botocore's default
    pool of 10 connections urllib3 warned "Connection pool is full, discarding connection"."""
    from pipeline.stats import _READ_THREADS
    from versions.store import S3Store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    store = S3Store("bucket", "prefix", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    assert store._client.meta.config.max_pool_connections >= _READ_THREADS


def _cli(*args, cwd=None, prefix=()):
    """The console script as a user runs it (jobs.cli.run: its last resort too), in a subprocess
    (``prefix``: a command that runs it, e.g. as another user)."""
    import subprocess
    import sys

    return subprocess.run([*prefix, sys.executable, "-m", "jobs.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _cli_here(*args):
    """The console script's function (jobs.cli.run: ``sys.argv``, its one-line errors and exit codes,
    ``--json``'s stdout) run in this process as in a fresh one: file descriptors 1 and 2 go to files
    of its own, logging, warnings, signal handlers and the environment start as a new interpreter's
    and are put back after. A new interpreter pays ~1-5 s of imports a command; :func:`_cli` runs
    the real process, for what only a process shows (library output at import, signals, users)."""
    import logging
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import warnings

    from jobs import cli

    root = logging.getLogger()
    saved = {"fds": (os.dup(1), os.dup(2)), "streams": (sys.stdout, sys.stderr, sys.argv),
             "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
             "logging": (root.handlers[:], root.level), "environ": dict(os.environ)}
    code = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, warnings.catch_warnings():
        warnings.resetwarnings()  # a fresh interpreter's filters, shown on its stderr
        for action, category, module in (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                                         ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                                         ("ignore", ResourceWarning, None)):
            warnings.filterwarnings(action, category=category, module=module or "")
        warnings.showwarning = warnings._showwarning_orig
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)
        sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)
        sys.argv = ["engram", *args]
        root.handlers = []  # the CLI's logging.basicConfig writes to this stderr, as in its own process
        root.setLevel(logging.WARNING)
        try:
            cli.run()
        except SystemExit as exc:
            code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            if isinstance(sys.stdout, cli._MainThreadStdout):  # --json: its own copy of descriptor 1
                sys.stdout._stdout.close()
            os.dup2(saved["fds"][0], 1), os.dup2(saved["fds"][1], 2)
            os.close(saved["fds"][0]), os.close(saved["fds"][1])
            sys.stdout, sys.stderr, sys.argv = saved["streams"]
            for number, handler in saved["signals"].items():
                signal.signal(number, handler)
            root.handlers = saved["logging"][0]
            root.setLevel(saved["logging"][1])
            os.environ.clear()
            os.environ.update(saved["environ"])
            cli._SIGNALLED.clear()
        out.seek(0), err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    return subprocess.CompletedProcess(["engram", *args], code, stdout, stderr)


def _assert_one_line_exit_2(result, message: str, key: str | None = None):
    """Exit 2, one `error:` line holding ``message``, no traceback; with ``key`` (a --json run) one
    failure object on stdout holding that line."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
    if key:
        assert json.loads(result.stdout) == {key: False, "error": result.stderr[len("error: "):].rstrip("\n")
                                             .removesuffix(" (run with -v for the traceback)"), "exit_code": 2}
    else:
        assert result.stdout == ""


def test_a_chat_template_that_is_not_valid_jinja_or_utf8_exits_2_before_the_model_loads(tmp_path):
    """`serve --chat-template FILE` with a Jinja syntax error (or not UTF-8): exit 2 naming the file,
    the line and --chat-template (was exit 1 once the model and the store had loaded)."""
    (tmp_path / "store").mkdir()  # nothing published: the template is refused before the store is read
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }\n")
    latin = tmp_path / "latin.jinja"
    latin.write_bytes("{{ messages[0]['content'] }} \u00e9".encode("latin-1"))
    for template, message in ((broken, f"chat template {broken}: Jinja syntax error on line 1: "),
                              (latin, f"chat template {latin}: not UTF-8 text (byte 0xe9")):
        result = _cli_here("serve", "--store", str(tmp_path / "store"), "--port", "0", "--chat-template", str(template))
        _assert_one_line_exit_2(result, message)
        assert "--chat-template" in result.stderr or "UTF-8" in result.stderr


def test_a_model_that_is_not_the_stores_exits_2_naming_the_fingerprint_expected_and_the_fixes(
        tiny, tiny_dir, tiny_checkpoints, tmp_path):
    """ask/pull with --model, and a night, given a checkpoint of another fingerprint than the store's
    version: exit 2 (was 1), naming the fingerprint the store expects and how to fix it."""
    from jobs.synthetic import fact_log_rows, write_fact_log
    from versions.catalog import list_versions
    from versions.store import open_store

    store = str(tmp_path / "store")
    write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    first = engram("run", "nightly", "--store", store, "--fact-log", str(tmp_path / "log"), "--model", str(tiny_dir),
                   "--workers", "0", "--num-shards", "1")
    assert first.exit_code == 0, first.output
    write_fact_log(fact_log_rows(3, 1), tmp_path / "log" / "day=2" / "part-0.parquet")
    other = str(tiny_checkpoints("qwen2"))
    expected = tiny.fingerprint[:16]
    cache = str(tmp_path / "cache")
    for args, key, fixes in (
            (["ask", "--store", store, "--user", "user-00000", "--model", other, "--cache-dir", cache, "hi"],
             "answered", ["point --model at the checkpoint with that fingerprint", "leave --model out"]),
            (["pull", "--store", store, "--model", other, "--cache-dir", cache], "pulled",
             ["point --model at the checkpoint with that fingerprint", "leave --model out"]),
            (["run", "nightly", "--store", store, "--fact-log", str(tmp_path / "log"), "--model", other,
              "--workers", "0"], "published", ["--model", "a new store", "--recompile-all"])):
        result = _cli_here(*args, "--json")
        _assert_one_line_exit_2(result, f"compiled for {expected}..", key)
        assert all(fix in result.stderr for fix in fixes), result.stderr
        assert other in result.stderr, result.stderr
    assert [info.version for info in list_versions(open_store(store))] == [1]


def test_rollback_to_a_version_that_does_not_exist_or_was_collected_exits_2_naming_the_versions(local_store, tiny):
    """`rollback --to 999`, to a version gc collected, or on a store with nothing published: a bad
    request, exit 2 (was 1), naming the versions that exist; CURRENT does not move."""
    import numpy as np

    from tests.harness import publish_deltas, random_delta
    from versions.catalog import read_current
    from versions.retention import collect

    rng = np.random.default_rng(2)
    for _ in range(3):
        publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    collect(local_store, 1, actor="test")  # v1 and v2 are collected
    for version in ("999", "1", "0", "v999"):  # v999: as `engram versions` prints a version
        result = _cli_here("rollback", "--store", local_store.uri, "--to", version, "--json")
        _assert_one_line_exit_2(result, f"version {version.lstrip('v')} does not exist, was never published or was "
                                        "collected (available: [3]); roll back to one of those", "rolled_back")
    result = _cli_here("rollback", "--store", local_store.uri, "--to", "seven")
    assert result.returncode == 2 and "give a version number, e.g. 3 or v3" in result.stderr, result.stderr
    assert read_current(local_store)[0].version == 3
    empty = local_store.root.parent / "empty"
    empty.mkdir()
    result = _cli_here("rollback", "--store", str(empty), "--to", "1")
    _assert_one_line_exit_2(result, "nothing is published yet; cannot roll back to version 1")


def test_a_bucket_that_does_not_exist_is_a_bad_argument_for_every_command_and_is_never_created(
        s3_bucket, s3_server, tmp_path, tiny_dir):
    """A store in a bucket the S3 server does not have: every command exits 2 naming the bucket and
    the fix (reads were exit 1; SeaweedFS creates a bucket on the first write, so forget, gc and a
    night wrote into a new, empty bucket and forget said 'user not found', exit 0). A fact log in
    such a bucket, or of a scheme no filesystem opens, is a bad argument too (was exit 1)."""
    missing = f"{s3_bucket}-typo"
    uri = f"s3://{missing}/engram"
    log = tmp_path / "log"
    log.mkdir()
    night = ["run", "nightly", "--fact-log", str(log), "--model", str(tiny_dir), "--workers", "0"]
    for args, key in ((["versions", "--store", uri], "listed"), (["stats", "--store", uri, "select 1"], "queried"),
                      (["rollback", "--store", uri, "--to", "1"], "rolled_back"), (["forget", "--store", uri, "u1"], "forgotten"),
                      (["gc", "--store", uri, "--keep", "1"], "collected"), (["compact", "--store", uri], "published"),
                      (["pull", "--store", uri, "--cache-dir", str(tmp_path / "cache")], "pulled"),
                      ([*night, "--store", uri], "published")):
        result = _cli_here(*args, "--json")
        _assert_one_line_exit_2(result, f"bucket {missing!r} does not exist; check the bucket name in the store URI",
                                key)
    assert missing not in [b["Name"] for b in s3_server.client().list_buckets()["Buckets"]]
    for fact_log, message in ((f"s3://{missing}/log", f"fact log s3://{missing}/log: no such file or folder"),
                              ("s4://bucket/log", "fact log s4://bucket/log: cannot open (")):
        result = _cli_here("run", "nightly", "--store", str(tmp_path / "store"), "--fact-log", fact_log, "--model",
                      str(tiny_dir), "--workers", "0", "--json")
        _assert_one_line_exit_2(result, message, "published")


def test_library_messages_of_several_lines_are_printed_as_one_line(tmp_path):
    """DuckDB's query error (the query and a caret on lines of their own) and a YAML parser's error
    were 3 to 7 lines on stderr; an empty stats query printed '(0 rows)' as an answer (exit 0)."""
    (tmp_path / "store").mkdir()
    spec = tmp_path / "spec.yaml"
    spec.write_text("store: [unclosed\n")
    for args, message, key in (
            (["stats", "--store", str(tmp_path / "store"), "selec 1"],
             'Parser Error: syntax error at or near "selec" LINE 1: selec 1 (query: selec 1); fix the query', "queried"),
            (["stats", "--store", str(tmp_path / "store"), "  "], "stats query is empty; give an SQL query", "queried"),
            (["stats", "--store", str(tmp_path / "store"), " ; -- nothing\n;"],
             "stats query is empty (only ; or comments); give an SQL query", "queried"),
            (["run", "nightly", "--spec", str(spec)],
             f"job spec {spec}: not valid YAML (line 2, column 1: expected ',' or ']', but got '<stream end>'",
             "published")):
        for flags in ([], ["--json"]):
            _assert_one_line_exit_2(_cli_here(*args, *flags), message, key if flags else None)


def test_an_empty_reason_or_a_negative_count_is_refused_as_a_usage_error(tmp_path):
    """`rollback/forget --reason ""` escaped as a ValueError (exit 1, 'run with -v for the traceback');
    `pull --polls -1` was taken (and the command failed later on the empty store, exit 1)."""
    store = str(tmp_path)
    for args in (["rollback", "--store", store, "--to", "1", "--reason", ""],
                 ["forget", "--store", store, "u1", "--reason", " "],
                 ["pull", "--store", store, "--watch", "--polls", "-1"]):
        result = engram(*args)
        assert result.exit_code == 2 and "Traceback" not in result.output, (args, result.output)
        assert ("--reason" if "--reason" in args else "--polls") in result.stderr, (args, result.stderr)


def test_demo_with_a_bad_worker_count_exits_2_and_writes_nothing(tmp_path):
    """It was a SpecError escaping the command (exit 1), after the demo's model and fact log were written."""
    result = engram("demo", "--workdir", str(tmp_path / "w"), "--users", "5", "--workers", "-1", "--json")
    assert result.exit_code == 2, result.output
    assert json.loads(result.stdout)["exit_code"] == 2 and "field 'workers' must be an int >= 0" in result.stderr
    assert not (tmp_path / "w").exists()


def test_paths_this_user_cannot_write_or_reach_are_bad_arguments_named_with_the_fix(tmp_path):
    """pull into a read-only --cache-dir, a night's store, `model init` or demo's --workdir in a
    read-only folder: exit 2 naming the path (was exit 1: '[Errno 13] Permission denied: .../models',
    a PermissionError line, or a store that could not be created); nothing is written. A model under a
    folder the user cannot enter is named too (was a PermissionError line, exit 1)."""
    import os
    import shutil
    import tempfile
    from pathlib import Path

    import pytest

    demote = ()
    if os.geteuid() == 0:  # root writes anywhere: run the commands as nobody
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: cannot run the CLI as a user that permissions stop")
        demote = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    base = Path(tempfile.mkdtemp(prefix="engram-ro-"))
    try:
        base.chmod(0o755)
        ro, log, closed = base / "ro", base / "log", base / "closed"
        for folder in (ro, log, closed, base / "open"):
            folder.mkdir()
        ro.chmod(0o555)
        (base / "open").chmod(0o777)
        closed.chmod(0o700 if demote else 0o000)
        probe = _cli("model", "info", str(log), prefix=demote)
        if "checkpoint" not in probe.stderr:
            pytest.skip(f"cannot run the CLI as another user here: {probe.stderr[-300:]}")
        for args, message in (
                (["pull", "--store", str(base), "--cache-dir", str(ro)], f"--cache-dir {ro} is not writable"),
                (["pull", "--store", str(base), "--cache-dir", str(ro / "c")], f"--cache-dir {ro / 'c'} cannot be made: "
                                                                              f"{ro} is not writable"),
                (["run", "nightly", "--store", str(ro / "store"), "--fact-log", str(log), "--model", str(ro)],
                 f"store {ro / 'store'} cannot be made: {ro} is not writable"),
                (["model", "init", str(ro / "m"), "--tiny"], f"model directory {ro / 'm'} cannot be made"),
                (["demo", "--workdir", str(ro / "w")], f"--workdir {ro / 'w'} cannot be made"),
                (["run", "nightly", "--store", str(base / "open" / "s"), "--fact-log", str(log), "--model", str(closed / "m")],
                 f"model {closed / 'm'}: cannot be reached (permission denied")):
            result = _cli(*args, prefix=demote)
            _assert_one_line_exit_2(result, message)
        assert sorted(p.name for p in base.iterdir()) == ["closed", "log", "open", "ro"] and not list(ro.iterdir())
        assert not list((base / "open").iterdir())
    finally:
        for folder in base.iterdir():
            folder.chmod(0o755)
        shutil.rmtree(base)


def test_a_night_that_fails_says_so_in_one_line_not_twice(tmp_path, tiny_dir):
    """The runner also logged the error at ERROR ("night failed in read ...: FactLogError: ..."), a
    second line on stderr before the `error:` line; -v still shows it."""
    log = tmp_path / "log" / "day=1"
    log.mkdir(parents=True)
    (log / "part-0.parquet").write_bytes(b"not parquet")
    args = ["run", "nightly", "--store", str(tmp_path / "store"), "--fact-log", str(tmp_path / "log"), "--model",
            str(tiny_dir), "--workers", "0"]
    for flags in ([], ["--json"]):
        result = _cli_here(*args, *flags)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith("error: FactLogError: fact log ") and "part-0.parquet" in result.stderr
        if flags:
            assert json.loads(result.stdout)["error"] == result.stderr[len("error: "):].rstrip("\n")
    verbose = _cli_here(*args, "-v")
    assert verbose.returncode == 1 and "night failed in read" in verbose.stderr


def test_an_s3_store_uri_that_names_an_object_is_a_bad_argument_for_every_command_and_nothing_is_written(
        s3_bucket, s3_server, tmp_path, tiny_dir):
    """A file's URI given as the store (``s3://b/engram/CURRENT``, copied from a console), as a
    local store path that is a file is refused: readers said "no versions" (exit 0), and a night,
    forget or gc started a new store under the file's key, where no node looks, without the real
    store's watermark, tombstones and forgets. A folder marker (``engram/``) is still a store."""
    client = s3_server.client()
    client.put_object(Bucket=s3_bucket, Key="engram/CURRENT", Body=b'{"version": 1}')
    client.put_object(Bucket=s3_bucket, Key="empty/", Body=b"")  # a console's "Create folder"
    uri = f"s3://{s3_bucket}/engram/CURRENT"
    log = tmp_path / "log"
    log.mkdir()
    night = ["run", "nightly", "--fact-log", str(log), "--model", str(tiny_dir), "--workers", "0"]
    for args, key in ((["versions", "--store", uri], "listed"), (["stats", "--store", uri, "select 1"], "queried"),
                      (["rollback", "--store", uri, "--to", "1"], "rolled_back"), (["forget", "--store", uri, "u1"], "forgotten"),
                      (["gc", "--store", uri, "--keep", "1"], "collected"),
                      (["pull", "--store", uri, "--cache-dir", str(tmp_path / "cache")], "pulled"),
                      ([*night, "--store", uri], "published")):
        result = _cli_here(*args, "--json")
        _assert_one_line_exit_2(result, f"store {uri} (endpoint {s3_server.endpoint_url}): names an object (14 bytes), "
                                        f"not a store; give the prefix the store's CURRENT lies under (e.g. "
                                        f"s3://{s3_bucket}/engram)", key)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert keys == ["empty/", "engram/CURRENT"]
    result = _cli_here("versions", "--store", f"s3://{s3_bucket}/empty")
    assert result.returncode == 0 and "no versions" in result.stdout, result.stderr
    # an object beside a store of the same name (``engram`` and ``engram/CURRENT``): the store is there
    from versions.store import open_store

    client.put_object(Bucket=s3_bucket, Key="engram", Body=b"stray")
    open_store(f"s3://{s3_bucket}/engram").check_not_an_object()
    # an empty object named as the prefix, without its slash (some tools' folder marker): a store, empty
    client.put_object(Bucket=s3_bucket, Key="marker", Body=b"")
    open_store(f"s3://{s3_bucket}/marker").check_not_an_object()


def test_an_empty_shard_selection_is_refused_naming_the_option_never_taken_for_every_shard(local_store, tiny,
                                                                                          tiny_dir, tmp_path):
    """`--shards ''` (an unset variable in `--shards "$SHARDS"`) and blank values selected every
    shard: a node meant for a few downloaded and served them all, and `compact` compacted all. Each
    empty selection (blank, a lone or trailing comma, an empty list from code) is refused naming
    the option and the forms; `all` still means every shard."""
    import numpy as np
    import pytest

    from jobs.compact import compact
    from serving.pull import PullClient, parse_shards
    from tests.harness import publish_deltas, random_delta

    publish_deltas(local_store, tiny, {"alice": random_delta(tiny, np.random.default_rng(5))})
    for value, words in (("", "names no shard"), ("  ", "names no shard"), (",", "an empty item"),
                         ("0-1,", "an empty item"), ("0,,1", "an empty item")):
        for command in (["pull", "--store", local_store.uri, "--model", str(tiny_dir), "--cache-dir",
                         str(tmp_path / "cache")], ["compact", "--store", local_store.uri]):
            result = engram(*command, "--shards", value, "--json")
            assert result.exit_code == 2, (command, value, result.output)
            error = json.loads(result.stdout)["error"]
            assert error.startswith(f"--shards {value!r}") and words in error and "0-3,8" in error, error
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.parquet"))
    assert parse_shards("all") is None and parse_shards(" ALL ") is None and parse_shards("1") == [1]
    with pytest.raises(ValueError, match="an empty list names no shard"):
        PullClient(local_store, tiny, shards=[])
    with pytest.raises(ValueError, match="an empty list names no shard"):
        compact(local_store, [])
    result = engram("pull", "--store", local_store.uri, "--model", str(tiny_dir), "--cache-dir",
                    str(tmp_path / "cache"), "--shards", "all", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["shards"] == [0, 1], result.output


def test_a_store_path_or_prefix_with_nothing_published_is_said_by_stats_versions_and_gc(
        local_store, tiny, s3_bucket):
    """A --store that names no store (a typo'd S3 prefix, the bucket's root, the store's parent folder):
    `stats` answered every query with empty views (`0`, exit 0: a dashboard showed no users where
    `pull` said nothing is published), `versions` printed "no versions" and `gc` "kept versions []"
    without naming the store. Now stats refuses (exit 2, naming the store and the fix; a query error is
    still the query's), and versions and gc name the store and say to check --store."""
    import numpy as np

    from tests.harness import publish_deltas, random_delta

    publish_deltas(local_store, tiny, {"alice": random_delta(tiny, np.random.default_rng(0))})
    # a store with a version is answered, even where no row matches (this synthetic one writes no stats parts)
    result = _cli_here("stats", "--store", local_store.uri, "--json", "select count(*) n from shards")
    assert result.returncode == 0 and json.loads(result.stdout) == [{"n": 0}], result.stderr
    for uri in (str(local_store.root.parent), f"s3://{s3_bucket}/engrm", f"s3://{s3_bucket}"):
        for flags, key in (([], None), (["--json"], "queried")):
            result = _cli_here("stats", "--store", uri, *flags, "select count(*) from users")
            _assert_one_line_exit_2(result, "nothing is published yet, so there are no stats to query (no CURRENT, "
                                            "no manifest); check --store", key)
        result = _cli_here("stats", "--store", uri, "selec 1")  # the query's own error comes first
        _assert_one_line_exit_2(result, 'Parser Error: syntax error at or near "selec"')
        result = _cli_here("versions", "--store", uri)
        assert result.returncode == 0 and result.stdout.startswith("no versions: nothing is published at "), result.stdout
        assert "check --store" in result.stdout, result.stdout
        assert json.loads(_cli_here("versions", "--store", uri, "--json").stdout) == []
        result = _cli_here("gc", "--store", uri, "--keep", "1")
        assert result.returncode == 0 and f"note: nothing is published at {uri}" in result.stderr, result.stderr


@pytest.mark.parametrize("signals", [1, 2])
@pytest.mark.parametrize("json_flag", [True, False])
def test_a_sigterm_after_the_command_has_ended_changes_neither_its_output_nor_its_exit_code(tmp_path, json_flag,
                                                                                           signals):
    """A scheduler's SIGTERM just after a night published reached the process while Ray and torch
    shut down: the handler raised in their exit hooks, and a traceback ending in `Terminated` followed
    a `--json` that said `published: true` (or the process died of it, exit 143). Once the command has
    ended, a first signal is ignored (here it arrives in an exit hook, as it did there); a second ends
    the process at once with the command's exit code (an exit that hangs can still be stopped)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import atexit, os, signal, sys, time\n"
            "def late_stop():\n"
            f"    for _ in range({signals}):\n"
            "        os.kill(os.getpid(), signal.SIGTERM)\n"
            "        time.sleep(0.5)  # delivered while this exit hook runs\n"
            "    print('hook done', file=sys.stderr, flush=True)\n"
            "atexit.register(late_stop)\n"
            "from jobs import cli\n"
            f"sys.argv = ['engram', 'versions', '--store', {str(tmp_path)!r}] + {['--json'] if json_flag else []!r}\n"
            "cli.run()\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Terminated" not in result.stderr, result.stderr[-3000:]
    # one signal neither raised in the hook nor ended the process; a second ended it at once, exit 0
    assert ("hook done" in result.stderr) == (signals == 1), result.stderr[-3000:]
    if json_flag:
        assert json.loads(result.stdout) == []
    else:
        assert result.stdout.startswith("no versions: nothing is published at ")
