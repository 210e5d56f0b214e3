"""The fact compiler: every accepted fact comes back exactly; nothing else changes."""

import random

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram_core import fast_step
from engram_core.checkpoint import load_checkpoint
from engram_core.compiler import (
    STATUS_EMPTY_ANSWER, STATUS_EMPTY_TRIGGER, STATUS_OK, STATUS_TRIGGER_TOO_LONG,
    CompileOptions, Fact, _Batch, _validate, compile_facts,
)
from engram_core.serving import greedy_tokens
from engram_core.verify import check_isolation, check_locality

TEMPLATES = [
    ("My dentist is called", ["Dr. Akeredolu", "Dr. Okafor", "Nakamura", "Schmidt"]),
    ("My doctor is called", ["Rossi", "Dr. Haddad", "Patel", "Garcia"]),  # same last bigram, other trigram
    ("I live in", ["Lisbon", "Nairobi", "Osaka", "Porto"]),
    ("I live in the city of", ["Toronto", "Lyon", "Krakow", "Austin"]),  # shares a prefix with the above
    ("My dog's name is", ["Rex", "Biscuit", "Pepper", "Luna"]),
    ("My sister works at", ["the Bank of Accra", "Lindqvist and Moreau", "a school in Bergen", "Kim Motors"]),
    ("My blood type is", ["AB negative", "O positive", "B negative", "A positive"]),
    ("My manager is", ["Ivanova", "Mensah", "Fischer", "Tanaka"]),
    ("My gym is on", ["Quito Street", "Hanoi Road", "Perth Lane", "Leeds Avenue"]),
    ("My birthday is on", ["Monday the ninth", "Friday", "the first of May", "New Year"]),
]


def user_facts(num_users=20, seed=0):
    rng = random.Random(seed)
    facts = []
    for u in range(num_users):
        for k, (trigger, answers) in enumerate(TEMPLATES):
            facts.append(Fact(f"user-{u:02d}", f"fact-{k}", trigger, " " + rng.choice(answers)))
    return facts


def one_batch(em, facts, **options) -> _Batch:
    """The compiler's batch of ``facts`` (every fact valid), users slotted in name order."""
    seqs = [seq for seq, _ in _validate(em, facts, CompileOptions())]
    users = sorted({f.user_id for f in facts})
    for seq, fact in zip(seqs, facts):
        seq.user = users.index(fact.user_id)
    return _Batch(em, seqs, len(users), **options)


def assert_recalled(em, facts, result):
    by_id = {(r.user_id, r.fact_id): r for r in result.facts}
    for fact in facts:
        assert by_id[(fact.user_id, fact.fact_id)].status == STATUS_OK, by_id[(fact.user_id, fact.fact_id)]
        want = em.encode_answer(fact.answer)
        got = greedy_tokens(em, fact.trigger, len(want), [result.deltas[fact.user_id]])
        assert got == want, (fact, em.tokenizer.decode(got))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_200_facts_of_20_users_are_all_recalled_exactly(family, tiny_checkpoints):
    em = load_checkpoint(tiny_checkpoints(family))
    facts = user_facts()
    assert sum(len(em.encode_answer(f.answer)) > 1 for f in facts) > 20  # many multi-token answers
    result = compile_facts(em, facts, CompileOptions(facts_per_batch=64))
    assert len(result.facts) == 200 and result.ok == 200
    assert_recalled(em, facts, result)


def test_facts_of_one_user_that_share_rows_are_compiled_jointly(tiny):
    facts = user_facts(num_users=1)
    layer = tiny.config.target_layer
    ends = {f.fact_id: set(tiny.memory.addresser.rows(np.array([tiny.encode_prompt(f.trigger)]), layer)[0, -1].tolist())
            for f in facts}
    shared = ends["fact-0"] & ends["fact-1"]
    assert shared and shared != ends["fact-0"], "the fixture must contain two facts on partly shared rows"
    result = compile_facts(tiny, facts)
    assert_recalled(tiny, facts, result)


def test_compiling_twice_gives_bit_identical_deltas(tiny):
    facts = user_facts(num_users=3)
    a, b = compile_facts(tiny, facts), compile_facts(tiny, facts)
    assert a.deltas.keys() == b.deltas.keys()
    assert all(a.deltas[u].equals(b.deltas[u]) for u in a.deltas)


def test_a_users_delta_is_local_and_isolated(tiny):
    facts = user_facts(num_users=2)
    result = compile_facts(tiny, facts)
    delta = result.deltas["user-00"]
    probes = ["The weather today is", "Where do I live?", "My dentist is Dr."]
    locality = check_locality(tiny, delta, probes)
    assert locality.ok, locality.problems
    assert locality.positions_checked > 0
    isolation = check_isolation(tiny, delta, probes)
    assert isolation.ok, isolation.problems


def test_a_delta_only_touches_rows_addressed_by_its_facts(tiny):
    facts = user_facts(num_users=1)
    delta = compile_facts(tiny, facts).deltas["user-00"]
    layer = tiny.config.target_layer
    orders = np.repeat(tiny.config.orders, tiny.config.heads_per_order)  # each head's N-gram order
    allowed, outside = set(), set()
    for f in facts:
        prompt = tiny.encode_prompt(f.trigger)
        lead = len(prompt) - len(tiny.encode_answer(f.trigger))  # a BOS, if the tokenizer adds one
        ids = prompt + tiny.encode_answer(f.answer)[:-1]
        rows = tiny.memory.addresser.rows(np.array([ids]), layer)[0]
        for position in range(len(prompt) - 1, len(ids)):
            # Only N-grams inside the fact's own text: a served trigger may follow anything.
            inside = orders <= position - lead + 1
            allowed.update(rows[position][inside].tolist())
            outside.update(rows[position][~inside].tolist())
    assert outside - allowed, "the facts should have N-grams reaching before their text"
    assert set(delta.row_ids.tolist()) == allowed
    assert set(delta.layers.tolist()) == {layer}
    assert delta.nbytes == delta.num_rows * (2 + 8 + 2 * tiny.config.row_width)
    assert delta.nbytes < 64 * 1024  # kilobytes per user, not the megabytes of a LoRA


