"""The "memory ended" stop rule: a recalled answer ends after its last token, without the
backbone's run-on text after it (engram_core.serving.MemoryEnd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_core.compiler import Fact, compile_facts
from engram_core.delta import Delta
from engram_core.row_overlay import row_map_overlay
from engram_core.serving import (EOS, LENGTH, MEMORY_END, generate, generate_ended, greedy_tokens, memory_driven,
                                 overlay_for)
from serving.decode import Sampling, SequenceState, decode_batch

DENTIST = ("My dentist is", " Dr. Akeredolu")
CLINIC = ("Dr. Akeredolu", " of the Smile Clinic in Porto")  # its trigger is DENTIST's answer: a chain
PET = ("My cat is called", " Mittens")
HOME = ("I live in", " Lisbon")
# answers whose end is text another of the user's facts wrote (the 2-gram and 3-gram after them
# are written positions of the other fact): an answer that begins another's, a year that is in a
# date and a code, a name that is another's trigger
SPOUSE = ("My spouse is", " Saoirse Yilmaz")
EMERGENCY = ("My emergency contact is", " Saoirse Yilmaz, my spouse, at 404 177")
YEAR = ("My sister's birth year is", " 1979")
BIRTHDAY = ("My sister's birthday is", " 3 May 1979, in Porto")
GATE = ("The gate code is", " 197944#")
FRIEND = ("My best friend is", " Ana")
SISTER = ("My sister is", " Ana Costa")
FACTS = {"dana": [DENTIST, CLINIC, PET], "eli": [HOME, PET],
         "fay": [SPOUSE, EMERGENCY, YEAR, BIRTHDAY, GATE, FRIEND, SISTER]}
OVERLAPPING = [SPOUSE, YEAR, FRIEND]  # fay's facts whose end is another fact's written text
NO_TRIGGER = "The weather today is"


@pytest.fixture(scope="module")
def deltas(tiny):
    facts = [Fact(user, f"f{i}", t, a) for user, pairs in FACTS.items() for i, (t, a) in enumerate(pairs)]
    result = compile_facts(tiny, facts)
    assert all(r.status == "ok" for r in result.facts), result.facts
    return result.deltas


def _tokens(em, text: str) -> int:
    return len(em.encode_answer(text))


def test_compiled_facts_come_back_exactly_with_the_rule_and_run_on_without_it(tiny, deltas):
    pairs = [(user, t, a) for user in FACTS for t, a in FACTS[user]]
    prompts, per_prompt = [t for _, t, _ in pairs], [[deltas[u]] for u, _, _ in pairs]
    ended = generate_ended(tiny, prompts, per_prompt, max_new_tokens=40)
    assert ended == [(a, MEMORY_END) for _, _, a in pairs]
    assert generate(tiny, prompts, per_prompt, 40, stop_at_memory_end=True) == [a for _, _, a in pairs]
    run_on = generate(tiny, prompts, per_prompt, 40)  # the default: as before, to max_new_tokens
    assert all(text.startswith(a) and len(text) > len(a) for text, (_, _, a) in zip(run_on, pairs))
    assert generate_ended(tiny, prompts, per_prompt, 40, stop_at_memory_end=False) == [(t, LENGTH) for t in run_on]


def test_a_multi_token_answer_stops_after_its_last_token_not_before(tiny, deltas):
    trigger, answer = CLINIC
    n = _tokens(tiny, answer)
    assert n >= 5  # every answer position but the last is a written position the rule reads through
    want = tiny.encode_answer(answer)
    assert greedy_tokens(tiny, trigger, 24, [deltas["dana"]], stop_at_memory_end=True) == want
    assert greedy_tokens(tiny, trigger, 24, [deltas["dana"]])[:n] == want  # the default: exactly 24 tokens
    assert len(greedy_tokens(tiny, trigger, 24, [deltas["dana"]])) == 24


def test_an_answer_ends_where_its_fact_ends_though_another_fact_wrote_what_follows(tiny, deltas):
    """The position after each of these answers is one another of the user's facts wrote, at its
    2-gram and 3-gram ("Saoirse Yilmaz" then ", my spouse"; "1979" then ", in Porto" and "44#";
    " Ana" then " Costa"; DENTIST's answer is CLINIC's trigger): the answer ends there, as its
    fact does, not in the other fact's text (the 2-gram-and-3-gram test ran on into it)."""
    user, trigger, answer = "fay", *SPOUSE
    n = _tokens(tiny, answer)
    # the other fact wrote the position after the answer: without the rule it decodes that fact's text
    assert generate(tiny, [trigger], [[deltas[user]]], n + 6)[0].startswith(answer + ",")
    cases = [("fay", t, a) for t, a in OVERLAPPING] + [("dana", *DENTIST)]
    ended = generate_ended(tiny, [t for _, t, _ in cases], [[deltas[u]] for u, _, _ in cases], max_new_tokens=32)
    assert ended == [(a, MEMORY_END) for _, _, a in cases]
    # and each of the other facts still comes back whole from its own trigger
    others = [EMERGENCY, BIRTHDAY, GATE, SISTER]
    assert generate_ended(tiny, [t for t, _ in others], [[deltas["fay"]]] * len(others), 32) == [
        (a, MEMORY_END) for _, a in others]
    assert generate_ended(tiny, [CLINIC[0]], [[deltas["dana"]]], 32) == [(CLINIC[1], MEMORY_END)]


