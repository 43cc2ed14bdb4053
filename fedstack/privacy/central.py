"""Central (user-level) DP-FedAvg: clip each client's update, noise the sum, fixed denominator.

The mechanism of McMahan et al. (2018), run by a trusted server, with the adaptive clipping
bound of Andrew et al. (2021). Per round, for the clients sampled (Poisson, probability q):

    Δ_k = w_k - w            clipped: Δ_k · min(1, C / ‖Δ_k‖₂)
    S   = Σ_k clip(Δ_k) + N(0, σ_Δ² C² I)
    w  <- w + η · S / m      m = q · N, the *expected* cohort, never the realised one

so one client changes S by at most C whatever the others did, and the noise is calibrated
to that sensitivity. The mean is unweighted: weighting by a client's example count would let
one client's influence grow with the number it claims. With adaptive clipping the server
also releases a noisy count of the clients whose update was within C,

    b̃ = (Σ_k (1[‖Δ_k‖ ≤ C] - 1/2) + N(0, σ_b²)) / m + 1/2,   C <- C · exp(-η_C (b̃ - γ)),

so C moves geometrically towards the γ-quantile of the update norms; each client changes the
count by at most 1/2, and the two releases together are accounted as one Gaussian mechanism
with σ = (σ_Δ^-2 + (2σ_b)^-2)^-1/2 (`client_accountant.update_noise_multiplier`).

Nothing here imports Flower: the strategy (`central_strategy`) feeds flat update vectors in.
Noise comes from AES-256-CTR keyed from the OS (`secure_random.AesCtrRandom`), never from the
run seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedstack.privacy.client_accountant import (
    MECHANISM_GAUSSIAN,
    SAMPLING_ALL,
    SAMPLING_POISSON,
    ClientLevelRecord,
    client_level_noise_multiplier,
    update_noise_multiplier,
)
from fedstack.privacy.secure_random import AesCtrRandom, RandomSource

#: δ = 1 / (DELTA_DIVISOR · N) for N clients when `dp.delta` is null: below 1/N, where
#: publishing one whole client's data would already "satisfy" (ε, δ)-DP.
DELTA_DIVISOR = 10
#: Andrew et al.'s default clipped-count noise: σ_b = expected clients per round / this.
COUNT_STDDEV_DIVISOR = 20.0
#: Each client's contribution to the centred clipped count (b_k - 1/2): its sensitivity.
COUNT_SENSITIVITY = 0.5


@dataclass(frozen=True)
class CentralPlan:
    """Everything the mechanism and the accountant need, fixed for the whole run."""

    clip_norm: float
    #: σ the accountant uses (the update's and the clipped count's together).
    noise_multiplier: float
    #: σ_Δ of the noise on the update sum (= noise_multiplier without adaptive clipping).
    update_noise_multiplier: float
    #: σ_b of the clipped-count noise; None with a fixed clipping bound.
    clipped_count_stddev: float | None
    sample_rate: float
    sampling: str
    #: m = q · N: the fixed denominator of the noisy mean.
    expected_clients: float
    delta: float
    accountant: str
    budget: float | None
    server_learning_rate: float = 1.0
    target_quantile: float = 0.5
    clip_learning_rate: float = 0.2

    @property
    def adaptive(self) -> bool:
        return self.clipped_count_stddev is not None

    def empty_record(self) -> ClientLevelRecord:
        """The accountant's record before any round."""
        return ClientLevelRecord(
            mechanism=MECHANISM_GAUSSIAN, accountant=self.accountant,
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate,
            sampling=self.sampling, delta=self.delta,
            details={"update_noise_multiplier": self.update_noise_multiplier,
                     "clipped_count_stddev": self.clipped_count_stddev,
                     "expected_clients": self.expected_clients,
                     "adaptive_clipping": self.adaptive})


