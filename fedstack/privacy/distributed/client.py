"""The client's side of ``dp=distributed``: plain training, after the data owner's policy agrees.

The noise is not added here but by the secure-aggregation input codec (DistributedCodec),
inside the masked input: the secagg mod encodes the delta of the model this trainer returns.
What this layer adds is the policy check: a node with a noise floor (`min-noise-multiplier`)
or an epsilon cap (`max-epsilon`) refuses a round whose client-level noise or epsilon breaks
it. Both follow from the run config alone (the client recomputes the plan for the model it
holds; it never reads them from the server's word). ``require-dp`` is satisfied: the
update never leaves the node without its noise share.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from fedstack.log import get_logger
from fedstack.policy import NodePolicy, PolicyRefusal, node_policy
from fedstack.task.training import SGDTrainer, TrainOutcome

from .codec import DistributedCodec

log = get_logger(__name__)


@lru_cache(maxsize=8)
def _codec(config_yaml: str) -> DistributedCodec:
    # The plan's calibration is a search over the accountant: once per run config here.
    from fedstack.config import config_from_yaml

    return DistributedCodec.from_config(config_from_yaml(config_yaml))


def model_size(model: Any) -> int:
    """Values in the model's state dict: the length of the flattened update the codec sees."""
    return int(sum(v.numel() for v in model.state_dict().values()))


class DistributedClientTrainer:
    """SGD on the client; declines (for good, with a fixed reason) a round its policy refuses."""

    decline_permanent = True

    def __init__(self, sgd: SGDTrainer, policy: NodePolicy, codec: DistributedCodec) -> None:
        self.sgd = sgd
        self.policy = policy
        self.codec = codec

    def reply_records(self) -> dict[str, dict[str, Any]]:
        return {}

    def train(self, model: Any, data: Any, server_round: int) -> TrainOutcome:
        try:
            self.policy.check_dp(**self.codec.policy_terms(model_size(model), server_round))
        except PolicyRefusal as refusal:
            log.warning("round %s refused by this node's policy (%s): %s", server_round,
                        refusal.code, refusal.detail)
            return TrainOutcome(num_examples=0, train_loss=float("nan"), metrics={},
                                declined=refusal.reason)
        return self.sgd.train(model, data, server_round)


def build_distributed_trainer(cfg: Any, context: Any, partition_id: int,
                              task: Any = None) -> DistributedClientTrainer:
    """The ClientApp's trainer under dp=distributed (client_app.local_trainer)."""
    from fedstack.config import config_to_yaml

    sgd = SGDTrainer(cfg.task, int(cfg.seed), partition_id,
                     loss=task.train_loss() if task is not None else None)
    return DistributedClientTrainer(sgd, node_policy(context), _codec(config_to_yaml(cfg)))
