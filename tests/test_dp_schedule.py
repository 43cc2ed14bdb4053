"""The public DP schedule (secagg/he): δ, q, steps and σ the same for every client.

Nothing a client sends in the clear may depend on its n_k: its ε and δ must be one public
function of the config, which the server's ledger recomputes and enforces; every decline
reason it sends is fixed text; a data owner's noise floor refuses a round by a fixed code.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from fedstack.config import ConfigError, compose_config
from fedstack.policy import NodePolicy
from fedstack.privacy.budget import BUDGET_EXHAUSTED_PREFIX
from fedstack.privacy.ledger import PrivacyLedger
from fedstack.privacy.schedule import PublicSchedule, public_schedule, steps_per_epoch
from fedstack.privacy.settings import LocalDPSettings
from fedstack.privacy.trainer import DP_SETUP_DECLINE, DPTrainer
from fedstack.task.models import build_model

SECAGG_DP = ["aggregation=secagg", "dp=local", "dp.sample_rate=0.25",
             "dp.noise_multiplier=1.0", "dp.target_epsilon=null"]


def _cfg(tmp_path: Path, *overrides: str):
    return compose_config([*overrides, f"output_dir={tmp_path}"])


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregation", ["secagg", "he"])
def test_hiding_aggregations_need_a_public_sample_rate(tmp_path: Path, aggregation: str) -> None:
    with pytest.raises(ConfigError, match=rf"aggregation={aggregation} needs a public "
                                          r"dp\.sample_rate.*n_k"):
        _cfg(tmp_path, f"aggregation={aggregation}", "dp=local")
    # fedavg keeps the per-client parameters (n_k is visible there anyway).
    assert public_schedule(_cfg(tmp_path, "dp=local")) is None


def test_delta_must_be_below_one_over_the_public_bound(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dp\.delta=0\.001 .*aggregation\.max_weight=5000"):
        _cfg(tmp_path, *SECAGG_DP, "dp.delta=0.001")
    schedule = public_schedule(_cfg(tmp_path, *SECAGG_DP, "dp.delta=1e-5"))
    assert schedule is not None and schedule.delta == 1e-5


def test_schedule_keys_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dp\.sample_rate=1\.5 must be in \(0, 1\]"):
        _cfg(tmp_path, *SECAGG_DP, "dp.sample_rate=1.5")
    with pytest.raises(ConfigError, match=r"dp\.sample_rate=0\.3 with "
                                          r"dp\.grad_sample_mode=hooks.*0\.25"):
        _cfg(tmp_path, *SECAGG_DP, "dp.sample_rate=0.3", "dp.grad_sample_mode=hooks")
    assert steps_per_epoch(0.3) == 4 and steps_per_epoch(0.1) == 10
    assert steps_per_epoch(1 / 3) == 3


def test_default_delta_follows_the_public_bound_on_n_k(tmp_path: Path) -> None:
    secagg = public_schedule(_cfg(tmp_path, *SECAGG_DP))
    he = public_schedule(_cfg(tmp_path, *SECAGG_DP, "aggregation=he"))
    auto = public_schedule(_cfg(tmp_path, *SECAGG_DP, "aggregation.max_weight=0",
                                "max_num_examples=800"))
    fedavg = public_schedule(_cfg(tmp_path, "dp=local", "dp.sample_rate=0.25"))
    assert secagg is not None and secagg.delta == 1 / (10 * 5000)
    assert he is not None and he.delta == 1 / (10 * 10000)
    assert auto is not None and (auto.delta, auto.weight_bound_key) == (1 / 8000,
                                                                        "max_num_examples")
    assert fedavg is not None and fedavg.delta == 1 / (10 * 1_000_000)
    assert secagg.steps_per_round == 4 * 2  # ceil(1/q) per epoch, task.local_epochs = 2


# -- clients ---------------------------------------------------------------------------------


class _Task:
    batch_size = 10
    local_epochs = 1
    optimizer = "sgd"
    learning_rate = 0.1
    momentum = 0.0


SCHEDULE = PublicSchedule(accountant="rdp", delta=1e-4, sample_rate=0.5, steps_per_epoch=2,
                          local_epochs=1, planned_rounds=3, fixed_noise_multiplier=1.0,
                          target_epsilon=None, weight_bound=1000,
                          weight_bound_key="aggregation.max_weight")


def _trainer(schedule: PublicSchedule = SCHEDULE, policy: NodePolicy | None = None,
             max_epsilon: float | None = None) -> DPTrainer:
    settings = LocalDPSettings(noise_multiplier=schedule.fixed_noise_multiplier,
                               target_epsilon=schedule.target_epsilon, max_epsilon=max_epsilon)
    return DPTrainer(_Task, settings, planned_rounds=schedule.planned_rounds,
                     schedule=schedule, policy=policy)


def _data(n: int) -> TensorDataset:
    return TensorDataset(torch.randn(n, 30), torch.randint(0, 2, (n,)))


def test_every_client_reports_the_same_public_epsilon_and_delta() -> None:
    """Clients of 12 and 300 examples: σ, q, steps, ε and δ all equal and public."""
    small, large = _trainer(), _trainer()
    reports = []
    for trainer, n in ((small, 12), (large, 300)):
        model = build_model("tabular_mlp", (30,), 2, 0)
        first = trainer.train(model, _data(n), 1)
        second = trainer.train(model, _data(n), 2)
        assert first.declined is None and second.num_examples == n
        reports.append((first.metrics, second.metrics, trainer.state.history))
    assert reports[0] == reports[1]
    assert reports[0][2] == ((1.0, 0.5, 4),)
    assert reports[0][1]["epsilon"] == SCHEDULE.epsilon_after(2)
    assert reports[0][0]["delta"] == SCHEDULE.delta


def test_declines_under_the_schedule_carry_fixed_text_only() -> None:
    # A client above the bound the δ protects: the reason must not name its n_k.
    tight = replace(SCHEDULE, delta=0.01)
    outcome = _trainer(tight).train(build_model("tabular_mlp", (30,), 2, 0), _data(150), 1)
    assert outcome.declined == DP_SETUP_DECLINE
    # Budget exhausted: the prefix alone (the numbers stay in the node's log).
    fixed = SCHEDULE
    trainer = _trainer(fixed, max_epsilon=fixed.epsilon_after(1) * 1.001)
    model = build_model("tabular_mlp", (30,), 2, 0)
    assert trainer.train(model, _data(40), 1).declined is None
    declined = trainer.train(model, _data(40), 2)
    assert declined.declined == BUDGET_EXHAUSTED_PREFIX
    assert declined.metrics["epsilon"] == fixed.epsilon_after(1)


def test_node_noise_floor_refuses_with_a_fixed_code() -> None:
    fixed = SCHEDULE
    model = build_model("tabular_mlp", (30,), 2, 0)
    refused = _trainer(fixed, NodePolicy(min_noise_multiplier=1.5)).train(model, _data(40), 1)
    assert refused.declined == "node policy refuses: dp-noise" and refused.num_examples == 0
    assert refused.metrics == {}
    ok = _trainer(fixed, NodePolicy(min_noise_multiplier=0.9)).train(model, _data(40), 1)
    assert ok.declined is None


# -- the server's ledger ---------------------------------------------------------------------


def test_ledger_refuses_epsilon_or_delta_off_the_public_schedule(tmp_path: Path) -> None:
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path, *SECAGG_DP, "num_rounds=4"))
    schedule = ledger.schedule
    assert schedule is not None
    public = {"epsilon": schedule.epsilon_after(1), "delta": schedule.delta}
    assert ledger.record_reply(1, 0, public).refused is None
    # A per-client δ = 1/(10 n_k) (what revealed n_k) and an ε off the schedule are refused.
    assert "public delta" in ledger.record_reply(1, 1, {**public, "delta": 1 / 970}).refused
    off = ledger.record_reply(1, 2, {**public, "epsilon": public["epsilon"] * 1.01}).refused
    assert off is not None and "public schedule" in off
    # A lost reply: the client trained rounds 2 and 3 and reports ε after 3 of them.
    assert ledger.record_reply(3, 0, {"epsilon": schedule.epsilon_after(3),
                                      "delta": schedule.delta}).refused is None
    # A decline before any training spends ε = 0, which is on the schedule.
    assert ledger.record_reply(2, 3, {"epsilon": 0.0, "delta": schedule.delta,
                                      "declined": 1}).refused is None
    ledger.write()
    data = json.loads((tmp_path / "privacy.json").read_text())
    assert data["public_schedule"]["delta"] == schedule.delta
    assert data["public_schedule"]["noise_multiplier"] == 1.0
    assert any("public schedule" in item for item in data["in_the_clear"])
    reloaded = PrivacyLedger.load(tmp_path)
    assert reloaded.schedule == schedule
    report = (tmp_path / "privacy_report.md").read_text()
    assert "## Public DP schedule" in report and "## In the clear" in report
    # Client 0's ε after 3 rounds stands for the public history [σ=1, q=0.25, 3 x 8 steps].
    assert "| 0 | – | RDP (public) | 1 | 0.25 | 24 | 2e-05 |" in report


def test_fedavg_report_lists_n_k_in_the_clear(tmp_path: Path) -> None:
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path, "dp=local"))
    assert ledger.schedule is None
    assert any("num-examples (n_k)" in item for item in ledger.in_the_clear)
    assert any("functions of n_k" in item for item in ledger.in_the_clear)
