"""A checkpoint's identity without loading it (torch-free, so the nightly's driver and the model
store read it without importing torch): its :func:`fingerprint` (sha256 over the files of base,
tokenizer, engram and adapter), the base's digest and record, and the adapter-base check.
``engram_core.checkpoint`` re-exports every name here."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("engram_core.checkpoint")

_INGREDIENTS = ("base", "tokenizer", "engram", "adapter")
_DERIVED_PREFIX = "canonical-"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing parts or does not fit together."""


def is_ingredient(path: Path) -> bool:
    """Whether a file under a checkpoint part is part of the model: not a derived cache
    (``canonical-*``), nor one being written (``.canonical-*`` temp files, ``*.tmp.npy``). The
    fingerprint and the model upload (versions.models) use this one rule, so an uploaded model
    always has the fingerprint it is stored under."""
    return path.is_file() and not path.name.startswith((_DERIVED_PREFIX, "." + _DERIVED_PREFIX)) \
        and not path.name.endswith(".tmp.npy")


def ingredient_files(root: Path, parts: tuple[str, ...] = _INGREDIENTS) -> list[Path]:
    """Every ingredient file of ``parts`` (:func:`is_ingredient`), in fingerprint order."""
    return sorted(p for part in parts if (root / part).exists() for p in (root / part).rglob("*") if is_ingredient(p))


def _file_digests(root: Path, parts: tuple[str, ...] = _INGREDIENTS) -> list[tuple[Path, bytes]]:
    """(file, sha256 of content) of every ingredient file (of ``parts``), in fingerprint order."""
    files = ingredient_files(root, parts)
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


def check_checkpoint_files(path: str | Path) -> None:
    """Raise CheckpointError naming the first missing part of the checkpoint at ``path``: the
    ``base/``, ``tokenizer/`` and ``engram/`` folders, ``base/config.json`` and its weights
    (``*.safetensors`` or ``*.bin``), a non-empty ``tokenizer/``, ``engram/config.json`` and
    ``engram/weights.safetensors``. Only names are checked (no file is read): cheap enough for a
    driver to run before it starts workers that would each fail on the missing file (a build
    interrupted before its weights were written made every compile actor of a night die with a
    traceback)."""
    root = Path(path)
    fix = ("copy the whole checkpoint again, or create one with `engram model init DIR --tiny`; "
           "`engram model info DIR` shows what a checkpoint holds")
    for part in ("base", "tokenizer", "engram"):
        if not (root / part).is_dir():
            raise CheckpointError(f"checkpoint {root}: missing {part}/ ({fix})")
    needed = [root / "base" / "config.json", root / "engram" / "config.json", root / "engram" / "weights.safetensors"]
    for file in needed:
        if not file.is_file():
            raise CheckpointError(f"checkpoint {root}: missing {file.relative_to(root)} (an incomplete copy or an "
                                  f"interrupted build: {fix})")
    base = root / "base"
    if not any(p.is_file() for pattern in ("*.safetensors", "*.bin") for p in base.glob(pattern)):
        raise CheckpointError(f"checkpoint {root}: base/ holds no weights (*.safetensors or *.bin) (an incomplete "
                              f"copy or an interrupted build: {fix})")
    if not any((root / "tokenizer").iterdir()):
        raise CheckpointError(f"checkpoint {root}: tokenizer/ is empty ({fix})")


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
