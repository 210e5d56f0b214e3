"""Compile throughput: facts/s, exact recall and peak memory of the fact compiler.

Presets (``--dry-run`` prints each one's shape, parameter count and FLOP ceiling without
building it):

* ``tiny``: the tiny Llama checkpoint (CPU friendly);
* ``d768``: a d=768, 12-layer Llama (vocab 32768, Engram at layers 2 and 7, facts written at
  7, 2- and 3-grams x 8 heads x 32 wide, ~100k slots per head), 16-token triggers, single-token
  answers, 15 Adam steps: the issue's GPU workload. Its tokenizer is a word-level vocabulary
  of 32768 synthetic words, so triggers are exactly 16 tokens.
* ``qwen0.5b``, ``llama1b``, ``llama8b``: the shapes of Qwen2.5-0.5B, Llama-3.2-1B and
  Llama-3-8B (issue 18) through transformers' own configs, untied output embedding, with the
  same Engram sizes as d768 at layer 2 and about 60% depth, and a word-level tokenizer of the
  model's vocabulary size. They are built in memory directly on ``--device`` in ``--dtype``
  (no checkpoint written and reloaded: an 8B model's CPU initialisation takes minutes);
  ``--layers``/``--vocab`` shrink one for a CPU check.

Workloads (``--workload``, several: variants in one run): ``random``, a random trigger per
fact; ``templated``, ``--templates`` trigger texts drawn once and shared by all users (each
user's facts take distinct ones), answers random per user, as real fact logs share "My dentist
is". ``--dedupe-prefixes on off`` compares computing each distinct prefix once per batch
(``CompileOptions.dedupe_prefixes``) with once per fact.

Weights are seeded random (no hub). Recall is the compiler's own verification (greedy argmax
with margin, with the float16 values that are stored); ``--greedy-check N`` also decodes N
facts one at a time through ``generate``-style decoding.

    python bench/compile_throughput.py --preset tiny --facts 2000 --json
    python bench/compile_throughput.py --preset d768 --facts 200000 --batch 16384 --device cuda --json
    python bench/compile_throughput.py --preset d768 --workload random templated --dedupe-prefixes on off --json
    python bench/compile_throughput.py --dry-run
    python bench/compile_throughput.py --preset d768 --facts 524288 --batch 65536 --compiled-step on --processes 2 --json

``--processes N`` runs N processes on the one device, each compiling its own users' share of the
facts (as N nightly compile actors on one GPU with ``gpus_per_worker: 1/N``); each warms up, all
start the timed compile together (a file barrier), and the rate is all facts over the time from
the first start to the last end. The GPU's idle time while one process does host work (batch
layout, tokenizing, assembly) is filled by another's kernels.

No asserts on time: results go to bench/RESULTS.md by hand, with date and device.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from engram_core.checkpoint import attach_new_memory, load_checkpoint, save_engram  # noqa: E402
from engram_core.compiler import CompileOptions, Fact, compile_facts, effective_lr  # noqa: E402
from engram_core import prefix_kernels  # noqa: E402
from engram_core.config import EngramConfig  # noqa: E402
from engram_core.serving import greedy_tokens  # noqa: E402
from engram_core.tiny import build_base_model, init_tiny  # noqa: E402


def count_arg(minimum: int):
    """An argparse ``type``: an int of at least ``minimum``; anything else is refused by argparse
    naming the flag and the value (a 0 was taken as "not given" where the script tested it for
    truth, and the run measured the default without a word)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}: give {minimum} or more")
        return value
    return parse


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


def build_d768(directory: Path, *, max_ngram: int = 3, tokenizer=None) -> None:
    """Write the d768 checkpoint to ``directory``: Engram at layers 2 and 7 with N-gram orders
    2..``max_ngram`` and ``16 // (max_ngram - 1)`` heads per order (8 at the default 2..3, 2 at 2..9:
    16 per position; fewer where N - 1 does not divide 16), 32 wide, 100,003 slots per head. ``tokenizer``: default the word-level vocabulary of
    32,768 synthetic words; a text tokenizer (e.g. :func:`engram_core.tiny.build_tokenizer`) gives
    the same shape for realistic text (bench/fidelity.py)."""
    if not 2 <= max_ngram <= 17:
        raise ValueError(f"build_d768: max_ngram must be 2..17 (orders 2..N, 16 // (N - 1) heads each), got {max_ngram}")
    tokenizer = tokenizer or word_tokenizer(32768)
    model = build_base_model("llama", len(tokenizer), hidden=768, layers=12, seed=0)
    model.save_pretrained(directory / "base")
    tokenizer.save_pretrained(directory / "tokenizer")
    config = EngramConfig(layers=(2, 7), write_layer=7, max_ngram=max_ngram, heads_per_order=16 // (max_ngram - 1),
                          row_width=32, slots_per_head=100_003)
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


# -- presets: model shapes ---------------------------------------------------------------------

ENGRAM_SIZES = dict(max_ngram=3, heads_per_order=8, row_width=32, slots_per_head=100_003)
"""The Engram sizes of every word-level preset (d768's): 2- and 3-grams x 8 heads x 32 wide."""


