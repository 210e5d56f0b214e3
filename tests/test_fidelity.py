"""Memory fidelity on realistic profiles (issue 17): whole answers come back exactly, through the
serving path, from the prompt a user types; every failure says why.

One module-scoped night over the corpus of tests/fixtures/realistic_profiles.py (50 users, ~32
facts each): the fact log goes through ingest (canonical text, token limits), the scoped compile
(a shared scope compiled once), then greedy decoding with each user's served deltas.
"""

from __future__ import annotations

import numpy as np
import pytest

from engram_core.compiler import STATUS_LOW_MARGIN, STATUS_OK, CompileOptions, Fact, compile_facts
from engram_core.serving import greedy_tokens
from engram_core.text import canonical_fact
from engram_core.verify import check_invariants
from pipeline.collisions import row_keys
from pipeline.ingest import answer_token_counter, ingest
from pipeline.scopes import compile_scoped, served_deltas
from tests.fixtures.realistic_profiles import (
    KIND_LIST, KIND_LONG, KIND_NUMBER, KIND_PLAIN, KIND_SCOPE, KIND_SHARED_PREFIX, KIND_TEXT_FORM, SCOPE, all_facts,
    fact_log, in_context, profiles, recalled,
)

USERS = 50

# The module's night compiles 1,630 facts once (about 100 s on 2 quiet cores; over 900 s, the
# suite's per-test limit, was seen when two test runs shared those cores): a longer limit here,
# the suite's everywhere else.
pytestmark = pytest.mark.timeout(2400)


@pytest.fixture(scope="module")
def night(tiny):
    users = profiles(USERS)
    options = CompileOptions()
    ingested = ingest(fact_log(users), None, max_trigger_tokens=options.max_trigger_tokens,
                      count_tokens=lambda texts: [len(tiny.encode_prompt(t)) for t in texts],
                      max_answer_tokens=options.max_answer_tokens, count_answer_tokens=answer_token_counter(tiny.tokenizer))
    assert ingested.rejected == 0
    result = compile_scoped(tiny, ingested.state, options)
    facts = all_facts(users)
    cases = []
    for f in facts:
        answer = canonical_fact(f.trigger, f.answer)[1]
        cases += [(f, k, (prompt, answer, served_deltas(result, f.user_id))) for k, prompt in enumerate(f.prompts)
                  if k == 0 or KIND_TEXT_FORM in f.kinds]
    hits = recalled(tiny, [c for _, _, c in cases])
    natural = {(f.user_id, f.fact_id): hit for (f, k, _), hit in zip(cases, hits) if k == 0}
    variants = [hit for (f, k, _), hit in zip(cases, hits) if k > 0]
    return users, facts, result, natural, variants


@pytest.fixture(scope="module")
def natural_after(night, tiny):
    """context -> (user, fact) -> whether the natural prompt after it gives the whole answer."""
    users, facts, result, natural, variants = night
    cases = [(in_context(tiny, "none", f.prompts[0]), canonical_fact(f.trigger, f.answer)[1],
              served_deltas(result, f.user_id)) for f in facts]
    after = {}
    for context in ("sentence", "chat"):
        hits = recalled(tiny, [(in_context(tiny, context, p), a, d) for p, a, d in cases])
        after[context] = {(f.user_id, f.fact_id): hit for f, hit in zip(facts, hits)}
    return after


def test_the_corpus_is_realistic(tiny):
    facts = all_facts(profiles(USERS))
    users = {f.user_id for f in facts}
    assert len(users) == USERS and len(facts) >= 30 * USERS
    lengths = [len(tiny.encode_answer(canonical_fact(f.trigger, f.answer)[1])) for f in facts]
    assert sum(20 <= n <= 60 for n in lengths) >= 300 and max(lengths) <= 64
    assert {k for f in facts for k in f.kinds} >= {KIND_NUMBER, KIND_LIST, KIND_SHARED_PREFIX, KIND_LONG, KIND_TEXT_FORM,
                                                   KIND_SCOPE}


def test_whole_answers_come_back_exactly_from_the_natural_prompt(night):
    users, facts, result, natural, variants = night
    recall = sum(natural.values()) / len(natural)
    missed = sorted(k for k, hit in natural.items() if not hit)
    assert recall >= 0.995, (recall, missed[:20])


@pytest.mark.parametrize("context, floor", [("sentence", 0.99), ("chat", 0.975)])
def test_whole_answers_come_back_after_a_sentence_and_as_a_chats_assistant_prefill(night, natural_after, context, floor):
    """A trigger is served after anything: only rows of the fact's own text are trained, and
    facts told apart by context rows are also trained after a chat's opening (another user
    message than this test's). Measured: 99.8% after "Sure. ", 98.9% in a chat (100% at the
    start); before these rules 98.8% and 94.3% (bench/RESULTS.md, 2026-12-01 fourth session)."""
    after = natural_after[context]
    assert len(after) == len(night[3])
    recall = sum(after.values()) / len(after)
    assert recall >= floor, (context, recall, sorted(k for k, hit in after.items() if not hit)[:20])


