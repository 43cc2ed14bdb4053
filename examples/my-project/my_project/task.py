"""The fedstack task of this project: which model, which data (fedstack's docs/tasks.md).

fedstack calls these functions; everything else (rounds, aggregation, secure aggregation,
HE, DP-SGD, outputs) comes from its config:

    fedstack run task=custom task.module=my_project.task +task.options.data_dir=$PWD/data

Where the data is:
- simulation (one machine): `task.options.data_dir`, one folder for everyone. The server
  keeps a held-out test split, and fedstack's partitioner (the `partition` config group)
  gives each simulated client its share.
- deployment (one SuperNode per data owner): each node's own folder, from its node config
  (`flower-supernode --node-config "partition-id=0 num-partitions=3 data-dir=/data/site"`).
  The whole folder is that client's data; the server has none, so no central evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from fedstack.task.contract import Partition, TaskContext, hold_out_test, partition_pool
from my_project.data import ImageFiles, list_images
from my_project.model import SmallCNN

#: Node-config key a data owner sets to where its own images are (deployment).
NODE_DATA_DIR_KEY = "data-dir"
#: Colour channels of the images (read as RGB).
CHANNELS = 3


def _image_size(ctx: TaskContext) -> int | None:
    size = ctx.options.get("image_size")
    return None if size is None else int(size)


def _shared_dir(ctx: TaskContext) -> str:
    data_dir = ctx.options.get("data_dir")
    if not data_dir:
        raise ValueError("set the image folder: +task.options.data_dir=/absolute/path "
                         f"(or, on a SuperNode, --node-config \"{NODE_DATA_DIR_KEY}=...\")")
    return str(data_dir)


def build_model(ctx: TaskContext) -> nn.Module:
    """A fresh model (fedstack seeds torch, so every party builds the same weights)."""
    num_classes = ctx.options.get("num_classes")
    if num_classes is None:  # count the class folders of the shared data
        num_classes = len(list_images(_shared_dir(ctx))[2])
    return SmallCNN(CHANNELS, int(num_classes))


def load_partition(ctx: TaskContext, partition_id: int) -> Partition:
    """This client's training and validation images."""
    own_dir = ctx.node_config.get(NODE_DATA_DIR_KEY)
    if own_dir:  # deployment: this node's folder is its partition
        paths, labels, _ = list_images(str(own_dir))
        order = np.random.default_rng(ctx.seed).permutation(len(paths))
        n_val = int(round(len(paths) * float(ctx.settings.client_val_fraction)))
        val, train = order[:n_val], order[n_val:]
        return Partition(
            train=ImageFiles([paths[i] for i in train], labels[train], _image_size(ctx)),
            val=ImageFiles([paths[i] for i in val], labels[val], _image_size(ctx)))
    (pool_paths, pool_labels), _ = hold_out_test(ctx, *list_images(_shared_dir(ctx))[:2])
    part = partition_pool(ctx, partition_id, list(pool_paths), pool_labels)
    return Partition(train=ImageFiles(*part.train, _image_size(ctx)),
                     val=ImageFiles(*part.val, _image_size(ctx)))


def load_test(ctx: TaskContext) -> Any:
    """The server's test split of the shared folder (None without one: deployment)."""
    if not ctx.options.get("data_dir"):
        return None
    _, (test_paths, test_labels) = hold_out_test(ctx, *list_images(_shared_dir(ctx))[:2])
    return ImageFiles(list(test_paths), test_labels, _image_size(ctx))


def label_names(ctx: TaskContext) -> tuple[str, ...] | None:
    """Class names (the folder names), saved with the run's start-up report."""
    if not ctx.options.get("data_dir"):
        return None
    return list_images(_shared_dir(ctx))[2]
