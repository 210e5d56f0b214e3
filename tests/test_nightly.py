"""The nightly job end to end: real local Ray cluster, real stores, a tiny model built here."""

import json
import re
from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_core.serving import greedy_tokens
from jobs.nightly import run_nightly
from jobs.spec import NightlySpec, SpecError
from jobs.synthetic import BASE_TIME, fact_log_rows, write_fact_log
from pipeline.plan import FingerprintMismatch
from pipeline.stats import query_stats
from schemas.bundle import bundle_deltas
from schemas.facts import decode_fact_state
from versions.catalog import list_versions, load_shard_bundle, read_current
from versions.layout import shard_of
from versions.rollback import rollback
from versions.store import LocalStore, open_store

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from pipeline.runner import start_ray

    start_ray(num_cpus=2)
    yield
    ray.shutdown()


def published_delta(store, user_id):
    manifest, _ = read_current(store)
    entry = manifest.shards[shard_of(user_id, manifest.num_shards)]
    return bundle_deltas(load_shard_bundle(store, entry)).get(user_id)


def assert_store_recalls(store, em, rows):
    for row in rows:
        delta = published_delta(store, row["user_id"])
        want = em.encode_answer(row["answer"])
        assert greedy_tokens(em, row["trigger"], len(want), [delta]) == want, row


def night_two_rows(night1):
    later = BASE_TIME + timedelta(days=1)
    deleted = next(r["fact_id"] for r in night1 if r["user_id"] == "user-00002")
    return [
        {"user_id": "user-00001", "fact_id": "pet", "op": "upsert", "trigger": "My dog's name is",
         "answer": " Juniper", "event_time": later, "scope": None},
        {"user_id": "user-00001", "fact_id": "extra", "op": "upsert", "trigger": "My favorite color is",
         "answer": " teal", "event_time": later, "scope": None},
        {"user_id": "user-00002", "fact_id": deleted, "op": "delete", "trigger": None, "answer": None,
         "event_time": later, "scope": None},
        {"user_id": "user-00003", "fact_id": None, "op": "forget_user", "trigger": None, "answer": None,
         "event_time": later, "scope": None},
        {"user_id": "", "fact_id": "x", "op": "upsert", "trigger": "t", "answer": " a",
         "event_time": later, "scope": None},  # rejected: no user
    ]


@pytest.mark.parametrize("store_kind", ["local", "s3"])
def test_two_nights_publish_incrementally_and_roll_back_and_forward(store_kind, tmp_path, tiny_dir, tiny, ray_cluster,
                                                                    request):
    store = request.getfixturevalue("local_store" if store_kind == "local" else "s3_store")
    log_dir = tmp_path / "log"
    users, per_user = 6, 4  # users 0, 4, 5 kept as they were; 4 facts: user 1 has none the night-two "extra" conflicts with
    night1 = fact_log_rows(users, per_user)
    write_fact_log(night1, log_dir / "day=2026-11-01" / "part-0.parquet")
    spec = NightlySpec(store=store.uri, fact_log=str(log_dir), model=str(tiny_dir), num_shards=4, workers=2)

    first = run_nightly(spec)
    assert (first.version, first.published, first.users, first.facts) == (1, True, users, users * per_user)
    assert first.facts_ok == users * per_user and first.compiled_users == users
    assert_store_recalls(store, tiny, night1)

    write_fact_log(night_two_rows(night1), log_dir / "day=2026-11-02" / "part-0.parquet")
    second = run_nightly(spec)
    # The forget_user event re-issued v1 without user 3 (as v2), then night two published v3.
    assert second.version == 3 and second.published and second.parent == 2
    assert second.compiled_users == 2  # user 1 (changed) and user 2 (one fact deleted); 3 is forgotten
    assert second.dropped_users == 1 and second.rejects == 1
    assert published_delta(store, "user-00003") is None
    new_rows = [r for r in night_two_rows(night1) if r["op"] == "upsert" and r["user_id"] == "user-00001"]
    kept = [r for r in night1 if r["user_id"] not in ("user-00001", "user-00002", "user-00003")]
    assert_store_recalls(store, tiny, new_rows + kept)
    # Unchanged shards are shared between versions.
    v1 = {e.shard: e.bundle_key for e in _manifest(store, 2).shards}
    v2 = {e.shard: e.bundle_key for e in _manifest(store, 3).shards}
    changed = {shard_of(u, 4) for u in ("user-00001", "user-00002", "user-00003")}
    assert all(v1[s] == v2[s] for s in range(4) if s not in changed)

    # Each bundle carries co-batch groups: pairwise disjoint rows, covering every user.
    for entry in _manifest(store, 3).shards:
        table = load_shard_bundle(store, entry)
        deltas = bundle_deltas(table)
        groups = {}
        for user, group in zip(table.column("user_id").to_pylist(), table.column("cobatch_group").to_pylist()):
            groups.setdefault(group, []).append(user)
        assert None not in groups and sum(map(len, groups.values())) == len(deltas)
        for members in groups.values():
            rows = [deltas[u].row_keys() for u in members]
            assert sum(map(len, rows)) == len(set().union(*rows))

    third = run_nightly(spec)  # same inputs: nothing new
    assert not third.published and third.version == 3

    assert [v.version for v in list_versions(store)] == [2, 3]
    rollback(store, 2, reason="test", actor="pytest")
    assert_store_recalls(store, tiny, [r for r in night1 if r["user_id"] == "user-00001"])
    assert published_delta(store, "user-00003") is None  # the rollback did not bring the forgotten user back
    rollback(store, 3, reason="test", actor="pytest")
    assert_store_recalls(store, tiny, new_rows)

    facts = query_stats(store, "select version, status, count(*) as n from facts group by 1, 2 order by 1, 2")
    assert facts.to_pylist() == [{"version": 2, "status": "ok", "n": (users - 1) * per_user},  # user 3 forgotten
                                 {"version": 3, "status": "ok", "n": second.facts}]
    collisions = query_stats(store, "select owner_kind, owners from collisions where version = 3")
    assert collisions.num_rows > 0 and set(collisions.column("owner_kind").to_pylist()) == {"users"}
    assert min(collisions.column("owners").to_pylist()) >= 2  # a collision is a row of several owners
    rejects = query_stats(store, "select reason from rejects where version = 3").column("reason").to_pylist()
    assert rejects == ["MISSING_USER_ID"]


def test_a_night_on_ray_shows_the_warnings_of_reading_each_file_once(tmp_path, tiny_dir, local_store, ray_cluster,
                                                                     caplog):
    """The read tasks ran on Ray workers, whose logs the night does not forward: every per-file
    warning (a pandas index column, a time without a zone, ids in another form, garbled text) was
    lost on the path production runs. The driver logs what each read task warned of, once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = fact_log_rows(2, 1)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    raw = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "scope"} for r in rows])
    raw = raw.set_column(raw.schema.get_field_index("event_time"), "event_time",
                         raw.column("event_time").cast(pa.timestamp("us")))  # no zone: read as UTC, with a warning
    pq.write_table(raw.append_column("__index_level_0__", pa.array(range(len(rows)))), log_dir / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(log_dir), model=str(tiny_dir), num_shards=2, workers=1)
    with caplog.at_level("WARNING", logger="pipeline.ingest"):
        report = run_nightly(spec)
    assert report.published and report.facts_ok == len(rows)
    ingest_warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.ingest"]
    assert ingest_warnings == [f"fact log {log_dir / 'part-0.parquet'}: ignoring extra columns ['__index_level_0__']",
                               f"fact log {log_dir / 'part-0.parquet'}: event_time has no time zone; reading it as UTC "
                               "(write a UTC timestamp to silence this)"]


def _manifest(store, version):
    from versions.catalog import read_manifest

    return read_manifest(store, version)


def test_a_model_change_is_refused_unless_recompile_all(tmp_path, tiny_dir, local_store):
    from engram_core.tiny import init_tiny

    log_dir = tmp_path / "log"
    write_fact_log(fact_log_rows(3, 2), log_dir / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(log_dir), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    other = tmp_path / "other-model"
    init_tiny(other, seed=7)
    write_fact_log(fact_log_rows(1, 2, prefix="new"), log_dir / "day=2" / "part-0.parquet")
    changed = NightlySpec(**{**spec.to_dict(), "model": str(other)})
    with pytest.raises(FingerprintMismatch, match="recompile-all"):
        run_nightly(changed)
    assert read_current(local_store)[0].version == 1
    report = run_nightly(NightlySpec(**{**changed.to_dict(), "recompile_all": True}))
    assert report.version == 2 and report.compiled_users == 4


def test_a_missing_fact_log_fails_clearly_and_publishes_nothing(tmp_path, tiny_dir, local_store):
    from pipeline.ingest import FactLogError

    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "nope"), model=str(tiny_dir), workers=0)
    with pytest.raises(FactLogError, match="nope"):
        run_nightly(spec)
    assert read_current(local_store) is None


def test_spec_round_trips_and_rejects_unknown_keys(tmp_path):
    spec = NightlySpec(store="s3://b/p", fact_log="s3://b/log", model="/m", compile={"steps": 20})
    (tmp_path / "s.yaml").write_text(spec.to_yaml())
    assert NightlySpec.load(tmp_path / "s.yaml") == spec
    with pytest.raises(SpecError, match="bogus"):
        NightlySpec.from_dict({**spec.to_dict(), "bogus": 1})
    with pytest.raises(SpecError, match="stepz"):
        NightlySpec.from_dict({**spec.to_dict(), "compile": {"stepz": 1}})


@pytest.mark.parametrize("store,log,model,wrong", [
    ("{d}/data/engram-store", "{d}/data", "{d}/model", "'store'"),       # the store inside the log folder
    ("{d}/data", "{d}/data/", "{d}/model", "'store'"),                   # the same folder
    ("{d}/store", "{d}/data", "{d}/data/model", "'model'"),              # the model inside the log folder
    ("{d}/store", "{d}/store/log", "{d}/model", "'fact_log'"),           # the log inside the store
    ("{d}/store", "{d}/link-to-data", "{d}/data/model", "'model'"),      # through a link to the log folder
    ("s3://b/lake/engram", "s3://b/lake/", "{d}/model", "'store'"),
])
def test_a_store_or_model_inside_the_fact_log_folder_is_refused_naming_both(tmp_path, store, log, model, wrong):
    """A store inside the log's folder was accepted on night 1; every later night then listed the
    store's own objects as log files and failed (or, with on_bad_file: reject, rejected them all)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "link-to-data").symlink_to(tmp_path / "data")
    fields = {k: v.format(d=tmp_path) for k, v in (("store", store), ("fact_log", log), ("model", model))}
    with pytest.raises(SpecError, match=re.escape(f"field {wrong}")) as refused:
        NightlySpec(**fields)
    assert fields["fact_log"] in str(refused.value)
    # side by side is fine, also with a shared name prefix (data vs data-store)
    NightlySpec(store=str(tmp_path / "data-store"), fact_log=str(tmp_path / "data"), model=str(tmp_path / "model"))
    NightlySpec(store="s3://b/lake-engram", fact_log="s3://b/lake", model=str(tmp_path / "model"))


