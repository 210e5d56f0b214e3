"""The compile worker's start and its report: a warm-up at start that changes nothing it compiles,
where each chunk's time went (ChunkMeta.seconds, the night's compile_worker_seconds), and a small
night spread over every worker (jobs.nightly._Night._facts_per_chunk)."""

import threading

import numpy as np
import pyarrow as pa
import pytest

from engram_core.compiler import CompileOptions
from jobs.nightly import run_nightly
from jobs.spec import NightlySpec, SpecError
from jobs.synthetic import fact_log_rows, write_fact_log
from pipeline.compile import CHUNK_SECONDS, ChunkSlice, CompileWorker
from pipeline.shards import ShardChanges

FACTS = [("u-ann", "f0", "My dentist is Dr.", " Rex"), ("u-ann", "f1", "I live in the city of", " Lyon"),
         ("u-bob", "f0", "My dog is called", " Fido")]


def chunk_of(rows):
    table = pa.table({"user_id": [r[0] for r in rows], "fact_id": [r[1] for r in rows],
                      "scope": pa.array([None] * len(rows), pa.string()),
                      "trigger": [r[2] for r in rows], "answer": [r[3] for r in rows]})
    return (ChunkSlice(0, 0, len(rows)),), table


class _Changes:
    """The one field of pipeline.shards.ShardChanges a compile reads (its compile rows)."""

    def __init__(self, table):
        self.compile = table


def compile_with(worker, rows):
    slices, table = chunk_of(rows)
    meta, output = worker.compile(slices, _Changes(table))
    return meta, output.bundles[0]


def test_a_warmed_up_worker_compiles_exactly_what_a_cold_one_does(tiny_dir):
    options = CompileOptions(facts_per_batch=8)
    cold = CompileWorker(str(tiny_dir), options, warm_up=False)
    warm = CompileWorker(str(tiny_dir), options, warm_up=True)
    assert "warm_up" in warm._startup and "warm_up" not in cold._startup
    meta_cold, bundle_cold = compile_with(cold, FACTS)
    meta_warm, bundle_warm = compile_with(warm, FACTS)
    assert meta_cold.ok == meta_warm.ok == len(FACTS)
    assert bundle_cold.equals(bundle_warm)  # same rows, same bytes of every delta


def test_each_chunk_says_where_its_time_went_on_the_worker(tiny_dir):
    worker = CompileWorker(str(tiny_dir), CompileOptions(facts_per_batch=8), warm_up=True)
    first, _ = compile_with(worker, FACTS)
    second, _ = compile_with(worker, FACTS[:1])
    assert set(first.seconds) <= set(CHUNK_SECONDS)
    for key in ("total", "compile", "optimize", "checkpoint", "output", "load", "warm_up"):
        assert first.seconds[key] >= 0, key
    assert first.seconds["compile"] <= first.seconds["total"]
    # load and warm-up ran once, before the first chunk: later chunks do not repeat them
    assert "load" not in second.seconds and "warm_up" not in second.seconds and second.seconds["compile"] > 0


