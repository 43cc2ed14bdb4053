"""Uniform draws for the client's randomized rounding and noise, from AES-256-CTR only.

Why: the discrete noise is the client's secret share of the mechanism; anyone who could
predict it could subtract it from the unmasked sum. So every random bit the client uses
comes from :class:`fedstack.privacy.secure_random.AesCtrRandom` (the AES-256-CTR keystream
keyed with 256 fresh OS bits), never from ``random`` or NumPy's generators.
"""

from __future__ import annotations

import numpy as np

from fedstack.privacy.secure_random import AesCtrRandom

#: Bits of a float64 uniform (its mantissa): u = (w >> 11) * 2**-53.
UNIFORM_BITS = 53
_WORD_BITS = 64


class CryptoUniform:
    """Independent float64 uniforms in [0, 1) with 53 random bits each (NumPy arrays)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._source = AesCtrRandom(key)

    def uniform(self, n: int) -> np.ndarray:
        """n uniforms in [0, 1): k * 2^-53 for a uniform 53-bit integer k."""
        if n <= 0:
            return np.empty(0, dtype=np.float64)
        words = self._source.words(n).numpy().view(np.uint64)
        return (words >> np.uint64(_WORD_BITS - UNIFORM_BITS)).astype(np.float64) * (
            2.0**-UNIFORM_BITS
        )

    def open_uniform(self, n: int) -> np.ndarray:
        """n uniforms in (0, 1]: safe to take the logarithm of."""
        return 1.0 - self.uniform(n)
