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


# Why a continuation ended (``engram ask --json``; the OpenAI API says "stop" / "length").
MEMORY_END = "memory_end"  # the user's memory stopped writing: the last answer token was produced
EOS = "eos"  # an end-of-sequence token
LENGTH = "length"  # max_new_tokens reached


MEMORY_END_ORDERS = 3
"""A memory-driven position has every head of each order 2..this one written (or of all orders
where the model hashes fewer)."""


def memory_depth(em: EngramModel, overlay: RowMapOverlay | None, ids: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) int64: at the last position of ``ids`` (B, T), how many orders, from the 2-gram up,
    have every head address a row of the write layer (``config.target_layer``) that the
    sequence's owners wrote (``overlay`` row b serves sequence b): 0 when not all of the 2-gram's
    do, ``len(config.orders)`` when all orders' do.

    The compiler trains every head whose N-gram lies inside the fact's text
    (:func:`engram_core.addressing.own_text_heads`): at the fact's token of index p (0 = its
    first) the orders 2..p+1, so a written position's depth is at least ``min(p, orders)``, one
    more at each next position of the same fact. ``valid`` (B, T) marks real tokens (left
    padding). Runs on the ids' device, without a host sync: the last ``max_ngram`` tokens are
    hashed and the overlay's index gathered."""
    layer = em.config.target_layer
    if overlay is None or not overlay.touches(layer):
        return torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
    window = ids[:, -em.config.max_ngram:]
    window_valid = valid[:, -em.config.max_ngram:] if valid is not None else None
    rows = em.memory.addresser.rows_torch(window, layer, window_valid, check=False)[:, -1:]  # (B, 1, H)
    hit = overlay.written(layer, rows)[:, 0]  # (B, H)
    whole_orders = hit.view(ids.shape[0], len(em.config.orders), em.config.heads_per_order).all(-1)  # (B, orders)
    return whole_orders.long().cumprod(-1).sum(-1)


def _driven_depth(em: EngramModel) -> int:
    return min(MEMORY_END_ORDERS - 1, len(em.config.orders))


