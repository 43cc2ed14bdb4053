"""Checking client replies before they may touch the aggregate.

A reply is only aggregated if its arrays match the global model exactly (names, shapes,
dtypes), every value is finite and its weight is a plausible positive integer. Arrays are
read as zero-copy views of the received buffers, so checking K replies costs no K-fold memory.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from fedstack.strategies.model_layout import ModelLayout

#: Flower's serialisation type for NumPy arrays (np.save format).
NUMPY_STYPE = "numpy.ndarray"
#: Elements checked per step when scanning for non-finite values (bounds temporary memory).
FINITE_CHECK_CHUNK = 1 << 16
#: Metric key carrying a reply's weight (Flower's convention).
NUM_EXAMPLES_KEY = "num-examples"
#: Metric key a client sets to 1 when it declines a round (e.g. budget exhausted).
DECLINED_KEY = "declined"
#: ConfigRecord of a declined reply, with "reason" (str) and "permanent" (bool).
DECLINE_RECORD = "decline"


class InvalidReply(ValueError):
    """A reply that must not be aggregated; the message says why."""


def array_view(array: Array) -> np.ndarray:
    """A read-only NumPy view of a serialised Flower `Array`, without copying its data."""
    if array.stype != NUMPY_STYPE:
        raise InvalidReply(f"unsupported array serialisation {array.stype!r}")
    data = array.data
    if not isinstance(data, bytes):
        raise InvalidReply("array data is not bytes")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise InvalidReply(f"unsupported .npy version {version}")
    except ValueError as exc:
        raise InvalidReply(f"corrupt array header: {exc}") from None
    if dtype.hasobject:
        raise InvalidReply("object arrays are refused")
    count = int(np.prod(shape, dtype=np.int64))
    offset = fp.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise InvalidReply(f"array payload has {len(data) - offset} bytes, header says "
                           f"{count * dtype.itemsize}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order="F" if fortran else "C")


def all_finite(view: np.ndarray) -> bool:
    flat = view.reshape(-1, order="A")
    for start in range(0, flat.size, FINITE_CHECK_CHUNK):
        if not np.isfinite(flat[start:start + FINITE_CHECK_CHUNK]).all():
            return False
    return True


def check_arrays(arrays: ArrayRecord, spec: ModelLayout,
                 check_finite: bool = True) -> list[np.ndarray]:
    """Zero-copy views of `arrays` in spec order, or `InvalidReply` saying what is wrong.

    `check_finite=False` leaves the value scan to the caller (the weighted sum detects
    non-finite inputs from its own result at no extra pass over the data).
    """
    names = tuple(arrays.keys())
    if names != spec.names:
        missing = sorted(set(spec.names) - set(names))
        extra = sorted(set(names) - set(spec.names))
        detail = f"missing {missing}" if missing else ""
        detail += (", " if detail and extra else "") + (f"unexpected {extra}" if extra else "")
        raise InvalidReply(f"array names differ from the global model ({detail or 'order'})")
    views = []
    for name, shape, dtype in zip(spec.names, spec.shapes, spec.dtypes, strict=True):
        view = array_view(arrays[name])
        if tuple(view.shape) != shape:
            raise InvalidReply(f"array {name!r} has shape {tuple(view.shape)}, expected {shape}")
        if str(view.dtype) != dtype:
            raise InvalidReply(f"array {name!r} has dtype {view.dtype}, expected {dtype}")
        if check_finite and not all_finite(view):
            raise InvalidReply(f"array {name!r} contains NaN or infinite values")
        views.append(view)
    return views


def check_num_examples(value: object, maximum: int) -> int:
    """The reply's weight, or `InvalidReply` if it is not an integer in [1, maximum]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidReply(f"'{NUM_EXAMPLES_KEY}' is {type(value).__name__}, not a number")
    if isinstance(value, float) and not value.is_integer():
        raise InvalidReply(f"'{NUM_EXAMPLES_KEY}'={value} is not an integer")
    n = int(value)
    if n < 1:
        raise InvalidReply(f"'{NUM_EXAMPLES_KEY}'={n} is not positive")
    if n > maximum:
        raise InvalidReply(f"'{NUM_EXAMPLES_KEY}'={n} exceeds max_num_examples={maximum}")
    return n


def decline_reason(msg: Message) -> tuple[str, bool] | None:
    """(reason, permanent) if the reply is a well-formed decline, else None."""
    content = msg.content
    metrics = content.metric_records.get("metrics")
    if metrics is None or int(metrics.get(DECLINED_KEY, 0) or 0) != 1:
        return None
    record = content.config_records.get(DECLINE_RECORD)
    reason = str(record.get("reason", "declined")) if record is not None else "declined"
    permanent = bool(record.get("permanent", False)) if record is not None else False
    return reason, permanent


def metrics_of(msg: Message) -> dict[str, float]:
    """The reply's `metrics` record as a plain dict (scalars only)."""
    record = msg.content.metric_records.get("metrics")
    if record is None:
        return {}
    return {k: v for k, v in record.items() if isinstance(v, (int, float))}
