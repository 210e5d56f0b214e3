"""Tokenizing facts in worker processes (engram_core.tokenize_pool): the ids, the rejections and
the compiled deltas are those of tokenizing in the compiling process; a failed worker falls back
to it."""

from __future__ import annotations

import logging
import os
import signal

import numpy as np
import pytest

from engram_core import tokenize_pool
from engram_core.checkpoint import load_checkpoint
from engram_core.compiler import CompileOptions, Fact, _validate, compile_facts


def facts_with_rejects(num_users: int = 6) -> list[Fact]:
    triggers = ["My dentist is Dr.", "The name of my cat is", "I was born in the city of", "My favourite tea is"]
    answers = [" Rex", " Luna Park", " Porto", " green tea from Kyoto"]
    facts = [Fact(f"user-{u}", f"fact-{k}", t, answers[(u + k) % 4]) for u in range(num_users) for k, t in enumerate(triggers)]
    facts += [
        Fact("user-0", "empty-trigger", "   ", " Rex"),
        Fact("user-1", "empty-answer", "My dog is", ""),
        Fact("user-2", "long-trigger", " ".join(["word"] * 200), " Rex"),
        Fact("user-3", "long-answer", "My motto is", " and" * 50),
    ]
    return facts


def as_plain(validated):
    return [(seq.input_ids, seq.targets, seq.fact) if seq is not None else (result.status, result.detail, result.fact_id)
            for seq, result in validated]


@pytest.fixture()
def em(tiny_checkpoints):
    return load_checkpoint(tiny_checkpoints("llama"))


def test_worker_processes_tokenize_exactly_as_this_process(em):
    facts = facts_with_rejects()
    options = CompileOptions(max_trigger_tokens=40, max_answer_tokens=16)
    here = as_plain(_validate(em, facts, CompileOptions(max_trigger_tokens=40, max_answer_tokens=16, tokenize_workers=0)))
    for workers in (1, 3):
        pooled = as_plain(_validate(em, facts, CompileOptions(max_trigger_tokens=40, max_answer_tokens=16,
                                                              tokenize_workers=workers)))
        assert pooled == here
    statuses = {row[2]: row[0] for row in here if isinstance(row[0], str)}
    assert statuses == {"empty-trigger": "empty_trigger", "empty-answer": "empty_answer",
                        "long-trigger": "trigger_too_long", "long-answer": "answer_too_long"}
    assert sum(not isinstance(row[0], str) for row in here) == len(facts) - 4
    assert options.tokenize_workers == -1  # automatic by default: no workers for a CPU model
    assert tokenize_pool.shared_pool(em.plain_backend().to_str(), 3).workers == 3  # the pool stays up for reuse


def test_each_distinct_text_is_tokenized_once_with_the_ids_of_one_text_at_a_time(em):
    """Facts that share trigger texts across users (a templated log): encode_pairs hands the
    tokenizer each distinct text once, and every fact gets exactly the ids its texts have when
    each is tokenized alone; rejections (empty, too long) stay per fact."""
    facts = facts_with_rejects(num_users=6)
    backend = em.plain_backend()
    encode = tokenize_pool.backend_encoder(backend)
    seen: list[list[str]] = []

    def counting(texts, add_special_tokens):
        seen.append(list(texts))
        return encode(texts, add_special_tokens)

    pairs = tokenize_pool.encode_pairs(counting, [f.trigger for f in facts], [f.answer for f in facts], 40, 16)
    triggers, answers = seen
    assert len(triggers) == len(set(triggers)) == 6  # 4 shared triggers + the two long ones (24 facts had them)
    assert len(answers) == len(set(answers)) == 5
    for fact, pair in zip(facts, pairs):
        if isinstance(pair[0], str):
            continue
        alone_trigger, alone_answer = encode([fact.trigger], True)[0], encode([fact.answer], False)[0]
        assert pair == (alone_trigger + alone_answer[:-1], alone_answer), fact
    assert [p[0] for p in pairs if isinstance(p[0], str)] == ["empty_trigger", "empty_answer", "trigger_too_long",
                                                                "answer_too_long"]
    assert len({id(p[0]) for p in pairs if not isinstance(p[0], str)}) == len(facts) - 4  # inputs are not shared lists


def test_a_dead_worker_falls_back_to_this_process_with_a_warning(em, caplog):
    facts = facts_with_rejects(3)
    options = CompileOptions(tokenize_workers=2)
    expected = as_plain(_validate(em, facts, CompileOptions(tokenize_workers=0)))
    pool = tokenize_pool.shared_pool(em.plain_backend().to_str(), 2)
    victim = pool._procs[1]
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    with caplog.at_level(logging.WARNING, logger="engram_core.compiler"):
        assert as_plain(_validate(em, facts, options)) == expected
    assert "tokenizing in this process instead" in caplog.text and "exited" in caplog.text
    fresh = tokenize_pool.shared_pool(em.plain_backend().to_str(), 2)
    assert fresh is not pool  # the broken pool was closed and dropped; the next call starts another
    assert as_plain(_validate(em, facts, options)) == expected


def test_a_worker_error_is_reported_not_swallowed():
    pool = tokenize_pool.TokenizePool('{"not": "a tokenizer"}', 1)
    try:
        with pytest.raises(tokenize_pool.TokenizePoolError, match="did not load"):
            pool.encode_pairs(["My dog is"], [" Rex"], 64, 16)
    finally:
        pool.close()


def test_compiling_with_worker_processes_gives_the_same_deltas(em):
    facts = [f for f in facts_with_rejects(4) if not f.fact_id.startswith(("empty", "long"))]
    here = compile_facts(em, facts, CompileOptions(facts_per_batch=64, tokenize_workers=0))
    pooled = compile_facts(em, facts, CompileOptions(facts_per_batch=64, tokenize_workers=2))
    assert here.ok == pooled.ok > 0
    assert sorted(here.deltas) == sorted(pooled.deltas)
    for user, delta in here.deltas.items():
        other = pooled.deltas[user]
        assert np.array_equal(delta.row_ids, other.row_ids) and delta.values.tobytes() == other.values.tobytes()


def test_a_forked_child_starts_its_own_workers(em):
    """A child forked after the parent started its workers must not talk to them (their pipes
    are the parent's): it starts its own pool."""
    import multiprocessing

    facts = facts_with_rejects(2)
    expected = as_plain(_validate(em, facts, CompileOptions(tokenize_workers=0)))
    parent_pool = tokenize_pool.shared_pool(em.plain_backend().to_str(), 1)
    assert as_plain(_validate(em, facts, CompileOptions(tokenize_workers=1))) == expected

    def child(queue):
        pool = tokenize_pool.shared_pool(em.plain_backend().to_str(), 1)
        queue.put((pool is parent_pool, as_plain(_validate(em, facts, CompileOptions(tokenize_workers=1))) == expected))

    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    process = context.Process(target=child, args=(queue,))
    process.start()
    same_pool, same_results = queue.get(timeout=60)
    process.join(timeout=60)
    assert not same_pool and same_results and process.exitcode == 0
    assert as_plain(_validate(em, facts, CompileOptions(tokenize_workers=1))) == expected  # the parent's still work