def memory_driven(em: EngramModel, overlay: RowMapOverlay | None, ids: torch.Tensor,
                  valid: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: whether the last position of ``ids`` (B, T) is driven by the sequence's own memory:
    every head of its 2-gram and of its 3-gram (the orders up to :data:`MEMORY_END_ORDERS`)
    addresses a row its owners wrote (:func:`memory_depth`). Every written position from a fact's
    third token on qualifies (a written position of index 1, the last of a two-token trigger,
    does not: its answer is then decoded as without the rule until its next position). Not
    tripped by one head's hash collision, nor by a 2-gram the user's other facts share (digits:
    "...79" of a year after the "79" of a phone number), which the 2-gram alone was: 157 of 210
    answers ran on (bench/RESULTS.md, 2026-12-02)."""
    return memory_depth(em, overlay, ids, valid) >= _driven_depth(em)


class MemoryEnd:
    """The "memory ended" stop rule, as a transformers ``StoppingCriteria`` (all on the device).

    A sequence ends at the first generated token whose position does not go on the fact that
    the position before it (which predicted that token) wrote: that position was memory-driven
    (:func:`memory_driven`) and the new one's :func:`memory_depth` is less than one more than
    its depth (or than all orders, where it had them all). Along one fact the depth grows by
    one a position until it holds every order, since each N-gram there is the previous one and
    one more token of the same text (the depth carried to the next step is at most one more than
    the last one carried: one head's hash coincidence at a higher order, which the user's other
    rows make likely on a small table, asks no more of the next position); after the last answer token the position is no written
    position of that fact, and another of the user's facts that wrote its 2-gram and 3-gram
    (" Saoirse Yilmaz" also begins ", my spouse, at ...": years, digits) did not write its
    longer N-grams unless its text holds the whole of this one's last tokens (up to
    ``max_ngram``). So a chain of facts (one answer followed by another fact's trigger) ends
    after the first answer too. A prompt whose end is not memory-driven decodes as without the
    rule until the model's own text reaches a written position.

    ``prompt_ids`` (B, T) left-padded with ``mask`` (B, T); ``enabled`` (B,) bool: the sequences
    the rule applies to (default: all). After decoding, :attr:`ended` (B,) bool says which
    sequences ended here and :attr:`length` (B,) after how many new tokens (those included)."""

    def __init__(self, em: EngramModel, overlay: RowMapOverlay | None, prompt_ids: torch.Tensor,
                 mask: torch.Tensor | None, enabled: torch.Tensor | None = None):
        self.em, self.overlay = em, overlay
        self.prompt_length = prompt_ids.shape[1]
        device = prompt_ids.device
        # first real column of each sequence: a window column before it is padding
        self.start = (self.prompt_length - mask.sum(1)).view(-1, 1) if mask is not None else None
        self.enabled = enabled.to(device) if enabled is not None else torch.ones(prompt_ids.shape[0], dtype=torch.bool,
                                                                                  device=device)
        self.driven, self.orders = _driven_depth(em), len(em.config.orders)
        # The prompt's last position, one order less where it is memory-driven: the tokens before a
        # trigger are no fact's (a chat's header, a sentence) and may read as another's longest
        # N-gram, and one order's hash coincidence makes a two-token trigger's last position (depth
        # 1) read as driven (2), which asked its first answer position for 3 and cut the answer after
        # one token. Whether the answer is checked at all follows the depth as read (``inside``):
        # a one-token answer after a three-token trigger (depth 2) still ends.
        depth = memory_depth(em, overlay, prompt_ids, self._valid(prompt_ids))
        self.inside = depth >= self.driven
        self.previous = torch.where(self.inside, depth - 1, depth)
        self.ended = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=device)
        self.length = torch.full((prompt_ids.shape[0],), -1, dtype=torch.long, device=device)

    def _valid(self, ids: torch.Tensor) -> torch.Tensor | None:
        if self.start is None:
            return None
        width = min(ids.shape[1], self.em.config.max_ngram)
        columns = torch.arange(ids.shape[1] - width, ids.shape[1], device=ids.device)
        return (columns.view(1, -1) >= self.start.to(ids.device)).expand(ids.shape[0], -1)

    def step(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the sequences whose newest token (``input_ids[:, -1]``) ends their answer."""
        now = memory_depth(self.em, self.overlay, input_ids[:, -self.em.config.max_ngram:], self._valid(input_ids))
        expected = torch.clamp(self.previous + 1, max=self.orders)  # the same fact's next position
        stop = self.inside & (now < expected) & self.enabled & ~self.ended
        # A position goes at most one order deeper than the one before it, inside a fact or entering
        # one: a coincidence of more orders is not carried on (it would ask the next position for more).
        self.previous = torch.minimum(now, expected)
        self.inside = self.previous >= self.driven
        self.length = torch.where(stop, input_ids.shape[1] - self.prompt_length, self.length)
        self.ended |= stop
        return self.ended

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return self.step(input_ids)


@torch.no_grad()
def generate(
    em: EngramModel,
    prompts: Sequence[str],
    deltas: Sequence[Sequence[Delta]] | None = None,
    max_new_tokens: int = 16,
    stop_at_memory_end: bool = False,
) -> list[str]:
    """Greedy continuations of ``prompts``, each with its own deltas, in one batch.

    ``stop_at_memory_end``: end each continuation after the last token its memory writes
    (:class:`MemoryEnd`: a recalled answer without the backbone's run-on text after it)."""
    return [text for text, _ in generate_ended(em, prompts, deltas, max_new_tokens, stop_at_memory_end)]


@torch.no_grad()
def generate_ended(em: EngramModel, prompts: Sequence[str], deltas: Sequence[Sequence[Delta]] | None = None,
                   max_new_tokens: int = 16, stop_at_memory_end: bool = True) -> list[tuple[str, str]]:
    """:func:`generate`, with why each continuation ended: ``(text, reason)``, reason one of
    :data:`MEMORY_END`, :data:`EOS`, :data:`LENGTH`. The memory rule is on by default here."""
    overlay = overlay_for(em, deltas) if deltas is not None else None
    encoded = [em.encode_prompt(canonical_prompt(p) or p) for p in prompts]
    return _generate(em, encoded, overlay, max_new_tokens, stop_at_memory_end)


@torch.no_grad()
def generate_with_overlay(em: EngramModel, prompts: Sequence[str], overlay: RowMapOverlay | None,
                          max_new_tokens: int = 16, stop_at_memory_end: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` with a prebuilt overlay (row b of it serves prompt b).

    Each prompt is read in canonical form (:func:`engram_core.text.canonical_prompt`: NFC, no
    invisible characters, no surrounding whitespace), the form facts are compiled in; a prompt
    that canonicalises to nothing is used as given. ``stop_at_memory_end``: see :func:`generate`."""
    return generate_ids(em, [em.encode_prompt(canonical_prompt(p) or p) for p in prompts], overlay, max_new_tokens,
                        stop_at_memory_end)


@torch.no_grad()
def generate_ids(em: EngramModel, encoded: Sequence[Sequence[int]], overlay: RowMapOverlay | None,
                 max_new_tokens: int = 16, stop_at_memory_end: bool = False) -> list[str]:
    """Greedy continuations of prompts given as token ids (e.g. a chat template's rendering), left
    padded into one batch, with a prebuilt overlay (row b of it serves prompt b).
    ``stop_at_memory_end``: see :func:`generate`."""
    return [text for text, _ in _generate(em, encoded, overlay, max_new_tokens, stop_at_memory_end)]


def _generate(em: EngramModel, encoded: Sequence[Sequence[int]], overlay: RowMapOverlay | None,
              max_new_tokens: int, stop_at_memory_end: bool) -> list[tuple[str, str]]:
    T = max(len(e) for e in encoded)
    pad = em.tokenizer.pad_token_id if em.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(encoded), T), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for b, e in enumerate(encoded):
        ids[b, T - len(e):] = torch.as_tensor(e)
        mask[b, T - len(e):] = 1
    ids, mask = ids.to(em.device), mask.to(em.device)
    criteria = {}
    with em.memory.use(overlay):
        if stop_at_memory_end:
            from transformers import StoppingCriteriaList

            rule = MemoryEnd(em, overlay, ids, mask)
            criteria = {"stopping_criteria": StoppingCriteriaList([rule])}
        out = em.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            **criteria,
        )
    new_tokens = out[:, T:].tolist()
    ended = rule.length.tolist() if stop_at_memory_end else [-1] * len(encoded)
    eos = set(_eos_ids(em))
    results = []
    for tokens, length in zip(new_tokens, ended):
        at = next((i for i, t in enumerate(tokens) if t in eos), None)
        if at is not None and (length < 0 or at < length):
            reason = EOS  # (generate pads after it; the rule may read those pads as an end later)
        elif length > 0:  # the rule ended it; it ran on until the batch was done: cut there
            tokens, reason = tokens[:length], MEMORY_END
        else:
            reason = LENGTH
        results.append((em.tokenizer.decode(tokens, skip_special_tokens=True), reason))
    return results


def _eos_ids(em: EngramModel) -> list[int]:
    """The ids ``generate`` ends a sequence at: the generation config's ``eos_token_id`` (an id or
    a list) and the tokenizer's."""
    configured = getattr(getattr(em.model, "generation_config", None), "eos_token_id", None)
    ids = [configured] if isinstance(configured, int) else list(configured or [])
    if em.tokenizer.eos_token_id is not None:
        ids.append(em.tokenizer.eos_token_id)
    return [int(i) for i in ids]


@torch.no_grad()
def greedy_tokens(em: EngramModel, prompt: str, num_tokens: int, deltas: Sequence[Delta] = (),
                  stop_at_memory_end: bool = False) -> list[int]:
    """Exactly ``num_tokens`` greedy tokens for one prompt (no padding, no stop token), with a KV cache.
    The prompt is read in canonical form, as :func:`generate_with_overlay` reads it.
    ``stop_at_memory_end``: fewer tokens where the memory ends first (see :func:`generate`)."""
    step_ids = torch.as_tensor([em.encode_prompt(canonical_prompt(prompt) or prompt)], device=em.device)
    cache, tokens = None, []
    overlay = overlay_for(em, [list(deltas)])
    rule = MemoryEnd(em, overlay, step_ids, None) if stop_at_memory_end else None
    history = step_ids
    with em.memory.use(overlay):
        for _ in range(num_tokens):
            out = em.model(input_ids=step_ids, use_cache=True, **cache_kwargs(em.model, cache))
            cache = output_cache(out)
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(step_ids))
            if rule is not None:
                history = torch.cat([history, step_ids], dim=1)
                if bool(rule.step(history)[0]):  # the token above already waited for the device
                    break
    return tokens
