"""Local training and evaluation on one client's data.

`LocalTrainer` is the seam between the ClientApp and the privacy layer: plain SGD here,
DP-SGD in `fedstack.privacy`. The ClientApp neither knows nor cares which one runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


@dataclass
class TrainOutcome:
    """What one round of local training produced (the model is updated in place)."""

    num_examples: int
    train_loss: float
    #: Extra scalar metrics for the reply (e.g. epsilon, delta).
    metrics: dict[str, float] = field(default_factory=dict)
    #: Set when the client refuses to train this round (e.g. its privacy budget is spent).
    declined: str | None = None


class LocalTrainer(Protocol):
    """One round of local training on a client."""

    def train(self, model: nn.Module, data: TensorDataset, server_round: int) -> TrainOutcome:
        ...


def make_optimizer(model: nn.Module, task: Any) -> torch.optim.Optimizer:
    if task.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=task.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=task.learning_rate, momentum=task.momentum)


def round_generator(seed: int, partition_id: int, server_round: int) -> torch.Generator:
    """Mini-batch order of one client in one round: reproducible from the run's seed."""
    gen = torch.Generator()
    gen.manual_seed((seed * 1_000_003 + partition_id * 10_007 + server_round) % (2**63))
    return gen


class SGDTrainer:
    """Plain mini-batch training with the task's optimizer (no privacy)."""

    def __init__(self, task: Any, seed: int, partition_id: int) -> None:
        self.task = task
        self.seed = seed
        self.partition_id = partition_id

    def train(self, model: nn.Module, data: TensorDataset, server_round: int) -> TrainOutcome:
        loader = DataLoader(data, batch_size=int(self.task.batch_size), shuffle=True,
                            generator=round_generator(self.seed, self.partition_id, server_round))
        optimizer = make_optimizer(model, self.task)
        criterion = nn.CrossEntropyLoss()
        model.train()
        total, count = 0.0, 0
        for _ in range(int(self.task.local_epochs)):
            for xb, yb in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(model(xb), yb)
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(yb)
                count += len(yb)
        return TrainOutcome(num_examples=len(data), train_loss=total / max(count, 1))


@torch.no_grad()
def evaluate_model(model: nn.Module, x: np.ndarray, y: np.ndarray,
                   batch_size: int = 512) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` on (x, y)."""
    if len(y) == 0:
        return float("nan"), float("nan")
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum")
    loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = torch.from_numpy(x[start:start + batch_size])
        yb = torch.from_numpy(y[start:start + batch_size])
        out = model(xb)
        loss += float(criterion(out, yb))
        correct += int((out.argmax(dim=1) == yb).sum())
    return loss / len(y), correct / len(y)


def to_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)),
                         torch.from_numpy(np.ascontiguousarray(y)))
