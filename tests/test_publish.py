"""Publishing versions: bundles, manifests, the CURRENT compare-and-swap, rollback and audit."""

from __future__ import annotations

import io
import json
import threading
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pyarrow as pa
import pytest

from engram_core.delta import Delta
from pipeline.stats import write_stats_part
from schemas.bundle import BundleSchemaError, bundle_deltas, bundle_table, decode_bundle, encode_bundle
from schemas.manifest import Manifest, ManifestError
from versions.catalog import list_versions, load_shard_bundle, read_audit, read_current, read_manifest
from versions.errors import IntegrityError, PublishConflict, PublishError, UnknownVersion
from versions.layout import shard_of
from versions.publish import PUBLISH_STEPS, ShardPayload, publish_version
from versions.rollback import rollback

NUM_SHARDS = 4
WIDTH = 8


def random_delta(rng: np.random.Generator, rows: int = 5) -> Delta:
    layers = rng.integers(0, 2, rows).astype(np.int16)
    row_ids = rng.choice(10_000, rows, replace=False).astype(np.int64)
    values = rng.standard_normal((rows, WIDTH)).astype(np.float16)
    return Delta.from_unsorted(layers, row_ids, values)


def users_deltas(seed: int, users: list[str]) -> dict[str, tuple[Delta, int]]:
    rng = np.random.default_rng(seed)
    return {u: (random_delta(rng, rows=int(rng.integers(1, 6))), int(rng.integers(1, 4))) for u in users}


def payloads(seed: int, users: list[str], shards: range | list[int] = range(NUM_SHARDS)) -> dict[int, ShardPayload]:
    """One payload per shard in ``shards`` for the given users (seeded: same seed, same bytes)."""
    deltas = users_deltas(seed, users)
    out = {}
    for shard in shards:
        mine = {u: d for u, d in deltas.items() if shard_of(u, NUM_SHARDS) == shard}
        out[shard] = ShardPayload(encode_bundle(bundle_table(mine)), f"state {seed} {sorted(mine)}".encode())
    return out


USERS = [f"user-{i}" for i in range(12)]


def publish(store, shard_payloads, previous, *, watermark="2026-01-01", fingerprint="base-fp", **kwargs):
    facts = pa.table({"user_id": ["a"], "fact_id": ["f"], "status": ["ok"], "loss": [0.1], "steps": [1], "rows": [2]})
    return publish_version(store, shard_payloads=shard_payloads, previous=previous, fingerprint=fingerprint,
                           num_shards=NUM_SHARDS, job_id="job-test", watermark=watermark,
                           stats={"facts": [write_stats_part(store, "facts", facts)]}, counts={"users": len(USERS)},
                           **kwargs)


@pytest.fixture
def v1(any_store) -> Manifest:
    return publish(any_store, payloads(1, USERS), None)


# ---------------------------------------------------------------- bundle and manifest schemas


def test_bundle_round_trips_every_delta_bit_exactly():
    deltas = users_deltas(0, ["b", "a", "c"])
    table = decode_bundle(encode_bundle(bundle_table(deltas)))
    assert table.column("user_id").to_pylist() == ["a", "b", "c"]
    decoded = bundle_deltas(table)
    assert all(decoded[u].equals(d) for u, (d, _) in deltas.items())
    assert table.column("num_facts").to_pylist() == [deltas[u][1] for u in ["a", "b", "c"]]


def test_bundle_bytes_are_deterministic():
    assert encode_bundle(bundle_table(users_deltas(3, USERS))) == encode_bundle(bundle_table(users_deltas(3, USERS)))


def test_empty_bundle_round_trips():
    assert decode_bundle(encode_bundle(bundle_table({}))).num_rows == 0


def test_bundle_with_another_schema_version_is_refused():
    table = bundle_table(users_deltas(0, ["a"]))
    table = table.replace_schema_metadata({b"engram.bundle_schema_version": b"99"})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    with pytest.raises(BundleSchemaError, match="version 99 is not supported"):
        decode_bundle(sink.getvalue(), source="objects/bundles/x.parquet")


