"""Fixed-point encoding of weighted updates into the ring Z_{2^m}.

Secure aggregation adds integers modulo 2^m, so a client's (n_k * w_k, n_k) must become
integers first. Encoding (documented contract, checked here):

* clip every coordinate of w_k to [-clip, +clip];
* q_k = n_k * round(scale * clip(w_k)) -- quantise first, then weight, so the decoded
  weighted mean is off by at most 1/(2*scale) per coordinate (plus clipping);
* the last word carries n_k itself (the weight is masked too);
* negative values wrap to two's complement in Z_{2^m}.

No-wrap guarantee: with at most ``max_clients`` clients each of weight at most
``max_weight``, |sum q_k| <= max_clients * max_weight * round(scale * clip) must stay below
2^(m-1) (so the signed sum decodes exactly), and sum n_k <= max_clients * max_weight too.
:meth:`FixedPointCodec.check_no_wrap` enforces both; the codec refuses weights above
``max_weight`` at encode time so the bound cannot be broken silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_RING_BITS = 8
MAX_RING_BITS = 64


class QuantisationError(ValueError):
    """Parameters that could wrap the ring sum, or an input outside the contract."""


def ring_dtype(bits: int) -> np.dtype:
    """Smallest unsigned word that holds Z_{2^bits}: uint32 up to 32 bits, else uint64."""
    if not MIN_RING_BITS <= bits <= MAX_RING_BITS:
        raise QuantisationError(
            f"ring bits must be in [{MIN_RING_BITS}, {MAX_RING_BITS}], got {bits}"
        )
    return np.dtype(np.uint32) if bits <= 32 else np.dtype(np.uint64)


def ring_reduce(words: np.ndarray, bits: int) -> np.ndarray:
    """Reduce words mod 2^bits in place when the word is wider than the ring."""
    if bits not in (32, 64):
        words &= words.dtype.type((1 << bits) - 1)
    return words


def auto_scale(bits: int, clip: float, max_clients: int, max_weight: int) -> float:
    """Largest power of two scale that keeps the worst-case sum inside the signed ring.

    A power of two keeps scale * value exact in float64, so encoding is deterministic.
    """
    budget = (2 ** (bits - 1) - 1) // (max_clients * max_weight)
    if budget < 1:
        raise QuantisationError(
            f"ring of {bits} bits cannot hold the weight sum of max_clients={max_clients} "
            f"clients of max_weight={max_weight}"
        )
    return 2.0 ** math.floor(math.log2(budget / clip))


@dataclass(frozen=True)
class FixedPointCodec:
    """Parameters of the encoding; identical on clients and server (from the run config)."""

    bits: int
    clip: float
    scale: float
    max_clients: int
    max_weight: int

    def __post_init__(self) -> None:
        ring_dtype(self.bits)
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise QuantisationError(f"clip must be a positive finite number, got {self.clip}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise QuantisationError(f"scale must be a positive finite number, got {self.scale}")
        if self.max_clients < 1 or self.max_weight < 1:
            raise QuantisationError("max_clients and max_weight must be >= 1")
        self.check_no_wrap()

    @property
    def dtype(self) -> np.dtype:
        return ring_dtype(self.bits)

    @property
    def max_level(self) -> int:
        """Largest |round(scale * w)| after clipping."""
        return int(round(self.scale * self.clip))

    @property
    def error_bound(self) -> float:
        """Max |decoded weighted mean - weighted mean of clipped inputs| per coordinate."""
        return 0.5 / self.scale

    def check_no_wrap(self) -> None:
        """Raise unless the sum over max_clients clients provably cannot wrap."""
        half = 2 ** (self.bits - 1)
        worst = self.max_clients * self.max_weight * self.max_level
        if worst >= half:
            raise QuantisationError(
                f"sum can wrap: max_clients({self.max_clients}) * max_weight({self.max_weight}) * "
                f"round(scale*clip)({self.max_level}) = {worst} >= 2^{self.bits - 1}; "
                "lower scale/clip/max_clients or raise bits"
            )
        if self.max_clients * self.max_weight >= half:
            raise QuantisationError(f"weight sum can wrap in {self.bits} bits")

    def encode(self, values: np.ndarray, weight: int) -> np.ndarray:
        """(weight * quantised values, weight) as ring words, length len(values) + 1."""
        v = np.asarray(values, dtype=np.float64).ravel()
        if not np.isfinite(v).all():
            raise QuantisationError("update contains NaN or infinite values")
        w = int(weight)
        if not 0 <= w <= self.max_weight:
            raise QuantisationError(f"weight {w} outside [0, max_weight={self.max_weight}]")
        q = np.rint(np.clip(v, -self.clip, self.clip) * self.scale).astype(np.int64)
        q *= w  # |q| <= max_weight * max_level < 2^63 by check_no_wrap
        out = np.empty(v.size + 1, dtype=np.int64)
        out[:-1] = q
        out[-1] = w
        words = out.view(np.uint64)  # two's complement == reduction mod 2^64
        if self.dtype == np.uint32:
            words = words.astype(np.uint32)  # keeps the low 32 bits: reduction mod 2^32
        return ring_reduce(words, self.bits)

    def decode(self, total: np.ndarray) -> tuple[np.ndarray, int]:
        """Ring sum -> (sum_k n_k * w_k as float64, sum_k n_k)."""
        t = np.asarray(total).astype(np.uint64) & np.uint64((1 << self.bits) - 1)
        signed = t.view(np.int64)  # two's complement of the 64-bit word
        if self.bits < 64:  # sign-extend from bit (bits - 1)
            signed = signed - ((t >> np.uint64(self.bits - 1)).astype(np.int64) << self.bits)
        weight = int(signed[-1])
        if weight < 0:
            raise QuantisationError("decoded weight sum is negative: the aggregate is corrupt")
        return signed[:-1].astype(np.float64) / self.scale, weight

    def decode_mean(self, total: np.ndarray) -> np.ndarray:
        """Weighted mean from the ring sum (raises on a zero total weight)."""
        weighted, weight = self.decode(total)
        if weight == 0:
            raise QuantisationError("total weight is zero: nothing to average")
        return weighted / weight
