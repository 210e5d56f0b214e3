"""Fidelity: whole-answer recall of realistic profiles through the serving path, per kind, with
the compile rate beside it (so fidelity is never bought by a silent slowdown).

The corpus is tests/fixtures/realistic_profiles.py (personal and medical profiles, ~32 facts per
user: numbers and years shared between facts, lists with repeated words, answers sharing a
prefix, answers of 20-60 tokens, text stored in NFD / with invisible characters / with the
boundary space misplaced, a shared scope). The night's path, without the store:

    fact log -> pipeline.ingest.ingest (canonical text, token limits) -> pipeline.scopes.compile_scoped
             -> engram_core.serving.generate with each user's (scope, own) deltas, natural prompts

A fact counts as recalled when greedy decoding from the natural prompt (and, for text-form
facts, from its NFD / invisible-character / trailing-space variants) gives the whole answer.

    python bench/fidelity.py --users 50 --json
    python bench/fidelity.py --users 10 --tiny-ngram 3 9 --resolve-conflicts on off --json
    python bench/fidelity.py --preset d768 --device cuda --tiny-ngram 9 3 --json    # the GPU shape
    python bench/fidelity.py --users 10 --contacts 32 --json    # + many facts from one template per user
    python bench/fidelity.py --users 50 --context sentence chat --json    # + prompts after a sentence, in a chat
    python bench/fidelity.py --users 20 --answer-end --json    # + whole answers with nothing after them,
                                                               #   with the memory-end stop rule and without
    python bench/fidelity.py --users 6 --corpus numeric --answer-end --json    # another kind of user
                                                               #   (tests/fixtures/overlap_profiles.py)

No asserts: results go to bench/RESULTS.md by hand, with date and machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engram_core.checkpoint import load_checkpoint  # noqa: E402
from engram_core.compiler import CompileOptions, status_counts  # noqa: E402
from engram_core.config import EngramConfig  # noqa: E402
from engram_core.text import canonical_fact  # noqa: E402
from engram_core.tiny import TINY_MAX_NGRAM, init_tiny  # noqa: E402
from pipeline.ingest import answer_token_counter, ingest  # noqa: E402
from pipeline.scopes import compile_scoped, served_deltas  # noqa: E402
from compile_throughput import count_arg  # noqa: E402
from tests.fixtures.overlap_profiles import CORPORA, overlap_profiles  # noqa: E402
from tests.fixtures.realistic_profiles import (  # noqa: E402
    CONTEXTS, KINDS, KIND_TEXT_FORM, all_facts, fact_log, in_context, profiles, recalled,
)


D768_TEXT_VOCAB = 8192
"""Vocabulary of the byte-level BPE tokenizer the d768 preset is built with here (trained on the
tiny model's embedded corpus: engram_core.tiny.build_tokenizer)."""


def tiny_config(max_ngram: int) -> EngramConfig:
    """The tiny model's Engram with orders 2..max_ngram and 16 rows per position where it divides."""
    orders = max_ngram - 1
    heads = max(1, 16 // orders)
    return EngramConfig(layers=(1, 3), max_ngram=max_ngram, heads_per_order=heads, slots_per_head=1009)


def answer_ends(em, cases, extra_tokens: int = 16, batch: int = 64) -> dict:
    """Whole answers with nothing after them, with the memory-end stop rule
    (:class:`engram_core.serving.MemoryEnd`) and without: ``cases`` are (prompt, answer, deltas),
    decoded greedily for the answer's tokens plus ``extra_tokens`` (room to run on). "exact":
    the text is the answer; "prefix": it starts with it (recall as :func:`recalled` counts it);
    "cut_short": the rule ended it inside the answer; "ran_on": more text after the answer."""
    from engram_core.serving import generate_ended

    counts = {"cases": len(cases)}
    seconds = {}
    for rule in (True, False):
        ended, start = [], time.perf_counter()
        for at in range(0, len(cases), batch):
            chunk = cases[at:at + batch]
            n = max(len(em.encode_answer(answer)) for _, answer, _ in chunk) + extra_tokens
            ended += generate_ended(em, [p for p, _, _ in chunk], [list(d) for _, _, d in chunk], n, rule)
        seconds[rule] = time.perf_counter() - start
        name = "with_rule" if rule else "without_rule"
        texts = [text for text, _ in ended]
        answers = [answer for _, answer, _ in cases]
        counts[name] = {
            "exact": sum(t == a for t, a in zip(texts, answers)),
            "prefix": sum(t.startswith(a) for t, a in zip(texts, answers)),
            "cut_short": sum(a.startswith(t) and t != a for t, a in zip(texts, answers)),
            "ran_on": sum(t.startswith(a) and t != a for t, a in zip(texts, answers)),
            "finish_reasons": {r: sum(reason == r for _, reason in ended) for r in sorted({r for _, r in ended})},
            "decode_seconds": round(seconds[rule], 2),
            "failed": [a for t, a in zip(texts, answers) if t != a][:5] if rule else [],
        }
    return counts


def measure(em, users, options: CompileOptions, contexts=("none",), answer_end: bool = False) -> dict:
    counter = answer_token_counter(em.tokenizer)
    ingested = ingest(fact_log(users), None, max_trigger_tokens=options.max_trigger_tokens,
                      count_tokens=lambda texts: [len(em.encode_prompt(t)) for t in texts],
                      max_answer_tokens=options.max_answer_tokens, count_answer_tokens=counter)
    start = time.perf_counter()
    result = compile_scoped(em, ingested.state, options)
    seconds = time.perf_counter() - start
    facts = all_facts(users)
    cases, kinds = [], []
    for f in facts:
        answer = canonical_fact(f.trigger, f.answer)[1]
        deltas = served_deltas(result, f.user_id)
        prompts = f.prompts if KIND_TEXT_FORM in f.kinds else f.prompts[:1]
        for k, prompt in enumerate(prompts):
            cases.append((prompt, answer, deltas))
            kinds.append((f, k))
    start_serve = time.perf_counter()
    ok = recalled(em, cases)
    serve_seconds = time.perf_counter() - start_serve
    after = {}
    for name in contexts:
        if name == "none":
            continue
        natural = [(in_context(em, name, p), a, d) for (p, a, d), (_, k) in zip(cases, kinds) if k == 0]
        hits = recalled(em, natural)
        first = [f for f, k in kinds if k == 0]
        after[name] = {"recalled": sum(hits), "facts": len(hits), "recall": round(sum(hits) / len(hits), 4),
                            "missed_by_kind": {kind: sum(not h and kind in f.kinds for f, h in zip(first, hits))
                                               for kind in KINDS},
                            "failed": [f"{f.user_id}/{f.fact_id}" for f, h in zip(first, hits) if not h][:20]}
    whole: dict[tuple, bool] = {}
    first_prompt: dict[tuple, bool] = {}
    for (f, k), hit in zip(kinds, ok):
        key = (f.user_id, f.fact_id)
        whole[key] = whole.get(key, True) and hit
        if k == 0:
            first_prompt[key] = hit
    per_kind = {}
    for kind in KINDS + ("all",):
        keys = [(f.user_id, f.fact_id) for f in facts if kind == "all" or kind in f.kinds]
        if keys:
            per_kind[kind] = {"facts": len(keys), "recalled": sum(first_prompt[k] for k in keys),
                              "recall": round(sum(first_prompt[k] for k in keys) / len(keys), 4)}
    ends = {}
    if answer_end:  # natural prompts (and after each context asked for)
        natural = [(p, a, d) for (p, a, d), (_, k) in zip(cases, kinds) if k == 0]
        ends["none"] = answer_ends(em, natural)
        ends["none"]["prefix_at_answer_length"] = sum(first_prompt.values())  # recalled() above: unchanged?
        for name in contexts:
            if name != "none":
                ends[name] = answer_ends(em, [(in_context(em, name, p), a, d) for p, a, d in natural])
    variants = [key for key, (f, k) in zip(range(len(kinds)), kinds) if k > 0]
    compiled_facts = len(result.results)  # users' facts (the scopes' own are result.scope_results)
    return {
        "users": len(users), "facts": len(facts), "ingest_rejects": ingested.rejected,
        "compile_seconds": round(seconds, 2), "compiled_facts_per_s": round(compiled_facts / seconds, 1),
        "statuses": status_counts(result.results + result.scope_results), "recall_natural_prompt": per_kind,
        "recall_all_prompt_forms": round(sum(whole.values()) / len(whole), 4),
        "prompt_variants_checked": len(variants),
        "prompt_variants_recalled": sum(ok[i] for i in variants),
        "failed": sorted(f"{u}/{fid}" for (u, fid), hit in first_prompt.items() if not hit)[:20],
        "serve_seconds": round(serve_seconds, 2),
        "recall_natural_prompt_after": after,
        "steps_mean": round(float(np.mean([r.steps for r in result.results])), 2) if result.results else None,
        "margin_percentiles_10_50_90": ([round(float(x), 2) for x in np.percentile([r.margin for r in result.results], [10, 50, 90])]
                                        if result.results else None),
        "delta_bytes_per_user": round(sum(d.nbytes for d in result.deltas.values()) / max(len(result.deltas), 1)),
        **({"answer_end": ends} if answer_end else {}),
    }


def stop_margin_arg(text: str) -> str:
    """--stop-margin's values: ``off`` or a finite number (refused by argparse, before any model is built)."""
    if text == "off":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither 'off' nor a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=count_arg(1), default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None, help="a checkpoint directory (default: build the tiny model)")
    ap.add_argument("--preset", choices=["tiny", "d768"], default="tiny",
                    help="the model to build when --model is not given: the tiny Llama, or the d768 shape of "
                         "bench/compile_throughput.py with a text (byte-level BPE) tokenizer so that realistic text "
                         "tokenizes as words; --tiny-ngram then sets its N-gram orders too (default 2..9)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the d768 preset runs in bf16 on cuda)")
    ap.add_argument("--tiny-ngram", type=count_arg(2), nargs="+", default=[None],
                    help="build tiny models with N-gram orders 2..N (default: init_tiny's default)")
    ap.add_argument("--resolve-conflicts", nargs="+", choices=["on", "off"], default=["on"])
    ap.add_argument("--context-copies", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.context_copies: facts in conflict also trained after a chat's opening")
    ap.add_argument("--contacts", type=count_arg(0), default=0,
                    help="add this many contacts' phone numbers to each user (one trigger template, names that "
                         "differ, numbers sharing the user's country and area code: the 'template' kind)")
    ap.add_argument("--context", nargs="+", choices=CONTEXTS, default=["none"],
                    help="also decode each natural prompt after a sentence ('Sure. ') or as a chat's assistant "
                         "prefill (recall_natural_prompt_after); none: the prompt alone only")
    ap.add_argument("--answer-end", action="store_true",
                    help="also count whole answers with nothing after them, with the memory-end stop rule and "
                         "without (answer_end; prefix recall beside it)")
    ap.add_argument("--corpus", choices=CORPORA, default="realistic",
                    help="the users: realistic profiles (default), or users whose facts overlap each other's text: "
                         "numeric (numbers sharing digits) or shared_words (answers that start or trigger others)")
    ap.add_argument("--min-margin", type=float, default=CompileOptions.min_margin, help="CompileOptions.min_margin")
    ap.add_argument("--steps", type=count_arg(1), default=CompileOptions.steps, help="CompileOptions.steps")
    ap.add_argument("--stop-margin", nargs="+", type=stop_margin_arg, default=["off"],
                    help="CompileOptions.stop_margin: off or a margin (several: a sweep)")
    ap.add_argument("--stop-per-user", nargs="+", choices=["off", "on"], default=["off"],
                    help="CompileOptions.stop_per_user (with a --stop-margin): each user stops at its own step "
                         "(several: a sweep)")
    ap.add_argument("--facts-per-batch", type=count_arg(1), default=None,
                    help="CompileOptions.facts_per_batch (default the option's 4096); small batches let "
                         "--stop-margin stop batches whose least margin clears the bar")
    ap.add_argument("--threads", type=count_arg(1), default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    users = (profiles(args.users, seed=args.seed, contacts=args.contacts) if args.corpus == "realistic"
             else overlap_profiles(args.corpus, args.users, seed=args.seed))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for ngram in args.tiny_ngram:
            if args.model:
                root = Path(args.model)
            elif args.preset == "d768":
                from compile_throughput import build_d768

                from engram_core.tiny import build_tokenizer

                root = Path(tmp) / f"d768-{ngram}"
                root.mkdir()
                build_d768(root, max_ngram=ngram or TINY_MAX_NGRAM, tokenizer=build_tokenizer(D768_TEXT_VOCAB))
            else:
                root = Path(tmp) / f"tiny-{ngram}"
                init_tiny(root, engram=tiny_config(ngram) if ngram else None)
            dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
            em = load_checkpoint(root, device=args.device, dtype=dtype,
                                 attn_implementation="eager" if args.device == "cuda" else None)
            for resolve, copies, stop, per_user in itertools.product(args.resolve_conflicts, args.context_copies,
                                                                     args.stop_margin, args.stop_per_user):
                if per_user == "on" and stop == "off":
                    continue  # the per-user stop needs a margin
                run = {"model": str(args.model or args.preset), "max_ngram": em.config.max_ngram,
                       "heads_per_order": em.config.heads_per_order, "resolve_conflicts": resolve,
                       "context_copies": copies, "min_margin": args.min_margin, "steps": args.steps,
                       "stop_margin": stop, "stop_per_user": per_user, "facts_per_batch": args.facts_per_batch}
                options = CompileOptions(resolve_conflicts=resolve == "on", context_copies=copies == "on",
                                         min_margin=args.min_margin, steps=args.steps,
                                         stop_margin=None if stop == "off" else float(stop), stop_per_user=per_user == "on",
                                         **({"facts_per_batch": args.facts_per_batch} if args.facts_per_batch is not None else {}))
                run.update(measure(em, users, options, args.context, args.answer_end))
                runs.append(run)
                if not args.json:
                    print(json.dumps(run, indent=1))
            if args.model:
                break
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    out = {"device": device, "threads": torch.get_num_threads(), "seed": args.seed, "corpus": args.corpus,
           "contacts": args.contacts,
           "runs": runs}
    if args.json:
        print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
