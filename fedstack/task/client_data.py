"""One client's view of a pool task: its partition, split into local train and validation.

The split is a pure function of (config, partition id), so the server can compute every
client's sizes at start-up (`fedstack.preflight`) through the very code the clients run
(`fedstack.task.contract.partition_pool`, which built-in and plug-in tasks share).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import TensorDataset

from fedstack.task.datasets import TaskData, load_task_data
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


def load_client_data(cfg: Any, partition_id: int, num_partitions: int) -> ClientData:
    """A built-in task's partition `partition_id` of `num_partitions`, as arrays (for tests
    and benchmarks): exactly what `fedstack.task.builtin.load_partition` gives the client."""
    from fedstack.task.contract import partition_pool
    from fedstack.task.plugin import task_context

    data = load_task_data(cfg.task, cfg.seed)
    part = partition_pool(
        task_context(cfg, num_partitions=num_partitions), partition_id, data.x_train, data.y_train
    )
    (x_train, y_train), (x_val, y_val) = part.train, part.val
    if len(y_train) < 1:
        raise ValueError(
            f"partition {partition_id} has {len(y_train) + len(y_val)} samples: too few to train"
        )
    return ClientData(train=to_dataset(x_train, y_train), x_val=x_val, y_val=y_val, task=data)
