"""The Engram layer, per-sequence row overlays, and attachment to a Hugging Face causal LM.

Attachment uses two forward pre-hooks and forks no transformers code:

* on the backbone (``LlamaModel``, ``Qwen2Model``, ``GPT2Model``, ...): records the token ids of
  the call (joined to earlier ids when a KV cache continues a sequence, so ``generate`` works)
  and computes the addressed rows of every Engram layer once per forward;
* on each Engram decoder layer: adds ``EngramLayer(hidden, rows)`` to the hidden states
  entering that layer (the residual stream).

Per-user rows never mutate the table: an :class:`Overlay` maps (sequence, row) to an additive
value, so each sequence of a batch sees the base table plus exactly its own owners' deltas.
"""

from __future__ import annotations

import math
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .addressing import Addresser
from .config import ConfigError, EngramConfig


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


@dataclass(frozen=True)
class _RowMap:
    """One layer of a :class:`RowMapOverlay` in add form (tables too large to copy)."""

    slots: torch.Tensor  # (B * stride,) int32: value index of (sequence, row key), 0 = none
    stride: int
    offsets: torch.Tensor  # (B, 1, 1) int64: sequence b's base in ``slots``
    values: torch.Tensor  # (N + 1, w): row 0 all -0.0 (adds nothing), row k the summed value of entry k
    row_keys: torch.Tensor | None  # (num_rows,) int32: dense key of each written row (None: key = row)
    written: np.ndarray | None = None  # entries of a pooled host map (given back, cleared, when collected)
    items: list | None = None  # the entries it was built from

    def __del__(self):
        if self.written is not None:
            _ZEROED_MAPS.give_back(self.slots, self.written)


@dataclass(frozen=True, eq=False)
class _ReadMap:
    """One layer of a :class:`RowMapOverlay` in read form: base rows and deltas in one gather.

    ``table`` is a (pooled) copy of the layer's table followed by the batch's written rows: row
    ``R + k`` holds ``table[row_k] + value_k``, added in the table's dtype exactly as the add form
    adds it. ``index[b, r]`` is the row that sequence ``b`` reads for row ``r``: ``r`` itself
    where ``b`` wrote nothing, ``R + k`` where it wrote entry ``k``. A forward reads
    ``table[index[b, rows]]`` instead of ``table[rows]``: one small int gather more than the
    model without deltas. Valid while the layer's table is the one copied, at the same version;
    :meth:`RowMapOverlay.read` rebuilds it otherwise."""

    index: torch.Tensor  # (B, R) int32
    table: torch.Tensor  # (R + capacity, w)
    source: torch.Tensor  # the layer's table it copies
    version: int  # source._version when copied
    items: list  # the entries it was built from (a rebuild after the table changed)
    keys: np.ndarray | torch.Tensor  # the entries of ``index`` it wrote (flat: b * R + row)...
    rows: np.ndarray | torch.Tensor  # ...and the rows they held before (int32)

    def __del__(self):  # its buffers go back to the pool (a __del__ costs less than a weakref.finalize)
        _READ_POOL.give_back(self)


