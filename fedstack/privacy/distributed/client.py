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

from fedstack.policy import node_policy
from fedstack.privacy.policy_trainer import PolicyCheckedTrainer, sgd_trainer

from .codec import DistributedCodec


@lru_cache(maxsize=8)
def _codec(config_yaml: str) -> DistributedCodec:
    # The plan's calibration is a search over the accountant: once per run config here.
    from fedstack.config import config_from_yaml

    return DistributedCodec.from_config(config_from_yaml(config_yaml))


def model_size(model: Any) -> int:
    """Values in the model's state dict: the length of the flattened update the codec sees."""
    return int(sum(v.numel() for v in model.state_dict().values()))


def build_distributed_trainer(cfg: Any, context: Any, partition_id: int,
                              task: Any = None) -> PolicyCheckedTrainer:
    """The ClientApp's trainer under dp=distributed (client_app.local_trainer)."""
    from fedstack.config import config_to_yaml

    codec = _codec(config_to_yaml(cfg))
    return PolicyCheckedTrainer(
        sgd_trainer(cfg, partition_id, task), node_policy(context),
        lambda policy, model, server_round: policy.check_dp(
            **codec.policy_terms(model_size(model), server_round)))
