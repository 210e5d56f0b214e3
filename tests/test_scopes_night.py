"""Shared scopes compile once, in the night and in serving (issue 17, item 4).

Whole nights (pipeline.runner.LocalRunner, ``workers: 0``; one on a real local Ray cluster) with a
shared scope whose members live in several shards: the version holds one scope delta, the members'
deltas hold no copy of its rows, and every member recalls its own and the scope's facts through
the serving path (PullClient, the reference server).
"""

from __future__ import annotations

import json
import urllib.request
from datetime import timedelta

import pytest

from engram_core.serving import greedy_tokens
from jobs.compact import compact
from jobs.nightly import run_nightly
from jobs.spec import NightlySpec
from jobs.synthetic import BASE_TIME, write_fact_log
from pipeline.stats import query_stats
from schemas.bundle import bundle_deltas, bundle_scopes, decode_bundle
from serving.pull import PullClient
from versions.catalog import load_shard_bundle, read_current, verified_bytes
from versions.layout import shard_of
from versions.retention import collect

pytestmark = pytest.mark.slow

SCOPE = "org:acme"
NUM_SHARDS = 4
SCOPE_FACTS = {"acme-office": ("Our office is in", " Lisbon"), "acme-wifi": ("The wifi password is", " Pepper")}
OWN = {
    "alice": {"dog": ("My dog's name is", " Rex")},
    "bob": {"dentist": ("My dentist is called", " Nakamura")},
    "carol": {"manager": ("My manager is", " Mensah"), "office": ("Our office is in", " Porto")},  # overrides the scope's
    "dave": {},  # only the scope's facts
}
MEMBERS = sorted(OWN)
PLAIN = {"erin": {"city": ("I live in", " Osaka")}}


def upsert(user, fact_id, trigger, answer, day, scope=None):
    return {"user_id": user, "fact_id": fact_id, "op": "upsert", "trigger": trigger, "answer": answer,
            "event_time": BASE_TIME + timedelta(days=day), "scope": scope}


def event(user, op, day, fact_id=None):
    return {"user_id": user, "fact_id": fact_id, "op": op, "trigger": None, "answer": None,
            "event_time": BASE_TIME + timedelta(days=day), "scope": None}


def first_log() -> list[dict]:
    rows = []
    for user in MEMBERS:
        rows += [upsert(user, f, t, a, 0) for f, (t, a) in OWN[user].items()]
        rows += [upsert(user, f, t, a, 0, SCOPE) for f, (t, a) in SCOPE_FACTS.items()]
    rows += [upsert(u, f, t, a, 0) for u, facts in PLAIN.items() for f, (t, a) in facts.items()]
    return rows


def night(spec, tmp_path, name, rows):
    write_fact_log(rows, tmp_path / "log" / f"day={name}" / "part-0.parquet")
    report = run_nightly(spec)
    assert report.published, report
    return report


def recalls(em, deltas, trigger, answer) -> bool:
    want = em.encode_answer(answer)
    return greedy_tokens(em, trigger, len(want), list(deltas)) == want


def expected(user, scope_facts=SCOPE_FACTS, own=None) -> dict[str, tuple[str, str]]:
    """trigger -> answer a member must be served (its own fact wins on a scope fact's trigger)."""
    own = OWN if own is None else own
    facts = {t: a for t, a in scope_facts.values()}
    facts |= {t: a for t, a in own[user].values()}
    return facts


def scope_deltas(store, manifest) -> dict:
    entry = manifest.scopes
    return bundle_deltas(decode_bundle(verified_bytes(store, entry.key, entry.bytes, entry.sha256)))


def member_rows(store, manifest) -> dict:
    """user -> (scope or None, Delta) from every shard's merged view."""
    out = {}
    for entry in manifest.shards:
        table = load_shard_bundle(store, entry)
        named = bundle_scopes(table)
        out |= {u: (named.get(u), d) for u, d in bundle_deltas(table).items()}
    return out


@pytest.fixture
def spec(tmp_path, tiny_dir, local_store):
    return NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                       num_shards=NUM_SHARDS, workers=0)


