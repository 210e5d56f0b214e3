"""The Engram layer, per-sequence row overlays, and attachment to a Hugging Face causal LM.

Attachment uses two forward pre-hooks and forks no transformers code:

* on the backbone (``LlamaModel``, ``Qwen2Model``, ``GPT2Model``, ...): records the token ids of
  the call (joined to earlier ids when a KV cache continues a sequence, so ``generate`` works)
  and computes the addressed rows of every Engram layer once per forward;
* on each Engram decoder layer: adds ``EngramLayer(hidden, rows)`` to the hidden states
  entering that layer (the residual stream).

Per-user rows never mutate the table: an :class:`Overlay` maps (sequence, row) to an additive
value, so each sequence of a batch sees the base table plus exactly its own owners' deltas
(the compiler's form, trainable; serving uses :mod:`engram_core.row_overlay`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .addressing import Addresser
from .config import ConfigError, EngramConfig
from .hf_compat import called_with_cache
from .row_overlay import RowMapOverlay


class EngramLayer(nn.Module):
    """One Engram lookup: rows -> gated value added to the residual stream."""

    def __init__(self, hidden_size: int, config: EngramConfig, num_rows: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.soften_gate = config.soften_gate
        self.table = nn.Parameter(torch.zeros(num_rows, config.row_width), requires_grad=False)
        self.key_proj = nn.Linear(config.engram_dim, hidden_size, bias=False)
        self.value_proj = nn.Linear(config.engram_dim, hidden_size, bias=False)
        self.conv = None
        if config.short_conv:
            # Depthwise causal conv, zero-initialised so the branch starts as an exact no-op.
            self.conv = nn.Conv1d(hidden_size, hidden_size, config.conv_kernel, groups=hidden_size, bias=False)
            nn.init.zeros_(self.conv.weight)
        self.table_is_zero = True  # an all-zero table adds exactly nothing: skip the work

    def forward(self, hidden: torch.Tensor, rows: torch.Tensor, overlay: "Overlay | RowMapOverlay | None" = None,
                index: int | None = None) -> torch.Tensor:
        # hidden (B, T, d); rows (B, T, H); overlay: per-sequence rows added at Engram layer ``index``
        return self.mix(hidden, self.read(rows, overlay, index))

    def read(self, rows: torch.Tensor, overlay: "Overlay | RowMapOverlay | None" = None,
             index: int | None = None) -> torch.Tensor:
        """The rows (B, T, H, w) that ``rows`` address: the table's, plus ``overlay``'s values."""
        if overlay is None:
            return F.embedding(rows, self.table)  # a plain gather, several times faster than table[rows] on CPU
        return overlay.read(index, rows, self.table)

    @property
    def conv_is_zero(self) -> bool:
        """A zero (untrained) conv branch adds exactly nothing: ``silu(conv(x)) == 0``."""
        return self.conv is None or not bool(self.conv.weight.detach().any())

    def mix(self, hidden: torch.Tensor, e: torch.Tensor, conv: bool = True) -> torch.Tensor:
        """The gated value of rows ``e`` (B, T, H, w) as read (table plus overlays) for ``hidden``.
        ``conv=False`` leaves out the conv branch (callers check :attr:`conv_is_zero`)."""
        e = e.flatten(-2).to(self.key_proj.weight.dtype)  # (B, T, H*w)
        k = self.key_proj(e)  # (B, T, d)
        v = self.value_proj(e)  # (B, T, d)
        h = hidden.to(k.dtype)
        g = (F.rms_norm(h, (self.hidden_size,)) * F.rms_norm(k, (self.hidden_size,))).sum(-1) / math.sqrt(self.hidden_size)
        if self.soften_gate:
            g = g.sign() * g.abs().clamp_min(1e-6).sqrt()
        gated = torch.sigmoid(g).unsqueeze(-1) * v  # (B, T, d)
        out = gated
        if conv and self.conv is not None:
            T = gated.shape[1]
            x = F.rms_norm(gated, (self.hidden_size,)).transpose(1, 2)  # (B, d, T)
            x = F.pad(x, (self.conv.kernel_size[0] - 1, 0))
            out = gated + F.silu(self.conv(x)[..., :T].transpose(1, 2))
        return out.to(hidden.dtype)


@dataclass
class Overlay:
    """Additive rows per sequence of one batch, for one or more Engram layers.

    ``owners`` (B, J) gives each sequence up to J owner slots (-1 = none); a sequence sees the
    sum of its owners' rows. Per layer, ``keys`` holds sorted ``slot * num_rows + row`` and
    ``values`` the matching (K, w) vectors (they may require grad: the compiler trains them).
    """

    owners: torch.Tensor  # (B, J) int64
    keys: dict[int, torch.Tensor]  # layer -> (K,) int64, sorted
    values: dict[int, torch.Tensor]  # layer -> (K, w)

    @classmethod
    def from_deltas(cls, per_sequence, num_rows: dict[int, int]) -> "Overlay":
        """Sequence b sees the sum of ``per_sequence[b]``'s deltas (:class:`~engram_core.delta.Delta`),
        one owner slot per distinct delta. The serving form is :func:`row_map_overlay`; this
        one is its reference (tests) and the variant it replaced (bench)."""
        slots: list = []
        owners = []
        for deltas in per_sequence:
            owners.append([])
            for delta in deltas:
                if all(delta is not s for s in slots):
                    slots.append(delta)
                owners[-1].append(next(i for i, s in enumerate(slots) if s is delta))
        owner_tensor = torch.full((len(owners), max(1, max(map(len, owners)))), -1, dtype=torch.long)
        for b, row in enumerate(owners):
            owner_tensor[b, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        keys, values = {}, {}
        for layer, rows in num_rows.items():
            parts = [(torch.as_tensor(d.row_ids[d.layers == layer]) + i * rows, torch.as_tensor(d.values[d.layers == layer]))
                     for i, d in enumerate(slots)]
            keys[layer] = torch.cat([k for k, _ in parts])
            values[layer] = torch.cat([v for _, v in parts]).float()
        return cls(owner_tensor, keys, values)

    def touches(self, layer: int) -> bool:
        keys = self.keys.get(layer)
        return keys is not None and keys.numel() > 0

    def read(self, layer: int, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The rows (B, T, H, w) of ``table`` at ``rows``, plus this overlay's values."""
        return self.add_to(layer, rows, F.embedding(rows, table), table.shape[0])

    def add_to(self, layer: int, rows: torch.Tensor, e: torch.Tensor, num_rows: int) -> torch.Tensor:
        """``e`` (B, T, H, w), the base rows gathered at ``rows``, plus this overlay's values."""
        values = self.lookup(layer, rows, num_rows)
        return e if values is None else e + values.to(e.dtype)

    def lookup(self, layer: int, rows: torch.Tensor, num_rows: int) -> torch.Tensor | None:
        """rows (B, T, H) -> (B, T, H, w) summed overlay values (zeros where no owner wrote)."""
        keys = self.keys.get(layer)
        if keys is None or keys.numel() == 0:
            return None
        values = self.values[layer]
        out = None
        for j in range(self.owners.shape[1]):
            owner = self.owners[:, j].to(rows.device)  # (B,)
            query = owner.view(-1, 1, 1) * num_rows + rows  # (B, T, H)
            idx = torch.searchsorted(keys, query).clamp_max(keys.numel() - 1)
            hit = (keys[idx] == query) & (owner.view(-1, 1, 1) >= 0)
            picked = F.embedding(idx, values) * hit.unsqueeze(-1).to(values.dtype)  # backward: a sorted, deterministic scatter
            out = picked if out is None else out + picked
        return out