class RowMapOverlay:
    """The serving form of per-sequence rows: same meaning as :class:`Overlay`, faster to apply.

    Built once per request batch (:func:`row_map_overlay`). Each layer is in one of two forms:

    * read form (:class:`_ReadMap`, tables up to :data:`READ_FORM_LIMIT` bytes): a forward reads
      the base rows and the deltas with one gather from a copy of the table extended by the
      written rows, found through a per-sequence index: one int gather more than the base model;
    * add form (:class:`_RowMap`, larger tables): the base rows are gathered as without deltas,
      then the value index of every (sequence, row) is found with one gather (two for tables too
      large for a (sequences x rows) map) and the values added: at hits only for large calls on
      CPU (a prefill, ``index_add_``), everywhere for small ones and on CUDA (-0.0 where nothing
      was written).

    Inference only (no autograd through the values): the compiler trains with :class:`Overlay`.
    """

    def __init__(self, maps: dict[int, _ReadMap | _RowMap], dense_limit: int = 0, read_limit: int = 0):
        self.maps = maps
        self._limits = dense_limit, read_limit
        self._lock = threading.Lock()

    def touches(self, layer: int) -> bool:
        return layer in self.maps

    def read(self, layer: int, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """The rows (B, T, H, w) of ``table`` at ``rows``, each sequence plus its own values."""
        m = self.maps[layer]
        if isinstance(m, _ReadMap):
            if m.source is not table or _version(table) != m.version:
                m = self._rebuild(layer, table)
        if not isinstance(m, _ReadMap):
            return self.add_to(layer, rows, F.embedding(rows, table), table.shape[0])
        index = torch.gather(m.index, 1, rows.reshape(rows.shape[0], -1))
        return F.embedding(index, m.table).view(*rows.shape, m.table.shape[1])

    def _rebuild(self, layer: int, table: torch.Tensor) -> _ReadMap | _RowMap:
        """The table changed in place (or is another one) since this layer was built: build it
        again from its entries, against the table as it is now."""
        with self._lock:
            m = self.maps[layer]
            if not isinstance(m, _ReadMap) or m.source is not table or _version(table) != m.version:
                m = self.maps[layer] = _layer_map(m.index.shape[0], m.items, table, *self._limits)
            return m

    def add_to(self, layer: int, rows: torch.Tensor, e: torch.Tensor, num_rows: int) -> torch.Tensor:
        """``e`` (B, T, H, w), the base rows gathered at ``rows``, plus each sequence's values
        (add form only)."""
        m = self.maps[layer]
        if m.row_keys is None:  # one level: slots is (sequence x row)
            slot = torch.gather(m.slots.view(rows.shape[0], -1), 1, rows.view(rows.shape[0], -1)).view(-1)
        else:
            slot = m.slots.index_select(0, (m.row_keys[rows] + m.offsets).view(-1))
        # slot: (B*T*H,) int32, 0 where this sequence wrote nothing
        flat = e.view(-1, e.shape[-1])
        if e.is_cuda or slot.numel() <= DENSE_ADD_MAX:
            # Add a value to every position: row 0 is -0.0, and x + (-0.0) == x bit for bit
            # (even for x = -0.0), so positions nothing was written at are unchanged. No host
            # sync (CUDA), and fewer ops than finding the hits for small calls (decode steps).
            return (flat + F.embedding(slot, m.values)).view_as(e)
        hit = slot.nonzero().squeeze(1)
        if hit.numel():
            flat.index_add_(0, hit, F.embedding(slot.index_select(0, hit), m.values))
        return e


def _version(table: torch.Tensor) -> int | None:
    """The in-place write counter of ``table`` (None for an inference tensor, which has none)."""
    try:
        return table._version
    except RuntimeError:
        return None


def _concat(parts: tuple | list, zero_row: bool = False) -> torch.Tensor:
    """Concatenate NumPy arrays (host) or tensors, optionally after a row of -0.0 (x + -0.0 == x).

    Host parts stay NumPy up to here because ``np.concatenate`` costs far less per part than
    ``torch.cat``, which dominates the build of a batch of a few hundred rows per user."""
    if all(isinstance(p, np.ndarray) for p in parts):
        if zero_row:
            parts = [np.full((1, parts[0].shape[1]), -0.0, parts[0].dtype), *parts]
        return torch.from_numpy(np.concatenate(parts))
    parts = [p if isinstance(p, torch.Tensor) else torch.from_numpy(p) for p in parts]
    device = parts[-1].device
    if any(p.device != device for p in parts):
        parts = [p.to(device) for p in parts]
    if zero_row:
        parts = [torch.full((1, parts[0].shape[1]), -0.0, dtype=parts[0].dtype, device=device), *parts]
    return torch.cat(parts)


# Positions x heads up to which the dense add beats finding the hits on CPU (a decode step of
# 32 sequences is 512; a 32 x 18 prefill is 9,216).
DENSE_ADD_MAX = 4096

# A (sequences x rows) int32 map up to this many entries (32 MiB); larger tables add one level:
# row -> dense key of the batch's written rows, then (sequence x key).
DENSE_ROW_MAP_LIMIT = 1 << 23

# Tables up to this many bytes are served in read form (a pooled copy of the table per request
# batch in flight); larger ones in add form.
READ_FORM_LIMIT = 64 << 20


def row_map_overlay(
    num_sequences: int,
    entries: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]],
    tables: dict[int, torch.Tensor],
    dense_limit: int = DENSE_ROW_MAP_LIMIT,
    read_limit: int | None = None,
) -> RowMapOverlay | None:
    """Build a :class:`RowMapOverlay` for the Engram ``tables`` (layer -> table parameter).

    ``entries[layer]`` lists ``(sequence, rows, values)`` in owner order: sequence ``b`` sees the
    sum of the values of its entries at each row (rows unique within one entry). ``rows`` and
    ``values`` are NumPy arrays (host) or tensors. The arithmetic is the same as
    :class:`Overlay`'s, so both give bit-identical outputs. ``dense_limit`` and ``read_limit``
    choose the layout (see :data:`DENSE_ROW_MAP_LIMIT`; ``read_limit`` defaults to
    :data:`READ_FORM_LIMIT`; 0 always builds the add form).
    """
    read_limit = READ_FORM_LIMIT if read_limit is None else read_limit
    maps = {}
    for layer, items in entries.items():
        items = [(b, r, v) for b, r, v in items if r.shape[0]]
        if items:
            maps[layer] = _layer_map(num_sequences, items, tables[layer], dense_limit, read_limit)
    return RowMapOverlay(maps, dense_limit, read_limit) if maps else None