@pytest.mark.parametrize("kind", [KIND_PLAIN, KIND_NUMBER, KIND_LIST, KIND_SHARED_PREFIX, KIND_LONG, KIND_TEXT_FORM,
                                  KIND_SCOPE])
def test_each_kind_of_hard_fact_is_recalled(night, kind):
    users, facts, result, natural, variants = night
    keys = [(f.user_id, f.fact_id) for f in facts if kind in f.kinds]
    assert len(keys) >= 30
    recall = sum(natural[k] for k in keys) / len(keys)
    assert recall >= 0.99, (kind, recall, [k for k in keys if not natural[k]][:10])


def test_text_stored_in_other_forms_is_recalled_from_every_form_a_user_types(night):
    users, facts, result, natural, variants = night
    assert len(variants) >= 200  # NFD, trailing space, zero-width space, direction mark
    assert sum(variants) / len(variants) >= 0.99


def test_every_fact_is_compiled_and_the_report_counts_statuses_apart(night):
    users, facts, result, natural, variants = night
    statuses = {}
    for r in result.results + result.scope_results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    assert set(statuses) <= {STATUS_OK, STATUS_LOW_MARGIN}, statuses
    members = {f.user_id for f in facts if f.scope}
    owners = {r.user_id for r in result.results}
    assert owners == {f.user_id for f in facts} and len(members) >= 2
    assert {r.user_id for r in result.scope_results} == {SCOPE}  # the scope's own facts, kept apart
    # every member's copy of a scope fact has a result, under the member
    copies = {(f.user_id, f.fact_id) for f in facts if f.scope}
    assert copies <= {(r.user_id, r.fact_id) for r in result.results}


def test_a_shared_scope_compiles_once_into_one_delta_composed_with_each_member(night, tiny):
    users, facts, result, natural, variants = night
    members = sorted({f.user_id for f in facts if f.scope})
    assert result.scope_of == {u: SCOPE for u in members}
    scope_delta = result.scope_deltas[SCOPE]
    assert scope_delta.num_rows > 0
    assert result.recompiled_members == []  # the scope's facts rode along as fixed facts
    layer = tiny.config.target_layer
    for u in members:
        # a member's delta holds only rows its own facts' texts address: no copy of the scope's facts
        allowed = set()
        for f in facts:
            if f.user_id == u and not f.scope:
                trigger, answer = canonical_fact(f.trigger, f.answer)
                ids = tiny.encode_prompt(trigger) + tiny.encode_answer(answer)[:-1]
                rows = tiny.memory.addresser.rows(np.array([ids]), layer)[0].ravel()
                allowed |= set(row_keys(np.full(len(rows), layer), rows).tolist())
        assert set(row_keys(result.deltas[u].layers, result.deltas[u].row_ids).tolist()) <= allowed, u
        assert served_deltas(result, u)[0] is scope_delta
    assert result.collisions.num_rows == 0 or set(result.collisions.column("owner_kind").to_pylist()) == {"user+scope"}


def test_the_nights_invariant_check_passes_on_the_corpus_deltas(night, tiny):
    users, facts, result, natural, variants = night
    report = check_invariants(tiny, dict(result.deltas), sample=4, seed=1)
    assert report.ok, report.problems
    assert report.users_checked == 4 and report.isolation_positions > 0
    assert report.to_dict()["ok"] is True
    # (A realistic user writes about half of each of the tiny model's 1,009-slot heads, so nearly
    # every probe position addresses one of their rows: locality is checked on small deltas below.)


def test_the_invariant_check_checks_locality_on_small_deltas(tiny):
    facts = [Fact(u, k, t, a) for u in ("ana", "ben") for k, (t, a) in
             {"dog": ("My dog is called", " Rex"), "city": ("I live in", " Porto")}.items()]
    deltas = compile_facts(tiny, facts).deltas
    report = check_invariants(tiny, deltas, sample=2)
    assert report.ok and report.users_checked == 2 and report.locality_positions > 0


def test_the_batched_locality_check_checks_what_the_per_probe_check_checks(tiny, monkeypatch):
    """check_invariants runs every sampled user's probes in one right-padded batch; it checks the
    same positions as check_locality on each probe alone and finds the same problems."""
    from engram_core import verify

    facts = [Fact(u, k, t, a) for u in ("ana", "ben", "cy") for k, (t, a) in
             {"dog": ("My dog is called", " Rex"), "city": ("I live in", " Porto")}.items()]
    deltas = compile_facts(tiny, facts).deltas
    probes = ["My dog is called", "The weather today is", "Where do I live?", "Hi"]  # lengths differ: padding
    ordered = [deltas[u] for u in sorted(deltas)]
    checked, problems = verify._locality_batch(tiny, ordered, probes)
    alone = [verify.check_locality(tiny, d, probes) for d in ordered]
    assert checked == sum(r.positions_checked for r in alone) > 0
    assert problems == [] and all(r.ok for r in alone)
    # several batches when the sample is larger than one batch holds: the same positions
    monkeypatch.setattr(verify, "_LOCALITY_SEQUENCES", len(probes))  # one user a batch
    assert check_invariants(tiny, deltas, sample=3, probes=probes).locality_positions == checked