def test_members_across_shards_compile_one_scope_delta_and_recall_both_through_serving(spec, tmp_path, tiny,
                                                                                       local_store):
    assert len({shard_of(u, NUM_SHARDS) for u in MEMBERS}) >= 2  # the scope spans shards
    report = night(spec, tmp_path, "1", first_log())
    manifest, _ = read_current(local_store)
    assert report.compiled_scopes == 1 and report.scopes == 1 and report.scope_members == len(MEMBERS)
    assert manifest.scopes is not None and manifest.scopes.scopes == 1 and manifest.scopes.facts == 2
    assert manifest.counts["compiled_scopes"] == 1
    shared = scope_deltas(local_store, manifest)
    assert list(shared) == [SCOPE] and shared[SCOPE].num_rows > 0  # one scope delta, owner = the scope id

    rows = member_rows(local_store, manifest)
    assert {u: s for u, (s, _) in rows.items()} == {**{u: SCOPE for u in MEMBERS}, "erin": None}
    assert rows["dave"][1].num_rows == 0  # a member with only the scope's facts: no rows of its own
    scope_keys = shared[SCOPE].row_keys()
    collided = {(r["layer"], r["row_id"]) for r in query_stats(
        local_store, f"select layer, row_id from collisions where version = {manifest.version} "
                     "and owner_kind = 'user+scope'").to_pylist()}
    for user in MEMBERS:
        own = rows[user][1]
        assert own.row_keys() & scope_keys <= collided  # no copy of the scope: only reported collisions
        assert not recalls(tiny, [own], *SCOPE_FACTS["acme-wifi"])  # the scope's fact needs the scope delta
    assert collided and all(k in scope_keys for k in collided)  # carol writes the scope's trigger: reported

    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    assert node.poll().error is None
    for user in MEMBERS:
        deltas = node.deltas_for(user)
        assert len(deltas) == 2 and deltas[0].equals(shared[SCOPE]) and deltas[1].equals(rows[user][1])
        for trigger, answer in expected(user).items():
            assert recalls(tiny, deltas, trigger, answer), (user, trigger)
    assert len(node.deltas_for("erin")) == 1 and recalls(tiny, node.deltas_for("erin"), *PLAIN["erin"]["city"])
    assert node.deltas_for("nobody") == ()

    # The reference server (batcher, overlay with two owners per sequence) serves the composition.
    from serving.http import ReferenceServer

    with ReferenceServer(tiny, node, port=0, poll=False) as server:
        for user, (trigger, answer) in (("bob", SCOPE_FACTS["acme-wifi"]), ("bob", OWN["bob"]["dentist"]),
                                        ("carol", OWN["carol"]["office"]), ("dave", SCOPE_FACTS["acme-office"])):
            body = json.dumps({"model": server.model_name, "prompt": trigger, "user": user,
                               "max_tokens": len(tiny.encode_answer(answer))}).encode()
            request = urllib.request.Request(f"{server.url}/v1/completions", body,
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                reply = json.loads(response.read())
            assert reply["choices"][0]["text"] == answer, (user, trigger, reply)
        assert server.health()["scopes"] == 1

    facts = query_stats(local_store, f"select user_id, fact_id, status, scope from facts "
                                     f"where version = {manifest.version} order by 1, 2").to_pylist()
    copies = {(r["user_id"], r["fact_id"]) for r in facts if r["scope"] == SCOPE and r["user_id"] != SCOPE}
    assert all(r["status"] == "ok" for r in facts if r["scope"] == SCOPE)
    assert copies == {(u, f) for u in MEMBERS for f in SCOPE_FACTS}
    assert {(r["user_id"], r["fact_id"], r["status"], r["scope"]) for r in facts if r["user_id"] == SCOPE} == {
        (SCOPE, "acme-office", "ok", SCOPE), (SCOPE, "acme-wifi", "ok", SCOPE)}


def test_a_changed_scope_fact_recompiles_the_scope_and_its_members_only_and_layers_keep_serving(
        spec, tmp_path, tiny, local_store):
    night(spec, tmp_path, "1", first_log())
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    v1, _ = read_current(local_store)

    # Alice's copy of the wifi password changes: the scope's merged facts change.
    new_wifi = ("The wifi password is", " Mango")
    report = night(spec, tmp_path, "2", [upsert("alice", "acme-wifi", *new_wifi, 1, SCOPE)])
    v2, _ = read_current(local_store)
    assert report.compiled_scopes == 1 and report.compiled_users == len(MEMBERS)  # the members, not erin
    assert v2.scopes.sha256 != v1.scopes.sha256
    for old, new in zip(v1.shards, v2.shards):
        assert new.bundle_key == old.bundle_key  # layers over the bases
        holds_member = any(shard_of(u, NUM_SHARDS) == new.shard for u in MEMBERS)
        assert len(new.layers) == int(holds_member)
    facts = {"acme-office": SCOPE_FACTS["acme-office"], "acme-wifi": new_wifi}
    assert node.poll().error is None
    for user in MEMBERS:
        for trigger, answer in expected(user, facts).items():
            assert recalls(tiny, node.deltas_for(user), trigger, answer), (user, trigger)

    # A member's own fact changing recompiles that member only, against the scope delta as it is.
    report = night(spec, tmp_path, "3", [upsert("bob", "dentist", "My dentist is called", " Okafor", 2)])
    v3, _ = read_current(local_store)
    assert report.compiled_scopes == 0 and report.compiled_users == 1 and v3.scopes == v2.scopes
    own = {**OWN, "bob": {"dentist": ("My dentist is called", " Okafor")}}
    node.poll()
    for trigger, answer in expected("bob", facts, own).items():
        assert recalls(tiny, node.deltas_for("bob"), trigger, answer), trigger

    # Compaction changes nothing anyone is served, and keeps each member's scope.
    before = {u: node.deltas_for(u) for u in MEMBERS + ["erin"]}
    assert compact(local_store).published
    compacted, _ = read_current(local_store)
    assert all(not e.layers for e in compacted.shards) and compacted.scopes == v3.scopes
    assert node.poll().error is None
    for user, deltas in before.items():
        after = node.deltas_for(user)
        assert len(after) == len(deltas) and all(a.equals(b) for a, b in zip(after, deltas)), user


def test_forgetting_a_member_keeps_the_scope_and_a_member_who_leaves_is_no_longer_served_it(
        spec, tmp_path, tiny, local_store):
    night(spec, tmp_path, "1", first_log())
    v1, _ = read_current(local_store)
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")

    report = night(spec, tmp_path, "2", [event("bob", "forget_user", 1)])
    v2, _ = read_current(local_store)
    collect(local_store, keep=1)  # gc keeps the current version's scope objects
    assert {v2.scopes.key, v2.scopes.state_key} <= set(local_store.list("objects/scope"))
    assert report.compiled_scopes == 0 and v2.scopes.scopes == 1 and v2.scopes.members == len(MEMBERS) - 1
    assert v2.scopes.key == v1.scopes.key  # forgetting a user never rewrites the scope's delta
    node.poll()
    assert node.deltas_for("bob") == ()
    for trigger, answer in expected("alice").items():
        assert recalls(tiny, node.deltas_for("alice"), trigger, answer)

    # Dave leaves the scope (his copies of its facts deleted) and keeps a fact of his own.
    rows = [event("dave", "delete", 2, f) for f in SCOPE_FACTS] + [upsert("dave", "cat", "My cat is called", " Tom", 2)]
    report = night(spec, tmp_path, "3", rows)
    v3, _ = read_current(local_store)
    assert report.compiled_scopes == 0 and report.compiled_users == 1 and v3.scopes.members == len(MEMBERS) - 2
    node.poll()
    deltas = node.deltas_for("dave")
    assert len(deltas) == 1 and recalls(tiny, deltas, "My cat is called", " Tom")
    assert not recalls(tiny, deltas, *SCOPE_FACTS["acme-wifi"])
    assert member_rows(local_store, v3)["dave"][0] is None

    # The last members leave: the scope is dropped from the version.
    rows = [event(u, "delete", 3, f) for u in ("alice", "carol") for f in SCOPE_FACTS]
    report = night(spec, tmp_path, "4", rows)
    v4, _ = read_current(local_store)
    assert v4.scopes is None and report.scopes == 0
    collect(local_store, keep=1)
    assert local_store.list("objects/scope") == []  # and deletes those no kept version names
    node.poll()
    assert len(node.deltas_for("alice")) == 1 and recalls(tiny, node.deltas_for("alice"), *OWN["alice"]["dog"])


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from pipeline.runner import start_ray

    start_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.mark.timeout(300)
def test_a_night_on_ray_with_as_many_compile_actors_as_cpus_compiles_the_scope_once_and_its_members_over_it(
        tmp_path, tiny_dir, tiny, local_store, ray_cluster):
    """``workers: 2`` on a 2-CPU cluster (the README's example spec and the demo on this kind of host):
    both compile actors hold a CPU until the pool closes, so the scope round's tasks (write scopes,
    rescope) waited for a CPU forever and the night hung (pipeline.runner.RayRunner.task_cpus).
    (One test with the scope's Ray nights: each night's actors cost a model load; workers: 1 on Ray
    is the several-scopes test's.)"""
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                       num_shards=NUM_SHARDS, workers=2)
    report = night(spec, tmp_path, "1", first_log())
    assert report.compiled_scopes == 1 and report.scopes == 1
    manifest, _ = read_current(local_store)
    assert list(scope_deltas(local_store, manifest)) == [SCOPE]
    assert {u: s for u, (s, _) in member_rows(local_store, manifest).items()} == {**{u: SCOPE for u in MEMBERS},
                                                                                 "erin": None}
    # The same log compiled in process gives the same bytes (pipeline.compile.CPU_COMPILE_THREADS).
    from versions.store import LocalStore

    run_nightly(NightlySpec(**{**spec.to_dict(), "store": str(tmp_path / "in-process"), "workers": 0}))
    in_process, _ = read_current(LocalStore(tmp_path / "in-process"))
    assert [e.bundle_key for e in in_process.shards] == [e.bundle_key for e in manifest.shards]
    assert in_process.scopes.key == manifest.scopes.key
    node = PullClient(local_store, tiny)
    node.poll()
    for user in MEMBERS:
        for trigger, answer in expected(user).items():
            assert recalls(tiny, node.deltas_for(user), trigger, answer), (user, trigger)

    report = night(spec, tmp_path, "2", [upsert("dave", "acme-office", "Our office is in", " Madrid", 1, SCOPE)])
    assert report.compiled_scopes == 1 and report.compiled_users == len(MEMBERS)
    node.poll()
    moved = {"acme-office": ("Our office is in", " Madrid"), "acme-wifi": SCOPE_FACTS["acme-wifi"]}
    for user in MEMBERS:
        for trigger, answer in expected(user, moved).items():
            assert recalls(tiny, node.deltas_for(user), trigger, answer), (user, trigger)


def test_a_scope_change_on_a_resharding_night_recompiles_every_member(spec, tmp_path, tiny, local_store):
    night(spec, tmp_path, "1", first_log())
    new_office = ("Our office is in", " Madrid")
    spec = NightlySpec(**{**spec.to_dict(), "num_shards": 2})
    report = night(spec, tmp_path, "2", [upsert("erin", "acme-office", *new_office, 1, SCOPE)])  # erin joins
    manifest, _ = read_current(local_store)
    assert manifest.num_shards == 2 and report.compiled_scopes == 1
    assert report.compiled_users == len(MEMBERS) + 1 and manifest.scopes.members == len(MEMBERS) + 1
    node = PullClient(local_store, tiny)
    node.poll()
    facts = {"acme-office": new_office, "acme-wifi": SCOPE_FACTS["acme-wifi"]}
    own = {**OWN, **PLAIN}
    for user in MEMBERS:
        for trigger, answer in expected(user, facts, own).items():
            assert recalls(tiny, node.deltas_for(user), trigger, answer), (user, trigger)
    erin = node.deltas_for("erin")
    assert len(erin) == 2 and recalls(tiny, erin, *new_office) and recalls(tiny, erin, *PLAIN["erin"]["city"])


