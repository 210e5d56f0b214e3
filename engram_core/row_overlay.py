"""Per-sequence rows for serving: a batch of requests, each sequence with its own users' deltas.

:func:`row_map_overlay` builds a :class:`RowMapOverlay` once per request batch; every forward
of the batch then reads each sequence's rows through it (:meth:`RowMapOverlay.read`, called by
:class:`~engram_core.layer.EngramLayer`). Same meaning and the same bits as the compiler's
training :class:`~engram_core.layer.Overlay`, built for the serving path: inference only, few
small ops per forward, buffers pooled across request batches.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from itertools import repeat

import numpy as np
import torch
import torch.nn.functional as F

from .row_kernels import KERNELS, KernelBuildError


@dataclass(frozen=True)
class _RowMap:
    """One layer of a :class:`RowMapOverlay` in add form (tables too large to copy)."""

    slots: torch.Tensor  # (B * stride,) int32: value index of (sequence, row key), 0 = none
    stride: int
    offsets: torch.Tensor  # (B, 1, 1) int64: sequence b's base in ``slots``
    values: torch.Tensor  # (N + 1, w): row 0 all -0.0 (adds nothing), row k the summed value of entry k
    row_keys: torch.Tensor | None  # (num_rows,) int32: dense key of each written row (None: key = row)
    written: np.ndarray | None = None  # entries of a pooled host map (given back, cleared, when collected)

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


@dataclass(frozen=True, eq=False)
class _KernelMap:
    """One layer of a :class:`RowMapOverlay` in kernel form (CPU, one owner per sequence).

    ``index[b, r]`` is ``j + 1`` where sequence ``b``'s user wrote row ``r`` as its ``j``-th row,
    0 elsewhere. A forward reads each (sequence, position) row with one call of the compiled
    kernel (:mod:`engram_core.row_kernels`): the table's row, plus the user's value where the
    index says so, read in place from the user's own arrays. Nothing is copied at build (the
    build marks the index) and the live table is read, so a table written after the build needs
    no rebuild."""

    index: torch.Tensor  # (B, R) int32, pooled: zero but where this overlay marked
    marks: object  # the compiled module's Marks: the marks and the users' arrays they point into
    kernels: object  # the compiled module

    def __del__(self):  # cleared where it was marked, then pooled for the next request batch
        self.marks.clear()
        _ZEROED_MAPS.put(self.index.view(-1))


class RowMapOverlay:
    """The serving form of per-sequence rows: same meaning as :class:`Overlay`, faster to apply.

    Built once per request batch (:func:`row_map_overlay`). Each layer is in one of three forms:

    * kernel form (:class:`_KernelMap`, CPU models with one owner per sequence, once the
      compiled kernels are loaded): one kernel call reads the base rows and adds the values
      where the sequence's user wrote; the build only marks a pooled index;
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
        if isinstance(m, _KernelMap):
            query = rows.reshape(rows.shape[0], -1)
            if query.dtype != torch.long or not query.is_contiguous():  # e.g. a decode step's slice of its window
                query = query.to(torch.long).contiguous()
            out = m.kernels.read_rows(table.detach(), query, m.marks)
            return out.view(*rows.shape, table.shape[1])
        if isinstance(m, _ReadMap):
            if m.source is not table or _version(table) != m.version:
                m = self._rebuild(layer, table)
        if not isinstance(m, _ReadMap):
            return self.add_to(layer, rows, F.embedding(rows, table), table.shape[0])
        index = torch.gather(m.index, 1, rows.reshape(rows.shape[0], -1))
        return F.embedding(index, m.table).view(*rows.shape, m.table.shape[1])

    def written(self, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """(B, T, H) bool: whether sequence b's owners wrote row ``rows[b, t, h]`` (B, T, H) of
        ``layer`` (False everywhere for a layer this overlay does not touch). Index gathers only,
        on the overlay's device: no host sync."""
        m = self.maps.get(layer)
        if m is None:
            return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device)
        flat = rows.reshape(rows.shape[0], -1).to(torch.long)
        if isinstance(m, _KernelMap):  # index: j + 1 where written, 0 elsewhere
            hit = torch.gather(m.index, 1, flat.to(m.index.device)) != 0
        elif isinstance(m, _ReadMap):  # index: the row itself where nothing was written
            hit = torch.gather(m.index, 1, flat.to(m.index.device)) != flat.to(m.index.device)
        elif m.row_keys is None:  # add form, one level: slots is (sequence x row)
            hit = torch.gather(m.slots.view(rows.shape[0], -1), 1, flat.to(m.slots.device)) != 0
        else:
            keys = m.row_keys[flat.to(m.row_keys.device)] + m.offsets.view(-1, 1)
            hit = m.slots.index_select(0, keys.view(-1)).view(flat.shape) != 0
        return hit.view(rows.shape).to(rows.device)

    def _rebuild(self, layer: int, table: torch.Tensor) -> _ReadMap | _RowMap:
        """The table changed in place (or is another one) since this layer was built: build it
        again from its entries, against the table as it is now."""
        with self._lock:
            m = self.maps[layer]
            if isinstance(m, _ReadMap) and (m.source is not table or _version(table) != m.version):  # not done meanwhile
                lengths = [r.shape[0] for _, r, _ in m.items]
                m = self.maps[layer] = _layer_map(m.index.shape[0], m.items, lengths, table, *self._limits)
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

