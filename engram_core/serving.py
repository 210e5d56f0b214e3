"""Applying deltas to serve requests.

Two forms:

* :func:`applied` swaps one owner's delta into the tables (row += value) for a block of code
  and restores the saved rows bit-exactly afterwards (single-tenant, in-place).
* :func:`overlay_for` builds a :class:`~engram_core.row_overlay.RowMapOverlay` in which each sequence
  of a batch sees the base table plus only its own owners' deltas: no shared mutation, so one
  forward pass serves many users, and it works with ``generate``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch

from .checkpoint import EngramModel
from .delta import Delta
from .hf_compat import cache_kwargs, output_cache
from .row_overlay import RowMapOverlay, row_map_overlay
from .text import canonical_prompt


class DeltaMismatch(ValueError):
    """A delta that does not belong to the loaded model."""


def check_delta(em: EngramModel, delta: Delta, owner: str = "delta") -> None:
    if delta.num_rows == 0:
        return
    if delta.width != em.config.row_width:
        raise DeltaMismatch(f"{owner}: row width {delta.width} != model row width {em.config.row_width}")
    for layer in set(delta.layers.tolist()):
        if layer not in em.config.layers:
            raise DeltaMismatch(f"{owner}: writes layer {layer}, but the model has Engram at {em.config.layers}")
        rows = delta.row_ids[delta.layers == layer]
        if rows.min() < 0 or rows.max() >= em.memory.num_rows(layer):
            raise DeltaMismatch(f"{owner}: row ids out of range for layer {layer} (table has {em.memory.num_rows(layer)} rows)")


@contextmanager
def applied(em: EngramModel, delta: Delta) -> Iterator[None]:
    """Add ``delta`` into the tables in place; restore the exact previous rows on exit."""
    check_delta(em, delta)
    saved = []
    try:
        with torch.no_grad():
            for layer in sorted(set(delta.layers.tolist())):
                table = em.memory.layer(layer).table
                pick = delta.layers == layer
                rows = torch.as_tensor(delta.row_ids[pick], device=table.device)
                saved.append((layer, rows, table[rows].clone()))
                table[rows] += torch.as_tensor(delta.values[pick], device=table.device).to(table.dtype)
                em.memory.layer(layer).table_is_zero = False
        yield
    finally:
        with torch.no_grad():
            for layer, rows, original in saved:
                em.memory.layer(layer).table[rows] = original
        em.memory.refresh_zero_flags()


def split_by_layer(delta: Delta, device: torch.device | str) -> dict[int, tuple]:
    """``delta`` as ``{layer: (rows (k,) int64, values (k, w) float16)}``.

    For a CPU model these are views of the delta's NumPy arrays (no copy; never written), else
    tensors on ``device``."""
    out = {}
    on_host = torch.device(device).type == "cpu"
    for layer in np.unique(delta.layers).tolist():
        lo, hi = np.searchsorted(delta.layers, [layer, layer + 1])  # rows are sorted by (layer, row)
        rows, values = delta.row_ids[lo:hi], delta.values[lo:hi]
        out[int(layer)] = (rows, values) if on_host else (_tensor(rows).to(device), _tensor(values).to(device))
    return out


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A zero-copy view of a (possibly read-only, e.g. decoded from a bundle) array; never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def overlay_from_parts(
    em: EngramModel, per_sequence: Sequence[Sequence[dict[int, tuple]]]
) -> RowMapOverlay | None:
    """Overlay where sequence b sees the sum of its owners' per-layer rows (see :func:`split_by_layer`)."""
    entries: dict[int, list] = {}
    for b, owners in enumerate(per_sequence):
        for parts in owners:
            for layer, (rows, values) in parts.items():
                entries.setdefault(layer, []).append((b, rows, values))
    if not entries:
        return None
    return row_map_overlay(len(per_sequence), entries, {layer: em.memory.layer(layer).table for layer in entries})


def overlay_for(em: EngramModel, per_sequence: Sequence[Sequence[Delta]]) -> RowMapOverlay | None:
    """Overlay where sequence b sees the sum of ``per_sequence[b]``'s deltas (may be empty).

    Checks and converts every delta; a serving node does that once per shard load instead
    (:mod:`engram_core.memory_index`)."""
    parts: dict[int, dict] = {}
    per_sequence_parts = []
    for deltas in per_sequence:
        owners = []
        for delta in deltas:
            if delta.num_rows == 0:
                continue
            if id(delta) not in parts:
                check_delta(em, delta)
                parts[id(delta)] = split_by_layer(delta, em.device)
            owners.append(parts[id(delta)])
        per_sequence_parts.append(owners)
    return overlay_from_parts(em, per_sequence_parts)


@torch.no_grad()
def generate(
    em: EngramModel,
    prompts: Sequence[str],
    deltas: Sequence[Sequence[Delta]] | None = None,
    max_new_tokens: int = 16,
) -> list[str]:
    """Greedy continuations of ``prompts``, each with its own deltas, in one batch."""
    overlay = overlay_for(em, deltas) if deltas is not None else None
    return generate_with_overlay(em, prompts, overlay, max_new_tokens)


@torch.no_grad()
def generate_with_overlay(em: EngramModel, prompts: Sequence[str], overlay: RowMapOverlay | None,
                          max_new_tokens: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` with a prebuilt overlay (row b of it serves prompt b).

    Each prompt is read in canonical form (:func:`engram_core.text.canonical_prompt`: NFC, no
    invisible characters, no surrounding whitespace), the form facts are compiled in; a prompt
    that canonicalises to nothing is used as given."""
    return generate_ids(em, [em.encode_prompt(canonical_prompt(p) or p) for p in prompts], overlay, max_new_tokens)


@torch.no_grad()
def generate_ids(em: EngramModel, encoded: Sequence[Sequence[int]], overlay: RowMapOverlay | None,
                 max_new_tokens: int = 16) -> list[str]:
    """Greedy continuations of prompts given as token ids (e.g. a chat template's rendering), left
    padded into one batch, with a prebuilt overlay (row b of it serves prompt b)."""
    T = max(len(e) for e in encoded)
    pad = em.tokenizer.pad_token_id if em.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, T - len(e):] = torch.as_tensor(e)
        mask[b, T - len(e):] = 1
    with em.memory.use(overlay):
        out = em.model.generate(
            input_ids=ids.to(em.device),
            attention_mask=mask.to(em.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    new_tokens = out[:, T:]
    return [em.tokenizer.decode(t, skip_special_tokens=True) for t in new_tokens]


@torch.no_grad()
def greedy_tokens(em: EngramModel, prompt: str, num_tokens: int, deltas: Sequence[Delta] = ()) -> list[int]:
    """Exactly ``num_tokens`` greedy tokens for one prompt (no padding, no stop token), with a KV cache.
    The prompt is read in canonical form, as :func:`generate_with_overlay` reads it."""
    step_ids = torch.as_tensor([em.encode_prompt(canonical_prompt(prompt) or prompt)], device=em.device)
    cache, tokens = None, []
    with em.memory.use(overlay_for(em, [list(deltas)])):
        for _ in range(num_tokens):
            out = em.model(input_ids=step_ids, use_cache=True, **cache_kwargs(em.model, cache))
            cache = output_cache(out)
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(step_ids))
    return tokens
