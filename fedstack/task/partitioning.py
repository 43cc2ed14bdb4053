"""Partitioning the train pool among clients with flwr-datasets partitioners."""

from __future__ import annotations

import hashlib
import warnings
from typing import Any

import numpy as np

from fedstack.config import ConfigError

#: Start of the warning flwr-datasets' DirichletPartitioner gives before each redraw.
DIRICHLET_REDRAW_WARNING = "The specified min_partition_size"


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


#: Partitionings kept per process (each client, and the start-up check for every client,
#: asks for one partition of the same draw: computing the draw once is enough).
PARTITION_CACHE_SIZE = 8
_PARTITIONS: dict[tuple[Any, ...], list[np.ndarray]] = {}


def partition_indices(
    labels: np.ndarray, num_partitions: int, settings: Any, seed: int
) -> list[np.ndarray]:
    """Indices into the train pool of every partition (disjoint; seed-determined)."""
    labels = np.asarray(labels)
    key = (
        hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest(),
        labels.dtype.str,
        len(labels),
        int(num_partitions),
        _settings_key(settings),
        int(seed),
    )
    parts = _PARTITIONS.get(key)
    if parts is None:
        parts = _draw_partitions(labels, num_partitions, settings, seed)
        if len(_PARTITIONS) >= PARTITION_CACHE_SIZE:
            _PARTITIONS.clear()
        _PARTITIONS[key] = parts
    return [part.copy() for part in parts]


def _settings_key(settings: Any) -> str:
    from omegaconf import OmegaConf

    values = (
        OmegaConf.to_container(settings, resolve=True)
        if OmegaConf.is_config(settings)
        else settings
    )
    return repr(sorted(dict(values).items()))


def _draw_partitions(
    labels: np.ndarray, num_partitions: int, settings: Any, seed: int
) -> list[np.ndarray]:
    from datasets import Dataset

    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    if num_partitions > len(labels):
        raise ConfigError(f"num_clients={num_partitions} is more than the {len(labels)} "
                          f"training samples to partition: use num_clients <= {len(labels)}")
    # IidPartitioner cuts contiguous shards: shuffle first so each shard is a random sample.
    order = np.random.default_rng(seed).permutation(len(labels))
    table = Dataset.from_dict({"label": labels[order].tolist(), "index": order.tolist()})
    partitioner = build_partitioner(settings, num_partitions, seed)
    partitioner.dataset = table
    try:
        with warnings.catch_warnings():
            # flwr-datasets warns at every Dirichlet redraw; a split that never succeeds
            # becomes the ConfigError below, so the redraws themselves are noise.
            warnings.filterwarnings("ignore", message=DIRICHLET_REDRAW_WARNING)
            parts = [np.asarray(partitioner.load_partition(i)["index"], dtype=np.int64)
                     for i in range(num_partitions)]
    except ValueError as exc:
        keys = partition_keys(settings)
        raise ConfigError(f"partition={settings.name}{f' ({keys})' if keys else ''} cannot split "
                          f"{len(labels)} samples into num_clients={num_partitions} partitions: "
                          f"{exc}{_remedy(settings)}") from exc
    return parts


def partition_keys(settings: Any) -> str:
    """The partition group's settings as `partition.key=value`, for error messages."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(settings) if OmegaConf.is_config(settings) else settings
    return ", ".join(f"partition.{k}={v}" for k, v in dict(values).items() if k != "name")


def _remedy(settings: Any) -> str:
    if settings.name == "dirichlet":
        # flwr-datasets redraws up to 10 times until every client gets min_partition_size.
        return (f" (no Dirichlet draw gave every client >= partition.min_partition_size="
                f"{settings.min_partition_size} samples: raise partition.alpha, or lower "
                "partition.min_partition_size or num_clients)")
    if settings.name == "shards":
        return " (lower partition.shards_per_client or num_clients)"
    return " (lower num_clients)"


def client_partition(labels: np.ndarray, partition_id: int, num_partitions: int, settings: Any,
                     seed: int) -> np.ndarray:
    """Indices of one client's partition."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} outside [0, {num_partitions})")
    return partition_indices(labels, num_partitions, settings, seed)[partition_id]