# The kernel form where it applies: True, False, or None (whenever the compiled kernels are
# loaded; engram serve loads them in the background). The ``kernel`` argument overrides it.
KERNEL_FORM: bool | None = None

# Tables up to this many bytes are served in read form (a pooled copy of the table per request
# batch in flight); larger ones in add form.
READ_FORM_LIMIT = 64 << 20


def row_map_overlay(
    num_sequences: int,
    entries: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]],
    tables: dict[int, torch.Tensor],
    dense_limit: int = DENSE_ROW_MAP_LIMIT,
    read_limit: int | None = None,
    kernel: bool | None = None,
) -> RowMapOverlay | None:
    """Build a :class:`RowMapOverlay` for the Engram ``tables`` (layer -> table parameter).

    ``entries[layer]`` lists ``(sequence, rows, values)`` in owner order: sequence ``b`` sees the
    sum of the values of its entries at each row (rows unique within one entry). ``rows`` and
    ``values`` are NumPy arrays (host) or tensors. The arithmetic is the same as
    :class:`Overlay`'s, so both give bit-identical outputs. ``dense_limit`` and ``read_limit``
    choose the layout (see :data:`DENSE_ROW_MAP_LIMIT`; ``read_limit`` defaults to
    :data:`READ_FORM_LIMIT`; 0 builds the add form where the kernel form does not apply).
    ``kernel`` (default :data:`KERNEL_FORM`): the kernel form where it applies (True loads the
    kernels first, raising :class:`~engram_core.row_kernels.KernelBuildError` if they cannot be).
    """
    read_limit = READ_FORM_LIMIT if read_limit is None else read_limit
    kernels = _kernels(KERNEL_FORM if kernel is None else kernel)
    maps = {}
    for layer, items in entries.items():
        if kernels is not None and (m := _kernel_map(num_sequences, items, tables[layer], dense_limit, kernels)):
            maps[layer] = m
            continue
        lengths = [r.shape[0] for _, r, _ in items]  # (len() of a tensor costs ~20x more)
        if 0 in lengths:  # entries that write nothing
            items = [item for item, n in zip(items, lengths) if n]
            lengths = [n for n in lengths if n]
        if items:
            maps[layer] = _layer_map(num_sequences, items, lengths, tables[layer], dense_limit, read_limit)
    return RowMapOverlay(maps, dense_limit, read_limit) if maps else None


def _kernels(want: bool | None):
    if want is None:
        return KERNELS.loaded()
    if not want:
        return None
    module = KERNELS.load()
    if module is None:
        raise KernelBuildError(f"the kernel form was asked for, but the row kernels are {KERNELS.status()}")
    return module


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernel_map(B: int, items: list, table: torch.Tensor, dense_limit: int, kernels) -> _KernelMap | None:
    """Kernel form of one layer, or None where it does not apply: a table not on the CPU or of
    another dtype, a (sequences x rows) index over ``dense_limit``, a sequence with several
    owners, parts that are not int64 / float16 NumPy arrays."""
    R = table.shape[0]
    if table.device.type != "cpu" or table.dtype not in _KERNEL_DTYPES or B * R > dense_limit:
        return None
    rows: list = [None] * B
    values: list = [None] * B
    for b, r, v in items:
        if rows[b] is not None:  # a second owner: summed per row by the other forms
            return None
        rows[b], values[b] = r, v
    index = _ZEROED_MAPS.take(B * R).view(B, R)
    marks = kernels.mark(index, rows, values, table.shape[1])
    if marks is None:  # not int64 / float16 NumPy parts: nothing was written
        _ZEROED_MAPS.put(index.view(-1))
        return None
    return _KernelMap(index, marks, kernels)


def _layer_map(B: int, items: list, lengths: list[int], table: torch.Tensor, dense_limit: int,
               read_limit: int) -> _ReadMap | _RowMap:
    """One layer of :func:`row_map_overlay` (``lengths``: rows per entry, none 0), in read form
    where the table is small enough."""
    R = table.shape[0]
    sequences, row_parts, value_parts = zip(*items)
    one_owner = len(set(sequences)) == len(sequences)
    read = B * R <= dense_limit and table.numel() * table.element_size() <= read_limit and _version(table) is not None
    if table.device.type == "cpu" and one_owner and all(map(isinstance, row_parts + value_parts, repeat(np.ndarray))):
        # One owner per sequence on a CPU model (a server's usual batch): indices in NumPy, whose
        # per-call cost is a fraction of torch's for a batch's few thousand rows.
        rows = np.concatenate(row_parts).astype(np.int64, copy=False)
        seq = np.repeat(np.asarray(sequences, np.int64), lengths)
        if read:
            return _host_read_map(B, items, table, seq, rows, value_parts)
        return _host_row_map(B, table.shape[0], table.dtype, dense_limit, seq, rows, value_parts)
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
    return _RowMap(slots, stride, offsets, values, row_keys)


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


def _host_row_map(B: int, R: int, dtype: torch.dtype, dense_limit: int,
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
    return _RowMap(slots, stride, offsets, values, row_keys, written)  # its map goes back to the pool when collected


class _ZeroedMaps:
    """Zeroed int32 maps for :func:`_host_row_map` and :func:`_kernel_map`, reused across request batches.

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
        self.put(slots)

    def put(self, slots: torch.Tensor) -> None:
        """Pool a map that is all zero again."""
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