def test_manifest_json_round_trip_is_exact(v1):
    assert Manifest.from_json(v1.to_json()) == v1
    assert Manifest.from_json(v1.to_json()).to_json() == v1.to_json()


@pytest.mark.parametrize("field, bad, message", [
    ("num_shards", 0, "field 'num_shards' must be a positive int"),
    ("version", "2", "field 'version' must be a positive int"),
    ("created_at", "yesterday", "field 'created_at' must be an ISO 8601 UTC timestamp"),
    ("schema_version", 7, "field 'schema_version' is 7"),
    ("fingerprint", "", "field 'fingerprint' must be a non-empty string"),
])
def test_manifest_validation_names_the_bad_field(v1, field, bad, message):
    raw = json.loads(v1.to_json())
    raw[field] = bad
    with pytest.raises(ManifestError, match=rf"manifest manifests/v00000001.json: {message}"):
        Manifest.from_json(json.dumps(raw), source="manifests/v00000001.json")


def test_manifest_shard_entry_with_a_bad_sha_is_refused(v1):
    raw = json.loads(v1.to_json())
    raw["shards"][2]["bundle_sha256"] = "nothex"
    with pytest.raises(ManifestError, match=r"shards\[2\]: field 'bundle_sha256'"):
        Manifest.from_json(json.dumps(raw))


def test_shard_of_is_xxh64_mod_num_shards():
    import xxhash

    assert shard_of("alice", 16) == xxhash.xxh64_intdigest(b"alice") % 16
    assert {shard_of(u, NUM_SHARDS) for u in USERS} == set(range(NUM_SHARDS))


# ---------------------------------------------------------------- publish


def test_first_publish_makes_version_1_current_and_readable(any_store, v1):
    manifest, _ = read_current(any_store)
    assert manifest == v1 and manifest.version == 1 and manifest.parent is None
    assert manifest.users == len(USERS)
    loaded = {}
    for entry in manifest.shards:
        loaded |= bundle_deltas(load_shard_bundle(any_store, entry))
    expected = users_deltas(1, USERS)
    assert sorted(loaded) == sorted(USERS)
    assert all(loaded[u].equals(expected[u][0]) for u in USERS)


def test_second_version_shares_the_objects_of_unchanged_shards(any_store, v1):
    changed = shard_of("user-0", NUM_SHARDS)
    v2 = publish(any_store, {changed: payloads(2, USERS, [changed])[changed]}, v1, watermark="2026-01-02")
    assert (v2.version, v2.parent) == (2, 1)
    for old, new in zip(v1.shards, v2.shards):
        assert (old.bundle_key == new.bundle_key) == (old.shard != changed)
    assert len(any_store.list("objects/bundles/")) == NUM_SHARDS + 1
    assert read_current(any_store)[0] == v2


def test_identical_republish_is_a_no_op(any_store, v1):
    keys_before = any_store.list()
    again = publish(any_store, payloads(1, USERS), v1)
    assert again is v1
    assert any_store.list() == keys_before


def test_publish_against_a_stale_previous_is_a_conflict(any_store, v1):
    publish(any_store, payloads(2, USERS, [0]), v1, watermark="w2")
    with pytest.raises(PublishConflict, match="planned against v1"):
        publish(any_store, payloads(3, USERS, [1]), v1, watermark="w3")


@pytest.mark.parametrize("step", PUBLISH_STEPS)
def test_a_crash_at_any_step_leaves_a_readable_version_and_a_rerun_succeeds(any_store, v1, step):
    def crash(at: str) -> None:
        if at == step:
            raise RuntimeError(f"injected crash before {at}")

    new_payloads = payloads(2, USERS, [0, 1])
    with pytest.raises(RuntimeError, match="injected crash"):
        publish(any_store, new_payloads, v1, watermark="w2", crash_hook=crash)

    current, _ = read_current(any_store)
    swapped = PUBLISH_STEPS.index(step) > PUBLISH_STEPS.index("swap_current")
    assert current.version == (2 if swapped else 1)
    for entry in current.shards:
        load_shard_bundle(any_store, entry)

    # The re-run plans against whatever is current, as the nightly job does.
    rerun = publish(any_store, new_payloads, current, watermark="w2")
    assert rerun.version == 2 and read_current(any_store)[0] == rerun
    assert [v.version for v in list_versions(any_store)] == [1, 2]


