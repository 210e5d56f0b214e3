"""Serving-side delta form: a user's delta split per layer into tensors, ready to batch.

At request time :func:`engram_core.serving.overlay_for` converts and checks every delta of the
batch. A serving node checks each delta once, when its shard is loaded, and keeps it as
:class:`ServedDelta` (per-layer row ids and values as tensors on the model's device; on CPU
they are views of the Delta's arrays, so no copy is held), so building a batch's overlay is a
few concatenations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import warnings

import numpy as np
import torch

from .checkpoint import EngramModel
from .delta import Delta
from .layer import Overlay
from .serving import check_delta


@dataclass(frozen=True, eq=False)
class ServedDelta:
    delta: Delta
    rows: dict[int, torch.Tensor]  # layer -> (k,) int64, sorted
    values: dict[int, torch.Tensor]  # layer -> (k, w) float16


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A zero-copy view of a (possibly read-only, e.g. decoded from a bundle) array; never written."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def served_delta(em: EngramModel, delta: Delta, owner: str = "delta") -> ServedDelta:
    """Check ``delta`` against the model once and split it per layer onto the model's device."""
    check_delta(em, delta, owner)
    rows, values = {}, {}
    device = em.device
    for layer in np.unique(delta.layers).tolist():
        lo, hi = np.searchsorted(delta.layers, [layer, layer + 1])  # rows are sorted by (layer, row)
        rows[layer] = _tensor(delta.row_ids[lo:hi]).to(device)
        values[layer] = _tensor(delta.values[lo:hi]).to(device)
    return ServedDelta(delta, rows, values)


def batch_overlay(em: EngramModel, per_sequence: Sequence[ServedDelta | None]) -> Overlay | None:
    """Overlay where sequence b sees the base table plus ``per_sequence[b]`` (None: the base model)."""
    slot_of: dict[int, int] = {}
    slots: list[ServedDelta] = []
    for d in per_sequence:
        if d is not None and d.delta.num_rows and id(d) not in slot_of:
            slot_of[id(d)] = len(slots)
            slots.append(d)
    if not slots:
        return None
    owners = torch.tensor([[slot_of[id(d)] if d is not None and id(d) in slot_of else -1] for d in per_sequence])
    dtype = next(em.memory.parameters()).dtype
    keys, values = {}, {}
    for layer in em.config.layers:
        num_rows = em.memory.num_rows(layer)
        picked = [(i, d) for i, d in enumerate(slots) if layer in d.rows]
        if picked:
            keys[layer] = torch.cat([d.rows[layer] + i * num_rows for i, d in picked])  # sorted: slots ascend
            values[layer] = torch.cat([d.values[layer] for _, d in picked]).to(dtype)
    return Overlay(owners.to(em.device), keys, values)
