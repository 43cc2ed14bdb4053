"""How much noise, at which sample rate, with which δ: the per-client DP-SGD parameters.

Why per client: the sample rate q of Poisson sampling is batch_size / n_k, so clients with
different dataset sizes need different noise for the same ε. The conventions follow
Opacus (`DPDataLoader.from_data_loader`): an epoch is ceil(n_k / B) steps and
q = 1 / ceil(n_k / B), so our numbers equal what `PrivacyEngine.make_private` would account.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

from opacus.accountants.utils import get_noise_multiplier

#: δ = 1 / (DELTA_DIVISOR · n_k) when the config leaves δ unset: well below 1/n_k, the
#: probability at which releasing one whole record would already "satisfy" (ε, δ)-DP.
DELTA_DIVISOR = 10
#: Binary-search tolerance when deriving σ from a target ε (Opacus's default): the planned
#: run ends within this much *below* the target.
EPSILON_TOLERANCE = 0.01


@dataclass(frozen=True)
class SamplingPlan:
    """Poisson sampling of one client's data."""

    num_examples: int
    batch_size: int
    steps_per_epoch: int
    sample_rate: float

    @property
    def expected_batch_size(self) -> float:
        return self.num_examples * self.sample_rate


def sampling_plan(num_examples: int, batch_size: int) -> SamplingPlan:
    if num_examples < 1:
        raise ValueError(f"a client needs at least one training example, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = math.ceil(num_examples / batch_size)
    return SamplingPlan(num_examples, batch_size, steps, 1.0 / steps)


def default_delta(num_examples: int) -> float:
    return 1.0 / (DELTA_DIVISOR * num_examples)


@lru_cache(maxsize=64)
def derive_noise_multiplier(
    *, target_epsilon: float, delta: float, sample_rate: float, total_steps: int, accountant: str
) -> float:
    """Smallest σ (to tolerance) whose ε after `total_steps` is at most `target_epsilon`.

    Opacus's binary search, ~12 accountant evaluations (seconds with RDP); cached because
    clients of equal size (IID partitions) in one process ask for the same σ.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    with warnings.catch_warnings():
        # The search first tries very large σ, where ε is tiny and the best Rényi order is
        # the largest one; Opacus warns for each such probe. The σ it returns has its best
        # order well inside the range (α≈2-3 for ε=8 in our tasks); where it does not, the
        # ε each client computes for its reply (outside this search) still warns.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=accountant,
            epsilon_tolerance=EPSILON_TOLERANCE,
        )
    return float(sigma)