def test_an_orphan_manifest_with_other_content_is_skipped_not_adopted(any_store, v1):
    def crash(at: str) -> None:
        if at == "swap_current":
            raise RuntimeError("injected")

    with pytest.raises(RuntimeError):
        publish(any_store, payloads(2, USERS, [0]), v1, watermark="w2", crash_hook=crash)
    v3 = publish(any_store, payloads(3, USERS, [0]), v1, watermark="w3")
    assert (v3.version, v3.parent, v3.watermark) == (3, 1, "w3")
    assert [v.version for v in list_versions(any_store)] == [1, 3]  # the orphan v2 is never offered


def test_two_concurrent_publishers_exactly_one_wins(any_store, v1):
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def run(seed: int) -> None:
        def sync(step: str) -> None:
            if step == "write_manifest":
                barrier.wait(timeout=30)
        try:
            results[seed] = publish(any_store, payloads(seed, USERS, [0, 2]), v1, watermark=f"w{seed}",
                                    crash_hook=sync)
        except PublishConflict as conflict:
            results[seed] = conflict

    threads = [threading.Thread(target=run, args=(seed,)) for seed in (10, 11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results.values() if isinstance(r, Manifest)]
    losers = [r for r in results.values() if isinstance(r, PublishConflict)]
    assert len(winners) == 1 and len(losers) == 1
    current, _ = read_current(any_store)
    assert current == winners[0]
    assert [v.version for v in list_versions(any_store)] == [1, current.version]
    assert [r["event"] for r in read_audit(any_store)] == ["publish", "publish"]


def test_corrupted_bundle_bytes_raise_integrity_error_naming_the_key(any_store, v1):
    entry = v1.shards[1]
    data = bytearray(any_store.get(entry.bundle_key))
    data[len(data) // 2] ^= 0xFF
    any_store.put(entry.bundle_key, bytes(data))
    with pytest.raises(IntegrityError, match=entry.bundle_key):
        load_shard_bundle(any_store, entry)


def test_truncated_bundle_raises_integrity_error(any_store, v1):
    entry = v1.shards[0]
    any_store.put(entry.bundle_key, any_store.get(entry.bundle_key)[:-10])
    with pytest.raises(IntegrityError, match="bytes, manifest says"):
        load_shard_bundle(any_store, entry)


def test_publish_refuses_to_overwrite_a_damaged_content_addressed_object(any_store, v1):
    entry = v1.shards[0]
    any_store.put(entry.bundle_key, b"damaged")
    fresh = payloads(1, USERS)
    with pytest.raises(IntegrityError, match=entry.bundle_key):
        publish(any_store, fresh, v1, watermark="w2")
    assert read_current(any_store)[0] == v1


# ---------------------------------------------------------------- versions, rollback, audit


def test_rollback_to_1_and_forward_to_2_with_audit_records(any_store, v1):
    v2 = publish(any_store, payloads(2, USERS, [3]), v1, watermark="w2")
    back = rollback(any_store, 1, reason="bad recall on v2", actor="alice")
    assert back == v1 and read_current(any_store)[0] == v1
    forward = rollback(any_store, 2, reason="v2 was fine", actor="bob")
    assert forward == v2 and read_current(any_store)[0] == v2
    events = [(r["event"], r.get("from_version"), r.get("to_version"), r.get("actor"), r.get("reason"))
              for r in read_audit(any_store)]
    assert events == [
        ("publish", None, None, "job-test", None),
        ("publish", None, None, "job-test", None),
        ("rollback", 2, 1, "alice", "bad recall on v2"),
        ("rollback", 1, 2, "bob", "v2 was fine"),
    ]
    assert all(r["at"].endswith("Z") for r in read_audit(any_store))


def test_rollback_to_a_missing_version_names_it_and_lists_the_available_ones(any_store, v1):
    with pytest.raises(UnknownVersion, match=r"version 7 .*available: \[1\]"):
        rollback(any_store, 7, reason="oops", actor="alice")


def test_rollback_to_a_collected_version_errors_clearly(any_store, v1):
    publish(any_store, payloads(2, USERS), v1, watermark="w2")
    any_store.delete(v1.shards[0].bundle_key)
    with pytest.raises(UnknownVersion, match="version 1 was collected"):
        rollback(any_store, 1, reason="r", actor="a")
    assert read_current(any_store)[0].version == 2


def test_publishing_after_a_rollback_takes_the_next_free_version(any_store, v1):
    publish(any_store, payloads(2, USERS, [0]), v1, watermark="w2")
    back = rollback(any_store, 1, reason="r", actor="a")
    v3 = publish(any_store, payloads(3, USERS, [0]), back, watermark="w3")
    assert (v3.version, v3.parent) == (3, 1)
    assert [(v.version, v.current) for v in list_versions(any_store)] == [(1, False), (2, False), (3, True)]


def test_rollback_never_restores_a_forgotten_user(any_store, v1):
    remaining = [u for u in USERS if u != "user-3"]
    shard = shard_of("user-3", NUM_SHARDS)
    v2 = publish(any_store, payloads(1, remaining, [shard]), v1, watermark="w2", forgotten_users=["user-3"])
    assert len(v2.forgotten) == 1 and "user-3" not in v2.to_json()
    with pytest.raises(PublishError, match="predates the forget"):
        rollback(any_store, 1, reason="r", actor="a")
    assert read_current(any_store)[0] == v2


def test_list_versions_reports_sizes_and_the_current_flag(any_store, v1):
    [info] = list_versions(any_store)
    assert (info.version, info.current, info.parent, info.users) == (1, True, None, len(USERS))
    assert info.facts == sum(f for _, f in users_deltas(1, USERS).values())
    assert info.bytes == sum(s.bundle_bytes + s.state_bytes for s in v1.shards)
    assert info.created_at == v1.created_at


def test_read_manifest_of_an_unknown_version_is_clear(any_store, v1):
    with pytest.raises(UnknownVersion, match=r"version 5 does not exist"):
        read_manifest(any_store, 5)


def test_manifests_and_objects_are_never_rewritten(any_store, v1):
    v2 = publish(any_store, payloads(2, USERS, [1]), v1, watermark="w2")
    assert read_manifest(any_store, 1) == v1
    assert any_store.get(v1.key) == v1.to_json().encode()
    assert replace(v2, version=1) != v1


@pytest.mark.parametrize("damage", [b'{"version": 2, "manifest_key": "manifests/v000', b'{"version": 7, "manifest_key": '
                                    b'"manifests/v00000002.json"}'])
def test_rollback_is_the_remedy_for_a_damaged_current(any_store, v1, damage):
    """A CURRENT that is not a valid pointer is refused by every reader, with one line; rollback
    moves it to a published version anyway (compare-and-swap on the damaged object's etag)."""
    from typer.testing import CliRunner

    from jobs.cli import app

    publish(any_store, payloads(2, USERS, [3]), v1, watermark="w2")
    any_store.put("CURRENT", damage)
    with pytest.raises(PublishError, match="CURRENT"):
        read_current(any_store)
    versions = CliRunner().invoke(app, ["versions", "--store", any_store.uri])
    assert versions.exit_code == 1 and "CURRENT" in versions.stderr and "Traceback" not in versions.output
    result = CliRunner().invoke(app, ["rollback", "--store", any_store.uri, "--to", "2", "--reason", "repair"])
    assert result.exit_code == 0, result.output
    assert read_current(any_store)[0].version == 2
    assert read_audit(any_store)[-1]["event"] == "rollback" and read_audit(any_store)[-1]["from_version"] is None
