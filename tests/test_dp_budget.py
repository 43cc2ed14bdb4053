"""Client-side budget: decline exactly when the next round would exceed it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import RecordDict
from torch.utils.data import TensorDataset

from fedstack.config import compose_config
from fedstack.policy import PolicyError
from fedstack.privacy.accountant_state import PrivacyState
from fedstack.privacy.budget import check_round, effective_budget
from fedstack.privacy.local_trainer import ContextDPTrainer
from fedstack.privacy.settings import LocalDPSettings
from fedstack.privacy.trainer import DPTrainer
from fedstack.task.models import build_model

N, BATCH = 40, 10
SIGMA = 1.5


class _Task:
    batch_size = BATCH
    local_epochs = 1
    optimizer = "sgd"
    learning_rate = 0.1
    momentum = 0.0


def _data() -> TensorDataset:
    return TensorDataset(torch.randn(N, 30), torch.randint(0, 2, (N,)))


def _per_round_epsilons(rounds: int) -> list[float]:
    q, steps, delta = 1 / math.ceil(N / BATCH), math.ceil(N / BATCH), 1 / (10 * N)
    state = PrivacyState("rdp")
    out = []
    for _ in range(rounds):
        state = state.with_steps(SIGMA, q, steps)
        out.append(state.epsilon(delta))
    return out


def _run(max_epsilon: float | None, rounds: int, node_budget: float | None = None):
    settings = LocalDPSettings(noise_multiplier=SIGMA, target_epsilon=None,
                               max_epsilon=max_epsilon)
    trainer = DPTrainer(_Task, settings, planned_rounds=rounds, node_max_epsilon=node_budget)
    model, data = build_model("tabular_mlp", (30,), 2, 0), _data()
    return [trainer.train(model, data, r) for r in range(1, rounds + 1)], trainer


@pytest.mark.parametrize("budget_at", ["between", "exact"])
def test_declines_exactly_when_next_round_would_exceed(budget_at: str) -> None:
    eps = _per_round_epsilons(6)
    budget = (eps[2] + eps[3]) / 2 if budget_at == "between" else eps[2]
    outcomes, trainer = _run(budget, 6)
    trained = [o.declined is None for o in outcomes]
    assert trained == [True, True, True, False, False, False]
    assert [o.metrics["epsilon"] for o in outcomes[:3]] == pytest.approx(eps[:3], rel=1e-12)
    declined = outcomes[3]
    assert declined.num_examples == 0 and "budget exhausted" in declined.declined
    assert declined.metrics["epsilon"] == pytest.approx(eps[2], rel=1e-12)  # spent, not more
    assert max(o.metrics["epsilon"] for o in outcomes) <= budget
    assert trainer.state is not None and trainer.state.rounds == (1, 2, 3)


def test_node_budget_tightens_run_budget() -> None:
    eps = _per_round_epsilons(4)
    outcomes, _ = _run(eps[3] * 2, 4, node_budget=eps[1])
    assert [o.declined is None for o in outcomes] == [True, True, False, False]


def test_node_budget_cannot_loosen() -> None:
    assert effective_budget(2.0, 5.0) == 2.0
    assert effective_budget(2.0, 1.0) == 1.0
    assert effective_budget(None, 1.0) == 1.0
    assert effective_budget(3.0, None) == 3.0


def test_no_budget_never_declines() -> None:
    outcomes, _ = _run(None, 3)
    assert all(o.declined is None for o in outcomes)


def test_target_epsilon_is_the_default_budget() -> None:
    s = LocalDPSettings(target_epsilon=4.0)
    assert s.run_budget() == 4.0
    assert LocalDPSettings(noise_multiplier=1.0, target_epsilon=None).run_budget() is None


def test_check_round_reports_numbers() -> None:
    state = PrivacyState("rdp").with_steps(SIGMA, 0.25, 4)
    d = check_round(state, noise_multiplier=SIGMA, sample_rate=0.25, steps=4, delta=1e-3,
                    max_epsilon=100.0)
    assert d.allowed and d.epsilon_after > d.epsilon_spent > 0 and d.reason is None


def test_node_budget_comes_from_the_node_policy(tmp_path) -> None:
    """`max-epsilon` inline and in the node's policy file: the stricter one is the budget."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text("max-epsilon = 2.5\n")
    cfg = compose_config(["dp=local", f"output_dir={tmp_path}"])

    def trainer_of(node_config: dict) -> ContextDPTrainer:
        context = SimpleNamespace(node_config={"partition-id": 0, **node_config},
                                  state=RecordDict(), node_id=1)
        return ContextDPTrainer(cfg, context)

    assert trainer_of({"max-epsilon": "3", "policy": str(policy_file)}).trainer \
        .node_max_epsilon == 2.5
    assert trainer_of({"max-epsilon": 3}).trainer.node_max_epsilon == 3.0
    assert trainer_of({}).trainer.node_max_epsilon is None
    with pytest.raises(PolicyError, match="max-epsilon"):
        trainer_of({"max-epsilon": "-1"})
