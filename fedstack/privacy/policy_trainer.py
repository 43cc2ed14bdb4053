"""Plain SGD behind the data owner's DP policy: the client trainer of client-level DP layers.

Under `dp=central` and `dp=distributed` the client itself adds no noise to its training (the
server, or the secure-aggregation codec, does), so its trainer is plain SGD. What it adds is
the policy check before every round: the layer recomputes its public σ and ε for the round
from the run config and the node's `NodePolicy` refuses a round that breaks its floor or cap.
A refusal is a permanent decline with a fixed reason; the details go to the node's log.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedstack.log import get_logger
from fedstack.policy import NodePolicy, PolicyRefusal
from fedstack.task.training import SGDTrainer, TrainOutcome

log = get_logger(__name__)

#: Raises PolicyRefusal if the policy does not accept this round (policy, model, round).
PolicyCheck = Callable[[NodePolicy, Any, int], None]


class PolicyCheckedTrainer:
    """SGD on the client; declines (for good, with a fixed reason) a round its policy refuses."""

    decline_permanent = True

    def __init__(self, sgd: SGDTrainer, policy: NodePolicy, check: PolicyCheck) -> None:
        self.sgd = sgd
        self.policy = policy
        self.check = check

    def reply_records(self) -> dict[str, dict[str, Any]]:
        return {}

    def train(self, model: Any, data: Any, server_round: int) -> TrainOutcome:
        try:
            self.check(self.policy, model, server_round)
        except PolicyRefusal as refusal:
            log.warning("round %s refused by this node's policy (%s): %s", server_round,
                        refusal.code, refusal.detail)
            return TrainOutcome(num_examples=0, train_loss=float("nan"), metrics={},
                                declined=refusal.reason)
        return self.sgd.train(model, data, server_round)


def sgd_trainer(cfg: Any, partition_id: int, task: Any = None) -> SGDTrainer:
    """The plain trainer these layers run (the task's own loss when it has one)."""
    return SGDTrainer(cfg.task, int(cfg.seed), partition_id,
                      loss=task.train_loss() if task is not None else None)
