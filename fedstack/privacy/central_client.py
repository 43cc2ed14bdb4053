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

from fedstack.log import get_logger
from fedstack.policy import NodePolicy, PolicyRefusal, node_policy
from fedstack.privacy.central import CentralPlan, plan_from_config
from fedstack.privacy.client_accountant import client_level_epsilon
from fedstack.task.training import SGDTrainer, TrainOutcome

log = get_logger(__name__)

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


class CentralClientTrainer:
    """SGD on the client; declines (for good, with a fixed reason) a round its policy refuses."""

    decline_permanent = True

    def __init__(self, sgd: SGDTrainer, policy: NodePolicy, plan: CentralPlan) -> None:
        self.sgd = sgd
        self.policy = policy
        self.plan = plan

    def reply_records(self) -> dict[str, dict[str, Any]]:
        return {}

    def train(self, model: Any, data: Any, server_round: int) -> TrainOutcome:
        try:
            check_central_policy(self.policy, self.plan, server_round)
        except PolicyRefusal as refusal:
            log.warning("round %s refused by this node's policy (%s): %s", server_round,
                        refusal.code, refusal.detail)
            return TrainOutcome(num_examples=0, train_loss=float("nan"), metrics={},
                                declined=refusal.reason)
        return self.sgd.train(model, data, server_round)


def build_central_trainer(cfg: Any, context: Any, partition_id: int,
                          task: Any = None) -> CentralClientTrainer:
    """The ClientApp's trainer under dp=central (client_app.local_trainer)."""
    from fedstack.config import config_to_yaml

    sgd = SGDTrainer(cfg.task, int(cfg.seed), partition_id,
                     loss=task.train_loss() if task is not None else None)
    return CentralClientTrainer(sgd, node_policy(context), _plan(config_to_yaml(cfg)))
