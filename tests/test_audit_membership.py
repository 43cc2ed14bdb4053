"""Membership inference: chance on a model that never saw the targets, clearly better than
chance on an overfitted one; the reported statistics are the right ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fedstack.audit.membership import (
    clopper_pearson,
    evaluate_scores,
    logit_confidence,
    membership_audit,
    offline_lira_scores,
    roc_auc,
    tpr_at_fpr,
    train_shadows,
)
from fedstack.task.datasets import load_digits_task

#: Targets per side, shadow models, full-batch Adam steps of every model.
TARGETS, SHADOWS, STEPS = 200, 8, 150


def _train(inputs: np.ndarray, labels: np.ndarray, seed: int) -> nn.Module:
    """A small MLP trained full-batch to near-zero training loss (it overfits)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    x, y = torch.as_tensor(inputs), torch.as_tensor(labels, dtype=torch.long)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def digits() -> dict[str, tuple[np.ndarray, np.ndarray] | list[nn.Module]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only adds contention
    try:
        data = load_digits_task(0.2, 0)
        x = np.concatenate([data.x_train, data.x_test]).reshape(-1, 64)
        y = np.concatenate([data.y_train, data.y_test])
        order = np.random.default_rng(0).permutation(len(y))
        members, non_members, rest = (order[:TARGETS], order[TARGETS:2 * TARGETS],
                                      order[2 * TARGETS:])
        shadows = train_shadows(_train, x[rest], y[rest], SHADOWS, TARGETS, seed=1)
        return {
            "members": (x[members], y[members]),
            "non_members": (x[non_members], y[non_members]),
            "population": (x[rest], y[rest]),
            "shadows": shadows,
            "overfitted": [_train(x[members], y[members], 12345)],
            "unseen": [_train(x[rest[:TARGETS]], y[rest[:TARGETS]], 999)],
        }
    finally:
        torch.set_num_threads(threads)


def _audit(digits: dict, which: str) -> dict:
    return membership_audit(digits[which][0], digits["members"], digits["non_members"],
                            population=digits["population"], shadows=digits["shadows"],
                            bootstrap=300)


def test_model_that_never_saw_the_targets_is_at_chance(digits: dict) -> None:
    for result in _audit(digits, "unseen").values():
        low, high = result.auc_interval
        assert low < 0.5 < high, result
        assert result.num_members == result.num_non_members == TARGETS


def test_overfitted_model_leaks_membership(digits: dict) -> None:
    results = _audit(digits, "overfitted")
    for result in results.values():
        assert result.auc_interval[0] > 0.52, result  # the 95% interval excludes chance
    lira = results["lira_offline"]
    assert lira.auc_interval[0] > 0.6 and lira.auc > results["loss_threshold"].auc
    # Calibration pays where it matters: more members found at 1% FPR than by chance.
    at_1 = lira.tpr_at_fpr[0]
    assert at_1.target_fpr == 0.01 and at_1.resolved and at_1.fpr <= 0.01
    assert at_1.tpr_interval[0] > 0.01
    assert not lira.tpr_at_fpr[1].resolved  # 0.1% of 200 non-members is not one example


def test_lira_score_is_a_one_sided_gaussian_test() -> None:
    out = np.array([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0], [1.0, 1.0]])  # shadows x examples
    # Example 0: OUT mean 1, sample std sqrt(2/3); example 1: no OUT spread (floored std).
    scores = offline_lira_scores(np.array([3.0, 1.5]), out, per_example_variance=True,
                                 recalibrate=False)
    assert scores[0] == pytest.approx(2 / np.sqrt(2 / 3))
    assert scores[1] == pytest.approx(0.5 / 1e-3)
    pooled = offline_lira_scores(np.array([3.0, 1.5]), out, per_example_variance=False,
                                 recalibrate=False)
    assert pooled == pytest.approx(np.array([2.0, 0.5]) / np.sqrt(1 / 3))  # mean variance
    # Far below every shadow: still ranked, not a tie (the p-value would underflow).
    far = offline_lira_scores(np.array([-60.0, -70.0]), out, per_example_variance=False)
    assert far[0] > far[1]


def test_recalibration_survives_shadows_on_another_scale() -> None:
    """Shadows more confident than the target (a centrally trained stand-in for a federated
    model): without recalibration the ranking follows the shadows' scale, not membership."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(8, 4, 400)  # per-example OUT mean of the shadows
    out = difficulty + rng.normal(0, 1, (16, 400))
    member = np.arange(400) < 200
    target = 0.5 * difficulty + 1.0 * member + rng.normal(0, 0.5, 400)  # half the scale
    plain = roc_auc(offline_lira_scores(target, out, recalibrate=False), member)
    fitted = roc_auc(offline_lira_scores(target, out), member)
    assert plain < 0.65 < 0.85 < fitted  # (the target's raw confidence alone: 0.68)


def test_logit_confidence_matches_its_definition() -> None:
    model = nn.Linear(3, 4)
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 1])
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(x)).double(), 1)[np.arange(5), y].numpy()
    assert logit_confidence(model, x, y) == pytest.approx(np.log(p / (1 - p)), rel=1e-9)


def test_auc_tpr_and_intervals() -> None:
    members = np.r_[np.ones(4, bool), np.zeros(4, bool)]
    assert roc_auc(np.array([8, 7, 6, 5, 4, 3, 2, 1.0]), members) == 1.0
    assert roc_auc(np.array([1, 2, 3, 4, 5, 6, 7, 8.0]), members) == 0.0
    assert roc_auc(np.ones(8), members) == 0.5
    scores = np.r_[np.arange(100, 200), np.arange(0, 1000)].astype(float)
    labels = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    point = tpr_at_fpr(scores, labels, 0.01)  # 10 false positives allowed: threshold 989
    assert point.fpr == 0.01 and point.tpr == 0.0 and point.resolved
    low, high = clopper_pearson(0, 100)
    assert low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 100))
    result = evaluate_scores("x", np.r_[np.ones(50), np.zeros(50)] + np.linspace(0, 1e-3, 100),
                             np.r_[np.ones(50, bool), np.zeros(50, bool)], bootstrap=50)
    assert result.auc == 1.0 and result.auc_interval == (1.0, 1.0)
    assert result.tpr_at_fpr[0].tpr == 1.0
