"""``dp=distributed`` on the server: secure aggregation with the DistributedCodec, plus the
client-level accountant and the budget.

Everything about masking and unmasking is :class:`SecAggFedAvg`'s; the clients' input codec
(``params.input``) is already the :class:`DistributedCodec` (``codec_for`` plugs it in).
This layer adds what only the server can do:

* at the first round, the plan for the real model size (the wrap and norm checks with the
  true d -- a bad setting stops the run here with the keys named);
* per round, the server-side codec context (public seed, round, |U1|, the global model),
  so the codec decodes the noisy mean delta and returns the new model;
* the dropout line: fewer than n_min survivors and the round aborts before any unmask
  request goes out (:mod:`.guard`);
* the accounting: a round counts as one Skellam release exactly when its sum was unmasked
  (even if the sum is then refused by ``check_bounds``: the server has seen it); a round that
  aborts before unmasking releases nothing;
* the budget: before a round that would take epsilon above ``dp.max_epsilon`` (else the
  target) the run stops, as under dp=central.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedstack.config import ConfigError, settings_of
from fedstack.log import logger as log
from fedstack.privacy.client_accountant import ClientLevelRecord
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.secagg.input_codec import CodecContext
from fedstack.strategies.secagg.strategy import SecAggFedAvg

from .codec import DistributedCodec
from .guard import guard_unmasking
from .ledger_record import empty_record
from .mechanism import MechanismError
from .run_config import run_delta
from .server_context import round_context

#: Key of the client-level record in privacy.json (as dp=central's).
LEDGER_RECORD_KEY = "client_level"
LEDGER_FILE = "privacy.json"
#: Relative slack when comparing epsilon with the budget (both from the same computation).
BUDGET_SLACK = 1e-9
#: Plan details that must match a resumed run's record.
PLAN_KEYS = ("variance", "l2_sensitivity", "l1_sensitivity")


@dataclasses.dataclass(frozen=True)
class RoundCodec:
    """The run's DistributedCodec bound to one round's server-side context (decode needs it)."""

    codec: DistributedCodec
    context: CodecContext

    def __getattr__(self, name: str) -> Any:
        return getattr(self.codec, name)

    @property
    def bits(self) -> int:
        return self.codec.bits

    @property
    def max_clients(self) -> int:
        return self.codec.max_clients

    @property
    def dtype(self) -> np.dtype:
        return self.codec.dtype

    def words(self, d: int) -> int:
        return self.codec.words(d)

    def encode(self, values: np.ndarray, weight: int, context: Any) -> np.ndarray:
        return self.codec.encode(values, weight, context)

    def check_bounds(self, ring_sum: np.ndarray, survivors: int) -> None:
        self.codec.check_bounds(ring_sum, survivors)

    def decode(
        self, ring_sum: np.ndarray, survivors: int, context: Any = None
    ) -> tuple[np.ndarray, int]:
        return self.codec.decode(ring_sum, survivors, context or self.context)


def model_size(cfg: Any) -> int:
    """Values in the task's model (all of its state dict, as the clients flatten it)."""
    from fedstack.task.plugin import load_task, task_context

    model = load_task(cfg.task).build_model(task_context(cfg))
    return int(sum(v.numel() for v in model.state_dict().values()))


