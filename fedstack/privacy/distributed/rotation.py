"""Randomized Walsh-Hadamard rotation with public signs, and its exact inverse.

Why rotate: after a random rotation every coordinate of a vector of L2 norm c is of order
c/sqrt(d), so randomized rounding and the per-coordinate noise treat all directions alike
(Kairouz et al. 2021, "The distributed discrete Gaussian mechanism", Sec. 4; Agarwal et al.
2021, "The Skellam mechanism"). The rotation is R = H D: D a diagonal of random signs, H block
diagonal with orthonormal Walsh-Hadamard blocks of B = min(next power of two >= d,
:data:`MAX_BLOCK`) coordinates; the vector is zero-padded to d' = a multiple of B. R is
orthogonal, so it preserves the L2 norm (the sensitivity) exactly, and R^-1 = D H (H is
symmetric and its own inverse).

Why blocks rather than one transform of the next power of two: the padding is uploaded (and
noised) with the update, and padding d = 85 000 to 131 072 costs 54% more words; blocks of
256 cost at most 255 words (0.3% there, 18% for the 650-parameter digits model instead of
58%). The guarantee does not need a global rotation: the wrap check bounds every coordinate
by the rounded vector's L2 norm, and rounding and noise are per coordinate whatever B is.
Within a block a spike is still spread to 1/sqrt(B) of its norm per coordinate.

The signs are PUBLIC: every client must rotate with the same R so that the server can undo
it on the sum, so they come from the round's public seed (HKDF-SHA256 -> AES-256-CTR). The
privacy guarantee does not depend on them being secret: the clipped vector's norm bound, not
the rotation, bounds the sensitivity.
"""

from __future__ import annotations

import math

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedstack.crypto.prg import expand

#: HKDF info prefix of the sign stream: binds the signs to this use of the seed.
ROTATION_PURPOSE = b"fedstack/dp-distributed/rotation-signs/v1"
#: AES-256 key length for the sign stream.
SIGN_KEY_BYTES = 32
#: Largest Hadamard block (a power of two): bounds the padding at MAX_BLOCK - 1 words.
MAX_BLOCK = 256


def block_size(d: int) -> int:
    """B: the next power of two >= d, at most MAX_BLOCK."""
    if d < 1:
        raise ValueError(f"dimension must be >= 1, got {d}")
    return min(1 << (d - 1).bit_length(), MAX_BLOCK)


def padded_dim(d: int) -> int:
    """d': d rounded up to a multiple of its block size (the rotated vector's length)."""
    b = block_size(d)
    return -(-d // b) * b


def fwht(x: np.ndarray, block: int | None = None) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform of every ``block`` consecutive values (a copy).

    ``block`` (a power of two dividing len(x); default: the whole vector) -- butterfly
    stages over reshaped views: O(d log B) float64 operations, no Python loop over
    coordinates. Orthonormal (scaled by 1/sqrt(B)), hence its own inverse.
    """
    n = x.size
    b = n if block is None else int(block)
    if b < 1 or b & (b - 1) or n % b:
        raise ValueError(f"Hadamard block must be a power of two dividing {n}, got {b}")
    y = np.array(x, dtype=np.float64, copy=True).reshape(n)
    h = 1
    while h < b:
        pairs = y.reshape(-1, 2, h)  # within each block: halves of length h side by side
        top = pairs[:, 0, :].copy()
        pairs[:, 0, :] += pairs[:, 1, :]
        pairs[:, 1, :] = top - pairs[:, 1, :]
        h *= 2
    y *= 1.0 / math.sqrt(b)
    return y


def public_signs(seed: bytes, round_num: int, n: int) -> np.ndarray:
    """n signs in {-1.0, +1.0} from the round's public seed (identical for every party)."""
    if not isinstance(seed, bytes | bytearray) or not seed:
        raise ValueError("the rotation needs a non-empty public seed (bytes)")
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=SIGN_KEY_BYTES,
        salt=None,
        info=ROTATION_PURPOSE + b"|" + int(round_num).to_bytes(8, "big") + b"|"
        + int(n).to_bytes(8, "big"),
    ).derive(bytes(seed))
    bits = np.unpackbits(expand(key, (n + 31) // 32, np.uint32).view(np.uint8))[:n]
    return 1.0 - 2.0 * bits.astype(np.float64)


class RandomizedHadamard:
    """R = H D on zero-padded vectors of length d; :meth:`inverse` undoes it and truncates."""

    def __init__(self, d: int, seed: bytes, round_num: int) -> None:
        self.d = int(d)
        self.block = block_size(self.d)
        self.padded = padded_dim(self.d)
        self.signs = public_signs(seed, round_num, self.padded)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """R pad(x): length d' (float64)."""
        v = np.asarray(x, dtype=np.float64).ravel()
        if v.size != self.d:
            raise ValueError(f"rotation built for d={self.d}, got a vector of {v.size}")
        padded = np.zeros(self.padded, dtype=np.float64)
        padded[: self.d] = v
        padded *= self.signs
        return fwht(padded, self.block)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """D H y truncated to the first d coordinates (the padding carries only noise)."""
        v = np.asarray(y, dtype=np.float64).ravel()
        if v.size != self.padded:
            raise ValueError(f"inverse rotation needs {self.padded} values, got {v.size}")
        return (fwht(v, self.block) * self.signs)[: self.d]