def test_chunks_called_at_once_compile_one_at_a_time_and_exactly_as_alone(tiny_dir, local_store, monkeypatch):
    """With ENGRAM_CONCURRENT_CHUNKS=2 the Ray actor takes two calls at once: only one may use the
    model at a time (the compiler overlays rows on it while it optimizes); each chunk's output,
    invariant checks and checkpoint are what they are alone, the worker's load is reported once,
    and a resumed night finds every checkpoint."""
    from concurrent.futures import ThreadPoolExecutor

    import engram_core.compiler as compiler

    other = [("u-cid", "f0", "My sister lives in", " Oslo"), ("u-dan", "f0", "My favourite colour is", " teal")]
    chunks = [FACTS, other, FACTS[:1], other[1:]]
    options = CompileOptions(facts_per_batch=8)
    alone = CompileWorker(str(tiny_dir), options, warm_up=False, check_users=2)
    expected = [compile_with(alone, rows) for rows in chunks]

    worker = CompileWorker(str(tiny_dir), options, store_uri=local_store.uri, warm_up=False, check_users=2)
    inside, most = [0], [0]
    lock = threading.Lock()
    real = compiler.compile_facts

    def counting(*args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(compiler, "compile_facts", counting)
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda rows: compile_with(worker, rows), chunks))
    assert most[0] == 1  # never two compiles on the model at once
    for (meta, bundle), rows, (want_meta, want) in zip(got, chunks, expected):
        assert meta.ok == len(rows) and bundle.equals(want) and not meta.resumed
        assert meta.checks == want_meta.checks and meta.checks["ok"]
        assert "wait" in meta.seconds
    assert sum("load" in meta.seconds for meta, _ in got) == 1  # the worker's start, reported once
    assert worker.flush() == len(chunks)

    resumed = CompileWorker(str(tiny_dir), options, store_uri=local_store.uri, warm_up=False, check_users=2)
    with ThreadPoolExecutor(2) as pool:
        again = list(pool.map(lambda rows: compile_with(resumed, rows), chunks))
    for (meta, bundle), (_, want) in zip(again, expected):
        assert meta.resumed and bundle.equals(want)


def test_the_concurrency_setting_is_checked():
    from pipeline.compile import _concurrent_chunks

    for value, expected in (("1", 1), ("2", 2)):
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ENGRAM_CONCURRENT_CHUNKS", value)
            assert _concurrent_chunks() == expected
    for value in ("0", "-1", "two", ""):
        with pytest.MonkeyPatch.context() as env:
            env.setenv("ENGRAM_CONCURRENT_CHUNKS", value)
            with pytest.raises(ValueError, match="ENGRAM_CONCURRENT_CHUNKS"):
                _concurrent_chunks()


