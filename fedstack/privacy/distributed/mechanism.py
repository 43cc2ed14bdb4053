"""The distributed Skellam mechanism's parameters for one model size, and its start-up checks.

Everything both ends must agree on follows from the run config and the model size d, so a
client recomputes it instead of trusting the server: the scale gamma (ring units per unit of
the update), the sensitivities after rounding, the noise multiplier, the total Skellam
variance mu the released sum must carry, and the wrap check.

Units: a client's clipped update (L2 <= C) is rotated (norm kept), multiplied by gamma and
conditionally rounded, so its integer vector has L2 norm <= Delta2 = rounded_l2_bound(gamma C,
d', beta) and L1 norm <= Delta1. The summed noise has variance mu = (z Delta2)^2: z is the
noise multiplier relative to the sensitivity actually bounded (rounding included).

Dropouts: a round planned for n expected survivors tolerates a fraction ``dropout_slack`` of
them: each client adds mu / n_min with n_min = ceil((1 - slack) n), so any n_min survivors
together carry at least mu. A round with fewer survivors must abort before unmasking
(:meth:`SkellamPlan.min_survivors` is the line); with more, the sum carries more noise than
planned (at most mu / (1 - slack)), which the wrap check allows for.

Wrap check (start-up): the signed ring must hold every coordinate of the sum of up to
``max_clients`` rounded vectors (each coordinate <= Delta2 in absolute value) plus the
noise's tail at probability ``wrap_probability`` over all d' coordinates.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .accountant import SkellamRelease, noise_multiplier_for
from .rotation import padded_dim
from .rounding import rounded_l1_bound, rounded_l2_bound
from .skellam import tail_bound

#: Largest Delta2 / (gamma C) accepted: beyond it rounding, not the update, would dominate
#: the sensitivity (the noise would be calibrated mostly to rounding error).
MAX_NORM_INFLATION = 1.5
#: Largest scale tried by the automatic choice (a power of two).
MAX_AUTO_SCALE_LOG2 = 62


class MechanismError(ValueError):
    """Settings under which the mechanism cannot run safely; the message names the keys."""


@dataclass(frozen=True)
class MechanismSettings:
    """The inputs of the plan (from dp.* and aggregation.*), in plain types."""

    clip: float
    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float
    rounds: int
    dropout_slack: float
    rounding_beta: float
    wrap_probability: float
    scale: float  # 0: automatic
    bits: int
    max_clients: int


@dataclass(frozen=True)
class SkellamPlan:
    """Everything derived for one model size d."""

    settings: MechanismSettings
    dim: int
    padded_dim: int
    scale: float
    l2_sensitivity: float
    l1_sensitivity: float
    noise_multiplier: float
    variance: float  # mu: total Skellam variance per coordinate of the released sum
    wrap_margin: float  # 2^(bits-1) - worst-case |coordinate| of a sum (> 0)

    def min_survivors(self, expected: int) -> int:
        """Fewest survivors whose noise shares still add up to ``variance``."""
        if expected < 1:
            raise MechanismError(f"a round needs >= 1 expected survivor, got {expected}")
        return max(1, math.ceil((1 - self.settings.dropout_slack) * expected - 1e-9))

    def client_variance(self, expected: int) -> float:
        """One client's Skellam variance when ``expected`` survivors are planned."""
        return self.variance / self.min_survivors(expected)

    def release(self) -> SkellamRelease:
        """The accounting record of one completed round (the guaranteed noise floor)."""
        return SkellamRelease(self.variance, self.l2_sensitivity, self.l1_sensitivity)

    @property
    def noise_std(self) -> float:
        """Std of the noise on the decoded sum, in units of the update (per coordinate)."""
        return math.sqrt(self.variance) / self.scale

    @property
    def effective_noise_multiplier(self) -> float:
        """Noise std on the sum relative to the clip bound C (>= noise_multiplier)."""
        return self.noise_std / self.settings.clip

    def sum_bound(self, survivors: int) -> float:
        """Largest |coordinate| of an honest ring sum of ``survivors`` inputs (wrap aside)."""
        s = self.settings
        noise = tail_bound(
            self.variance / (1 - s.dropout_slack), self.padded_dim, s.wrap_probability
        )
        return survivors * self.l2_sensitivity + noise