def test_a_run_killed_mid_compile_resumes_from_what_it_had_compiled(tmp_path, tiny_dir, local_store):
    from pipeline.compile import ChunkCheckpoints
    from versions.store import LocalStore

    log_dir = tmp_path / "log"
    write_fact_log(fact_log_rows(6, 2), log_dir / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(log_dir), model=str(tiny_dir), num_shards=2,
                       workers=0, compile={"facts_per_batch": 4})

    class Killed(Exception):
        pass

    chunks_done = []

    def kill_after_two_chunks(step: str) -> None:
        if step == "compile_chunk":
            chunks_done.append(step)
            if len(chunks_done) == 2:
                raise Killed

    with pytest.raises(Killed):
        run_nightly(spec, crash_hook=kill_after_two_chunks)
    assert read_current(local_store) is None
    assert local_store.list(ChunkCheckpoints.PREFIX)  # what it had compiled is kept

    resumed = run_nightly(spec)
    assert resumed.published and resumed.resumed_facts == 8 and resumed.facts_ok == 12
    assert local_store.list(ChunkCheckpoints.PREFIX) == []  # cleared once published

    # The resumed night publishes exactly what an uninterrupted night publishes.
    fresh = LocalStore(tmp_path / "fresh")
    run_nightly(NightlySpec(**{**spec.to_dict(), "store": fresh.uri}))
    resumed_keys = [e.bundle_key for e in read_current(local_store)[0].shards]
    assert resumed_keys == [e.bundle_key for e in read_current(fresh)[0].shards]


def test_a_user_whose_facts_the_compiler_refuses_stops_serving_the_old_delta(tmp_path, tiny_dir, local_store):
    log_dir = tmp_path / "log"
    write_fact_log([{"user_id": "u", "fact_id": "pet", "op": "upsert", "trigger": "My dog's name is",
                     "answer": " Rex", "event_time": BASE_TIME, "scope": None}], log_dir / "day=1" / "p.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(log_dir), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    assert published_delta(local_store, "u") is not None
    write_fact_log([{"user_id": "u", "fact_id": "pet", "op": "upsert", "trigger": "My dog's name is",
                     "answer": " Max the third", "event_time": BASE_TIME + timedelta(days=1), "scope": None}],
                   log_dir / "day=2" / "p.parquet")
    # rows that start at zero and never move: the compiler cannot make the new answer recalled
    report = run_nightly(NightlySpec(**{**spec.to_dict(), "compile": {"lr": 0.0, "init_scale": 0.0, "steps": 1, "max_rounds": 1}}))
    assert report.published and report.facts_failed == 1
    assert published_delta(local_store, "u") is None  # the retracted answer is no longer served
    status = query_stats(local_store, f"select status from facts where version = {report.version}")
    assert status.column("status").to_pylist() == ["not_recalled"]


def test_a_fact_entered_again_under_a_new_fact_id_serves_the_new_answer(tmp_path, tiny, tiny_dir, local_store):
    """Night 1: "dentist-2019" -> Okafor. Night 2: the user enters the dentist again as
    "dentist-2026" (a fact id that sorts after the old one) -> Nguyen. Both are live, no row can tell them apart: the later
    written is served, and the older one is reported CONFLICTS_WITH it."""
    log_dir = tmp_path / "log"
    old = {"user_id": "u", "fact_id": "dentist-2019", "op": "upsert", "trigger": "My dentist is Dr.",
           "answer": " Okafor", "event_time": BASE_TIME, "scope": None}
    write_fact_log([old], log_dir / "day=1" / "p.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(log_dir), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    new = dict(old, fact_id="dentist-2026", answer=" Nguyen", event_time=BASE_TIME + timedelta(days=1))
    write_fact_log([new], log_dir / "day=2" / "p.parquet")
    report = run_nightly(spec)
    assert report.published and report.facts_ok == 1
    assert_store_recalls(local_store, tiny, [new])
    status = query_stats(local_store, f"select fact_id, status from facts where version = {report.version} order by fact_id")
    assert status.to_pylist() == [{"fact_id": "dentist-2019", "status": "CONFLICTS_WITH:dentist-2026"},
                                  {"fact_id": "dentist-2026", "status": "ok"}]
    # Night 3: the client sends the 2019 fact again, unchanged but later: it is now the later written,
    # so the user is compiled again (a time alone changed the winner) and serves it; night 4, an
    # unrelated fact, changes nothing about the dentist (before, it flipped the answer then).
    resent = dict(old, event_time=BASE_TIME + timedelta(days=2))
    write_fact_log([resent], log_dir / "day=3" / "p.parquet")
    assert run_nightly(spec).compiled_users == 1
    assert_store_recalls(local_store, tiny, [resent])
    pet = dict(old, fact_id="pet", trigger="My dog's name is", answer=" Rex", event_time=BASE_TIME + timedelta(days=3))
    write_fact_log([pet], log_dir / "day=4" / "p.parquet")
    run_nightly(spec)
    assert_store_recalls(local_store, tiny, [resent, pet])


def test_an_answer_over_the_token_limit_is_rejected_at_ingest_and_the_old_answer_stays(tmp_path, tiny_dir,
                                                                                      local_store):
    """An upsert the compiler could never take (answer over ``max_answer_tokens``) is a reject
    naming its file and row, like any bad row: the event is not applied, so the user's last
    accepted answer keeps being served."""
    log_dir = tmp_path / "log"
    write_fact_log([{"user_id": "u", "fact_id": "pet", "op": "upsert", "trigger": "My dog's name is",
                     "answer": " Rex", "event_time": BASE_TIME, "scope": None}], log_dir / "day=1" / "p.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(log_dir), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    before = published_delta(local_store, "u")
    too_long = " and ".join(["a very long answer"] * 60)
    write_fact_log([{"user_id": "u", "fact_id": "pet", "op": "upsert", "trigger": "My dog's name is",
                     "answer": too_long, "event_time": BASE_TIME + timedelta(days=1), "scope": None}],
                   log_dir / "day=2" / "p.parquet")
    report = run_nightly(spec)
    assert report.published and report.rejects == 1 and report.facts_failed == 0
    rejects = query_stats(local_store, f"select reason, source, row, detail from rejects where version = {report.version}")
    assert rejects.column("reason").to_pylist() == ["ANSWER_TOO_LONG"]
    assert rejects.column("source")[0].as_py().endswith("day=2/p.parquet") and rejects.column("row")[0].as_py() == 0
    assert "max_answer_tokens" in rejects.column("detail")[0].as_py()
    after = published_delta(local_store, "u")
    assert after is not None and after.values.tobytes() == before.values.tobytes()
    assert (after.row_ids == before.row_ids).all()


def test_a_compile_task_holds_batches_per_chunk_batches_of_whole_users(tmp_path, tiny_dir, local_store):
    """``batches_per_chunk`` packs several compile batches into one task, whole users each; every
    fact still compiles, and a bad value is refused before any work."""
    write_fact_log(fact_log_rows(12, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=3,
                       workers=0, batches_per_chunk=3, compile={"facts_per_batch": 4})
    chunks = []
    report = run_nightly(spec, crash_hook=lambda step: chunks.append(step) if step == "compile_chunk" else None)
    assert len(chunks) == 2  # 24 facts in chunks of 3 batches of 4 facts
    assert report.facts_ok == 24 and report.compiled_users == 12
    with pytest.raises(SpecError, match="batches_per_chunk"):
        NightlySpec(store="s", fact_log="l", model="m", batches_per_chunk=0)


def test_chunks_pack_whole_users_in_shard_order():
    import numpy as np

    from pipeline.compile import ChunkSlice, plan_chunks

    chunks = plan_chunks([(0, np.array([2] * 5)), (1, np.array([2] * 7))], 12)
    assert chunks == [(ChunkSlice(0, 0, 10), ChunkSlice(1, 0, 2)), (ChunkSlice(1, 2, 14),)]
    assert plan_chunks([(4, np.array([5, 1, 9]))], 4) == [(ChunkSlice(4, 0, 5),), (ChunkSlice(4, 5, 15),)]
    with pytest.raises(ValueError, match="at least 1"):
        plan_chunks([], 0)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), max_size=12), max_size=5), st.integers(1, 30))