@dataclass(frozen=True)
class Shape:
    """A decoder-only model shape for the benchmark (dimensions as in the model's HF config).

    ``engram_layers``: layers that read an Engram lookup, the last one written (layer 2 and
    about 60% depth). ``suggested_batch``: facts per batch that fit one 80-141 GB GPU (issue 18's
    runs: 32,768 for the Qwen2.5-0.5B shape, 16,384 for Llama-3.2-1B); a guide, not measured
    here for llama8b."""

    name: str
    family: str  # "llama" | "qwen2" (transformers' model_type)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    vocab: int
    engram_layers: tuple[int, ...]
    suggested_batch: int
    rope_theta: float = 10_000.0
    source: str = ""

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def scaled(self, layers: int | None = None, vocab: int | None = None) -> "Shape":
        """The same widths with fewer layers or a smaller vocabulary (a CPU check of the preset):
        Engram stays at layer 2 and about 60% depth (at least one layer above 2)."""
        layers = layers or self.layers
        return replace(self, layers=layers, vocab=vocab or self.vocab, engram_layers=engram_layers_for(layers))

    def hf_config(self):
        """transformers' config of this shape (random init; untied output embedding)."""
        from transformers import LlamaConfig, Qwen2Config

        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[self.family]
        return cls(vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.mlp,
                   num_hidden_layers=self.layers, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                   max_position_embeddings=4096, rope_theta=self.rope_theta, tie_word_embeddings=False,
                   pad_token_id=0, eos_token_id=1)

    def engram_config(self) -> EngramConfig:
        return EngramConfig(layers=self.engram_layers, write_layer=self.engram_layers[-1], **ENGRAM_SIZES)

    def counts(self) -> "ModelCounts":
        """Parameter counts from the dimensions alone (no model built): what flops_per_fact reads
        from a built model (tests/test_compile_presets.py checks them against one)."""
        d, hd = self.hidden, self.head_dim
        q, kv = self.heads * hd, self.kv_heads * hd
        attention = d * q + 2 * d * kv + q * d
        if self.family == "qwen2":
            attention += q + 2 * kv  # q, k, v biases
        per_layer = attention + 3 * d * self.mlp + 2 * d  # + the two RMSNorms' weights
        config = self.engram_config()
        engram = 2 * config.engram_dim * d + (d * config.conv_kernel if config.short_conv else 0)
        base = 2 * self.vocab * d + self.layers * per_layer + d  # embeddings, layers, final norm
        return ModelCounts(per_layer=per_layer, layers=self.layers, head=self.vocab * d, engram=engram,
                           engram_layers=config.layers, write_layer=config.target_layer, base_params=base)


def engram_layers_for(layers: int) -> tuple[int, int]:
    """Layer 2 and about 60% depth (d768: 2 and 7 of 12)."""
    return 2, max(3, round(0.6 * layers))


SHAPES = {
    "d768": Shape("d768", "llama", 768, 12, 4, 2, 1536, 32768, (2, 7), 65536,
                  source="this repo's GPU workload (bench/RESULTS.md)"),
    "qwen0.5b": Shape("qwen0.5b", "qwen2", 896, 24, 14, 2, 4864, 151_936, engram_layers_for(24), 32768,
                      rope_theta=1_000_000.0, source="Qwen2.5-0.5B config.json"),
    "llama1b": Shape("llama1b", "llama", 2048, 16, 32, 8, 8192, 128_256, engram_layers_for(16), 16384,
                     rope_theta=500_000.0, source="Llama-3.2-1B config.json"),
    "llama8b": Shape("llama8b", "llama", 4096, 32, 32, 8, 14336, 128_256, engram_layers_for(32), 8192,
                     rope_theta=500_000.0, source="Meta-Llama-3-8B config.json"),
}
PRESETS = ["tiny", *SHAPES]


def build_shaped(shape: Shape, device: str, dtype: torch.dtype, seed: int = 0):
    """An EngramModel of ``shape`` built in memory on ``device`` in ``dtype``: seeded random
    weights (``logit_scale`` 10 on the output embedding, as :func:`build_base_model`), an empty
    Engram memory with seeded projections, a word-level tokenizer of ``shape.vocab`` words. Its
    fingerprint is a digest of the shape and seeds (nothing is written to disk)."""
    from transformers import AutoModelForCausalLM

    from engram_core.addressing import Addresser, load_or_build_canonical_ids
    from engram_core.checkpoint import MODEL_LOCK, EngramModel
    from engram_core.layer import EngramMemory

    tokenizer = word_tokenizer(shape.vocab)
    config = shape.engram_config()
    with MODEL_LOCK, torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(shape.hf_config(), dtype=dtype, attn_implementation="eager")
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(10.0)
        model.eval().requires_grad_(False)
        torch.manual_seed(seed + 1)
        memory = EngramMemory(config, Addresser(config, load_or_build_canonical_ids(tokenizer, None)), shape.hidden)
    memory.requires_grad_(False).to(device=device, dtype=dtype)
    memory.refresh_zero_flags()
    memory.attach(model)
    digest = hashlib.sha256(json.dumps([asdict(shape), config.to_dict(), seed, str(dtype)], sort_keys=True).encode())
    return EngramModel(model, tokenizer, memory, config, "synthetic-" + digest.hexdigest(), Path(f"<{shape.name}>"))


