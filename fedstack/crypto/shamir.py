"""Vectorised Shamir secret sharing of 256-bit secrets over a 32-bit prime field.

Field choice (why not one 256-bit field element): a 32-byte secret is cut into
``NUM_LIMBS`` limbs of ``LIMB_BITS`` = 31 bits, and each limb is shared with its own
independent random polynomial over GF(p), p = 2^32 - 5. Shamir's scheme is perfectly hiding
limb by limb with independent coefficients, so the tuple is perfectly hiding too: t-1
shares are consistent with every secret (tested). The only requirement on p is p > the
number of share holders (4 billion here). What this buys: every product of two field elements
fits in a uint64, so polynomial evaluation (Horner) and Lagrange interpolation run as NumPy
array operations over all (secret, holder, limb) triples at once -- hundreds of times faster
than PyCryptodome's per-share GF(2^128) Python loop, which Flower's SecAgg+ uses.
A share is NUM_LIMBS uint32 words (36 bytes).

Randomness: coefficients are drawn from ``os.urandom`` with rejection sampling, so they are
exactly uniform in GF(p).
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

PRIME = 4294967291  # 2^32 - 5, the largest prime below 2^32
SECRET_BYTES = 32
LIMB_BITS = 31
NUM_LIMBS = -(-SECRET_BYTES * 8 // LIMB_BITS)  # 9 limbs = 279 bits >= 256
SHARE_BYTES = NUM_LIMBS * 4
_P = np.uint64(PRIME)
_LIMB_WEIGHTS = np.uint64(1) << np.arange(LIMB_BITS, dtype=np.uint64)
_PAD_BITS = NUM_LIMBS * LIMB_BITS - SECRET_BYTES * 8


class ShamirError(ValueError):
    """Invalid sharing parameters or shares that cannot be a valid sharing."""


def _uniform_field(shape: tuple[int, ...]) -> np.ndarray:
    """Exactly uniform elements of GF(p) from the OS CSPRNG (rejection sampling)."""
    count = int(np.prod(shape))
    out = np.frombuffer(os.urandom(4 * count), dtype=np.uint32).astype(np.uint64)
    bad = out >= _P
    while bad.any():  # probability 5/2^32 per element: essentially never loops
        out[bad] = np.frombuffer(os.urandom(4 * int(bad.sum())), dtype=np.uint32)
        bad = out >= _P
    return out.reshape(shape)


def secrets_to_limbs(secrets: np.ndarray) -> np.ndarray:
    """(S, 32) uint8 -> (S, NUM_LIMBS) uint64 limbs of 31 bits, little-endian."""
    s = np.asarray(secrets, dtype=np.uint8)
    if s.ndim != 2 or s.shape[1] != SECRET_BYTES:
        raise ShamirError(f"secrets must have shape (S, {SECRET_BYTES}), got {s.shape}")
    bits = np.unpackbits(s, axis=1, bitorder="little")
    bits = np.concatenate([bits, np.zeros((s.shape[0], _PAD_BITS), np.uint8)], axis=1)
    return bits.reshape(s.shape[0], NUM_LIMBS, LIMB_BITS).astype(np.uint64) @ _LIMB_WEIGHTS


def limbs_to_secrets(limbs: np.ndarray) -> np.ndarray:
    """Inverse of :func:`secrets_to_limbs`; rejects limbs that no 256-bit secret produces."""
    lim = np.asarray(limbs, dtype=np.uint64)
    if (lim >> np.uint64(LIMB_BITS)).any():
        raise ShamirError("reconstructed limb exceeds 31 bits: shares are inconsistent")
    bits = ((lim[:, :, None] >> np.arange(LIMB_BITS, dtype=np.uint64)) & np.uint64(1)).astype(
        np.uint8
    )
    bits = bits.reshape(lim.shape[0], NUM_LIMBS * LIMB_BITS)
    if bits[:, SECRET_BYTES * 8 :].any():
        raise ShamirError("reconstructed secret exceeds 256 bits: shares are inconsistent")
    return np.packbits(bits[:, : SECRET_BYTES * 8], axis=1, bitorder="little")


def _check_params(n: int, t: int) -> None:
    if not 1 <= t <= n:
        raise ShamirError(f"threshold t={t} must satisfy 1 <= t <= n={n}")
    if n >= PRIME:
        raise ShamirError(f"n={n} must be below the field prime {PRIME}")


def split(secrets: np.ndarray, n: int, t: int, xs: np.ndarray | None = None) -> np.ndarray:
    """Share each of S secrets among n holders with threshold t.

    ``secrets``: (S, 32) uint8. ``xs``: the holders' distinct non-zero x-coordinates
    (default 1..n). Returns (S, n, NUM_LIMBS) uint32: share of secret s for holder i.
    """
    _check_params(n, t)
    x = np.arange(1, n + 1, dtype=np.uint64) if xs is None else _check_xs(xs, n)
    limbs = secrets_to_limbs(secrets)  # (S, L)
    num = limbs.shape[0]
    coeffs = _uniform_field((t - 1, num, 1, NUM_LIMBS))
    xb = x[None, :, None]
    # Horner from the top coefficient down; every intermediate stays < 2^64.
    acc = np.zeros((num, n, NUM_LIMBS), dtype=np.uint64)
    for j in range(t - 2, -1, -1):
        acc = (acc + coeffs[j]) * xb % _P
    acc = (acc + limbs[:, None, :]) % _P
    return acc.astype(np.uint32)


def _check_xs(xs: np.ndarray, count: int) -> np.ndarray:
    x = np.asarray(xs, dtype=np.uint64)
    if x.shape != (count,):
        raise ShamirError(f"expected {count} x-coordinates, got shape {x.shape}")
    if (x == 0).any() or (x >= _P).any() or len(np.unique(x)) != count:
        raise ShamirError("x-coordinates must be distinct, non-zero and below the prime")
    return x


@lru_cache(maxsize=256)
def _lagrange_at_zero(xs: tuple[int, ...]) -> np.ndarray:
    """Cached Lagrange coefficients l_i(0) = prod_{j!=i} x_j / (x_j - x_i) mod p."""
    x = np.array(xs, dtype=np.uint64)
    m = len(xs)
    diff = (x[None, :] + _P - x[:, None]) % _P  # diff[i, j] = x_j - x_i
    np.fill_diagonal(diff, 1)
    num = np.ones(m, dtype=np.uint64)
    den = np.ones(m, dtype=np.uint64)
    for j in range(m):  # column-wise products, reduced at each step to stay below 2^64
        num = num * x[j] % _P
        den = den * diff[:, j] % _P
    num = num * np.array([pow(int(v), -1, PRIME) for v in x], dtype=np.uint64) % _P
    inv_den = np.array([pow(int(v), -1, PRIME) for v in den], dtype=np.uint64)
    coeffs = num * inv_den % _P
    coeffs.setflags(write=False)
    return coeffs


def reconstruct(xs: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Recover S secrets from the same set of t holders.

    ``xs``: (t,) x-coordinates; ``shares``: (S, t, NUM_LIMBS) uint32 in the same order.
    Returns (S, 32) uint8. Exactly t shares of a degree t-1 sharing determine the secret;
    fewer give a wrong (uniformly distributed) value, which callers prevent by counting.
    """
    y = np.asarray(shares)
    if y.ndim != 3 or y.shape[2] != NUM_LIMBS:
        raise ShamirError(f"shares must have shape (S, t, {NUM_LIMBS}), got {y.shape}")
    x = _check_xs(xs, y.shape[1])
    yv = y.astype(np.uint64)
    if (yv >= _P).any():
        raise ShamirError("share value outside the field")
    lam = _lagrange_at_zero(tuple(int(v) for v in x))
    terms = yv * lam[None, :, None] % _P  # each < p < 2^32, so a sum of < 2^32 terms fits
    return limbs_to_secrets(terms.sum(axis=1) % _P)