def test_pseudo_inverse_start_alone_raises_the_answer_tokens_rank(tiny):
    facts = user_facts(num_users=5)
    result = compile_facts(tiny, facts, CompileOptions(steps=0, max_rounds=1))

    def mean_rank(with_delta):
        ranks = []
        for f in facts:
            ids = torch.tensor([tiny.encode_prompt(f.trigger)])
            first = tiny.encode_answer(f.answer)[0]
            from engram_core.serving import overlay_for
            overlay = overlay_for(tiny, [[result.deltas[f.user_id]]]) if with_delta else None
            with torch.no_grad(), tiny.memory.use(overlay):
                logits = tiny.model(input_ids=ids).logits[0, -1]
            ranks.append(int((logits > logits[first]).sum()))
        return float(np.mean(ranks))

    base, started = mean_rank(False), mean_rank(True)
    assert started < base / 4, (base, started)


def test_bad_facts_are_reported_and_the_rest_of_the_batch_compiles(tiny):
    good = Fact("u", "ok", "My dog is called", " Rex")
    bad = [
        Fact("u", "no-trigger", "  ", " Rex"),
        Fact("u", "no-answer", "My cat is", ""),
        Fact("u", "long", "word " * 100, " Rex"),
    ]
    result = compile_facts(tiny, [good, *bad], CompileOptions(max_trigger_tokens=32))
    status = {r.fact_id: r.status for r in result.facts}
    assert status == {"ok": STATUS_OK, "no-trigger": STATUS_EMPTY_TRIGGER, "no-answer": STATUS_EMPTY_ANSWER,
                      "long": STATUS_TRIGGER_TOO_LONG}
    assert_recalled(tiny, [good], result)


def test_a_fact_that_cannot_be_recalled_is_reported_failed_with_its_loss(tiny):
    # One user, the same trigger with two different answers: at most one can win. (With
    # resolve_conflicts, the default, the second is not even compiled: see test_conflicts.py.)
    facts = [Fact("u", "a", "My dog is called", " Rex"), Fact("u", "b", "My dog is called", " Luna")]
    result = compile_facts(tiny, facts, CompileOptions(max_rounds=2, retry_steps=5, resolve_conflicts=False))
    statuses = sorted(r.status for r in result.facts)
    assert statuses[0] == "not_recalled" or statuses[1] == "not_recalled"
    failed = [r for r in result.facts if r.status != STATUS_OK]
    assert failed and all(np.isfinite(r.loss) and r.loss > 0 and r.detail for r in failed)
    assert failed[0].steps == 5 + 15


@pytest.mark.parametrize("plain", [True, False])
def test_stop_margin_keeps_the_rows_of_the_first_step_every_answer_clears(tiny, plain):
    """``CompileOptions.stop_margin``: the steps stop at the first rows at which every answer's
    margin in the step's own forward is at least the bar (read one step late), and those rows are
    the result: bit for bit a compile of exactly that many steps without the stop. A bar no rows
    reach runs every step and changes nothing. Both the plain step and transformers' forward."""
    facts = user_facts(num_users=1)
    base = dict(max_rounds=1, plain_step=plain)
    stopped = compile_facts(tiny, facts, CompileOptions(stop_margin=6.0, **base))
    steps = {r.steps for r in stopped.facts}
    assert len(steps) == 1 and 0 < min(steps) < CompileOptions.steps, steps  # one batch: one count
    assert stopped.ok == len(facts)
    assert min(r.margin for r in stopped.facts) >= 5.0  # verification's margin: the bar, up to its rounding
    same = compile_facts(tiny, facts, CompileOptions(steps=steps.pop(), **base))
    pairs = [(stopped, same)]
    if plain:  # (the margin's code is shared by both forms past the forward)
        never = compile_facts(tiny, facts, CompileOptions(stop_margin=1e9, **base))
        assert {r.steps for r in never.facts} == {CompileOptions.steps}
        pairs.append((never, compile_facts(tiny, facts, CompileOptions(**base))))
    for a, b in pairs:
        assert a.deltas.keys() == b.deltas.keys()
        for user, delta in a.deltas.items():
            assert np.array_equal(delta.row_ids, b.deltas[user].row_ids)
            assert np.array_equal(delta.values, b.deltas[user].values)
    assert_recalled(tiny, facts, stopped)


@pytest.mark.parametrize("plain", [True, False])
def test_stop_per_user_stops_each_user_at_its_own_step(tiny, plain, monkeypatch):
    """``stop_per_user``: a user's rows are those of the first step at which all of its own
    answers clear the bar, bit for bit the rows a compile of exactly that many steps without the
    stop gives that user, whatever step the rest of its batch stops at; its result reports its
    own count. With the plain step, the members of stopped users leave the steps (the groups are
    narrowed), and that changes no running user's bits."""
    facts = user_facts(num_users=8)
    base = dict(max_rounds=1, plain_step=plain)
    calls = []  # members per call of the plain step; None: Adam's update (a step's end)
    backward, update = fast_step.UpperStep.backward, torch.optim.Adam.step

    def counted(self, g, values, targets):
        calls.append(len(g.lower))
        return backward(self, g, values, targets)

    def stepped(self, *args, **kwargs):
        calls.append(None)
        return update(self, *args, **kwargs)

    monkeypatch.setattr(fast_step.UpperStep, "backward", counted)
    monkeypatch.setattr(torch.optim.Adam, "step", stepped)
    stopped = compile_facts(tiny, facts, CompileOptions(stop_margin=7.0, stop_per_user=True, **base))
    assert stopped.ok == len(facts)
    steps_of = {}
    for r in stopped.facts:
        steps_of.setdefault(r.user_id, set()).add(r.steps)
    assert all(len(s) == 1 for s in steps_of.values()), steps_of  # one count per user
    steps_of = {u: s.pop() for u, s in steps_of.items()}
    assert len(set(steps_of.values())) >= 3, steps_of  # users stopped at different steps
    assert max(steps_of.values()) < CompileOptions.steps
    # Members computed per step: the steps end when the last user stops (seen one step late).
    per_step, members = [], 0
    for call in calls:
        if call is None:
            per_step.append(members)
            members = 0
        else:
            members += call
    assert len(per_step) == max(steps_of.values()) + 2, calls
    if plain:  # they shrink as users stop
        assert per_step[0] == len(facts) and per_step[-1] < per_step[0] / 2, per_step
        assert per_step == sorted(per_step, reverse=True), per_step
    # Without stop_per_user the batch stops as one, where all of its users' answers clear the bar.
    batch_wide = compile_facts(tiny, facts, CompileOptions(stop_margin=7.0, **base))
    assert len({r.steps for r in batch_wide.facts}) == 1
    assert batch_wide.facts[0].steps >= max(steps_of.values())
    for count in sorted(set(steps_of.values())):
        same = compile_facts(tiny, facts, CompileOptions(steps=count, **base))
        for user in (u for u, c in steps_of.items() if c == count):
            assert np.array_equal(stopped.deltas[user].row_ids, same.deltas[user].row_ids)
            assert np.array_equal(stopped.deltas[user].values, same.deltas[user].values), (user, count)
    assert_recalled(tiny, facts, stopped)