def test_every_user_lands_in_exactly_one_chunk_of_at_least_the_chunk_size_but_the_last(per_shard, size):
    import numpy as np

    from pipeline.compile import plan_chunks

    shards = [(s, np.array(counts, np.int32)) for s, counts in enumerate(per_shard) if counts]
    chunks = plan_chunks(shards, size)
    boundaries = {s: set(np.cumsum(counts).tolist()) | {0} for s, counts in shards}
    covered = {s: [] for s, _ in shards}
    for chunk in chunks:
        for piece in chunk:
            assert piece.start in boundaries[piece.shard] and piece.stop in boundaries[piece.shard]  # whole users
            covered[piece.shard].append((piece.start, piece.stop))
    for s, counts in shards:
        spans = sorted(covered[s])
        assert spans[0][0] == 0 and spans[-1][1] == sum(counts)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no gap, no overlap
    sizes = [sum(p.stop - p.start for p in chunk) for chunk in chunks]
    assert all(n >= size for n in sizes[:-1])


def _all_published(store) -> dict:
    manifest, _ = read_current(store)
    return {u: d for e in manifest.shards for u, d in bundle_deltas(load_shard_bundle(store, e)).items()}


def test_a_night_with_another_number_of_shards_moves_every_user_and_compiles_none_again(tmp_path, tiny_dir, local_store):
    from versions.layout import forgotten_id

    rows = fact_log_rows(10, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    forget = {"user_id": "user-00004", "fact_id": None, "op": "forget_user", "trigger": None, "answer": None,
              "event_time": BASE_TIME + timedelta(days=1), "scope": None}
    write_fact_log([forget], tmp_path / "log" / "day=2" / "part-0.parquet")
    run_nightly(spec)
    before = _all_published(local_store)

    write_fact_log([dict(rows[0], answer=" Juniper", event_time=BASE_TIME + timedelta(days=2))],
                   tmp_path / "log" / "day=3" / "part-0.parquet")
    report = run_nightly(NightlySpec(**{**spec.to_dict(), "num_shards": 5}))
    manifest, _ = read_current(local_store)
    assert report.published and manifest.num_shards == 5 and report.compiled_users == 1
    after = _all_published(local_store)
    assert after.keys() == before.keys()
    assert all(after[u].equals(before[u]) for u in after if u != rows[0]["user_id"])  # moved, not recompiled
    for entry in manifest.shards:  # every user sits in its new shard, with its facts and stats
        users = load_shard_bundle(local_store, entry).column("user_id").to_pylist()
        assert all(shard_of(u, 5) == entry.shard for u in users)
    stats = query_stats(local_store, f"select count(*) n from facts where version = {manifest.version}")
    assert stats.column("n").to_pylist() == [18]
    # The forget tombstone moved with the user: an old event of theirs is still refused.
    late = dict(rows[8], event_time=BASE_TIME)
    assert late["user_id"] == "user-00004"
    write_fact_log([late], tmp_path / "log" / "day=4" / "part-0.parquet")
    again = run_nightly(NightlySpec(**{**spec.to_dict(), "num_shards": 5}))
    assert "user-00004" not in _all_published(local_store) and again.rejects == 1
    reasons = query_stats(local_store, f"select reason from rejects where version = {again.version}")
    assert reasons.column("reason").to_pylist() == ["FORGOTTEN_USER"]
    assert forgotten_id("user-00004") in read_current(local_store)[0].forgotten


def test_a_store_written_before_schema_2_is_read_and_upgraded_by_the_next_night(tmp_path, tiny_dir, local_store):
    """A version-1 manifest (no tombstones, stats in stats/<table>/version=N/) is read; the next
    night visits every shard once, writes its tombstones and stats parts, and carries the rest."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.harness import rewrite_as_schema_1

    rows = fact_log_rows(6, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    manifest, _ = read_current(local_store)
    facts = query_stats(local_store, "select * exclude (version) from facts")
    rewrite_as_schema_1(local_store, manifest)
    for key in local_store.list("stats/"):
        local_store.delete(key)
    sink = pa.BufferOutputStream()
    pq.write_table(facts, sink)
    local_store.put("stats/facts/version=1/part-0.parquet", sink.getvalue().to_pybytes())
    assert query_stats(local_store, "select count(*) n from facts").column("n").to_pylist() == [12]

    write_fact_log([dict(rows[0], answer=" Juniper", event_time=BASE_TIME + timedelta(days=1))],
                   tmp_path / "log" / "day=2" / "part-0.parquet")
    report = run_nightly(spec)
    upgraded, _ = read_current(local_store)
    assert report.published and report.compiled_users == 1 and upgraded.schema_version == 2
    assert all(e.tombstones_key and set(e.stats) == {"facts", "users", "collisions"} for e in upgraded.shards)
    counts = query_stats(local_store, "select version, count(*) n from facts group by 1 order by 1")
    assert counts.to_pylist() == [{"version": 1, "n": 12}, {"version": 2, "n": 12}]


def test_a_log_file_rewritten_in_place_is_read_again_and_reported(tmp_path, tiny_dir, local_store):
    import os

    path = tmp_path / "log" / "day=2026-11-20" / "part-00000.parquet"
    rows = fact_log_rows(2, 1)
    write_fact_log(rows, path)
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    # Upstream re-runs the day: the same path, now with a correction and a new user.
    rerun = rows + [dict(rows[0], answer=" Juniper", event_time=rows[0]["event_time"] + timedelta(hours=1)),
                    dict(rows[1], user_id="user-new")]
    write_fact_log(rerun, path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000_000))
    report = run_nightly(spec)
    assert report.published and report.files_reread == 1 and report.files_read == 1
    assert report.accepted == 2 and report.rejects == 2  # the two rows applied on night 1 took no effect
    assert published_delta(local_store, "user-new") is not None
    reasons = query_stats(local_store, f"select reason from rejects where version = {report.version}")
    assert sorted(reasons.column("reason").to_pylist()) == ["DUPLICATE", "SUPERSEDED"]
    assert not run_nightly(spec).published  # read once per change, not every night


def test_a_same_size_rewrite_that_kept_its_modification_time_is_read_again(tmp_path, tiny_dir, local_store):
    """``cp -p``, ``rsync -t`` and ``tar x`` rewrite a file and keep its mtime: the watermark knew the
    file by size and mtime alone, so a same-size correction was never read and the old answer stayed."""
    import json
    import os
    import shutil

    path = tmp_path / "log" / "day=1" / "part-0.parquet"
    rows = fact_log_rows(2, 1)
    write_fact_log(rows, path)
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    first = run_nightly(spec)
    staged = tmp_path / "staged.parquet"  # the correction, the same size, copied over with its time kept
    fixed = [dict(rows[0], answer=rows[0]["answer"][:-1] + "Z", event_time=rows[0]["event_time"] + timedelta(hours=1)),
             rows[1]]
    write_fact_log(fixed, staged)
    assert staged.stat().st_size == path.stat().st_size
    before = path.stat()
    shutil.copyfile(staged, path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    report = run_nightly(spec)
    assert report.published and report.files_reread == 1 and report.compiled_users == 1
    assert not run_nightly(spec).published  # read once per change

    manifest, _ = read_current(local_store)
    assert [identity["ctime_ns"] for identity in json.loads(manifest.watermark)["files"].values()] == [
        path.stat().st_ctime_ns]
    assert first.published


def test_an_engram_forget_of_a_user_not_published_yet_holds_when_their_events_arrive(tmp_path, tiny_dir,
                                                                                      local_store):
    """The forget of an id whose events are still on their way used to record nothing lasting: the
    next night published the user."""
    from versions.forget import forget_user

    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    run_nightly(spec)
    report = forget_user(local_store, "newbie-00000", actor="ops", reason="erasure request")
    assert not report.found and report.refused_until is not None
    late = fact_log_rows(1, 2, prefix="newbie", day=3)  # written before the forget, ingested after it
    write_fact_log(late, tmp_path / "log" / "day=3" / "part-0.parquet")
    night = run_nightly(spec)
    assert night.published and published_delta(local_store, "newbie-00000") is None
    reasons = query_stats(local_store, f"select reason from rejects where version = {night.version}")
    assert reasons.column("reason").to_pylist() == ["FORGOTTEN_USER"] * len(late)


@pytest.mark.parametrize("forget_day", [-400, 2])
def test_a_forget_event_scrubs_only_versions_holding_data_written_up_to_it(tmp_path, tiny_dir, local_store, forget_day):
    """A ``forget_user`` stamped before a user's facts (a replayed old forget, a device clock at the
    epoch) erased the user from every version, failed the night blaming a concurrent operator, and
    lost the facts written after it. Now: data up to the forget goes, data after it stays."""
    from versions.catalog import list_versions, read_manifest

    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    rows = fact_log_rows(3, 1)  # day 0
    write_fact_log(rows, tmp_path / "log" / "day=0" / "part-0.parquet")
    run_nightly(spec)
    target = rows[0]["user_id"]
    update = dict(rows[0], answer=" Juniper", event_time=BASE_TIME + timedelta(days=3))
    write_fact_log([update], tmp_path / "log" / "day=3" / "part-0.parquet")
    run_nightly(spec)  # v2: the target's fact as of day 3
    forget = {"user_id": target, "fact_id": None, "op": "forget_user", "trigger": None, "answer": None,
              "event_time": BASE_TIME + timedelta(days=forget_day), "scope": None}
    write_fact_log([forget], tmp_path / "log" / "day=4" / "part-0.parquet")
    night = run_nightly(spec)
    assert night.published
    assert published_delta(local_store, target) is not None  # its day-3 fact, written after the forget, stays
    holders = [v.version for v in list_versions(local_store)
               if target in decode_fact_state(local_store.get(
                   read_manifest(local_store, v.version).shard(shard_of(target, 2)).state_key)).column("user_id").to_pylist()]
    if forget_day < 0:  # before every fact of the target: no version is rewritten, all keep the user
        assert [v.version for v in list_versions(local_store)] == [1, 2, 3] and holders == [1, 2, 3]
    else:  # between: v1 and v2 hold its day-0 fact (v2 under its day-3 layer) and lose the user whole (a
        # retained version's deltas cannot be recompiled without it); the new version keeps the day-3 fact
        assert [v.version for v in list_versions(local_store)] == [3, 4, 5] and holders == [night.version] == [5]


def test_a_file_rejected_as_unreadable_is_read_again_the_next_night(tmp_path, tiny_dir, local_store):
    log = tmp_path / "log" / "day=1"
    log.mkdir(parents=True)
    (log / "part-0.parquet").write_bytes(b"not parquet at all")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0, on_bad_file="reject")
    first = run_nightly(spec)  # no row read: nothing to publish, the file named in the report
    assert not first.published and first.version is None and first.rejects == 1 and read_current(local_store) is None
    assert [(f["path"], f["reason"]) for f in first.rejected_files] == [(str(log / "part-0.parquet"), "UNREADABLE_FILE")]
    write_fact_log(fact_log_rows(2, 1), log / "part-0.parquet")  # fixed upstream, same name
    second = run_nightly(spec)
    assert second.published and second.accepted == 2 and second.users == 2 and second.rejected_files == []


def test_a_night_of_only_deletes_or_only_a_forget_publishes_with_its_stats(tmp_path, tiny_dir, local_store):
    rows = fact_log_rows(3, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    delete = {"user_id": rows[0]["user_id"], "fact_id": rows[0]["fact_id"], "op": "delete", "trigger": None,
              "answer": None, "event_time": BASE_TIME + timedelta(days=1), "scope": None}
    forget = {"user_id": rows[2]["user_id"], "fact_id": None, "op": "forget_user", "trigger": None, "answer": None,
              "event_time": BASE_TIME + timedelta(days=2), "scope": None}
    for batch, facts in (([delete], 5), ([forget], 3)):
        write_fact_log(batch, tmp_path / "log" / f"day={batch[0]['op']}" / "part-0.parquet")
        report = run_nightly(spec)
        assert report.published
        counts = query_stats(local_store, f"select (select count(*) from facts where version = {report.version}) f, "
                                          f"(select count(*) from runs where version = {report.version}) r")
        assert counts.to_pylist() == [{"f": facts, "r": len(report.seconds)}]
    forgets = report
    assert read_current(local_store)[0].version == forgets.version  # no extra version from a re-run
    assert not run_nightly(spec).published


def test_the_watermark_forgets_log_files_deleted_upstream(tmp_path, tiny_dir, local_store):
    import json

    old = write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    old.unlink()  # the log's retention deleted day 1
    new = write_fact_log(fact_log_rows(1, 1, prefix="later"), tmp_path / "log" / "day=2" / "part-0.parquet")
    report = run_nightly(spec)
    watermark = json.loads(read_current(local_store)[0].watermark)
    assert report.published and list(watermark["files"]) == [str(new)]
    assert report.users == 3  # what day 1 brought stays published


def test_a_night_checks_locality_and_isolation_of_sampled_deltas_and_records_it(tmp_path, tiny_dir, local_store):
    write_fact_log(fact_log_rows(6, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0, check_users_per_chunk=3)
    report = run_nightly(spec)
    assert report.published and report.checked_users == 3
    checks = query_stats(local_store, "select users_checked, locality_positions, isolation_positions, ok from checks")
    (row,) = checks.to_pylist()
    assert row["ok"] and row["users_checked"] == 3 and row["locality_positions"] > 0 and row["isolation_positions"] > 0


def test_a_failed_invariant_check_stops_the_night_before_anything_is_published(tmp_path, tiny_dir, local_store,
                                                                               monkeypatch):
    """The checker is replaced by one that reports a leak (no real leak can be made on purpose
    through the compiler); what is tested is that the night refuses to publish on it."""
    import engram_core.verify as verify
    from jobs.nightly import InvariantViolation

    real = verify.check_invariants

    def leaking(em, deltas, **kwargs):
        report = real(em, deltas, **kwargs)
        return verify.InvariantReport(report.users_checked, report.locality_positions, report.isolation_positions,
                                      ("user 'x': position 3 differs from the base model",))

    monkeypatch.setattr(verify, "check_invariants", leaking)
    write_fact_log(fact_log_rows(3, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    with pytest.raises(InvariantViolation, match="position 3 differs"):
        run_nightly(spec)
    assert read_current(local_store) is None and local_store.list("manifests/") == []


def _row(user, fact, answer, when, op="upsert"):
    if op == "forget_user":
        return {"user_id": user, "fact_id": None, "op": op, "trigger": None, "answer": None, "event_time": when,
                "scope": None}
    return {"user_id": user, "fact_id": fact, "op": op, "trigger": "My dog's name is", "answer": answer,
            "event_time": when, "scope": None}


def test_a_late_forget_older_than_the_users_facts_keeps_them_and_commits_cleanly(tmp_path, tiny_dir, local_store):
    """A forget that arrives late but is older than everything the user wrote removes nothing
    now; the night publishes, the user is served, and the result is what one night of all the
    events gives. Older versions keep the user too: nothing they hold of it predates the forget
    (a version that holds data of the user up to the forget loses the user whole: see
    test_a_forget_event_scrubs_only_versions_holding_data_written_up_to_it)."""
    ten = BASE_TIME + timedelta(hours=10)
    write_fact_log([_row("a1", "pet", " Rex", ten), _row("a2", "pet", " Luna", ten)],
                   tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=1, workers=0)
    run_nightly(spec)
    write_fact_log([_row("a1", None, None, ten - timedelta(hours=1), op="forget_user")],
                   tmp_path / "log" / "day=2" / "part-0.parquet")
    report = run_nightly(spec)
    assert report.published and sorted(_all_published(local_store)) == ["a1", "a2"]
    for info in list_versions(local_store):
        assert "a1" in _all_published_at(local_store, info.version)
    assert [info.version for info in list_versions(local_store)] == [1, 2]  # no version was rewritten
    single = NightlySpec(**{**spec.to_dict(), "store": str(tmp_path / "single")})
    run_nightly(single)
    assert sorted(_all_published(LocalStore(tmp_path / "single"))) == ["a1", "a2"]


def test_a_replay_after_a_rollback_keeps_what_a_user_wrote_after_their_forget(tmp_path, tiny_dir, local_store):
    """The forget tombstones of the versions a nightly forget rewrites carry the forget's own time,
    not the clock's: replaying the night after a rollback gives the same version again."""
    day1, day2 = BASE_TIME + timedelta(hours=10), BASE_TIME + timedelta(days=1, hours=10)
    write_fact_log([_row("z1", "pet", " Rex", day1), _row("z2", "pet", " Luna", day1)],
                   tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=1, workers=0)
    run_nightly(spec)
    write_fact_log([_row("z1", None, None, day2, op="forget_user"), _row("z1", "city", " Lyon", day2 + timedelta(hours=1))],
                   tmp_path / "log" / "day=2" / "part-0.parquet")
    night2 = run_nightly(spec)
    assert sorted(_all_published(local_store)) == ["z1", "z2"]
    rollback(local_store, night2.parent, reason="bad night", actor="pytest")  # the rewrite of night 1
    replay = run_nightly(spec)
    assert replay.published and sorted(_all_published(local_store)) == ["z1", "z2"]
    reasons = query_stats(local_store, f"select op, reason from rejects where version = {replay.version}")
    assert reasons.to_pylist() == [{"op": "forget_user", "reason": "DUPLICATE"}]  # the rewrite already holds it