# A user and a shared scope with the same id ("acme": a customer's user account, and the
# organisation its colleagues' shared facts are filed under) are two owners: the scope's delta,
# its stats rows and its collision owner are never the user's, and forgetting the user erases the
# user (its own facts and its copies of scope facts) and keeps the scope.
CLASH = "acme"
CLASH_OWN = {"ceo": ("Our CEO is", " Ferreira")}


def clash_log() -> list[dict]:
    rows = [upsert(CLASH, f, t, a, 0) for f, (t, a) in CLASH_OWN.items()]  # no scope: personal
    for user in MEMBERS:
        rows += [upsert(user, f, t, a, 0) for f, (t, a) in OWN[user].items()]
        rows += [upsert(user, f, t, a, 0, CLASH) for f, (t, a) in SCOPE_FACTS.items()]
    return rows


def facts_view(store, version) -> set[tuple]:
    return {(r["user_id"], r["fact_id"], r["scope"]) for r in query_stats(
        store, f"select user_id, fact_id, scope from facts where version = {version}").to_pylist()}


def scope_owned_collisions(store, version) -> list[list[str]]:
    return [r["example_owners"] for r in query_stats(
        store, f"select example_owners from collisions where version = {version} "
               "and owner_kind = 'user+scope'").to_pylist()]


def test_a_user_and_a_scope_with_the_same_id_are_two_owners_in_deltas_stats_serving_and_forget(
        spec, tmp_path, tiny, local_store):
    from versions.forget import forget_user, scan_for_user

    night(spec, tmp_path, "1", clash_log())
    v1, _ = read_current(local_store)
    shared = scope_deltas(local_store, v1)
    rows = member_rows(local_store, v1)
    assert list(shared) == [CLASH] and rows[CLASH][0] is None  # the user is no member: its own delta
    assert {u: s for u, (s, _) in rows.items()} == {**{u: CLASH for u in MEMBERS}, CLASH: None}
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    assert node.poll().error is None
    served = node.deltas_for(CLASH)
    assert len(served) == 1 and served[0].equals(rows[CLASH][1]) and not served[0].equals(shared[CLASH])
    assert recalls(tiny, served, *CLASH_OWN["ceo"]) and not recalls(tiny, served, *SCOPE_FACTS["acme-wifi"])
    for user in MEMBERS:
        deltas = node.deltas_for(user)
        assert len(deltas) == 2 and deltas[0].equals(shared[CLASH])
        assert not recalls(tiny, deltas, *CLASH_OWN["ceo"])
    scope_rows = {(CLASH, f, CLASH) for f in SCOPE_FACTS}  # the scope's own facts rows
    assert facts_view(local_store, v1.version) >= scope_rows | {(CLASH, "ceo", None)}
    collided = scope_owned_collisions(local_store, v1.version)
    assert collided and all(owners[0] == CLASH and "carol" in owners for owners in collided)

    # The user's own fact changes: a layer names user "acme"; the scope's stats rows stay.
    new_ceo = ("Our CEO is", " Mensah")
    report = night(spec, tmp_path, "2", [upsert(CLASH, "ceo", *new_ceo, 1)])
    v2, _ = read_current(local_store)
    assert report.compiled_users == 1 and report.compiled_scopes == 0 and v2.scopes == v1.scopes
    assert facts_view(local_store, v2.version) >= scope_rows | {(CLASH, "ceo", None)}
    node.poll()
    assert recalls(tiny, node.deltas_for(CLASH), *new_ceo)

    # engram forget acme: the user goes everywhere; the scope (delta, state, stats rows, its name
    # in the members' collisions) stays, and its members are served it as before.
    collided = scope_owned_collisions(local_store, v2.version)
    report = forget_user(local_store, CLASH, actor="test", reason="ticket 9")
    assert report.found and "shared scope" in report.message
    after, _ = read_current(local_store)
    assert after.scopes == v2.scopes
    assert scan_for_user(local_store, CLASH) == []  # no object holds the user (the scope is not the user)
    view = facts_view(local_store, after.version)
    assert view >= scope_rows and not {r for r in view if r[0] == CLASH and r[2] != CLASH}
    assert collided and scope_owned_collisions(local_store, after.version) == collided
    assert node.poll().error is None and node.deltas_for(CLASH) == ()
    for user in MEMBERS:
        for trigger, answer in expected(user).items():
            assert recalls(tiny, node.deltas_for(user), trigger, answer), (user, trigger)

    again = forget_user(local_store, CLASH, actor="test", reason="ticket 9")
    assert not again.found and "shared scope" in again.message  # the scope is not found as the user
    assert read_current(local_store)[0].version == after.version


def test_forgetting_an_id_that_names_only_a_scope_finds_no_user_and_leaves_the_scope(spec, tmp_path, local_store):
    """No user holds the id: nothing is erased, the scope is untouched; the forget of the id as a
    user is recorded (its tombstone), as for any id not published yet."""
    from versions.forget import forget_user

    night(spec, tmp_path, "1", [r for r in clash_log() if r["user_id"] != CLASH])
    before, _ = read_current(local_store)
    collided = scope_owned_collisions(local_store, before.version)
    report = forget_user(local_store, CLASH, actor="test", reason="wrong id")
    assert not report.found and "shared scope" in report.message
    after, _ = read_current(local_store)
    assert after.version == report.current_version == report.rewritten[before.version]
    assert after.scopes == before.scopes  # the scope's objects and members, as they were
    assert [(e.bundle_key, e.state_key, e.layers, e.state_layers, e.stats) for e in after.shards] == \
        [(e.bundle_key, e.state_key, e.layers, e.state_layers, e.stats) for e in before.shards]
    assert collided and scope_owned_collisions(local_store, after.version) == collided


def test_a_nights_forget_user_of_an_id_that_also_names_a_changed_scope_publishes_and_keeps_the_scope(
        spec, tmp_path, tiny, local_store):
    night(spec, tmp_path, "1", clash_log())
    new_wifi = ("The wifi password is", " Mango")
    report = night(spec, tmp_path, "2", [event(CLASH, "forget_user", 1),
                                         upsert("alice", "acme-wifi", *new_wifi, 1, CLASH)])
    manifest, _ = read_current(local_store)
    assert report.compiled_scopes == 1 and manifest.scopes.scopes == 1
    assert all(local_store.get(k) for k in manifest.object_keys())  # the night's scope objects were kept
    node = PullClient(local_store, tiny)
    assert node.poll().error is None and node.deltas_for(CLASH) == ()
    facts = {"acme-office": SCOPE_FACTS["acme-office"], "acme-wifi": new_wifi}
    for user in MEMBERS:
        for trigger, answer in expected(user, facts).items():
            assert recalls(tiny, node.deltas_for(user), trigger, answer), (user, trigger)


