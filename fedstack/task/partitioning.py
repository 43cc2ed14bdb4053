"""Partitioning the train pool among clients with flwr-datasets partitioners."""

from __future__ import annotations

from typing import Any

import numpy as np


def build_partitioner(settings: Any, num_partitions: int, seed: int) -> Any:
    """The flwr-datasets partitioner named by the `partition` config group."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    if settings.name == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if settings.name == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(settings.alpha),
            min_partition_size=int(settings.min_partition_size),
            self_balancing=bool(settings.self_balancing),
            shuffle=True,
            seed=seed,
        )
    if settings.name == "shards":
        return ShardPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            num_shards_per_partition=int(settings.shards_per_client),
            shuffle=True,
            seed=seed,
        )
    raise ValueError(f"unknown partition scheme {settings.name!r}")


def partition_indices(labels: np.ndarray, num_partitions: int, settings: Any,
                      seed: int) -> list[np.ndarray]:
    """Indices into the train pool of every partition (disjoint; seed-determined)."""
    from datasets import Dataset

    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    # IidPartitioner cuts contiguous shards: shuffle first so each shard is a random sample.
    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"label": labels[order].tolist(), "index": order.tolist()})
    partitioner = build_partitioner(settings, num_partitions, seed)
    partitioner.dataset = table
    try:
        parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                 for i in range(num_partitions)]
    except ValueError as exc:
        raise ValueError(f"partition={settings.name} cannot split {len(labels)} samples into "
                         f"{num_partitions} clients: {exc}") from exc
    return parts


def client_partition(labels: np.ndarray, partition_id: int, num_partitions: int, settings: Any,
                     seed: int) -> np.ndarray:
    """Indices of one client's partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} outside [0, {num_partitions})")
    return partition_indices(labels, num_partitions, settings, seed)[partition_id]