def backbone_and_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The decoder backbone (called with input_ids) and its list of decoder layers."""
    hf = model
    if hasattr(hf, "get_base_model"):  # a peft model
        hf = hf.get_base_model()
    backbone = getattr(hf, "base_model", hf)
    for name in ("layers", "h", "blocks"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            return backbone, layers
    raise ConfigError(
        f"cannot attach Engram to {type(hf).__name__}: no decoder layer list found "
        "(supported: Llama/Qwen2-style `model.layers`, GPT-2-style `transformer.h`)"
    )


class EngramMemory(nn.Module):
    """All Engram layers of one model, its addressing, and the hooks that wire them in."""

    def __init__(self, config: EngramConfig, addresser: Addresser, hidden_size: int):
        super().__init__()
        self.config = config
        self.addresser = addresser
        self.engram_layers = nn.ModuleDict(
            {str(i): EngramLayer(hidden_size, config, addresser.num_rows(i)) for i in config.layers}
        )
        self._handles: list = []
        self._rows: dict[int, torch.Tensor] = {}
        self._context: tuple | None = None
        self._history: torch.Tensor | None = None
        self._history_mask: torch.Tensor | None = None
        self._overlay: Overlay | RowMapOverlay | None = None
        self._embeds_ids: torch.Tensor | None = None

    def layer(self, index: int) -> EngramLayer:
        return self.engram_layers[str(index)]

    def num_rows(self, layer: int) -> int:
        return self.layer(layer).table.shape[0]

    def refresh_zero_flags(self) -> None:
        for module in self.engram_layers.values():
            module.table_is_zero = not bool(module.table.detach().any())

    # -- attachment ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        backbone, layers = backbone_and_layers(model)
        self.config.check_fits(len(layers))
        self.detach()
        self._handles.append(backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True))
        for index in self.config.layers:
            self._handles.append(layers[index].register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_backbone(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            input_ids = self._embeds_ids  # inputs_embeds given with the ids they stand for (use(embeds_ids=...))
        if input_ids is None:
            raise ValueError("an Engram model must be called with input_ids (inputs_embeds alone cannot be addressed)")
        mask = kwargs.get("attention_mask")
        cache = called_with_cache(kwargs)
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        new_mask = None
        if mask is not None and mask.dim() == 2:
            new_mask = mask[:, -input_ids.shape[1]:].bool()
        if past > 0 and (self._history is None or self._history.shape[0] != input_ids.shape[0]
                         or self._history.shape[1] < past):
            raise ValueError(
                "Engram: this call continues a KV cache of %d tokens that this model did not just build "
                "(or built for another batch); pass its tokens with memory.use(..., history=(ids, mask))" % past)
        if past == 0:
            history, history_mask = input_ids, new_mask
        else:
            history = torch.cat([self._history[:, :past], input_ids], dim=1)
            if new_mask is None and self._history_mask is None:
                history_mask = None
            else:
                old = self._history_mask[:, :past] if self._history_mask is not None else torch.ones_like(self._history[:, :past], dtype=torch.bool)
                new = new_mask if new_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
                history_mask = torch.cat([old, new], dim=1)
        self._history, self._history_mask = history, history_mask
        # Only the last N-1 earlier tokens matter for the new positions' N-grams.
        context = self.config.max_ngram - 1 + input_ids.shape[1]
        ids = history[:, -context:]
        valid = history_mask[:, -context:] if history_mask is not None else None
        # Rows are computed lazily, per layer, only where a layer has something to add; token
        # ids are range-checked once per sequence (a continuation's new ids were produced by
        # the model itself), which keeps host-device syncs out of decode and compile steps.
        self._context = (ids, valid, input_ids.shape[1], past == 0)
        self._rows = {}
        return None

    def _rows_for(self, index: int) -> torch.Tensor:
        if index not in self._rows:
            ids, valid, T, check = self._context
            self._rows[index] = self.addresser.rows_torch(ids, index, valid, check=check)[:, -T:]
        return self._rows[index]

    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            layer = self.layer(index)
            has_overlay = self._overlay is not None and self._overlay.touches(index)
            if layer.table_is_zero and not has_overlay:
                return None  # exactly the base model
            rows = self._rows_for(index)
            overlay = self._overlay if has_overlay else None
            if args:
                hidden = args[0]
                return (hidden + layer(hidden, rows, overlay, index), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            kwargs = dict(kwargs, hidden_states=hidden + layer(hidden, rows, overlay, index))
            return args, kwargs

        return hook

    @contextmanager
    def use(self, overlay: Overlay | RowMapOverlay | None, history: tuple[torch.Tensor, torch.Tensor | None] | None = None,
            embeds_ids: torch.Tensor | None = None) -> Iterator[None]:
        """Run the model with ``overlay`` applied (each sequence sees only its own owners).

        ``history`` (ids, mask) names the tokens already in the KV cache that the next call
        continues, when that cache was not built by the previous call (e.g. a shared prefix
        cache reused for many steps). ``embeds_ids``: the token ids of a call made with
        ``inputs_embeds`` instead of ``input_ids`` (they address the rows).
        """
        previous = self._overlay, self._history, self._history_mask, self._embeds_ids
        self._overlay = overlay
        self._embeds_ids = embeds_ids
        if history is not None:
            self._history, self._history_mask = history[0], (history[1].bool() if history[1] is not None else None)
        try:
            yield
        finally:
            self._overlay, self._history, self._history_mask, self._embeds_ids = previous