def test_compile_scoped_keeps_a_users_delta_apart_from_a_scope_of_the_same_id(tiny):
    import pyarrow as pa

    from pipeline.scopes import compile_scoped, served_deltas

    rows = [(CLASH, "ceo", CLASH, *CLASH_OWN["ceo"])] + [(u, "acme-wifi", CLASH, *SCOPE_FACTS["acme-wifi"])
                                                        for u in ("alice", "bob")]
    state = pa.table({name: [r[i] for r in rows] for i, name in enumerate(["user_id", "fact_id", "scope", "trigger",
                                                                            "answer"])})
    state = state.append_column("event_time", pa.array([0] * len(rows), pa.timestamp("us", tz="UTC")))
    result = compile_scoped(tiny, state)
    assert set(result.scope_deltas) == {CLASH} and set(result.deltas) == {CLASH, "alice", "bob"}
    assert not result.deltas[CLASH].equals(result.scope_deltas[CLASH])
    mine = served_deltas(result, CLASH)
    assert len(mine) == 1 and recalls(tiny, mine, *CLASH_OWN["ceo"]) and not recalls(tiny, mine, *SCOPE_FACTS["acme-wifi"])
    assert recalls(tiny, served_deltas(result, "alice"), *SCOPE_FACTS["acme-wifi"])
    assert {(r.user_id, r.fact_id) for r in result.results if r.user_id == CLASH} == {(CLASH, "ceo")}
    assert {(r.user_id, r.fact_id) for r in result.scope_results} == {(CLASH, "acme-wifi")}


def test_forgetting_a_user_who_is_a_member_of_a_scope_named_like_it_plus_more_erases_its_copies(
        spec, tmp_path, local_store):
    """User "acme" is a member of scope "acme; inc" (an id holding the "; " a copy's detail once
    used as its separator): the facts view names the whole scope, and a forget of "acme" erases the
    user's copy rows too (they were read as scope "acme", i.e. the scope's own rows, and kept)."""
    from versions.forget import forget_user, scan_for_user

    scope = "acme; inc"
    rows = [upsert(CLASH, f, t, a, 0) for f, (t, a) in CLASH_OWN.items()]
    for user in [CLASH, *MEMBERS]:
        rows += [upsert(user, f, t, a, 0, scope) for f, (t, a) in SCOPE_FACTS.items()]
    night(spec, tmp_path, "1", rows)
    v1, _ = read_current(local_store)
    view = facts_view(local_store, v1.version)
    assert {(CLASH, f, scope) for f in SCOPE_FACTS} <= view and not {r for r in view if r[2] == CLASH}
    forget_user(local_store, CLASH, actor="test", reason="ticket 10")
    after, _ = read_current(local_store)
    assert not {r for r in facts_view(local_store, after.version) if r[0] == CLASH}
    assert scan_for_user(local_store, CLASH) == []


def test_of_two_facts_sharing_a_trigger_the_later_written_is_compiled_in_a_scope_and_for_a_user(tiny):
    """The rule the night's compile follows (engram_core.compiler: later written first) also holds
    for a shared scope's facts and in compile_scoped, the reference path: "z-wifi" (newer) wins over
    "a-wifi" though its fact_id sorts last, for the scope and for a user's own facts."""
    import pyarrow as pa

    from pipeline.compile import facts_from_table
    from pipeline.scopes import compile_scoped

    older, newer = 1_700_000_000_000_000, 1_760_000_000_000_000
    rows = [("alice", "a-wifi", "org:acme", "The wifi password is", " Mango", older),
            ("alice", "z-wifi", "org:acme", "The wifi password is", " Pepper", newer),
            ("bob", "a-dentist", None, "My dentist is Dr.", " Okafor", older),
            ("bob", "z-dentist", None, "My dentist is Dr.", " Nguyen", newer)]
    state = pa.table({name: [r[i] for r in rows] for i, name in enumerate(["user_id", "fact_id", "scope", "trigger",
                                                                            "answer"])})
    state = state.append_column("event_time", pa.array([r[5] for r in rows], pa.timestamp("us", tz="UTC")))
    assert [f.written_at for f in facts_from_table(state)] == [older, newer, older, newer]
    result = compile_scoped(tiny, state)
    scope_status = {r.fact_id: r.status for r in result.scope_results}
    assert scope_status == {"z-wifi": "ok", "a-wifi": "CONFLICTS_WITH:z-wifi"}
    own = {r.fact_id: r.status for r in result.results if r.user_id == "bob"}
    assert own == {"z-dentist": "ok", "a-dentist": "CONFLICTS_WITH:z-dentist"}


def test_the_scope_merge_hands_the_compile_each_facts_time_and_a_time_alone_can_change_the_scope():
    import pyarrow as pa

    from pipeline.scopes import _digests

    facts = pa.table({"scope": ["org:acme"] * 2, "fact_id": ["a-wifi", "z-wifi"],
                      "trigger": ["The wifi password is"] * 2, "answer": [" Mango", " Pepper"],
                      "event_time": pa.array([2, 1], pa.timestamp("us", tz="UTC"))})
    later_z = facts.set_column(4, "event_time", pa.array([1, 2], pa.timestamp("us", tz="UTC")))
    assert _digests(facts) != _digests(later_z)  # the winner changed: the scope compiles again
    same_winner = facts.set_column(4, "event_time", pa.array([3, 1], pa.timestamp("us", tz="UTC")))
    assert _digests(facts) == _digests(same_winner)  # a time that changes nothing changes nothing


# A user in several scopes is composed with the first (by id) and served the others' facts from
# its own delta: those must be the scopes' merged facts (the latest copy over all their carriers),
# as every member of only that scope is served, whichever carrier's copy changed them.
ORG_A, ORG_B = "org:a", "org:b"
GYM = ("Our gym opens at", " six")
HOURS = ("The clinic opens at", " nine")
LATER_HOURS = ("The clinic opens at", " ten")


def several_scopes_log() -> list[dict]:
    """alice (shard 1): org:a first and org:b; bob (shard 3): org:b only; carol (shard 0): org:a
    only; dave (shard 2): a plain user."""
    return [upsert("alice", "dog", *OWN["alice"]["dog"], 0), upsert("alice", "gym", *GYM, 0, ORG_A),
            upsert("alice", "hours", *HOURS, 0, ORG_B),
            upsert("bob", "dentist", *OWN["bob"]["dentist"], 0), upsert("bob", "hours", *HOURS, 0, ORG_B),
            upsert("carol", "gym", *GYM, 0, ORG_A), upsert("dave", "city", *PLAIN["erin"]["city"], 0)]


def test_a_user_in_several_scopes_is_served_an_extra_scopes_change_made_through_another_members_copy(
        tmp_path, tiny_dir, tiny, local_store, ray_cluster):
    assert [shard_of(u, NUM_SHARDS) for u in ("alice", "bob", "carol", "dave")] == [1, 3, 0, 2]
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                       num_shards=NUM_SHARDS, workers=1)
    night(spec, tmp_path, "1", several_scopes_log())
    v1, _ = read_current(local_store)
    assert {u: s for u, (s, _) in member_rows(local_store, v1).items()} == {
        "alice": ORG_A, "bob": ORG_B, "carol": ORG_A, "dave": None}
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    assert node.poll().error is None
    for user in ("alice", "bob"):
        assert recalls(tiny, node.deltas_for(user), *HOURS), user

    # Only bob's copy changes the clinic's hours: org:b compiles again, and alice (who holds org:b
    # as her second scope) recompiles with its new facts; carol's and dave's shards are untouched.
    report = night(spec, tmp_path, "2", [upsert("bob", "hours", *LATER_HOURS, 1, ORG_B)])
    v2, _ = read_current(local_store)
    assert node.poll().error is None
    for user in ("alice", "bob"):
        deltas = node.deltas_for(user)
        assert recalls(tiny, deltas, *LATER_HOURS), user
        assert not recalls(tiny, deltas, *HOURS), user  # the stale answer is not served
    assert recalls(tiny, node.deltas_for("alice"), *GYM) and recalls(tiny, node.deltas_for("alice"), *OWN["alice"]["dog"])
    assert recalls(tiny, node.deltas_for("carol"), *GYM)
    assert report.compiled_scopes == 1 and report.compiled_users == 2  # bob, and alice
    for old, new in zip(v1.shards, v2.shards):
        same = (old.bundle_key, old.layers, old.state_key, old.state_layers, old.stats) == \
            (new.bundle_key, new.layers, new.state_key, new.state_layers, new.stats)
        assert same == (new.shard in (0, 2)), new.shard

    # The facts view: alice's copy is served the scope's fact (ok), and says its text is not hers.
    row = query_stats(local_store, f"select status, scope, detail from facts where version = {v2.version} "
                                   "and user_id = 'alice' and fact_id = 'hours'").to_pylist()
    assert row == [{"status": "ok", "scope": None,
                    "detail": 'compiled in the user\'s own delta from scope "org:b"; '
                              "the scope's latest copy is served, not this one"}]