def test_stop_margin_below_the_verification_margin_is_refused(tiny):
    with pytest.raises(ValueError, match=r"stop_margin \(0.2\) must be at least min_margin \(0.5\)"):
        compile_facts(tiny, user_facts(num_users=1), CompileOptions(stop_margin=0.2))


@pytest.mark.parametrize("family,reused", [("llama", True), ("qwen2", True), ("gpt2", False)])
def test_steps_on_cached_lower_layers_give_the_same_deltas_as_the_full_forward(family, reused, tiny_checkpoints):
    """Per step the compiler runs only the layers from the write layer up, on hidden states
    cached once per batch. Where that equals the full forward (Llama, Qwen2: checked once per
    model) it is used and the deltas are bit-identical; GPT-2 adds position embeddings to
    inputs_embeds, so it always runs the full forward."""
    from engram_core.compiler import _LOWER_REUSE_OK

    em = load_checkpoint(tiny_checkpoints(family))
    facts = user_facts(num_users=6, seed=3)
    fast = compile_facts(em, facts, CompileOptions(facts_per_batch=32, reuse_lower_layers=True, prefix_attention=False,
                                                   plain_step=False))
    assert any(_LOWER_REUSE_OK.get(em.model, {}).values()) is reused
    if not reused:  # and the numeric check alone would also refuse it
        batch = one_batch(em, facts, reuse_lower=True)
        batch.check_lower_reuse(batch.initial_values(20.0))
        assert all(g.lower is None for g in batch.groups)
    full = compile_facts(em, facts, CompileOptions(facts_per_batch=32, reuse_lower_layers=False))
    assert fast.ok == full.ok == len(facts)
    assert fast.deltas.keys() == full.deltas.keys()
    for user in full.deltas:
        a, b = fast.deltas[user], full.deltas[user]
        assert np.array_equal(a.row_ids, b.row_ids) and a.values.tobytes() == b.values.tobytes(), user


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_attention_to_the_cached_prefix_in_place_matches_eager_attention(family, tiny_checkpoints):
    """The compile step's prefix attention (scores against the cached prefix and the new keys
    apart, no concatenation) gives the logits of the standard forward, and compiles facts
    that are all recalled."""
    em = load_checkpoint(tiny_checkpoints(family), attn_implementation="eager")
    long_triggers = ["My sister who moved to Bergen last year works at", "The name of the dentist I see every spring is",
                     "The street where my gym is, near the station, is called", "I live in the city of"]
    facts = [Fact(f"user-{u}", f"fact-{k}", trigger, " " + ["Rex", "Luna", "Porto", "Lyon"][(u + k) % 4])
             for u in range(4) for k, trigger in enumerate(long_triggers)]
    batch = one_batch(em, facts, reuse_lower=True, prefix_attention=True)
    values = batch.initial_values(20.0)
    overlay = batch._overlay(values)
    with torch.no_grad():
        for group in batch.groups:
            split, full = group.logits(overlay), group.logits(overlay, full=True)
            assert group.cache is None or group.lower is not None
            torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-4)
        usual = batch.groups[0]
        assert usual.mask[:, : usual.prefix].float().mean() > 0.25  # a real prefix to attend to
    result = compile_facts(em, facts, CompileOptions(facts_per_batch=64, prefix_attention=True))
    assert result.ok == len(facts)
    assert_recalled(em, facts, result)


@settings(max_examples=60, deadline=None)
@given(prefixes=st.lists(st.integers(0, 9), min_size=1, max_size=40), max_groups=st.integers(1, 4))
def test_prefix_groups_cover_every_sequence_once_and_compute_the_fewest_positions(prefixes, max_groups):
    """Groups start at their shortest member's prefix; the split is the cheapest of all splits
    into at most max_groups contiguous ranges of prefix lengths (checked by brute force)."""
    import itertools as it

    from engram_core.compiler import _prefix_buckets

    width = 10
    p = np.array(prefixes)
    groups = _prefix_buckets(p, width, max_groups)
    assert 1 <= len(groups) <= max_groups
    assert (sum(m.astype(int) for _, m in groups) == 1).all()  # a partition
    assert all(pre == p[m].min() for pre, m in groups)
    cost = sum(int(m.sum()) * (width - pre) for pre, m in groups)
    lengths = sorted(set(prefixes))
    best = None
    for k in range(1, min(max_groups, len(lengths)) + 1):
        for cuts in it.combinations(range(1, len(lengths)), k - 1):
            bounds = [0, *cuts, len(lengths)]
            c = sum(sum(x >= lengths[a] and x <= lengths[b - 1] for x in prefixes) * (width - lengths[a])
                    for a, b in zip(bounds, bounds[1:]))
            best = c if best is None else min(best, c)
    assert cost == best


