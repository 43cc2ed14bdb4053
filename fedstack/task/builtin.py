"""The built-in tasks, written against the plug-in contract like any user's task.

`task=digits | breast_cancer | hf | synthetic_cifar` resolve to this module
(`fedstack.task.plugin.load_task`), so the ClientApp, the ServerApp and the start-up checks
have one path for every task. Each built-in task is a pool of examples every party derives
from the run's seed (`fedstack.task.datasets.load_task_data`, cached per process): the
server keeps its central test split, and `partition_pool` gives each client its share.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedstack.task.contract import Partition, TaskContext, partition_pool
from fedstack.task.datasets import TaskData, load_task_data

#: `task=` values served by this module.
BUILTIN_TASKS: tuple[str, ...] = ("digits", "breast_cancer", "hf", "synthetic_cifar")


def task_data(ctx: TaskContext) -> TaskData:
    """The task's pool and central test split (cached per process)."""
    return load_task_data(ctx.settings, ctx.seed)


def build_model(ctx: TaskContext) -> nn.Module:
    """`task.model` for the data's input shape and classes."""
    # Looked up at call time: tests replace `models.build_model` to inject a model.
    from fedstack.task import models

    data = task_data(ctx)
    return models.build_model(str(ctx.settings.model), data.input_shape, data.num_classes, ctx.seed)


def load_partition(ctx: TaskContext, partition_id: int) -> Partition:
    """This client's share of the pool, split into local train and validation."""
    data = task_data(ctx)
    return partition_pool(ctx, partition_id, data.x_train, data.y_train)


def load_test(ctx: TaskContext) -> tuple[Any, Any]:
    """The central test split (never part of any client's partition)."""
    data = task_data(ctx)
    return data.x_test, data.y_test


def label_names(ctx: TaskContext) -> tuple[str, ...] | None:
    return task_data(ctx).label_names