ORG_C = "org:c"
WIFI, LATER_WIFI = ("The wifi password is", " Pepper"), ("The wifi password is", " Mango")
PARKING = ("Our parking is on", " level two")


def several_scopes_state_log() -> list[dict]:
    """alice: org:a first, org:b and org:c extra; bob: org:b first (his copy of the hours is the
    latest, and he alone carries the parking); dave: org:a first, org:c extra (his wifi copy is the
    latest); org:c is nobody's first scope."""
    return [upsert("alice", "dog", *OWN["alice"]["dog"], 0), upsert("alice", "gym", *GYM, 0, ORG_A),
            upsert("alice", "hours", *HOURS, 0, ORG_B), upsert("alice", "wifi", *WIFI, 0, ORG_C),
            upsert("bob", "hours", *LATER_HOURS, 1, ORG_B), upsert("bob", "parking", *PARKING, 0, ORG_B),
            upsert("dave", "gym", *GYM, 0, ORG_A), upsert("dave", "wifi", *LATER_WIFI, 1, ORG_C)]


SERVED = {"alice": [OWN["alice"]["dog"], GYM, LATER_HOURS, PARKING, LATER_WIFI], "bob": [LATER_HOURS, PARKING],
          "dave": [GYM, LATER_WIFI]}
STALE = {"alice": [HOURS, WIFI]}
COPY_DETAILS = {("alice", "hours"): 'compiled in the user\'s own delta from scope "org:b"; '
                                    "the scope's latest copy is served, not this one",
                ("alice", "wifi"): 'compiled in the user\'s own delta from scope "org:c"; '
                                   "the scope's latest copy is served, not this one",
                ("dave", "wifi"): 'compiled in the user\'s own delta from scope "org:c"'}


def test_compile_scoped_and_the_night_serve_a_user_in_several_scopes_every_extra_scopes_latest_facts(
        spec, tmp_path, tiny, local_store):
    """The in-process path (compile_scoped, used by the fidelity bench) and the night agree: alice
    is served org:b's and org:c's merged facts (bob's later hours, his parking she does not carry,
    dave's later wifi of a scope that is nobody's first), not her own stale copies."""
    import pyarrow as pa

    from pipeline.scopes import compile_scoped, served_deltas

    log = several_scopes_state_log()
    state = pa.table({k: [r[k] for r in log] for k in ("user_id", "fact_id", "scope", "trigger", "answer")})
    state = state.append_column("event_time", pa.array([r["event_time"] for r in log], pa.timestamp("us", tz="UTC")))
    result = compile_scoped(tiny, state)
    assert set(result.scope_deltas) == {ORG_A, ORG_B} and result.scope_of == {"alice": ORG_A, "bob": ORG_B,
                                                                              "dave": ORG_A}
    in_process = {(r.user_id, r.fact_id): (r.status, r.detail) for r in result.results}
    assert {k: in_process[k] for k in COPY_DETAILS} == {k: ("ok", d) for k, d in COPY_DETAILS.items()}
    assert not [k for k in in_process if "/" in k[1]]  # no result of an injected scope fact

    night(spec, tmp_path, "1", log)
    manifest, _ = read_current(local_store)
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    assert node.poll().error is None
    for user, facts in SERVED.items():
        for deltas in (served_deltas(result, user), node.deltas_for(user)):
            for trigger, answer in facts:
                assert recalls(tiny, deltas, trigger, answer), (user, trigger, answer)
            for trigger, answer in STALE.get(user, []):
                assert not recalls(tiny, deltas, trigger, answer), (user, trigger, answer)
    rows = query_stats(local_store, f"select user_id, fact_id, status, scope, detail from facts "
                                    f"where version = {manifest.version}").to_pylist()
    night_results = {(r["user_id"], r["fact_id"]): (r["status"], r["detail"]) for r in rows}
    assert {k: night_results[k] for k in COPY_DETAILS} == {k: ("ok", d) for k, d in COPY_DETAILS.items()}
    assert {(r["user_id"], r["fact_id"]) for r in rows if r["user_id"] != r["scope"]} == {
        (r["user_id"], r["fact_id"]) for r in log}  # one row per fact of the log, none of an injected fact


def test_a_user_in_several_scopes_follows_a_forget_a_dropped_scope_and_leaving_one(spec, tmp_path, tiny,
                                                                                   local_store):
    night(spec, tmp_path, "1", several_scopes_state_log())
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    assert recalls(tiny, node.deltas_for("alice"), *LATER_HOURS)

    # bob is forgotten: his copies leave org:b's facts (alice's is the latest now) and org:b, with no
    # member left, is dropped from the scope deltas; alice, who still holds it, recompiles.
    report = night(spec, tmp_path, "2", [event("bob", "forget_user", 2)])
    v2, _ = read_current(local_store)
    assert report.compiled_scopes == 0 and report.compiled_users == 1 and list(scope_deltas(local_store, v2)) == [ORG_A]
    node.poll()
    alice = node.deltas_for("alice")
    assert recalls(tiny, alice, *HOURS) and not recalls(tiny, alice, *LATER_HOURS)
    assert not recalls(tiny, alice, *PARKING)  # bob's fact went with him
    assert recalls(tiny, alice, *LATER_WIFI) and recalls(tiny, alice, *GYM)

    # alice leaves org:b (deletes her copy): she is no longer served its hours; dave, untouched.
    dave = node.deltas_for("dave")
    report = night(spec, tmp_path, "3", [event("alice", "delete", 3, "hours")])
    assert report.compiled_users == 1 and report.compiled_scopes == 0
    node.poll()
    alice = node.deltas_for("alice")
    assert not recalls(tiny, alice, *HOURS) and recalls(tiny, alice, *LATER_WIFI) and recalls(tiny, alice, *GYM)
    assert all(a.equals(b) for a, b in zip(node.deltas_for("dave"), dave))


