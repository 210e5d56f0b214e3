"""The Ray compile pool gives chunks only to actors that have started, so an actor that is slow to
load its model does not hold chunks another actor could compile (a short night's compile is
otherwise as long as its slowest actor's start plus its share of the chunks)."""

from __future__ import annotations

import os
import time

import pytest

import pipeline.compile
from jobs.nightly import run_nightly
from jobs.spec import NightlySpec
from jobs.synthetic import fact_log_rows, write_fact_log
from versions.catalog import read_current
from versions.store import LocalStore

pytestmark = pytest.mark.slow

SLOW_START_LIMIT_S = 300.0
"""How long the slow actor waits for the other to compile three chunks before starting anyway
(then the test fails: the pool gave it chunks it could not yet compile). Generous: the test
asserts where the wait ended (a marker file), not the night's wall time, which a busy machine
stretches (CI load once made a right night take 124 s against a 90 s limit)."""


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from pipeline.runner import start_ray

    if ray.is_initialized():
        ray.shutdown()
    start_ray(num_cpus=4)  # two compile actors and the night's shard tasks beside them
    yield
    ray.shutdown()


def test_chunks_go_to_the_actor_that_started_while_the_other_is_still_loading(ray_cluster, tmp_path, tiny_dir,
                                                                             monkeypatch):
    first, log, timed_out = tmp_path / "first-actor", tmp_path / "chunks", tmp_path / "slow-actor-timed-out"

    class SlowSecondWorker(pipeline.compile.CompileWorker):
        """The second actor to start waits until the first has compiled three chunks (or the limit)."""

        def __init__(self, *args, **kwargs):
            try:
                first.open("x").close()
            except FileExistsError:
                deadline = time.monotonic() + SLOW_START_LIMIT_S
                while time.monotonic() < deadline and (not log.exists() or len(log.read_text().split()) < 3):
                    time.sleep(0.1)
                if not log.exists() or len(log.read_text().split()) < 3:
                    timed_out.touch()
            super().__init__(*args, **kwargs)

        def compile(self, *args, **kwargs):
            out = super().compile(*args, **kwargs)
            with log.open("a") as f:
                f.write(f"{os.getpid()}\n")
            return out

    monkeypatch.setattr(pipeline.compile, "CompileWorker", SlowSecondWorker)
    rows = fact_log_rows(8, 4)  # 32 facts: four chunks of 8
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=str(tmp_path / "store"), fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=2, batches_per_chunk=1, compile={"facts_per_batch": 8})
    report = run_nightly(spec)
    assert report.published and report.facts_ok == len(rows) and report.facts_failed == 0
    by_actor = sorted(log.read_text().split().count(pid) for pid in set(log.read_text().split()))
    assert sum(by_actor) == 4
    assert by_actor[-1] >= 3, f"chunks per actor {by_actor}: the actor still loading was given chunks"
    assert not timed_out.exists(), "the slow actor started only at its limit: the other never compiled three chunks"

    # The same night compiled in this process publishes the same shards.
    clean = NightlySpec(**{**spec.to_dict(), "store": str(tmp_path / "clean"), "workers": 0})
    run_nightly(clean)
    assert read_current(LocalStore(tmp_path / "store"))[0].shards == read_current(LocalStore(tmp_path / "clean"))[0].shards