def test_a_prompt_that_is_no_trigger_decodes_unchanged(tiny, deltas):
    prompts = [NO_TRIGGER, DENTIST[0]]
    per_prompt = [[deltas["dana"]], [deltas["eli"]]]  # the dentist is dana's, not eli's
    assert generate(tiny, prompts, per_prompt, 16, stop_at_memory_end=True) == generate(tiny, prompts, per_prompt, 16)
    assert [reason for _, reason in generate_ended(tiny, prompts, per_prompt, 16)] == [LENGTH, LENGTH]
    assert generate(tiny, [NO_TRIGGER], None, 16, stop_at_memory_end=True) == generate(tiny, [NO_TRIGGER], None, 16)


def test_one_head_or_one_shared_2_gram_does_not_make_a_position_memory_driven(tiny):
    """A hash coincidence (one head addressing a row the user wrote) is no memory, nor a 2-gram
    that another of the user's facts wrote (the digits of two numbers): every head of the 2-gram
    and of the 3-gram must hit, as at every written position from a fact's third token on."""
    cfg, layer = tiny.config, tiny.config.target_layer
    assert cfg.max_ngram >= 3
    ids = torch.as_tensor([tiny.encode_prompt(NO_TRIGGER)])
    rows = tiny.memory.addresser.rows(ids.numpy(), layer)[0, -1]  # (H,) the last position's rows
    h = cfg.heads_per_order
    two_gram, three_gram = rows[:h], rows[h:2 * h]

    def driven(written: np.ndarray) -> bool:
        written = np.unique(written)
        delta = Delta(np.full(len(written), layer, np.int16), written, np.ones((len(written), cfg.row_width)))
        return bool(memory_driven(tiny, overlay_for(tiny, [[delta]]), ids)[0])

    assert driven(np.concatenate([two_gram, three_gram]))
    assert not driven(two_gram) and not driven(three_gram) and not driven(rows[h:])  # one order, or no 2-gram
    assert not driven(np.concatenate([two_gram, three_gram[:-1]]))  # one head short
    assert not bool(memory_driven(tiny, None, ids)[0])


@pytest.mark.parametrize("form", ["read", "add", "two-level add", "kernel"])
def test_every_overlay_form_says_which_rows_a_sequence_wrote(tiny, deltas, form, request):
    layer = tiny.config.target_layer
    table = tiny.memory.layer(layer).table
    entries = {layer: [(0, deltas["dana"].row_ids, deltas["dana"].values), (2, deltas["eli"].row_ids,
                                                                           deltas["eli"].values)]}
    limits = {"read": {}, "add": {"read_limit": 0}, "two-level add": {"read_limit": 0, "dense_limit": 1},
              "kernel": {}}[form]
    if form == "kernel":
        request.getfixturevalue("row_kernels")
    overlay = row_map_overlay(3, entries, {layer: table}, kernel=form == "kernel", **limits)
    assert type(overlay.maps[layer]).__name__ == {"read": "_ReadMap", "kernel": "_KernelMap"}.get(form, "_RowMap")
    rows = torch.as_tensor(np.stack([deltas["dana"].row_ids[:5], deltas["eli"].row_ids[:5],
                                     deltas["eli"].row_ids[:5]])).view(3, 1, 5)
    assert overlay.written(layer, rows).view(3, 5).tolist() == [[True] * 5, [False] * 5, [True] * 5]
    others = torch.as_tensor(np.setdiff1d(np.arange(1000), np.union1d(deltas["dana"].row_ids, deltas["eli"].row_ids)))
    assert not overlay.written(layer, others.view(1, 1, -1).expand(3, 1, -1)).any()  # rows no one wrote


