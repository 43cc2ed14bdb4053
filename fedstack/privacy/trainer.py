"""`DPTrainer`: the task's `LocalTrainer` with DP-SGD, for `dp=local`.

Why a trainer and not a mod: DP must happen *inside* local training (per-example clipping
and noise at every step), while secure aggregation and HE wrap the finished update. So DP
plugs into the seam the task already has (`fedstack.task.training.LocalTrainer`) and stacks
under any aggregation mod unchanged. Declining is a normal outcome (`declined=reason`), not
an exception, so the round goes on with the other clients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

from fedstack.log import get_logger
from fedstack.policy import NodePolicy, PolicyRefusal
from fedstack.privacy.accountant_state import PrivacyState
from fedstack.privacy.budget import BUDGET_EXHAUSTED_PREFIX
from fedstack.privacy.engine import DPSetupError, LocalDP, PerExampleLoss
from fedstack.privacy.schedule import PublicSchedule
from fedstack.privacy.settings import LocalDPSettings
from fedstack.task.training import TrainOutcome, make_optimizer

log = get_logger(__name__)

#: Decline reason of a client DP cannot run on (e.g. δ not below 1/n_k). Under the public
#: schedule it is all the server gets: the details name n_k, so they stay in the node's log.
DP_SETUP_DECLINE = "DP cannot run on this client"


class DPTrainer:
    """DP-SGD training of one client; `state` carries the accountant between rounds."""

    def __init__(
        self,
        task: Any,
        dp: LocalDPSettings,
        *,
        planned_rounds: int,
        state: PrivacyState | None = None,
        node_max_epsilon: float | None = None,
        generator: torch.Generator | None = None,
        per_example_loss: PerExampleLoss | None = None,
        schedule: PublicSchedule | None = None,
        policy: NodePolicy | None = None,
    ) -> None:
        self.task = task
        #: The run's public schedule (secagg/he), or None for per-client parameters.
        self.schedule = schedule
        #: The data owner's policy: its noise floor refuses a round before any step.
        self.policy = policy
        #: The task's loss (None: cross-entropy), clipped per example like the default.
        self.per_example_loss = per_example_loss
        self.dp = dp
        self.planned_rounds = int(planned_rounds)
        self.state = state
        self.node_max_epsilon = node_max_epsilon
        self.generator = generator

    def session(self, num_examples: int) -> LocalDP:
        return LocalDP(
            self.dp,
            num_examples=num_examples,
            batch_size=int(self.task.batch_size),
            local_epochs=int(self.task.local_epochs),
            planned_rounds=self.planned_rounds,
            state=self.state,
            node_max_epsilon=self.node_max_epsilon,
            generator=self.generator,
            schedule=self.schedule,
        )

    def train(self, model: nn.Module, data: TensorDataset, server_round: int) -> TrainOutcome:
        try:
            session = self.session(len(data))
        except DPSetupError as exc:
            # A setting this client can never satisfy: decline (for good), do not crash.
            log.warning("round %s declined: %s", server_round, exc)
            return TrainOutcome(num_examples=0, train_loss=float("nan"), metrics={},
                                declined=(DP_SETUP_DECLINE if self.schedule is not None
                                          else f"{DP_SETUP_DECLINE}: {exc}"))
        if self.policy is not None:
            try:
                self.policy.check_dp(name=self.dp.name, noise_multiplier=session.noise_multiplier,
                                     epsilon=None)
            except PolicyRefusal as refusal:
                # The floor is the data owner's: a fixed reason code, the numbers in its log.
                log.warning("round %s refused by this node's policy (%s): %s", server_round,
                            refusal.code, refusal.detail)
                return TrainOutcome(num_examples=0, train_loss=float("nan"), metrics={},
                                    declined=refusal.reason)
        decision = session.check_budget()
        if not decision.allowed:
            log.info("round %s declined: %s", server_round, decision.reason)
            self.state = session.state
            # Under the public schedule the server gets the fixed prefix only (the numbers
            # are in this node's log).
            return TrainOutcome(
                num_examples=0,
                train_loss=float("nan"),
                metrics=_declined_metrics(session, decision.epsilon_spent),
                declined=(BUDGET_EXHAUSTED_PREFIX if self.schedule is not None
                          else decision.reason),
            )
        # The model must keep its architecture (its arrays go back to the server as they
        # are), so no fix is allowed here and the optimizer is the task's, over its params.
        private = session.make_private(
            model, lambda _params: make_optimizer(model, self.task), data,
            allow_model_fix=False, per_example_loss=self.per_example_loss,
        )
        loss_sum, seen = 0.0, 0
        try:
            for _ in range(session.local_epochs):
                epoch_loss, epoch_seen = private.train_epoch()
                loss_sum += epoch_loss
                seen += epoch_seen
        finally:
            private.close()
        metrics = session.end_round(private, server_round)
        self.state = session.state
        log.info(
            "round %s: DP-SGD %d steps (sigma=%.4g, q=%.4g), epsilon=%.4g delta=%.3g",
            server_round, private.steps_taken, session.noise_multiplier,
            session.plan.sample_rate, metrics["epsilon"], metrics["delta"],
        )
        return TrainOutcome(
            num_examples=len(data),
            train_loss=loss_sum / seen if seen else float("nan"),
            metrics=metrics,
        )


def _declined_metrics(session: LocalDP, spent: float) -> dict[str, float]:
    metrics = {"epsilon": spent, "delta": session.delta}
    if session.max_epsilon is not None and math.isfinite(session.max_epsilon):
        metrics["epsilon-budget"] = session.max_epsilon
    return metrics