def compile_actor_processes() -> list:
    """This test process's descendants that are Ray compile actors (titled ``ray::CompileWorker...``)."""
    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if " ".join(proc.cmdline()).startswith("ray::CompileWorker"):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_a_night_with_new_files_starts_its_compile_actors_before_hashing_the_model_and_ends_them_if_it_fails(
        ray_cluster, tmp_path, tiny_dir, monkeypatch):
    import jobs.nightly
    from engram_core.tiny import init_tiny
    from pipeline.plan import FingerprintMismatch

    order, pools = [], []  # pools: held here, so Ray cannot end a leaked pool's actors for want of a handle
    real_start, real_fingerprint = jobs.nightly._start_compile, jobs.nightly.model_fingerprint
    monkeypatch.setattr(jobs.nightly, "_start_compile",
                        lambda *a: order.append("pool") or pools.append(real_start(*a)) or pools[-1])
    monkeypatch.setattr(jobs.nightly, "model_fingerprint", lambda *a: order.append("hash") or real_fingerprint(*a))
    write_fact_log(fact_log_rows(4, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=str(tmp_path / "store"), fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=1)
    assert run_nightly(spec).facts_ok == 8
    assert order == ["pool", "hash"]

    # Nothing new: no compile pool at all (and no Ray work).
    order.clear()
    assert not run_nightly(spec).published
    assert order == ["hash"]

    # New files but another model: the night fails on the model check after its actors started,
    # and ends them; nothing is published.
    order.clear()
    write_fact_log(fact_log_rows(1, 2, prefix="new"), tmp_path / "log" / "day=2" / "part-0.parquet")
    other = tmp_path / "other-model"
    init_tiny(other, seed=7)
    with pytest.raises(FingerprintMismatch, match="recompile-all"):
        run_nightly(NightlySpec(**{**spec.to_dict(), "model": str(other)}))
    assert order == ["pool", "hash"]
    assert pools[-1][1].actors == []  # the night closed its pool
    deadline = time.monotonic() + 30
    while compile_actor_processes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert compile_actor_processes() == []
    assert read_current(LocalStore(tmp_path / "store"))[0].version == 1


def test_a_compile_actor_that_cannot_start_fails_the_night_naming_it_and_publishes_nothing(ray_cluster, tmp_path,
                                                                                         tiny_dir, monkeypatch):
    class BrokenWorker(pipeline.compile.CompileWorker):
        def __init__(self, *args, **kwargs):
            raise ValueError("this worker's GPU is gone")

    monkeypatch.setattr(pipeline.compile, "CompileWorker", BrokenWorker)
    write_fact_log(fact_log_rows(4, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=str(tmp_path / "store"), fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=1)
    with pytest.raises(Exception, match="this worker's GPU is gone") as failure:
        run_nightly(spec)
    assert any("compile actor 0 start" in note for note in getattr(failure.value, "__notes__", []))
    assert read_current(LocalStore(tmp_path / "store")) is None


def _night_with_pool(monkeypatch, pools: list) -> None:
    """Nights of this test build their Ray compile pool with ``warm_up=True`` (on a GPU the
    default; these tests run on CPU actors) and keep it in ``pools``."""
    import pipeline.runner

    real = pipeline.runner.RayRunner.compile_pool

    def compile_pool(self, *args, **kwargs):
        pools.append(real(self, *args, **{**kwargs, "warm_up": True}))
        return pools[-1]

    monkeypatch.setattr(pipeline.runner.RayRunner, "compile_pool", compile_pool)


def test_an_actor_loaded_while_the_night_still_reads_its_log_warms_up_meanwhile(ray_cluster, tmp_path, tiny_dir,
                                                                                monkeypatch):
    import jobs.nightly

    pools: list = []
    _night_with_pool(monkeypatch, pools)
    real_fingerprint = jobs.nightly.model_fingerprint

    def slow_fingerprint(*args):  # the driver is busy until both actors have loaded (and got their warm-up)
        deadline = time.monotonic() + SLOW_START_LIMIT_S
        while len(pools[-1].warmed) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        return real_fingerprint(*args)

    monkeypatch.setattr(jobs.nightly, "model_fingerprint", slow_fingerprint)
    rows = fact_log_rows(8, 4)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=str(tmp_path / "store"), fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=2, batches_per_chunk=1, compile={"facts_per_batch": 8})
    report = run_nightly(spec)
    assert report.facts_ok == len(rows) and report.facts_failed == 0
    assert sorted(pools[-1].warmed) == [0, 1]
    assert report.compile_worker_seconds["warm_up"] > 0  # reported with each actor's first chunk

    # The warm-up changes nothing compiled: the same night without it publishes the same shards.
    clean = NightlySpec(**{**spec.to_dict(), "store": str(tmp_path / "clean"), "workers": 0})
    run_nightly(clean)
    assert read_current(LocalStore(tmp_path / "store"))[0].shards == read_current(LocalStore(tmp_path / "clean"))[0].shards


def test_an_actor_that_loads_after_its_chunks_are_known_skips_the_warm_up(ray_cluster, tmp_path, tiny_dir,
                                                                          monkeypatch):
    import pipeline.runner

    pools: list = []
    _night_with_pool(monkeypatch, pools)
    mapped, timed_out = tmp_path / "mapped", tmp_path / "late-actor-timed-out"
    real_map = pipeline.runner._RayPool.map

    def map_(self, *args, **kwargs):
        mapped.touch()
        yield from real_map(self, *args, **kwargs)

    class LateWorker(pipeline.compile.CompileWorker):
        """Loads only once the night has its chunks (or after the limit: then the test fails)."""

        def __init__(self, *args, **kwargs):
            deadline = time.monotonic() + SLOW_START_LIMIT_S
            while not mapped.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not mapped.exists():
                timed_out.touch()
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pipeline.runner._RayPool, "map", map_)
    monkeypatch.setattr(pipeline.compile, "CompileWorker", LateWorker)
    rows = fact_log_rows(8, 4)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=str(tmp_path / "store"), fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=2, batches_per_chunk=1, compile={"facts_per_batch": 8})
    report = run_nightly(spec)
    assert not timed_out.exists(), "the late actor loaded only at its limit: the night never mapped its chunks"
    assert report.facts_ok == len(rows) and report.facts_failed == 0
    assert pools[-1].warmed == []
    assert "warm_up" not in report.compile_worker_seconds and report.compile_worker_seconds["load"] > 0
