"""One client's view of the task: its partition, split into local train and validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import TensorDataset

from fedstack.task.datasets import TaskData, load_task_data
from fedstack.task.partitioning import client_partition
from fedstack.task.training import to_dataset


@dataclass
class ClientData:
    train: TensorDataset
    x_val: np.ndarray
    y_val: np.ndarray
    task: TaskData


def load_client_data(cfg: Any, partition_id: int, num_partitions: int) -> ClientData:
    """The partition `partition_id` of `num_partitions`, as this run's config defines it."""
    data = load_task_data(cfg.task, cfg.seed)
    idx = client_partition(data.y_train, partition_id, num_partitions, cfg.partition, cfg.seed)
    rng = np.random.default_rng((cfg.seed, partition_id))
    idx = rng.permutation(idx)
    n_val = int(round(len(idx) * float(cfg.task.client_val_fraction)))
    if len(idx) - n_val < 1:
        raise ValueError(f"partition {partition_id} has {len(idx)} samples: too few to train")
    val, train = idx[:n_val], idx[n_val:]
    return ClientData(
        train=to_dataset(data.x_train[train], data.y_train[train]),
        x_val=data.x_train[val],
        y_val=data.y_train[val],
        task=data,
    )
