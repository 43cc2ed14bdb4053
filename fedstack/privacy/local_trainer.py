"""Client-side glue to Flower: privacy state in `context.state`, budget from node config.

Why here and not in the engine: the engine stays free of Flower so it can be tested and
benchmarked alone; this module is the one place that knows where Flower keeps per-node
state. `context.state` survives across rounds in simulation and in deployment (where each
message runs in a fresh process), so the accountant's history is stored there as a
ConfigRecord after every trained round, and read back before the next.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedstack.privacy.accountant_state import PrivacyState
from fedstack.privacy.budget import parse_node_budget
from fedstack.privacy.settings import NODE_MAX_EPSILON_KEY, LocalDPSettings
from fedstack.privacy.trainer import DPTrainer
from fedstack.task.training import TrainOutcome

#: ConfigRecord key of the privacy state in a node's `context.state`.
PRIVACY_STATE_KEY = "fedstack.dp.state"


def load_privacy_state(context: Any) -> PrivacyState | None:
    record = context.state.config_records.get(PRIVACY_STATE_KEY)
    return None if record is None else PrivacyState.from_record(dict(record))


def save_privacy_state(context: Any, state: PrivacyState) -> None:
    from flwr.app import ConfigRecord

    context.state.config_records[PRIVACY_STATE_KEY] = ConfigRecord(state.to_record())


def node_max_epsilon(context: Any) -> float | None:
    """The data owner's own budget from its node config (`max-epsilon`), if any."""
    node_config = getattr(context, "node_config", None) or {}
    return parse_node_budget(node_config.get(NODE_MAX_EPSILON_KEY))


class ContextDPTrainer:
    """A `LocalTrainer` that loads and saves its privacy state in a Flower context."""

    def __init__(self, cfg: Any, context: Any, generator: torch.Generator | None = None) -> None:
        from fedstack.config import settings_of

        settings = settings_of(cfg.dp)
        if not isinstance(settings, LocalDPSettings):
            raise TypeError(f"dp={cfg.dp.name!r} is not local DP")
        self.context = context
        self.trainer = DPTrainer(
            cfg.task,
            settings,
            planned_rounds=int(cfg.num_rounds),
            state=load_privacy_state(context),
            node_max_epsilon=node_max_epsilon(context),
            generator=generator,
        )

    def train(self, model: nn.Module, data: TensorDataset, server_round: int) -> TrainOutcome:
        outcome = self.trainer.train(model, data, server_round)
        if self.trainer.state is not None:
            save_privacy_state(self.context, self.trainer.state)
        return outcome


def build_dp_trainer(cfg: Any, context: Any, partition_id: int, data: Any) -> ContextDPTrainer:
    """The ClientApp's hook for `dp=local` (fedstack.client_app.local_trainer).

    `partition_id` and `data` are not needed to build the trainer: the sample rate comes
    from the training set handed to `train`, and noise/sampling never derive from ids.
    """
    del partition_id, data
    return ContextDPTrainer(cfg, context)
