"""Facts of one user whose written positions address the same rows: resolved, or reported by name."""

from __future__ import annotations

import numpy as np
import pytest

from engram_core.checkpoint import load_checkpoint
from engram_core.compiler import (
    STATUS_LOW_MARGIN, STATUS_OK, CompileOptions, Fact, compile_facts, status_counts,
)
from engram_core.config import EngramConfig
from engram_core.conflicts import conflict_status, plan_context
from engram_core.serving import greedy_tokens
from engram_core.tiny import init_tiny
from pipeline.collisions import fact_rows

YEARS = [Fact("u", "child-year", "My child's birth year is", " 2019"),
         Fact("u", "spouse-year", "My spouse's birth year is", " 1979"),
         Fact("u", "sister-year", "My sister's birth year is", " 1995"),
         Fact("u", "shoe", "My shoe size is", " 37"),
         Fact("u", "child-shoe", "My child's shoe size is", " 25")]


def _encoded(em, facts):
    seqs, targets = [], []
    for f in facts:
        t, a = em.encode_prompt(f.trigger), em.encode_answer(f.answer)
        seqs.append(t + a[:-1])
        targets.append(a)
    return seqs, targets


def test_positions_with_the_same_window_and_other_targets_get_context_where_the_histories_differ():
    canonical = np.arange(100)
    # two facts: ... 5 9 [7 8 3] -> 40 vs ... 6 9 [7 8 3] -> 41 (the last 4 tokens equal)
    a, b = [1, 5, 9, 7, 8, 3], [2, 6, 9, 7, 8, 3]
    plan = plan_context([a, b], [[40], [41]], np.zeros(2, np.int64), canonical, order=3, pad_id=100)
    assert plan.conflicting_positions == 2 and not plan.impossible
    # the first difference is 5 vs 6 (index 1): context at positions 1..3, whose 3-grams include it
    assert plan.context == {0: (1, 2, 3), 1: (1, 2, 3)}
    # other owners never conflict; the same target never conflicts
    assert plan_context([a, b], [[40], [41]], np.arange(2), canonical, 3, 100).context == {}
    assert plan_context([a, b], [[40], [40]], np.zeros(2, np.int64), canonical, 3, 100).context == {}


def test_a_repeated_window_inside_one_answer_gets_context_and_a_shorter_history_counts_as_a_difference():
    canonical = np.arange(100)
    # one answer "in 20 04 , in 20 15": the window (in, 20) repeats with other next tokens
    seq = [50, 60, 20, 4, 70, 60, 20]
    plan = plan_context([seq], [[60, 20, 4, 70, 60, 20, 15]], np.zeros(1, np.int64), canonical, order=2, pad_id=100)
    assert plan.context and not plan.impossible
    # a trigger that is a suffix of another's: the pad before it is the difference
    plan = plan_context([[7, 8], [5, 7, 8]], [[1], [2]], np.zeros(2, np.int64), canonical, order=2, pad_id=100)
    assert plan.context == {0: (0,), 1: (0, 1)}


def test_identical_triggers_with_other_answers_are_impossible_and_the_first_fact_is_kept():
    canonical = np.arange(100)
    seqs = [[1, 2, 3], [1, 2, 3], [1, 2, 3]]
    plan = plan_context(seqs, [[9], [8], [9]], np.zeros(3, np.int64), canonical, 3, 100, ["b", "a", "c"])
    # "a" (the first fact id) is kept; "b" and "c" answer otherwise and name it
    assert plan.impossible == {0: 1, 2: 1} and plan.context == {}


def test_identical_triggers_whose_answers_share_their_first_tokens_are_impossible_too():
    """One answer a prefix of the other (no written position holds another target: the shorter
    has no trained end) is still one trigger with two answers; a third fact with the kept answer
    stays, even where a window conflict with a dropped one had named it."""
    canonical = np.arange(100)
    seqs = [[1, 2, 3, 9], [1, 2, 3], [1, 2, 3], [1, 2, 3]]  # trigger [1, 2, 3]: answers [9, 7], [9], [8], [9]
    plan = plan_context(seqs, [[9, 7], [9], [8], [9]], np.zeros(4, np.int64), canonical, 3, 100, ["b", "a", "c", "d"])
    assert plan.impossible == {0: 1, 2: 1}
    other_user = plan_context(seqs[:2], [[9, 7], [9]], np.arange(2), canonical, 3, 100)
    assert other_user.impossible == {}


