"""The client's privacy budget: decide *before* training whether a round still fits.

Why before: once a noisy update has left the client its privacy cost is spent, so a check
after training would let the last round overshoot. The decision simulates the accountant
with this round's steps added and declines if ε would exceed the budget. A data owner may
tighten the run's budget on its own node (`max-epsilon` in its node config or policy file,
read through `fedstack.policy.NodePolicy`), never loosen it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedstack.log import get_logger
from fedstack.privacy.accountant_state import PrivacyState

log = get_logger(__name__)

#: Start of the decline reason a client gives when its budget is spent; the server's
#: ledger counts such clients as exhausted (other declines are not).
BUDGET_EXHAUSTED_PREFIX = "privacy budget exhausted"


@dataclass(frozen=True)
class BudgetDecision:
    """Whether the next round may train, with the numbers behind the decision."""

    allowed: bool
    epsilon_spent: float
    epsilon_after: float
    max_epsilon: float | None
    reason: str | None = None


def effective_budget(run_budget: float | None, node_budget: float | None) -> float | None:
    """The tighter of the run's and the node's budget; a looser node value is ignored."""
    if node_budget is None:
        return run_budget
    if run_budget is not None and node_budget > run_budget:
        log.warning(
            "node config max-epsilon=%s is looser than the run's budget %s: keeping the run's",
            node_budget, run_budget,
        )
        return run_budget
    return node_budget


def check_round(
    state: PrivacyState,
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    max_epsilon: float | None,
) -> BudgetDecision:
    """Would training `steps` more steps keep ε within `max_epsilon`?"""
    spent = state.epsilon(delta)
    after = state.with_steps(noise_multiplier, sample_rate, steps).epsilon(delta)
    if max_epsilon is not None and after > max_epsilon:
        return BudgetDecision(
            allowed=False,
            epsilon_spent=spent,
            epsilon_after=after,
            max_epsilon=max_epsilon,
            reason=(
                f"{BUDGET_EXHAUSTED_PREFIX}: epsilon would reach {after:.4g} after this round "
                f"(spent {spent:.4g}, budget {max_epsilon:.4g}, delta {delta:.3g})"
            ),
        )
    return BudgetDecision(True, spent, after, max_epsilon)