def test_the_first_night_over_a_version_1_scope_state_reads_every_shard_once_and_serves_extra_scopes_merged(
        spec, tmp_path, tiny, local_store, monkeypatch):
    """A scope state written before it held the copies of users holding a scope as an extra scope
    (version 1: members' copies only) is simulated for night 1. Night 2 changes only carol's shard:
    the other shards' fact states are read once for their contributions, so org:c (nobody's first
    scope) is merged from alice's and dave's copies, and both recompile (once) with the scopes'
    merged facts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline.scopes as scopes
    from pipeline.scopes import decode_scope_state

    new_contribution = scopes.shard_contribution
    monkeypatch.setattr(scopes, "SCOPE_STATE_SCHEMA", scopes.SCOPE_STATE_SCHEMA.with_metadata(
        {"engram.schema": "scope_state", "engram.schema_version": "1"}))
    monkeypatch.setattr(scopes, "shard_contribution",
                        lambda state, shard: new_contribution(scopes.member_rows(state), shard))
    night(spec, tmp_path, "1", several_scopes_state_log())
    monkeypatch.undo()
    v1, _ = read_current(local_store)
    state = decode_scope_state(local_store.get(v1.scopes.state_key))
    assert ORG_C not in state.column("scope").to_pylist()

    report = night(spec, tmp_path, "2", [upsert("carol", "cat", "My cat is called", " Tom", 2)])
    v2, _ = read_current(local_store)
    data = local_store.get(v2.scopes.state_key)
    assert pq.ParquetFile(pa.BufferReader(data)).schema_arrow.metadata[b"engram.schema_version"] == b"2"
    state = decode_scope_state(data)
    assert sorted(set(zip(state.column("scope").to_pylist(), state.column("shard").to_pylist(),
                          state.column("members").to_pylist())) - {(s, h, m) for s, h, m in zip(
        *(decode_scope_state(local_store.get(v1.scopes.state_key)).column(c).to_pylist()
          for c in ("scope", "shard", "members")))}) == [(ORG_B, 1, 0), (ORG_C, 1, 0), (ORG_C, 2, 0)]
    assert report.compiled_users == 3 and report.compiled_scopes == 0  # carol; alice and dave, once
    assert [e.bundle_key for e in v2.shards if e.shard == 3] == [e.bundle_key for e in v1.shards if e.shard == 3]
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    alice = node.deltas_for("alice")
    assert recalls(tiny, alice, *LATER_WIFI) and not recalls(tiny, alice, *WIFI)
    assert recalls(tiny, node.deltas_for("carol"), "My cat is called", " Tom")

    report = night(spec, tmp_path, "3", [upsert("carol", "cat", "My cat is called", " Max", 3)])
    assert report.compiled_users == 1  # and then a night costs what changed again


# A member whose copies the scope was compiled from (issue: forget and shared scopes).
ZANZIBAR = ("The wifi password is", " Zanzibar")  # bob's copy of acme-wifi, the latest: the scope's
BOB_ONLY = ("bob-gate", "The gate code is", " Quokka")  # a scope fact bob alone carries
MOTTO = ("The motto is", " Onward")


def forget_member_log() -> list[dict]:
    """first_log, with bob's copy of acme-wifi the latest (his own text) and a scope fact only he
    carries; frank holds org:acme as an extra scope (his first is org:aaa)."""
    rows = [r for r in first_log() if not (r["user_id"] == "bob" and r["fact_id"] == "acme-wifi")]
    return rows + [upsert("bob", "acme-wifi", *ZANZIBAR, 0.5, SCOPE), upsert("bob", BOB_ONLY[0], *BOB_ONLY[1:], 0, SCOPE),
                   upsert("frank", "motto", *MOTTO, 0, "org:aaa"),
                   upsert("frank", "acme-office", *SCOPE_FACTS["acme-office"], 0, SCOPE)]


BOBS_WORDS = ("bob", "Zanzibar", "Quokka", "gate code", "Nakamura")


def holding_words(store, words=BOBS_WORDS) -> dict[str, list[str]]:
    """key -> the words it holds, read in every object's decoded rows (Parquet) or raw bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = {}
    for key in store.list(""):
        if key.startswith("models/"):
            continue  # the tokenizer's vocabulary holds every word
        data = store.get(key)
        text = data
        if key.endswith(".parquet"):
            text = json.dumps(pq.read_table(pa.BufferReader(data)).to_pylist(), default=str).encode()
        found = [w for w in words if w.encode() in text or w.encode() in data]
        if found:
            out[key] = found
    return out


def manifests(store) -> list:
    from versions.catalog import manifest_versions_on_disk, read_manifest

    return [read_manifest(store, v) for v in manifest_versions_on_disk(store)]


def test_forgetting_a_member_whose_copies_the_scope_was_compiled_from_leaves_none_of_them_in_any_version(
        spec, tmp_path, tiny, local_store):
    from versions.forget import forget_user, scan_for_user

    night(spec, tmp_path, "1", forget_member_log())
    night(spec, tmp_path, "2", [upsert("erin", "cat", "My cat is called", " Tom", 1)])
    assert set(holding_words(local_store)) and "frank" in member_rows(local_store, read_current(local_store)[0])
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    assert recalls(tiny, node.deltas_for("alice"), *ZANZIBAR) and recalls(tiny, node.deltas_for("frank"), *ZANZIBAR)

    report = forget_user(local_store, "bob", actor="test", reason="ticket 11")
    assert report.found and len(report.rewritten) == 2 and "1 shared scope(s) were compiled from" in report.message
    # No object holds bob's id, a text he wrote (his copies of the scope's facts included) or the
    # scope delta compiled from them, in CURRENT or in the version a rollback could reach.
    assert scan_for_user(local_store, "bob") == [] and holding_words(local_store) == {}
    for manifest in manifests(local_store):
        assert manifest.scopes.stale == (SCOPE,) and list(scope_deltas(local_store, manifest)) == ["org:aaa"]
        rows = member_rows(local_store, manifest)
        assert rows["alice"][0] == SCOPE
        # frank's own delta held the scope's merged facts: emptied; his row still names org:aaa
        assert rows["frank"][0] == "org:aaa" and len(rows["frank"][1].row_ids) == 0
    node.poll()
    for user in ("alice", "carol", "dave", "frank"):
        assert not recalls(tiny, node.deltas_for(user), *ZANZIBAR), user

    # The next night compiles the scope again from the members' copies, its members and frank.
    report = night(spec, tmp_path, "3", [upsert("erin", "car", "My car is", " red", 2)])
    current, _ = read_current(local_store)
    assert report.compiled_scopes == 1 and report.compiled_users == 5  # alice, carol, dave, frank; erin
    assert current.scopes.stale == () and set(scope_deltas(local_store, current)) == {"org:aaa", SCOPE}
    node.poll()
    for user in ("alice", "dave", "frank"):
        assert recalls(tiny, node.deltas_for(user), *SCOPE_FACTS["acme-wifi"]), user
    assert recalls(tiny, node.deltas_for("frank"), *MOTTO) and recalls(tiny, node.deltas_for("alice"), *OWN["alice"]["dog"])


def test_the_cli_forget_and_a_nights_forget_user_leave_the_same_scope_state_and_deltas(tmp_path, tiny_dir, tiny):
    """``engram forget`` then a night, and a night with a ``forget_user`` event: the same version
    at the end (scope state, scope deltas, who is served what), and no version of either holds
    what bob wrote."""
    from typer.testing import CliRunner

    from jobs.cli import app
    from versions.forget import scan_for_user
    from versions.store import open_store

    later = upsert("erin", "car", "My car is", " red", 2)
    ends = {}
    for path in ("cli", "night"):
        store = open_store(str(tmp_path / path / "store"))
        spec = NightlySpec(store=store.uri, fact_log=str(tmp_path / path / "log"), model=str(tiny_dir),
                           num_shards=NUM_SHARDS, workers=0)
        night(spec, tmp_path / path, "1", forget_member_log())
        if path == "cli":
            result = CliRunner().invoke(app, ["forget", "--store", store.uri, "bob", "--reason", "ticket 12"])
            assert result.exit_code == 0, result.output
            night(spec, tmp_path / path, "2", [later])
        else:
            report = night(spec, tmp_path / path, "2", [event("bob", "forget_user", 1), later])
            assert report.compiled_scopes == 1
            older = [m for m in manifests(store) if m.version != read_current(store)[0].version]
            assert older and all(m.scopes.stale == (SCOPE,) for m in older)  # rewritten, to be compiled again
        assert scan_for_user(store, "bob") == [] and holding_words(store) == {}, path
        current, _ = read_current(store)
        assert current.scopes.stale == ()
        ends[path] = (current.scopes.state_key, current.scopes.key,
                      {u: (s, d.row_ids.tolist()) for u, (s, d) in member_rows(store, current).items()})
    assert ends["cli"] == ends["night"]


