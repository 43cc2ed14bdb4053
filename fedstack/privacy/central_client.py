"""The client's side of `dp=central`: plain training, after the data owner's policy agrees.

Under central DP the client adds no noise: it sends its update in the clear to a server it
must trust to clip and noise it. A node whose policy requires DP therefore refuses such a
round unless it also trusts the server (`trust-server-dp=true`), and a node's noise floor
(`min-noise-multiplier`) and ε cap (`max-epsilon`) apply to the run's client-level σ and ε.
All of these are public facts of the run's config: the client recomputes them (σ from the
target ε, ε after this round: every round is a release, whether or not it was sampled), it
never reads them from the server's word.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fedstack.policy import NodePolicy, node_policy
from fedstack.privacy.central import CentralPlan, plan_from_config
from fedstack.privacy.client_accountant import client_level_epsilon
from fedstack.privacy.policy_trainer import PolicyCheckedTrainer, sgd_trainer

#: The policy's name for this DP mode.
DP_NAME = "central"


@lru_cache(maxsize=8)
def _plan(config_yaml: str) -> CentralPlan:
    # σ from a target ε is a binary search over the accountant: once per run config here.
    from fedstack.config import config_from_yaml

    return plan_from_config(config_from_yaml(config_yaml))


def check_central_policy(policy: NodePolicy, plan: CentralPlan, server_round: int) -> None:
    """PolicyRefusal if the node's policy does not accept this round of central DP."""
    epsilon = client_level_epsilon(plan.noise_multiplier, plan.sample_rate, server_round,
                                   plan.delta, plan.accountant)
    policy.check_dp(name=DP_NAME, noise_multiplier=plan.noise_multiplier, epsilon=epsilon)


def build_central_trainer(cfg: Any, context: Any, partition_id: int,
                          task: Any = None) -> PolicyCheckedTrainer:
    """The ClientApp's trainer under dp=central (client_app.local_trainer)."""
    from fedstack.config import config_to_yaml

    plan = _plan(config_to_yaml(cfg))
    return PolicyCheckedTrainer(
        sgd_trainer(cfg, partition_id, task), node_policy(context),
        lambda policy, _model, server_round: check_central_policy(policy, plan, server_round))
