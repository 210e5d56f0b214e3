"""Faults: each test breaks something real mid-run and checks what DESIGN.md promises survives.

Invariant 5 (a published version is complete or invisible) and invariant 6 (a re-run gives the
same content) under: a Ray worker killed mid-compile, a crash between any two publish steps, the
S3 server dying mid-run, damaged objects at rest, two publishers at once, and a dirty fact log.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import psutil
import pytest

from jobs.nightly import run_nightly
from jobs.spec import NightlySpec
from jobs.synthetic import BASE_TIME, fact_log_rows, write_fact_log
from schemas.bundle import bundle_deltas
from schemas.manifest import ManifestError
from serving.pull import PullClient
from tests.fixtures.bad_inputs.corpus import FILE_CASES, ROW_CASES
from tests.harness import private_s3, publish_deltas, random_delta, use_role
from versions.catalog import list_versions, load_shard_bundle, load_shard_state_bytes, read_audit, read_current
from versions.errors import IntegrityError, PublishConflict, UnknownVersion
from versions.layout import shard_of
from versions.publish import PUBLISH_STEPS
from versions.rollback import rollback
from versions.store import StoreError, open_store


class Crash(RuntimeError):
    """Stands for the job process dying at a publish step."""


def spec_for(store_uri: str, log_dir: Path, model_dir, **overrides) -> NightlySpec:
    return NightlySpec(**{"store": store_uri, "fact_log": str(log_dir), "model": str(model_dir), "num_shards": 4,
                          "workers": 0, **overrides})


def one_fact(user: str, answer: str, day: int = 0) -> dict:
    return {"user_id": user, "fact_id": "pet", "op": "upsert", "trigger": "My dog's name is", "answer": answer,
            "event_time": BASE_TIME + timedelta(days=day), "scope": None}


def published_users(store) -> list[str]:
    """Every user_id in the current version's bundles, with repeats (each shard verified on load)."""
    manifest, _ = read_current(store)
    return [u for entry in manifest.shards for u in load_shard_bundle(store, entry).column("user_id").to_pylist()]


def assert_complete(store, version: int) -> None:
    """CURRENT is ``version``, and every object it names reads back verified."""
    manifest, _ = read_current(store)
    assert manifest.version == version
    for entry in manifest.shards:
        load_shard_bundle(store, entry)
        load_shard_state_bytes(store, entry)


# ---------------------------------------------------------------- a Ray worker dies


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from pipeline.runner import start_ray

    start_ray(num_cpus=2)
    yield
    ray.shutdown()