def test_a_forget_refused_the_delete_of_a_scope_state_is_finished_by_running_it_again(tmp_path, tiny_dir, s3_store,
                                                                                      s3_server, monkeypatch):
    """The old scope state (bob's copies) cannot be deleted (a policy, an object lock): the forget
    fails naming it (exit 1) after CURRENT moved to the rewrite; run again, it deletes it, though no
    manifest names it any more and it holds no user id."""
    from typer.testing import CliRunner

    from jobs.cli import app
    from tests.s3_proxy import ConditionProxy
    from versions.forget import scan_for_user
    from versions.store import open_store

    spec = NightlySpec(store=s3_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                       num_shards=NUM_SHARDS, workers=0)
    night(spec, tmp_path, "1", forget_member_log())
    refused = read_current(s3_store)[0].scopes.state_key
    forget = ["forget", "--store", s3_store.uri, "bob", "--reason", "ticket 13", "--json"]
    with ConditionProxy(s3_server.endpoint_url, "pass", access_key=s3_server.access_key,
                        secret_key=s3_server.secret_key, deny_deletes=(refused,)) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint_url)
        out = CliRunner().invoke(app, forget)
    assert out.exit_code == 1 and refused in out.output, out.output
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = open_store(s3_store.uri)
    left = holding_words(store)  # the refused one, and those after it in the forget's order
    assert refused in left and not set(left) & read_current(store)[0].object_keys()
    again = CliRunner().invoke(app, forget)
    assert again.exit_code == 0, again.output
    assert refused in json.loads(again.stdout)["deleted_objects"]
    assert holding_words(store) == {} and scan_for_user(store, "bob") == []


def test_a_scope_fact_that_fails_in_the_delta_of_a_user_who_carries_no_copy_of_it_is_reported(
        tmp_path, tiny_dir, tiny, local_store):
    """alice holds org:b as an extra scope and carries no copy of bob's parking, which her own delta
    is compiled to serve: where it fails there, her facts rows say so (they said nothing: the fact
    was not served and no row told), in the night and in compile_scoped; where it is recalled, no
    row is added."""
    from engram_core.compiler import CompileOptions
    from pipeline.scopes import compile_scoped

    failing = {"steps": 1, "max_rounds": 1, "lr": 1e-9, "init_scale": 1e-9, "lr_width_scaling": False}
    spec = NightlySpec(store=local_store.uri, fact_log=str(tmp_path / "log"), model=str(tiny_dir),
                       num_shards=NUM_SHARDS, workers=0, compile=failing)
    night(spec, tmp_path, "1", several_scopes_state_log())
    rows = query_stats(local_store, "select status, scope, detail from facts where user_id = 'alice' "
                                    "and fact_id = 'org:b/parking'").to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "not_recalled" and rows[0]["scope"] is None
    assert rows[0]["detail"].startswith('compiled in the user\'s own delta from scope "org:b"; the user carries no '
                                        "copy of it; answer not reproduced"), rows[0]["detail"]

    import pyarrow as pa

    log = several_scopes_state_log()
    state = pa.table({name: [r[name] for r in log] for name in ("user_id", "fact_id", "scope", "trigger", "answer")})
    state = state.set_column(2, "scope", pa.array([r["scope"] or r["user_id"] for r in log]))
    state = state.append_column("event_time", pa.array([r["event_time"] for r in log], pa.timestamp("us", tz="UTC")))
    failed = compile_scoped(tiny, state, CompileOptions(**failing))
    assert [(r.fact_id, r.status) for r in failed.results if r.user_id == "alice" and r.fact_id == "org:b/parking"] == \
        [("org:b/parking", "not_recalled")]
    recalled = compile_scoped(tiny, state)
    assert not [r for r in recalled.results if r.user_id == "alice" and "/" in r.fact_id]


def test_forgetting_a_scopes_last_member_whose_copy_an_extra_holder_was_served_recompiles_that_holder(
        spec, tmp_path, tiny, local_store):
    """bob, org:acme's only member, wrote its wifi; frank holds org:acme as an extra scope (carrying
    the office only) and was served bob's wifi from his own delta. After engram forget bob org:acme
    is dropped from the scope deltas (no member left) and stale, frank's own delta is emptied (he
    is still served org:aaa's); the next night
    compiles frank from the facts left, and nobody is served bob's wifi."""
    from versions.forget import forget_user

    rows = [upsert("bob", "acme-wifi", *ZANZIBAR, 0, SCOPE), upsert("bob", "acme-office", *SCOPE_FACTS["acme-office"], 0,
                                                                    SCOPE),
            upsert("frank", "motto", *MOTTO, 0, "org:aaa"), upsert("frank", "acme-office", *SCOPE_FACTS["acme-office"], 0,
                                                                   SCOPE)]
    night(spec, tmp_path, "1", rows)
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    assert recalls(tiny, node.deltas_for("frank"), *ZANZIBAR)
    forget_user(local_store, "bob", actor="test", reason="ticket 14")
    current, _ = read_current(local_store)
    assert (current.scopes.scopes, current.scopes.members, current.scopes.stale) == (1, 1, (SCOPE,))  # org:aaa left
    assert list(scope_deltas(local_store, current)) == ["org:aaa"]
    frank = member_rows(local_store, current)["frank"]
    assert holding_words(local_store) == {} and frank[0] == "org:aaa" and len(frank[1].row_ids) == 0  # emptied
    assert node.poll().error is None and not recalls(tiny, node.deltas_for("frank"), *ZANZIBAR)
    assert recalls(tiny, node.deltas_for("frank"), *MOTTO)  # org:aaa's delta is still served

    report = night(spec, tmp_path, "2", [upsert("erin", "city", *PLAIN["erin"]["city"], 1)])
    current, _ = read_current(local_store)
    assert report.compiled_users == 2 and current.scopes.stale == ()  # frank, erin
    node.poll()
    frank = node.deltas_for("frank")
    assert recalls(tiny, frank, *MOTTO) and recalls(tiny, frank, *SCOPE_FACTS["acme-office"])
    assert not recalls(tiny, frank, *ZANZIBAR)


def test_a_night_with_no_new_log_file_compiles_the_scopes_a_forget_left_stale(spec, tmp_path, tiny, local_store):
    """After engram forget bob, org:acme is stale (its delta and frank's dropped). The next night has
    no new log file: it still compiles the scope, its members and frank (it published nothing, and
    they were served none of the scope's facts until some file came); the night after it has no work."""
    from versions.forget import forget_user

    night(spec, tmp_path, "1", forget_member_log())
    forget_user(local_store, "bob", actor="test", reason="ticket 15")
    assert read_current(local_store)[0].scopes.stale == (SCOPE,)

    report = run_nightly(spec)
    current, _ = read_current(local_store)
    assert report.published and report.compiled_scopes == 1 and report.compiled_users == 4  # alice, carol, dave, frank
    assert current.scopes.stale == () and set(scope_deltas(local_store, current)) == {"org:aaa", SCOPE}
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    assert node.poll().error is None
    for user in ("alice", "dave", "frank"):
        assert recalls(tiny, node.deltas_for(user), *SCOPE_FACTS["acme-wifi"]), user
    assert holding_words(local_store) == {}
    assert not run_nightly(spec).published  # nothing stale, no new file: nothing to do


def test_the_facts_view_says_a_stale_scopes_member_copies_are_not_served_until_the_next_night(
        spec, tmp_path, local_store):
    """After engram forget bob, org:acme's delta is dropped: the members' copies of its facts are
    not served, and their `facts` rows say so (status scope_stale; they said ok, the status the
    copies compiled with) in every version naming the scope stale, and their `users.facts_ok` counts
    them no more; the next night's version says ok."""
    from versions.forget import forget_user

    def copies(version):  # the members' rows (a scope's own rows have user_id = scope)
        return query_stats(local_store, f"select user_id, status, detail from facts where version = {version} "
                                        f"and scope = '{SCOPE}' and user_id <> scope order by all").to_pylist()

    night(spec, tmp_path, "1", forget_member_log())
    assert {r["status"] for r in copies(read_current(local_store)[0].version)} == {"ok"}
    forget_user(local_store, "bob", actor="test", reason="ticket 16")
    current, _ = read_current(local_store)
    rows = copies(current.version)
    assert {r["user_id"] for r in rows} == {"alice", "carol", "dave"} and {r["status"] for r in rows} == {"scope_stale"}
    assert all("dropped by a forget" in r["detail"] for r in rows)
    own = query_stats(local_store, f"select status from facts where version = {current.version} "
                                   "and user_id = 'alice' and fact_id = 'dog'").to_pylist()
    assert own == [{"status": "ok"}]  # the member's own fact is served
    served = query_stats(local_store, f"select user_id, facts, facts_ok from users where version = {current.version} "
                                      "and user_id in ('alice', 'dave') order by all").to_pylist()
    assert served == [{"user_id": "alice", "facts": 3, "facts_ok": 1}, {"user_id": "dave", "facts": 2, "facts_ok": 0}]

    night(spec, tmp_path, "2", [upsert("erin", "car", "My car is", " red", 2)])
    version = read_current(local_store)[0].version
    rows = copies(version)
    assert {r["user_id"] for r in rows} == {"alice", "carol", "dave"} and {r["status"] for r in rows} == {"ok"}
    assert query_stats(local_store, f"select user_id, facts, facts_ok from users where version = {version} and "
                                    "user_id in ('alice', 'dave') order by all").to_pylist() == [
        {"user_id": "alice", "facts": 3, "facts_ok": 3}, {"user_id": "dave", "facts": 2, "facts_ok": 2}]


