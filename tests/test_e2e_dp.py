"""dp=local end to end through Flower's Ray simulation runtime, stacked with each aggregation.

Each client accounts for itself; the ε every client reports must equal Opacus's one-shot ε
for its own data size, noise and total steps, whatever carries the update (FedAvg, secure
aggregation, CKKS). A run whose clients all exhaust their budget stops early and says why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedstack.cli import run_in_simulation
from fedstack.config import compose_config
from fedstack.privacy.calibration import derive_noise_multiplier
from fedstack.privacy.schedule import public_schedule
from fedstack.privacy.settings import LocalDPSettings
from fedstack.task.client_data import load_client_data

pytestmark = pytest.mark.e2e


def _one_shot(cfg, partition_id: int, sigma: float | None, rounds: int) -> float:
    """Opacus's ε for one client's whole training, computed here from scratch."""
    from opacus.accountants import create_accountant

    n = len(load_client_data(cfg, partition_id, cfg.num_clients).train)
    steps_per_epoch = math.ceil(n / cfg.task.batch_size)
    q, delta = 1 / steps_per_epoch, 1 / (10 * n)
    steps_per_round = steps_per_epoch * cfg.task.local_epochs
    if sigma is None:
        sigma = derive_noise_multiplier(
            target_epsilon=cfg.dp.target_epsilon, delta=delta, sample_rate=q,
            total_steps=cfg.num_rounds * steps_per_round, accountant=cfg.dp.accountant)
    acc = create_accountant(mechanism=cfg.dp.accountant)
    acc.history = [(sigma, q, rounds * steps_per_round)]
    return float(acc.get_epsilon(delta=delta))


def test_dp_fedavg_learns_digits_and_lands_on_target_epsilon(tmp_path: Path) -> None:
    target = LocalDPSettings().target_epsilon
    # The DP training settings of benchmarks/dp.py --utility (docs/dp.md), 8 rounds.
    cfg = compose_config(["task=digits", "partition=iid", "num_clients=5", "num_rounds=8",
                          "task.model=digits_linear", "task.batch_size=64",
                          "task.local_epochs=1", "task.learning_rate=1.0",
                          "dp=local", f"output_dir={tmp_path}", "run_name=learn"])
    summary = run_in_simulation(cfg)
    assert summary["rounds_completed"] == 8
    # Chance is 0.1. DP noise is secret-seeded (not reproducible): 4 in-process runs of
    # these settings gave 0.84-0.88 (20 rounds: 0.92), so 0.75 leaves a wide margin.
    assert summary["final_accuracy"] >= 0.75, summary
    for pid in range(5):
        eps = summary["epsilon_per_client"][str(pid)]
        assert eps == pytest.approx(_one_shot(cfg, pid, None, 8), rel=1e-9)
        assert target - 0.05 <= eps <= target
    rows = [json.loads(x) for x in (tmp_path / "learn" / "history.jsonl").read_text()
            .splitlines()]
    assert all(len(r["epsilon"]) == 5 for r in rows[1:])
    assert (tmp_path / "learn" / "privacy_report.md").exists()


@pytest.mark.parametrize("aggregation", ["secagg", "he"])
def test_dp_stacks_and_exhausted_clients_stop_the_run(tmp_path: Path, aggregation: str) -> None:
    base = ["task=breast_cancer", "partition=iid", "num_clients=3", "num_rounds=4",
            f"aggregation={aggregation}", "dp=local", "dp.noise_multiplier=1.2",
            "dp.target_epsilon=null", "dp.sample_rate=0.125", f"output_dir={tmp_path}",
            "run_name=r"]
    # Under secagg/he every client follows the run's public DP schedule (docs/dp.md), so its
    # epsilon is the same function of the config for all clients.
    schedule = public_schedule(compose_config(base))
    assert schedule is not None
    # A budget that fits exactly two rounds for every client: round 3 is declined by all.
    budget = schedule.epsilon_after(3) * 0.999
    assert budget > schedule.epsilon_after(2)
    cfg = compose_config([*base, f"dp.max_epsilon={budget}"])
    summary = run_in_simulation(cfg)
    assert summary["rounds_completed"] == 2 and summary["rounds_failed"] == [3], summary
    assert summary["status"] == "stopped"
    assert "declined permanently" in (summary["stop_reason"] or "")
    assert sorted(summary["clients_exhausted"]) == ["0", "1", "2"]
    for pid in range(3):
        assert summary["epsilon_per_client"][str(pid)] == pytest.approx(
            schedule.epsilon_after(2), rel=1e-9)
    report = (tmp_path / "r" / "privacy_report.md").read_text()
    assert "run stopped early" in report and "privacy budget exhausted" in report
    rows = [json.loads(x) for x in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    # HE: no central evaluation (the server cannot read the model); clients evaluate.
    best = max((r["central_accuracy"] or r["eval_accuracy"] or 0.0) for r in rows[1:])
    assert best > 0.8, rows
