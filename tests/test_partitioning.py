"""Partitioners: sizes, disjointness, determinism, and Dirichlet label skew."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from fedstack.config import ConfigError, compose_config
from fedstack.task.client_data import load_client_data
from fedstack.task.datasets import load_task_data
from fedstack.task.partitioning import partition_indices

LABELS = np.repeat(np.arange(10), 100)  # 1000 samples, 10 balanced classes


def settings(**kwargs):
    return OmegaConf.create(kwargs)


def _check_disjoint_cover(parts: list[np.ndarray], n: int, exact: bool = True) -> None:
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "partitions overlap"
    assert joined.min() >= 0 and joined.max() < n
    if exact:
        assert len(joined) == n


def test_iid_equal_sizes_no_overlap_full_cover() -> None:
    parts = partition_indices(LABELS, 5, settings(name="iid"), seed=0)
    assert [len(p) for p in parts] == [200] * 5
    _check_disjoint_cover(parts, len(LABELS))
    # each IID partition sees (almost) every class
    assert all(len(np.unique(LABELS[p])) == 10 for p in parts)


def test_partitions_follow_the_seed() -> None:
    s = settings(name="dirichlet", alpha=0.5, min_partition_size=10, self_balancing=False)
    a = partition_indices(LABELS, 5, s, seed=3)
    b = partition_indices(LABELS, 5, s, seed=3)
    c = partition_indices(LABELS, 5, s, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def _label_skew(parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    dists = []
    for p in parts:
        hist = np.bincount(LABELS[p], minlength=10) / len(p)
        dists.append(0.5 * np.abs(hist - 0.1).sum())
    return float(np.mean(dists))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skew = {}
    for alpha in (0.1, 1.0, 1000.0):
        s = settings(name="dirichlet", alpha=alpha, min_partition_size=5, self_balancing=False)
        parts = partition_indices(LABELS, 5, s, seed=0)
        _check_disjoint_cover(parts, len(LABELS))
        skew[alpha] = _label_skew(parts)
    assert skew[0.1] > skew[1.0] > skew[1000.0]
    assert skew[0.1] > 0.4 and skew[1000.0] < 0.1


def test_shards_give_each_client_few_classes() -> None:
    s = settings(name="shards", shards_per_client=2)
    parts = partition_indices(LABELS, 5, s, seed=0)
    _check_disjoint_cover(parts, len(LABELS), exact=False)
    assert all(len(np.unique(LABELS[p])) <= 4 for p in parts)
    assert _label_skew(parts) > 0.5


def test_impossible_split_is_a_clear_error() -> None:
    s = settings(name="dirichlet", alpha=0.5, min_partition_size=500, self_balancing=False)
    with pytest.raises(ConfigError, match=r"partition\.min_partition_size=500.*cannot split "
                       r"1000 samples into num_clients=5"):
        partition_indices(LABELS, 5, s, seed=0)


def test_client_data_is_disjoint_from_the_central_test_split() -> None:
    cfg = compose_config(["partition=iid"])
    data = load_task_data(cfg.task, cfg.seed)
    test_rows = {row.tobytes() for row in data.x_test}
    seen = set()
    for pid in range(cfg.num_clients):
        client = load_client_data(cfg, pid, cfg.num_clients)
        rows = {row.tobytes() for row in client.train.tensors[0].numpy()}
        rows |= {row.tobytes() for row in client.x_val}
        assert not rows & seen
        seen |= rows
    # digits has a few duplicate images; identical pixels may appear on both sides
    assert len(seen & test_rows) <= 5