def _all_published_at(store, version):
    from versions.catalog import read_manifest

    manifest = read_manifest(store, version)
    return {u for e in manifest.shards for u in load_shard_bundle(store, e).column("user_id").to_pylist()}


def test_a_night_without_num_shards_keeps_the_stores_shards(tmp_path, tiny_dir, local_store):
    write_fact_log(fact_log_rows(3, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=4, workers=0)
    run_nightly(spec)
    write_fact_log(fact_log_rows(1, 1, prefix="later"), tmp_path / "log" / "day=2" / "part-0.parquet")
    report = run_nightly(NightlySpec(**{**spec.to_dict(), "num_shards": None}))
    assert report.published and read_current(local_store)[0].num_shards == 4 and report.shards_changed == 1
    fresh = run_nightly(NightlySpec(**{**spec.to_dict(), "num_shards": None, "store": str(tmp_path / "new")}))
    assert fresh.published and read_current(LocalStore(tmp_path / "new"))[0].num_shards == 16


def test_the_watermark_keeps_files_outside_the_nights_fact_log(tmp_path, tiny_dir, local_store):
    """A night run on one day's folder (a backfill) must not forget what the whole log ingested."""
    write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    write_fact_log(fact_log_rows(1, 1, prefix="later"), tmp_path / "log" / "day=2" / "part-0.parquet")
    run_nightly(NightlySpec(**{**spec.to_dict(), "fact_log": str(tmp_path / "log" / "day=2")}))
    assert not run_nightly(spec).published  # day 1 is not read again


# ---------------------------------------------------------------- the bounded ledger (max_file_age)

DAY_NS = 86_400 * 10**9


def aged_log_file(path, mtime_ns: int, *, prefix: str):
    """A one-user log file whose modification time is set (as a file written that day)."""
    import os

    written = write_fact_log(fact_log_rows(1, 1, prefix=prefix), path)
    os.utime(written, ns=(mtime_ns, mtime_ns))
    return str(written)


def ledger(store) -> dict:
    return json.loads(read_current(store)[0].watermark)


def test_the_ledger_forgets_files_behind_the_horizon_and_does_not_read_unknown_ones(tmp_path, tiny_dir, local_store,
                                                                                   caplog):
    import time

    t0 = time.time_ns() - 30 * DAY_NS
    log = tmp_path / "log"
    spec = NightlySpec(store=local_store.uri, fact_log=str(log), model=str(tiny_dir), num_shards=2, workers=0,
                       max_file_age="1d")
    a = aged_log_file(log / "day=00" / "a.parquet", t0, prefix="a")
    assert run_nightly(spec).files_read == 1  # a first night reads the whole log: no horizon yet
    b = aged_log_file(log / "day=03" / "b.parquet", t0 + 3 * DAY_NS, prefix="b")
    assert run_nightly(spec).files_read == 1  # horizon t0 - 1d (the newest ingested, a, caps it)
    assert ledger(local_store)["horizons"] == {str(log): t0 - DAY_NS} and len(ledger(local_store)["files"]) == 2
    # horizon: min(newest listed t0+4d, newest ingested t0+3d) - 1d = t0 + 2d
    c = aged_log_file(log / "day=04" / "c.parquet", t0 + 4 * DAY_NS, prefix="c")
    edge = aged_log_file(log / "day=02" / "edge.parquet", t0 + 2 * DAY_NS, prefix="edge")  # exactly at it: inside
    late = aged_log_file(log / "day=01" / "late.parquet", t0 + DAY_NS, prefix="late")  # behind it, never ingested
    with caplog.at_level("WARNING", logger="pipeline.ingest"):
        report = run_nightly(spec)
    assert report.published and report.files_read == 2 and report.files_behind == 1
    assert published_delta(local_store, "edge-00000") is not None and published_delta(local_store, "late-00000") is None
    assert published_delta(local_store, "a-00000") is not None  # purged from the ledger, still served
    warned = [r.getMessage() for r in caplog.records if "older than the ingest horizon" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("fact log: 1 file(s)") and f"the oldest: {late} " in warned[0]
    assert sorted(ledger(local_store)["files"]) == sorted([b, c, edge])  # a: behind the horizon, forgotten
    assert ledger(local_store)["horizons"] == {str(log): t0 + 2 * DAY_NS}
    # the next night: a and late are behind the horizon and not in the ledger: neither is read
    aged_log_file(log / "day=05" / "d.parquet", t0 + 5 * DAY_NS, prefix="d")  # horizon t0 + 3d: b is at its edge
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.ingest"):
        report = run_nightly(spec)
    assert report.files_read == 1 and report.files_behind == 2 and report.accepted == 1
    # a was purged, late was warned about on the night it fell behind: no warning again
    assert not [r for r in caplog.records if "older than the ingest horizon" in r.getMessage()]
    assert sorted(ledger(local_store)["files"]) == sorted([b, c, str(log / "day=05" / "d.parquet")])
    # a file rewritten in place gets today's time: read again, whether its entry was purged or not
    write_fact_log(fact_log_rows(1, 1, prefix="a2"), a)
    report = run_nightly(spec)
    assert report.files_read == 1 and published_delta(local_store, "a2-00000") is not None
    assert not run_nightly(spec).published  # read once


@pytest.mark.parametrize("age", ["never", None])
def test_max_file_age_never_keeps_every_file_and_reads_every_unknown_one(tmp_path, tiny_dir, local_store, age):
    """'never', the default (None: not set): a backfill that arrives with its old modification
    times (tar x, cp -p) is read, however old."""
    import time

    t0 = time.time_ns() - 120 * DAY_NS
    log = tmp_path / "log"
    spec = NightlySpec(store=local_store.uri, fact_log=str(log), model=str(tiny_dir), num_shards=2, workers=0,
                       **({"max_file_age": age} if age else {}))
    paths = [aged_log_file(log / f"day={d:03d}" / "x.parquet", t0 + d * DAY_NS, prefix=f"d{d}") for d in (0, 90)]
    run_nightly(spec)
    paths += [aged_log_file(log / f"day={d:03d}" / "x.parquet", t0 + d * DAY_NS, prefix=f"d{d}") for d in (100, 1)]
    report = run_nightly(spec)
    assert report.files_read == 2 and report.files_behind == 0
    assert published_delta(local_store, "d1-00000") is not None  # 89 days older than the newest ingested: read
    assert sorted(ledger(local_store)["files"]) == sorted(paths) and "horizons" not in ledger(local_store)


def test_a_ledger_written_before_max_file_age_is_read_and_purged_by_the_rule(tmp_path, tiny_dir, local_store, caplog):
    """A watermark without ``horizons`` (every version before the option, or 'never'): its entries
    are read as they are, the old ones purged, and every unknown file behind the horizon is warned
    about (the ledger was complete: none of them was ingested)."""
    import time

    t0 = time.time_ns() - 30 * DAY_NS
    log = tmp_path / "log"
    spec = NightlySpec(store=local_store.uri, fact_log=str(log), model=str(tiny_dir), num_shards=2, workers=0,
                       max_file_age="never")
    old = [aged_log_file(log / f"day={d:02d}" / "x.parquet", t0 + d * DAY_NS, prefix=f"d{d}") for d in range(0, 10)]
    run_nightly(spec)
    written = ledger(local_store)
    assert set(written) == {"files", "max_event_time"} and len(written["files"]) == 10  # the format before the option
    new = aged_log_file(log / "day=10" / "x.parquet", t0 + 10 * DAY_NS, prefix="d10")
    never_read = aged_log_file(log / "day=03" / "never.parquet", t0 + 3 * DAY_NS, prefix="never")
    with caplog.at_level("WARNING", logger="pipeline.ingest"):
        report = run_nightly(NightlySpec(**{**spec.to_dict(), "max_file_age": "2d"}))
    assert report.files_read == 1 and report.files_behind == 1 and published_delta(local_store, "never-00000") is None
    warned = [r.getMessage() for r in caplog.records if "older than the ingest horizon" in r.getMessage()]
    assert len(warned) == 1 and f"the oldest: {never_read} " in warned[0]
    # horizon: newest ingested (day 9) - 2d = day 7; days 0-6 leave the ledger
    assert sorted(ledger(local_store)["files"]) == sorted(old[7:] + [new])
    assert ledger(local_store)["horizons"] == {str(log): t0 + 7 * DAY_NS}


@pytest.mark.parametrize("folder", ["day=2026-11-20", "my store", "a#b?c%20d"])
def test_a_store_under_any_folder_name_publishes(tmp_path, tiny_dir, folder):
    write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    store_dir = tmp_path / folder / "store"
    spec = NightlySpec(store=str(store_dir), fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    report = run_nightly(spec)
    assert report.published and report.users == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["log", folder])  # nothing written beside it
    assert open_store(LocalStore(store_dir).uri).root == store_dir.resolve()


# ---------------------------------------------------------------- layers over a base


def _nightly_spec(tmp_path, store, tiny_dir, **overrides) -> NightlySpec:
    return NightlySpec(**{"store": store.uri, "fact_log": str(tmp_path / "log"), "model": str(tiny_dir),
                          "num_shards": 2, "workers": 0, "compact_layer_share": 1000.0, **overrides})


def _change(rows, user, answer, day):
    row = next(r for r in rows if r["user_id"] == user)
    return dict(row, answer=answer, event_time=BASE_TIME + timedelta(days=day))


def test_a_night_of_few_changed_users_writes_layers_of_them_only_and_keeps_every_base(tmp_path, tiny_dir, tiny,
                                                                                     local_store):
    from schemas.facts import decode_fact_state
    from versions.catalog import load_shard_state

    rows = fact_log_rows(8, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = _nightly_spec(tmp_path, local_store, tiny_dir)
    run_nightly(spec)
    before, _ = read_current(local_store)
    night1 = _all_published(local_store)
    changed = _change(rows, "user-00000", " Juniper", 1)
    write_fact_log([changed], tmp_path / "log" / "day=2" / "part-0.parquet")
    report = run_nightly(spec)
    after, _ = read_current(local_store)
    shard = shard_of("user-00000", 2)
    assert (report.shards_changed, report.layers_written, report.compacted_shards) == (1, 1, 0)
    entry = after.shard(shard)
    assert entry.bundle_key == before.shard(shard).bundle_key and entry.stats == before.shard(shard).stats
    assert [(x.users, x.tombstones) for x in entry.layers] == [(1, 0)] and len(entry.state_layers) == 1
    layer_state = decode_fact_state(local_store.get(entry.state_layers[0].state_key))
    assert set(layer_state.column("user_id").to_pylist()) == {"user-00000"}  # the changed user's facts only
    assert after.shard(1 - shard) == before.shard(1 - shard)
    assert_store_recalls(local_store, tiny, [changed])
    published = _all_published(local_store)
    assert all(published[u].equals(night1[u]) for u in published if u != "user-00000")
    state = load_shard_state(local_store, entry)  # the merged state has the new answer, once
    mine = state.filter(pa_equal(state, "user_id", "user-00000")).to_pylist()
    assert sorted(r["answer"] for r in mine) == sorted([changed["answer"]] + [
        r["answer"] for r in rows if r["user_id"] == "user-00000" and r["fact_id"] != changed["fact_id"]])
    assert (after.users, after.facts) == (before.users, before.facts)


def pa_equal(table, column, value):
    import pyarrow.compute as pc

    return pc.equal(table.column(column), value)


def test_a_night_gives_a_shard_past_the_spec_limit_a_new_base_with_the_same_deltas(tmp_path, tiny_dir, local_store):
    rows = fact_log_rows(8, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = _nightly_spec(tmp_path, local_store, tiny_dir, compact_after_layers=1)
    run_nightly(spec)
    shard = shard_of("user-00000", 2)
    for day, expected_layers in ((1, 1), (2, 0)):
        write_fact_log([_change(rows, "user-00000", f" Answer{day}", day)],
                       tmp_path / "log" / f"day={day + 1}" / "part-0.parquet")
        layered = _all_published(local_store) if day == 2 else None
        report = run_nightly(spec)
        entry = read_current(local_store)[0].shard(shard)
        assert len(entry.layers) == expected_layers and len(entry.state_layers) == expected_layers
    assert report.compacted_shards == 1 and entry.compactions == 1
    compacted = _all_published(local_store)
    assert all(compacted[u].equals(layered[u]) for u in compacted if u != "user-00000")
    shards = query_stats(local_store, f"select shard, compacted, compactions from shards where version = "
                                      f"{report.version} order by shard").to_pylist()
    assert [(r["compacted"], r["compactions"]) for r in shards] == [
        (s == shard, int(s == shard)) for s in range(2)]


def test_a_forget_in_a_night_that_layers_the_same_shard_leaves_the_user_nowhere(tmp_path, tiny_dir, tiny, local_store):
    from tests.harness import store_objects_holding, value_rows

    rows = fact_log_rows(8, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = _nightly_spec(tmp_path, local_store, tiny_dir)
    run_nightly(spec)
    write_fact_log([_change(rows, "user-00001", " Juniper", 1)], tmp_path / "log" / "day=2" / "part-0.parquet")
    run_nightly(spec)  # user 1's shard now has a layer
    target = "user-00002"  # same shard as users 0 and 1, in the base
    assert shard_of(target, 2) == shard_of("user-00001", 2) == shard_of("user-00000", 2)
    target_rows = value_rows(published_delta(local_store, target))
    forget = {"user_id": target, "fact_id": None, "op": "forget_user", "trigger": None, "answer": None,
              "event_time": BASE_TIME + timedelta(days=2), "scope": None}
    changed = _change(rows, "user-00000", " Pepper", 2)
    write_fact_log([forget, changed], tmp_path / "log" / "day=3" / "part-0.parquet")
    report = run_nightly(spec)
    manifest, _ = read_current(local_store)
    assert report.layers_written == 1 and len(manifest.shard(shard_of(target, 2)).layers) == 2
    assert store_objects_holding(local_store, target, target_rows) == []
    assert published_delta(local_store, target) is None
    assert_store_recalls(local_store, tiny, [changed, _change(rows, "user-00001", " Juniper", 1)])


def test_resharding_a_store_with_layers_moves_every_users_newest_delta(tmp_path, tiny_dir, local_store):
    rows = fact_log_rows(8, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = _nightly_spec(tmp_path, local_store, tiny_dir)
    run_nightly(spec)
    write_fact_log([_change(rows, "user-00000", " Juniper", 1)], tmp_path / "log" / "day=2" / "part-0.parquet")
    run_nightly(spec)
    assert any(e.layers for e in read_current(local_store)[0].shards)
    before = _all_published(local_store)
    write_fact_log([_change(rows, "user-00005", " Pepper", 2)], tmp_path / "log" / "day=3" / "part-0.parquet")
    report = run_nightly(NightlySpec(**{**spec.to_dict(), "num_shards": 3}))
    manifest, _ = read_current(local_store)
    assert report.compiled_users == 1 and all(not e.layers and not e.state_layers for e in manifest.shards)
    after = _all_published(local_store)
    assert after.keys() == before.keys()
    assert all(after[u].equals(before[u]) for u in after if u != "user-00005")  # user 0's layered delta moved
    facts = query_stats(local_store, f"select count(*) n from facts where version = {manifest.version}")
    assert facts.column("n").to_pylist() == [16]


def test_a_forget_rewrites_the_shards_stats_of_every_version_it_reissues(tmp_path, tiny_dir, local_store):
    """The version-level ``shards`` part (totals and keys per shard) of a rewritten version is
    the rewrite's, not the old version's: no stale user count, bytes or key of an object the
    forget deleted."""
    from versions.forget import forget_user

    write_fact_log(fact_log_rows(6, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    forget_user(local_store, "user-00001", actor="pytest", reason="test")
    manifest, _ = read_current(local_store)
    rows = query_stats(local_store, f"select shard, users, facts, bytes, bundle_key from shards "
                                    f"where version = {manifest.version} order by shard").to_pylist()
    assert [(r["users"], r["facts"], r["bytes"], r["bundle_key"]) for r in rows] == [
        (e.users, e.facts, e.delta_bytes, e.bundle_key) for e in manifest.shards]
    assert sum(r["users"] for r in rows) == 5
    assert all(local_store.head(r["bundle_key"]) is not None for r in rows)


def test_forget_deletes_what_a_killed_night_wrote_about_the_user(tmp_path, tiny_dir, local_store):
    """A night killed after writing its shard objects but before its manifest leaves objects no
    manifest names; if they hold a user that is then forgotten, the forget deletes them (an
    erasure must not wait for gc), and keeps every other unreferenced object for gc."""
    from versions.forget import forget_user, scan_for_user

    rows = fact_log_rows(6, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    changed = dict(next(r for r in rows if r["user_id"] == "user-00001"), answer=" Juniper",
                   event_time=BASE_TIME + timedelta(days=1))
    write_fact_log([changed], tmp_path / "log" / "day=2" / "part-0.parquet")

    def crash(step):
        if step == "write_manifest":
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_nightly(spec, crash_hook=crash)
    orphans = [k for k in scan_for_user(local_store, "user-00001") if k.startswith("objects/")]
    assert orphans  # the killed night's state layer (and more) holds the user
    report = forget_user(local_store, "user-00001", actor="pytest", reason="test")
    assert set(orphans) <= set(report.deleted_objects)
    assert scan_for_user(local_store, "user-00001") == []
    assert run_nightly(spec).published  # the next night still works
    assert scan_for_user(local_store, "user-00001") == []


@pytest.mark.parametrize("compile_overrides, message", [
    ({"lr": "abc"}, "compile.lr must be a finite number"),
    ({"steps": 0}, "compile.steps must be at least 1"),
    ({"compiled_step": 1}, "compile.compiled_step must be true or false"),
    ({"facts_per_batch": 2.5}, "compile.facts_per_batch must be an int"),
    ({"min_margin": -1.0}, "compile.min_margin must not be negative"),
    ({"prefix_groups": 0}, "compile.prefix_groups must be at least 1"),
    ({"tokenize_workers": -2}, r"compile.tokenize_workers must be -1 \(automatic\) or more"),
    ({"stop_margin": "8"}, r"compile.stop_margin must be a finite number or null \(off\)"),
    ({"stop_margin": 0.2}, r"compile.stop_margin \(0.2\) must be at least compile.min_margin \(0.5\)"),
])
def test_a_compile_override_of_the_wrong_type_is_refused_before_any_work(compile_overrides, message):
    with pytest.raises(SpecError, match=message):
        NightlySpec(store="s", fact_log="l", model="m", compile=compile_overrides)
    with pytest.raises(SpecError, match="'workers' must be an int"):
        NightlySpec(store="s", fact_log="l", model="m", workers=True)


@pytest.mark.parametrize("workers", [-1, 0, 4])
def test_tokenize_workers_takes_its_documented_automatic_setting(workers):
    spec = NightlySpec(store="s", fact_log="l", model="m", compile={"tokenize_workers": workers})
    assert spec.compile_options().tokenize_workers == workers


def test_an_operator_forget_refuses_a_late_event_from_a_clock_running_ahead(tmp_path, tiny_dir, local_store):
    """`engram forget` at time T: an event of the user that arrives on a later night stamped a few
    hours after T (a client clock running ahead, within what ingest accepts) was written before
    the forget as far as anyone can tell; it must not bring the user back, nor store the id."""
    from datetime import datetime, timezone

    from versions.forget import forget_user

    rows = fact_log_rows(6, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    run_nightly(spec)
    forget_user(local_store, "user-00001", actor="pytest", reason="test")
    ahead = dict(next(r for r in rows if r["user_id"] == "user-00001"), fact_id="late", answer=" Juniper",
                 event_time=datetime.now(timezone.utc) + timedelta(hours=3))
    write_fact_log([ahead], tmp_path / "log" / "day=2" / "part-0.parquet")
    report = run_nightly(spec)
    assert published_delta(local_store, "user-00001") is None
    rejects = query_stats(local_store, f"select reason, user_id, fact_id from rejects where version = {report.version}").to_pylist()
    assert rejects == [{"reason": "FORGOTTEN_USER", "user_id": None, "fact_id": None}]


def _a_night_and_the_next_log(tmp_path, tiny_dir, local_store):
    """(spec, night 1's rows, night 1's report), night 2's log written and not yet run."""
    rows = fact_log_rows(6, 2)
    write_fact_log(rows, tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2, workers=0)
    first = run_nightly(spec)
    write_fact_log(night_two_rows(rows), tmp_path / "log" / "day=2" / "part-0.parquet")
    return spec, rows, first


def test_a_night_whose_prior_objects_a_forget_beside_it_deleted_says_current_moved(tmp_path, tiny_dir, local_store,
                                                                                    monkeypatch):
    """`engram forget` run beside a night moves CURRENT and deletes the objects the night is reading:
    the night publishes nothing and says CURRENT moved and that a re-run is safe (not only the
    missing object); the re-run publishes."""
    import jobs.nightly as nightly
    from versions.errors import PublishConflict
    from versions.forget import forget_user

    spec, rows, first = _a_night_and_the_next_log(tmp_path, tiny_dir, local_store)
    real, calls = nightly.apply_shard, []

    def apply_beside_a_forget(ctx, shard, prior, *args):
        if not calls:
            victim = next(r["user_id"] for r in rows if shard_of(r["user_id"], 2) == shard)
            forget_user(local_store, victim, actor="pytest", reason="beside a night")
        calls.append(shard)
        return real(ctx, shard, prior, *args)

    monkeypatch.setattr(nightly, "apply_shard", apply_beside_a_forget)
    with pytest.raises(PublishConflict, match=rf"CURRENT moved from v{first.version} to v\d+ while this night ran.*"
                                              r"nothing was published. Run the night again"):
        run_nightly(spec)
    monkeypatch.setattr(nightly, "apply_shard", real)
    assert run_nightly(spec).published


@pytest.mark.parametrize("forgets", [False, True])
def test_two_nights_at_once_one_publishes_the_other_says_current_moved_and_a_rerun_is_safe(tmp_path, tiny_dir,
                                                                                            local_store, monkeypatch,
                                                                                            forgets):
    """Two nights on one store at once (a cron overlap): the later publish lost the compare-and-swap
    with "re-plan against CURRENT", a library's words; where the other night's forget stage had
    deleted objects it read, it blamed "an engram forget, rollback or gc". Either way it names the
    move and another night, says nothing was published and that a re-run is safe; the re-run
    publishes nothing new."""
    import jobs.nightly as nightly
    from versions.errors import PublishConflict

    spec, rows, first = _a_night_and_the_next_log(tmp_path, tiny_dir, local_store)
    if not forgets:  # night 2's log of upserts only: the other night deletes nothing this one reads
        write_fact_log(fact_log_rows(2, 1, seed=7, day=1, prefix="n2"), tmp_path / "log" / "day=2" / "part-0.parquet")
    real, calls = nightly.apply_shard, []

    def apply_beside_another_night(ctx, shard, prior, *args):
        if not calls:
            calls.append(shard)
            assert run_nightly(spec).published  # the other night, start to end
        return real(ctx, shard, prior, *args)

    monkeypatch.setattr(nightly, "apply_shard", apply_beside_another_night)
    with pytest.raises(PublishConflict, match=r"CURRENT moved .*another night.*nothing was published. Run "):
        run_nightly(spec)
    monkeypatch.setattr(nightly, "apply_shard", real)
    assert not run_nightly(spec).published


def test_a_night_whose_stats_parts_a_forget_beside_it_deleted_says_current_moved(tmp_path, tiny_dir, local_store,
                                                                                   monkeypatch):
    """The same with the prior stats parts (read unverified, as ObjectNotFound): one line saying
    CURRENT moved, not the bare missing object."""
    import pipeline.shards as shards
    from versions.errors import PublishConflict
    from versions.forget import forget_user

    spec, rows, first = _a_night_and_the_next_log(tmp_path, tiny_dir, local_store)
    real, calls = shards._read_part, []

    def read_beside_a_forget(*args, **kwargs):
        if not calls:
            for user in sorted({r["user_id"] for r in rows}):
                forget_user(local_store, user, actor="pytest", reason="beside a night")
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, "_read_part", read_beside_a_forget)
    with pytest.raises(PublishConflict, match=rf"CURRENT moved from v{first.version} to v\d+ while this night ran"):
        run_nightly(spec)


def test_a_night_whose_new_objects_a_gc_beside_it_deleted_says_gc_and_to_run_again(tmp_path, tiny_dir, local_store):
    """`engram gc` run beside a night deletes the objects the night has written and not yet published
    (no manifest names them): the night fails with one line naming gc and saying to run it again
    (not an IntegrityError that reads like a damaged store); nothing is lost, and the re-run publishes."""
    from versions.errors import PublishConflict
    from versions.retention import collect

    spec, rows, first = _a_night_and_the_next_log(tmp_path, tiny_dir, local_store)

    def gc_before_publishing(step):
        if step == "write_objects":
            collect(local_store, keep=1, actor="pytest")

    with pytest.raises(PublishConflict, match=r"^engram gc ran beside this night .*nothing was published and nothing "
                                              r"is lost. Run the night again"):
        run_nightly(spec, crash_hook=gc_before_publishing)
    # only the night's forget stage moved CURRENT (its rewrite of v1 without the forgotten user)
    assert read_current(local_store)[0].job_id.startswith("forget:")
    again = run_nightly(spec)
    assert again.published and again.compiled_users


def test_a_night_whose_new_objects_a_gc_deletes_after_its_last_check_publishes_nothing(tmp_path, tiny_dir,
                                                                                        local_store):
    """`engram gc` beside a night, deleting the night's new objects after the publish checked them
    and before its manifest is written: the night made CURRENT a version missing 10 of its objects.
    gc records what it deletes first (audit ``gc_deletes``); the night finds the record before it
    moves CURRENT, publishes nothing and says gc ran beside it; the re-run publishes."""
    from versions.errors import PublishConflict
    from versions.retention import collect

    spec, rows, first = _a_night_and_the_next_log(tmp_path, tiny_dir, local_store)

    def gc_after_the_checks(step):
        if step == "write_manifest":
            assert collect(local_store, keep=1, actor="pytest").deleted_objects

    with pytest.raises(PublishConflict, match=r"^engram gc ran beside this night .*nothing was published and nothing "
                                              r"is lost. Run the night again"):
        run_nightly(spec, crash_hook=gc_after_the_checks)
    current = read_current(local_store)[0]
    assert current.job_id.startswith("forget:")  # the night's own forget stage's rewrite of v1, complete
    assert all(local_store.head(k) is not None for k in current.object_keys())
    again = run_nightly(spec)
    assert again.published and all(local_store.head(k) is not None for k in read_current(local_store)[0].object_keys())


def test_a_night_whose_only_new_file_is_unreadable_changes_nothing_and_names_the_file_until_fixed(tmp_path, tiny_dir,
                                                                                                  local_store):
    """With ``on_bad_file: reject`` a night whose only new file is unreadable accepts no fact: it
    used to publish a version of the previous one's content (every shard carried, the watermark
    unchanged) to hold the file's reject, and as the file stays out of the watermark, every later
    night read it again and published one more such version (every node polled and swapped for
    nothing). Now such a night is a "nothing changed" night: CURRENT untouched, the report names
    the file, its reason and why; a night that publishes records the reject in its rejects table."""
    write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0, on_bad_file="reject")
    first = run_nightly(spec)
    bad = tmp_path / "log" / "day=2" / "bad.parquet"
    bad.parent.mkdir()
    bad.write_bytes(b"not parquet")
    for _ in (1, 2):
        report = run_nightly(spec)
        assert not report.published and report.version == first.version and report.rejects == 1, report
        assert [(f["path"], f["reason"]) for f in report.rejected_files] == [(str(bad), "UNREADABLE_FILE")]
        assert "does not begin as a Parquet file does" in report.rejected_files[0]["detail"]
        assert [v.version for v in list_versions(local_store)] == [first.version]
    write_fact_log(fact_log_rows(1, 1, prefix="late"), tmp_path / "log" / "day=3" / "part-0.parquet")
    both = run_nightly(spec)  # a night with rows publishes, and records the file's reject with them
    assert both.published and both.version == first.version + 1 and both.accepted == 1 and both.rejects == 1
    rows = query_stats(local_store, "select version, reason, source from rejects order by version").to_pylist()
    assert [(r["version"], r["reason"], r["source"]) for r in rows] == [(both.version, "UNREADABLE_FILE", str(bad))]
    assert str(bad) not in json.loads(read_current(local_store)[0].watermark)["files"]
    write_fact_log(fact_log_rows(1, 1, prefix="fixed"), bad)  # fixed upstream
    fixed = run_nightly(spec)
    assert fixed.published and fixed.rejects == 0 and fixed.accepted == 1


@pytest.mark.parametrize("on_bad_file", ["raise", "reject"])
def test_files_that_are_no_data_beside_the_log_are_skipped_and_change_nothing(tmp_path, tiny_dir, local_store,
                                                                              on_bad_file):
    """What other tools leave beside Parquet files: markers and checksums under a '_' or '.' name
    (Spark's _SUCCESS, _committed_*, _started_*, Hive's .hive-staging*, Hadoop's .crc) and files of
    another kind without a Parquet suffix (a README.txt, a zero-byte marker, a JSON manifest). The
    latter were read as Parquet: a night failed on them, or with on_bad_file: reject published a
    new version of the same content every night. Now they are skipped like _SUCCESS, named in the
    report; a file named as Parquet that is none is still a reject (its rows would go unseen)."""
    day = tmp_path / "log" / "day=1"
    write_fact_log(fact_log_rows(2, 1), day / "part-00000-1a2b.c000.snappy.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0, on_bad_file=on_bad_file)
    first = run_nightly(spec)
    assert first.published and first.skipped_files == []
    strays = {"_SUCCESS": b"", "_committed_123": b'{"added":[]}', "_started_123": b"", ".part-0.parquet.crc": b"crc\0",
              ".hive-staging_hive_2026/-ext-10000/x": b"x", "README.txt": b"exported by job 7\n", "SUCCESS": b"",
              "manifest.json": b'{"files": 1}', "part-0.crc": b"\x00\x01"}
    for name, content in strays.items():
        (day / name).parent.mkdir(parents=True, exist_ok=True)
        (day / name).write_bytes(content)
    for _ in (1, 2):
        report = run_nightly(spec)
        assert not report.published and report.version == first.version and report.rejects == 0, report
        assert sorted(f["path"].rsplit("/", 1)[1] for f in report.skipped_files) == [
            "README.txt", "SUCCESS", "manifest.json", "part-0.crc"]
    assert [v.version for v in list_versions(local_store)] == [first.version]
    write_fact_log(fact_log_rows(1, 1, prefix="hive"), tmp_path / "hive.parquet")
    (day / "000000_0").write_bytes((tmp_path / "hive.parquet").read_bytes())  # Hive's name: Parquet without a suffix
    hive = run_nightly(spec)
    assert hive.published and hive.accepted == 1 and hive.rejects == 0 and len(hive.skipped_files) == 4
    ledger = json.loads(read_current(local_store)[0].watermark)["files"]
    # a file skipped as no data is recorded with its identity once a night publishes: no read of it
    # every night after; one that changes under its name is read again (below)
    assert {str(day / "000000_0"), str(day / "README.txt"), str(day / "SUCCESS")} <= set(ledger)
    again = run_nightly(spec)
    assert again.published is False and again.skipped_files == []  # recorded: not even listed as new
    (day / "000001_0").write_bytes(b"")
    empty = run_nightly(spec)
    assert empty.published is False and [f["path"] for f in empty.skipped_files] == [str(day / "000001_0")]
    write_fact_log(fact_log_rows(1, 1, prefix="late"), tmp_path / "late.parquet")
    (day / "000001_0").write_bytes((tmp_path / "late.parquet").read_bytes())  # the empty file, filled since
    filled = run_nightly(spec)
    assert filled.published and filled.accepted == 1 and filled.rejects == 0, filled
    write_fact_log(fact_log_rows(1, 1, prefix="readme"), tmp_path / "readme.parquet")
    (day / "manifest.json").unlink()
    (day / "000002_0").write_bytes(b"")  # recorded empty by the next publishing night, then filled
    (day / "000003_0").write_bytes((tmp_path / "readme.parquet").read_bytes())
    assert run_nightly(spec).published
    assert str(day / "000002_0") in json.loads(read_current(local_store)[0].watermark)["files"]
    write_fact_log(fact_log_rows(1, 1, prefix="refill"), tmp_path / "refill.parquet")
    (day / "000002_0").write_bytes((tmp_path / "refill.parquet").read_bytes())
    refilled = run_nightly(spec)
    assert refilled.published and refilled.accepted == 1, refilled  # read again as a changed file


def test_new_log_files_with_no_rows_publish_nothing_first_night_or_later(tmp_path, tiny_dir, local_store):
    """An empty export (a Parquet file of zero rows) has nothing to record, not even a reject: a
    first night published an empty v1 (a "published" store with no user in it), a later night a
    v2 of v1's content that moved CURRENT (every node polled and swapped) for nothing. Now: exit 0,
    nothing published, CURRENT untouched, and the text and --json say so."""
    from typer.testing import CliRunner

    import pyarrow.parquet as pq

    from jobs.cli import app
    from schemas import facts as F

    empty = tmp_path / "log" / "day=1" / "part-0.parquet"
    empty.parent.mkdir(parents=True)
    pq.write_table(F.FACT_LOG_SCHEMA.empty_table(), empty)
    args = ["run", "nightly", "--store", local_store.uri, "--fact-log", str(tmp_path / "log"), "--model",
            str(tiny_dir), "--num-shards", "2", "--workers", "0"]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0 and "nothing to publish (the new log files hold no rows); no version yet" in out.output
    assert read_current(local_store) is None and local_store.list("manifests/") == []
    write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "day=2" / "part-0.parquet")
    first = run_nightly(NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                                    num_shards=2, workers=0))
    assert first.published and first.version == 1 and first.files_read == 2
    (tmp_path / "log" / "day=3").mkdir()
    pq.write_table(F.FACT_LOG_SCHEMA.empty_table(), tmp_path / "log" / "day=3" / "part-0.parquet")
    out = CliRunner().invoke(app, [*args, "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert (report["published"], report["version"], report["files_read"]) == (False, 1, 1)
    assert read_current(local_store)[0].version == 1 and local_store.list("manifests/") == ["manifests/v00000001.json"]


def test_rollback_names_the_log_files_the_next_night_reads_again(tmp_path, tiny_dir, local_store):
    """A rollback moves the watermark back with CURRENT: the next night reads the rolled-back night's
    files again and republishes their rows. `engram rollback` names those files (text and --json
    ``reread_files``), and with them moved out of the log the next night changes nothing."""
    from typer.testing import CliRunner

    from jobs.cli import app

    spec, rows, first = _a_night_and_the_next_log(tmp_path, tiny_dir, local_store)
    second = run_nightly(spec)
    assert second.published
    before = second.parent  # v1 as night 2's forget stage rewrote it (the same watermark)
    bad = tmp_path / "log" / "day=2" / "part-0.parquet"
    out = CliRunner().invoke(app, ["rollback", "--store", local_store.uri, "--to", str(before), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout) == {"rolled_back": True, "from": second.version, "to": before,
                                      "reread_files": [str(bad)]}
    out = CliRunner().invoke(app, ["rollback", "--store", local_store.uri, "--to", str(second.version)])
    assert out.exit_code == 0 and "reads these 0" not in out.output and str(bad) not in out.output, out.output
    out = CliRunner().invoke(app, ["rollback", "--store", local_store.uri, "--to", str(before)])
    assert out.exit_code == 0 and "the next night reads these 1 log file(s) again" in out.output, out.output
    assert str(bad) in out.output and "move them out of the fact log" in out.output
    bad.rename(tmp_path / "quarantined.parquet")
    again = run_nightly(spec)
    assert not again.published and again.version == before


def test_a_night_on_a_version_another_tool_published_fails_naming_it_and_the_rollback(tmp_path, tiny_dir, tiny,
                                                                                      local_store):
    """A version whose watermark is not a night's JSON (published through the library by another
    tool, or a damaged manifest) cannot tell a night which log files it holds: the night fails
    before reading anything, naming the version and the fix (was a bare JSONDecodeError), and a
    rollback to it still names no file to read again rather than failing."""
    from typer.testing import CliRunner

    from jobs.cli import app
    from tests.harness import publish_deltas

    write_fact_log(fact_log_rows(4, 2), tmp_path / "log" / "day=1" / "part-0.parquet")
    first = run_nightly(_nightly_spec(tmp_path, local_store, tiny_dir))
    assert first.published
    other = publish_deltas(local_store, tiny, {}, num_shards=2, job_id="other-tool")  # watermark "w2-other-tool"
    out = CliRunner().invoke(app, ["run", "nightly", "--store", local_store.uri, "--fact-log", str(tmp_path / "log"),
                                   "--model", str(tiny_dir), "--workers", "0", "--json"])
    assert out.exit_code == 1, out.output
    error = json.loads(out.stdout.strip().splitlines()[-1])["error"]
    assert f"version {other.version}'s watermark is not a night's ('w2-other-tool')" in error
    assert "engram rollback --to N" in error
    out = CliRunner().invoke(app, ["rollback", "--store", local_store.uri, "--to", str(first.version), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["reread_files"] == []
    assert run_nightly(_nightly_spec(tmp_path, local_store, tiny_dir)).version == first.version  # nothing new


def test_a_night_over_a_log_on_a_share_skips_what_the_os_and_copy_tools_keep_there(tmp_path, tiny_dir, local_store):
    """A log folder on an SMB or NAS share: Windows Explorer's Thumbs.db, a file quarantined by deleting it
    (now in $RECYCLE.BIN), a copy in progress under rclone's temporary name. The night failed on Thumbs.db
    ("convert it to Parquet"), and the quarantined rows came back from the recycle bin. Under the default
    on_bad_file: raise, the night publishes nothing new, names the no-data files, rejects nothing; the
    copy is read once it has its own name."""
    day = tmp_path / "log" / "day=1"
    rows = fact_log_rows(2, 1)
    write_fact_log(rows, day / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0)
    first = run_nightly(spec)
    assert first.published
    (day / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504))
    write_fact_log([dict(rows[0], answer=" quarantined", event_time=BASE_TIME + timedelta(hours=1))],
                   tmp_path / "log" / "$RECYCLE.BIN" / "S-1-5-21" / "$RX7Q2.parquet")
    write_fact_log(fact_log_rows(1, 1, prefix="copied"), tmp_path / "copied.parquet")
    whole = (tmp_path / "copied.parquet").read_bytes()
    (day / "part-1.parquet.3f2a.partial").write_bytes(whole[:len(whole) // 2])
    report = run_nightly(spec)
    assert not report.published and report.rejects == 0 and report.rejected_files == []
    assert sorted(f["path"].rsplit("/", 1)[1] for f in report.skipped_files) == ["Thumbs.db",
                                                                                 "part-1.parquet.3f2a.partial"]
    (day / "part-1.parquet.3f2a.partial").write_bytes(whole)
    (day / "part-1.parquet.3f2a.partial").rename(day / "part-1.parquet")
    copied = run_nightly(spec)
    assert copied.published and copied.accepted == 1 and copied.rejects == 0
    answers = query_stats(local_store, f"select count(*) n from facts where version = {copied.version}").column("n")
    assert answers.to_pylist() == [3]  # two first-night facts and the copied one; the quarantined row never read
    state = [decode_fact_state(local_store.get(e.state_key)) for e in read_current(local_store)[0].shards]
    assert " quarantined" not in [a for t in state for a in t.column("answer").to_pylist()]


def test_a_log_file_moved_away_between_listing_and_reading_is_skipped_and_read_when_it_is_back(tmp_path, tiny_dir,
                                                                                                 local_store,
                                                                                                 monkeypatch):
    """The night lists the log, then reads each file: a file quarantined (or a temporary file
    renamed, or deleted by retention) in between failed the night as "not a readable Parquet
    file". It is skipped with a warning, not recorded as ingested, and read once it is back."""
    import jobs.nightly as nightly

    kept = write_fact_log(fact_log_rows(2, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    moved = write_fact_log(fact_log_rows(1, 1, prefix="later"), tmp_path / "log" / "day=1" / "part-1.parquet")
    aside = tmp_path / "quarantine.parquet"
    listing = nightly.list_log_files

    def list_then_move(source):
        listed = listing(source)
        if moved.exists():
            moved.rename(aside)
        return listed

    monkeypatch.setattr(nightly, "list_log_files", list_then_move)
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=2,
                       workers=0)
    first = run_nightly(spec)
    assert first.published and first.accepted == 2 and first.rejects == 0 and first.users == 2
    watermark = json.loads(read_current(local_store)[0].watermark)
    assert str(kept) in watermark["files"] and str(moved) not in watermark["files"]
    monkeypatch.undo()
    aside.rename(moved)  # back from quarantine
    second = run_nightly(spec)
    assert second.published and second.accepted == 1 and second.users == 3


def test_an_empty_spec_file_or_one_that_is_no_mapping_is_named_for_what_it_is(tmp_path):
    """An empty spec (not saved, a template not filled in, comments alone) said "expected a mapping
    of fields, got NoneType", Python's name for nothing; a `store=./x` line showed no value."""
    for text, message in (("", "holds no fields (an empty file?); give at least store, fact_log and model"),
                          ("# nightly spec\n", "holds no fields (an empty file?)"),
                          ("- store: x\n", "expected a mapping of fields (key: value lines), got a list"),
                          ("store=./x\n", "expected a mapping of fields (key: value lines), got 'store=./x'")):
        path = tmp_path / "spec.yaml"
        path.write_text(text)
        with pytest.raises(SpecError, match=re.escape(f"job spec {path}: {message}")):
            NightlySpec.load(path)