# -- workloads --------------------------------------------------------------------------------

TINY_TRIGGER_WORDS = 8


def trigger_words_of(em) -> list[str]:
    """Words a trigger is drawn from: every non-special token of a word-level vocabulary; for
    the tiny BPE model, its tokens that decode to a space and one alphabetic word."""
    special = set(em.tokenizer.all_special_ids)
    ids = [i for i in range(len(em.tokenizer)) if i not in special]
    if isinstance(em.tokenizer.backend_tokenizer.model, tokenizers_models().WordLevel):
        return em.tokenizer.convert_ids_to_tokens(ids)
    words = (em.tokenizer.decode([i]) for i in ids)
    return sorted({w[1:] for w in words if len(w) > 2 and w[0] == " " and w[1:].isalpha()})


def tokenizers_models():
    from tokenizers import models

    return models


def make_facts(em, n: int, trigger_words: int, facts_per_user: int, seed: int, workload: str = "random",
               templates: int = 20) -> list[Fact]:
    """``n`` facts, ``facts_per_user`` per user (users ``u0000000``...), answers one random word.

    ``workload`` ``random``: each fact its own random trigger of ``trigger_words`` words (0: the
    tiny model's :data:`TINY_TRIGGER_WORDS`); ``templated``: ``templates`` random triggers drawn
    once, every user's facts on distinct ones of them (so ``facts_per_user <= templates``)."""
    rng = random.Random(seed)
    words = trigger_words_of(em)
    length = trigger_words or TINY_TRIGGER_WORDS
    if workload == "random":  # (the d768 facts of every earlier run: same draws, same digest)
        facts = []
        for i in range(n):
            trigger = " ".join(rng.choice(words) for _ in range(length))
            facts.append(Fact(f"u{i // facts_per_user:07d}", f"f{i % facts_per_user}", trigger, " " + rng.choice(words)))
        return facts
    if workload != "templated":
        raise ValueError(f"workload must be 'random' or 'templated', got {workload!r}")
    if not 1 <= facts_per_user <= templates:
        raise ValueError(f"templated workload: facts per user ({facts_per_user}) must be 1..templates ({templates}): "
                         "a user's two facts on one trigger would conflict")
    shared = [" ".join(rng.choice(words) for _ in range(length)) for _ in range(templates)]
    facts = []
    for u in range((n + facts_per_user - 1) // facts_per_user):
        picks = rng.sample(range(templates), facts_per_user)
        for k, t in enumerate(picks[: n - u * facts_per_user]):
            facts.append(Fact(f"u{u:07d}", f"t{t:03d}", shared[t], " " + rng.choice(words)))
    return facts


# -- FLOPs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCounts:
    """What the FLOP count reads of a model: parameters per decoder layer, layers, LM head,
    Engram parameters per Engram layer (projections and conv, not the table)."""

    per_layer: int
    layers: int
    head: int
    engram: int
    engram_layers: tuple[int, ...]
    write_layer: int
    base_params: int  # the causal LM's parameters (embeddings, layers, final norm, LM head)


def model_counts(em) -> ModelCounts:
    """:class:`ModelCounts` of a built model (the shared adapter's parameters count in its layers)."""
    base = em.model.get_base_model() if hasattr(em.model, "get_base_model") else em.model
    layers = base.model.layers
    engram = sum(p.numel() for n, p in em.memory.named_parameters() if not n.endswith("table")) // len(em.config.layers)
    return ModelCounts(per_layer=sum(p.numel() for p in layers[0].parameters()), layers=len(layers),
                       head=em.lm_head.weight.numel(), engram=engram, engram_layers=em.config.layers,
                       write_layer=em.config.target_layer, base_params=sum(p.numel() for p in base.parameters()))


def flops_per_fact(em_or_counts, trigger_tokens: int, steps: int, reuse_lower: bool = False) -> float:
    """Model FLOPs the compile of one single-token fact needs (the ceiling's numerator).

    Prefix (trigger minus its last token) once; per step: forward of the one live position
    through every layer and the LM head, backward of activations (weights are frozen) through
    the layers from the write layer up and the LM head; one verification forward.
    ``reuse_lower``: the live position's layers below the write layer run once, not per step.
    Takes a built model or its :class:`ModelCounts` (``Shape.counts()``: no model built).
    """
    c = em_or_counts if isinstance(em_or_counts, ModelCounts) else model_counts(em_or_counts)
    fwd_token = 2 * (c.per_layer * c.layers + c.head + c.engram * len(c.engram_layers))
    upper = c.layers - c.write_layer
    bwd_token = 2 * (c.per_layer * upper + c.head + c.engram)
    if reuse_lower:
        lower_once = 2 * (c.per_layer * c.write_layer + c.engram * sum(i < c.write_layer for i in c.engram_layers))
        step_fwd = fwd_token - lower_once
        return (trigger_tokens - 1) * fwd_token + lower_once + steps * (step_fwd + bwd_token) + step_fwd
    return (trigger_tokens - 1) * fwd_token + steps * (fwd_token + bwd_token) + fwd_token


PEAK_TFLOPS = 790.0
"""bf16 dense matmul rate the device tool's probes measured on H100/H200 (bench/RESULTS.md)."""


def describe_presets(steps: int, peak_tflops: float, trigger_tokens: int = 16) -> list[dict]:
    """Each word-level preset's shape, parameters and FLOP ceiling at ``peak_tflops``, from its
    dimensions alone (``--dry-run``)."""
    out = []
    for shape in SHAPES.values():
        counts = shape.counts()
        flops = flops_per_fact(counts, trigger_tokens, steps)
        out.append({
            "preset": shape.name, "family": shape.family, "source": shape.source, "hidden": shape.hidden,
            "layers": shape.layers, "heads": shape.heads, "kv_heads": shape.kv_heads, "mlp": shape.mlp,
            "vocab": shape.vocab, "engram_layers": list(shape.engram_layers), "params": counts.base_params,
            "engram_params_no_table": counts.engram * len(counts.engram_layers),
            "trigger_tokens": trigger_tokens, "steps": steps,
            "gflop_per_fact": round(flops / 1e9, 3),
            "gflop_per_fact_min": round(flops_per_fact(counts, trigger_tokens, steps, reuse_lower=True) / 1e9, 3),
            "peak_tflops": peak_tflops, "ceiling_facts_per_s": round(peak_tflops * 1e12 / flops),
            "suggested_batch": shape.suggested_batch,
        })
    return out


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


def member_share(facts: list[Fact], index: int, members: int) -> list[Fact]:
    """The facts of member ``index`` of ``members`` processes: a contiguous share of the users
    (every fact of a user in one member, as a night's chunks keep a user's facts together)."""
    users = list(dict.fromkeys(f.user_id for f in facts))
    mine = set(users[len(users) * index // members: len(users) * (index + 1) // members])
    return [f for f in facts if f.user_id in mine]


def memory_share(setting: str, members: int) -> float | None:
    """``--memory-fraction``: 'off' -> None, 'auto' -> 1/members (None for one process), else the
    number, which must be in (0, 1]."""
    if setting == "off" or (setting == "auto" and members == 1):
        return None
    share = 1 / members if setting == "auto" else float(setting)
    if not 0 < share <= 1:
        raise SystemExit(f"--memory-fraction must be 'off', 'auto' or a share in (0, 1], got {setting!r}")
    return share


def _wait_until(arrived, timeout_s: float, what: str) -> None:
    """Poll ``arrived()`` until it is true; TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not arrived():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} in {timeout_s:.0f} s")
        time.sleep(0.005)


def wait_for(directory: str, name: str, timeout_s: float = 1800.0) -> None:
    """Wait until the file ``name`` exists in ``directory`` (one member's signal to the others).

    The warm-up is staged so: member 0 warms up alone and the others start theirs when it is done,
    loading the torch.compile graphs and Triton kernels it wrote to the shared caches instead of
    all compiling the same graphs at once on the host's cores (cold, fourteen processes did not
    finish their warm-up in 320 s: bench/RESULTS.md, twentieth session)."""
    _wait_until(Path(directory, name).exists, timeout_s, f"{name!r} (member 0's warm-up) did not come")


def barrier(directory: str, name: str, index: int, members: int, timeout_s: float = 1800.0) -> float:
    """Wait until all ``members`` processes reached ``name`` (a file each in ``directory``);
    returns the wall clock (``time.time()``) when this one got through."""
    Path(directory, f"{name}.{index}").touch()
    _wait_until(lambda: all(Path(directory, f"{name}.{i}").exists() for i in range(members)), timeout_s,
                f"barrier {name!r}: not every one of {members} processes arrived")
    return time.time()


def run_members(argv: list[str], members: int) -> dict:
    """Run this benchmark as ``members`` processes on one device (``--processes``) and combine
    their runs, variant by variant: facts summed, seconds from the first start to the last end,
    recall and retries over all facts, peak GPU memory summed."""
    with tempfile.TemporaryDirectory() as sync:
        children = [subprocess.Popen([sys.executable, __file__, *argv, "--member", f"{i}/{members}", "--barrier-dir", sync,
                                      "--json"], stdout=subprocess.PIPE, text=True) for i in range(members)]
        # Read each member's output on a thread; a member that fails stops the others (they would
        # wait at the next barrier for 30 minutes: a device run lost its whole call so).
        boxes: list[list[str]] = [[] for _ in children]
        readers = [threading.Thread(target=lambda c=child, b=box: b.append(c.stdout.read()), daemon=True)
                   for child, box in zip(children, boxes)]
        for reader in readers:
            reader.start()
        failed = None
        while failed is None and any(child.poll() is None for child in children):
            failed = next((i for i, child in enumerate(children) if child.poll() not in (None, 0)), None)
            time.sleep(0.2)
        failed = failed if failed is not None else next((i for i, c in enumerate(children) if c.returncode), None)
        if failed is not None:
            for child in children:
                if child.poll() is None:
                    child.kill()
            for child in children:
                child.wait()
            raise SystemExit(f"--processes: member {failed} exited {children[failed].returncode} (its stderr is above); "
                             "the other members were stopped")
        for reader in readers:
            reader.join()
        outputs = [box[0] if box else "" for box in boxes]
    parts = [json.loads(text) for text in outputs]
    out = dict(parts[0], processes=members)
    runs = []
    for variant in zip(*(p["runs"] for p in parts)):
        errors = [r for r in variant if "error" in r]
        if errors:  # each failing member's message (out of memory: what its allocator held)
            runs.append(dict(errors[0], errors=[r["error"] for r in errors]))
            continue
        facts = sum(r["facts"] for r in variant)
        seconds = max(r["end_unix"] for r in variant) - min(r["start_unix"] for r in variant)
        run = dict(variant[0])
        for key in ("start_unix", "end_unix", "deltas_sha256", "phases_s", "seconds", "warm_up_s"):
            run.pop(key, None)
        run.update(
            start_unix=min(r["start_unix"] for r in variant), end_unix=max(r["end_unix"] for r in variant),
            processes=members, facts=facts, seconds=round(seconds, 3), facts_per_s=round(facts / seconds, 1),
            recall=sum(r["recall"] * r["facts"] for r in variant) / facts,
            greedy_checked=sum(r["greedy_checked"] for r in variant), greedy_ok=sum(r["greedy_ok"] for r in variant),
            retried_facts=sum(r["retried_facts"] for r in variant),
            peak_gpu_gib=None if variant[0]["peak_gpu_gib"] is None else round(sum(r["peak_gpu_gib"] for r in variant), 2),
            peak_reserved_gib=None if variant[0]["peak_reserved_gib"] is None else round(sum(r["peak_reserved_gib"] for r in variant), 2),
            members=[{k: r[k] for k in ("facts", "seconds", "facts_per_s", "phases_s", "warm_up_s", "deltas_sha256", "peak_gpu_gib",
                                          "peak_reserved_gib",
                                          "start_unix", "end_unix")}
                     for r in variant],
        )
        run["achieved_tflops"] = round(run["gflop_per_fact"] * 1e9 * run["facts_per_s"] / 1e12, 1)
        if "ceiling_facts_per_s" in run:
            run["fraction_of_ceiling"] = round(run["facts_per_s"] / run["ceiling_facts_per_s"], 3)
        runs.append(run)
    out["runs"] = runs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=PRESETS, default="tiny")
    ap.add_argument("--dry-run", action="store_true",
                    help="print every word-level preset's shape, parameters and FLOP ceiling (nothing is built)")
    ap.add_argument("--layers", type=int, default=None, help="qwen0.5b/llama1b/llama8b: this many layers (a CPU check)")
    ap.add_argument("--vocab", type=int, default=None, help="qwen0.5b/llama1b/llama8b: this vocabulary size (a CPU check)")
    ap.add_argument("--facts", type=int, default=2000)
    ap.add_argument("--facts-per-user", type=int, default=20)
    ap.add_argument("--workload", nargs="+", choices=["random", "templated"], default=["random"],
                    help="random triggers, or --templates trigger texts shared by all users (several: variants in one run)")
    ap.add_argument("--templates", type=int, default=20, help="templated workload: distinct trigger texts")
    ap.add_argument("--batch", type=count_arg(1), nargs="+", default=[512], help="facts per batch (several: a sweep)")
    ap.add_argument("--steps", type=int, nargs="+", default=[CompileOptions.steps],
                    help="CompileOptions.steps, the first round's steps (several: a sweep)")
    ap.add_argument("--lr", type=float, default=None,
                    help="CompileOptions.lr (default 0.1; scaled by the model's width unless --no-lr-width-scaling)")
    ap.add_argument("--no-lr-width-scaling", action="store_true", help="CompileOptions.lr_width_scaling off")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on cuda)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"measured bf16 matmul rate, for the share of the FLOP ceiling (default {PEAK_TFLOPS:g} on cuda "
                         "and for --dry-run, none on cpu)")
    ap.add_argument("--greedy-check", type=int, default=50)
    ap.add_argument("--nondeterministic", action="store_true", help="allow non-deterministic kernels")
    ap.add_argument("--attn", nargs="+", default=["sdpa"], help="attention implementations to compare")
    ap.add_argument("--reuse-lower", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.reuse_lower_layers variants to compare in one run")
    ap.add_argument("--prefix-attention", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.prefix_attention variants to compare in one run")
    ap.add_argument("--prefix-groups", nargs="+", type=int, default=[CompileOptions.prefix_groups],
                    help="CompileOptions.prefix_groups variants to compare in one run")
    ap.add_argument("--dedupe-prefixes", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.dedupe_prefixes variants (each distinct prefix computed once per batch)")
    ap.add_argument("--plain-step", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.plain_step variants to compare in one run")
    ap.add_argument("--plain-prefix", nargs="+", choices=["on", "off"], default=["on"],
                    help="CompileOptions.plain_prefix variants (the prefix and lower forwards as plain code)")
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
    ap.add_argument("--tiny-max-ngram", type=count_arg(2), default=None,
                    help="tiny preset: N-gram orders 2..N with 16 // (N - 1) heads each (default: init_tiny's, 2..9; "
                         "3 is the tiny model before issue 17)")
    ap.add_argument("--max-ngram", type=int, default=None,
                    help="d768 preset: N-gram orders 2..N with 16 // (N - 1) heads each (default 3: 8 heads of 2- and "
                         "3-grams; 9 is the order new tiny checkpoints get since issue 17)")
    ap.add_argument("--min-margin", type=float, nargs="+", default=[CompileOptions.min_margin],
                    help="CompileOptions.min_margin (several: a sweep)")
    ap.add_argument("--stop-margin", nargs="+", default=["off"],
                    help="CompileOptions.stop_margin: off or a margin (several: a sweep); FLOPs and the "
                         "ceiling's share count the steps the facts got")
    ap.add_argument("--stop-per-user", action="store_true",
                    help="CompileOptions.stop_per_user: with --stop-margin, stop each user at its own step")
    ap.add_argument("--processes", type=int, default=1,
                    help="this many processes on the one device, each compiling its share of the users; the rate is "
                         "all facts over the time from the first start to the last end (as nightly actors sharing a GPU)")
    ap.add_argument("--member", default=None, help=argparse.SUPPRESS)  # "i/N": one of --processes N (internal)
    ap.add_argument("--barrier-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kernel-warps", type=int, nargs="+", default=[0],
                    help="warps per program of the step's attention kernel (engram_core.prefix_kernels.NUM_WARPS) "
                         "variants; 0: its own rule (prefix_kernels.warps)")
    ap.add_argument("--warm-up-batches", type=count_arg(1), default=1,
                    help="batches of the workload each variant compiles untimed first (default 1). A process's "
                         "first batches may still compile a shape the first one did not show (torch.compile's "
                         "recompiles); a night of many batches pays that once")
    ap.add_argument("--memory-snapshot", default=None, metavar="DIR",
                    help="CUDA: record the allocator's history (torch.cuda.memory._record_memory_history) and, when "
                         "a variant runs out of memory, write its snapshot to DIR/member<i>-variant<n>.pickle (open it "
                         "at pytorch.org/memory_viz): what held the GPU's memory, with the allocating stacks")
    ap.add_argument("--memory-fraction", default="off", metavar="F",
                    help="CUDA: cap each process's caching allocator at this share of the device's memory "
                         "(torch.cuda.set_per_process_memory_fraction; at the cap it frees its cached blocks before "
                         "asking for more); 'auto': 1/N with --processes N; 'off' (default): no cap")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.processes < 1:
        ap.error(f"--processes must be 1 or more, got {args.processes}")
    if args.processes > 1 and not args.dry_run:
        argv, skip = [], False
        for word in sys.argv[1:]:  # this argv less --processes N (or --processes=N)
            if skip or word.startswith("--processes="):
                skip = False
                continue
            skip = word == "--processes"
            if not skip:
                argv.append(word)
        combined = run_members(argv, args.processes)
        if args.json:
            print(json.dumps(combined))
        for run in combined["runs"] if not args.json else []:
            print(f"{combined['preset']} x {args.processes} processes {run.get('workload')} batch {run.get('facts_per_batch')}: "
                  + (run["error"] if "error" in run else
                     f"{run['facts_per_s']} facts/s, recall {run['recall']:.4f}, greedy {run['greedy_ok']}/{run['greedy_checked']}, "
                     f"peak {run['peak_gpu_gib']} GiB (summed), per member {[m['facts_per_s'] for m in run['members']]}"))
        return
    member, members = (int(x) for x in args.member.split("/")) if args.member else (0, 1)
    if args.dry_run:
        presets = describe_presets(args.steps[0], args.peak_tflops or PEAK_TFLOPS)
        if args.json:
            print(json.dumps({"presets": presets}))
        for p in presets if not args.json else []:
            print(f"{p['preset']:9s} {p['family']:6s} d{p['hidden']} x {p['layers']} layers, {p['heads']}/{p['kv_heads']} heads, "
                  f"MLP {p['mlp']}, vocab {p['vocab']:,}, Engram at {p['engram_layers']}: {p['params'] / 1e6:,.0f}M params, "
                  f"{p['gflop_per_fact']} GFLOP/fact -> ceiling {p['ceiling_facts_per_s']:,} facts/s at "
                  f"{p['peak_tflops']:g} TFLOP/s (suggested batch {p['suggested_batch']:,}; {p['source']})")
        return

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("engram_core.compiler").setLevel(logging.INFO)  # which step form each model uses
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    peak_tflops = args.peak_tflops or (PEAK_TFLOPS if args.device == "cuda" else None)
    share = memory_share(args.memory_fraction, members)
    if share is not None and args.device == "cuda":
        torch.cuda.set_per_process_memory_fraction(share)
    if args.memory_snapshot and args.device == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=20000)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "model"
        t0 = time.perf_counter()
        shape = None
        if args.preset == "tiny":
            orders = (args.tiny_max_ngram or 0) - 1
            init_tiny(root, engram=EngramConfig(layers=(1, 3), max_ngram=args.tiny_max_ngram, heads_per_order=16 // orders,
                                                slots_per_head=1009) if args.tiny_max_ngram is not None else None)
            trigger_words = 0
        elif args.preset == "d768":
            root.mkdir()
            build_d768(root, max_ngram=args.max_ngram or 3)
            trigger_words = 16
        else:
            shape = SHAPES[args.preset].scaled(args.layers, args.vocab)
            trigger_words = 16
        models = {}  # one model per attention implementation: its compiled steps are kept across variants

        def model(attn: str):
            if attn not in models:
                if shape is not None:
                    models[attn] = build_shaped(shape, args.device, dtype)
                    models[attn].model.config._attn_implementation = attn
                else:
                    models[attn] = load_checkpoint(root, device=args.device, dtype=dtype, attn_implementation=attn)
            return models[attn]

        em = model(args.attn[0])
        build_s = time.perf_counter() - t0
        workloads = {w: member_share(make_facts(em, args.facts, trigger_words, args.facts_per_user, seed=0, workload=w,
                                                templates=args.templates), member, members) for w in args.workload}
        trigger_tokens = len(em.encode_prompt(next(iter(workloads.values()))[0].trigger))
        runs = []
        variants = [(a, w, b, r, p, g, dd, ps, cs, ov, si, pk, tw, fn, mm, st, pp, kw, sm) for a in args.attn for w in args.workload
                    for b in args.batch for r in args.reuse_lower
                    for p in args.prefix_attention for g in args.prefix_groups for dd in args.dedupe_prefixes
                    for ps in args.plain_step for cs in args.compiled_step for ov in args.overlap
                    for si in args.switch_interval for pk in args.prefix_kernel for tw in args.tokenize_workers
                    for fn in args.fused_ops for mm in args.min_margin for st in args.steps for pp in args.plain_prefix
                    for kw in args.kernel_warps for sm in args.stop_margin]
        default_interval = sys.getswitchinterval()
        for number, (attn, workload, batch, reuse, prefix_attn, groups, dedupe, plain, compiled, overlap, interval, kernel, workers,
                     norms, margin, steps, plain_prefix, warps, stop) in enumerate(variants):
            sys.setswitchinterval(interval or default_interval)
            prefix_kernels.NUM_WARPS.update(forward=warps or None, backward=warps or None)
            em = model(attn)
            facts = workloads[workload]
            opts = CompileOptions(steps=steps, facts_per_batch=batch, deterministic=not args.nondeterministic,
                                  reuse_lower_layers=reuse == "on", prefix_attention=prefix_attn == "on", prefix_groups=groups,
                                  dedupe_prefixes=dedupe == "on", plain_step=plain == "on", plain_prefix=plain_prefix == "on",
                                  compiled_step=compiled == "on", overlap_batches=overlap == "on", prefix_kernel=kernel == "on",
                                  tokenize_workers=workers, fused_ops=norms == "on", min_margin=margin,
                                  stop_margin=None if stop == "off" else float(stop), stop_per_user=args.stop_per_user,
                                  lr_width_scaling=not args.no_lr_width_scaling,
                                  **({"lr": args.lr} if args.lr is not None else {}))
            if args.barrier_dir and member:  # staged warm-up: member 0 compiles, the others then load its caches
                wait_for(args.barrier_dir, f"warm{number}.0")
            warm = time.perf_counter()
            compile_facts(em, facts[: min(len(facts), batch * args.warm_up_batches)], opts)  # warm-up (kernels, allocator, torch.compile)
            warm_up_s = time.perf_counter() - warm
            if args.barrier_dir and not member:
                Path(args.barrier_dir, f"warm{number}.0").touch()
            if args.device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start_unix = barrier(args.barrier_dir, f"start{number}", member, members) if args.barrier_dir else time.time()
            start = time.perf_counter()
            try:
                result = compile_facts(em, facts, opts)
            except torch.OutOfMemoryError as error:  # a batch too large for this GPU: say so, go on
                if args.memory_snapshot:
                    Path(args.memory_snapshot).mkdir(parents=True, exist_ok=True)
                    torch.cuda.memory._dump_snapshot(str(Path(args.memory_snapshot, f"member{member}-variant{number}.pickle")))
                runs.append({"workload": workload, "facts_per_batch": batch, "overlap": overlap, "dedupe_prefixes": dedupe,
                             "error": " ".join(str(error).split()), "member": member})
                print(f"batch {batch}: out of memory", file=sys.stderr)
                torch.cuda.empty_cache()
                if args.barrier_dir:
                    barrier(args.barrier_dir, f"end{number}", member, members)
                continue
            if args.device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            end_unix = time.time()
            if args.barrier_dir:  # the others' timed compile is not slowed by this one's checks or next warm-up
                barrier(args.barrier_dir, f"end{number}", member, members)
            checked = facts[: args.greedy_check // members]
            greedy_ok = sum(
                greedy_tokens(em, f.trigger, len(em.encode_answer(f.answer)), [result.deltas[f.user_id]])
                == em.encode_answer(f.answer) for f in checked
            )
            from engram_core.compiler import _LOWER_REUSE_OK, _STEPS

            forms = {f"{k[0]},{k[1]}": v for k, v in _LOWER_REUSE_OK.get(em.model, {}).items()}
            run = {
                "workload": workload, "templates": args.templates if workload == "templated" else None,
                "distinct_triggers": len({f.trigger for f in facts}),
                "step_forms_checked": forms, "plain_step": plain, "plain_prefix": plain_prefix, "compiled_step": compiled, "overlap": overlap, "prefix_kernel": kernel,
                "tokenize_workers": workers, "fused_ops": norms, "min_margin": margin, "dedupe_prefixes": dedupe,
                "switch_interval_s": sys.getswitchinterval(),
                "deltas_sha256": deltas_digest(result.deltas),
                "compiled_in_use": [s.compiled for s in _STEPS.get(em.model, {}).values()],
                "warm_up_s": round(warm_up_s, 1), "warm_up_batches": args.warm_up_batches, "lr": round(effective_lr(em, opts), 4),
                "start_unix": start_unix, "end_unix": end_unix,
                "attn": attn, "facts_per_batch": batch, "reuse_lower": reuse, "prefix_attention": prefix_attn, "prefix_groups": groups, "kernel_warps": warps, "facts": len(facts), "seconds": round(seconds, 3),
                "phases_s": result.timings,
                "facts_per_s": round(len(facts) / seconds, 1), "recall": result.ok / len(facts),
                "greedy_checked": len(checked), "greedy_ok": greedy_ok,
                "retried_facts": sum(r.steps > steps for r in result.facts), "steps": steps, "stop_margin": stop,
                "stop_per_user": args.stop_per_user,
                "steps_mean": round(float(np.mean([r.steps for r in result.facts])), 2) if result.facts else None,
                "steps_max": max((r.steps for r in result.facts), default=None),
                "bytes_per_user": round(sum(d.nbytes for d in result.deltas.values()) / max(len(result.deltas), 1)),
                "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.device == "cuda" else None,
                # what the allocator held at most (allocated + cached): what other processes on the GPU could not have
                "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if args.device == "cuda" else None,
                "memory_fraction": share,
            }
            # early stop (per user): the steps run, plus the one a stopped user runs before its stop is read
            steps_got = min(steps, run["steps_mean"] + 1) if stop != "off" and run["steps_mean"] is not None else steps
            flops = flops_per_fact(em, trigger_tokens, steps_got)
            run["gflop_per_fact"] = round(flops / 1e9, 3)
            run["gflop_per_fact_min"] = round(flops_per_fact(em, trigger_tokens, steps_got, reuse_lower=True) / 1e9, 3)
            run["achieved_tflops"] = round(flops * run["facts_per_s"] / 1e12, 1)
            if peak_tflops:
                run["peak_tflops"] = peak_tflops
                run["ceiling_facts_per_s"] = round(peak_tflops * 1e12 / flops)
                run["fraction_of_ceiling"] = round(run["facts_per_s"] / run["ceiling_facts_per_s"], 3)
                # the same with the least work the method needs (lower layers once per batch)
                run["ceiling_min_facts_per_s"] = round(peak_tflops * 1e12 / (run["gflop_per_fact_min"] * 1e9))
            runs.append(run)
    counts = model_counts(em)
    out = {
        "preset": args.preset, "deterministic": not args.nondeterministic, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "dtype": str(dtype), "trigger_tokens": trigger_tokens, "steps": args.steps, "build_seconds": round(build_s, 1),
        "shape": asdict(shape) if shape is not None else None, "params": counts.base_params,
        "max_ngram": em.config.max_ngram, "heads_per_order": em.config.heads_per_order,
        "fingerprint": em.fingerprint, "torch": torch.__version__, "runs": runs,
    }
    if args.json:
        print(json.dumps(out))
    else:
        for run in runs:
            if "error" in run:
                print(f"{run['workload']} batch {run['facts_per_batch']}: {run['error']}")
                continue
            share = f", {run['fraction_of_ceiling']:.1%} of ceiling" if "fraction_of_ceiling" in run else ""
            print(f"{out['preset']} on {out['device']} {run['workload']} batch {run['facts_per_batch']} dedupe {run['dedupe_prefixes']} "
                  f"reuse {run['reuse_lower']} prefix-attn {run['prefix_attention']} "
                  f"plain {run['plain_step']} compiled {run['compiled_step']} overlap {run['overlap']}: {run['facts_per_s']} facts/s, "
                  f"recall {run['recall']:.4f}, greedy {run['greedy_ok']}/{run['greedy_checked']}, "
                  f"{run['achieved_tflops']} TFLOP/s{share}, peak {run['peak_gpu_gib']} GiB, phases {run['phases_s']}, "
                  f"digest {run['deltas_sha256']}")


if __name__ == "__main__":
    main()
