"""The layout of a model's arrays, to flatten them into one vector and back.

Protocol layers (masking, encryption) work on one flat vector; this keeps the mapping to the
model's named arrays in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord


@dataclass(frozen=True)
class ModelLayout:
    """Names, shapes and offsets of a model's arrays, in ArrayRecord order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_arrays(cls, arrays: ArrayRecord) -> ModelLayout:
        names = tuple(arrays.keys())
        shapes = tuple(tuple(arrays[n].shape) for n in names)
        return cls(names, shapes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    def flatten(self, arrays: ArrayRecord, dtype: type = np.float64) -> np.ndarray:
        """One vector of every array in layout order; raises if the arrays don't match."""
        if tuple(arrays.keys()) != self.names:
            raise ValueError(f"array names {list(arrays.keys())} differ from the layout's")
        out = np.empty(self.size, dtype=dtype)
        offset = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            arr = arrays[name].numpy()
            if tuple(arr.shape) != shape:
                raise ValueError(f"array {name!r} has shape {arr.shape}, expected {shape}")
            out[offset:offset + size] = arr.reshape(-1)
            offset += size
        return out

    def unflatten(self, vector: np.ndarray, dtype: type = np.float32) -> ArrayRecord:
        if vector.shape != (self.size,):
            raise ValueError(f"vector of shape {vector.shape}, expected ({self.size},)")
        record = ArrayRecord()
        offset = 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes, strict=True):
            record[name] = Array(np.ascontiguousarray(
                vector[offset:offset + size].reshape(shape).astype(dtype, copy=False)))
            offset += size
        return record
