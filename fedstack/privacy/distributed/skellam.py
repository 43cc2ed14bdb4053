"""Skellam noise from a cryptographic generator, and its tail bound.

Why Skellam (Agarwal, Kairouz, Liu 2021, "The Skellam Mechanism for Differentially Private
Federated Learning"): Sk(mu) = Poisson(mu/2) - Poisson(mu/2) is integer-valued (it lives in
the secure-aggregation ring without rounding) and closed under summation: the sum of the
survivors' independent Sk(mu_k) is exactly Sk(sum mu_k). So the noise on the unmasked sum
is a Skellam variable whose parameter we know exactly, and the accountant analyses the
discrete noise actually added, not a continuous approximation. The distributed discrete
Gaussian is not closed under summation (its sum is only close to a discrete Gaussian and
needs a correction term in the accounting); it also needs a more delicate exact sampler.

Poisson sampling (vectorised over all coordinates, uniforms from AES-256-CTR):

* mean < :data:`PTRS_MIN_MEAN`: Knuth's product method (multiply uniforms until the
  product falls below e^-lambda), exact;
* otherwise Hörmann's PTRS ("The transformed rejection method for generating Poisson random
  variables", 1993), the exact rejection sampler NumPy uses for the same range. Its
  acceptance test compares with log p(k), which we compute as -lambda*h((k-lambda)/lambda)
  - log(2 pi k)/2 - stirlerr(k) (Loader's saddle-point form): the textbook
  -lambda + k log lambda - lgamma(k+1) cancels catastrophically at the means used here
  (1e6..1e12), which would distort the distribution.

The only deviation from the exact distributions is the 53-bit resolution of the uniforms.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import gammaln

from .randomness import CryptoUniform

#: Below this mean Knuth's product method is used, from it on PTRS (as in NumPy).
PTRS_MIN_MEAN = 10.0
#: Below this k the Stirling error term is computed from lgamma directly (no cancellation).
STIRLING_SERIES_MIN_K = 15
#: |r| below which h(r) = (1+r) log1p(r) - r is summed as its series (avoids cancellation).
H_SERIES_MAX_R = 0.1
H_SERIES_TERMS = 12


def _h(r: np.ndarray) -> np.ndarray:
    """(1 + r) log1p(r) - r, accurate also for tiny r (series sum_{n>=2} (-r)^n/(n(n-1)))."""
    out = np.empty_like(r)
    small = np.abs(r) < H_SERIES_MAX_R
    rs = r[small]
    acc = np.zeros_like(rs)
    power = rs * rs
    for n in range(2, 2 + H_SERIES_TERMS):
        acc += (1.0 if n % 2 == 0 else -1.0) * power / (n * (n - 1))
        power = power * rs
    out[small] = acc
    rl = r[~small]
    out[~small] = (1.0 + rl) * np.log1p(rl) - rl
    return out


def _stirlerr(k: np.ndarray) -> np.ndarray:
    """lgamma(k+1) - (k+1/2) log k + k - log(2 pi)/2, for k >= 1."""
    out = np.empty_like(k)
    small = k < STIRLING_SERIES_MIN_K
    ks = k[small]
    out[small] = gammaln(ks + 1.0) - (ks + 0.5) * np.log(ks) + ks - 0.5 * math.log(2 * math.pi)
    kl = k[~small]
    inv = 1.0 / kl
    inv2 = inv * inv
    out[~small] = inv * (1 / 12 - inv2 * (1 / 360 - inv2 * (1 / 1260 - inv2 / 1680)))
    return out


def poisson_log_pmf(k: np.ndarray, lam: float) -> np.ndarray:
    """log P[Poisson(lam) = k] for integer-valued float k >= 0, without cancellation."""
    k = np.asarray(k, dtype=np.float64)
    out = np.full(k.shape, -lam, dtype=np.float64)  # k = 0
    pos = k > 0
    kp = k[pos]
    out[pos] = -lam * _h((kp - lam) / lam) - 0.5 * np.log(2 * math.pi * kp) - _stirlerr(kp)
    return out


def _poisson_knuth(lam: float, n: int, rng: CryptoUniform) -> np.ndarray:
    limit = math.exp(-lam)
    counts = np.zeros(n, dtype=np.int64)
    product = rng.open_uniform(n)
    active = np.flatnonzero(product > limit)
    while active.size:
        counts[active] += 1
        product[active] *= rng.open_uniform(active.size)
        active = active[product[active] > limit]
    return counts


def _poisson_ptrs(lam: float, n: int, rng: CryptoUniform) -> np.ndarray:
    slam = math.sqrt(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    log_invalpha = math.log(1.1239 + 1.1328 / (b - 3.4))
    vr = 0.9277 - 3.6224 / (b - 2)
    out = np.empty(n, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        m = pending.size
        u = rng.uniform(m) - 0.5
        v = rng.uniform(m)
        us = 0.5 - np.abs(u)
        k = np.floor((2 * a / np.maximum(us, 1e-300) + b) * u + lam + 0.43)
        quick = (us >= 0.07) & (v <= vr)
        possible = ~quick & (k >= 0) & ~((us < 0.013) & (v > us))
        accept = quick.copy()
        idx = np.flatnonzero(possible)
        if idx.size:
            lhs = np.log(np.maximum(v[idx], 1e-300)) + log_invalpha - np.log(
                a / (us[idx] * us[idx]) + b
            )
            accept[idx] = lhs <= poisson_log_pmf(k[idx], lam)
        out[pending[accept]] = k[accept].astype(np.int64)
        pending = pending[~accept]
    return out


def poisson(lam: float, n: int, rng: CryptoUniform) -> np.ndarray:
    """n independent Poisson(lam) integers (int64) from the cryptographic uniforms."""
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"Poisson mean must be finite and >= 0, got {lam}")
    if lam == 0 or n == 0:
        return np.zeros(n, dtype=np.int64)
    if lam < PTRS_MIN_MEAN:
        return _poisson_knuth(lam, n, rng)
    return _poisson_ptrs(lam, n, rng)


def skellam(variance: float, n: int, rng: CryptoUniform) -> np.ndarray:
    """n independent Sk(variance) integers: Poisson(variance/2) - Poisson(variance/2)."""
    both = poisson(variance / 2.0, 2 * n, rng)  # one vectorised draw for both Poissons
    return both[:n] - both[n:]


def tail_bound(variance: float, coordinates: int, probability: float) -> float:
    """t such that P[max over ``coordinates`` independent |Sk(variance)| >= t] <= probability.

    Bernstein's inequality for a sum of centred terms bounded by 1 (a Skellam variable is
    the limit of such sums, with total variance ``variance``): P[|X| >= t] <=
    2 exp(-t^2 / (2 (variance + t/3))); a union bound over the coordinates, solved for t.
    """
    if not 0 < probability < 1:
        raise ValueError(f"tail probability must be in (0, 1), got {probability}")
    log_term = math.log(2 * coordinates / probability)
    return log_term / 3 + math.sqrt(log_term**2 / 9 + 2 * log_term * variance)