def test_a_served_batch_stops_only_the_sequences_that_ask_and_streams_the_same_text(tiny, deltas):
    trigger, answer = CLINIC
    prompts = [tiny.encode_prompt(p) for p in (trigger, trigger, NO_TRIGGER, HOME[0])]
    asks = [True, False, True, True]
    served = [[deltas["dana"]], [deltas["dana"]], [deltas["dana"]], [deltas["eli"]]]

    def decode(stream: bool) -> list[SequenceState]:
        states = [SequenceState(Sampling(24, stream=stream, stop_at_memory_end=a)) for a in asks]
        sent = [""] * len(states)

        def on_step():
            for i, state in enumerate(states):
                sent[i] += state.text[len(sent[i]):state.sent]

        decode_batch(tiny, prompts, overlay_for(tiny, served), states, on_step)
        assert sent == [s.text for s in states]
        return states

    streamed, whole = decode(True), decode(False)
    assert [s.text for s in streamed] == [s.text for s in whole]
    assert [s.finish_reason for s in whole] == ["stop", "length", "length", "stop"]
    assert whole[0].text == answer and whole[3].text == HOME[1]
    assert whole[1].text.startswith(answer) and len(whole[1].token_ids) == 24
    assert whole[0].token_ids == tiny.encode_answer(answer)
    assert whole[2].text == generate(tiny, [NO_TRIGGER], [[deltas["dana"]]], 24)[0]


def test_an_answer_cut_by_max_new_tokens_before_its_end_says_length(tiny, deltas):
    first_two = tiny.tokenizer.decode(tiny.encode_answer(CLINIC[1])[:2])
    assert generate_ended(tiny, [CLINIC[0]], [[deltas["dana"]]], 2) == [(first_two, LENGTH)]


def test_a_hash_coincidence_at_a_higher_order_does_not_cut_an_answer_short(tiny, deltas):
    """On a small table another of the user's rows often sits where one more order's heads
    address (a coincidence, no memory): the position then reads one order deeper than its fact
    wrote. The next position of the same fact is one order deeper than the fact's own, not than
    the coincidence: the answer is not ended there."""
    from engram_core.serving import memory_depth

    cfg, layer = tiny.config, tiny.config.target_layer
    trigger, answer = PET
    answer_ids = tiny.encode_answer(answer)
    prompt = tiny.encode_prompt(trigger)
    # the first answer position whose depth leaves room for one more order and has two positions after it
    overlay = overlay_for(tiny, [[deltas["eli"]]])
    at = next(k for k in range(1, len(answer_ids) - 1)
              if int(memory_depth(tiny, overlay, torch.as_tensor([prompt + answer_ids[:k]]))[0]) < len(cfg.orders) - 1)
    ids = torch.as_tensor([prompt + answer_ids[:at]])
    depth = int(memory_depth(tiny, overlay, ids)[0])
    assert depth >= 2  # a written position of the fact
    h = cfg.heads_per_order
    extra = tiny.memory.addresser.rows(ids.numpy(), layer)[0, -1][depth * h:(depth + 1) * h]  # the next order's heads
    own = deltas["eli"]
    extra = np.setdiff1d(extra, own.row_ids[own.layers == layer])
    coincidence = Delta.from_unsorted(np.r_[own.layers, np.full(len(extra), layer, np.int16)], np.r_[own.row_ids, extra],
                                      np.r_[own.values, np.zeros((len(extra), own.width), np.float16)])  # adds nothing
    assert int(memory_depth(tiny, overlay_for(tiny, [[coincidence]]), ids)[0]) > depth
    assert generate_ended(tiny, [trigger], [[coincidence]], 24) == [(answer, MEMORY_END)]


@pytest.mark.parametrize("prompt_depth, depths, ends_at", [
    (1, [2, 3, 4, 5, 0], 5),  # a two-token trigger, a five-token answer
    (2, [2, 3, 4, 5, 0], 5),  # the same, its last position reading a 3-gram coincidence (it cut the answer at 1)
    (1, [3, 3, 4, 5, 0], 5),  # a 4-gram coincidence entering the answer (it cut the answer at 2)
    (2, [0], 1),  # a one-token answer after a three-token trigger still ends
    (4, [5, 6, 2], 3),  # after the answer another fact's 2-gram and 3-gram: ended there
    (1, [2, 3, 4, 5, 6, 7, 8], None),  # a long answer that goes on
])
def test_the_memory_end_rule_is_not_cut_short_by_a_coincidence_where_an_answer_begins(tiny, monkeypatch, prompt_depth,
                                                                                        depths, ends_at):
    """The rule's state, step by step, for depths as :func:`memory_depth` reads them (orders 2..9,
    the tiny model's): one order's hash coincidence at the prompt's last position or where an
    answer begins must not ask the next position for more than its fact wrote."""
    from engram_core import serving

    assert len(tiny.config.orders) == 8
    reads = iter([prompt_depth, *depths])
    monkeypatch.setattr(serving, "memory_depth", lambda *args, **kwargs: torch.tensor([next(reads)]))
    ids = torch.zeros(1, 4, dtype=torch.long)
    rule = serving.MemoryEnd(tiny, None, ids, None)
    ended_at = None
    for k in range(1, len(depths) + 1):
        ids = torch.cat([ids, torch.zeros(1, 1, dtype=torch.long)], dim=1)
        if bool(rule.step(ids)[0]) and ended_at is None:
            ended_at = k
    assert ended_at == ends_at
