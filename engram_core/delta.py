"""A delta: one owner's sparse, additive edits to the Engram tables.

A delta is a set of ``(layer, row, value)``: ``value`` (a vector of the row width) is added to
row ``row`` of the Engram table at decoder layer ``layer``. Rows are unique and sorted by
``(layer, row)``, values are stored as float16. An empty delta is exactly the base model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

VALUE_DTYPE = np.float16


@dataclass(frozen=True, eq=False)
class Delta:
    layers: np.ndarray  # (n,) int16: Engram layer of each row
    row_ids: np.ndarray  # (n,) int64: row index inside that layer's table
    values: np.ndarray  # (n, width) float16: added to the base row

    def __post_init__(self) -> None:
        layers = np.ascontiguousarray(self.layers, dtype=np.int16)
        row_ids = np.ascontiguousarray(self.row_ids, dtype=np.int64)
        values = np.ascontiguousarray(self.values, dtype=VALUE_DTYPE)
        if layers.ndim != 1 or row_ids.shape != layers.shape:
            raise ValueError(f"delta: layers {layers.shape} and row_ids {row_ids.shape} must be equal 1-D shapes")
        if values.ndim != 2 or values.shape[0] != len(row_ids):
            raise ValueError(f"delta: values {values.shape} must be (rows={len(row_ids)}, width)")
        key = layers.astype(np.int64) * (1 << 40) + row_ids
        if len(key) > 1 and not np.all(key[1:] > key[:-1]):
            raise ValueError("delta: rows must be unique and sorted by (layer, row)")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "row_ids", row_ids)
        object.__setattr__(self, "values", values)

    @classmethod
    def empty(cls, width: int) -> "Delta":
        return cls(np.zeros(0, np.int16), np.zeros(0, np.int64), np.zeros((0, width), VALUE_DTYPE))

    @classmethod
    def from_unsorted(cls, layers: np.ndarray, row_ids: np.ndarray, values: np.ndarray) -> "Delta":
        order = np.lexsort((np.asarray(row_ids), np.asarray(layers)))
        return cls(np.asarray(layers)[order], np.asarray(row_ids)[order], np.asarray(values)[order])

    @classmethod
    def from_bytes(cls, layers: np.ndarray, row_ids: np.ndarray, value_bytes: bytes, width: int) -> "Delta":
        values = np.frombuffer(value_bytes, dtype="<f2").reshape(len(row_ids), width)
        return cls(np.asarray(layers), np.asarray(row_ids), values)

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    @property
    def num_rows(self) -> int:
        return int(len(self.row_ids))

    @property
    def nbytes(self) -> int:
        return int(self.layers.nbytes + self.row_ids.nbytes + self.values.nbytes)

    def value_bytes(self) -> bytes:
        """Values as little-endian float16 bytes, row-major (the bundle's storage form)."""
        return self.values.astype("<f2", copy=False).tobytes()

    def equals(self, other: "Delta") -> bool:
        """Bit-exact equality of rows and values."""
        return (
            np.array_equal(self.layers, other.layers)
            and np.array_equal(self.row_ids, other.row_ids)
            and self.values.shape == other.values.shape
            and self.values.tobytes() == other.values.tobytes()
        )

    def row_keys(self) -> set[tuple[int, int]]:
        return set(zip(self.layers.tolist(), self.row_ids.tolist()))
