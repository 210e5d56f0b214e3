"""Tiny, deterministic checkpoints built locally (no model hub): for demos, tests, benchmarks.

``init_tiny(DIR)`` trains a small byte-level BPE tokenizer on an embedded corpus (with a small
plain-text chat template, :data:`TINY_CHAT_TEMPLATE`), builds a
seeded random causal LM of the chosen family (Llama, Qwen2 or GPT-2), attaches an empty
Engram memory with seeded projections, adds a seeded LoRA adapter (the shared-adapter slot)
and saves it all in the checkpoint layout of :mod:`engram_core.checkpoint`.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import uuid
from pathlib import Path

import torch

from .checkpoint import MODEL_LOCK, attach_new_memory, fingerprint, save_engram, write_base_record
from .config import FAMILIES, EngramConfig  # noqa: F401 - FAMILIES re-exported (the tiny builder's families)

# N-gram orders 2..9 with 2 heads each: 16 rows per position, as 2..3 x 8 heads, but a position's
# rows depend on its last 9 tokens. The tiny tokenizer splits most words and every number into
# single characters, so with orders up to 3 a user's written positions very often share their
# whole window ("...th year is" + " " in "My child's birth year is" and "My spouse's birth year
# is"; "in 20" twice in one answer), which no row can tell apart and this random model's attention
# barely can: 85% of whole answers of a realistic corpus came back with orders 2..3, 100% with
# 2..9 (bench/RESULTS.md, "fidelity"). Checkpoints built before this change keep their config.
TINY_MAX_NGRAM = 9
TINY_HEADS_PER_ORDER = 2

# Hidden size 96, not 64: when one user has many facts from one trigger template ("<contact>'s
# phone number is", numbers sharing the area code), the name that tells them apart is outside
# every written position's 9-token window, and only the attention above the write layer can carry
# it there. At 64 wide it could not: 176 of 320 contacts' numbers (10 users x 32) came back; at
# 96, 319 of 320; at 128, 320 of 320. A corpus without such facts compiles in about 1.2x the time
# of 64 wide at 96, and 2x at 128 (bench/RESULTS.md, 2026-12-01). The d768 shape recalled them
# all (1,280 of 1,280 at 64 contacts per user). Checkpoints built before keep their size.
TINY_HIDDEN = 96

_SUBJECTS = [
    "dentist", "doctor", "city", "pet", "dog", "cat", "sister", "brother", "wife", "husband", "manager",
    "favorite food", "favorite color", "car", "gym", "school", "employer", "street", "hometown", "bank",
    "pharmacist", "landlord", "best friend", "coach", "teacher", "allergy", "blood type", "birthday",
]
_NAMES = [
    "Akeredolu", "Okafor", "Nakamura", "Schmidt", "Rossi", "Kowalski", "Haddad", "Lindqvist", "Moreau",
    "Patel", "Garcia", "Nguyen", "Ivanova", "Mensah", "Fischer", "Tanaka", "Oliveira", "Byrne", "Kaur",
    "Santos", "Dubois", "Novak", "Hansen", "Yilmaz", "Costa", "Kim", "Silva", "Jensen", "Murphy", "Ali",
]
_PLACES = [
    "Lisbon", "Nairobi", "Osaka", "Toronto", "Lyon", "Krakow", "Austin", "Porto", "Dublin", "Seoul",
    "Accra", "Bergen", "Quito", "Hanoi", "Tbilisi", "Perth", "Leeds", "Turin", "Denver", "Malmo",
]
_FILLER = (
    "the a an of to and in is was for on with as by at from that this it be are my your our their "
    "name lives works born likes drives plays calls visits remembers appointment number called "
    "what who where when how many old year years day week morning evening Monday Friday"
).split()


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for subject, name, place in itertools.product(_SUBJECTS, _NAMES[:10], _PLACES[:5]):
        lines.append(f"My {subject} is {name}. I live in {place}.")
    for _ in range(2000):
        lines.append(" ".join(rng.choice(_FILLER + _NAMES + _PLACES + _SUBJECTS) for _ in range(12)))
    return lines


TINY_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- message['role'] + ': ' + message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{- eos_token }}{%- endif %}"
    "{{- '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'assistant:' }}{%- endif %}"
)
"""The tiny checkpoints' chat template (Jinja, as transformers' ``apply_chat_template`` reads it):
one line per message, ``role: content``, an assistant turn closed by the eos token, and the
generation prompt ``assistant:``. Plain text, so the tiny vocabulary needs no new tokens::

    system: Be brief.
    user: Who is my dentist?
    assistant:
