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

import hashlib
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .addressing import Addresser, load_or_build_canonical_ids
from .config import ConfigError, EngramConfig
from .layer import EngramMemory
from .tokenize_pool import backend_encoder

log = logging.getLogger(__name__)

_INGREDIENTS = ("base", "tokenizer", "engram", "adapter")
_DERIVED_PREFIX = "canonical-"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing parts or does not fit together."""


def _file_digests(root: Path, parts: tuple[str, ...] = _INGREDIENTS) -> list[tuple[Path, bytes]]:
    """(file, sha256 of content) of every ingredient file (of ``parts``), in fingerprint order."""
    files = sorted(
        p for part in parts if (root / part).exists() for p in (root / part).rglob("*")
        if p.is_file() and not p.name.startswith((_DERIVED_PREFIX, ".canonical-"))
    )
    digests = []
    for file in files:
        inner = hashlib.sha256()
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                inner.update(chunk)
        digests.append((file, inner.digest()))
    return digests


def _combine(root: Path, digests: list[tuple[Path, bytes]]) -> str:
    outer = hashlib.sha256()
    for file, digest in digests:
        outer.update(file.relative_to(root).as_posix().encode() + b"\0" + digest)
    return outer.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 over (relative path, sha256 of content) of every ingredient file."""
    root = Path(path)
    digests = _file_digests(root)
    if not digests:
        raise CheckpointError(f"checkpoint {root}: no model files found (expected base/, tokenizer/, engram/)")
    return _combine(root, digests)


def base_sha256(path: str | Path, digests: list[tuple[Path, bytes]] | None = None) -> str:
    """sha256 over the files of ``base/`` alone: the identity an adapter records of its base."""
    root = Path(path)
    digests = _file_digests(root, ("base",)) if digests is None else digests
    return _combine(root, [(f, d) for f, d in digests if f.relative_to(root).parts[0] == "base"])


# --- Which base an adapter belongs to ---------------------------------------------------------

ADAPTER_BASE_FILE = "engram_base.json"
ALLOW_ADAPTER_MISMATCH_ENV = "ENGRAM_ALLOW_ADAPTER_BASE_MISMATCH"


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not readable JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def _describe(architectures, model_type) -> str:
    kind = ", ".join(architectures or []) or "an unknown architecture"
    return f"{kind} (model_type {model_type})" if model_type else kind


def base_record(path: str | Path, *, how: str, digests: list[tuple[Path, bytes]] | None = None) -> dict:
    """What ``adapter/engram_base.json`` holds for the checkpoint's current ``base/``."""
    root = Path(path)
    config = _read_json(root / "base" / "config.json")
    return {"base_sha256": base_sha256(root, digests), "base_architectures": list(config.get("architectures") or []),
            "base_model_type": config.get("model_type"), "how": how}


def write_base_record(path: str | Path, *, how: str) -> Path:
    """Record in ``adapter/`` that it belongs to the current ``base/`` (sorted JSON: same bytes every time)."""
    target = Path(path) / "adapter" / ADAPTER_BASE_FILE
    if not target.parent.is_dir():
        raise CheckpointError(f"checkpoint {path}: no adapter/ to record a base for")
    target.write_text(json.dumps(base_record(path, how=how), indent=2, sort_keys=True) + "\n")
    return target


