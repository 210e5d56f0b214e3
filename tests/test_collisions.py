"""Collisions: rows written by more than one owner (facts of a user, a scope and its members, users)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_core.compiler import STATUS_OK, CompileOptions, Fact
from engram_core.delta import Delta
from engram_core.serving import greedy_tokens
from pipeline.collisions import (
    collision_table,
    compile_with_scope,
    cross_user_collisions,
    cross_user_collisions_arrays,
    fact_rows,
    row_keys,
    user_overlaps,
    within_user_collision_table,
)
from schemas.stats import COLLISIONS_STATS_SCHEMA


def _delta(layers, rows, width=4) -> Delta:
    return Delta.from_unsorted(np.asarray(layers, np.int16), np.asarray(rows, np.int64), np.zeros((len(rows), width)))


def _assert_valid_partition(deltas: dict[str, Delta], groups: list[list[str]]) -> None:
    members = [u for g in groups for u in g]
    assert sorted(members) == sorted(deltas) and len(members) == len(set(members))  # cover, once each
    for group in groups:
        seen: set[tuple[int, int]] = set()
        for user in group:
            rows = deltas[user].row_keys()
            assert not rows & seen, (group, user)
            seen |= rows


# ---------------------------------------------------------------- (c) across users


def test_co_batch_groups_are_pairwise_disjoint_and_cover_every_user():
    rng = np.random.default_rng(0)
    deltas = {}
    for i in range(300):
        common = [7, 8, 9] if i % 3 == 0 else []  # a popular trigger: identical rows for a third of users
        rows = np.unique(np.concatenate([rng.choice(2000, 12, replace=False), common]))
        deltas[f"user-{i:03d}"] = _delta(rng.integers(0, 2, len(rows)) * 0 + (i % 2), rows)
    report = cross_user_collisions(deltas)
    _assert_valid_partition(deltas, report.groups)
    assert report.min_groups >= 50  # rows 7..9 of layer 0 are shared by 50 users (i % 6 == 0)
    assert len(report.groups) >= report.min_groups


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(
    st.text(alphabet="abcdef", min_size=1, max_size=4),
    st.sets(st.tuples(st.integers(0, 1), st.integers(0, 15)), max_size=8),
    max_size=25,
))
def test_co_batch_groups_are_a_valid_partition_for_any_shard(rows_by_user):
    deltas = {u: _delta([l for l, _ in sorted(r)], [x for _, x in sorted(r)]) for u, r in rows_by_user.items()}
    report = cross_user_collisions(deltas)
    _assert_valid_partition(deltas, report.groups)
    counts: dict[tuple[int, int], int] = {}
    for d in deltas.values():
        for key in d.row_keys():
            counts[key] = counts.get(key, 0) + 1
    shared = {k: c for k, c in counts.items() if c > 1}
    assert report.shared_rows == len(shared)
    assert report.pairs == sum(c * (c - 1) // 2 for c in shared.values())
    assert report.min_groups == max(counts.values(), default=0)


def test_hot_rows_name_the_most_shared_rows_and_their_owner_counts():
    deltas = {"a": _delta([0, 0], [1, 2]), "b": _delta([0, 0], [1, 3]), "c": _delta([0, 1], [1, 2]),
              "d": _delta([0], [9])}
    report = cross_user_collisions(deltas)
    hot = report.hot_rows.to_pylist()
    assert hot[0] == {"layer": 0, "row_id": 1, "owners": 3, "owner_kind": "users", "example_owners": ["a", "b", "c"]}
    assert len(hot) == 1  # (1, 2) belongs to c only; (0, 2) to a only
    assert report.conflicted_users == 3 and report.groups[0][0] in "abcd"
    table = collision_table([report, report], top=1)
    assert table.schema.equals(COLLISIONS_STATS_SCHEMA) and table.num_rows == 1


def test_arrays_form_matches_the_delta_form():
    deltas = {"u1": _delta([0, 0], [1, 5]), "u2": _delta([0], [5]), "u3": _delta([], [])}
    users = sorted(deltas)
    keys = np.concatenate([row_keys(deltas[u].layers, deltas[u].row_ids) for u in users])
    a = cross_user_collisions(deltas)
    b = cross_user_collisions_arrays(users, [deltas[u].num_rows for u in users], keys)
    assert a.summary() == b.summary() and a.groups == b.groups
    with pytest.raises(ValueError, match="row keys"):
        cross_user_collisions_arrays(users, [2, 2, 2], keys)


def test_an_empty_shard_has_no_groups():
    report = cross_user_collisions({})
    assert report.groups == [] and report.hot_rows.num_rows == 0 and report.pairs == 0


# ---------------------------------------------------------------- (a) inside one user


def test_user_overlaps_reports_delta_rows_and_rows_shared_by_facts_when_given():
    deltas = {"u1": _delta([0, 0, 0], [1, 2, 3]), "u2": _delta([0], [4])}
    per_fact = {"u1": {"f1": row_keys([0, 0], [1, 2]), "f2": row_keys([0, 0], [2, 3])}}
    table = user_overlaps(deltas, per_fact)
    assert table.to_pylist() == [
        {"user_id": "u1", "rows": 3, "facts": 2, "shared_rows": 1},
        {"user_id": "u2", "rows": 1, "facts": None, "shared_rows": None},
    ]
    rows = within_user_collision_table(per_fact).to_pylist()
    assert rows == [{"layer": 0, "row_id": 2, "owners": 2, "owner_kind": "facts", "example_owners": ["u1/f1", "u1/f2"]}]


def test_fact_rows_are_the_rows_the_compiler_writes(tiny):
    facts = [Fact("u1", "f1", "My dentist is called", " Rossi"), Fact("u1", "f2", "My doctor is called", " Patel")]
    from engram_core.compiler import compile_facts

    delta = compile_facts(tiny, facts).deltas["u1"]
    per_fact = fact_rows(tiny, facts)["u1"]
    union = np.unique(np.concatenate(list(per_fact.values())))
    assert np.array_equal(union, row_keys(delta.layers, delta.row_ids))


def test_fact_rows_read_long_triggers_that_end_alike_whole_as_the_compiler_does(tiny):
    """Two long triggers with the same last 64 tokens are compiled whole
    (engram_core.conflicts.trigger_cuts); the collision stats read them so too, and list both."""
    from engram_core.compiler import compile_facts
    from tests.test_compiler import _SHARED_TAIL

    facts = [Fact("u1", "leeds", "For the house in Leeds: " + _SHARED_TAIL, " 1397"),
             Fact("u1", "porto", "For the flat in Porto: " + _SHARED_TAIL, " 4682")]
    delta = compile_facts(tiny, facts).deltas["u1"]
    per_fact = fact_rows(tiny, facts)["u1"]
    assert sorted(per_fact) == ["leeds", "porto"]
    union = np.unique(np.concatenate(list(per_fact.values())))
    assert np.array_equal(union, row_keys(delta.layers, delta.row_ids))


# ---------------------------------------------------------------- (b) user + shared scope


SCOPE_FACTS = [Fact("org:acme", "office", "Our office is in", " Lisbon"),
               Fact("org:acme", "wifi", "The wifi password is", " Pepper")]
MEMBER_FACTS = {
    "alice": [Fact("alice", "dog", "My dog's name is", " Rex"), Fact("alice", "gym", "My gym is on", " Hanoi Road")],
    "bob": [Fact("bob", "dentist", "My dentist is called", " Nakamura"), Fact("bob", "city", "I live in", " Osaka")],
    "carol": [Fact("carol", "manager", "My manager is", " Mensah"),
              Fact("carol", "office", "Our office is in", " Porto")],  # the same trigger as a scope fact
}


def test_scope_plus_user_composition_recalls_both(tiny):
    scope_delta, user_deltas, result = compile_with_scope(tiny, SCOPE_FACTS, MEMBER_FACTS, CompileOptions())
    assert scope_delta.num_rows > 0 and sorted(user_deltas) == ["alice", "bob", "carol"]
    statuses = {(r.user_id, r.fact_id): r.status for r in result.results}
    for user, facts in MEMBER_FACTS.items():
        for fact in facts:
            want = tiny.encode_answer(fact.answer)
            got = greedy_tokens(tiny, fact.trigger, len(want), [scope_delta, user_deltas[user]])
            assert got == want and statuses[(user, fact.fact_id)] == STATUS_OK, (user, fact)
        for fact in SCOPE_FACTS:
            if user == "carol" and fact.fact_id == "office":
                continue  # carol's own fact overrides the scope's on the same trigger
            want = tiny.encode_answer(fact.answer)
            got = greedy_tokens(tiny, fact.trigger, len(want), [scope_delta, user_deltas[user]])
            assert got == want, (user, fact, tiny.tokenizer.decode(got))
    assert result.collisions.schema.equals(COLLISIONS_STATS_SCHEMA)
    assert "carol" in {o for row in result.collisions.to_pylist() for o in row["example_owners"]}
