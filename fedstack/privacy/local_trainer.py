"""Client-side glue to Flower: privacy state in `context.state` and on the node's disk.

Why here and not in the engine: the engine stays free of Flower so it can be tested and
benchmarked alone; this module is the one place that knows where a node keeps its state.
`context.state` survives across rounds in simulation and in deployment (where each message
runs in a fresh process), but not across Flower runs: a run resumed after a server crash is a
new Flower run with empty node state. So the accountant's history is also written to the
data owner's own disk, keyed by the run's id (assigned by the server at creation and kept on
resume), and the longer of the two histories wins. Last, the server's ledger sends the state
it recorded for this client with every train message: a node whose own copies are missing or
older continues from the ledger's (and logs it), so a restart can never reset a client's ε;
every reply carries the state back for the ledger to check and record.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedstack.log import get_logger
from fedstack.policy import node_policy
from fedstack.privacy.accountant_state import PrivacyState
from fedstack.privacy.ledger_sync import (
    ACCOUNTANT_RECORD,
    LEDGER_RECORD,
    LedgerView,
    parse_server_record,
    reconcile,
)
from fedstack.privacy.schedule import public_schedule
from fedstack.privacy.settings import LocalDPSettings
from fedstack.privacy.trainer import DPTrainer
from fedstack.task.training import TrainOutcome

#: ConfigRecord key of the privacy state in a node's `context.state`.
PRIVACY_STATE_KEY = "fedstack.dp.state"
#: Node-config key: directory on the data owner's machine where privacy state persists.
NODE_STATE_DIR_KEY = "dp-state-dir"
#: Environment fallback for that directory (then ~/.fedstack/dp-state).
STATE_DIR_ENV = "FEDSTACK_DP_STATE_DIR"
DEFAULT_STATE_DIR = Path("~/.fedstack/dp-state")

log = get_logger(__name__)


def load_privacy_state(context: Any) -> PrivacyState | None:
    record = context.state.config_records.get(PRIVACY_STATE_KEY)
    return None if record is None else PrivacyState.from_record(dict(record))


def save_privacy_state(context: Any, state: PrivacyState) -> None:
    from flwr.app import ConfigRecord

    context.state.config_records[PRIVACY_STATE_KEY] = ConfigRecord(state.to_record())


def state_file(cfg: Any, context: Any) -> Path | None:
    """`<state dir>/<run id>/partition-<id>.json`, or None for a config without a run id."""
    if not cfg.run_id:
        return None
    node_config = getattr(context, "node_config", None) or {}
    base = (node_config.get(NODE_STATE_DIR_KEY) or os.environ.get(STATE_DIR_ENV)
            or DEFAULT_STATE_DIR)
    who = node_config.get("partition-id", getattr(context, "node_id", "unknown"))
    return Path(str(base)).expanduser() / str(cfg.run_id) / f"partition-{who}.json"


def load_disk_state(path: Path | None) -> PrivacyState | None:
    if path is None or not path.exists():
        return None
    return PrivacyState.from_record(json.loads(path.read_text()))


def save_disk_state(path: Path | None, state: PrivacyState) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_record()))
    os.replace(tmp, path)


def longer_history(*states: PrivacyState | None) -> PrivacyState | None:
    """The state that accounts for the most steps (the honest one after a restart)."""
    present = [s for s in states if s is not None]
    return max(present, key=lambda s: s.steps) if present else None


class ContextDPTrainer:
    """A `LocalTrainer` that loads and saves its privacy state in a Flower context.

    Its state is the node's own (context or disk, the longer) reconciled with the server
    ledger's record of this client (`ledger_sync.reconcile`): never below what the ledger
    holds. Where neither can be trusted it declines the round instead of training.
    """

    def __init__(self, cfg: Any, context: Any, generator: torch.Generator | None = None, *,
                 client: str | None = None, ledger: LedgerView | None = None,
                 per_example_loss: Any = None) -> None:
        from fedstack.config import settings_of

        settings = settings_of(cfg.dp)
        if not isinstance(settings, LocalDPSettings):
            raise TypeError(f"dp={cfg.dp.name!r} is not local DP")
        self.context = context
        self.state_path = state_file(cfg, context)
        own = longer_history(load_privacy_state(context), load_disk_state(self.state_path))
        resolved = reconcile(own, ledger, client if client is not None else "")
        if resolved.note is not None:
            log.warning("privacy state: %s", resolved.note)
        if resolved.changed and resolved.state is not None:
            save_privacy_state(context, resolved.state)
            save_disk_state(self.state_path, resolved.state)
        #: Why this round must be declined without training (None: it may train).
        self.refusal = resolved.decline
        #: Whether a decline of this round holds for the rest of the run.
        self.decline_permanent = resolved.permanent if resolved.decline is not None else True
        policy = node_policy(context)
        self.trainer = DPTrainer(
            cfg.task,
            settings,
            planned_rounds=int(cfg.num_rounds),
            state=resolved.state,
            node_max_epsilon=policy.max_epsilon,
            generator=generator,
            per_example_loss=per_example_loss,
            schedule=public_schedule(cfg),
            policy=policy,
        )

    def train(self, model: nn.Module, data: TensorDataset, server_round: int) -> TrainOutcome:
        if self.refusal is not None:
            log.warning("round %s declined: %s", server_round, self.refusal)
            return TrainOutcome(num_examples=0, train_loss=math.nan, metrics={},
                                declined=self.refusal)
        outcome = self.trainer.train(model, data, server_round)
        if self.trainer.state is not None:
            save_privacy_state(self.context, self.trainer.state)
            save_disk_state(self.state_path, self.trainer.state)
        return outcome

    def reply_records(self) -> dict[str, dict[str, Any]]:
        """The accountant state for the reply (`dp-accountant`), for the ledger to check.

        None when the round was refused: the state then is not one the client stands by.
        """
        state = self.trainer.state
        if self.refusal is not None or state is None:
            return {}
        return {ACCOUNTANT_RECORD: state.to_record()}


def build_dp_trainer(cfg: Any, context: Any, partition_id: int, data: Any,
                     content: Any = None, per_example_loss: Any = None) -> ContextDPTrainer:
    """The ClientApp's hook for `dp=local` (fedstack.client_app.local_trainer).

    `content` is the train message's RecordDict (it may carry the ledger's `dp-ledger`
    record); `partition_id` names this client to the ledger. `data` is not needed: the
    sample rate comes from the training set handed to `train`, and noise/sampling never
    derive from ids.
    """
    del data
    record = None
    if content is not None and LEDGER_RECORD in content.config_records:
        record = dict(content.config_records[LEDGER_RECORD])
    return ContextDPTrainer(cfg, context, client=str(partition_id),
                            ledger=parse_server_record(record), per_example_loss=per_example_loss)
