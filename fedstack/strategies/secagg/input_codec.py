"""The input codec of secure aggregation: what a client's update becomes in the ring.

Why a seam: masking and unmasking only add vectors of ring words; how an update becomes
those words (and how the server turns the unmasked sum back into a model) is a separate
concern that other layers replace -- distributed DP encodes a clipped, rotated, noised
delta instead of the plain fixed-point pair (n_k * q_k, n_k). The protocol core calls only
this interface:

* client: ``encode(values, weight, context) -> ring words`` (length ``words(d)``);
* server: ``words(d)`` (length of the ring vector for a d-parameter model),
  ``check_bounds(ring_sum, survivors)`` (refuse a sum honest inputs cannot produce) and
  ``decode(ring_sum, survivors) -> (mean values, total weight)``.

:class:`FixedPointInput` (the default) wraps :class:`fedstack.crypto.quantise.FixedPointCodec`.
``codec_for(cfg, base)`` returns the run's codec; ``dp=distributed`` loads
:data:`DISTRIBUTED_CODEC` by name (``DistributedCodec.from_config(cfg, base)``), so secagg
never imports privacy code at import time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fedstack.crypto.quantise import FixedPointCodec

from .errors import InputOutOfBounds

DISTRIBUTED_CODEC = "fedstack.privacy.distributed.codec:DistributedCodec"
"""Class of the ``dp=distributed`` codec, loaded by name (``from_config(cfg, base)``)."""
PUBLIC_SEED_DOMAIN = b"fedstack/secagg/public-round-seed/v1"


@dataclass(frozen=True)
class CodecContext:
    """What a client's encoder may depend on besides its own update (all public).

    ``seed``: a public per-round seed every client of the round derives alike -- the agreed
    graph seed under ``security=malicious`` (no party chose it), else H(run, round) -- e.g.
    for a shared random rotation. ``expected_survivors``: |U1|, the parties that shared keys
    (an upper bound on the inputs summed). ``global_values``: the flattened global model the
    round started from (so a codec can encode a delta), or None.
    """

    round_num: int
    seed: bytes
    expected_survivors: int
    global_values: np.ndarray | None = None


def public_round_seed(run_id: int, round_num: int) -> bytes:
    """H(run, round): the public seed of a round that has no agreed graph seed."""
    data = PUBLIC_SEED_DOMAIN + int(run_id).to_bytes(8, "big") + int(round_num).to_bytes(8, "big")
    return hashlib.sha256(data).digest()


@runtime_checkable
class InputCodec(Protocol):
    """How updates become ring words and the unmasked sum becomes a model (see module doc)."""

    bits: int
    """The ring is Z_{2^bits}."""
    max_clients: int
    """Most inputs one sum may hold without wrapping (participants above it are refused)."""

    @property
    def dtype(self) -> np.dtype:
        """Word type of the ring vectors."""
        ...

    def words(self, d: int) -> int:
        """Length of the ring vector of a d-parameter model."""
        ...

    def encode(self, values: np.ndarray, weight: int, context: CodecContext) -> np.ndarray:
        """A client's update (flattened float values, its example count) as a fresh array of
        ring words (the caller masks it in place)."""
        ...

    def check_bounds(self, ring_sum: np.ndarray, survivors: int) -> None:
        """Raise :class:`InputOutOfBounds` unless ``survivors`` honest inputs could sum to this."""
        ...

    def decode(self, ring_sum: np.ndarray, survivors: int) -> tuple[np.ndarray, int]:
        """(the new model's flat float64 values, the total weight) from the unmasked sum."""
        ...


@dataclass(frozen=True)
class FixedPointInput:
    """The default codec: (n_k * round(scale * clip(w_k)), n_k) in Z_{2^bits}.

    Bounds (item 6 of issue 11): each honest input has 0 <= n_k <= max_weight and
    |n_k * q_k| <= n_k * L (L = round(scale * clip)), so an honest sum over s survivors has
    total weight W <= s * max_weight and every coordinate |sum| <= W * L -- the decoded mean
    lies in [-clip, clip]. A sum outside is refused (a malicious client offset its words),
    and the round keeps the previous model.
    """

    fixed: FixedPointCodec

    @property
    def bits(self) -> int:  # type: ignore[override]
        return self.fixed.bits

    @property
    def max_clients(self) -> int:  # type: ignore[override]
        return self.fixed.max_clients

    @property
    def dtype(self) -> np.dtype:
        return self.fixed.dtype

    @property
    def error_bound(self) -> float:
        return self.fixed.error_bound

    def words(self, d: int) -> int:
        return int(d) + 1

    def encode(self, values: np.ndarray, weight: int, context: CodecContext) -> np.ndarray:
        return self.fixed.encode(values, weight)

    def check_bounds(self, ring_sum: np.ndarray, survivors: int) -> None:
        weighted, weight = self._signed(ring_sum)
        cap = int(survivors) * self.fixed.max_weight
        if not 0 < weight <= cap:
            raise InputOutOfBounds(
                f"total weight outside (0, survivors x max_weight] for {survivors} survivors "
                f"and max_weight={self.fixed.max_weight}: a client sent an out-of-range input",
            )
        limit = weight * self.fixed.max_level
        if weighted.size and int(np.abs(weighted).max()) > limit:
            raise InputOutOfBounds(
                "a coordinate sum lies outside what clipped inputs can produce "
                f"(|sum| <= total weight x round(scale x clip), clip={self.fixed.clip}): "
                "a client offset its masked words",
            )

    def decode(self, ring_sum: np.ndarray, survivors: int) -> tuple[np.ndarray, int]:
        weighted, weight = self.fixed.decode(ring_sum)
        if weight <= 0:
            raise InputOutOfBounds("the survivors' total weight is zero")
        return weighted / weight, weight

    def _signed(self, ring_sum: np.ndarray) -> tuple[np.ndarray, int]:
        """The sum as signed integers (coordinates in scaled units, then the weight)."""
        t = np.asarray(ring_sum).astype(np.uint64) & np.uint64((1 << self.bits) - 1)
        signed = t.view(np.int64)
        if self.bits < 64:
            signed = signed - ((t >> np.uint64(self.bits - 1)).astype(np.int64) << self.bits)
        return signed[:-1], int(signed[-1])


def as_input_codec(codec: Any) -> InputCodec:
    """A :class:`FixedPointCodec` wrapped as the default input codec; an InputCodec as is."""
    if isinstance(codec, FixedPointCodec):
        return FixedPointInput(codec)
    if isinstance(codec, InputCodec):
        return codec
    raise TypeError(f"not an input codec: {type(codec).__name__}")


def codec_for(cfg: Any, base: FixedPointCodec) -> InputCodec:
    """The run's input codec: ``dp=distributed`` plugs its own in, else fixed point."""
    dp = cfg.get("dp") if cfg is not None and hasattr(cfg, "get") else None
    name = dp.get("name") if dp is not None and hasattr(dp, "get") else None
    if name == "distributed":
        from fedstack.strategies import load_object

        return load_object(DISTRIBUTED_CODEC).from_config(cfg, base)
    return FixedPointInput(base)