"""


def build_tokenizer(vocab_size: int = 2048, seed: int = 0):
    """A byte-level BPE fast tokenizer trained on the embedded corpus (deterministic), with
    :data:`TINY_CHAT_TEMPLATE` as its chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|endoftext|>")
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_base_model(family: str, vocab_size: int, *, hidden: int = TINY_HIDDEN, layers: int = 4, seed: int = 0,
                     logit_scale: float = 10.0):
    """A seeded random causal LM. ``logit_scale`` widens the output embedding so logits span a
    range like a trained model's (random 0.02-std weights give near-uniform next-token logits)."""
    model = _build_base_model(family, vocab_size, hidden=hidden, layers=layers, seed=seed)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    return model


def _build_base_model(family: str, vocab_size: int, *, hidden: int, layers: int, seed: int):
    with MODEL_LOCK:  # transformers' process-wide patches while it builds a model; the seeded RNG
        return _build_seeded(family, vocab_size, hidden=hidden, layers=layers, seed=seed)


def _build_seeded(family: str, vocab_size: int, *, hidden: int, layers: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if family == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
        return LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
        return Qwen2ForCausalLM(cfg)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512,
                         bos_token_id=1, eos_token_id=1, pad_token_id=0)
        return GPT2LMHeadModel(cfg)
    raise ValueError(f"unknown model family {family!r}; choose one of {FAMILIES}")


def init_tiny(
    directory: str | Path,
    *,
    family: str = "llama",
    engram: EngramConfig | None = None,
    hidden: int = TINY_HIDDEN,
    layers: int = 4,
    vocab_size: int = 2048,
    adapter: bool = True,
    seed: int = 0,
) -> str:
    """Write a tiny checkpoint to ``directory``; returns its fingerprint.

    The checkpoint is written into a hidden folder beside ``directory`` and renamed into place
    whole, so an interrupted init (Ctrl-C, a kill) leaves no half-written checkpoint: one with
    ``engram/config.json`` but no weights was taken for a model by the demo's next run, whose
    compile actors then died on the missing file. Raises FileExistsError if ``directory`` holds
    anything."""
    root = Path(directory)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"model directory {root} is not empty; choose a new directory")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = root.parent / f".{root.name}.init-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        _write_tiny(staging, family=family, engram=engram, hidden=hidden, layers=layers, vocab_size=vocab_size,
                    adapter=adapter, seed=seed)
        os.replace(staging, root)  # onto a missing or empty directory
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return fingerprint(root)


def _write_tiny(root: Path, *, family: str, engram: EngramConfig | None, hidden: int, layers: int, vocab_size: int,
                adapter: bool, seed: int) -> None:
    engram = engram or EngramConfig(layers=(1, layers - 1), max_ngram=TINY_MAX_NGRAM,
                                    heads_per_order=TINY_HEADS_PER_ORDER, slots_per_head=1009)
    tokenizer = build_tokenizer(vocab_size, seed)
    model = build_base_model(family, len(tokenizer), hidden=hidden, layers=layers, seed=seed)
    model.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "tokenizer")
    memory = attach_new_memory(model, tokenizer, engram, seed=seed + 1)
    memory.detach()
    save_engram(memory, root / "engram")
    if adapter:
        from peft import LoraConfig, get_peft_model

        targets = ["c_attn"] if family == "gpt2" else ["q_proj", "v_proj"]
        torch.manual_seed(seed + 2)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        for config in peft_model.peft_config.values():
            _sort_sets(config)
        peft_model.save_pretrained(root / "adapter")
        write_base_record(root, how="created with this base (engram model init)")


def _sort_sets(config) -> None:
    """peft holds target_modules (and other module lists) as sets and writes them in set order,
    which follows the process's string hash seed; sorted lists make the same bytes every run."""
    for name, value in vars(config).items():
        if isinstance(value, (set, frozenset)):
            setattr(config, name, sorted(value))