def _layer_map(B: int, items: list, table: torch.Tensor, dense_limit: int, read_limit: int) -> _ReadMap | _RowMap:
    """One layer of :func:`row_map_overlay`, in read form where the table is small enough."""
    R = table.shape[0]
    sequences, row_parts, value_parts = zip(*items)
    lengths = [p.shape[0] for p in row_parts]  # (len() of a tensor costs ~20x more)
    one_owner = len(set(sequences)) == len(sequences)
    read = B * R <= dense_limit and table.numel() * table.element_size() <= read_limit and _version(table) is not None
    if table.device.type == "cpu" and one_owner and all(isinstance(p, np.ndarray) for p in row_parts + value_parts):
        # One owner per sequence on a CPU model (a server's usual batch): indices in NumPy, whose
        # per-call cost is a fraction of torch's for a batch's few thousand rows.
        rows = np.concatenate(row_parts).astype(np.int64, copy=False)
        seq = np.repeat(np.asarray(sequences, np.int64), lengths)
        if read:
            return _host_read_map(B, items, table, seq, rows, value_parts)
        return _host_row_map(B, items, table.shape[0], table.dtype, dense_limit, seq, rows, value_parts)
    device, dtype = table.device, table.dtype
    seq = torch.from_numpy(np.repeat(np.asarray(sequences, np.int64), lengths)).to(device)
    rows = _concat(row_parts).to(device=device, dtype=torch.long)
    values = _concat(value_parts, zero_row=True).to(device=device, dtype=dtype)
    if not one_owner:  # several owners per sequence: sum per (sequence, row)
        unique, inverse = torch.unique(seq * R + rows, return_inverse=True)
        summed = torch.zeros(unique.numel() + 1, values.shape[1], dtype=dtype, device=device)
        values = summed.index_add_(0, inverse + 1, values[1:])
        values[0] = -0.0
        seq, rows = unique // R, unique % R
    n = rows.numel()
    if read:
        ext, version = _READ_POOL.take_table(table, n)
        torch.add(values[1:], table.detach().index_select(0, rows), out=ext[R:R + n])
        index = _READ_POOL.take_index(B, R, device)
        keys = seq * R + rows
        index.view(-1)[keys] = torch.arange(R, R + n, dtype=torch.int32, device=device)
        return _ReadMap(index, ext, table, version, items, keys, rows.to(torch.int32))
    index = torch.arange(1, n + 1, dtype=torch.int32, device=device)
    row_keys = None
    if B * R <= dense_limit:
        stride, keys = R, rows
    else:
        row_keys = torch.zeros(R, dtype=torch.int32, device=device)
        row_keys[rows] = index  # a row written by several sequences keeps one (any) of their indices
        stride, keys = n + 1, row_keys[rows].long()
    slots = torch.zeros(B * stride, dtype=torch.int32, device=device)
    slots[seq * stride + keys] = index
    offsets = (torch.arange(B, device=device) * stride).view(B, 1, 1)
    return _RowMap(slots, stride, offsets, values, row_keys, items=items)


def _host_read_map(B: int, items: list, table: torch.Tensor, seq: np.ndarray, rows: np.ndarray,
                   value_parts: tuple) -> _ReadMap:
    """Read form of host entries, one owner per sequence: the table's rows are gathered into
    the pooled table copy and the values (concatenated in NumPy) added there by torch."""
    R, n = table.shape[0], len(rows)
    ext, version = _READ_POOL.take_table(table, n)
    written = ext[R:R + n]
    torch.index_select(table.detach(), 0, torch.from_numpy(rows), out=written)
    values = torch.from_numpy(np.concatenate(value_parts))
    if torch.promote_types(values.dtype, table.dtype) != table.dtype:
        values = values.to(table.dtype)  # e.g. fp16 into bf16: rounded first, as the add form does
    written.add_(values)  # fp16 into fp32: widened exactly inside the add (no pass of its own)
    index = _READ_POOL.take_index(B, R, table.device)
    keys = seq * R + rows
    index.numpy().reshape(-1)[keys] = np.arange(R, R + n, dtype=np.int32)
    return _ReadMap(index, ext, table, version, items, keys, rows.astype(np.int32))  # int32: a faster restore