def _plain_step_facts():
    """Long triggers (a real cached prefix), multi-token answers, and per user one trigger that
    contains another of its triggers (so it addresses that fact's rows early: a second group
    that recomputes from early in its trigger)."""
    triggers = [("My sister who moved to Bergen last year works at", "Lindqvist and Moreau"),
                ("The name of the dentist I see every spring is", "Dr. Akeredolu"),
                ("My dog's name is", "Rex"),
                ("My dog's name is Rex and my cat's name is", "Biscuit"),
                ("I live in the city of", "Lyon")]
    return [Fact(f"user-{u}", f"fact-{k}", trigger, " " + answer) for u in range(4) for k, (trigger, answer) in enumerate(triggers)]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_plain_step_gives_transformers_logits_and_gradients_and_recalls_every_fact(family, tiny_checkpoints):
    """The compile step as plain tensor code (engram_core.fast_step) computes what transformers'
    forward computes: the same logits and the same gradient of the rows, for the usual group
    (cached prefix) and a group that recomputes its trigger; facts compiled with it all come back."""
    from engram_core import fast_step
    from engram_core.compiler import _LOWER_REUSE_OK
    from engram_core.layer import backbone_and_layers

    em = load_checkpoint(tiny_checkpoints(family), attn_implementation="eager")
    facts = _plain_step_facts()
    step = fast_step.UpperStep(em)
    batch = one_batch(em, facts, reuse_lower=True, prefix_attention=True, step=step)
    assert len(batch.groups) == 2 and batch.groups[0].prefix > batch.groups[1].prefix
    assert any(len(s.targets) > 1 for s in batch.seqs)
    # the recomputing group's last layer computes its outputs at its last (answer) positions only
    recompute = batch.groups[1].plain
    assert 0 < recompute.tail < recompute.lower.shape[1]
    values = batch.initial_values(20.0) * 0.1  # far from the start's optimum: real gradients at any tiny width
    overlay = batch._overlay(values)
    with torch.no_grad():
        for group in batch.groups:
            torch.testing.assert_close(step.logits(group.plain, values), group.logits(overlay, full=True),
                                       rtol=1e-4, atol=1e-4)

    def gradient(plain: bool) -> torch.Tensor:
        v = values.clone().requires_grad_(True)
        for group in batch.groups:
            if plain:
                loss = step.loss(group.plain, v, group.targets)
            else:
                loss = torch.nn.functional.cross_entropy(group.logits(batch._overlay(v)), group.targets, reduction="sum")
            loss.backward()
        return v.grad

    want = gradient(plain=False)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(gradient(plain=True), want, rtol=1e-3, atol=1e-5)
    result = compile_facts(em, facts, CompileOptions(facts_per_batch=64))  # the plain step is the default
    assert _LOWER_REUSE_OK[em.model][("plain", "torch.float32")] is True
    assert result.ok == len(facts)
    assert_recalled(em, facts, result)


def test_the_compiled_plain_step_is_checked_used_and_recalls_every_fact(tiny, caplog):
    """``compiled_step``: torch.compile of the plain step (inductor, here on the CPU), and with it
    the prefix and lower forwards as compiled plain code (``plain_prefix``). Each is checked
    (the step against the uncompiled step, the forwards against transformers'), used, and the
    facts compiled with them all come back, bit for bit the same in a second run."""
    import logging

    from engram_core.compiler import _LOWER_REUSE_OK, _STEPS

    facts = _plain_step_facts()
    options = CompileOptions(facts_per_batch=8, compiled_step=True)  # several batches: later ones use the plain forwards
    with caplog.at_level(logging.INFO, logger="engram_core"):
        result = compile_facts(tiny, facts, options)
    step, lower = _STEPS[tiny.model][(True, True, False, True, False)], _STEPS[tiny.model][("lower", True, True, True)]
    assert step.compiled and lower.compiled, caplog.text
    # Inductor picks no kernel configuration by timing (two cold compiles give the same bits)
    config = torch._inductor.config  # (torch 2.11 has neither key: then no options at all)
    wanted = {key: True for key in ("deterministic",) if hasattr(config, key)}
    assert step.compile_options == (wanted or None)
    wanted.update({key: True for key in ("emulate_precision_casts",) if hasattr(config, key)})
    assert lower.compile_options == (wanted or None)
    assert "the plain step runs compiled" in caplog.text
    assert "the prefix and lower forwards as plain code vs transformers'" in caplog.text
    assert _LOWER_REUSE_OK[tiny.model][("lower", "torch.float32")] is True
    assert result.ok == len(facts)
    assert_recalled(tiny, facts, result)
    again = compile_facts(tiny, facts, options)
    for user, delta in result.deltas.items():
        assert np.array_equal(again.deltas[user].row_ids, delta.row_ids)
        assert np.array_equal(again.deltas[user].values, delta.values)
    _compiled_calls_wait_for_the_lock(tiny, facts, options)


def _compiled_calls_wait_for_the_lock(em, facts, options):
    """torch.compile is not thread-safe, and with overlap (CUDA) the compiler calls the compiled
    step and the compiled forwards from two threads: each call into a compiled function (the
    step's backward with it) waits while another thread holds fast_step.COMPILED_CALLS. A compile
    in a thread (one user's facts, shapes compiled above: nothing new to trace) is stopped at each
    such call while this thread holds the lock, and finishes once it is free."""
    import sys
    import threading

    from engram_core import fast_step

    lock = fast_step.COMPILED_CALLS
    waited_in, out = set(), {}
    thread = threading.Thread(target=lambda: out.update(result=compile_facts(em, facts[:5], options)))
    lock.acquire()
    thread.start()
    while True:
        deadline = time.monotonic() + 120
        while not lock.waiting and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not lock.waiting:
            break
        frame = sys._current_frames()[thread.ident]
        while frame is not None:
            if frame.f_code.co_filename == fast_step.__file__ and frame.f_code.co_name not in ("acquire", "__enter__"):
                waited_in.add(frame.f_code.co_name)
                break
            frame = frame.f_back
        lock.release()  # handed to the waiting thread (first come, first served) ...
        lock.acquire()  # ... and this thread is next: the compile stops at its next call
    lock.release()
    thread.join(120)
    assert not thread.is_alive()
    assert {"prefix_cache", "lower", "backward"} <= waited_in, waited_in
    assert out["result"].ok == 5