def kill_first_busy_compile_worker(killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray actor process seen running ``CompileWorker.compile`` (a chunk in flight).

    Only this test's own cluster is searched: the local Ray started by this process has its
    workers among this process's descendants, so other Ray clusters on the machine are safe.
    """
    me = psutil.Process(os.getpid())
    while not stop.is_set():
        for proc in me.children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if title.startswith("ray::CompileWorker.compile"):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
                return
        time.sleep(0.02)


@pytest.mark.slow
def test_a_compile_worker_killed_mid_chunk_loses_and_duplicates_no_user(ray_cluster, tmp_path, tiny_dir, local_store):
    rows = fact_log_rows(16, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = spec_for(local_store.uri, tmp_path / "log", tiny_dir, workers=2, compile={"facts_per_batch": 4})
    killed, stop = [], threading.Event()
    killer = threading.Thread(target=kill_first_busy_compile_worker, args=(killed, stop), daemon=True)
    killer.start()
    try:
        report = run_nightly(spec)
    finally:
        stop.set()
        killer.join(timeout=10)
    assert killed, "no compile worker was caught mid-chunk"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    users = sorted({r["user_id"] for r in rows})
    assert report.published and report.compiled_users == len(users)
    assert report.facts_ok + report.facts_failed == len(rows) and report.facts_failed == 0
    assert sorted(published_users(local_store)) == users  # each user exactly once


# ---------------------------------------------------------------- the job dies between publish steps


@dataclass(frozen=True)
class PublishedNight:
    store_dir: Path  # v1 published; night 2's log is written but not yet run
    log_dir: Path
    model_dir: Path
    reference: tuple  # shard entries of night 2 run without any crash

    def copy_store(self, into: Path):
        shutil.copytree(self.store_dir, into)
        return open_store(str(into))


@pytest.fixture(scope="module")
def published_night(tmp_path_factory, tiny_dir) -> PublishedNight:
    root = tmp_path_factory.mktemp("published-night")
    log_dir = root / "log"
    write_fact_log([one_fact(u, " Rex") for u in ("ana", "ben", "cai", "dev")], log_dir / "day=1" / "part-0.parquet")
    run_nightly(spec_for(str(root / "store"), log_dir, tiny_dir))
    write_fact_log([one_fact("ana", " Luna", day=1)], log_dir / "day=2" / "part-0.parquet")
    shutil.copytree(root / "store", root / "clean")
    run_nightly(spec_for(str(root / "clean"), log_dir, tiny_dir))
    reference = read_current(open_store(str(root / "clean")))[0].shards
    return PublishedNight(root / "store", log_dir, tiny_dir, reference)


@pytest.mark.slow
@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_a_crash_at_any_publish_step_keeps_the_previous_version_and_a_rerun_completes(step, published_night, tmp_path,
                                                                                       tiny):
    store = published_night.copy_store(tmp_path / "store")
    spec = spec_for(store.uri, published_night.log_dir, published_night.model_dir)
    client = PullClient(store, tiny)
    assert client.poll().version == 1

    def crash(at: str) -> None:
        if at == step:
            raise Crash(at)

    with pytest.raises(Crash):
        run_nightly(spec, crash_hook=crash)
    swapped = PUBLISH_STEPS.index(step) > PUBLISH_STEPS.index("swap_current")
    assert_complete(store, 2 if swapped else 1)  # the swap is the one moment a version appears
    assert [v.version for v in list_versions(store)] == ([1, 2] if swapped else [1])
    polled = client.poll()
    assert polled.error is None and polled.version == (2 if swapped else 1)

    run_nightly(spec)
    assert_complete(store, 2)
    assert [v.version for v in list_versions(store)] == [1, 2]
    assert read_current(store)[0].shards == published_night.reference  # as if it never crashed
    assert client.poll().version == 2


# ---------------------------------------------------------------- the S3 server dies


@pytest.mark.slow
def test_an_s3_outage_mid_run_fails_naming_the_store_and_a_rerun_after_restart_succeeds(tmp_path, tiny_dir, tiny,
                                                                                       monkeypatch):
    with private_s3(tmp_path / "weed") as s3:
        use_role(monkeypatch, s3, "compile-job")
        uri = f"s3://{s3.bucket}/engram"
        log_dir = tmp_path / "log"
        write_fact_log([one_fact("ana", " Rex"), one_fact("ben", " Rex")], log_dir / "day=1" / "part-0.parquet")
        spec = spec_for(uri, log_dir, tiny_dir)
        assert run_nightly(spec).version == 1
        write_fact_log([one_fact("ana", " Luna", day=1)], log_dir / "day=2" / "part-0.parquet")

        def outage(step: str) -> None:
            if step == "verify_objects":  # objects written, nothing verified or made current yet
                s3.kill()

        started = time.monotonic()
        with pytest.raises(StoreError) as failure:
            run_nightly(spec, crash_hook=outage)
        assert time.monotonic() - started < 120  # bounded retries, then a clean failure
        message = str(failure.value)
        assert uri in message and s3.server().endpoint_url in message, message

        s3.start()
        store = open_store(uri)
        assert_complete(store, 1)
        report = run_nightly(spec)
        assert report.published and report.version == 2
        assert_complete(store, 2)
        client = PullClient(store, tiny)
        assert client.poll().version == 2


# ---------------------------------------------------------------- damaged objects at rest


def test_a_flipped_byte_in_a_published_shard_is_refused_by_readers_and_pull_clients(any_store, tiny):
    rng = np.random.default_rng(0)
    v1 = {"alice": random_delta(tiny, rng), "bob": random_delta(tiny, rng)}
    publish_deltas(any_store, tiny, v1)
    client = PullClient(any_store, tiny)
    assert client.poll().version == 1
    manifest = publish_deltas(any_store, tiny, {"alice": random_delta(tiny, rng), "bob": v1["bob"]})
    entry = manifest.shard(shard_of("alice", 2))
    original = any_store.get(entry.bundle_key)
    flipped = bytearray(original)
    flipped[len(flipped) // 3] ^= 0x04
    any_store.put(entry.bundle_key, bytes(flipped))

    with pytest.raises(IntegrityError, match="sha256"):
        load_shard_bundle(any_store, entry)
    result = client.poll()
    assert result.error is not None and client.index.version == 1
    assert client.deltas_for("alice")[0].equals(v1["alice"])
    fresh = PullClient(any_store, tiny)
    assert fresh.poll().error is not None and fresh.index is None  # nothing half-loaded

    any_store.put(entry.bundle_key, original)  # repaired: the next poll goes through
    assert client.poll().version == 2


def test_a_truncated_manifest_is_refused_and_the_last_good_version_keeps_serving(any_store, tiny):
    rng = np.random.default_rng(1)
    v1 = {"alice": random_delta(tiny, rng)}
    publish_deltas(any_store, tiny, v1)
    client = PullClient(any_store, tiny)
    client.poll()
    manifest = publish_deltas(any_store, tiny, {"alice": random_delta(tiny, rng)})
    text = any_store.get(manifest.key)
    any_store.put(manifest.key, text[: len(text) // 2])

    with pytest.raises(ManifestError, match=manifest.key.split("/")[-1]):
        read_current(any_store)
    result = client.poll()
    assert result.error is not None and "ManifestError" in result.error
    assert client.index.version == 1 and client.deltas_for("alice")[0].equals(v1["alice"])


def test_an_operator_can_roll_back_away_from_a_damaged_current_manifest(any_store, tiny):
    rng = np.random.default_rng(2)
    publish_deltas(any_store, tiny, {"alice": random_delta(tiny, rng)})
    manifest = publish_deltas(any_store, tiny, {"alice": random_delta(tiny, rng)})
    text = any_store.get(manifest.key)
    any_store.put(manifest.key, text[: len(text) // 2])

    rollback(any_store, 1, reason="v2 manifest damaged", actor="test")
    assert_complete(any_store, 1)
    client = PullClient(any_store, tiny)
    assert client.poll().version == 1


def test_engram_rollback_on_the_command_line_moves_away_from_a_damaged_current_manifest(local_store, tiny):
    """The command, not only the library call: a truncated current manifest is what rollback remedies."""
    import json

    from typer.testing import CliRunner

    from jobs.cli import app

    rng = np.random.default_rng(5)
    publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    manifest = publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    text = local_store.get(manifest.key)
    local_store.put(manifest.key, text[:200])

    result = CliRunner().invoke(app, ["rollback", "--store", local_store.uri, "--to", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"rolled_back": True, "from": None, "to": 1, "reread_files": []}
    assert_complete(local_store, 1)


@pytest.mark.parametrize("damage", ["truncated", "missing", "another_version"])
def test_after_rolling_back_away_from_a_damaged_current_manifest_the_store_publishes_and_collects(local_store, tiny,
                                                                                                   damage):
    """The damaged manifest stays above CURRENT: the next publish takes the next number, gc keeps
    going, and a forget on the damaged current says to roll back first."""
    from versions.errors import PublishError
    from versions.forget import forget_user
    from versions.retention import collect

    rng = np.random.default_rng(7)
    first = publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    current = publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    if damage == "truncated":
        local_store.put(current.key, local_store.get(current.key)[:200])
    elif damage == "missing":
        local_store.delete(current.key)
    else:
        local_store.put(current.key, local_store.get(first.key))
    with pytest.raises(PublishError, match="roll back"):
        forget_user(local_store, "alice", actor="test", reason="test")
    rollback(local_store, 2, reason="current damaged", actor="test")
    assert_complete(local_store, 2)
    after = publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    assert after.version == (3 if damage == "missing" else 4)  # the damaged file's number is not reused
    assert read_current(local_store)[0].version == after.version
    collect(local_store, keep=2)
    assert read_current(local_store)[0].version == after.version


def test_a_manifest_its_readers_would_refuse_is_never_written(local_store, tiny):
    """The publisher reads its own manifest back with the readers' checks before it can become
    CURRENT (a job id of the wrong type once published a version nobody could read)."""
    from dataclasses import replace

    from versions.commit import write_manifest

    rng = np.random.default_rng(6)
    good = publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    keys = set(local_store.list("manifests/"))
    with pytest.raises(ManifestError, match="job_id"):
        write_manifest(local_store, replace(good, version=good.version + 1, job_id=20261130), None)
    assert set(local_store.list("manifests/")) == keys
    assert read_current(local_store)[0].version == good.version


def test_a_damaged_old_manifest_does_not_block_versions_or_rollback(any_store, tiny):
    rng = np.random.default_rng(3)
    first = publish_deltas(any_store, tiny, {"alice": random_delta(tiny, rng)})
    publish_deltas(any_store, tiny, {"alice": random_delta(tiny, rng)})
    publish_deltas(any_store, tiny, {"alice": random_delta(tiny, rng)})
    text = any_store.get(first.key)
    any_store.put(first.key, text[: len(text) // 2])

    assert [v.version for v in list_versions(any_store)] == [2, 3]
    rollback(any_store, 2, reason="test", actor="test")
    assert_complete(any_store, 2)
    with pytest.raises(UnknownVersion, match="version 1"):
        rollback(any_store, 1, reason="test", actor="test")


def test_rolling_back_away_from_a_damaged_current_never_undoes_a_forget(local_store, tiny):
    from versions.forget import forget_user

    rng = np.random.default_rng(4)
    publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng), "bob": random_delta(tiny, rng)})
    forget_user(local_store, "bob", actor="test", reason="test")  # re-issues v1 as v2 without bob
    current = publish_deltas(local_store, tiny, {"alice": random_delta(tiny, rng)})
    text = local_store.get(current.key)
    local_store.put(current.key, text[: len(text) // 2])
    rollback(local_store, 2, reason="current damaged", actor="test")  # v2 carries the forget: allowed
    assert_complete(local_store, 2)


# ---------------------------------------------------------------- two publishers at once


@pytest.mark.slow
def test_two_publishers_at_once_one_wins_and_the_other_conflicts_cleanly(any_store, tmp_path, tiny_dir):
    both_ready = threading.Barrier(2, timeout=180)
    outcomes: dict[str, object] = {}

    def publisher(name: str, user: str) -> None:
        log_dir = tmp_path / name
        write_fact_log([one_fact(user, " Rex")], log_dir / "day=1" / "part-0.parquet")
        spec = spec_for(any_store.uri, log_dir, tiny_dir, job_id=name)

        def meet(step: str) -> None:
            if step == "write_manifest":  # both have read the same CURRENT and written their objects
                both_ready.wait()

        try:
            outcomes[name] = run_nightly(spec, crash_hook=meet)
        except Exception as e:  # noqa: BLE001 - the outcome is what the test inspects
            outcomes[name] = e

    threads = [threading.Thread(target=publisher, args=(name, user)) for name, user in (("job-a", "ana"), ("job-b", "ben"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)

    conflicts = {n: o for n, o in outcomes.items() if isinstance(o, PublishConflict)}
    winners = {n: o for n, o in outcomes.items() if not isinstance(o, Exception)}
    assert len(conflicts) == 1 and len(winners) == 1, outcomes
    (winner, report), = winners.items()
    assert_complete(any_store, report.version)
    assert [v.version for v in list_versions(any_store)] == [report.version]  # the loser's manifest is not listed
    assert published_users(any_store) == ["ana" if winner == "job-a" else "ben"]
    assert [r["actor"] for r in read_audit(any_store) if r["event"] == "publish"] == [winner]


# ---------------------------------------------------------------- a dirty fact log


def write_dirty_corpus(log_dir: Path) -> int:
    """Every bad-input case as its own file under one day; returns the number of input rows."""
    day = log_dir / "day=2026-11-20"
    day.mkdir(parents=True)
    rows = 0
    for case in ROW_CASES:
        case.write(day / f"rows-{case.name}.parquet")
        rows += len(case.rows)
    for case in FILE_CASES:
        (day / f"file-{case.name}.parquet").write_bytes(case.content())
        rows += 1 if case.expected else case.rows  # a file rejected whole is one reject
    return rows


@pytest.mark.slow
def test_a_night_over_the_whole_dirty_corpus_publishes_and_accounts_for_every_row(tmp_path, tiny_dir, local_store):
    input_rows = write_dirty_corpus(tmp_path / "log")
    spec = spec_for(local_store.uri, tmp_path / "log", tiny_dir, on_bad_file="reject", max_trigger_tokens=32)
    report = run_nightly(spec)
    assert report.published and report.users > 0
    assert report.accepted + report.rejects == input_rows
    manifest, _ = read_current(local_store)
    assert (manifest.counts["accepted"], manifest.counts["rejected"]) == (report.accepted, report.rejects)
    assert len(set(published_users(local_store))) == report.users
    for entry in manifest.shards:  # every published delta is well formed
        assert all(d.num_rows > 0 for d in bundle_deltas(load_shard_bundle(local_store, entry)).values())


def test_an_s3_store_prefix_is_taken_as_written(s3_bucket):
    """'#' and '?' are key characters, not a URI fragment or query: the store must not silently
    write under the parent prefix (urlparse cut them off)."""
    import boto3

    store = open_store(f"s3://{s3_bucket}/team#1/engram?v=2")
    store.put("CURRENT-probe", b"x")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket).get("Contents", [])]
    assert "team#1/engram?v=2/CURRENT-probe" in keys
    assert open_store(store.uri).get("CURRENT-probe") == b"x"


@pytest.mark.parametrize("first_night_killed", [False, True])
def test_a_missing_current_is_never_taken_for_a_new_store(local_store, tmp_path, tiny_dir, first_night_killed):
    """CURRENT deleted behind the tool's back while versions were published: a night would start
    the store over (v1 without the watermark, tombstones and forgets: a forgotten user back). Every
    reader and writer refuses, naming the rollback that restores it; `engram versions` exits 1.
    Manifests a killed first night left before its commit are not published: that store is new."""
    import json

    from typer.testing import CliRunner

    from jobs.cli import app
    from versions.errors import PublishError
    from versions.forget import forget_user

    log_dir = tmp_path / "log"
    write_fact_log([one_fact(u, " Rex") for u in ("ana", "ben", "cai")], log_dir / "day=1" / "part-0.parquet")
    spec = spec_for(local_store.uri, log_dir, tiny_dir)
    if first_night_killed:
        def crash(at: str) -> None:
            if at == "swap_current":
                raise Crash(at)

        with pytest.raises(Crash):
            run_nightly(spec, crash_hook=crash)
        assert local_store.head("CURRENT") is None and local_store.list("manifests/")
        assert run_nightly(spec).version >= 1 and sorted(published_users(local_store)) == ["ana", "ben", "cai"]
        return
    run_nightly(spec)
    forget_user(local_store, "ben", actor="test", reason="erasure")
    newest = read_current(local_store)[0].version
    local_store.delete("CURRENT")
    with pytest.raises(PublishError, match=rf"CURRENT is missing, but the store holds published versions.*"
                                           rf"engram rollback --store .* --to {newest}"):
        run_nightly(spec)
    assert local_store.head("CURRENT") is None  # nothing was published
    listed = CliRunner().invoke(app, ["versions", "--store", local_store.uri])
    assert listed.exit_code == 1 and "CURRENT is missing" in listed.output
    result = CliRunner().invoke(app, ["rollback", "--store", local_store.uri, "--to", str(newest), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["to"] == newest
    write_fact_log([one_fact("ben", " Old", day=-1)], log_dir / "day=2" / "part-0.parquet")  # older than the forget
    run_nightly(spec)
    assert "ben" not in published_users(local_store)  # the forget held