def test_a_fact_entered_again_with_an_answer_that_is_a_prefix_of_the_old_one_is_served(tiny):
    """"My dog's name is" -> " Tejo Segundo" (pet), then -> " Tejo" (pet_new, written later): the
    newer answer is served and the older fact is CONFLICTS_WITH it; and the reverse."""
    old_at, new_at = 1_700_000_000_000_000, 1_760_000_000_000_000
    for old, new in ((" Tejo Segundo", " Tejo"), (" Tejo", " Tejo Segundo")):
        facts = [Fact("u", "pet", "My dog's name is", old, old_at), Fact("u", "pet_new", "My dog's name is", new, new_at),
                 Fact("u", "dentist", "My dentist is", " Dr. Okafor")]
        result = compile_facts(tiny, facts)
        status = {r.fact_id: r for r in result.facts}
        assert status["pet"].status == conflict_status("pet_new"), status["pet"]
        assert status["pet_new"].status == STATUS_OK and status["dentist"].status == STATUS_OK
        want, old_ids = tiny.encode_answer(new), tiny.encode_answer(old)
        got = greedy_tokens(tiny, "My dog's name is", len(want) + 1, [result.deltas["u"]])
        assert got[:len(want)] == want, (old, new)
        if len(old_ids) > len(want):  # the old answer's next token is not served after the new one
            assert got[len(want)] != old_ids[len(want)], (old, new)


def test_the_compiler_reports_an_impossible_pair_naming_the_other_fact(tiny):
    facts = [Fact("u", "dentist-b", "My dentist is", " Dr. Okafor"), Fact("u", "dentist-a", "My dentist is", " Dr. Nguyen"),
             Fact("u", "dog", "My dog is called", " Rex")]
    result = compile_facts(tiny, facts)
    status = {r.fact_id: r for r in result.facts}
    assert status["dentist-b"].status == conflict_status("dentist-a") == "CONFLICTS_WITH:dentist-a"
    assert "dentist-a" in status["dentist-b"].detail
    assert status["dentist-a"].status == STATUS_OK and status["dog"].status == STATUS_OK
    assert status_counts(result.facts) == {"CONFLICTS_WITH": 1, "ok": 2}
    want = tiny.encode_answer(" Dr. Nguyen")
    assert greedy_tokens(tiny, "My dentist is", len(want), [result.deltas["u"]]) == want


def test_of_two_facts_no_row_can_tell_apart_the_later_written_is_compiled(tiny):
    """A user enters a fact again under a new fact_id ("dentist-2026", Nguyen, written after
    "dentist-2019", Okafor): the newer answer is served, whatever the fact ids' order."""
    old_at, new_at = 1_700_000_000_000_000, 1_760_000_000_000_000
    for old_id, new_id in (("dentist-2019", "dentist-2026"), ("z-dentist", "a-dentist")):
        facts = [Fact("u", old_id, "My dentist is", " Dr. Okafor", old_at), Fact("u", new_id, "My dentist is", " Dr. Nguyen", new_at)]
        result = compile_facts(tiny, facts)
        status = {r.fact_id: r for r in result.facts}
        assert status[new_id].status == STATUS_OK
        assert status[old_id].status == conflict_status(new_id)
        assert f"{new_id!r}, written later, is compiled" in status[old_id].detail
        want = tiny.encode_answer(" Dr. Nguyen")
        assert greedy_tokens(tiny, "My dentist is", len(want), [result.deltas["u"]]) == want, (old_id, new_id)