class DistributedDPSecAgg(SecAggFedAvg):
    """SecAgg FedAvg whose clients add Skellam noise in the ring; client-level accounting."""

    visibility = (
        "only the survivors' masked inputs and, unmasked, the sum of their clipped, rotated, "
        "rounded model deltas plus the sum of their Skellam noise shares (the released noisy "
        "model) and how many clients it holds; never one client's update, example count, "
        "loss or noise share; which clients took part or dropped"
    )

    @classmethod
    def from_config(cls, cfg: Any, *, run_dir: Path, **common: Any) -> DistributedDPSecAgg:
        strategy = super().from_config(cfg, run_dir=run_dir, **common)
        assert isinstance(strategy, DistributedDPSecAgg)
        strategy.setup_dp(cfg, Path(run_dir))
        return strategy

    def setup_dp(self, cfg: Any, run_dir: Path) -> None:
        """The codec, delta and budget of the run; on resume, the record from privacy.json."""
        codec = self.params.input
        if not isinstance(codec, DistributedCodec):
            raise ConfigError(
                "dp=distributed: the secure-aggregation input codec is "
                f"{type(codec).__name__}, not DistributedCodec"
            )
        self.codec: DistributedCodec = codec
        self.delta = run_delta(cfg)
        self.budget: float | None = settings_of(cfg.dp).run_budget()
        self.record: ClientLevelRecord | None = None
        self._global_values: np.ndarray | None = None
        self._halted = False
        path = run_dir / LEDGER_FILE
        if cfg.get("resume") and path.is_file():
            saved = json.loads(path.read_text()).get(LEDGER_RECORD_KEY)
            if saved is not None:
                self.record = ClientLevelRecord.from_json(saved)
        # The start-up check with the real model size: the plan (wrap, norm bound, noise)
        # for the task's model, before any round.
        self._ensure_record(model_size(cfg))

    # ------------------------------------------------------------------ accounting
    def client_level_record(self) -> ClientLevelRecord:
        """The accountant's record so far (the privacy ledger writes it)."""
        assert self.record is not None  # set at start-up (setup_dp)
        return self.record

    def _ensure_record(self, d: int) -> ClientLevelRecord:
        try:
            plan = self.codec.plan(d)
        except MechanismError as exc:
            raise ConfigError(f"dp=distributed for this model (d={d}): {exc}") from None
        fresh = empty_record(plan, self.delta)
        if self.record is None:
            self.record = fresh
            log.info(
                "dp=distributed: Skellam, z=%.4g (noise std on the sum %.4g x C), C=%.4g, "
                "gamma=%g, d'=%d, Delta2=%.6g, slack=%g, delta=%.3g, budget epsilon=%s",
                plan.noise_multiplier, plan.effective_noise_multiplier, plan.settings.clip,
                plan.scale, plan.padded_dim, plan.l2_sensitivity, plan.settings.dropout_slack,
                self.delta, self.budget,
            )
        elif any(self.record.details.get(k) != fresh.details[k] for k in PLAN_KEYS) or (
            self.record.delta != fresh.delta
        ):
            raise ConfigError(
                "resume: privacy.json accounts another dp=distributed mechanism "
                f"({ {k: self.record.details.get(k) for k in PLAN_KEYS} }) than the run plans "
                f"({ {k: fresh.details[k] for k in PLAN_KEYS} })"
            )
        return self.record

    # ------------------------------------------------------------------ training
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        layout = ModelLayout.of(arrays)
        record = self._ensure_record(layout.size)
        self._global_values = layout.flatten(arrays)
        self._halted = False
        if self.budget is not None:
            after = record.epsilon_after_next()
            if after > self.budget * (1 + BUDGET_SLACK):
                self._halted = True
                self.stop_reason = (
                    f"client-level privacy budget: round {server_round} would take epsilon to "
                    f"{after:.4g}, above {self.budget:g} (dp.max_epsilon, else "
                    "dp.target_epsilon)"
                )
                self.round_log.aborted = self.stop_reason
                return []
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        srv = self._round
        if self._halted or srv is None or self._global_values is None:
            return super().aggregate_train(server_round, replies)
        context = round_context(srv, self.params.malicious, self._run_id, self._global_values)
        unmasked: list[int] = []
        real_unmask = srv.receive_unmask

        def receive_unmask(*args: Any, **kwargs: Any) -> np.ndarray:
            total = real_unmask(*args, **kwargs)
            unmasked.append(len(srv.survivors))  # from here on the server has the sum
            return total

        srv.receive_unmask = receive_unmask  # type: ignore[method-assign]
        guard_unmasking(srv, self.codec)
        base = self.params
        self.params = dataclasses.replace(base, input_codec=RoundCodec(self.codec, context))
        try:
            arrays, metrics = super().aggregate_train(server_round, replies)
        finally:
            self.params = base
            del srv.receive_unmask, srv.close_masked
        if unmasked:
            assert self.record is not None
            self.record = self.record.with_round(
                server_round, survivors=unmasked[0], expected=len(srv.shared),
                applied=arrays is not None,
            )
            self.round_log.extra["dp_distributed"] = {
                "epsilon": self.record.epsilon, "survivors": unmasked[0],
                "expected": len(srv.shared),
                "min_survivors": self.codec.plan(self._global_values.size).min_survivors(
                    len(srv.shared)),
                "applied": arrays is not None,
            }
        return arrays, metrics
