"""CompileOptions.dedupe_prefixes: each distinct prefix (and lower-layer input) computed once per
batch, shared by the users whose triggers are the same text."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from engram_core import fast_step
from engram_core.checkpoint import load_checkpoint
from engram_core.compiler import CompileOptions, Fact, _cached_kv, _distinct_rows, compile_facts
from engram_core.layer import Overlay, backbone_and_layers

from .test_compiler import TEMPLATES, one_batch, user_facts

FAMILIES = ["llama", "qwen2", "gpt2"]


def distinct_triggers(em, num_users=6, per_user=4):
    """Facts whose triggers all start with another word (no two sequences share a prefix)."""
    words = sorted({w.strip() for w in em.tokenizer.batch_decode([[i] for i in range(len(em.tokenizer))])
                    if w.startswith(" ") and w.strip().isalpha() and len(w.strip()) > 3})
    assert len(words) >= num_users * per_user * 2
    facts = []
    for k in range(num_users * per_user):
        trigger = f"{words[2 * k].capitalize()} {words[2 * k + 1]} is"
        facts.append(Fact(f"user-{k // per_user}", f"fact-{k % per_user}", trigger, " " + words[-1 - k]))
    return facts


def prefix_rows(em, run) -> list[int]:
    """Sequences per prefix forward during ``run()`` (the backbone building a KV cache from none)."""
    from engram_core.hf_compat import called_with_cache

    backbone, _ = backbone_and_layers(em.model)
    seen = []

    def hook(module, args, kwargs):
        if kwargs.get("use_cache") and called_with_cache(kwargs) is None and kwargs.get("input_ids") is not None:
            seen.append(kwargs["input_ids"].shape[0])

    handle = backbone.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def same_deltas(a, b) -> bool:
    return a.deltas.keys() == b.deltas.keys() and all(a.deltas[u].equals(b.deltas[u]) for u in a.deltas)


@pytest.mark.parametrize("family", FAMILIES)
def test_with_no_shared_prefix_the_dedupe_changes_nothing_bit_for_bit(family, tiny_checkpoints):
    """Random triggers: every sequence's prefix is its own, so the switch is a no-op (same
    deltas and results, bit for bit)."""
    em = load_checkpoint(tiny_checkpoints(family))
    facts = distinct_triggers(em)
    batch = one_batch(em, facts, reuse_lower=True)
    assert all(_distinct_rows(g.ids[:, :g.prefix], g.mask[:, :g.prefix], None) is None for g in batch.groups if g.prefix)
    off = compile_facts(em, facts, CompileOptions(facts_per_batch=64, dedupe_prefixes=False))
    on = compile_facts(em, facts, CompileOptions(facts_per_batch=64, dedupe_prefixes=True))
    assert on.ok == off.ok == len(facts)
    assert same_deltas(on, off)
    assert repr(on.facts) == repr(off.facts)


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_triggers_are_computed_once_and_recall_what_the_per_fact_path_recalls(family, tiny_checkpoints):
    """Templated triggers (every user on the same 10 trigger texts, multi-token answers): the
    prefix forward runs once per distinct prefix, not once per fact; the deltas write the same
    rows, recall every fact with the same statuses, are deterministic, and differ from the
    per-fact path's only by float rounding (module docstring of CompileOptions.dedupe_prefixes:
    no dedupe can be bit-identical to the per-fact forward)."""
    em = load_checkpoint(tiny_checkpoints(family))
    facts = user_facts(num_users=8)
    options = CompileOptions(facts_per_batch=200, max_rounds=1)
    results = {}
    calls = {}
    for dedupe in (False, True):
        def run(dedupe=dedupe):
            results[dedupe] = compile_facts(em, facts, replace(options, dedupe_prefixes=dedupe))
        calls[dedupe] = prefix_rows(em, run)
    off, on = results[False], results[True]
    assert sum(calls[True]) < sum(calls[False]) / 4, calls  # 8 users share each prefix (but a few early hits)
    assert on.ok == off.ok == len(facts)
    assert [(r.user_id, r.fact_id, r.status, r.rows) for r in on.facts] == \
           [(r.user_id, r.fact_id, r.status, r.rows) for r in off.facts]
    again = compile_facts(em, facts, replace(options, dedupe_prefixes=True))
    assert same_deltas(on, again)
    for user, delta in off.deltas.items():
        other = on.deltas[user]
        assert np.array_equal(delta.row_ids, other.row_ids)
        a, b = delta.values.astype(np.float32), other.values.astype(np.float32)
        assert np.abs(a - b).max() <= 0.02 * np.abs(a).max(), user  # rounding, not another solution


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_shared_prefix_states_equal_the_per_fact_states_and_identical_inputs_get_identical_bits(family, tiny_checkpoints):
    """The KV cache and the hidden states entering the write layer, computed once per distinct
    prefix and gathered back, equal the per-fact ones up to float32 rounding; sequences with the
    same input get the same bits (the per-fact forward does not promise that)."""
    em = load_checkpoint(tiny_checkpoints(family), attn_implementation="eager")
    facts = user_facts(num_users=6)
    step = fast_step.UpperStep(em)
    per_fact = one_batch(em, facts, reuse_lower=True, prefix_attention=True, step=step)
    shared = one_batch(em, facts, reuse_lower=True, prefix_attention=True, step=step, dedupe=True)
    write = em.config.target_layer
    partial = 0
    for a, b in zip(per_fact.groups, shared.groups):
        assert a.prefix == b.prefix and torch.equal(a.members, b.members)
        if b.lower_rows is not None:  # below the write layer: one row per distinct prefix (never read by steps)
            partial += 1
            assert len(_cached_kv(b.cache, 0)[0]) == int(b.lower_rows.max()) + 1 < len(b.members)
            assert len(_cached_kv(b.cache, write)[0]) == len(b.members)
        torch.testing.assert_close(b.lower, a.lower, rtol=1e-5, atol=1e-6)
        kinds = _distinct_rows(b.ids, b.mask, None)
        if kinds is not None:
            pick, inverse = kinds
            assert torch.equal(b.lower, b.lower[pick][inverse])
    assert partial  # the usual group shares its prefix
    values = per_fact.initial_values(20.0)
    assert torch.equal(values, shared.initial_values(20.0))  # the start does not read the prefix
    ok_a, loss_a, _ = per_fact.check(values, 0.1)
    ok_b, loss_b, _ = shared.check(values, 0.1)  # from the write layer up: the partial caches
    assert np.array_equal(ok_a, ok_b)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-4, atol=1e-5)
    overlay = per_fact._overlay(values)
    for a, b in zip(per_fact.groups, shared.groups):
        # a forward from the first layer (the forms' check, or no lower states) gathers the rest
        torch.testing.assert_close(b.logits(overlay, full=True), a.logits(overlay, full=True), rtol=1e-4, atol=1e-4)
        assert b.lower_rows is None
        if a.cache is not None:
            for layer in range(em.model.config.num_hidden_layers):
                for x, y in zip(_cached_kv(a.cache, layer), _cached_kv(b.cache, layer)):
                    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6)


def test_rows_are_shared_only_between_the_same_tokens_and_the_same_fixed_owner():
    """Same tokens at the same valid positions share; a padded position never matches a real
    token (even one with the pad's id); users holding fixed (base) rows share only with their
    own sequences."""
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [0, 5, 6], [7, 5, 6], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 1]])
    pick, inverse = _distinct_rows(ids, mask, None)
    assert inverse[0] == inverse[1] == inverse[4] != inverse[2] != inverse[3]
    assert torch.equal(ids[pick][inverse], ids) and torch.equal(mask[pick][inverse], mask)
    owners = torch.tensor([[-1], [3], [-1], [-1], [-1]])  # sequence 1's user holds fixed rows
    overlay = Overlay(owners, {}, {})
    _, inverse = _distinct_rows(ids, mask, overlay)
    assert inverse[0] == inverse[4] != inverse[1]
    assert _distinct_rows(ids[2:4], mask[2:4], None) is None


def test_users_with_a_base_delta_compile_the_same_with_the_dedupe(tiny):
    """Base deltas (a shared scope): the prefix sees the fixed rows, so sequences are shared
    only within one such user; statuses and rows are those of the per-fact path."""
    scope_facts = [Fact("org", f"org-{k}", trigger, " " + answers[0]) for k, (trigger, answers) in enumerate(TEMPLATES[:3])]
    scope = compile_facts(tiny, scope_facts).deltas["org"]
    facts = user_facts(num_users=4)
    base = {f"user-{u:02d}": scope for u in range(0, 4, 2)}  # half of the users are members
    off = compile_facts(tiny, facts, CompileOptions(dedupe_prefixes=False), base_deltas=base)
    on = compile_facts(tiny, facts, CompileOptions(dedupe_prefixes=True), base_deltas=base)
    assert on.ok == off.ok == len(facts)
    assert [(r.fact_id, r.status, r.rows) for r in on.facts] == [(r.fact_id, r.status, r.rows) for r in off.facts]
    for user in off.deltas:
        assert np.array_equal(on.deltas[user].row_ids, off.deltas[user].row_ids)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_steps_that_read_a_shared_prefix_in_place_give_the_bits_of_the_gathered_prefix(family, tiny_checkpoints,
                                                                                    monkeypatch):
    """Where the compiled step's attention kernel runs (CUDA), the members of a shared prefix
    read one copy of its keys and values (``GroupInputs.prefix_index``) instead of a gathered
    row each, and verification's forward gathers the rows it reads. Forced here on the CPU,
    where the uncompiled step gathers the same values on every call: the deltas and results are
    those of the prefix gathered once, bit for bit, and the steps did read shared rows."""
    em = load_checkpoint(tiny_checkpoints(family), attn_implementation="eager")
    facts = user_facts(num_users=6)
    options = CompileOptions(facts_per_batch=200, max_rounds=2)
    want = compile_facts(em, facts, options)
    seen = []
    real = fast_step.UpperStep.backward

    def backward(self, g, values, targets):
        if g.prefix[0] is not None:
            seen.append((g.prefix_index is not None, len(g.prefix[0][0]), len(g.lower)))
        return real(self, g, values, targets)

    monkeypatch.setattr(fast_step.UpperStep, "reads_shared_prefix", lambda self, like: True)
    monkeypatch.setattr(fast_step.UpperStep, "backward", backward)
    got = compile_facts(em, facts, options)
    assert got.ok == want.ok == len(facts)
    assert same_deltas(got, want) and repr(got.facts) == repr(want.facts)
    assert any(shared and rows < members for shared, rows, members in seen)  # one row per distinct prefix
    assert all(shared for shared, rows, members in seen if rows < members)  # one row per distinct prefix, never read as if per member


def test_a_groups_head_keeps_the_shared_prefix_and_is_the_step_on_its_first_members(tiny, monkeypatch):
    """``GroupInputs.head(k)`` (the sample the compiled step is checked on) of a group whose
    members read a shared prefix in place: the prefix rows stay whole (the index is per member),
    and its loss is the step's on those members. (A head that dropped the prefix made the
    compiled step fail its check on an H200, 2026-12-03.)"""
    monkeypatch.setattr(fast_step.UpperStep, "reads_shared_prefix", lambda self, like: True)
    step = fast_step.UpperStep(tiny)
    batch = one_batch(tiny, user_facts(num_users=6), reuse_lower=True, prefix_attention=True, step=step, dedupe=True)
    values = batch.initial_values(20.0) * 0.1
    shared = [g for g in batch.groups if g.plain.prefix_index is not None]
    assert shared
    for group in shared:
        assert len(group.plain.prefix[0][0]) < len(group.members)
        k = max(1, len(group.members) // 2)
        head, targets = group.plain.head(k, group.targets)
        assert head.prefix[0][0] is group.plain.prefix[0][0] and len(head.prefix_index) == k
        with torch.no_grad():
            logits = step.logits(group.plain, values)
            keep = group.plain.target_seq < k
            want = torch.nn.functional.cross_entropy(logits[keep], group.targets[keep], reduction="sum")
            torch.testing.assert_close(step.loss(head, values, targets), want, rtol=1e-5, atol=1e-5)