def plan_from_config(cfg: Any) -> CentralPlan:
    """The run's plan from a validated config with `dp=central` (σ from the target ε)."""
    from fedstack.config import ConfigError

    dp = cfg.dp
    num_clients = int(cfg.num_clients)
    rate = float(cfg.fraction_train)
    sampling = SAMPLING_ALL if rate >= 1.0 else SAMPLING_POISSON
    expected = rate * num_clients
    delta = float(dp.delta) if dp.delta is not None else 1.0 / (DELTA_DIVISOR * num_clients)
    if dp.noise_multiplier is not None:
        sigma = float(dp.noise_multiplier)
    else:
        sigma = client_level_noise_multiplier(float(dp.target_epsilon), rate,
                                              int(cfg.num_rounds), delta, str(dp.accountant))
    count_std: float | None = None
    update_sigma = sigma
    if dp.adaptive_clipping:
        count_std = (float(dp.clipped_count_stddev) if dp.clipped_count_stddev is not None
                     else max(expected / COUNT_STDDEV_DIVISOR, sigma))
        try:
            update_sigma = update_noise_multiplier(sigma, count_std)
        except ValueError:
            raise ConfigError(
                f"dp.clipped_count_stddev={count_std:g} must exceed half the noise multiplier "
                f"(σ={sigma:g}, from dp.target_epsilon={dp.target_epsilon}): raise it or set "
                "it null") from None
    budget = (float(dp.max_epsilon) if dp.max_epsilon is not None
              else float(dp.target_epsilon) if dp.target_epsilon is not None else None)
    return CentralPlan(
        clip_norm=float(dp.clip_norm), noise_multiplier=sigma,
        update_noise_multiplier=update_sigma, clipped_count_stddev=count_std,
        sample_rate=rate, sampling=sampling, expected_clients=expected, delta=delta,
        accountant=str(dp.accountant), budget=budget,
        server_learning_rate=float(dp.server_learning_rate),
        target_quantile=float(dp.target_quantile),
        clip_learning_rate=float(dp.clip_learning_rate))


@dataclass(frozen=True)
class Release:
    """What one round releases: the noisy mean update and, with adaptive clipping, C's next
    value from the noisy clipped fraction."""

    update: np.ndarray
    clip_norm: float
    next_clip_norm: float
    noisy_unclipped_fraction: float | None


class NoisyClippedSum:
    """One round of the mechanism, fed one client update at a time (memory: two vectors).

    `add` clips and accumulates; `release` adds the noise once and divides by m. The count
    of clients within the bound stays inside (only its noisy version leaves).
    """

    def __init__(self, size: int, clip_norm: float, plan: CentralPlan,
                 random: RandomSource | None = None) -> None:
        if not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip norm must be > 0, got {clip_norm!r}")
        self.plan = plan
        self.clip_norm = float(clip_norm)
        self.random = random if random is not None else AesCtrRandom()
        self._sum = np.zeros(size, dtype=np.float64)
        self._centred_count = 0.0
        self.clients = 0

    def add(self, delta: np.ndarray) -> float:
        """Clip one client's update into the sum; returns the factor it was scaled by."""
        if delta.shape != self._sum.shape:
            raise ValueError(f"update of shape {delta.shape}, expected {self._sum.shape}")
        norm = float(np.linalg.norm(delta))
        if not math.isfinite(norm):
            raise ValueError("update contains NaN or infinite values")
        factor = min(1.0, self.clip_norm / norm) if norm > 0 else 1.0
        self._sum += delta * factor
        self._centred_count += (1.0 if norm <= self.clip_norm else 0.0) - COUNT_SENSITIVITY
        self.clients += 1
        return factor

    def _gaussian(self, size: int, std: float) -> np.ndarray:
        out = torch.empty(size, dtype=torch.float64)
        return self.random.normal_(out, std).numpy()

    def release(self) -> Release:
        """Noise the sum once (std σ_Δ·C), divide by m; adapt C from the noisy count."""
        plan = self.plan
        noisy = self._sum + self._gaussian(self._sum.size,
                                           plan.update_noise_multiplier * self.clip_norm)
        update = noisy * (plan.server_learning_rate / plan.expected_clients)
        fraction = None
        next_clip = self.clip_norm
        if plan.adaptive:
            count_noise = float(self._gaussian(1, float(plan.clipped_count_stddev))[0])
            fraction = (self._centred_count + count_noise) / plan.expected_clients \
                + COUNT_SENSITIVITY
            next_clip = self.clip_norm * math.exp(
                -plan.clip_learning_rate * (fraction - plan.target_quantile))
        return Release(update=update, clip_norm=self.clip_norm, next_clip_norm=next_clip,
                       noisy_unclipped_fraction=fraction)


def poisson_cohort(candidates: list[int], sample_rate: float,
                   random: RandomSource | None = None) -> list[int]:
    """Each candidate independently with probability q, from a secret generator.

    The amplification the accountant applies needs exactly this: independent inclusion,
    unknown to whoever sees only the released models. q = 1 takes everyone.
    """
    if sample_rate >= 1.0:
        return sorted(candidates)
    if not candidates:
        return []
    source = random if random is not None else AesCtrRandom()
    draws = source.uniform((len(candidates),)).numpy()
    return sorted(c for c, u in zip(sorted(candidates), draws, strict=True) if u < sample_rate)