def _check_settings(s: MechanismSettings) -> None:
    if not (math.isfinite(s.clip) and s.clip > 0):
        raise MechanismError(f"dp.clip_norm={s.clip!r} must be a positive finite L2 bound")
    if (s.noise_multiplier is None) == (s.target_epsilon is None):
        raise MechanismError(
            "set exactly one of dp.noise_multiplier and dp.target_epsilon (the other null)"
        )
    if s.noise_multiplier is not None and not (
        math.isfinite(s.noise_multiplier) and s.noise_multiplier > 0
    ):
        raise MechanismError(f"dp.noise_multiplier={s.noise_multiplier!r} must be > 0")
    if s.target_epsilon is not None and not (
        math.isfinite(s.target_epsilon) and s.target_epsilon > 0
    ):
        raise MechanismError(f"dp.target_epsilon={s.target_epsilon!r} must be > 0")
    if not 0 < s.delta < 1:
        raise MechanismError(f"dp.delta={s.delta!r} must be in (0, 1)")
    if s.rounds < 1:
        raise MechanismError(f"num_rounds={s.rounds} must be >= 1")
    if not 0 <= s.dropout_slack < 1:
        raise MechanismError(f"dp.dropout_slack={s.dropout_slack!r} must be in [0, 1)")
    if not 0 < s.rounding_beta < 1:
        raise MechanismError(f"dp.rounding_beta={s.rounding_beta!r} must be in (0, 1)")
    if not 0 < s.wrap_probability < 1:
        raise MechanismError(f"dp.wrap_probability={s.wrap_probability!r} must be in (0, 1)")
    if not (math.isfinite(s.scale) and s.scale >= 0):
        raise MechanismError(f"dp.scale={s.scale!r} must be >= 0 (0: automatic)")
    if s.max_clients < 1:
        raise MechanismError(f"aggregation.max_clients={s.max_clients} must be >= 1")


def _plan_at(s: MechanismSettings, d: int, scale: float) -> SkellamPlan:
    dp = padded_dim(d)
    l2 = rounded_l2_bound(scale * s.clip, dp, s.rounding_beta)
    l1 = rounded_l1_bound(l2, dp)
    z = (
        float(s.noise_multiplier)
        if s.noise_multiplier is not None
        else noise_multiplier_for(float(s.target_epsilon), s.delta, s.rounds, l2, l1)  # type: ignore[arg-type]
    )
    variance = (z * l2) ** 2
    plan = SkellamPlan(s, d, dp, scale, l2, l1, z, variance, 0.0)
    margin = 2.0 ** (s.bits - 1) - plan.sum_bound(s.max_clients)
    return SkellamPlan(s, d, dp, scale, l2, l1, z, variance, margin)


def _refuse_wrap(plan: SkellamPlan) -> MechanismError:
    s = plan.settings
    return MechanismError(
        f"the noisy sum can wrap the ring: aggregation.max_clients({s.max_clients}) x "
        f"Delta2({plan.l2_sensitivity:.6g}) + noise tail at dp.wrap_probability="
        f"{s.wrap_probability:g} = {plan.sum_bound(s.max_clients):.6g} >= 2^{s.bits - 1} "
        f"(aggregation.bits={s.bits}, dp.scale={plan.scale:g}, dp.clip_norm={s.clip:g}, "
        f"noise multiplier {plan.noise_multiplier:.4g}); raise aggregation.bits or lower "
        "dp.scale / aggregation.max_clients"
    )


@functools.lru_cache(maxsize=16)
def plan_for(settings: MechanismSettings, d: int) -> SkellamPlan:
    """The plan for a model of d values; raises :class:`MechanismError` naming the keys.

    Cached: every message of a client may build its codec afresh."""
    _check_settings(settings)
    if d < 1:
        raise MechanismError(f"model size must be >= 1, got {d}")
    if settings.scale:
        plan = _plan_at(settings, d, float(settings.scale))
        if plan.wrap_margin <= 0:
            raise _refuse_wrap(plan)
    else:
        # The margin falls as the scale grows (Delta2 and the noise grow with it): bisect on
        # the power of two, keeping the largest scale whose margin is positive.
        lo, hi = -MAX_AUTO_SCALE_LOG2, MAX_AUTO_SCALE_LOG2
        plan = _plan_at(settings, d, 2.0**lo)
        if plan.wrap_margin <= 0:
            raise _refuse_wrap(plan)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            candidate = _plan_at(settings, d, 2.0**mid)
            if candidate.wrap_margin > 0:
                lo, plan = mid, candidate
            else:
                hi = mid
    inflation = plan.l2_sensitivity / (plan.scale * settings.clip)
    if inflation > MAX_NORM_INFLATION:
        raise MechanismError(
            f"rounding would dominate the sensitivity: Delta2 = {plan.l2_sensitivity:.6g} is "
            f"{inflation:.3g}x gamma*C = {plan.scale:g} x dp.clip_norm({settings.clip:g}) for "
            f"d = {d} (padded {plan.padded_dim}); limit {MAX_NORM_INFLATION}x: raise dp.scale (or "
            "leave it 0 for automatic), aggregation.bits, or lower aggregation.max_clients"
        )
    return plan