def test_the_night_report_sums_the_chunks_worker_seconds(tmp_path, tiny_dir, local_store):
    write_fact_log(fact_log_rows(6, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0, compile={"facts_per_batch": 4})
    report = run_nightly(spec)
    seconds = report.compile_worker_seconds
    assert seconds["chunks"] == 3  # 12 facts in chunks of one batch of 4
    assert seconds["compile"] > 0 and seconds["total"] >= seconds["compile"]
    assert list(seconds)[1:] == [k for k in CHUNK_SECONDS if k in seconds]
    assert report.to_dict()["compile_worker_seconds"] == seconds  # what run nightly --json prints


@pytest.mark.parametrize("min_chunks, facts, expected", [
    (1, 10, 12), (1, 2, 12), (2, 1000, 12), (2, 20, 12),  # enough work for min_chunks chunks: batches_per_chunk batches
    (2, 10, 8), (2, 8, 4), (4, 20, 8), (4, 16, 4),  # a small night: fewer whole batches a chunk
    (2, 3, 2), (8, 20, 3), (4, 13, 4), (5, 1, 1),  # under min_chunks batches: ceil(facts / min_chunks), one batch
])
def test_a_small_night_is_split_into_min_chunks_chunks(min_chunks, facts, expected):
    from jobs.nightly import _Night

    night = _Night.__new__(_Night)
    for workers in (0, 1, 4):  # the plan does not depend on the cluster
        night.spec = NightlySpec(store="s", fact_log="l", model="m", workers=workers, batches_per_chunk=3,
                                 min_chunks=min_chunks, compile={"facts_per_batch": 4})
        assert night._facts_per_chunk(facts) == expected
    from jobs.spec import SpecError

    with pytest.raises(SpecError, match="min_chunks"):
        NightlySpec(store="s", fact_log="l", model="m", min_chunks=0)


def test_a_small_night_split_over_two_chunks_compiles_in_two_chunks(tmp_path, tiny_dir, local_store):
    write_fact_log(fact_log_rows(6, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0, batches_per_chunk=3, min_chunks=2, compile={"facts_per_batch": 4})
    report = run_nightly(spec)
    # 12 facts: 1 chunk of 3 batches without min_chunks; 2 chunks of 2 batches (8 + 4 facts) with it
    assert report.compile_worker_seconds["chunks"] == 2 and report.facts_ok == 12


def test_a_night_smaller_than_min_chunks_batches_compiles_in_min_chunks_smaller_batches(tmp_path, tiny_dir,
                                                                                     local_store):
    write_fact_log(fact_log_rows(3, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0, min_chunks=3, compile={"facts_per_batch": 4})
    report = run_nightly(spec)
    # 6 facts: 2 batches of 4 + 2 would be 2 chunks at most; 3 chunks of one user's 2 facts each instead
    assert report.compile_worker_seconds["chunks"] == 3 and report.facts_ok == 6 and report.facts_failed == 0


def test_the_learning_rate_grows_with_the_models_width_past_768_only():
    from types import SimpleNamespace

    from engram_core.compiler import effective_lr

    def model(**config):
        return SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(**config)))

    options = CompileOptions()
    assert effective_lr(model(hidden_size=64), options) == options.lr == 0.1  # the tiny model: unchanged
    assert effective_lr(model(hidden_size=768), options) == 0.1  # d768: unchanged
    assert effective_lr(model(hidden_size=2048), options) == pytest.approx(0.1 * (2048 / 768) ** 1.25)
    assert effective_lr(model(n_embd=4096), options) == pytest.approx(0.1 * (4096 / 768) ** 1.25)  # GPT-2 style
    assert effective_lr(model(hidden_size=4096), CompileOptions(lr=0.2, lr_width_scaling=False)) == 0.2
    assert effective_lr(model(), options) == 0.1  # no width known: no scaling
    spec = NightlySpec(store="s", fact_log="l", model="m", compile={"lr_width_scaling": False})
    assert spec.compile_options().lr_width_scaling is False
    from jobs.spec import SpecError

    with pytest.raises(SpecError, match="lr_width_scaling"):
        NightlySpec(store="s", fact_log="l", model="m", compile={"lr_width_scaling": "no"})


def test_chunk_checkpoints_are_written_behind_the_compile_and_flushed(tiny_dir, local_store):
    from pipeline.compile import ChunkCheckpoints

    worker = CompileWorker(str(tiny_dir), CompileOptions(facts_per_batch=8), store_uri=local_store.uri, warm_up=False)
    meta, bundle = compile_with(worker, FACTS)
    assert worker.flush() == 1 and worker.flush() == 0  # one checkpoint written, nothing left pending
    assert len(local_store.list(ChunkCheckpoints.PREFIX)) == 2  # its bundle and its results
    again, resumed = compile_with(worker, FACTS)  # the same chunk again (a resumed night): read back, not compiled
    assert again.resumed and not meta.resumed and resumed.equals(bundle)


@pytest.mark.parametrize("configured, rows, shards, expected", [
    (None, 2_500, 64, 8),  # a small night: the floor, not one process per CPU
    (None, 1_000_000, 64, 64),  # a full night: every shard at once
    (None, 100_000, 64, 25),  # ceil(100,000 / 4,096)
    (None, 0, 3, 3),  # never more than the shards
    (None, 10, 0, 1),  # at least one
    (2, 1_000_000, 64, 2),  # the spec's number wins
    (100, 10, 64, 64),
])
def test_apply_tasks_in_flight_follow_the_nights_rows(configured, rows, shards, expected):
    from jobs.nightly import apply_in_flight

    assert apply_in_flight(configured, rows, shards) == expected


def test_a_night_that_visits_every_shard_applies_them_all_at_once_unless_the_spec_caps_it():
    from jobs.nightly import apply_in_flight

    assert apply_in_flight(None, 0, 64, every_shard=True) == 64  # a recompile: each loads its whole prior state
    assert apply_in_flight(4, 0, 64, every_shard=True) == 4


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "8"])
def test_a_bad_apply_in_flight_is_refused_naming_the_field(bad):
    with pytest.raises(SpecError, match="apply_in_flight"):
        NightlySpec(store="s", fact_log="l", model="m", apply_in_flight=bad)