def test_the_compiled_calls_lock_is_first_come_first_served_and_reentrant():
    """A thread that releases fast_step's FairLock and asks for it again at once (the steps'
    loop) gets it only after the thread that was already waiting (the next batch's forwards)."""
    import threading

    from engram_core.fast_step import FairLock

    lock, order = FairLock(), []

    def waiter():
        with lock:
            order.append("waiter")

    with lock:
        with lock:  # reentrant
            thread = threading.Thread(target=waiter)
            thread.start()
            deadline = time.monotonic() + 30
            while not lock.waiting and time.monotonic() < deadline:
                time.sleep(0.001)
            assert lock.waiting == 1
    with lock:  # asked again at once: served after the waiter
        order.append("again")
    thread.join(30)
    assert order == ["waiter", "again"]
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.release()


def test_a_wait_for_the_compiled_calls_lock_that_is_interrupted_leaves_no_waiter_behind():
    """Ctrl-C or SIGTERM (raised in the main thread) while it waits for fast_step's FairLock: the
    lock must not be handed to that dead waiter later, or the step thread's next acquire would wait
    forever and the compile could not exit."""
    import signal
    import threading

    from engram_core.fast_step import FairLock

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    lock, held, go_on, done = FairLock(), threading.Event(), threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            go_on.wait(30)
        with lock:  # asked again after the interrupted waiter gave up
            done.set()

    thread = threading.Thread(target=holder)
    thread.start()
    assert held.wait(30)
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Interrupted):
            lock.acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert lock.waiting == 0
    go_on.set()
    thread.join(30)
    assert done.is_set()


def fast_step_inputs(inputs) -> list[torch.Tensor]:
    """Every tensor of a group's plain-step inputs (fast_step.GroupInputs), in a fixed order."""
    out = []
    for value in vars(inputs).values():
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            out.extend(value[k] for k in sorted(value))
        elif isinstance(value, (list, tuple)):
            out.extend(t for item in value if item is not None for t in (item if isinstance(item, tuple) else (item,)))
    return out