def _host_row_map(B: int, items: list, R: int, dtype: torch.dtype, dense_limit: int,
                  seq: np.ndarray, rows: np.ndarray, value_parts: tuple) -> _RowMap:
    """Add form of host entries, one owner per sequence (see :func:`_host_read_map`); same map
    as the torch build."""
    zero = np.full((1, value_parts[0].shape[1]), -0.0, value_parts[0].dtype)
    values = torch.from_numpy(np.concatenate((zero,) + value_parts)).to(dtype)  # torch widens fp16 faster
    n = len(rows)
    index = np.arange(1, n + 1, dtype=np.int32)
    row_keys = None
    if B * R <= dense_limit:
        stride, keys = R, rows
    else:
        row_keys = torch.zeros(R, dtype=torch.int32)
        row_keys.numpy()[rows] = index  # a row written by several sequences keeps one (any) of their indices
        stride, keys = n + 1, row_keys.numpy()[rows].astype(np.int64)
    slots = _ZEROED_MAPS.take(B * stride)
    written = seq * stride + keys
    slots.numpy()[written] = index
    offsets = torch.from_numpy(np.arange(B, dtype=np.int64) * stride).view(B, 1, 1)
    return _RowMap(slots, stride, offsets, values, row_keys, written, items)  # its map goes back to the pool


class _ZeroedMaps:
    """Zeroed int32 slot maps for :func:`_host_row_map`, reused across request batches.

    A fresh map is a zeroed (sequences x rows) array, written in full once per request batch.
    When an overlay is collected its maps come back here, cleared only at the entries it wrote
    (a few thousand). At most ``keep`` maps are held, the most recently returned first."""

    def __init__(self, keep: int = 8):
        self.keep = keep
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> torch.Tensor:
        with self._lock:
            for i in range(len(self._free) - 1, -1, -1):
                if self._free[i].numel() == size:
                    return self._free.pop(i)
        return torch.zeros(size, dtype=torch.int32)

    def give_back(self, slots: torch.Tensor, written: np.ndarray) -> None:
        slots.numpy()[written] = 0
        with self._lock:
            self._free.append(slots)
            del self._free[: max(0, len(self._free) - self.keep)]


_ZEROED_MAPS = _ZeroedMaps()


class _ReadPool:
    """Buffers of the read form (:class:`_ReadMap`), reused across request batches.

    * Table copies, per table: ``(R + capacity, w)``, the first ``R`` rows the table at a known
      version (copied again only when the table was written since); the rows after are scratch.
    * Index maps, per (sequences, rows, device): ``index[b, r] = r``; given back restored at
      the entries their overlay wrote (a few thousand of 600,000 for 32 sequences of the tiny
      model's table).

    At most ``keep`` of each kind are held per key, the most recently returned first."""

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._tables: dict[int, tuple[weakref.ref, list]] = {}  # id(table) -> (ref, [(copy, version)])
        self._indexes: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take_table(self, table: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
        """A copy of ``table`` with room for ``n`` rows after it, and the version it copies."""
        R = table.shape[0]
        copy, synced = None, None
        with self._lock:
            entry = self._tables.get(id(table))
            if entry is not None and entry[0]() is table:
                free = entry[1]
                for i in range(len(free) - 1, -1, -1):
                    if free[i][0].shape[0] - R >= n:
                        copy, synced = free.pop(i)
                        break
        version = _version(table)
        if copy is None:
            capacity = max(1024, 1 << max(n - 1, 0).bit_length())  # room to grow without a new copy
            copy = torch.empty(R + capacity, table.shape[1], dtype=table.dtype, device=table.device)
        if synced != version:
            copy[:R].copy_(table.detach())
        return copy, version

    def take_index(self, B: int, R: int, device: torch.device) -> torch.Tensor:
        key = (B, R, str(device))
        with self._lock:
            free = self._indexes.get(key)
            if free:
                return free.pop()
        return torch.arange(R, dtype=torch.int32, device=device).repeat(B).view(B, R)

    def give_back(self, m: _ReadMap) -> None:
        table, copy, version, index, keys, rows = m.source, m.table, m.version, m.index, m.keys, m.rows
        if isinstance(keys, np.ndarray):
            index.numpy().reshape(-1)[keys] = rows
        else:
            index.view(-1)[keys] = rows
        with self._lock:
            entry = self._tables.get(id(table))
            if entry is None or entry[0]() is not table:
                self._tables = {k: e for k, e in self._tables.items() if e[0]() is not None}  # drop dead tables
                entry = self._tables[id(table)] = (weakref.ref(table), [])
            entry[1].append((copy, version))
            del entry[1][: max(0, len(entry[1]) - self.keep)]
            free = self._indexes.setdefault((index.shape[0], index.shape[1], str(index.device)), [])
            free.append(index)
            del free[: max(0, len(free) - self.keep)]


_READ_POOL = _ReadPool()


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
        cache = kwargs.get("past_key_values")
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
