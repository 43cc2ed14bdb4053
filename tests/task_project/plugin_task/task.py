"""A plug-in task written the way a user writes one: own model, own loader, own partitions.

Nothing here comes from fedstack except the contract's types: the loader reads a csv (path
in `task.options.train_csv`) into its own Dataset class and cuts its own partitions; the
test split comes from a second csv. `smoothed_loss` and `build_batchnorm_model` are reached
by dotted paths (`task.loss_fn`, `task.model_fn`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fedstack.task.contract import Partition, TaskContext

#: Calls of `smoothed_loss` in this process (the in-process tests run the clients here).
LOSS_CALLS = {"count": 0}
#: Every `val_every`-th row of a partition is kept for validation.
VAL_EVERY = 5


class Rows(Dataset):
    """(features, label) rows of a csv whose last column is the label."""

    def __init__(self, table: np.ndarray) -> None:
        self.x = torch.as_tensor(table[:, :-1], dtype=torch.float32)
        self.y = torch.as_tensor(table[:, -1], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


def _table(path: str) -> np.ndarray:
    return np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)


class TwoLayer(nn.Module):
    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(features, 16)
        self.act = nn.ReLU()
        self.out = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(x)))


def build_model(ctx: TaskContext) -> nn.Module:
    return TwoLayer(int(ctx.options["features"]), int(ctx.options["classes"]))


def build_batchnorm_model(ctx: TaskContext) -> nn.Module:
    """A model DP-SGD cannot clip per example (BatchNorm mixes the batch)."""
    return nn.Sequential(nn.Linear(int(ctx.options["features"]), 8), nn.BatchNorm1d(8),
                         nn.ReLU(), nn.Linear(8, int(ctx.options["classes"])))


def load_partition(ctx: TaskContext, partition_id: int) -> Partition:
    table = _table(ctx.options["train_csv"])
    order = np.random.default_rng(ctx.seed).permutation(len(table))
    mine = table[order[partition_id::ctx.num_partitions]]
    is_val = np.arange(len(mine)) % VAL_EVERY == 0
    return Partition(train=Rows(mine[~is_val]), val=Rows(mine[is_val]))


def load_test(ctx: TaskContext) -> tuple[np.ndarray, np.ndarray]:
    table = _table(ctx.options["test_csv"])
    return table[:, :-1].astype(np.float32), table[:, -1].astype(np.int64)


def label_names(ctx: TaskContext) -> list[str]:
    return [f"class-{k}" for k in range(int(ctx.options["classes"]))]


def smoothed_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    LOSS_CALLS["count"] += 1
    return nn.functional.cross_entropy(outputs, targets, reduction="none",
                                       label_smoothing=0.1)