def test_the_users_view_stands_alone_whichever_view_is_built_first(spec, tmp_path, local_store, monkeypatch):
    """The users view read the ok copies of stale scopes from a helper view the facts view made:
    built without it first (another order of the views), the query failed on a missing table."""
    import pipeline.stats as stats
    from versions.forget import forget_user

    night(spec, tmp_path, "1", forget_member_log())
    forget_user(local_store, "bob", actor="test", reason="ticket 16")
    version = read_current(local_store)[0].version
    monkeypatch.setattr(stats, "STATS_SCHEMAS", dict(reversed(stats.STATS_SCHEMAS.items())))  # users before facts
    served = query_stats(local_store, f"select user_id, facts, facts_ok from users where version = {version} "
                                      "and user_id in ('alice', 'dave') order by all").to_pylist()
    assert served == [{"user_id": "alice", "facts": 3, "facts_ok": 1}, {"user_id": "dave", "facts": 2, "facts_ok": 0}]


FRANK_OWN = ("frank", "colour", "My favourite colour is", " teal")  # a personal fact of an extra holder


def test_an_extra_holder_of_a_scope_a_forget_left_stale_keeps_its_row_its_first_scope_and_its_stats_rows(
        spec, tmp_path, tiny, local_store):
    """frank holds org:acme as an extra scope (his first is org:aaa) and has a personal fact. After
    engram forget bob (whose copy of acme-wifi the scope was compiled from), frank's own delta goes
    (it was compiled with org:acme's merged facts, bob's wifi among them), but his bundle row stays,
    naming org:aaa: he is served org:aaa's motto (his whole row was dropped: he was served nothing).
    His `facts` rows stay, those of his own delta `scope_stale` naming org:acme, his org:aaa copy
    `ok`; his `users` row stays with facts_ok counting what is served (they were deleted). bob's rows
    are gone. The next night compiles frank again."""
    from versions.forget import forget_user

    def frank_facts(version):
        return query_stats(local_store, f"select fact_id, scope, status, detail from facts where version = {version} "
                                        "and user_id = 'frank' order by fact_id").to_pylist()

    night(spec, tmp_path, "1", forget_member_log() + [upsert(*FRANK_OWN, 0)])
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    node.poll()
    assert recalls(tiny, node.deltas_for("frank"), *MOTTO) and recalls(tiny, node.deltas_for("frank"), *FRANK_OWN[2:])

    forget_user(local_store, "bob", actor="test", reason="ticket 17")
    current, _ = read_current(local_store)
    assert current.scopes.stale == (SCOPE,)
    rows = member_rows(local_store, current)
    assert rows["frank"][0] == "org:aaa" and len(rows["frank"][1].row_ids) == 0  # kept, its own delta emptied
    assert node.poll().error is None
    frank = node.deltas_for("frank")
    assert len(frank) == 2 and recalls(tiny, frank, *MOTTO)  # org:aaa's delta, under an empty own delta
    assert not recalls(tiny, frank, *ZANZIBAR) and not recalls(tiny, frank, *FRANK_OWN[2:])
    answer = tiny.encode_answer(MOTTO[1])
    assert greedy_tokens(tiny, MOTTO[0], len(answer), list(frank)) == answer

    for version in (m.version for m in manifests(local_store)):  # CURRENT and the rewrite of v1 alike
        facts = frank_facts(version)
        assert [(r["fact_id"], r["scope"], r["status"]) for r in facts] == [
            ("acme-office", None, "scope_stale"), ("colour", None, "scope_stale"), ("motto", "org:aaa", "ok")], facts
        assert all('"org:acme"' in r["detail"] and "forget" in r["detail"] for r in facts[:2]), facts
        users = query_stats(local_store, f"select user_id, facts, facts_ok, rows from users where version = {version} "
                                         "and user_id in ('bob', 'frank')").to_pylist()
        assert users == [{"user_id": "frank", "facts": 3, "facts_ok": 1, "rows": 0}], users
        assert query_stats(local_store, f"select count(*) as n from facts where version = {version} "
                                        "and user_id = 'bob'").to_pylist() == [{"n": 0}]
    assert holding_words(local_store) == {}

    night(spec, tmp_path, "2", [upsert("erin", "car", "My car is", " red", 2)])
    current, _ = read_current(local_store)
    assert current.scopes.stale == ()
    node.poll()
    frank = node.deltas_for("frank")
    assert recalls(tiny, frank, *MOTTO) and recalls(tiny, frank, *FRANK_OWN[2:])
    assert recalls(tiny, frank, *SCOPE_FACTS["acme-office"])
    assert {r["status"] for r in frank_facts(current.version)} == {"ok"}


@pytest.mark.parametrize("step", ["write_objects", "write_manifest"])
def test_a_forget_beside_a_night_that_deletes_its_new_scope_objects_fails_it_with_one_line_and_publishes_nothing(
        spec, tmp_path, tiny, local_store, step):
    """engram forget of an id already forgotten (CURRENT does not move) runs while a night that
    recompiles org:acme publishes: the forget deletes every scope object no manifest names (they may
    hold a forgotten member's copies), the night's new ones among them. Before, the night failed on
    the bare missing object (write_objects) or, deleted after its size checks (write_manifest), made
    CURRENT a version missing its scope objects. Now it fails with one line naming the forget, CURRENT
    stays where it was with every object present, and the re-run publishes and serves the change."""
    from versions.errors import PublishConflict
    from versions.forget import forget_user

    night(spec, tmp_path, "1", forget_member_log())
    forget_user(local_store, "ghost", actor="test", reason="ticket 18")  # recorded: a second forget moves nothing
    before, _ = read_current(local_store)

    def forget_beside(at):
        if at == step:
            report = forget_user(local_store, "ghost", actor="test", reason="ticket 18, again")
            assert not report.rewritten and any(k.startswith("objects/scope") for k in report.deleted_objects)

    write_fact_log([upsert("alice", "acme-wifi", "The wifi password is", " Walrus", 2, SCOPE)],
                   tmp_path / "log" / "day=2" / "part-0.parquet")
    with pytest.raises(PublishConflict, match=r"^engram forget ran beside this night \(at .*objects/scope.*\); nothing "
                                              r"was published and nothing is lost. Run the night again"):
        run_nightly(spec, crash_hook=forget_beside)
    current, _ = read_current(local_store)
    assert current.version == before.version and all(local_store.head(k) is not None for k in current.object_keys())

    report = run_nightly(spec)
    assert report.published and report.compiled_scopes == 1
    current, _ = read_current(local_store)
    assert all(local_store.head(k) is not None for k in current.object_keys())
    node = PullClient(local_store, tiny, cache_dir=tmp_path / "cache")
    assert node.poll().error is None
    for user in ("alice", "dave", "frank"):
        assert recalls(tiny, node.deltas_for(user), "The wifi password is", " Walrus"), user