def _group_states(group) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A group's lower states at its valid live positions and its prefix cache (every layer's
    keys and values) at its valid prefix positions."""
    from engram_core.compiler import _cached_kv

    P = group.prefix
    lower = group.lower * group.mask[:, P:].unsqueeze(-1)
    cache = []
    group._whole_cache()  # a shared prefix's layers below the write layer, one row per member (as a full forward)
    if group.cache is not None:
        valid = group.mask[:, :P].view(len(group.mask), 1, P, 1)
        for index in range(len(group.cache.layers)):
            cache.extend(t * valid for t in _cached_kv(group.cache, index))
    return lower, cache


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_plain_prefix_forward_gives_transformers_cache_and_states(family, tiny_checkpoints):
    """``fast_step.LowerForward`` (``plain_prefix``): the prefix's KV cache through every layer
    and the live positions' states below the write layer, as plain code, equal transformers'
    forwards, with fixed base rows seen by the prefix and with shared prefixes computed once.
    The first batch checks it against transformers' and holds transformers' states while the
    step forms are checked; then it takes the plain forwards' states, bit for bit the ones a
    later batch of the same facts has (a re-run of a chunk gives the same deltas)."""
    from engram_core import fast_step
    from engram_core.compiler import _LOWER_REUSE_OK
    from engram_core.layer import backbone_and_layers

    em = load_checkpoint(tiny_checkpoints(family), attn_implementation="eager")
    facts = _plain_step_facts()
    users = sorted({f.user_id for f in facts})
    earlier = compile_facts(em, [Fact(u, "earlier", "My sister who moved to", " Oslo") for u in users], CompileOptions())
    base = {slot: earlier.deltas[u] for slot, u in enumerate(users)}  # rows the later triggers' prefixes address
    step, lower = fast_step.UpperStep(em), fast_step.LowerForward(em)
    for dedupe in (False, True):
        _LOWER_REUSE_OK.get(em.model, {}).pop(("lower", "torch.float32"), None)
        options = dict(base=base, reuse_lower=True, prefix_attention=True, step=step, dedupe=dedupe)
        want = one_batch(em, facts, **options)
        first = one_batch(em, facts, lower_forward=lower, **options)
        assert _LOWER_REUSE_OK[em.model][("lower", "torch.float32")] is True
        got = one_batch(em, facts, lower_forward=lower, **options)
        assert [g.prefix for g in got.groups] == [g.prefix for g in want.groups] and want.groups[0].prefix > 0
        # checked on transformers' states, of a sample of the usual group (all of it here)
        assert torch.equal(first.check_group.members, want.groups[0].members)
        assert torch.equal(first.check_group.lower, want.groups[0].lower)
        for g_want, g_got in zip(want.groups, got.groups):
            (want_lower, want_cache), (got_lower, got_cache) = _group_states(g_want), _group_states(g_got)
            torch.testing.assert_close(got_lower, want_lower, rtol=1e-4, atol=1e-5)
            assert len(got_cache) == len(want_cache) == (2 * len(backbone_and_layers(em.model)[1]) if g_want.prefix else 0)
            for a, b in zip(got_cache, want_cache):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        values = got.initial_values(20.0)
        for g_want, g_got in zip(want.groups, got.groups):  # the steps see the same logits
            torch.testing.assert_close(step.logits(g_got.plain, values), step.logits(g_want.plain, values),
                                       rtol=1e-4, atol=1e-4)
        first.check_lower_reuse(first.initial_values(20.0))  # the checks done: the plain forwards' states
        assert first.plain and first.check_group is None
        for g_first, g_got in zip(first.groups, got.groups):
            (first_lower, first_cache), (got_lower, got_cache) = _group_states(g_first), _group_states(g_got)
            assert torch.equal(first_lower, got_lower)
            assert all(torch.equal(a, b) for a, b in zip(first_cache, got_cache))
            for a, b in zip(fast_step_inputs(g_first.plain), fast_step_inputs(g_got.plain)):
                assert torch.equal(a, b)


def test_the_first_batch_checks_the_forms_on_a_sample_of_its_sequences(tiny, monkeypatch):
    """The once-per-model checks (plain forwards against transformers', step forms against the
    full forward) run on ``FORM_CHECK_SEQUENCES`` sequences of the first batch's usual group, held
    apart (``check_group``); the batch's own groups are computed by the plain forwards from the
    start, bit for bit as a later batch of the same facts (on the whole group, the checks' second
    set of states doubled the first batch's GPU memory)."""
    from engram_core import compiler, fast_step

    monkeypatch.setattr(compiler, "FORM_CHECK_SEQUENCES", 3)
    verdicts = compiler._LOWER_REUSE_OK.setdefault(tiny.model, {})
    saved = dict(verdicts)
    verdicts.clear()
    try:
        facts = _plain_step_facts()
        options = dict(reuse_lower=True, prefix_attention=True, step=fast_step.UpperStep(tiny),
                       lower_forward=fast_step.LowerForward(tiny))
        first = one_batch(tiny, facts, **options)
        assert len(first.check_group.members) == 3 < len(first.groups[0].members)
        assert torch.equal(first.check_group.members, first.groups[0].members[:3])
        first.check_lower_reuse(first.initial_values(20.0))
        assert first.plain and first.check_group is None
        assert verdicts[("lower", "torch.float32")] is True and verdicts[("plain", "torch.float32")] is True
        later = one_batch(tiny, facts, **options)
        assert later.check_group is None
        later.check_lower_reuse(later.initial_values(20.0))
        for g_first, g_later in zip(first.groups, later.groups, strict=True):
            (first_lower, first_cache), (later_lower, later_cache) = _group_states(g_first), _group_states(g_later)
            assert torch.equal(first_lower, later_lower)
            assert all(torch.equal(a, b) for a, b in zip(first_cache, later_cache, strict=True))
            for a, b in zip(fast_step_inputs(g_first.plain), fast_step_inputs(g_later.plain)):
                assert torch.equal(a, b)
    finally:
        verdicts.clear()
        verdicts.update(saved)


def test_a_groups_head_is_the_step_on_its_first_members_alone(tiny):
    """``GroupInputs.head(k)``, the sample the compiled step is checked on: the loss of the
    first k members of a group, for the usual group and one that recomputes its trigger."""
    from engram_core import fast_step

    step = fast_step.UpperStep(tiny)
    batch = one_batch(tiny, _plain_step_facts(), reuse_lower=True, prefix_attention=True, step=step)
    values = batch.initial_values(20.0) * 0.1
    for group in batch.groups:
        k = max(1, len(group.members) // 2)
        head, targets = group.plain.head(k, group.targets)
        assert len(head.lower) == k and len(targets) == int((group.plain.target_seq < k).sum()) > 0
        with torch.no_grad():
            logits = step.logits(group.plain, values)
            keep = group.plain.target_seq < k
            want = torch.nn.functional.cross_entropy(logits[keep], group.targets[keep], reduction="sum")
            torch.testing.assert_close(step.loss(head, values, targets), want, rtol=1e-5, atol=1e-5)
        assert group.plain.head(len(group.members), group.targets)[0] is group.plain


def test_a_plain_prefix_forward_that_differs_from_transformers_is_not_used(tiny, caplog):
    """A plain prefix forward whose cache differs from transformers' (here: keys scaled) fails
    the check on the first batch, and every later batch runs transformers' forwards."""
    import logging

    from engram_core import fast_step
    from engram_core.compiler import _LOWER_REUSE_OK

    lower = fast_step.LowerForward(tiny)
    real = lower.prefix_cache
    lower.prefix_cache = lambda *args, **kwargs: [(k * 1.5, v) for k, v in real(*args, **kwargs)]
    facts = _plain_step_facts()
    options = dict(reuse_lower=True, prefix_attention=True, step=fast_step.UpperStep(tiny))
    verdicts = _LOWER_REUSE_OK.setdefault(tiny.model, {})
    verdicts.pop(("lower", "torch.float32"), None)
    try:
        want = one_batch(tiny, facts, **options)
        with caplog.at_level(logging.INFO, logger="engram_core"):
            one_batch(tiny, facts, lower_forward=lower, **options)
        assert verdicts[("lower", "torch.float32")] is False
        assert "plain code vs transformers'" in caplog.text and "(not used)" in caplog.text
        later = one_batch(tiny, facts, lower_forward=lower, **options)
        assert later.lower_forward is None
        for g_want, g_later in zip(want.groups, later.groups):
            assert torch.equal(g_later.lower, g_want.lower)
    finally:
        verdicts.pop(("lower", "torch.float32"), None)


def test_running_out_of_memory_in_the_compiled_step_is_raised_and_keeps_it_compiled(tiny):
    """A batch too large for the device is not a compiler fault: the error reaches the caller
    (who can use smaller batches) and the step stays compiled. Any other failure of the
    compiled step drops to the uncompiled step. (Simulated: a CPU allocation failure is not a
    ``torch.OutOfMemoryError``.)"""
    from engram_core import fast_step

    step = fast_step.UpperStep(tiny, compiled=True)
    batch = one_batch(tiny, user_facts(num_users=1), reuse_lower=True, prefix_attention=True, step=step)
    values = batch.initial_values(20.0)
    group = next(g for g in batch.groups if g.plain is not None)

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.81 GiB (simulated)")

    step._compiled = out_of_memory
    with pytest.raises(torch.OutOfMemoryError):
        step.loss(group.plain, values, group.targets)
    assert step.compiled

    def broken(*args):
        raise RuntimeError("an inductor failure (simulated)")

    step._compiled = broken
    loss = step.loss(group.plain, values, group.targets)
    assert not step.compiled
    assert torch.equal(loss, step._call(step._loss_eager, group.plain, torch.nn.functional.embedding(group.plain.slot, values),
                                        group.targets))


def test_overlapping_batches_changes_no_result_and_reports_every_batch(tiny):
    """With ``overlap_batches`` the next batch is prepared while this one's steps run and this
    one is assembled while the next one's run (on a CPU in the same order, without a side
    stream). Batches whose users need retry rounds, and one with nothing valid, are included."""
    facts = user_facts(num_users=6)
    facts += [Fact("user-03", "clash-a", "My cat is called", " Rex"), Fact("user-03", "clash-b", "My cat is called", " Luna")]
    facts += [Fact("user-99", "empty", "  ", " Rex")]  # a batch of its own with no valid fact
    runs = {}
    for overlap in (False, True):
        calls = []
        options = CompileOptions(facts_per_batch=20, overlap_batches=overlap, max_rounds=3, retry_steps=5,
                                 resolve_conflicts=False)  # the clash is compiled, and needs retry rounds
        result = compile_facts(tiny, facts, options, progress=lambda users, n: calls.append((users, n)))
        runs[overlap] = result, calls
    (plain, plain_calls), (overlapped, overlapped_calls) = runs[False], runs[True]
    assert plain_calls == overlapped_calls == [(2, 20), (2, 22), (2, 20), (0, 0)]
    assert overlapped.deltas.keys() == plain.deltas.keys() == {f"user-{u:02d}" for u in range(6)}
    assert all(overlapped.deltas[u].equals(plain.deltas[u]) for u in plain.deltas)
    assert repr(overlapped.facts) == repr(plain.facts)  # repr: NaN losses of rejected facts compare equal
    statuses = {(r.user_id, r.fact_id): r.status for r in overlapped.facts}
    assert "not_recalled" in {statuses[("user-03", "clash-a")], statuses[("user-03", "clash-b")]}
    assert {r.steps for r in overlapped.facts if r.user_id == "user-03"} == {15 + 5 + 5}
    assert statuses[("user-99", "empty")] == STATUS_EMPTY_TRIGGER
    assert all(statuses[(f.user_id, f.fact_id)] == STATUS_OK for f in facts[:6 * len(TEMPLATES)])


def test_the_check_in_chunks_gives_the_margins_and_losses_of_the_whole_logits(tiny_checkpoints, monkeypatch):
    """Verification's chunked LM head and top-2 margin agree with the plain computation over the
    whole (positions, vocab) logits: the target's logit minus the best other token's."""
    from engram_core import compiler

    em = load_checkpoint(tiny_checkpoints("llama"))
    facts = user_facts(num_users=6)
    batch = one_batch(em, facts, reuse_lower=True)
    values = batch.initial_values(20.0)
    monkeypatch.setattr(compiler, "_CHECK_CHUNK", 7)  # several chunks, a ragged last one
    expected_loss = np.empty(batch.num_written, np.float32)
    expected_margin = np.empty(batch.num_written, np.float32)
    overlay = batch._overlay(values.half().to(values.dtype))
    with torch.no_grad():
        for g in batch.groups:
            logits = g.logits(overlay)
            others = logits.scatter(1, g.targets.view(-1, 1), float("-inf"))
            index = g.written.numpy()
            expected_margin[index] = (logits.gather(1, g.targets.view(-1, 1)).squeeze(1) - others.max(1).values).numpy()
            expected_loss[index] = torch.nn.functional.cross_entropy(logits, g.targets, reduction="none").numpy()
    threshold = float(np.median(expected_margin))  # some positions pass, some do not
    ok, loss, margin = batch.check(values, threshold)
    assert len(loss) == batch.num_written > 7
    np.testing.assert_allclose(margin, expected_margin, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert np.array_equal(ok, margin >= threshold) and ok.any() and not ok.all()


def test_an_error_while_assembling_a_batch_reaches_the_caller(tiny, monkeypatch):
    """A failure while assembling a batch's deltas and results is not lost."""
    from engram_core import compiler

    real = compiler._Job.assemble
    seen = []

    def failing(job):
        seen.append(len(job.users))
        if len(seen) == 2:
            raise RuntimeError("disk full while assembling (simulated)")
        return real(job)

    monkeypatch.setattr(compiler._Job, "assemble", failing)
    with pytest.raises(RuntimeError, match="disk full while assembling"):
        compile_facts(tiny, user_facts(num_users=6), CompileOptions(facts_per_batch=20))
    assert len(seen) >= 2


def test_rows_touched_per_fact_counts_the_distinct_rows_of_its_written_positions(tiny):
    """One-position facts touch exactly their heads inside the fact's text (heads address
    disjoint row ranges); multi-token answers count their positions' distinct rows of heads
    inside the text (checked against a plain count)."""
    from engram_core.compiler import _rows_touched

    facts = user_facts(num_users=4) + [Fact("user-00", "long", "My motto is", " and so on and so on"),
                                       Fact("user-01", "short", "Hi", " there"),
                                       Fact("user-02", "long-trigger", "The street where I grew up as a child was", " the")]
    assert len(tiny.encode_answer(" the")) == 1 and len(tiny.encode_prompt(facts[-1].trigger)) >= tiny.config.max_ngram
    batch = one_batch(tiny, facts)
    got = _rows_touched(batch)
    want = [len({int(r) for p in range(start, start + n) for r in batch.w_rows[p][batch.w_inside[p]]})
            for start, n in zip(batch.written_start, np.diff(np.r_[batch.written_start, batch.num_written]))]
    assert got.tolist() == want
    single = np.diff(np.r_[batch.written_start, batch.num_written]) == 1
    inside = batch.w_inside[batch.written_start[single]].sum(1)
    assert single.any() and (~single).any() and (got[single] == inside).all()
    H = batch.w_rows.shape[1]
    assert (inside < H).any() and (inside == H).any()  # short triggers leave heads out; long ones none


def test_a_fact_whose_text_holds_a_special_tokens_text_is_refused_naming_it_and_the_others_compile(tiny):
    special = tiny.tokenizer.eos_token or tiny.tokenizer.all_special_tokens[0]
    facts = [Fact("u", "cut", "My code word is", f" {special} really"),
             Fact("u", "turn", f"{special}My dentist is called", " Dr. Okafor"),
             Fact("u", "fine", "My dentist is called", " Dr. Okafor")]
    result = compile_facts(tiny, facts)
    by_id = {r.fact_id: r for r in result.facts}
    assert by_id["cut"].status == by_id["turn"].status == "special_token_text"
    assert special in by_id["cut"].detail and "answer" in by_id["cut"].detail
    assert "trigger" in by_id["turn"].detail
    assert by_id["fine"].status == STATUS_OK


# Triggers told as a sentence: 40+ words, about 100 tokens on the tiny model's tokenizer.
LONG_TRIGGERS = [
    ("horse", "When my sister and I were kids we used to spend every summer at our grandparents' farm near the lake, "
              "and there was one old horse that we rode every single morning before breakfast, and that horse was called",
     " Thunderbolt"),
    ("restaurant", "The name of the small Italian restaurant on the corner of the street where my husband proposed to me "
                   "on a rainy evening in late October, after we had both missed the last train home and had nowhere "
                   "else to go, was", " Trattoria da Enzo"),
    ("teacher", "Back in primary school, the teacher who stayed after class every Thursday to help me with fractions "
                "and long division, and who later wrote me a letter when I finished university, was", " Mrs. Okonkwo"),
]


def test_a_trigger_of_forty_words_is_accepted_compiled_and_recalled_from_the_whole_trigger(tiny):
    """A trigger over 64 tokens was refused (TRIGGER_TOO_LONG at ingest, trigger_too_long here).
    Now the night's defaults take it, the compiler reads its last ``trigger_window`` tokens (so a
    batch is padded no wider than before), and the whole trigger, typed as a prompt, recalls it."""
    from engram_core.compiler import _validate
    from engram_core.serving import generate
    from jobs.spec import NightlySpec
    from pipeline.ingest import ingest
    from tests.fixtures.realistic_profiles import Profile, ProfileFact, fact_log

    options = CompileOptions()
    facts = [Fact("u", fid, trigger, answer) for fid, trigger, answer in LONG_TRIGGERS]
    facts.append(Fact("u", "short", "My dog is called", " Rex"))
    lengths = [len(tiny.encode_prompt(f.trigger)) for f in facts[:-1]]
    assert min(lengths) > 64 and max(lengths) <= NightlySpec.max_trigger_tokens == options.max_trigger_tokens

    log = fact_log([Profile("u", tuple(ProfileFact("u", f.fact_id, f.trigger, f.answer, (), ()) for f in facts), None)])
    ingested = ingest(log, None, max_trigger_tokens=NightlySpec.max_trigger_tokens,
                      count_tokens=lambda texts: [len(tiny.encode_prompt(t)) for t in texts])
    assert ingested.rejected == 0

    seqs = [seq for seq, _ in _validate(tiny, facts, options)]
    assert all(len(s.input_ids) - len(s.targets) + 1 == options.trigger_window for s in seqs[:-1])
    assert [s.cut for s in seqs] == [n - options.trigger_window for n in lengths] + [0]

    result = compile_facts(tiny, facts, options)
    assert {r.fact_id: r.status for r in result.facts} == {f.fact_id: STATUS_OK for f in facts}
    for prompt_form in (lambda t: t, lambda t: t + " ", lambda t: t + "\n"):
        texts = generate(tiny, [prompt_form(f.trigger) for f in facts], [[result.deltas["u"]]] * len(facts),
                         max_new_tokens=max(len(tiny.encode_answer(f.answer)) for f in facts))
        assert [t.startswith(f.answer) for t, f in zip(texts, facts)] == [True] * len(facts), texts


_SHARED_TAIL = ("every time I come back from a long trip abroad I forget the same small things, so I am writing them "
                "down here where I will find them again: the spare keys are with the neighbour at number 12, the "
                "boiler needs its reset button held for ten seconds, and the code that opens the garage is")


def test_long_triggers_that_end_alike_and_differ_in_their_first_words_are_both_compiled_and_recalled(tiny):
    """Two of a user's triggers over the window whose last ``trigger_window`` tokens are the same
    ("For the house in Leeds: ..." / "For the flat in Porto: ...", the same 60-word note after)
    were compiled from those same tokens: one trigger with two answers, one fact dropped
    (``CONFLICTS_WITH``, "same canonical trigger") and its trigger served the other's code. Each
    is now compiled whole, and both come back."""
    from engram_core.compiler import _validate
    from engram_core.serving import generate

    options = CompileOptions()
    facts = [Fact("u", "leeds", "For the house in Leeds: " + _SHARED_TAIL, " 1397"),
             Fact("u", "porto", "For the flat in Porto: " + _SHARED_TAIL, " 4682"),
             Fact("u", "alarm", "For the house in Leeds: " + _SHARED_TAIL.replace("garage", "shed"), " 2580"),
             Fact("v", "porto", "For the flat in Porto: " + _SHARED_TAIL, " 7777")]  # another user: no widening
    lengths = [len(tiny.encode_prompt(f.trigger)) for f in facts]
    assert min(lengths) > options.trigger_window + 8
    seqs = [seq for seq, _ in _validate(tiny, facts, options)]
    kept = [len(s.input_ids) - len(s.targets) + 1 for s in seqs]
    assert kept[:2] == lengths[:2]  # the pair: whole
    assert kept[2] == kept[3] == options.trigger_window  # unlike the others / alone with its user

    result = compile_facts(tiny, facts, options)
    assert {(r.user_id, r.fact_id): r.status for r in result.facts} == {(f.user_id, f.fact_id): STATUS_OK for f in facts}
    texts = generate(tiny, [f.trigger for f in facts], [[result.deltas[f.user_id]] for f in facts], max_new_tokens=6)
    assert [t.startswith(f.answer) for t, f in zip(texts, facts)] == [True] * len(facts), texts


def test_trigger_cuts_keep_whole_the_long_triggers_of_an_owner_that_end_alike_and_differ():
    from engram_core.conflicts import trigger_cuts

    tail = list(range(100, 170))  # 70 tokens
    a, b, c = [1, 7, 8] + tail, [1, 9] + tail, [1] + tail[-10:]  # lead 1 (a BOS)
    assert trigger_cuts([a, b], ["u", "v"], 64, 1) == [9, 8]  # other owners: the plain window
    assert trigger_cuts([a, b, a[:1] + tail[:5]], ["u", "u", "u"], 64, 1) == [0, 0, 0]  # the pair: whole
    assert trigger_cuts([a, a], ["u", "u"], 64, 1) == [9, 9]  # the same trigger twice: nothing to tell apart
    assert trigger_cuts([a, c], ["u", "u"], 64, 1) == [9, 0]  # short triggers are never cut
    short = [1] + tail[-63:]  # exactly the window: a's window is this trigger's text
    assert trigger_cuts([a, short], ["u", "u"], 64, 1) == [0, 0]  # a's window is the short one's text
    with pytest.raises(ValueError, match="trigger_window"):
        trigger_cuts([a], ["u"], 1, 1)
