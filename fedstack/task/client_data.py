"""One client's view of the task: its partition, split into local train and validation.

The split is a pure function of (config, partition id), so the server can compute every
client's sizes at start-up (`fedstack.preflight`) through the very code the clients run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import TensorDataset

from fedstack.task.datasets import TaskData, load_task_data
from fedstack.task.partitioning import client_partition, partition_indices
from fedstack.task.training import to_dataset


@dataclass
class ClientData:
    train: TensorDataset
    x_val: np.ndarray
    y_val: np.ndarray
    task: TaskData


@dataclass(frozen=True)
class ClientSplit:
    """Indices into the task's train pool of one client's local train and validation sets."""

    partition_id: int
    train: np.ndarray
    val: np.ndarray


def split_sizes(num_samples: int, val_fraction: float) -> tuple[int, int]:
    """(train, validation) sizes of a partition of `num_samples` (Python's rounding)."""
    n_val = int(round(num_samples * float(val_fraction)))
    return num_samples - n_val, n_val


def split_partition(indices: np.ndarray, partition_id: int, seed: int,
                    val_fraction: float) -> ClientSplit:
    """A partition's local train/validation split (seed- and partition-determined)."""
    rng = np.random.default_rng((seed, partition_id))
    shuffled = rng.permutation(indices)
    _, n_val = split_sizes(len(shuffled), val_fraction)
    return ClientSplit(partition_id, train=shuffled[n_val:], val=shuffled[:n_val])


def client_splits(cfg: Any, data: TaskData, num_partitions: int) -> list[ClientSplit]:
    """Every partition's local split, exactly as each client derives its own."""
    parts = partition_indices(data.y_train, num_partitions, cfg.partition, cfg.seed)
    return [split_partition(part, pid, cfg.seed, cfg.task.client_val_fraction)
            for pid, part in enumerate(parts)]


def load_client_data(cfg: Any, partition_id: int, num_partitions: int) -> ClientData:
    """The partition `partition_id` of `num_partitions`, as this run's config defines it."""
    data = load_task_data(cfg.task, cfg.seed)
    idx = client_partition(data.y_train, partition_id, num_partitions, cfg.partition, cfg.seed)
    split = split_partition(idx, partition_id, cfg.seed, cfg.task.client_val_fraction)
    if len(split.train) < 1:
        raise ValueError(f"partition {partition_id} has {len(idx)} samples: too few to train")
    return ClientData(
        train=to_dataset(data.x_train[split.train], data.y_train[split.train]),
        x_val=data.x_train[split.val],
        y_val=data.y_train[split.val],
        task=data,
    )
