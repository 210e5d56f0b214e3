"""Serving-side delta form: a user's delta split per layer into tensors, ready to batch.

At request time :func:`engram_core.serving.overlay_for` converts and checks every delta of the
batch. A serving node checks each delta once, when its shard is loaded, and keeps it as
:class:`ServedDelta` (per-layer row ids and values on the model's device; on CPU they are
views of the Delta's arrays, so no copy is held), so building a batch's overlay is a few
concatenations and one scatter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


from .checkpoint import EngramModel
from .delta import Delta
from .row_overlay import RowMapOverlay
from .serving import check_delta, overlay_from_parts, split_by_layer


@dataclass(frozen=True, eq=False)
class ServedDelta:
    delta: Delta
    parts: dict[int, tuple]  # layer -> (rows (k,) int64 sorted, values (k, w) float16): see split_by_layer


def served_delta(em: EngramModel, delta: Delta, owner: str = "delta") -> ServedDelta:
    """Check ``delta`` against the model once and split it per layer onto the model's device."""
    check_delta(em, delta, owner)
    return ServedDelta(delta, split_by_layer(delta, em.device))


def batch_overlay(em: EngramModel,
                  per_sequence: Sequence[ServedDelta | Sequence[ServedDelta] | None]) -> RowMapOverlay | None:
    """Overlay where sequence b sees the base table plus ``per_sequence[b]``: one delta, several
    summed (a shared scope's and a member's own, composed), or None / () for the base model."""
    def parts(d) -> list:
        if d is None:
            return []
        if isinstance(d, ServedDelta):
            return [d.parts]
        return [x.parts for x in d]

    return overlay_from_parts(em, [parts(d) for d in per_sequence])  # an empty delta has no parts
