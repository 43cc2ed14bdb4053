"""The encrypted global model as a Flower ArrayRecord, self-describing enough to be decrypted.

An encrypted global model (what the server keeps, sends, and checkpoints) is the wire form of
an `EncryptedVector` (he.meta, he.lengths, he.blob) plus `he.layout`: the names, shapes and
dtypes of the model's arrays as JSON bytes. The layout is public (it is the architecture) and
travels with the ciphertext so a client sampled for the first time in round 7, a resumed run
and `fedstack decrypt` can all turn the decrypted vector back into named arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord

from fedstack.strategies.he.ckks import WIRE_KEYS, CiphertextError, EncryptedVector
from fedstack.strategies.model_layout import ModelLayout

LAYOUT_KEY = "he.layout"
ENCRYPTED_MODEL_KEYS = (*WIRE_KEYS, LAYOUT_KEY)
MAX_LAYOUT_BYTES = 1 << 20


@dataclass(frozen=True)
class ArrayLayout(ModelLayout):
    """The model layout that travels with the encrypted global model (JSON bytes)."""

    def to_bytes(self) -> np.ndarray:
        data = {"names": self.names, "shapes": self.shapes, "dtypes": self.dtypes}
        return np.frombuffer(json.dumps(data).encode(), dtype=np.uint8).copy()

    @classmethod
    def from_bytes(cls, raw: np.ndarray) -> ArrayLayout:
        if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > MAX_LAYOUT_BYTES:
            raise CiphertextError("he.layout must be a 1-D uint8 JSON array")
        try:
            data = json.loads(raw.tobytes())
            layout = cls(
                tuple(str(n) for n in data["names"]),
                tuple(tuple(int(d) for d in s) for s in data["shapes"]),
                tuple(str(np.dtype(t)) for t in data["dtypes"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise CiphertextError(f"he.layout is malformed: {exc}") from None
        if not len(layout.names) == len(layout.shapes) == len(layout.dtypes):
            raise CiphertextError("he.layout: names, shapes and dtypes differ in length")
        if any(d < 0 for s in layout.shapes for d in s):
            raise CiphertextError("he.layout: negative dimension")
        return layout


def is_encrypted_model(arrays: ArrayRecord) -> bool:
    return LAYOUT_KEY in arrays or WIRE_KEYS[0] in arrays


def _numpy_arrays(arrays: ArrayRecord, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        return {k: arrays[k].numpy() for k in keys}
    except Exception as exc:  # a malformed Array: bad header, object dtype ...
        raise CiphertextError(f"unreadable encrypted arrays: {exc}") from None


def encrypted_from_record(arrays: ArrayRecord) -> EncryptedVector:
    """A client's encrypted reply (wire keys only).

    Its digest is not checked here: the only consumer, `EncryptedSum.add`, checks it while it
    sums (in parallel with the addition) and undoes the add on a mismatch.
    """
    if tuple(sorted(arrays.keys())) != tuple(sorted(WIRE_KEYS)):
        raise CiphertextError(f"expected arrays {list(WIRE_KEYS)}, got {list(arrays.keys())[:6]}")
    return EncryptedVector.from_arrays(_numpy_arrays(arrays, WIRE_KEYS), verify_digest=False)


def encrypted_to_record(ev: EncryptedVector) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in ev.to_arrays().items()})


def model_to_record(ev: EncryptedVector, layout: ArrayLayout) -> ArrayRecord:
    """The encrypted global model: ciphertexts + layout."""
    record = encrypted_to_record(ev)
    record[LAYOUT_KEY] = Array(layout.to_bytes())
    return record


def model_from_record(arrays: ArrayRecord) -> tuple[EncryptedVector, ArrayLayout]:
    if tuple(sorted(arrays.keys())) != tuple(sorted(ENCRYPTED_MODEL_KEYS)):
        raise CiphertextError(
            f"an encrypted model has arrays {list(ENCRYPTED_MODEL_KEYS)}, "
            f"got {list(arrays.keys())[:6]}"
        )
    raw = _numpy_arrays(arrays, ENCRYPTED_MODEL_KEYS)
    layout = ArrayLayout.from_bytes(raw.pop(LAYOUT_KEY))
    ev = EncryptedVector.from_arrays(raw)
    if ev.dim != layout.size:
        raise CiphertextError(f"ciphertexts hold {ev.dim} values, the layout {layout.size}")
    return ev, layout
