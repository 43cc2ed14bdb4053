"""Update inversion: it must break an undefended small update (or the audit proves nothing),
and it must fail on what secure aggregation leaves the server (a sum over >= 5 clients)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedstack.audit.inversion import (
    InversionSettings,
    invert,
    match_threshold,
    score,
    ssim,
    update_as_gradient,
)
from fedstack.audit.inversion_audit import audit_inversion
from fedstack.audit.runner import audit_main
from fedstack.outputs.server_view import ServerView
from fedstack.task.datasets import load_digits_task
from fedstack.task.models import build_model
from fedstack.task.training import SGDTrainer, to_dataset
from tests.audit_runs import recorded_run

#: Enough for the small digits CNN (a few seconds of CPU per target).
FAST = InversionSettings(iterations=200, restarts=1, seed=0)
#: The client's SGD step size (the task's default).
LEARNING_RATE = 0.05


@pytest.fixture(scope="module")
def digits():
    return load_digits_task(0.2, 42)


def _one_step_update(model: torch.nn.Module, x: np.ndarray, y: np.ndarray
                     ) -> dict[str, np.ndarray]:
    """What an undefended client sends: its weights after one local SGD step (the real
    trainer, momentum and all) on (x, y)."""
    task = SimpleNamespace(batch_size=len(y), optimizer="sgd", learning_rate=LEARNING_RATE,
                           momentum=0.9, local_epochs=1)
    SGDTrainer(task, seed=0, partition_id=0).train(model, to_dataset(x, y), server_round=1)
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def test_single_example_update_is_inverted(digits) -> None:
    model = build_model("digits_cnn_small", digits.input_shape, digits.num_classes, seed=7)
    before = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    x, y = digits.x_train[5:6], digits.y_train[5:6]
    after = _one_step_update(build_model("digits_cnn_small", digits.input_shape,
                                         digits.num_classes, seed=7), x, y)
    grad = update_as_gradient(model, before, after, learning_rate=LEARNING_RATE)
    recon = invert(model, grad, batch=1, input_shape=digits.input_shape,
                   num_classes=digits.num_classes, bounds=(0.0, 1.0), settings=FAST)
    assert recon.labels.tolist() == y.tolist()  # iDLG: the label comes out exactly
    threshold = match_threshold(x, digits.x_test)
    assert 0.5 < threshold < 1.0  # a real bar: other digits do resemble this one
    result = score(recon.inputs, x, threshold, image=True)
    assert result.matched == 1 and result.correlations[0] > threshold
    assert result.correlations[0] > 0.95 and ssim(recon.inputs[0], x[0]) > 0.9


def test_a_random_direction_is_not_a_match(digits) -> None:
    """The match rule is not lenient: inverting a direction unrelated to the data fails."""
    model = build_model("digits_cnn_small", digits.input_shape, digits.num_classes, seed=7)
    gen = torch.Generator().manual_seed(3)
    grad = [torch.randn(p.shape, generator=gen) for p in model.parameters()]
    x = digits.x_train[5:6]
    recon = invert(model, grad, batch=1, input_shape=digits.input_shape,
                   num_classes=digits.num_classes, bounds=(0.0, 1.0), settings=FAST)
    assert score(recon.inputs, x, match_threshold(x, digits.x_test), image=True).matched == 0


def test_small_plaintext_updates_are_inverted_from_the_recorded_view() -> None:
    run = recorded_run("fedavg")
    result = audit_inversion(ServerView.of_run(run.run_dir), run.cfg, run.run_dir,
                             settings=FAST, max_targets=2)
    assert result["applicable"] and all(t["batch_observed"] <= 5 for t in result["targets"])
    assert result["match_share"] >= 0.5, result["targets"]


def test_secure_aggregation_sum_of_five_clients_is_not_inverted() -> None:
    run = recorded_run("secagg")
    result = audit_inversion(ServerView.of_run(run.run_dir), run.cfg, run.run_dir,
                             settings=FAST)
    assert result["applicable"]
    (target,) = result["targets"]
    assert target["kind"] == "aggregate" and len(target["per_client"]) >= 5
    assert result["match_share"] == 0.0, target["per_client"]
    assert target["any_client"]["matched"] == 0


def test_audit_command_writes_json_plot_and_report_section() -> None:
    run = recorded_run("secagg")
    code = audit_main([str(run.run_dir), "--iterations", "30", "--restarts", "1",
                       "--no-model-attacks"])
    assert code == 0
    audit = json.loads((run.run_dir / "audit.json").read_text())
    assert audit["aggregation"] == "secagg" and audit["failed"] == []
    assert audit["inversion"]["reconstructions"] >= 5 * 3
    assert (run.run_dir / "audit.png").stat().st_size > 5000
    report = (run.run_dir / "privacy_report.md").read_text()
    assert "Audit mode was on" in report and "Update inversion" in report
    assert audit_main([str(run.run_dir / "no-such-run")]) == 2