def test_answers_sharing_a_prefix_and_digits_shared_between_facts_are_all_recalled(tiny):
    facts = YEARS + [Fact("u", "dentist", "My dentist is", " Dr. Okafor"), Fact("u", "doctor", "My doctor is", " Dr. Nguyen"),
                     Fact("u", "days", "I work on", " Monday, Tuesday, Wednesday, Thursday and Friday"),
                     Fact("u", "history", "My surgical history is", " knee surgery in 2004 and wrist surgery in 2015")]
    result = compile_facts(tiny, facts)
    assert result.ok == len(facts), [r for r in result.facts if r.status != STATUS_OK]
    for f in facts:
        want = tiny.encode_answer(f.answer)
        assert greedy_tokens(tiny, f.trigger, len(want), [result.deltas["u"]]) == want, f


@pytest.fixture(scope="module")
def trigram_tiny(tmp_path_factory):
    """A tiny checkpoint with the paper's orders 2..3 (the tiny default before issue 17)."""
    path = tmp_path_factory.mktemp("tiny-trigram") / "model"
    init_tiny(path, engram=EngramConfig(layers=(1, 3), slots_per_head=1009))
    return load_checkpoint(path)


def test_on_a_trigram_model_context_rows_resolve_triggers_that_end_alike(trigram_tiny):
    """With orders 2..3, "My child's birth year is" and "My spouse's birth year is" end in the
    same window: the compiler trains the rows where their histories differ as context."""
    em = trigram_tiny
    seqs, targets = _encoded(em, YEARS)
    plan = plan_context(seqs, targets, np.zeros(len(YEARS), np.int64), em.memory.addresser.canonical_ids, 3,
                        em.memory.addresser.pad_id)
    assert plan.conflicting_positions and set(plan.context) == set(range(len(YEARS)))
    result = compile_facts(em, YEARS)
    assert {r.status for r in result.facts} <= {STATUS_OK, STATUS_LOW_MARGIN}
    for f in YEARS:
        want = em.encode_answer(f.answer)
        assert greedy_tokens(em, f.trigger, len(want), [result.deltas["u"]]) == want, f
    rows = fact_rows(em, YEARS)["u"]
    delta_keys = set((int(layer) << 40) | int(row) for layer, row in zip(result.deltas["u"].layers, result.deltas["u"].row_ids))
    assert set(np.concatenate(list(rows.values())).tolist()) == delta_keys  # the stats see the context rows too


def test_a_fact_greedy_decoding_recalls_below_the_margin_is_counted_apart(tiny):
    facts = [Fact("u", "dog", "My dog is called", " Rex"), Fact("u", "cat", "My cat is called", " Luna")]
    result = compile_facts(tiny, facts, CompileOptions(min_margin=1e4, max_rounds=1))
    assert {r.status for r in result.facts} == {STATUS_LOW_MARGIN}
    assert result.low_margin == 2 and result.ok == 0
    assert all("recalled by greedy decoding" in r.detail and r.margin > 0 for r in result.facts)
    for f in facts:
        want = tiny.encode_answer(f.answer)
        assert greedy_tokens(tiny, f.trigger, len(want), [result.deltas["u"]]) == want


PHONES = [Fact("u", "phone", "My phone number is", " +44 540 536 935"),
          Fact("u", "work-phone", "My work phone number is", " +44 113 496 071")]


def _chat_prefill(em, message: str, trigger: str) -> str:
    """A chat whose assistant turn is pre-filled with ``trigger`` (README: "Where the memory answers in a chat")."""
    return em.tokenizer.apply_chat_template([{"role": "user", "content": message}, {"role": "assistant", "content": trigger}],
                                            tokenize=False, continue_final_message=True)


def _missed(em, result, facts, prompt_of) -> list[str]:
    return [f.fact_id for f in facts
            if greedy_tokens(em, prompt_of(f.trigger), len(em.encode_answer(f.answer)), [result.deltas[f.user_id]])
            != em.encode_answer(f.answer)]


