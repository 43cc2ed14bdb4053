"""Datasets of the tasks, as dense arrays with a fixed central test split.

Every party (server and each client) derives the same train/test split from the run's seed,
so the server's central test split never overlaps any client's data and no data travels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TaskData:
    """The train pool (partitioned among clients) and the central test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    from sklearn.model_selection import train_test_split

    return tuple(train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y))


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # Statistics of the train pool only. In a real consortium these would be agreed
    # reference statistics; here every party can derive them without sharing records.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    return (x_train - mean) / std, (x_test - mean) / std


def load_digits_task(test_fraction: float, seed: int) -> TaskData:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = _split(x, y, test_fraction, seed)
    return TaskData(x_tr, y_tr, x_te, y_te, num_classes=10)


def load_breast_cancer_task(test_fraction: float, seed: int) -> TaskData:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = _split(x, y, test_fraction, seed)
    x_tr, x_te = _standardise(x_tr, x_te)
    return TaskData(x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te, num_classes=2)


def _hf_to_arrays(ds: Any, settings: Any) -> tuple[np.ndarray, np.ndarray]:
    """Convert a `datasets.Dataset` to (features, integer labels)."""
    label_col = settings.label_column
    if label_col not in ds.column_names:
        raise ValueError(f"task.label_column={label_col!r} is not a column of the dataset "
                         f"(columns: {ds.column_names})")
    labels_raw = np.asarray(ds[label_col])
    if labels_raw.dtype.kind in "iu":
        y = labels_raw.astype(np.int64)
    else:
        # String or float labels: map the sorted distinct values to 0..C-1.
        classes, y = np.unique(labels_raw, return_inverse=True)
        y = y.astype(np.int64)
        del classes
    if settings.image_column:
        col = settings.image_column
        if col not in ds.column_names:
            raise ValueError(f"task.image_column={col!r} is not a column of the dataset "
                             f"(columns: {ds.column_names})")
        size = int(settings.image_size)
        images = [np.asarray(img.convert("L").resize((size, size)), dtype=np.float32) / 255.0
                  for img in ds[col]]
        return np.stack(images)[:, None, :, :], y
    columns = settings.feature_columns
    if columns is None:
        columns = [c for c in ds.column_names if c != label_col
                   and np.asarray(ds[c][:1]).dtype.kind in "iufb"]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"task.feature_columns: no such columns {missing} "
                         f"(columns: {ds.column_names})")
    if not columns:
        raise ValueError("task.feature_columns: the dataset has no numeric feature column")
    x = np.stack([np.asarray(ds[c], dtype=np.float32) for c in columns], axis=1)
    return x, y


def load_hf_task(settings: Any, seed: int) -> TaskData:
    """Load any Hugging Face dataset (or local files through a builder) via flwr-datasets.

    `FederatedDataset` does the loading (and, on the Hub, the download and caching); the
    resulting split is then carved and partitioned exactly like the embedded tasks.
    """
    from flwr_datasets import FederatedDataset

    kwargs: dict[str, Any] = {}
    if settings.data_files is not None:
        data_files = settings.data_files
        if not isinstance(data_files, (str, list, dict)):
            data_files = dict(data_files)  # OmegaConf containers
        kwargs["data_files"] = data_files
    fds = FederatedDataset(dataset=settings.dataset, partitioners={settings.split: 1},
                           shuffle=True, seed=seed, **kwargs)
    x, y = _hf_to_arrays(fds.load_split(settings.split), settings)
    if settings.test_split:
        x_te, y_te = _hf_to_arrays(fds.load_split(settings.test_split), settings)
        x_tr, y_tr = x, y
    else:
        x_tr, x_te, y_tr, y_te = _split(x, y, settings.test_fraction, seed)
    if x_tr.ndim == 2:
        x_tr, x_te = _standardise(x_tr, x_te)
    num_classes = settings.num_classes or int(max(y_tr.max(), y_te.max()) + 1)
    return TaskData(x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te, num_classes)


@functools.lru_cache(maxsize=4)
def _load_cached(task_yaml: str, seed: int) -> TaskData:
    from omegaconf import OmegaConf

    settings = OmegaConf.create(task_yaml)
    if settings.name == "digits":
        return load_digits_task(settings.test_fraction, seed)
    if settings.name == "breast_cancer":
        return load_breast_cancer_task(settings.test_fraction, seed)
    if settings.name == "hf":
        return load_hf_task(settings, seed)
    raise ValueError(f"unknown task {settings.name!r}")


def load_task_data(task_settings: Any, seed: int) -> TaskData:
    """The task's data for a run (cached per process: Ray actors serve many messages)."""
    from omegaconf import OmegaConf

    return _load_cached(OmegaConf.to_yaml(task_settings, resolve=True), int(seed))
