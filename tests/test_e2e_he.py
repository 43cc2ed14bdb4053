"""aggregation=he end to end through Flower's runtime (Ray simulation) and `fedstack decrypt`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedstack.cli import run_in_simulation
from fedstack.config import compose_config
from fedstack.outputs.run_directory import load_checkpoint
from fedstack.strategies.he.keys import SECRET_CONTEXT_FILENAME
from fedstack.strategies.he.provisioning import SIMULATION_KEY_DIR
from fedstack.task.client_data import load_client_data
from fedstack.task.datasets import load_task_data
from fedstack.task.models import build_model
from fedstack.task.training import evaluate_model
from tests.conftest import DIGITS_BASELINE

pytestmark = pytest.mark.e2e
VENV_BIN = Path(sys.executable).parent
ROUNDS = 10  # DIGITS_BASELINE's num_rounds
COMMON = DIGITS_BASELINE


def _accuracy(cfg, arrays, x, y) -> float:
    data = load_task_data(cfg.task, cfg.seed)
    model = build_model(cfg.task.model, data.input_shape, data.num_classes, cfg.seed)
    model.load_state_dict(arrays.to_torch_state_dict())
    return evaluate_model(model, x, y)[1]


def test_he_matches_fedavg_and_decrypt_recovers_the_model(tmp_path: Path,
                                                         digits_baseline: dict) -> None:
    he_cfg = compose_config([*COMMON, "aggregation=he", f"output_dir={tmp_path}",
                             "run_name=he"])
    plain = digits_baseline
    he = run_in_simulation(he_cfg)
    assert he["rounds_completed"] == plain["rounds_completed"] == ROUNDS
    assert he["final_accuracy_source"] == "federated"  # the server cannot evaluate
    # Same seed, same clients: HE adds only CKKS noise (~1e-9) to the average.
    assert abs(he["final_federated_accuracy"] - plain["final_federated_accuracy"]) <= 0.01
    run_dir = tmp_path / "he"
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert all(r["central_accuracy"] is None for r in history)
    assert all(r["extra"]["he"]["summed"] == 5 for r in history if r["round"] > 0)

    out = tmp_path / "final.npz"
    secret = run_dir / SIMULATION_KEY_DIR / SECRET_CONTEXT_FILENAME
    proc = subprocess.run(
        [str(VENV_BIN / "fedstack"), "decrypt", "--secret-context", str(secret),
         "--out", str(out), str(run_dir)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    info = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert info["round"] == ROUNDS and info["clients_summed"] == 5
    model = load_checkpoint(out)

    # The decrypted model is what the clients evaluated: re-running their federated
    # evaluation on it gives the run's reported federated accuracy.
    correct, total = 0.0, 0
    for pid in range(5):
        data = load_client_data(he_cfg, pid, 5)
        acc = _accuracy(he_cfg, model, data.x_val, data.y_val)
        correct += acc * len(data.y_val)
        total += len(data.y_val)
    assert correct / total == pytest.approx(he["final_federated_accuracy"], abs=1e-9)

    # And on the held-out test split it matches plain FedAvg's central accuracy.
    task = load_task_data(he_cfg.task, he_cfg.seed)
    test_acc = _accuracy(he_cfg, model, task.x_test, task.y_test)
    assert abs(test_acc - plain["final_accuracy"]) <= 0.01
    # After round 1 both runs started from the same model and the clients trained the same
    # way, so the models differ only by CKKS noise (~1e-9). Later rounds amplify that noise
    # chaotically through SGD, so the tight check is made on round 1.
    from fedstack.strategies.he.cli import decrypt_run

    first = tmp_path / "round1.npz"
    decrypt_run(run_dir, secret, first, server_round=1)
    he_round1 = load_checkpoint(first)
    plain_round1 = load_checkpoint(Path(plain["run_dir"]) / "checkpoints" / "round-0001.npz")
    for name in plain_round1.keys():  # noqa: SIM118 (ArrayRecord)
        assert np.max(np.abs(plain_round1[name].numpy() - he_round1[name].numpy())) < 1e-5
