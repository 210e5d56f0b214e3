"""Layers over a base: a night publishes only what changed, serving nodes fetch only new layers,
compaction changes nothing anyone is served, forgetting reaches a node's memory and disk.

Versions here are made through the nightly's store-level functions (tests.harness.publish_night:
pipeline.shards.write_layer / write_base, versions.publish) on synthetic deltas, so they need no
compile; tests/test_nightly.py runs the same through whole nights.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from jobs.compact import compact
from schemas.bundle import bundle_deltas
from schemas.manifest import ManifestError
from serving.pull import BundleCache, PullClient
from tests.harness import (
    files_holding,
    publish_night,
    random_delta,
    store_objects_holding,
    value_rows,
)
from versions.catalog import list_versions, load_shard_bundle, read_current, read_manifest
from versions.errors import UnknownVersion
from versions.forget import forget_user
from versions.layout import shard_of
from versions.retention import collect
from versions.rollback import rollback

NUM_SHARDS = 2
USERS = [f"user-{i:03d}" for i in range(12)]


def served(store) -> dict:
    """user -> Delta of CURRENT's merged views (every object verified)."""
    manifest, _ = read_current(store)
    return {u: d for e in manifest.shards for u, d in bundle_deltas(load_shard_bundle(store, e)).items()}


def same_deltas(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[u].equals(b[u]) for u in a)


def night(store, fingerprint: str, changes: dict, **options):
    """A night of synthetic changes; layers are kept whatever their size unless a test sets limits
    (bases here hold a handful of tiny deltas, so any layer is a large share of one)."""
    options.setdefault("compact_layer_share", 1000.0)
    return publish_night(store, fingerprint, changes, **options)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def first(local_store, tiny, rng):
    """v1: every user of USERS with a random delta, as bases."""
    deltas = {u: random_delta(tiny, rng) for u in USERS}
    night(local_store, tiny.fingerprint, deltas)
    return deltas


# ---------------------------------------------------------------- the store


def test_a_night_of_few_changed_users_adds_a_layer_and_keeps_every_base(local_store, tiny, rng, first):
    before, _ = read_current(local_store)
    changed = {USERS[0]: random_delta(tiny, rng), USERS[1]: None}
    after = night(local_store, tiny.fingerprint, changed)
    for old, new in zip(before.shards, after.shards):
        assert new.bundle_key == old.bundle_key and new.stats == old.stats  # the bases are not rewritten
        mine = {u for u in changed if shard_of(u, NUM_SHARDS) == new.shard}
        assert len(new.layers) == (1 if mine else 0)
        if mine:
            layer = new.layers[0]
            assert (layer.users, layer.tombstones) == (int(USERS[0] in mine), int(USERS[1] in mine))
            assert layer.parent_sha256 == new.bundle_sha256 and layer.bytes < new.bundle_bytes
    want = {u: d for u, d in (first | changed).items() if d is not None}
    assert same_deltas(served(local_store), want)
    assert after.users == len(want) and after.facts == len(want)  # the merged view's totals


def test_compaction_never_changes_what_any_user_is_served(local_store, tiny, rng, first, tmp_path):
    for i in range(3):
        night(local_store, tiny.fingerprint, {USERS[i]: random_delta(tiny, rng), USERS[-1 - i]: None})
    layered, _ = read_current(local_store)
    assert all(e.layers for e in layered.shards)
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    before = served(local_store)
    from pipeline.stats import query_stats

    stats_before = query_stats(local_store, f"select * exclude (version) from facts where version = {layered.version} "
                                            "order by user_id").to_pylist()

    report = compact(local_store)
    compacted, _ = read_current(local_store)
    assert report.published and report.compacted_shards == [0, 1] and report.layers_merged == 6
    assert all(not e.layers and not e.state_layers and e.compactions == 1 for e in compacted.shards)
    assert same_deltas(served(local_store), before)
    assert (compacted.users, compacted.facts, compacted.forgotten) == (layered.users, layered.facts, layered.forgotten)
    assert node.poll().version == compacted.version
    assert same_deltas({u: node.deltas_for(u)[0] for u in before}, before)
    assert all(node.deltas_for(u) == () for u in set(USERS) - set(before))
    stats_after = query_stats(local_store, f"select * exclude (version) from facts where version = {compacted.version} "
                                           "order by user_id").to_pylist()
    assert stats_after == stats_before
    shards = query_stats(local_store, "select version, shard, layers, compacted, compactions from shards "
                                      f"where version = {compacted.version} order by shard").to_pylist()
    assert [(r["layers"], r["compacted"], r["compactions"]) for r in shards] == [(0, True, 1), (0, True, 1)]
    assert not compact(local_store).published  # nothing left to compact


