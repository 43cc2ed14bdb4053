"""Client-level accounting of the Skellam mechanism actually run (RDP), and its calibration.

Each completed round releases one noisy sum: the survivors' rounded vectors (each of L2
norm <= Delta2 and L1 norm <= Delta1, integer units) plus Skellam noise of total variance
mu (the exact sum of the survivors' shares). Agarwal, Kairouz, Liu (2021, Thm 3.5): for
integer alpha > 1 this release is (alpha, eps(alpha))-RDP with

    eps(alpha) = alpha Delta2^2 / (2 mu)
                 + min( ((2 alpha - 1) Delta2^2 + 6 Delta1) / (4 mu^2),  3 Delta1 / (2 mu) ).

The first term is the Gaussian mechanism's; the min is the price of discreteness, so
epsilon here is never below the continuous approximation (tested). Neighbouring datasets
differ by one client's contribution (add/remove, as in DP-FedAvg, McMahan et al. 2018).
Rounds compose by adding RDP; the conversion to (epsilon, delta) is Opacus's
(``get_privacy_spent``, Balle et al. 2020), the same one the record-level accountant uses.
No amplification by client sampling is claimed: every release counts in full for every
client (conservative; correct whatever the sampling).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from opacus.accountants.analysis.rdp import get_privacy_spent

#: Integer RDP orders (the Skellam bound holds for integer alpha > 1 only).
ORDERS: tuple[int, ...] = (*range(2, 257), 320, 384, 512, 768, 1024)
#: Noise multipliers the calibration searches between.
MIN_NOISE_MULTIPLIER = 1e-3
MAX_NOISE_MULTIPLIER = 1e4
#: Bisection steps on log z (relative precision ~ 2^-60 of the search range).
CALIBRATION_STEPS = 60
#: Name of the accountant (for the ledger and report).
ACCOUNTANT_NAME = "skellam-rdp"


@dataclass(frozen=True)
class SkellamRelease:
    """One released noisy sum, in the ring's integer units.

    ``variance``: total Skellam variance per coordinate the accounting assumes (the floor the
    protocol guarantees); ``l2_sensitivity``/``l1_sensitivity``: bounds on one client's
    rounded vector; ``count``: how many identical releases (rounds) this entry stands for.
    """

    variance: float
    l2_sensitivity: float
    l1_sensitivity: float
    count: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.variance) and self.variance > 0):
            raise ValueError(f"Skellam variance must be > 0, got {self.variance}")
        if not (self.l2_sensitivity > 0 and self.l1_sensitivity > 0):
            raise ValueError("sensitivities must be > 0")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> SkellamRelease:
        return cls(
            float(raw["variance"]),
            float(raw["l2_sensitivity"]),
            float(raw["l1_sensitivity"]),
            int(raw.get("count", 1)),
        )


def skellam_rdp(
    variance: float, l2: float, l1: float, orders: Sequence[int] = ORDERS
) -> np.ndarray:
    """RDP of one Skellam release at each integer order (Agarwal et al. 2021, Thm 3.5)."""
    a = np.asarray(orders, dtype=np.float64)
    if (a < 2).any() or (a != np.floor(a)).any():
        raise ValueError("the Skellam RDP bound holds for integer orders >= 2 only")
    mu = float(variance)
    gaussian = a * l2 * l2 / (2 * mu)
    discrete = np.minimum(((2 * a - 1) * l2 * l2 + 6 * l1) / (4 * mu * mu), 3 * l1 / (2 * mu))
    return gaussian + discrete


def total_rdp(releases: Iterable[SkellamRelease], orders: Sequence[int] = ORDERS) -> np.ndarray:
    """RDP of the composition of ``releases`` (RDP adds up over releases)."""
    total = np.zeros(len(orders), dtype=np.float64)
    for r in releases:
        total += r.count * skellam_rdp(r.variance, r.l2_sensitivity, r.l1_sensitivity, orders)
    return total


def epsilon(
    releases: Iterable[SkellamRelease], delta: float, orders: Sequence[int] = ORDERS
) -> float:
    """Client-level (epsilon, delta)-DP of all ``releases`` together."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    rdp = total_rdp(releases, orders)
    if not rdp.any():
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the smallest/largest alpha":
        warnings.simplefilter("ignore")  # expected while calibration probes extreme noise
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp.tolist(), delta=delta)
    return float(eps)


def noise_multiplier_for(
    target_epsilon: float, delta: float, rounds: int, l2: float, l1: float
) -> float:
    """Smallest z (up to bisection precision) with epsilon(rounds x Sk((z l2)^2)) <= target."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")

    def eps_at(z: float) -> float:
        return epsilon([SkellamRelease((z * l2) ** 2, l2, l1, rounds)], delta)

    lo, hi = math.log(MIN_NOISE_MULTIPLIER), math.log(MAX_NOISE_MULTIPLIER)
    if eps_at(math.exp(hi)) > target_epsilon:
        raise ValueError(
            f"epsilon {target_epsilon} over {rounds} rounds needs a noise multiplier above "
            f"{MAX_NOISE_MULTIPLIER}"
        )
    if eps_at(math.exp(lo)) <= target_epsilon:
        return math.exp(lo)
    for _ in range(CALIBRATION_STEPS):
        mid = (lo + hi) / 2
        if eps_at(math.exp(mid)) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


class SkellamAccountant:
    """The run's releases so far; serialisable as a list of :class:`SkellamRelease` dicts."""

    name = ACCOUNTANT_NAME

    def __init__(self, releases: Iterable[SkellamRelease] = ()) -> None:
        self.releases: list[SkellamRelease] = []
        for r in releases:
            self.add(r)

    def add(self, release: SkellamRelease) -> None:
        """Record one more release; consecutive equal releases merge into one entry."""
        last = self.releases[-1] if self.releases else None
        if last is not None and (
            last.variance,
            last.l2_sensitivity,
            last.l1_sensitivity,
        ) == (release.variance, release.l2_sensitivity, release.l1_sensitivity):
            self.releases[-1] = SkellamRelease(
                last.variance, last.l2_sensitivity, last.l1_sensitivity, last.count + release.count
            )
        else:
            self.releases.append(release)

    def epsilon(self, delta: float) -> float:
        return epsilon(self.releases, delta)

    @property
    def history(self) -> list[dict[str, float | int]]:
        return [r.to_dict() for r in self.releases]
