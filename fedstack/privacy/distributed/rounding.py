"""Conditional randomized rounding with an explicit bound on the rounded vector's norm.

The sensitivity of the mechanism is the L2 norm of what a client adds to the ring sum, so
it must be bounded AFTER rounding, not before. Randomized rounding (each coordinate to its
floor or ceiling, up with probability equal to its fractional part) is unbiased, but can
lengthen a vector of norm c by up to sqrt(d). Kairouz, Liu, Steinke (2021, "The distributed
discrete Gaussian mechanism for federated learning with secure aggregation", Sec. 4.1):
with probability >= 1 - beta the rounded vector's squared norm is at most
c^2 + d/4 + sqrt(2 ln(1/beta)) (c + sqrt(d)/2). Conditional rounding re-rounds until the
vector meets that bound (expected 1/(1-beta) attempts), so the bound holds ALWAYS and is the
sensitivity the accountant uses; never more than the deterministic c + sqrt(d).
"""

from __future__ import annotations

import math

import numpy as np

from .randomness import CryptoUniform

#: Kairouz et al.'s default failure probability of one rounding attempt.
DEFAULT_BETA = math.exp(-0.5)
#: Attempts before giving up (each fails with probability <= beta; e^-0.5^200 ~ 1e-44).
MAX_ROUNDING_ATTEMPTS = 200
#: Relative margin on the squared-norm comparison, so float64 summation cannot let a vector
#: slip past the bound by a rounding error.
NORM_CHECK_MARGIN = 1e-9


class RoundingError(ValueError):
    """No rounding within the bound after :data:`MAX_ROUNDING_ATTEMPTS` (input too long?)."""


def rounded_l2_bound(c: float, d: int, beta: float) -> float:
    """Bound on the L2 norm of a conditionally rounded vector of norm <= c in d dimensions."""
    if not 0 < beta < 1:
        raise ValueError(f"rounding beta must be in (0, 1), got {beta}")
    deterministic = c + math.sqrt(d)
    squared = c * c + d / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(d) / 2)
    return min(deterministic, math.sqrt(squared))


def rounded_l1_bound(l2: float, d: int) -> float:
    """L1 bound of an integer vector with L2 norm <= l2: ||x||_1 <= min(||x||_2^2, sqrt(d) ||x||_2).

    (|x_i| <= x_i^2 for integers; Cauchy-Schwarz.)
    """
    return min(l2 * l2, math.sqrt(d) * l2)


def randomized_round(x: np.ndarray, rng: CryptoUniform) -> np.ndarray:
    """Each coordinate to floor or ceil, up with probability = its fractional part (int64)."""
    floor = np.floor(x)
    up = rng.uniform(x.size) < (x - floor)
    return floor.astype(np.int64) + up


def conditional_round(x: np.ndarray, bound: float, rng: CryptoUniform) -> np.ndarray:
    """Randomized rounding of ``x``, repeated until the result's L2 norm is <= ``bound``."""
    v = np.asarray(x, dtype=np.float64).ravel()
    limit = bound * bound * (1 - NORM_CHECK_MARGIN)
    for _ in range(MAX_ROUNDING_ATTEMPTS):
        rounded = randomized_round(v, rng)
        as_float = rounded.astype(np.float64)
        # square-and-sum, not a BLAS dot: no thread pool for one pass over d' values
        if float(np.square(as_float, out=as_float).sum()) <= limit:
            return rounded
    raise RoundingError(
        f"no randomized rounding of the scaled update within the norm bound {bound:.6g} "
        f"after {MAX_ROUNDING_ATTEMPTS} attempts (input norm {float(np.linalg.norm(v)):.6g})"
    )
