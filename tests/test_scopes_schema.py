"""Shared scopes: the stored forms (bundle ``scope`` column, manifest ``scopes``, the scope state)
and the night's scope merge, without compiling (the whole nights are in test_scopes_night.py)."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from engram_core.delta import Delta
from pipeline.scopes import (
    SCOPE_STATE_SCHEMA,
    member_rows,
    merge_scopes,
    merged_scope_facts,
    scope_of_detail,
    shard_contribution,
)
from schemas import facts as F
from schemas.bundle import (
    BUNDLE_SCHEMA,
    bundle_scopes,
    bundle_table,
    decode_bundle,
    decode_layer,
    encode_bundle,
    layer_table,
)
from schemas.manifest import Manifest, ManifestError, ScopesEntry, scope_state_key, scopes_key

T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def _delta(rows, width=4) -> Delta:
    return Delta.from_unsorted(np.zeros(len(rows), np.int16), np.asarray(rows, np.int64), np.ones((len(rows), width)))


def _state(rows) -> pa.Table:
    """Fact-state rows from (user, fact_id, scope, trigger, answer, day)."""
    table = pa.table({
        "user_id": [r[0] for r in rows], "fact_id": [r[1] for r in rows], "scope": [r[2] for r in rows],
        "trigger": [r[3] for r in rows], "answer": [r[4] for r in rows],
        "event_time": pa.array([T0.replace(day=r[5]) for r in rows], pa.timestamp("us", tz="UTC")),
        "fact_hash": [F.fact_hash(r[2], r[3], r[4]) for r in rows],
    })
    return F.conform(table, F.FACT_STATE_SCHEMA, "test state")


# ---------------------------------------------------------------- bundles and layers


def test_a_members_bundle_row_names_its_scope_and_a_version_2_bundle_reads_with_no_scope():
    table = bundle_table({"alice": (_delta([1, 2]), 2), "erin": (_delta([3]), 1)}, scopes={"alice": "org:acme"})
    assert bundle_scopes(decode_bundle(encode_bundle(table))) == {"alice": "org:acme"}

    old = table.drop_columns(["scope"]).replace_schema_metadata({b"engram.bundle_schema_version": b"2"})
    sink = io.BytesIO()
    pq.write_table(old, sink)
    read = decode_bundle(sink.getvalue(), source="old bundle")
    assert read.schema.names == BUNDLE_SCHEMA.names and read.column("scope").null_count == 2
    assert bundle_scopes(read) == {}


def test_a_version_1_layer_reads_with_no_scope_and_keeps_its_parent_and_model():
    layer = layer_table(bundle_table({"alice": (_delta([1]), 1)}, scopes={"alice": "org:acme"}), ["bob"])
    from schemas.bundle import encode_layer, layer_fingerprint, layer_parent

    assert bundle_scopes(layer.filter(pa.array([True, False]))) == {"alice": "org:acme"}
    old = layer.drop_columns(["scope"]).replace_schema_metadata({
        b"engram.layer_schema_version": b"1", b"engram.fingerprint": b"f" * 8, b"engram.parent_sha256": b"a" * 64})
    sink = io.BytesIO()
    pq.write_table(old, sink)
    read = decode_layer(sink.getvalue(), source="old layer", fingerprint="f" * 8, parent_sha256="a" * 64)
    assert read.column("scope").null_count == 2 and layer_fingerprint(read) == "f" * 8 and layer_parent(read) == "a" * 64
    assert decode_layer(encode_layer(layer, "f" * 8, "a" * 64)).column("scope").to_pylist() == ["org:acme", None]


# ---------------------------------------------------------------- manifest


def _manifest(scopes=None) -> Manifest:
    from schemas.manifest import MANIFEST_SCHEMA_VERSION, ShardEntry

    sha = "0" * 64
    shard = ShardEntry(shard=0, bundle_key=f"objects/bundles/{sha}.parquet", bundle_sha256=sha, bundle_bytes=1,
                       state_key=f"objects/state/{sha}.parquet", state_sha256=sha, state_bytes=1, users=0, facts=0,
                       rows=0)
    return Manifest(schema_version=MANIFEST_SCHEMA_VERSION, version=1, parent=None, created_at="2026-11-30T00:00:00Z",
                    job_id="j", watermark=None, fingerprint="f", num_shards=1, shards=(shard,), scopes=scopes)


def test_the_manifest_carries_the_scopes_entry_and_a_manifest_without_scopes_is_unchanged():
    plain = _manifest()
    assert "scopes" not in plain.to_dict()  # stores without scopes write what they wrote before
    assert Manifest.from_json(plain.to_json()) == plain
    a, b = "a" * 64, "b" * 64
    entry = ScopesEntry(key=scopes_key(a), sha256=a, bytes=10, state_key=scope_state_key(b), state_sha256=b,
                        state_bytes=5, scopes=1, facts=2, rows=7, members=3, stats={"facts": f"stats/facts/{a}.parquet"})
    scoped = _manifest(entry)
    assert Manifest.from_json(scoped.to_json()) == scoped
    assert {entry.key, entry.state_key, entry.stats["facts"]} <= scoped.object_keys()  # gc keeps them
    assert scoped.stats_parts("facts") == [entry.stats["facts"]]
    broken = scoped.to_dict()
    broken["scopes"]["key"] = scopes_key(b)
    with pytest.raises(ManifestError, match="scopes: field 'key'"):
        Manifest.from_dict(broken)


def test_a_scopes_entry_names_its_stale_scopes_only_when_a_forget_left_some():
    """``stale`` (scopes a forget dropped, to be compiled by the next night) is written only when
    not empty, so a manifest without it reads as before (and older readers read it); a malformed
    one is refused naming the field."""
    a, b = "a" * 64, "b" * 64
    entry = ScopesEntry(key=scopes_key(a), sha256=a, bytes=10, state_key=scope_state_key(b), state_sha256=b,
                        state_bytes=5, scopes=1, facts=2, rows=7, members=3)
    assert "stale" not in _manifest(entry).to_dict()["scopes"]
    stale = _manifest(ScopesEntry(**{**entry.__dict__, "stale": ("org:acme", "org:b")}))
    assert stale.to_dict()["scopes"]["stale"] == ["org:acme", "org:b"]
    assert Manifest.from_json(stale.to_json()) == stale
    broken = stale.to_dict()
    broken["scopes"]["stale"] = ["org:b", "org:acme"]
    with pytest.raises(ManifestError, match="scopes: field 'stale'"):
        Manifest.from_dict(broken)


# ---------------------------------------------------------------- the scope state and the merge


STATE = [
    ("alice", "dog", "alice", "My dog's name is", " Rex", 1),
    ("alice", "wifi", "org:acme", "The wifi password is", " Pepper", 1),
    ("alice", "gym", "org:zeta", "Our gym is", " Vita", 1),  # a second scope: served from alice's own delta
    ("bob", "wifi", "org:acme", "The wifi password is", " Mango", 2),  # a later copy wins
    ("bob", "office", "org:acme", "Our office is in", " Lisbon", 1),
    ("erin", "city", "erin", "I live in", " Osaka", 1),
]


def test_member_rows_are_the_copies_of_each_users_first_scope():
    rows = member_rows(_state(STATE))
    assert list(zip(rows.column("user_id").to_pylist(), rows.column("fact_id").to_pylist())) == [
        ("alice", "wifi"), ("bob", "office"), ("bob", "wifi")]


def test_a_shards_contribution_holds_the_latest_copy_per_fact_and_its_member_count():
    """A scope held only as an extra scope (alice's org:zeta) is in the contribution with 0 members:
    its facts are merged over every user carrying it, so all of them serve its latest copy."""
    part = shard_contribution(_state(STATE), 3)
    assert part.schema.equals(SCOPE_STATE_SCHEMA, check_metadata=False)
    assert [(r["scope"], r["fact_id"], r["answer"], r["members"], r["shard"]) for r in part.to_pylist()] == [
        ("org:acme", "office", " Lisbon", 2, 3), ("org:acme", "wifi", " Mango", 2, 3), ("org:zeta", "gym", " Vita", 0, 3)]


def test_the_merge_compiles_only_scopes_whose_merged_facts_changed_and_drops_empty_ones(local_store):
    one = shard_contribution(_state(STATE), 0)
    other = shard_contribution(_state([("carol", "wifi", "org:acme", "The wifi password is", " Pepper", 1),
                                       ("dan", "hours", "org:beta", "We open at", " nine", 1)]), 1)
    plan, merge = merge_scopes(local_store.uri, None, True, False, [0, 1], one, other)
    assert plan.changed == ("org:acme", "org:beta") and list(plan.compile_facts) == [2, 1]
    assert plan.member_shards == (0, 1) and (plan.scopes, plan.members) == (2, 4) and plan.dropped == ()
    assert merge.compile.column("user_id").to_pylist() == ["org:acme", "org:acme", "org:beta"]
    facts = merged_scope_facts(merge.state)
    assert facts.filter(pa.compute.equal(facts.column("fact_id"), "wifi")).column("answer").to_pylist() == [" Mango"]

    # A prior version holding this state: shard 1 loses dan (org:beta dropped), carol's copy is
    # older than bob's, so org:acme's merged facts do not change.
    from pipeline.scopes import encode_scope_state
    from versions.commit import write_verified_objects

    data = encode_scope_state(merge.state)
    import hashlib

    sha = hashlib.sha256(data).hexdigest()
    write_verified_objects(local_store, {scope_state_key(sha): data})
    prior = ScopesEntry(key=scopes_key("c" * 64), sha256="c" * 64, bytes=1, state_key=scope_state_key(sha),
                        state_sha256=sha, state_bytes=len(data), scopes=2, facts=3, rows=0, members=4)
    carol_only = shard_contribution(_state([("carol", "wifi", "org:acme", "The wifi password is", " Pepper", 1)]), 1)
    plan, merge = merge_scopes(local_store.uri, prior, False, False, [1], carol_only)
    assert plan.changed == () and plan.dropped == ("org:beta",) and plan.scopes == 1 and plan.members == 3
    assert merge.removed.to_pylist() == ["org:beta"]
    # The same night with everything recompiled (a model change) compiles every scope.
    assert merge_scopes(local_store.uri, prior, False, True, [1], carol_only)[0].changed == ("org:acme",)
    # A forget left org:acme stale (its delta dropped): it compiles, and its facts count as changed.
    plan = merge_scopes(local_store.uri, replace(prior, stale=("org:acme",)), False, False, [1], carol_only)[0]
    assert plan.changed == ("org:acme",) and plan.refreshed == ("org:acme",) and plan.member_shards == (0, 1)


def test_a_forget_computes_the_scope_state_again_without_a_users_copies_and_names_what_changed():
    """bob's copy of org:acme's wifi is the latest and he alone carries its parking: without him
    his shard's rows come from carol's copy, org:acme's merged facts change (stale); org:beta
    loses its only member (dropped) and, with no copy left, its facts."""
    from pipeline.scopes import forget_scope_copies

    rows = [("bob", "wifi", "org:acme", "The wifi password is", " Zanzibar", 3),
            ("bob", "parking", "org:acme", "The gate code is", " Quokka", 1),
            ("carol", "wifi", "org:acme", "The wifi password is", " Pepper", 1),
            ("dan", "hours", "org:beta", "We open at", " nine", 1)]
    prior = pa.concat_tables([shard_contribution(_state(rows[:3]), 0), shard_contribution(_state(rows[3:]), 1)])
    forget = forget_scope_copies(prior, {0: _state(rows[2:3]), 1: _state([])})
    assert forget.stale == ("org:acme", "org:beta") and forget.dropped == ("org:beta",)
    assert (forget.scopes, forget.members) == (1, 1)
    assert forget.state.select(["scope", "shard", "fact_id", "answer", "members"]).to_pylist() == [
        {"scope": "org:acme", "shard": 0, "fact_id": "wifi", "answer": " Pepper", "members": 1}]
    # carol's copy the same as bob's: the merged facts do not change, nothing is stale.
    same = forget_scope_copies(shard_contribution(_state([rows[2], ("bob",) + rows[2][1:]]), 0), {0: _state(rows[2:3])})
    assert same.stale == () and same.dropped == () and same.members == 1


def test_the_facts_stats_scope_comes_from_a_copys_result_detail():
    details = pa.array(["compiled once in scope org:acme", "compiled once in scope org:x y; scope fact 'a' failed",
                        None, "something else"])
    assert scope_of_detail(details).to_pylist() == ["org:acme", "org:x y", None, None]  # results before 2026-12-01


@pytest.mark.parametrize("scope", ["org:acme", "acme; inc", 'say "hi"; now', "a\\b", "東京; 支店", "acme"])
def test_a_scope_id_holding_the_detail_separator_or_quotes_reads_back_whole(scope):
    """A copy's detail names its scope as a JSON string: "acme; inc" is not read as "acme" (which
    could be a user's own id, and forget would then keep that user's copy rows)."""
    from pipeline.scopes import scope_detail

    details = pa.chunked_array([[scope_detail(scope), scope_detail(scope, "scope fact 'a' failed; retried")], [None]])
    assert scope_of_detail(details).to_pylist() == [scope, scope, None]


def test_a_night_that_compiles_no_scope_carries_the_scope_deltas_by_reference(local_store):
    import hashlib

    from pipeline.scopes import encode_scope_state, write_scopes
    from versions.commit import write_verified_objects

    one = shard_contribution(_state(STATE), 0)
    data = encode_scope_state(one)
    sha = hashlib.sha256(data).hexdigest()
    write_verified_objects(local_store, {scope_state_key(sha): data})
    prior = ScopesEntry(key=scopes_key("c" * 64), sha256="c" * 64, bytes=1, state_key=scope_state_key(sha),
                        state_sha256=sha, state_bytes=len(data), scopes=1, facts=2, rows=5, members=2,
                        stats={"facts": "stats/facts/" + "d" * 64 + ".parquet"})
    plan, merge = merge_scopes(local_store.uri, prior, False, False, [0], one)
    assert plan.changed == () and write_scopes(local_store.uri, prior, plan, merge) == prior  # nothing read or written
    joined = shard_contribution(_state(STATE + [("carol", "wifi", "org:acme", "The wifi password is", " Pepper", 1)]), 0)
    plan, merge = merge_scopes(local_store.uri, prior, False, False, [0], joined)
    entry = write_scopes(local_store.uri, prior, plan, merge)
    assert plan.changed == () and (entry.key, entry.stats) == (prior.key, prior.stats) and entry.members == 3
    assert entry.state_sha256 != prior.state_sha256 and local_store.head(entry.state_key) is not None


def _prior_entry(store, state: pa.Table) -> ScopesEntry:
    import hashlib

    from pipeline.scopes import encode_scope_state
    from versions.commit import write_verified_objects

    data = encode_scope_state(state)
    sha = hashlib.sha256(data).hexdigest()
    write_verified_objects(store, {scope_state_key(sha): data})
    return ScopesEntry(key=scopes_key("c" * 64), sha256="c" * 64, bytes=1, state_key=scope_state_key(sha),
                       state_sha256=sha, state_bytes=len(data), scopes=1, facts=1, rows=0, members=3)


def test_a_scope_held_only_as_an_extra_scope_refreshes_its_holders_shards_and_compiles_once_it_has_members(
        local_store):
    """org:c is alice's and dave's second scope (both are org:a members) and nobody's first: a change
    through dave's copy compiles no scope but outdates both holders' shards (0 and 1), not carol's
    (2); bob taking org:c as his first scope compiles it (though its facts did not change); when he
    leaves it again it is dropped from the scope deltas, its facts still merged for its holders."""
    from pipeline.scopes import users_to_rescope

    shards = {0: [("alice", "gym", "org:a", "Our gym opens at", " six", 1),
                  ("alice", "wifi", "org:c", "The wifi password is", " Pepper", 1)],
              1: [("dave", "gym", "org:a", "Our gym opens at", " six", 1),
                  ("dave", "wifi", "org:c", "The wifi password is", " Pepper", 1)],
              2: [("carol", "gym", "org:a", "Our gym opens at", " six", 1)]}
    parts = {s: shard_contribution(_state(rows), s) for s, rows in shards.items()}
    plan, merge = merge_scopes(local_store.uri, None, True, False, [0, 1, 2], *parts.values())
    assert plan.changed == ("org:a",) and plan.scopes == 1 and plan.members == 3 and plan.refreshed == ("org:a", "org:c")
    prior = _prior_entry(local_store, merge.state)

    dave = _state(shards[1][:1] + [("dave", "wifi", "org:c", "The wifi password is", " Mango", 2)])
    plan, merge = merge_scopes(local_store.uri, prior, False, False, [1], shard_contribution(dave, 1))
    assert plan.changed == () and plan.refreshed == ("org:c",) and plan.member_shards == (0, 1)
    facts = merged_scope_facts(merge.state)
    assert facts.filter(pa.compute.equal(facts.column("scope"), "org:c")).column("answer").to_pylist() == [" Mango"]
    assert users_to_rescope(_state(shards[0]), plan.changed, plan.refreshed).to_pylist() == ["alice"]
    assert users_to_rescope(dave, plan.changed, plan.refreshed).to_pylist() == ["dave"]
    assert users_to_rescope(_state(shards[2]), plan.changed, plan.refreshed).to_pylist() == []
    prior = _prior_entry(local_store, merge.state)

    bob = _state([("bob", "wifi", "org:c", "The wifi password is", " Mango", 2)])
    plan, merge = merge_scopes(local_store.uri, prior, False, False, [3], shard_contribution(bob, 3))
    assert plan.changed == ("org:c",) and plan.refreshed == () and plan.scopes == 2 and plan.member_shards == (3,)
    assert users_to_rescope(_state(shards[0]), plan.changed, plan.refreshed).to_pylist() == []  # org:c is her 2nd
    prior = _prior_entry(local_store, merge.state)

    plan, merge = merge_scopes(local_store.uri, prior, False, False, [3], SCOPE_STATE_SCHEMA.empty_table())
    assert plan.dropped == ("org:c",) and plan.changed == () and plan.refreshed == () and plan.scopes == 1
    assert merge.removed.to_pylist() == ["org:c"] and "org:c" in merged_scope_facts(merge.state).column("scope").to_pylist()


def test_an_extra_scopes_facts_are_the_merged_ones_less_those_whose_trigger_the_users_own_fact_takes():
    from engram_core.compiler import Fact, FactResult
    from pipeline.scopes import extra_copy_results, extra_scope_facts

    merged = {"org:b": [Fact("org:b", "hours", "The clinic opens at", " ten", 2),
                        Fact("org:b", "parking", "Our parking is on", " level two", 1)]}
    own = [Fact("alice", "my-parking", "Our parking is on", " level nine", 1)]
    served = extra_scope_facts("alice", own, {"org:b"}, merged)
    assert [(f.user_id, f.fact_id, f.answer, f.written_at) for f in served] == [("alice", "org:b/hours", " ten", 2)]
    copies = {"alice": {"hours": ("org:b", "The clinic opens at", " nine"),
                        "parking": ("org:b", "Our parking is on", " level two")}}
    results = [FactResult("alice", "org:b/hours", "ok", 0.1, 3, 4, 1.0), FactResult("alice", "my-parking", "ok", 0.1, 3, 4, 1.0)]
    out = {r.fact_id: (r.status, r.detail) for r in extra_copy_results(results, copies, merged, {"alice": own})}
    assert out == {"my-parking": ("ok", ""),
                   "hours": ("ok", 'compiled in the user\'s own delta from scope "org:b"; '
                                   "the scope's latest copy is served, not this one"),
                   "parking": ("CONFLICTS_WITH:my-parking", 'compiled in the user\'s own delta from scope "org:b"; '
                                                            "the user's own fact on its trigger is served")}
