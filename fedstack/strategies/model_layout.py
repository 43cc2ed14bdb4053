"""The layout of a model's arrays: names, shapes and dtypes, in ArrayRecord order.

One description serves every aggregation: WeightedFedAvg checks replies against it, and the
protocol layers (masking, encryption) flatten a model into one vector and back with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord


@dataclass(frozen=True)
class ModelLayout:
    """Names, shapes and dtypes of a model's arrays, in ArrayRecord order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]

    @classmethod
    def of(cls, arrays: ArrayRecord) -> ModelLayout:
        names = tuple(arrays.keys())
        return cls(names,
                   tuple(tuple(int(d) for d in arrays[n].shape) for n in names),
                   tuple(str(arrays[n].dtype) for n in names))

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def size(self) -> int:
        return int(sum(self.sizes))

    def flatten(self, arrays: ArrayRecord) -> np.ndarray:
        """One float64 vector of every array in layout order; ValueError if they differ."""
        if type(self).of(arrays) != self:
            raise ValueError("the model's arrays differ from the global model's layout "
                             f"(names {list(arrays.keys())})")
        out = np.empty(self.size, dtype=np.float64)
        offset = 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out[offset:offset + size] = arrays[name].numpy().reshape(-1)
            offset += size
        return out

    def unflatten(self, vector: np.ndarray) -> ArrayRecord:
        """Named arrays in their own dtypes; integer arrays (counters) are rounded."""
        if vector.shape != (self.size,):
            raise ValueError(f"vector of shape {vector.shape}, expected ({self.size},)")
        record = ArrayRecord()
        offset = 0
        for name, shape, dtype, size in zip(self.names, self.shapes, self.dtypes, self.sizes,
                                            strict=True):
            part = vector[offset:offset + size].reshape(shape)
            if np.dtype(dtype).kind in "iu":
                part = np.rint(part)
            record[name] = Array(np.ascontiguousarray(part.astype(dtype)))
            offset += size
        return record
