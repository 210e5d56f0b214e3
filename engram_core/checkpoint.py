"""Checkpoints: base model + tokenizer + Engram config and weights + optional shared adapter.

Directory layout::

    DIR/base/         Hugging Face model (config.json, model.safetensors)
    DIR/tokenizer/    Hugging Face fast tokenizer
    DIR/engram/config.json, DIR/engram/weights.safetensors (projections, conv),
    DIR/engram/tables.safetensors (only when the base table is not all zero)
    DIR/adapter/      optional peft LoRA adapter (the shared reasoning skill), loaded frozen

The fingerprint is a sha256 over every ingredient file (path and content); derived caches
(the canonical token map) are excluded. A delta belongs to exactly one fingerprint.

An adapter belongs to one base. ``adapter/engram_base.json`` records the sha256 of the base
files it was made for (written by ``engram model init``) or accepted with (``engram model
accept-adapter``); without it, peft's own record (``auto_mapping.base_model_class``,
``base_model_name_or_path``) is compared with ``base/config.json``. A checkpoint whose adapter
was saved for another base is refused at load (:func:`adapter_base_mismatch`).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .addressing import Addresser, load_or_build_canonical_ids
from .config import ConfigError, EngramConfig
from .fingerprint import (  # noqa: F401 - re-exported: the checkpoint API
    ADAPTER_BASE_FILE,
    ALLOW_ADAPTER_MISMATCH_ENV,
    CheckpointError,
    _combine,
    _file_digests,
    adapter_base_mismatch,
    base_record,
    base_sha256,
    check_adapter_base,
    check_checkpoint_files,
    fingerprint,
    write_base_record,
)
from .hf_compat import deferred_sklearn
from .layer import EngramMemory
from .tokenize_pool import backend_encoder

log = logging.getLogger(__name__)


@dataclass
class EngramModel:
    """A loaded checkpoint: the (frozen) causal LM with its Engram memory attached."""

    model: torch.nn.Module
    tokenizer: object
    memory: EngramMemory
    config: EngramConfig
    fingerprint: str
    path: Path

    @property
    def device(self) -> torch.device:
        # A table's device: ``next(parameters())`` walks the modules (~20 us), once per request batch.
        return next(iter(self.memory.engram_layers.values())).table.device

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt (trigger) exactly as compile and serve both see it."""
        return self.tokenizer(text, add_special_tokens=True)["input_ids"]

    def encode_answer(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @functools.cached_property
    def prompt_lead(self) -> int:
        """How many tokens :meth:`encode_prompt` puts before a prompt's text (a BOS): the leading
        special tokens of a one-word probe. The same for every prompt (the tokenizer's template);
        computed once per loaded model."""
        ids = self.encode_prompt("x")
        special = set(self.tokenizer.all_special_ids)
        lead = 0
        while lead < len(ids) and ids[lead] in special:
            lead += 1
        return lead

    def encode_prompts(self, texts: list[str]) -> list[list[int]]:
        """Batched :meth:`encode_prompt` (one tokenizer call)."""
        return self.encode_texts(texts, add_special_tokens=True)

    def encode_answers(self, texts: list[str]) -> list[list[int]]:
        return self.encode_texts(texts, add_special_tokens=False)

    def encode_texts(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        """Token ids of many texts in one call (prompts: ``add_special_tokens=True``)."""
        backend = self.plain_backend()
        if backend is not None:
            return backend_encoder(backend)(list(texts), add_special_tokens)
        return self.tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]

    def plain_backend(self):
        """The fast tokenizer's Rust backend (``tokenizers.Tokenizer``) when calling it directly
        gives exactly the ids of ``self.tokenizer(text)`` (no truncation or padding set), else
        None. Called directly it skips transformers' per-text Python conversion (~4x faster on
        20k texts)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None) if getattr(self.tokenizer, "is_fast", False) else None
        if backend is not None and backend.truncation is None and backend.padding is None:
            return backend
        return None


def save_engram(memory: EngramMemory, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    memory.config.save(directory / "config.json")
    state = {k: v.detach().cpu().contiguous() for k, v in memory.state_dict().items() if not k.endswith(".table")}
    save_file(state, str(directory / "weights.safetensors"))
    tables = {k: v.detach().cpu().contiguous() for k, v in memory.state_dict().items() if k.endswith(".table")}
    if any(bool(t.any()) for t in tables.values()):
        save_file(tables, str(directory / "tables.safetensors"))


def _start_device(device: torch.device) -> None:
    """Create the CUDA context and load what a compile's first call would otherwise load: cuBLAS
    (float32 and bfloat16 products), cuSOLVER (``pinv``, the compiler's initial values) and the
    autograd engine's device thread (a backward). Only constants, on this thread's own stream:
    no random state or model is touched. Measured on an H200: a compile worker's warm-up spent
    ~0.4 s of its ~1.9 s in such first uses (bench/RESULTS.md, 2026-11-30 fifth session)."""
    torch.empty(1, device=device)  # the context: an error here is the load's
    try:
        stream = torch.cuda.Stream(device=device)
        with torch.cuda.stream(stream):
            x = torch.eye(8, dtype=torch.float32, device=device) + 1  # from_pretrained may change the default dtype meanwhile
            torch.linalg.pinv(x)
            x.bfloat16() @ x.bfloat16()
            w = x.clone().requires_grad_(True)
            with torch.enable_grad():
                (w @ x).sum().backward()
        stream.synchronize()
    except Exception as err:  # noqa: BLE001 - only a head start: the compile's first call pays it instead
        log.warning("checkpoint load: the CUDA libraries' first use failed on %s (%s: %s); the first compile "
                    "pays it", device, type(err).__name__, err)


MODEL_LOCK = threading.RLock()
"""Held while transformers builds a model (see :func:`load_checkpoint`)."""


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_adapter: bool = True,
    attn_implementation: str | None = None,
    timings: dict[str, float] | None = None,
) -> EngramModel:
    """Load a checkpoint directory (local only: nothing is downloaded).

    ``attn_implementation`` is passed to transformers ("eager", "sdpa", ...): the compiler's
    steps attend one or a few query positions to a short cache, a shape for which "eager"
    beats the flash kernels on GPUs (see bench/RESULTS.md).

    The ingredient files' sha256 (the fingerprint) and, on a GPU, the CUDA context's creation
    and the first use of the CUDA libraries a compile calls (:func:`_start_device`) run on
    threads while transformers imports and builds the model (hashing, the driver's and the
    libraries' initialisation release the GIL; imports hold it).

    ``timings``: if given, gets where the load's seconds went: ``imports`` (transformers' top
    level), ``tokenizer``, ``base`` (``from_pretrained`` with the model classes' imports, the
    adapter included), ``digest`` (waiting for the sha256 thread), ``to_device`` (waiting for the
    CUDA context, then the copy) and ``engram`` (the memory built, loaded and moved).
    """
    clock = time.perf_counter()
    root = Path(path)
    check_checkpoint_files(root)
    background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="checkpoint-load")
    digesting = background.submit(_file_digests, root)  # read once: the fingerprint and the adapter's base check
    target = torch.device(device)
    context = background.submit(_start_device, target) if target.type == "cuda" else None
    background.shutdown(wait=False)

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        if timings is not None:
            timings[name] = timings.get(name, 0.0) + now - clock
        clock = now

    config = EngramConfig.load(root / "engram" / "config.json")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    adapter_dir = root / "adapter"
    # transformers builds a model under process-wide patches (the default dtype, torch.linspace,
    # meta-device creation); two loads on threads at once can leave them crossed, and a later
    # model then gets meta tensors. One load at a time per process. Its model classes are imported
    # here (the first load of a process) without scikit-learn (hf_compat.deferred_sklearn).
    with MODEL_LOCK, deferred_sklearn():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        lap("imports")
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        lap("tokenizer")
        model = AutoModelForCausalLM.from_pretrained(root / "base", local_files_only=True, dtype=dtype, **extra)
    lap("base")
    digests = digesting.result()  # outside the lock: another load in this process need not wait for it
    if with_adapter and adapter_dir.is_dir():
        check_adapter_base(root, digests)  # before peft reads an adapter made for another base
    lap("digest")
    if with_adapter and adapter_dir.is_dir():
        with MODEL_LOCK, deferred_sklearn():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
        lap("base")
    if context is not None:
        context.result()
    model.eval().requires_grad_(False).to(device)
    lap("to_device")

    canonical = load_or_build_canonical_ids(tokenizer, root / "engram")
    addresser = Addresser(config, canonical)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    memory = EngramMemory(config, addresser, hidden_size)
    weights = load_file(str(root / "engram" / "weights.safetensors"))
    tables_file = root / "engram" / "tables.safetensors"
    if tables_file.exists():
        weights.update(load_file(str(tables_file)))
    missing, unexpected = memory.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith(".table") or tables_file.exists()]
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {root}: Engram weights do not match engram/config.json "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    for index, layer in memory.engram_layers.items():
        if layer.conv is not None and bool(layer.conv.weight.any()):
            # The conv branch is recomputed per call, without the previous positions a KV cache
            # holds, so a trained conv would decode differently from how facts were verified.
            raise CheckpointError(f"checkpoint {root}: Engram layer {index} has a non-zero short conv; "
                                  "cached decoding of a trained conv branch is not supported yet")
    memory.requires_grad_(False).to(device=device, dtype=dtype)
    memory.refresh_zero_flags()
    memory.attach(model)
    lap("engram")
    return EngramModel(model, tokenizer, memory, config, _combine(root, digests), root)


def attach_new_memory(model: torch.nn.Module, tokenizer, config: EngramConfig, seed: int = 0) -> EngramMemory:
    """A fresh Engram memory for ``model``: seeded projections, an all-zero (empty) table."""
    canonical = load_or_build_canonical_ids(tokenizer, None)
    hidden_size = model.get_input_embeddings().weight.shape[1]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        memory = EngramMemory(config, Addresser(config, canonical), hidden_size)
    finally:
        torch.random.set_rng_state(generator_state)
    memory.requires_grad_(False)
    memory.refresh_zero_flags()
    try:
        memory.attach(model)
    except ConfigError:
        raise
    return memory
