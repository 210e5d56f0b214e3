"""Plan: compile what changed, carry what did not, drop who has nothing left."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.plan import FingerprintMismatch, plan, trigger_winners, user_fact_digest
from schemas import facts as F
from tests.fixtures.bad_inputs.corpus import T0


def state(*facts: tuple[str, str, str]) -> pa.Table:
    """A fact state from (user_id, fact_id, answer) triples."""
    rows = [
        {"user_id": u, "fact_id": f, "scope": u, "trigger": "t", "answer": a, "event_time": T0, "fact_hash": F.fact_hash(u, "t", a)}
        for u, f, a in facts
    ]
    return pa.Table.from_pylist(rows, schema=F.FACT_STATE_SCHEMA)


PRIOR = state(("alice", "pet", "Rex"), ("bob", "pet", "Max"), ("carol", "city", "Oslo"))


def incremental(prior, new, **kwargs):
    return plan(prior, new, prior_fingerprint="m1", fingerprint="m1", **kwargs)


def test_the_first_version_compiles_every_user():
    result = plan(None, PRIOR, prior_fingerprint=None, fingerprint="m1")
    assert (result.compile_users, result.carry_users, result.drop_users) == (["alice", "bob", "carol"], [], [])
    assert result.reason.startswith("first version")


def test_unchanged_users_are_carried_and_changed_users_compile():
    new = state(("alice", "pet", "Rex"), ("bob", "pet", "Fido"), ("carol", "city", "Oslo"), ("dave", "x", "y"))
    result = incremental(PRIOR, new)
    assert result.compile_users == ["bob", "dave"]
    assert result.carry_users == ["alice", "carol"]
    assert result.drop_users == []


def test_a_user_with_an_added_fact_compiles():
    result = incremental(PRIOR, state(("alice", "pet", "Rex"), ("alice", "city", "Rome"), ("bob", "pet", "Max"), ("carol", "city", "Oslo")))
    assert result.compile_users == ["alice"]


def test_users_with_no_facts_left_are_dropped():
    result = incremental(PRIOR, state(("alice", "pet", "Rex")))
    assert result.drop_users == ["bob", "carol"]
    assert result.carry_users == ["alice"]


def test_a_forgotten_user_is_never_carried_even_with_identical_facts():
    result = incremental(PRIOR, PRIOR, forgotten={"alice"})
    assert "alice" in result.compile_users and "alice" not in result.carry_users


def test_a_forgotten_user_unknown_to_the_state_is_still_dropped():
    result = incremental(PRIOR, PRIOR, forgotten={"zed"})
    assert result.drop_users == ["zed"]


def test_a_model_change_is_refused_with_the_way_out():
    with pytest.raises(FingerprintMismatch, match="model changed from m1 to m2.*--recompile-all"):
        plan(PRIOR, PRIOR, prior_fingerprint="m1", fingerprint="m2")


def test_recompile_all_compiles_every_live_user_across_a_model_change():
    result = plan(PRIOR, state(("alice", "pet", "Rex")), prior_fingerprint="m1", fingerprint="m2", recompile_all=True)
    assert (result.compile_users, result.carry_users, result.drop_users) == (["alice"], [], ["bob", "carol"])
    assert "m1 to m2" in result.reason


def test_the_digest_ignores_row_order_and_sees_any_answer_change():
    shuffled = PRIOR.take([2, 0, 1])
    assert user_fact_digest(shuffled) == user_fact_digest(PRIOR)
    changed = user_fact_digest(state(("alice", "pet", "Rexx")))
    assert changed["alice"] != user_fact_digest(PRIOR)["alice"]


def test_the_digest_of_an_empty_state_is_empty():
    assert user_fact_digest(F.empty_fact_state()) == {}


def test_a_trigger_stored_with_a_typographic_apostrophe_groups_with_the_typed_one_as_the_compiler_reads_them():
    """The compiler reads a stored trigger in today's canonical form (’ as '), so the night's
    change check must group the two facts as it does: the later written one is compiled."""
    winners = trigger_winners(["u", "u", "u"], ["old", "new", "other"],
                              ["My wife\u2019s phone number is", "My wife's phone number is", "My dog is"], [1, 2, 1])
    assert winners == {"u": ["new"]}