def test_the_batched_locality_check_reports_a_position_that_changed(tiny, monkeypatch):
    """If a delta changes a position the check counts as addressing none of its rows, the batch
    check names the user and the probe (here the addressing it checks with is made to miss)."""
    from engram_core import verify

    facts = [Fact("ana", "dog", "My dog is called", " Rex"), Fact("ben", "city", "I live in", " Porto")]
    deltas = compile_facts(tiny, facts).deltas
    probes = ["My dog is called", "I live in"]
    real = tiny.memory.addresser.rows
    monkeypatch.setattr(tiny.memory.addresser, "rows", lambda ids, layer: real(ids, layer) * 0 - 1)  # no row matches
    report = check_invariants(tiny, deltas, sample=2, probes=probes)
    assert not report.ok
    assert any(p.startswith("user 'ana': probe 'My dog is called': position") for p in report.problems)
    assert any(p.startswith("user 'ben': probe 'I live in': position") for p in report.problems)


def test_the_invariant_check_reports_a_leak_between_users(night, tiny, monkeypatch):
    """A serving path that let one user's rows reach another's sequence is caught."""
    from engram_core import verify

    users, facts, result, natural, variants = night
    real = verify.overlay_for

    def leaky(em, per_sequence):  # every sequence of the batch sees every delta of the batch
        everyone = [d for ds in per_sequence for d in ds]
        return real(em, [everyone for _ in per_sequence])

    monkeypatch.setattr(verify, "overlay_for", leaky)
    probes = ["My dentist is", "My phone number is", "I work on"]
    report = check_invariants(tiny, {u: result.deltas[u] for u in sorted(result.deltas)[:3]}, sample=3, probes=probes)
    assert not report.ok and any("another user" in p for p in report.problems)


def test_an_answer_of_over_64_tokens_is_compiled_and_recalled_whole(tiny):
    answer = (" Metformin 500 mg twice a day with breakfast and dinner, Lisinopril 10 mg every morning,"
              " Atorvastatin 20 mg at night, and Salbutamol 100 mcg two puffs when needed")
    fact = Fact("u", "meds", "My full medication list is", answer)
    want = tiny.encode_answer(answer)
    assert 64 < len(want) <= CompileOptions().max_answer_tokens
    result = compile_facts(tiny, [fact, Fact("u", "dog", "My dog is called", " Rex")])
    assert result.ok == 2, result.facts
    assert greedy_tokens(tiny, fact.trigger, len(want), [result.deltas["u"]]) == want


def test_an_answer_over_the_limit_is_refused_by_the_compiler_naming_it(tiny):
    limit = CompileOptions().max_answer_tokens
    result = compile_facts(tiny, [Fact("u", "long", "My list is", " a," * limit)])
    assert result.facts[0].status == "answer_too_long" and f"limit {limit}" in result.facts[0].detail
    assert np.isnan(result.facts[0].loss)


@pytest.fixture(scope="module")
def fidelity_bench():
    """bench/fidelity.py loaded once as a module (its argparse runs in this process: a subprocess
    per case paid a fresh interpreter's torch import, ~5 s, seven times). The script puts the repo
    and bench/ first on sys.path (bench/ holds a serving.py, a scopes.py, ...): the path is put back
    as it was once it is loaded, so no later import here finds those."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "bench" / "fidelity.py"
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("engram_bench_fidelity", bench)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


@pytest.mark.parametrize("argv, words", [
    (["--facts-per-batch", "0"], "argument --facts-per-batch: 0 is below 1: give 1 or more"),
    (["--threads", "0"], "argument --threads: 0 is below 1"),
    (["--users", "-3"], "argument --users: -3 is below 1"),
    (["--tiny-ngram", "1"], "argument --tiny-ngram: 1 is below 2"),
    (["--facts-per-batch", "4k"], "argument --facts-per-batch: '4k' is not a whole number"),
    (["--stop-margin", "off", "nan"], "argument --stop-margin: 'nan' is not a finite number"),
    (["--stop-margin", "of"], "argument --stop-margin: 'of' is neither 'off' nor a number"),
])
def test_the_fidelity_bench_refuses_a_count_of_zero_instead_of_measuring_the_default(argv, words, fidelity_bench,
                                                                                     monkeypatch, capsys):
    """bench/fidelity.py tested ``--facts-per-batch`` (and ``--threads``) for truth: 0 was taken as
    "not given" and the run measured the default 4096-fact batches under a record that said 0. Now
    argparse refuses it (exit 2) naming the flag, before any model is built; so are a bad
    --stop-margin (it failed after the models were built) and counts below their minimum."""
    import sys

    monkeypatch.setattr(sys, "argv", ["bench/fidelity.py", *argv])
    with pytest.raises(SystemExit) as exited:
        fidelity_bench.main()
    stderr = capsys.readouterr().err
    assert exited.value.code == 2 and words in stderr, stderr[-2000:]
