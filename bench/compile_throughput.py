"""Compile throughput: facts/s, exact recall and peak memory of the fact compiler.

Two presets:

* ``tiny``: the tiny Llama checkpoint (CPU friendly);
* ``d768``: a d=768, 12-layer Llama (vocab 32768, Engram at layers 2 and 7, facts written at
  7, 2- and 3-grams x 8 heads x 32 wide, ~100k slots per head), 16-token triggers, single-token
  answers, 15 Adam steps: the issue's GPU workload. Its tokenizer is a word-level vocabulary
  of 32768 synthetic words, so triggers are exactly 16 tokens.

Weights are seeded random (no hub). Recall is the compiler's own verification (greedy argmax
with margin, with the float16 values that are stored); ``--greedy-check N`` also decodes N
facts one at a time through ``generate``-style decoding.

    python bench/compile_throughput.py --preset tiny --facts 2000 --json
    python bench/compile_throughput.py --preset d768 --facts 200000 --batch 16384 --device cuda --json

No asserts on time: results go to bench/RESULTS.md by hand, with date and device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engram_core.checkpoint import attach_new_memory, load_checkpoint, save_engram  # noqa: E402
from engram_core.compiler import CompileOptions, Fact, compile_facts  # noqa: E402
from engram_core.config import EngramConfig  # noqa: E402
from engram_core.serving import greedy_tokens  # noqa: E402
from engram_core.tiny import build_base_model, init_tiny  # noqa: E402


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i:05d}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_d768(directory: Path) -> None:
    vocab = 32768
    tokenizer = word_tokenizer(vocab)
    model = build_base_model("llama", vocab, hidden=768, layers=12, seed=0)
    model.save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "tokenizer")
    config = EngramConfig(layers=(2, 7), write_layer=7, max_ngram=3, heads_per_order=8, row_width=32,
                          slots_per_head=100_003)
    memory = attach_new_memory(model, tokenizer, config, seed=1)
    memory.detach()
    save_engram(memory, directory / "engram")


def load_d768(attn: str = "eager", device: str = "cuda"):
    """The d768 checkpoint, built in a temporary directory and loaded in bf16 on ``device``."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        root.mkdir()
        build_d768(root)
        return load_checkpoint(root, device=device, dtype=torch.bfloat16, attn_implementation=attn)


def make_facts(em, n: int, trigger_words: int, facts_per_user: int, seed: int) -> list[Fact]:
    rng = random.Random(seed)
    vocab = len(em.tokenizer)
    special = set(em.tokenizer.all_special_ids)
    words = [em.tokenizer.convert_ids_to_tokens(i) for i in range(vocab) if i not in special]
    facts = []
    if trigger_words:  # word-level tokenizer: exact token counts
        for i in range(n):
            trigger = " ".join(rng.choice(words) for _ in range(trigger_words))
            facts.append(Fact(f"u{i // facts_per_user:07d}", f"f{i % facts_per_user}", trigger, " " + rng.choice(words)))
    else:  # tiny BPE model: templated personal facts
        from jobs.synthetic import FACT_TEMPLATES

        facts_per_user = min(facts_per_user, len(FACT_TEMPLATES))  # one fact per distinct trigger
        for i in range(n):
            fact_id, trigger, answers = FACT_TEMPLATES[i % facts_per_user]
            facts.append(Fact(f"u{i // facts_per_user:07d}", fact_id, trigger, " " + rng.choice(answers)))
    return facts


def flops_per_fact(em, trigger_tokens: int, steps: int, reuse_lower: bool = False) -> float:
    """Model FLOPs the compile of one single-token fact needs (the ceiling's numerator).

    Prefix (trigger minus its last token) once; per step: forward of the one live position
    through every layer and the LM head, backward of activations (weights are frozen) through
    the layers from the write layer up and the LM head; one verification forward.
    ``reuse_lower``: the live position's layers below the write layer run once, not per step.
    """
    base = em.model.get_base_model() if hasattr(em.model, "get_base_model") else em.model
    layers = base.model.layers
    per_layer = sum(p.numel() for p in layers[0].parameters())
    n_layers = len(layers)
    head = em.lm_head.weight.numel()
    engram = sum(p.numel() for n, p in em.memory.named_parameters() if not n.endswith("table")) / len(em.config.layers)
    fwd_token = 2 * (per_layer * n_layers + head + engram * len(em.config.layers))
    upper = n_layers - em.config.target_layer
    bwd_token = 2 * (per_layer * upper + head + engram)
    if reuse_lower:
        lower_once = 2 * (per_layer * em.config.target_layer + engram * sum(i < em.config.target_layer for i in em.config.layers))
        step_fwd = fwd_token - lower_once
        return (trigger_tokens - 1) * fwd_token + lower_once + steps * (step_fwd + bwd_token) + step_fwd
    return (trigger_tokens - 1) * fwd_token + steps * (fwd_token + bwd_token) + fwd_token