def test_a_shard_past_the_layer_limit_gets_a_new_base_on_its_next_change(local_store, tiny, rng, first):
    user = USERS[0]
    shard = shard_of(user, NUM_SHARDS)
    for i in range(3):
        manifest = night(local_store, tiny.fingerprint, {user: random_delta(tiny, rng)},
                                 compact_after_layers=2)
        assert len(manifest.shard(shard).layers) == [1, 2, 0][i]
    assert manifest.shard(shard).compactions == 1


def test_the_stats_views_show_each_versions_layers_bytes_tombstones_and_users(local_store, tiny, rng, first):
    from pipeline.stats import query_stats, shards_table

    manifest = night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng), USERS[1]: None})
    rows = shards_table(list(manifest.shards), read_manifest(local_store, 1)).to_pylist()
    by_shard = {r["shard"]: r for r in rows}
    for entry in manifest.shards:
        row = by_shard[entry.shard]
        assert row["layers"] == len(entry.layers) and row["layer_bytes"] == [x.bytes for x in entry.layers]
        assert row["tombstones"] == sum(x.tombstones for x in entry.layers)
        assert row["bytes"] == entry.bundle_bytes + sum(row["layer_bytes"]) and row["compacted"] is False
    users = query_stats(local_store, f"select user_id from users where version = {manifest.version} "
                                     "order by user_id").column("user_id").to_pylist()
    assert users == sorted(set(USERS) - {USERS[1]})  # the newest entry per user, none for the removed one
    facts = query_stats(local_store, f"select user_id, count(*) n from facts where version = {manifest.version} "
                                     "group by 1 having n > 1")
    assert facts.num_rows == 0  # the changed user's older row is hidden by its layer


# ---------------------------------------------------------------- the serving node


def test_a_node_downloads_only_the_new_layers_and_a_restart_downloads_nothing(local_store, tiny, rng, first, tmp_path):
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    full = node.poll()
    v1, _ = read_current(local_store)
    assert full.downloaded_bytes == sum(e.bundle_bytes for e in v1.shards) and full.layers_applied == 0
    changed = {USERS[0]: random_delta(tiny, rng), USERS[5]: None}
    v2 = night(local_store, tiny.fingerprint, changed)
    pulled = node.poll()
    new_layers = [x for e in v2.shards for x in e.layers]
    assert pulled.downloaded_objects == len(new_layers) and pulled.layers_applied == len(new_layers)
    assert pulled.downloaded_bytes == sum(x.bytes for x in new_layers) and pulled.rebuilt_shards == ()
    assert same_deltas({u: node.deltas_for(u)[0] for u in served(local_store)}, served(local_store))
    assert node.deltas_for(USERS[5]) == ()

    restarted = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    again = restarted.poll()
    assert again.error is None and again.downloaded_objects == 0 and again.version == v2.version
    assert same_deltas({u: restarted.deltas_for(u)[0] for u in served(local_store)}, served(local_store))


def test_a_rollback_to_a_version_whose_base_the_node_holds_downloads_nothing(local_store, tiny, rng, first, tmp_path):
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng), USERS[1]: None})
    node.poll()
    for target in (2, 1):
        rollback(local_store, target, reason="test", actor="test")
        result = node.poll()
        assert result.error is None and result.version == target and result.downloaded_objects == 0
        assert same_deltas({u: node.deltas_for(u)[0] for u in served(local_store)}, served(local_store))
    assert node.deltas_for(USERS[1])  # back in v1