def adapter_base_mismatch(path: str | Path, digests: list[tuple[Path, bytes]] | None = None) -> str | None:
    """Why ``adapter/`` was saved for another base than ``base/``, naming both; None if it was not
    (or if nothing it records can be compared)."""
    root = Path(path)
    base = _read_json(root / "base" / "config.json")
    architectures, model_type = list(base.get("architectures") or []), base.get("model_type")
    this = _describe(architectures, model_type)
    record = _read_json(root / "adapter" / ADAPTER_BASE_FILE)
    if record:
        actual = base_sha256(root, digests)
        if record.get("base_sha256") == actual:
            return None  # made for, or accepted with, exactly these base files
        return (f"adapter/{ADAPTER_BASE_FILE} says the adapter belongs to base sha256 "
                f"{str(record.get('base_sha256'))[:16]} ({_describe(record.get('base_architectures'), record.get('base_model_type'))}), "
                f"but base/ is sha256 {actual[:16]} ({this})")
    peft = _read_json(root / "adapter" / "adapter_config.json")
    claimed = (peft.get("auto_mapping") or {}).get("base_model_class")
    if claimed and architectures and claimed not in architectures:
        return f"adapter/adapter_config.json was saved for a {claimed} base, but base/ is {this}"
    name = peft.get("base_model_name_or_path")
    family = _named_family(name, model_type)
    if family is not None:
        return f"adapter/adapter_config.json names base {name!r} (a {family} model), but base/ is {this}"
    return None


def _named_family(name: str | None, model_type: str | None) -> str | None:
    """The causal-LM model type that ``name`` (a hub id or path) names, when it names one and it is
    not ``model_type``'s family; else None. Only the last path component is read (folder names
    above it are the user's), and only whole words of four letters or more (no 'opt' in 'options')."""
    if not name or not model_type:
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    words = [w for w in re.split(r"[^a-z0-9]+", name.rstrip("/").rsplit("/", 1)[-1].lower()) if len(w) >= 4]
    known = [w for w in words if w in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]

    def same_family(word: str) -> bool:
        return word.startswith(model_type) or model_type.startswith(word)

    if not known or any(same_family(w) for w in words):
        return None
    return known[0]


def check_adapter_base(path: str | Path, digests: list[tuple[Path, bytes]] | None = None) -> None:
    """Raise CheckpointError if ``adapter/`` was saved for another base (see :func:`adapter_base_mismatch`),
    unless ENGRAM_ALLOW_ADAPTER_BASE_MISMATCH=1 (then a warning)."""
    problem = adapter_base_mismatch(path, digests)
    if problem is None:
        return
    if os.environ.get(ALLOW_ADAPTER_MISMATCH_ENV) == "1":
        log.warning("checkpoint %s: %s; loading anyway (%s=1)", path, problem, ALLOW_ADAPTER_MISMATCH_ENV)
        return
    raise CheckpointError(
        f"checkpoint {path}: {problem}. Use the adapter trained for this base, or, if it really fits, accept it "
        f"once with `engram model accept-adapter {path}` (recorded in adapter/{ADAPTER_BASE_FILE}; the "
        f"fingerprint changes) or set {ALLOW_ADAPTER_MISMATCH_ENV}=1 for this process"
    )


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


MODEL_LOCK = threading.RLock()
"""Held while transformers builds a model (see :func:`load_checkpoint`)."""


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    with_adapter: bool = True,
    attn_implementation: str | None = None,
) -> EngramModel:
    """Load a checkpoint directory (local only: nothing is downloaded).

    ``attn_implementation`` is passed to transformers ("eager", "sdpa", ...): the compiler's
    steps attend one or a few query positions to a short cache, a shape for which "eager"
    beats the flash kernels on GPUs (see bench/RESULTS.md).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = Path(path)
    for part in ("base", "tokenizer", "engram"):
        if not (root / part).is_dir():
            raise CheckpointError(f"checkpoint {root}: missing {part}/ (create one with `engram model init DIR --tiny`)")
    config = EngramConfig.load(root / "engram" / "config.json")
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    adapter_dir = root / "adapter"
    digests = _file_digests(root)  # read once: the fingerprint and the adapter's base check
    if with_adapter and adapter_dir.is_dir():
        check_adapter_base(root, digests)
    # transformers builds a model under process-wide patches (the default dtype, torch.linspace,
    # meta-device creation); two loads on threads at once can leave them crossed, and a later
    # model then gets meta tensors. One load at a time per process.
    with MODEL_LOCK:
        tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(root / "base", local_files_only=True, dtype=dtype, **extra)
        if with_adapter and adapter_dir.is_dir():
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=False)
    model.eval().requires_grad_(False).to(device)

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