def deltas_digest(deltas) -> str:
    """sha256 over every user's delta (layers, rows, values): variants that must give the same
    deltas can be compared across a run."""
    digest = hashlib.sha256()
    for user in sorted(deltas):
        d = deltas[user]
        digest.update(user.encode() + b"\0")
        for part in (d.layers, d.row_ids, d.values):
            digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "d768"], default="tiny")
    ap.add_argument("--facts", type=int, default=2000)
    ap.add_argument("--facts-per-user", type=int, default=20)
    ap.add_argument("--batch", type=int, nargs="+", default=[512], help="facts per batch (several: a sweep)")
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on cuda)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="measured bf16 matmul rate, for the ratio")
    ap.add_argument("--greedy-check", type=int, default=50)
    ap.add_argument("--nondeterministic", action="store_true", help="allow non-deterministic kernels")
    ap.add_argument("--attn", nargs="+", default=["sdpa"], help="attention implementations to compare")
    ap.add_argument("--reuse-lower", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.reuse_lower_layers variants to compare in one run")
    ap.add_argument("--prefix-attention", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.prefix_attention variants to compare in one run")
    ap.add_argument("--prefix-groups", nargs="+", type=int, default=[CompileOptions.prefix_groups],
                    help="CompileOptions.prefix_groups variants to compare in one run")
    ap.add_argument("--plain-step", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.plain_step variants to compare in one run")
    ap.add_argument("--compiled-step", nargs="+", choices=["on", "off"], default=["off"],
                    help="CompileOptions.compiled_step variants (torch.compile of the plain step)")
    ap.add_argument("--overlap", nargs="+", choices=["on", "off"], default=["off"],
                    help="CompileOptions.overlap_batches variants (next batch prepared during this one's steps)")
    ap.add_argument("--prefix-kernel", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.prefix_kernel variants (Triton kernels for the prefix attention, compiled step)")
    ap.add_argument("--switch-interval", type=float, nargs="+", default=[None],
                    help="sys.setswitchinterval values (seconds) to compare: how often threads hand the GIL over")
    ap.add_argument("--fused-ops", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.fused_ops variants (one-kernel RMSNorm, lean rotary in preparation and verification)")
    ap.add_argument("--tokenize-workers", type=int, nargs="+", default=[CompileOptions.tokenize_workers],
                    help="CompileOptions.tokenize_workers variants (-1 automatic, 0 in this process, N processes)")
    ap.add_argument("--tiny-max-ngram", type=int, default=None,
                    help="tiny preset: N-gram orders 2..N with 16 // (N - 1) heads each (default: init_tiny's, 2..9; "
                         "3 is the tiny model before issue 17)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("engram_core.compiler").setLevel(logging.INFO)  # which step form each model uses
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        t0 = time.perf_counter()
        if args.preset == "tiny":
            orders = (args.tiny_max_ngram or 0) - 1
            init_tiny(root, engram=EngramConfig(layers=(1, 3), max_ngram=args.tiny_max_ngram, heads_per_order=16 // orders,
                                                slots_per_head=1009) if args.tiny_max_ngram else None)
            trigger_words = 0
        else:
            root.mkdir()
            build_d768(root)
            trigger_words = 16
        build_s = time.perf_counter() - t0
        em = load_checkpoint(root, device=args.device, dtype=dtype)
        facts = make_facts(em, args.facts, trigger_words, args.facts_per_user, seed=0)
        trigger_tokens = len(em.encode_prompt(facts[0].trigger))
        runs = []
        variants = [(a, b, r, p, g, ps, cs, ov, si, pk, tw, fn) for a in args.attn for b in args.batch for r in args.reuse_lower
                    for p in args.prefix_attention for g in args.prefix_groups for ps in args.plain_step
                    for cs in args.compiled_step for ov in args.overlap for si in args.switch_interval
                    for pk in args.prefix_kernel for tw in args.tokenize_workers for fn in args.fused_ops]
        models = {}  # one model per attention implementation: its compiled steps are kept across variants
        default_interval = sys.getswitchinterval()
        for attn, batch, reuse, prefix_attn, groups, plain, compiled, overlap, interval, kernel, workers, norms in variants:
            sys.setswitchinterval(interval or default_interval)
            if attn not in models:
                models[attn] = load_checkpoint(root, device=args.device, dtype=dtype, attn_implementation=attn)
            em = models[attn]
            opts = CompileOptions(steps=args.steps, facts_per_batch=batch, deterministic=not args.nondeterministic,
                                  reuse_lower_layers=reuse == "on", prefix_attention=prefix_attn == "on", prefix_groups=groups, plain_step=plain == "on",
                                  compiled_step=compiled == "on", overlap_batches=overlap == "on", prefix_kernel=kernel == "on",
                                  tokenize_workers=workers, fused_ops=norms == "on",
                                  **({"lr": args.lr} if args.lr is not None else {}))
            warm = time.perf_counter()
            compile_facts(em, facts[: min(len(facts), batch)], opts)  # warm-up (kernels, allocator, torch.compile)
            warm_up_s = time.perf_counter() - warm
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            try:
                result = compile_facts(em, facts, opts)
            except torch.OutOfMemoryError as error:  # a batch too large for this GPU: say so, go on
                runs.append({"facts_per_batch": batch, "overlap": overlap, "error": str(error).splitlines()[0]})
                print(f"batch {batch}: out of memory", file=sys.stderr)
                torch.cuda.empty_cache()
                continue
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            checked = facts[: args.greedy_check]
            greedy_ok = sum(
                greedy_tokens(em, f.trigger, len(em.encode_answer(f.answer)), [result.deltas[f.user_id]])
                == em.encode_answer(f.answer) for f in checked
            )
            from engram_core.compiler import _LOWER_REUSE_OK, _STEPS

            forms = {f"{k[0]},{k[1]}": v for k, v in _LOWER_REUSE_OK.get(em.model, {}).items()}
            run = {
                "step_forms_checked": forms, "plain_step": plain, "compiled_step": compiled, "overlap": overlap, "prefix_kernel": kernel,
                "tokenize_workers": workers, "fused_ops": norms,
                "switch_interval_s": sys.getswitchinterval(),
                "deltas_sha256": deltas_digest(result.deltas),
                "compiled_in_use": [s.compiled for s in _STEPS.get(em.model, {}).values()],
                "warm_up_s": round(warm_up_s, 1),
                "attn": attn, "facts_per_batch": batch, "reuse_lower": reuse, "prefix_attention": prefix_attn, "prefix_groups": groups, "facts": len(facts), "seconds": round(seconds, 3),
                "phases_s": result.timings,
                "facts_per_s": round(len(facts) / seconds, 1), "recall": result.ok / len(facts),
                "greedy_checked": len(checked), "greedy_ok": greedy_ok,
                "retried_facts": sum(r.steps > args.steps for r in result.facts),
                "bytes_per_user": round(sum(d.nbytes for d in result.deltas.values()) / max(len(result.deltas), 1)),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
            }
            flops = flops_per_fact(em, trigger_tokens, args.steps)
            run["gflop_per_fact"] = round(flops / 1e9, 3)
            run["gflop_per_fact_min"] = round(flops_per_fact(em, trigger_tokens, args.steps, reuse_lower=True) / 1e9, 3)
            run["achieved_tflops"] = round(flops * run["facts_per_s"] / 1e12, 1)
            if args.peak_tflops:
                run["ceiling_facts_per_s"] = round(args.peak_tflops * 1e12 / flops)
                run["fraction_of_ceiling"] = round(run["facts_per_s"] / run["ceiling_facts_per_s"], 3)
                # the same with the least work the method needs (lower layers once per batch)
                run["ceiling_min_facts_per_s"] = round(args.peak_tflops * 1e12 / (run["gflop_per_fact_min"] * 1e9))
            runs.append(run)
    out = {
        "preset": args.preset, "deterministic": not args.nondeterministic, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": str(dtype), "trigger_tokens": trigger_tokens, "steps": args.steps, "build_seconds": round(build_s, 1),
        "fingerprint": em.fingerprint, "runs": runs,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for run in runs:
            if "error" in run:
                print(f"batch {run['facts_per_batch']}: {run['error']}")
                continue
            print(f"{out['preset']} on {out['device']} batch {run['facts_per_batch']} reuse {run['reuse_lower']} prefix-attn {run['prefix_attention']} "
                  f"plain {run['plain_step']} compiled {run['compiled_step']} overlap {run['overlap']}: {run['facts_per_s']} facts/s, "
                  f"recall {run['recall']:.4f}, greedy {run['greedy_ok']}/{run['greedy_checked']}, "
                  f"{run['achieved_tflops']} TFLOP/s, peak {run['peak_gpu_gib']} GiB, phases {run['phases_s']}")


if __name__ == "__main__":
    main()