def _inverse(values: np.ndarray) -> np.ndarray:
    """Elementwise inverse in GF(p) as v^(p-2) (Fermat), vectorised; values must be non-zero.

    Square-and-multiply over uint64 arrays: every product of two elements < p < 2^32 fits.
    """
    result = np.ones_like(values)
    base = values % _P
    exponent = PRIME - 2
    while exponent:
        if exponent & 1:
            result = result * base % _P
        base = base * base % _P
        exponent >>= 1
    return result


def _lagrange_at_zero_rows(x: np.ndarray) -> np.ndarray:
    """l_i(0) for each row of x (S, t) at once: the same formula as :func:`_lagrange_at_zero`."""
    rows, m = x.shape
    diff = (x[:, None, :] + _P - x[:, :, None]) % _P  # diff[s, i, j] = x_j - x_i
    diag = np.arange(m)
    diff[:, diag, diag] = 1
    num = np.ones((rows, m), dtype=np.uint64)
    den = np.ones((rows, m), dtype=np.uint64)
    for j in range(m):
        num = num * x[:, j : j + 1] % _P
        den = den * diff[:, :, j] % _P
    return num * _inverse(x) % _P * _inverse(den) % _P


def reconstruct_many(xs: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Recover S secrets, each from its own set of t holders, in one vectorised pass.

    ``xs``: (S, t) x-coordinates, row s the holders of secret s; ``shares``: (S, t, NUM_LIMBS)
    in the same order. Returns (S, 32) uint8. Why: with a sparse (SecAgg+) graph every
    party's secret has a different holder set, so :func:`reconstruct`'s per-set cache never
    hits and its per-call overhead, times ~n secrets, dominated a 1000-client unmasking.
    """
    y = np.asarray(shares)
    if y.ndim != 3 or y.shape[2] != NUM_LIMBS:
        raise ShamirError(f"shares must have shape (S, t, {NUM_LIMBS}), got {y.shape}")
    x = np.asarray(xs, dtype=np.uint64)
    if x.shape != y.shape[:2]:
        raise ShamirError(f"expected x-coordinates of shape {y.shape[:2]}, got {x.shape}")
    ordered = np.sort(x, axis=1)
    if (x == 0).any() or (x >= _P).any() or (np.diff(ordered, axis=1) == 0).any():
        raise ShamirError("x-coordinates must be distinct, non-zero and below the prime")
    yv = y.astype(np.uint64)
    if (yv >= _P).any():
        raise ShamirError("share value outside the field")
    lam = _lagrange_at_zero_rows(x)
    terms = yv * lam[:, :, None] % _P
    return limbs_to_secrets(terms.sum(axis=1) % _P)


def clear_lagrange_cache() -> None:
    """For benchmarks that time interpolation from cold."""
    _lagrange_at_zero.cache_clear()
