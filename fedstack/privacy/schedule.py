"""The run-wide DP-SGD schedule: δ, sample rate, steps and σ that do not depend on n_k.

Why: under `aggregation=secagg` or `he` the server must never learn a client's number of
training examples n_k. The per-client DP parameters of `dp=local` are each a function of
n_k (δ = 1/(10·n_k), q = 1/⌈n_k/B⌉, steps = ⌈n_k/B⌉ per epoch, σ derived from q), and the ε
and δ every reply carries in the clear give them away: a server recovered every n_k from δ
alone. Under these aggregations (or whenever `dp.sample_rate` is set) every client uses one
*public* schedule instead, computed from the run config only:

- δ: `dp.delta`, else 1/(10·bound) for the run's public bound on n_k (the smaller of
  `max_num_examples` and `aggregation.max_weight`), so δ < 1/n_k for every admitted client;
- q: `dp.sample_rate`, the same for every client (the expected batch q·n_k stays on the node);
- steps: ⌈1/q⌉ per local epoch, `task.local_epochs` epochs per round;
- σ: `dp.noise_multiplier`, or derived once from `dp.target_epsilon` for this schedule.

Then a client's ε after m trained rounds is the same public function of the config for every
client (`epsilon_after`), so the server recomputes it and its ledger refuses a reported ε or
δ that is off the schedule (`check_reply`). Nothing here imports Opacus at module level: the
validation runs with every message's config.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

#: Aggregations under which the server must not learn n_k: the schedule is public there.
HIDING_AGGREGATIONS = ("secagg", "he")
#: δ = 1 / (DELTA_DIVISOR · bound) when `dp.delta` is null (as the per-client default).
DELTA_DIVISOR = 10
#: 1/q is taken as a whole number when it is this close to one (float round-off of 1/k).
WHOLE_TOLERANCE = 1e-9
#: Relative tolerance between a reported ε (or δ) and the public schedule's: both come from
#: the same computation on the same numbers, so any difference is a bad reply.
SCHEDULE_TOLERANCE = 1e-9
#: A client cannot have trained more rounds than this many times the run's rounds so far
#: (each crash-and-resume re-runs at most one round): bounds the ledger's search.
ROUNDS_SLACK = 2


def _config_error(message: str) -> Exception:
    # Imported lazily: the privacy package must import without the foundation's config.
    from fedstack.config import ConfigError

    return ConfigError(message)


def weight_bound(cfg: Any) -> tuple[int, str]:
    """(the run's public bound on n_k, the key that sets it).

    The smaller of `max_num_examples` (the server rejects larger claims) and a positive
    `aggregation.max_weight` (secagg's and HE's encoders refuse larger weights), as
    `fedstack.preflight.weight_limit` checks every partition against it.
    """
    limit, key = int(cfg.max_num_examples), "max_num_examples"
    aggregation = cfg.get("aggregation") or {}
    agg_weight = int(aggregation.get("max_weight", 0) or 0)
    if 0 < agg_weight < limit:
        limit, key = agg_weight, "aggregation.max_weight"
    return limit, key


def steps_per_epoch(sample_rate: float) -> int:
    """⌈1/q⌉ Poisson steps make one expected pass over the data (1/q when it is whole)."""
    inverse = 1.0 / sample_rate
    nearest = round(inverse)
    if abs(inverse - nearest) <= WHOLE_TOLERANCE * inverse:
        return max(1, int(nearest))
    return math.ceil(inverse)


def is_public(cfg: Any) -> bool:
    """Whether this run's DP-SGD uses the public schedule."""
    if str(cfg.dp.name) != "local":
        return False
    return (str(cfg.aggregation.name) in HIDING_AGGREGATIONS
            or cfg.dp.get("sample_rate") is not None)


def validate_public_schedule(cfg: Any) -> None:
    """Start-up checks of the public schedule's keys (ConfigError naming the key).

    Cheap (no Opacus): it runs with every message's config on every client.
    """
    if str(cfg.dp.name) != "local":
        return
    dp = cfg.dp
    rate = dp.get("sample_rate")
    aggregation = str(cfg.aggregation.name)
    if rate is not None and not (isinstance(rate, (int, float)) and 0.0 < float(rate) <= 1.0):
        raise _config_error(f"dp.sample_rate={rate!r} must be in (0, 1]")
    if not is_public(cfg):
        return
    if rate is None:
        raise _config_error(
            f"dp=local with aggregation={aggregation} needs a public dp.sample_rate (e.g. "
            "dp.sample_rate=0.1): a per-client rate B/n_k, and the delta and epsilon derived "
            "from it, would tell the server each client's number of examples n_k, which "
            f"aggregation={aggregation} hides. Every client then samples each example with "
            "probability q per step, ceil(1/q) steps per local epoch")
    if str(dp.grad_sample_mode) != "bk":
        steps = steps_per_epoch(float(rate))
        if 1.0 / steps != float(rate):
            raise _config_error(
                f"dp.sample_rate={rate} with dp.grad_sample_mode={dp.grad_sample_mode}: "
                "Opacus's modes account q = 1/(steps per epoch), so 1/dp.sample_rate must be "
                f"a whole number (e.g. dp.sample_rate={1.0 / steps:.6g}); or use "
                "dp.grad_sample_mode=bk")
    bound, key = weight_bound(cfg)
    delta = dp.get("delta")
    if delta is not None and not float(delta) < 1.0 / bound:
        raise _config_error(
            f"dp.delta={delta:g} is not below 1/n_k for a client at the run's public bound "
            f"on n_k ({key}={bound}: 1/n = {1.0 / bound:.3g}), and under the public schedule "
            "every client uses the same delta; lower dp.delta or leave it null "
            f"(1/({DELTA_DIVISOR}*{key}) = {1.0 / (DELTA_DIVISOR * bound):.3g})")


@dataclass(frozen=True)
class PublicSchedule:
    """DP-SGD parameters shared by every client of a run, all computed from its config."""

    accountant: str
    delta: float
    sample_rate: float
    steps_per_epoch: int
    local_epochs: int
    planned_rounds: int
    #: `dp.noise_multiplier` (None: derived from `target_epsilon`, see `noise_multiplier`).
    fixed_noise_multiplier: float | None
    target_epsilon: float | None
    #: The bound on n_k that δ protects, and the key that sets it (for messages and reports).
    weight_bound: int
    weight_bound_key: str

    @property
    def steps_per_round(self) -> int:
        return self.local_epochs * self.steps_per_epoch

    def noise_multiplier(self) -> float:
        """σ: given, or the smallest (to Opacus's tolerance) that keeps ε after the planned
        rounds within `target_epsilon` (the same search on every party, hence equal)."""
        if self.fixed_noise_multiplier is not None:
            return float(self.fixed_noise_multiplier)
        assert self.target_epsilon is not None  # validated: exactly one is set
        from fedstack.privacy.calibration import derive_noise_multiplier

        return derive_noise_multiplier(
            target_epsilon=float(self.target_epsilon), delta=self.delta,
            sample_rate=self.sample_rate,
            total_steps=self.planned_rounds * self.steps_per_round,
            accountant=self.accountant,
        )

    def epsilon_after(self, rounds: int, noise_multiplier: float | None = None) -> float:
        """ε of any client after `rounds` trained rounds of this schedule (0 for none)."""
        sigma = self.noise_multiplier() if noise_multiplier is None else noise_multiplier
        return _epsilon(self.accountant, sigma, self.sample_rate,
                        rounds * self.steps_per_round, self.delta)

    def rounds_for(self, epsilon: float, max_rounds: int,
                   noise_multiplier: float | None = None) -> int | None:
        """The number of trained rounds m <= max_rounds whose ε is `epsilon`, else None.

        ε grows with m, so a binary search finds the only candidate.
        """
        sigma = self.noise_multiplier() if noise_multiplier is None else noise_multiplier
        lo, hi = 0, max(0, int(max_rounds))
        while lo < hi:
            mid = (lo + hi) // 2
            if self.epsilon_after(mid, sigma) < epsilon * (1 - SCHEDULE_TOLERANCE):
                lo = mid + 1
            else:
                hi = mid
        return lo if _close(self.epsilon_after(lo, sigma), epsilon) else None

    def check_reply(self, epsilon: float | None, delta: float | None, *,
                    max_rounds: int, state: Any = None) -> str | None:
        """Why a reply's ε / δ / accountant state is off this schedule (None: it is on it)."""
        if delta is not None and not _close(delta, self.delta):
            return (f"reported delta {delta:.6g} is not the run's public delta "
                    f"{self.delta:.6g}")
        sigma = self.noise_multiplier()
        if state is not None:
            if state.delta is not None and not _close(state.delta, self.delta):
                return (f"accountant record's delta {state.delta:.6g} is not the run's public "
                        f"delta {self.delta:.6g}")
            off = [entry for entry in state.history
                   if not (_close(entry[0], sigma) and _close(entry[1], self.sample_rate))]
            if off:
                return (f"accountant record holds steps at (sigma, q) = ({off[0][0]:.6g}, "
                        f"{off[0][1]:.6g}), not the public schedule's ({sigma:.6g}, "
                        f"{self.sample_rate:.6g})")
            if state.steps % self.steps_per_round:
                return (f"accountant record has {state.steps} steps, not a whole number of "
                        f"rounds of {self.steps_per_round}")
        if epsilon is not None and self.rounds_for(epsilon, max_rounds, sigma) is None:
            return (f"reported epsilon {epsilon:.6g} is not the public schedule's epsilon "
                    f"after any number of rounds up to {max_rounds}")
        return None

    def to_json(self) -> dict[str, Any]:
        """The schedule as recorded in privacy.json (σ resolved)."""
        return {**asdict(self), "noise_multiplier": self.noise_multiplier(),
                "steps_per_round": self.steps_per_round}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PublicSchedule:
        """The schedule recorded in privacy.json: a resumed run keeps its original σ, δ, q
        (its clients fixed them at their first round)."""
        fields = {name: data[name] for name in cls.__dataclass_fields__}
        fields["fixed_noise_multiplier"] = float(data["noise_multiplier"])
        return cls(**fields)


def public_schedule(cfg: Any) -> PublicSchedule | None:
    """The run's public schedule (None: per-client parameters, `dp.sample_rate` unset under
    fedavg, or no DP-SGD). Assumes `validate_public_schedule` passed."""
    if not is_public(cfg):
        return None
    dp = cfg.dp
    bound, key = weight_bound(cfg)
    delta = dp.get("delta")
    rate = float(dp.sample_rate)
    return PublicSchedule(
        accountant=str(dp.accountant),
        delta=float(delta) if delta is not None else 1.0 / (DELTA_DIVISOR * bound),
        sample_rate=rate,
        steps_per_epoch=steps_per_epoch(rate),
        local_epochs=int(cfg.task.local_epochs),
        planned_rounds=int(cfg.num_rounds),
        fixed_noise_multiplier=(None if dp.noise_multiplier is None
                                else float(dp.noise_multiplier)),
        target_epsilon=None if dp.target_epsilon is None else float(dp.target_epsilon),
        weight_bound=bound,
        weight_bound_key=key,
    )


@lru_cache(maxsize=1024)
def _epsilon(accountant: str, sigma: float, sample_rate: float, steps: int,
             delta: float) -> float:
    """ε of one merged history entry, by the very code a client's accountant uses."""
    if steps <= 0:
        return 0.0
    from fedstack.privacy.accountant_state import PrivacyState

    return PrivacyState(accountant, ((sigma, sample_rate, steps),)).epsilon(delta)


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=SCHEDULE_TOLERANCE, abs_tol=0.0)