def test_the_nodes_cache_holds_only_the_objects_of_the_chains_it_serves(local_store, tiny, rng, first, tmp_path):
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    for i in range(3):
        night(local_store, tiny.fingerprint, {USERS[i]: random_delta(tiny, rng)})
        node.poll()
    compact(local_store)
    assert node.poll().evicted_objects > 0
    current, _ = read_current(local_store)
    cached = {p.stem for p in (tmp_path / "cache" / "shards").rglob("*.parquet")}
    assert cached == {e.bundle_sha256 for e in current.shards}  # bounded: one base per shard, no old layers


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupted", "other model"])
def test_a_damaged_layer_is_refused_naming_it_and_the_node_keeps_serving(local_store, tiny, rng, first, tmp_path, damage):
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    expected = served(local_store)
    manifest = night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    layer = manifest.shard(shard_of(USERS[0], NUM_SHARDS)).layers[0]
    data = local_store.get(layer.key)
    if damage == "missing":
        local_store.delete(layer.key)
    elif damage == "truncated":
        local_store.put(layer.key, data[: len(data) // 2])
    elif damage == "corrupted":
        local_store.put(layer.key, data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:  # a valid layer, written for another model, named by a manifest for this one
        other = night(local_store, "f" * 64, {USERS[0]: random_delta(tiny, rng)}, job_id="other")
        fake = replace(manifest, version=other.version + 1, parent=other.version, fingerprint=tiny.fingerprint,
                       shards=other.shards)
        local_store.put(fake.key, fake.to_json().encode())
        local_store.put("CURRENT", json.dumps({"version": fake.version, "manifest_key": fake.key}).encode())
        layer = fake.shard(shard_of(USERS[0], NUM_SHARDS)).layers[-1]
    result = node.poll()
    assert result.error is not None and layer.key in result.error, result.error
    assert node.index.version == 1 and same_deltas({u: node.deltas_for(u)[0] for u in expected}, expected)


def test_a_manifest_whose_layer_chain_is_broken_is_refused_by_versions_rollback_and_pull(local_store, tiny, rng, first,
                                                                                         tmp_path):
    from jobs.cli import app

    node = PullClient(local_store, tiny)
    node.poll()
    night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    v3 = night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    shard = shard_of(USERS[0], NUM_SHARDS)
    raw = json.loads(local_store.get(v3.key))
    del raw["shards"][shard]["layers"][0]  # the second layer now claims to apply on the base
    local_store.put(v3.key, json.dumps(raw).encode())
    with pytest.raises(ManifestError, match=r"layer chain broken: layers\[0\] applies on"):
        read_manifest(local_store, 3)

    result = node.poll()
    assert "layer chain broken" in result.error and node.index.version == 1
    listed = CliRunner().invoke(app, ["versions", "--store", str(local_store.root)])
    assert listed.exit_code == 0 and "v3 refused" in listed.output and "layer chain broken" in listed.output
    rollback(local_store, 1, reason="test", actor="test")
    with pytest.raises(UnknownVersion, match="layer chain broken"):
        rollback(local_store, 3, reason="test", actor="test")


@pytest.mark.parametrize("step", ["write_objects", "verify_objects", "write_manifest", "swap_current"])
def test_a_crash_between_writing_a_layer_and_the_commit_leaves_no_visible_change(local_store, tiny, rng, first,
                                                                                tmp_path, step):
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    before = served(local_store)
    changes = {USERS[0]: random_delta(tiny, rng)}

    def crash(at: str) -> None:
        if at == step:
            raise RuntimeError(f"crash at {at}")

    with pytest.raises(RuntimeError, match=step):
        night(local_store, tiny.fingerprint, changes, crash_hook=crash)
    assert local_store.list("objects/layers/")  # the layer was written ...
    assert [v.version for v in list_versions(local_store)] == [1]  # ... and nothing is visible
    assert same_deltas(served(local_store), before)
    assert node.poll().changed is False and node.index.version == 1
    manifest = night(local_store, tiny.fingerprint, changes)  # a re-run completes
    assert manifest.version == 2 and node.poll().version == 2
    assert node.deltas_for(USERS[0])[0].equals(changes[USERS[0]])


# ---------------------------------------------------------------- forgetting and retention


@pytest.mark.parametrize("where", ["base", "layer"])
def test_forgetting_a_user_reaches_the_nodes_memory_and_disk_and_the_store(any_store, tiny, rng, tmp_path, where):
    target = "user-7f3a9c"
    deltas = {u: random_delta(tiny, rng) for u in USERS}
    if where == "base":
        deltas[target] = random_delta(tiny, rng)
    night(any_store, tiny.fingerprint, deltas)
    changes = {target: random_delta(tiny, rng), USERS[0]: random_delta(tiny, rng)}
    night(any_store, tiny.fingerprint, changes)
    held = [changes[target]] + ([deltas[target]] if where == "base" else [])
    rows = [row for d in held for row in value_rows(d)]
    cache = tmp_path / "cache"
    node = PullClient(any_store, tiny, cache_dir=cache)
    node.poll()
    assert node.deltas_for(target) and files_holding(cache, target, rows)
    assert store_objects_holding(any_store, target, rows)

    report = forget_user(any_store, target, actor="test", reason="erasure")
    assert report.found
    result = node.poll()
    assert result.error is None and result.version == report.current_version and node.deltas_for(target) == ()
    assert files_holding(cache, target, rows) == []  # the node's disk
    assert store_objects_holding(any_store, target, rows) == []  # every object in the store
    expected = {u: d for u, d in (deltas | changes).items() if u != target}
    assert same_deltas(served(any_store), expected)
    assert same_deltas({u: node.deltas_for(u)[0] for u in expected}, expected)
    for info in list_versions(any_store):  # no rollback brings them back
        rollback(any_store, info.version, reason="test", actor="test")
        assert target not in served(any_store)


@pytest.mark.parametrize("fault", ["damaged object", "other model"])
def test_a_forget_reaches_a_node_whose_next_version_cannot_be_loaded(any_store, tiny, rng, tmp_path, fault):
    """A node that cannot load the version a forget made (its rewritten base damaged, or the night
    before moved to another model the node does not run) keeps serving the version it has, as
    documented, but without the forgotten user: it served them until an operator repaired the
    store or restarted the node. Their shard's cached objects (which hold their rows) go too."""
    target = "user-7f3a9c"
    deltas = {u: random_delta(tiny, rng) for u in USERS} | {target: random_delta(tiny, rng)}
    night(any_store, tiny.fingerprint, deltas)
    cache = tmp_path / "cache"
    node = PullClient(any_store, tiny, cache_dir=cache)
    assert node.poll().error is None and node.deltas_for(target)
    rows = value_rows(deltas[target])
    assert files_holding(cache, target, rows)
    if fault == "other model":  # a night for another model; the node was not restarted with it
        night(any_store, "f" * 64, {USERS[0]: random_delta(tiny, rng)})
    assert forget_user(any_store, target, actor="test", reason="erasure").found
    manifest, _ = read_current(any_store)
    key = manifest.shard(shard_of(target, NUM_SHARDS)).bundle_key
    original = any_store.get(key)
    if fault == "damaged object":
        any_store.put(key, b"x" + original[1:])

    result = node.poll()
    assert result.error is not None and result.version == 1  # v1 still served...
    assert node.deltas_for(target) == ()  # ...without the forgotten user
    assert files_holding(cache, target, rows) == []
    others = {u: d for u, d in deltas.items() if u != target}
    assert same_deltas({u: node.deltas_for(u)[0] for u in others}, others)
    assert node.poll().error is not None and node.deltas_for(target) == ()  # and on every later failed poll

    if fault == "damaged object":  # repaired: the next poll serves the forget's version, rebuilt from its base
        any_store.put(key, original)
        repaired = node.poll()
        assert repaired.error is None and repaired.version == manifest.version and node.deltas_for(target) == ()
        assert same_deltas({u: node.deltas_for(u)[0] for u in others}, others)


@pytest.mark.parametrize("operation", ["forget", "rollback, night and gc", "night and gc"])
def test_a_pull_that_a_writer_overtakes_mid_way_serves_the_new_current_in_the_same_poll(any_store, tiny, rng, tmp_path,
                                                                                        operation):
    """A forget, or a gc after a night (or after a rollback and a night), that moves CURRENT and
    deletes objects the pull is about to read, while a node pulls: the poll failed with '...: missing (manifest shard N
    references it)', read as a damaged store, and the node waited a whole interval on the old
    version. It now pulls the new CURRENT at once; the version it serves is the one CURRENT names."""
    deltas = {u: random_delta(tiny, rng) for u in USERS}
    night(any_store, tiny.fingerprint, deltas)
    night(any_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    node = PullClient(any_store, tiny, cache_dir=tmp_path / "cache")
    get, moved = any_store.get, []

    def overtaking_get(key: str, **kwargs) -> bytes:  # the writer runs while the node reads its first object
        if key.startswith("objects/") and not moved:
            moved.append(key)
            if operation == "forget":
                forget_user(any_store, USERS[1], actor="test", reason="erasure")  # rewrites every shard holding it
            elif operation == "rollback, night and gc":
                rollback(any_store, 1, reason="test", actor="test")
                night(any_store, tiny.fingerprint, {USERS[2]: random_delta(tiny, rng)})  # v3 over v1
                collect(any_store, keep=1)  # v2 and its layer go
            else:  # every shard compacted into a new base, then the old chains collected
                night(any_store, tiny.fingerprint, {u: random_delta(tiny, rng) for u in USERS}, compact_after_layers=0)
                collect(any_store, keep=1)
        return get(key, **kwargs)

    any_store.get = overtaking_get
    try:
        result = node.poll()
    finally:
        del any_store.get
    current, _ = read_current(any_store)
    assert moved and result.error is None and result.version == current.version
    assert same_deltas({u: node.deltas_for(u)[0] for u in served(any_store)}, served(any_store))
    if operation == "forget":
        assert node.deltas_for(USERS[1]) == ()


def test_a_missing_current_on_a_published_store_keeps_the_node_serving_and_names_the_rollback(any_store, tiny, rng):
    """It said 'no CURRENT pointer (nothing published yet)' of a store with published versions."""
    night(any_store, tiny.fingerprint, {u: random_delta(tiny, rng) for u in USERS})
    node = PullClient(any_store, tiny)
    assert node.poll().error is None
    any_store.delete("CURRENT")
    result = node.poll()
    assert result.version == 1 and node.deltas_for(USERS[0])
    assert "nothing published yet" not in result.error and f"engram rollback --store {any_store.uri} --to 1" in result.error


def test_gc_collects_the_layers_no_kept_version_names(local_store, tiny, rng, first):
    for i in range(3):
        night(local_store, tiny.fingerprint, {USERS[i]: random_delta(tiny, rng)})
    compact(local_store)
    before = served(local_store)
    report = collect(local_store, keep=1)
    current, _ = read_current(local_store)
    assert report.kept_versions == [current.version]
    named = {k for e in current.shards for k, size in e.sized_objects().items() if size is not None}
    assert set(local_store.list("objects/")) == named and local_store.list("objects/layers/") == []
    assert same_deltas(served(local_store), before)


def test_the_cache_file_of_a_layer_is_reverified_on_load(local_store, tiny, rng, first, tmp_path):
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    manifest = night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    node.poll()
    layer = manifest.shard(shard_of(USERS[0], NUM_SHARDS)).layers[0]
    path = BundleCache(tmp_path / "cache").path(layer_shard := shard_of(USERS[0], NUM_SHARDS), layer.sha256)
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    restarted = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    result = restarted.poll()
    assert result.error is None and result.downloaded_objects == 1 and layer_shard in result.fetched_shards
    assert restarted.deltas_for(USERS[0])[0].equals(served(local_store)[USERS[0]])


# ---------------------------------------------------------------- the merged view, for all sequences

POOL = [f"p-{i}" for i in range(7)]
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("night"), st.dictionaries(st.sampled_from(POOL), st.booleans(), min_size=1, max_size=4)),
    st.tuples(st.just("compact"), st.sets(st.integers(0, NUM_SHARDS - 1), max_size=NUM_SHARDS)),
    st.tuples(st.just("rollback"), st.integers(0, 20)),
    st.tuples(st.just("forget"), st.sampled_from(POOL)),
), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS, seed=st.integers(0, 2**16), limit=st.integers(1, 3))
def test_every_users_served_delta_equals_the_fully_compacted_versions_after_any_sequence(tiny, operations, seed, limit):
    """Nights (each user's new delta, or its removal; a shard with ``limit`` layers gets a new base),
    compactions of some shards, rollbacks to any retained version and forgets, in any order: after
    each, a serving node that followed them all serves every user exactly (bit for bit) the delta
    that the current version's fully compacted form holds, which is the one the sequence implies."""
    from pipeline.shards import NightContext, compact_shard
    from versions.catalog import load_base_bundle
    from versions.store import open_store

    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as root:
        store = open_store(f"{root}/store")
        fingerprint = tiny.fingerprint
        deltas = {u: random_delta(tiny, rng, rows=2) for u in POOL[:4]}
        expected = {night(store, fingerprint, deltas, compact_after_layers=limit).version: deltas}
        node = PullClient(store, tiny, cache_dir=f"{root}/cache")

        def check() -> None:
            current, _ = read_current(store)
            want = expected[current.version]
            result = node.poll()
            assert result.error is None and result.version == current.version
            for user in POOL:
                got = node.deltas_for(user)
                assert got[0].equals(want[user]) if user in want else got == (), (user, current.version)
            ctx = NightContext(store_uri=store.uri, num_shards=NUM_SHARDS, recompile=False, fingerprint=fingerprint)
            compacted = {u: d for e in current.shards
                         for u, d in bundle_deltas(load_base_bundle(store, compact_shard(ctx, e.shard, e))).items()}
            assert same_deltas(compacted, want) and same_deltas(served(store), want)

        check()
        for kind, arg in operations:
            current, _ = read_current(store)
            if kind == "night":
                changes = {u: random_delta(tiny, rng, rows=2) if keep else None for u, keep in arg.items()}
                manifest = night(store, fingerprint, changes, compact_after_layers=limit)
                merged = expected[current.version] | changes
                expected[manifest.version] = {u: d for u, d in merged.items() if d is not None}
            elif kind == "compact":
                report = compact(store, sorted(arg) or None)
                expected[report.version] = expected[current.version]
            elif kind == "rollback":
                retained = [info.version for info in list_versions(store)]
                rollback(store, retained[arg % len(retained)], reason="property", actor="test")
            else:
                report = forget_user(store, arg, actor="test", reason="property")
                for old, new in report.rewritten.items():
                    expected[new] = {u: d for u, d in expected[old].items() if u != arg}
            check()


def test_the_compact_command_publishes_a_version_and_says_what_it_merged(local_store, tiny, rng, first):
    from jobs.cli import app

    night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    before = served(local_store)
    shard = shard_of(USERS[0], NUM_SHARDS)
    out = CliRunner().invoke(app, ["compact", "--store", str(local_store.root), "--shards", str(shard), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["published"] and report["compacted_shards"] == [shard] and report["layers_merged"] == 1
    assert read_current(local_store)[0].version == report["version"] == 3 and same_deltas(served(local_store), before)
    again = CliRunner().invoke(app, ["compact", "--store", str(local_store.root)])
    assert again.exit_code == 0 and "no chosen shard has layers" in again.output
    beyond = CliRunner().invoke(app, ["compact", "--store", str(local_store.root), "--shards", "5"])
    assert beyond.exit_code == 2 and "has shards 0-1" in beyond.output


def test_a_schema_2_manifest_written_before_layers_is_read_as_bases_and_layered_by_the_next_night(local_store, tiny,
                                                                                                   rng, first):
    manifest, _ = read_current(local_store)
    raw = json.loads(local_store.get(manifest.key))
    for shard in raw["shards"]:  # what the per-shard night wrote before layers existed
        for name in ("layers", "state_layers", "cobatch_groups", "compactions"):
            del shard[name]
    local_store.put(manifest.key, json.dumps(raw).encode())
    legacy = read_manifest(local_store, manifest.version)
    assert legacy.shards == tuple(replace(e, cobatch_groups=None) for e in manifest.shards)  # no layers; groups unknown
    changed = {USERS[0]: random_delta(tiny, rng)}
    after = night(local_store, tiny.fingerprint, changed)
    shard = shard_of(USERS[0], NUM_SHARDS)
    # the changed shard gets a new base (a layer could not number its groups apart), the other is carried
    assert after.shard(shard).bundle_key != manifest.shard(shard).bundle_key and not after.shard(shard).layers
    assert after.shard(shard).cobatch_groups is not None and after.shard(1 - shard) == legacy.shard(1 - shard)
    assert same_deltas(served(local_store), first | changed)
    night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    assert len(read_current(local_store)[0].shard(shard).layers) == 1  # and layers from then on


def test_compact_reports_as_compacted_only_the_shards_whose_delta_layers_got_a_new_base(tmp_path, tiny_dir,
                                                                                         local_store):
    """A shard with a fact-state layer and no delta layer (a night whose only event is the forget
    of an unknown user) gets its state merged but no new delta base: the shards view says it was
    not compacted, and so do `engram compact`'s report and line (it said "compacted shards [2]")."""
    from datetime import timedelta

    from jobs.cli import app
    from jobs.nightly import run_nightly
    from jobs.spec import NightlySpec
    from jobs.synthetic import BASE_TIME, fact_log_rows, write_fact_log
    from pipeline.stats import query_stats

    write_fact_log(fact_log_rows(3, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=4,
                       workers=0)
    run_nightly(spec)
    write_fact_log([{"user_id": "ghost", "fact_id": None, "op": "forget_user", "trigger": None, "answer": None,
                     "event_time": BASE_TIME + timedelta(days=1), "scope": None}],
                   tmp_path / "log" / "day=2" / "part-0.parquet")
    run_nightly(spec)
    before, _ = read_current(local_store)
    state_only = [e.shard for e in before.shards if e.state_layers and not e.layers]
    assert state_only == [shard_of("ghost", 4)] and not any(e.layers for e in before.shards)
    out = CliRunner().invoke(app, ["compact", "--store", str(local_store.root)])
    assert out.exit_code == 0, out.output
    after, _ = read_current(local_store)
    assert after.version == before.version + 1 and not any(e.state_layers for e in after.shards)
    shards = query_stats(local_store, f"select shard from shards where version = {after.version} and compacted")
    assert shards.num_rows == 0
    assert "compacted shards" not in out.output and f"fact-state layers of shards {state_only}" in out.output, out.output
    report = compact(local_store)  # nothing left to merge
    assert not report.published and report.compacted_shards == [] and report.state_only_shards == []


def test_compact_reports_a_shard_with_delta_and_state_layers_as_compacted(tmp_path, tiny_dir, local_store):
    from jobs.nightly import run_nightly
    from jobs.spec import NightlySpec
    from jobs.synthetic import fact_log_rows, write_fact_log
    from pipeline.stats import query_stats

    write_fact_log(fact_log_rows(3, 1), tmp_path / "log" / "day=1" / "part-0.parquet")
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir), num_shards=4,
                       workers=0, compact_layer_share=1000.0)
    run_nightly(spec)
    write_fact_log(fact_log_rows(1, 1, day=1, seed=5), tmp_path / "log" / "day=2" / "part-0.parquet")
    run_nightly(spec)
    before, _ = read_current(local_store)
    layered = [e.shard for e in before.shards if e.layers]
    assert layered == [shard_of("user-00000", 4)]
    report = compact(local_store)
    assert report.compacted_shards == layered and report.state_only_shards == [] and report.layers_merged == 1
    compacted = query_stats(local_store, f"select shard from shards where version = {report.version} and compacted")
    assert compacted.column("shard").to_pylist() == layered


def test_compact_takes_shards_from_a_generator_and_numpy_ints(local_store, tiny, rng, first, tmp_path):
    """``compact`` checked its shard list twice: a generator was consumed by the first check and the
    second saw an empty list ("an empty list names no shard"). And numpy integers (shards picked
    from an array) were refused as "not a shard number"; a bool still is (True is not shard 1)."""
    from versions.layout import check_shard_list

    night(local_store, tiny.fingerprint, {USERS[0]: random_delta(tiny, rng)})
    report = compact(local_store, (s for s in np.arange(NUM_SHARDS)))
    assert report.published and report.compacted_shards == [shard_of(USERS[0], NUM_SHARDS)]
    assert check_shard_list(np.array([3, 1, 1], dtype=np.int64)) == (1, 3)
    assert all(type(s) is int for s in check_shard_list([np.uint8(2), np.int32(0)]))
    for bad in (True, np.bool_(False), 1.0, "1", -1, np.int64(-2)):
        with pytest.raises(ValueError, match=r"is not a shard number \(an integer >= 0\)"):
            check_shard_list([0, bad], "compact shards")
    node = PullClient(local_store, tiny, shards=np.array([0]), cache_dir=tmp_path / "cache")
    assert node.shards == (0,)
