"""`dp=central` as a strategy layer over WeightedFedAvg: Poisson cohorts, clip, noise, account.

Why a subclass rather than Flower's `DifferentialPrivacyServerSide*` wrappers: those sample
a fixed-size cohort (so the amplification their optional accountant assumes does not hold),
divide by the realised cohort, and keep no ledger across a restart. Here the cohort is
Poisson-sampled from a secret generator with q = `fraction_train` (q = 1: everyone, and the
accountant claims no amplification), the noisy sum is divided by the expected cohort, every
round is a noisy release whatever happened in it (a round is never skipped for having few
or no replies: whether it updated the model would depend on who was sampled, outside the
accounting), and the accountant's record (`client_level_record`) is what the privacy ledger
writes to privacy.json and reloads on resume.

Everything else (reply validation, evaluation, the round loop, outputs) is WeightedFedAvg's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedstack.log import logger as log
from fedstack.privacy.central import CentralPlan, NoisyClippedSum, plan_from_config, poisson_cohort
from fedstack.privacy.client_accountant import ClientLevelRecord
from fedstack.privacy.secure_random import AesCtrRandom, RandomSource
from fedstack.strategies.fedavg import WeightedFedAvg
from fedstack.strategies.model_layout import ModelLayout

#: Key of the client-level record in privacy.json (the ledger writes it, resume reads it).
LEDGER_RECORD_KEY = "client_level"
#: The ledger's file (read on resume; the ledger module owns writing it).
LEDGER_FILE = "privacy.json"
#: Relative slack when comparing ε with the budget (both from the same computation).
BUDGET_SLACK = 1e-9


class CentralDPFedAvg(WeightedFedAvg):
    """User-level DP-FedAvg by a trusted server (McMahan et al. 2018; Andrew et al. 2021)."""

    visibility = ("every sampled client's model update (weights) and its number of examples, "
                  "in the clear: under dp=central the server clips and noises the updates "
                  "itself, so it must be trusted; the released global models carry "
                  "client-level DP noise")

    def __init__(self, *, plan: CentralPlan, record: ClientLevelRecord | None = None,
                 clip_norm: float | None = None,
                 random_factory: Callable[[], RandomSource] = AesCtrRandom,
                 **common: Any) -> None:
        super().__init__(**common)
        self.plan = plan
        self.record = record if record is not None else plan.empty_record()
        #: The clipping bound of the next round (moves with adaptive clipping).
        self.clip_norm = float(clip_norm if clip_norm is not None else plan.clip_norm)
        self.random_factory = random_factory
        self._global: ArrayRecord | None = None
        self._halted = False
        #: The run's last round (from `start`): no budget stop is announced after it.
        self._last_round: int | None = None

    @classmethod
    def from_config(cls, cfg: Any, run_dir: Path, **common: Any) -> CentralDPFedAvg:
        """The plan from `cfg.dp`; on resume, the accountant's record from privacy.json."""
        plan = plan_from_config(cfg)
        record, clip_norm = None, None
        path = Path(run_dir) / LEDGER_FILE
        if cfg.resume and path.is_file():
            saved = json.loads(path.read_text()).get(LEDGER_RECORD_KEY)
            if saved is not None:
                record = ClientLevelRecord.from_json(saved)
                if (record.noise_multiplier, record.sample_rate, record.delta) != (
                        plan.noise_multiplier, plan.sample_rate, plan.delta):
                    raise ValueError(f"resume: {path} accounts σ={record.noise_multiplier}, "
                                     f"q={record.sample_rate}, δ={record.delta}, but the run "
                                     f"plans σ={plan.noise_multiplier}, q={plan.sample_rate}, "
                                     f"δ={plan.delta}")
                nexts = record.details.get("next_clip_norm") or []
                clip_norm = float(nexts[-1]) if nexts else None
        return cls(plan=plan, record=record, clip_norm=clip_norm, **common)

    def summary(self) -> None:
        super().summary()
        plan = self.plan
        log.info("dp=central: σ=%.4g (update σ_Δ=%.4g%s), C=%.4g%s, q=%.4g (%s sampling), "
                 "m=%.4g expected clients, δ=%.3g, %s accountant, budget ε=%s",
                 plan.noise_multiplier, plan.update_noise_multiplier,
                 f", count σ_b={plan.clipped_count_stddev:.4g}" if plan.adaptive else "",
                 self.clip_norm, " (adaptive)" if plan.adaptive else "", plan.sample_rate,
                 plan.sampling, plan.expected_clients, plan.delta, plan.accountant.upper(),
                 plan.budget)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              *args: Any, **kwargs: Any) -> Any:
        self._last_round = num_rounds
        return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)

    # ------------------------------------------------------------------ accounting
    def client_level_record(self) -> ClientLevelRecord:
        """The accountant's record so far (the privacy ledger writes it)."""
        return self.record

    def _over_budget(self) -> float | None:
        """ε after one more round if that exceeds the budget, else None."""
        if self.plan.budget is None:
            return None
        epsilon = self.record.epsilon_after_next()
        return epsilon if epsilon > self.plan.budget * (1 + BUDGET_SLACK) else None

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._grid = grid
        self._spec = ModelLayout.of(arrays)
        self._global = arrays
        self._halted = False
        over = self._over_budget()
        if over is not None:
            self._halted = True
            self.stop_reason = (f"client-level privacy budget: round {server_round} would take "
                                f"ε to {over:.4g}, above {self.plan.budget:g} "
                                "(dp.max_epsilon, else dp.target_epsilon)")
            self.round_log.aborted = self.stop_reason
            return []
        candidates = sorted(set(grid.get_node_ids()) - self.exhausted_nodes)
        cohort = poisson_cohort(candidates, self.plan.sample_rate, self.random_factory())
        self.round_log.sampled = cohort
        content_config = self._with_round(config, server_round)
        return [Message(RecordDict({"arrays": arrays, "config": content_config}),
                        dst_node_id=node, message_type=MessageType.TRAIN) for node in cohort]

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._halted or self._global is None or self._spec is None:
            return None, None
        valid = self.screen_train_replies(replies, check_finite=True)
        self.check_everyone_exhausted()
        started = time.perf_counter()
        spec = self._spec
        global_vec = spec.flatten(self._global)
        floats = _float_mask(spec)
        mechanism = NoisyClippedSum(int(floats.sum()), self.clip_norm, self.plan,
                                    self.random_factory())
        for reply in valid:
            update = np.concatenate([np.ravel(v).astype(np.float64, copy=False)
                                     for v in reply.views])
            mechanism.add(update[floats] - global_vec[floats])
        release = mechanism.release()
        new_vec = global_vec.copy()
        new_vec[floats] += release.update
        arrays = spec.unflatten(new_vec)
        per_round: dict[str, float | None] = {"clip_norm": release.clip_norm}
        if self.plan.adaptive:  # C's trajectory and the (noisy, accounted) count behind it
            per_round.update(next_clip_norm=release.next_clip_norm,
                             noisy_unclipped_fraction=release.noisy_unclipped_fraction)
        self.record = self.record.with_round(server_round, **per_round)
        self.clip_norm = release.next_clip_norm
        self.round_log.extra["dp_central"] = {
            "epsilon": self.record.epsilon, "clip_norm": release.clip_norm,
            "noisy_unclipped_fraction": release.noisy_unclipped_fraction,
            "cohort": mechanism.clients,
        }
        self.round_log.add_seconds("aggregate", time.perf_counter() - started)
        over = self._over_budget()
        if over is not None and (self._last_round is None or server_round < self._last_round):
            self.stop_reason = (f"client-level privacy budget: round {server_round + 1} would "
                                f"take ε to {over:.4g}, above {self.plan.budget:g} "
                                "(dp.max_epsilon, else dp.target_epsilon)")
        if not valid:
            log.warning("round %s: no valid update; the model moved by the noise alone (a "
                        "round is released whatever its cohort)", server_round)
        return arrays, self.finish_train_metrics(valid)


def _float_mask(spec: ModelLayout) -> np.ndarray:
    """Positions of floating-point parameters in the flat model (integer buffers are kept)."""
    parts = [np.full(size, np.dtype(dtype).kind == "f", dtype=bool)
             for size, dtype in zip(spec.sizes, spec.dtypes, strict=True)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def expected_noise_std(plan: CentralPlan, clip_norm: float) -> float:
    """Per-coordinate std of the noise on the released mean update (for checks and docs)."""
    return plan.server_learning_rate * plan.update_noise_multiplier * clip_norm \
        / plan.expected_clients

