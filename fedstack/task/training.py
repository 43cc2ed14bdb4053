"""Local training and evaluation on one client's data.

`LocalTrainer` is the seam between the ClientApp and the privacy layer: plain SGD here,
DP-SGD in `fedstack.privacy`. The ClientApp neither knows nor cares which one runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

#: A batch loss: (outputs, targets) -> scalar (training) or per-example losses.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: Examples per forward pass when evaluating.
EVAL_BATCH_SIZE = 512


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

    def train(self, model: nn.Module, data: Dataset, server_round: int) -> TrainOutcome: ...


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
    """Plain mini-batch training with the task's optimizer (no privacy).

    `loss` is the batch's mean loss (the task's; cross-entropy by default).
    """

    def __init__(self, task: Any, seed: int, partition_id: int, loss: LossFn | None = None) -> None:
        self.task = task
        self.seed = seed
        self.partition_id = partition_id
        self.loss = loss

    def train(self, model: nn.Module, data: Dataset, server_round: int) -> TrainOutcome:
        loader = DataLoader(
            data,
            batch_size=int(self.task.batch_size),
            shuffle=True,
            generator=round_generator(self.seed, self.partition_id, server_round),
        )
        optimizer = make_optimizer(model, self.task)
        criterion = self.loss if self.loss is not None else nn.CrossEntropyLoss()
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
        return TrainOutcome(
            num_examples=len(data),  # type: ignore[arg-type]
            train_loss=total / max(count, 1),
        )


@torch.no_grad()
def evaluate_model(
    model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH_SIZE
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) of `model` on (x, y)."""
    return evaluate_dataset(model, to_dataset(x, y), batch_size=batch_size)


def _batches(data: Dataset, batch_size: int) -> Any:
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors  # slices: no per-example collate for in-memory data
        return (
            (x[s : s + batch_size], y[s : s + batch_size]) for s in range(0, len(y), batch_size)
        )
    return DataLoader(data, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def evaluate_dataset(
    model: nn.Module,
    data: Dataset,
    per_example_loss: LossFn | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> tuple[float, float]:
    """(mean loss, accuracy) of `model` on a Dataset of (input, target).

    The loss is the task's per-example loss (cross-entropy by default). Accuracy is the
    share of argmax predictions equal to integer targets; NaN where it has no meaning
    (targets that are not class indices, e.g. a regression task's). NaN, NaN for no data.
    """
    count = len(data)  # type: ignore[arg-type]
    if count == 0:
        return float("nan"), float("nan")
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction="sum") if per_example_loss is None else None
    loss, correct, classified = 0.0, 0, True
    for xb, yb in _batches(data, batch_size):
        out = model(xb)
        loss += float(
            criterion(out, yb) if criterion is not None else per_example_loss(out, yb).sum()
        )  # type: ignore[misc]
        if classified and out.dim() == 2 and not yb.is_floating_point() and yb.dim() == 1:
            correct += int((out.argmax(dim=1) == yb).sum())
        else:
            classified = False
    return loss / count, (correct / count if classified else float("nan"))


def to_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(np.ascontiguousarray(x)),
                         torch.from_numpy(np.ascontiguousarray(y)))