def test_facts_in_conflict_are_also_trained_after_a_chats_opening_and_recalled_there(tiny):
    """Facts told apart by context rows get a copy after the chat template's assistant prefill
    (CompileOptions.context_copies): recalled there as at the start of a sequence; without the
    copies some are not. The copies are trained, not reported."""
    facts = YEARS + PHONES
    on = compile_facts(tiny, facts)
    off = compile_facts(tiny, facts, CompileOptions(context_copies=False))
    assert sorted(r.fact_id for r in on.facts) == sorted(f.fact_id for f in facts)  # one result per fact
    assert {r.status for r in on.facts} == {STATUS_OK} and not any(r.detail for r in on.facts)
    assert _missed(tiny, on, facts, lambda t: t) == _missed(tiny, off, facts, lambda t: t) == []
    in_chat = lambda t: _chat_prefill(tiny, "Hello.", t)  # noqa: E731 (the copies' own opening)
    assert _missed(tiny, on, facts, in_chat) == []
    assert _missed(tiny, off, facts, in_chat), "this case should need the copies"
    # Another opening than the copies' own: fewer missed than without copies.
    elsewhere = lambda t: _chat_prefill(tiny, "Tell me something about me.", t)  # noqa: E731
    assert len(_missed(tiny, on, facts, elsewhere)) < len(_missed(tiny, off, facts, elsewhere))


def test_the_context_copies_text_is_the_chat_templates_assistant_prefill_or_given_or_plain():
    import types

    from engram_core.compiler import FALLBACK_CONTEXT_TEXT, context_text

    with_template = types.SimpleNamespace(tokenizer=types.SimpleNamespace(
        chat_template="{% for m in messages %}{{ m.role }}: {{ m.content }}{% endfor %}",
        apply_chat_template=lambda messages, **kw: "".join(f"{m['role']}: {m['content']}" for m in messages)))
    assert context_text(with_template, CompileOptions()) == "user: Hello.assistant: "
    without = types.SimpleNamespace(tokenizer=types.SimpleNamespace(chat_template=None))
    assert context_text(without, CompileOptions()) == FALLBACK_CONTEXT_TEXT == "Here is what I remember:\n"
    assert context_text(without, CompileOptions(context_text="Note: ")) == "Note: "
    with pytest.raises(ValueError, match="context_text"):
        context_text(without, CompileOptions(context_text="  "))


def test_a_context_copy_is_the_trigger_tokenized_after_the_chat_prefill_as_the_server_reads_it(tiny):
    """The copy's ids are those of the rendered chat the server would read (no special tokens
    added), and only the rows of the fact's own text are trained in it."""
    from engram_core.compiler import _add_context_copies, _context, _validate, context_text

    assert context_text(tiny, CompileOptions()) == "user: Hello.\nassistant: "
    fact = YEARS[3]  # "My shoe size is"
    (seq, _), = _validate(tiny, [fact], CompileOptions())
    seq.user, seq.in_conflict, seq.context = 0, True, (0, 1)
    by_user = {"u": [seq]}
    _add_context_copies(tiny, by_user, _context(tiny, CompileOptions()))
    original, copy = by_user["u"]
    served = tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello."}, {"role": "assistant", "content": fact.trigger}],
        tokenize=True, return_dict=False, continue_final_message=True)
    trigger_length = len(original.input_ids) - len(original.targets) + 1
    assert copy.copy and not original.copy
    assert copy.input_ids[:len(copy.input_ids) - len(copy.targets) + 1] == list(served)
    assert copy.input_ids[len(served):] == original.input_ids[trigger_length:]  # the answer's tokens
    shift = len(served) - trigger_length
    assert copy.text_offset == shift + tiny.prompt_lead and copy.context == (shift, shift + 1)
    # A one-token trigger gets no copy (no row of its own text to train after the prefill).
    (short, _), = _validate(tiny, [Fact("u", "my", "My", " dog")], CompileOptions())
    short.user, short.in_conflict = 0, True
    by_user = {"u": [short]}
    _add_context_copies(tiny, by_user, _context(tiny, CompileOptions()))
    assert len(tiny.encode_prompt("My")) - tiny.prompt_lead == 1 and by_user["u"] == [short]
