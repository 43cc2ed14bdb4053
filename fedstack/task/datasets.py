"""Datasets of the tasks, as dense arrays with a fixed central test split.

Every party (server and each client) derives the same train/test split from the run's seed,
so the server's central test split never overlaps any client's data and no data travels.
"""

from __future__ import annotations

import functools
import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedstack.config import ConfigError

#: Marks a remote `task.data_files` entry (left to the builder, not checked on local disk).
URL_MARK = "://"
#: Characters that make a `task.data_files` entry a glob pattern.
GLOB_CHARS = "*?["

@dataclass(frozen=True)
class TaskData:
    """The train pool (partitioned among clients) and the central test split."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    #: What each class index stands for (`label_names[i]` is class i), where the data says:
    #: the dataset's own class names, or the sorted distinct values of a text/float label
    #: column (mapped to 0..C-1). None when the labels are plain integers without names.
    label_names: tuple[str, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def label_mapping(self) -> dict[str, int] | None:
        """{original label: class index}, for the run directory (None: labels are indices)."""
        if self.label_names is None:
            return None
        return {name: index for index, name in enumerate(self.label_names)}


def split_examples(
    x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, ...]:
    """(x_train, x_test, y_train, y_test): a stratified, seed-determined test split."""
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
    x_tr, x_te, y_tr, y_te = split_examples(x, y, test_fraction, seed)
    return TaskData(
        x_tr,
        y_tr,
        x_te,
        y_te,
        num_classes=10,
        label_names=tuple(str(name) for name in bunch.target_names),
    )


def load_breast_cancer_task(test_fraction: float, seed: int) -> TaskData:
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    x = bunch.data.astype(np.float32)
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = split_examples(x, y, test_fraction, seed)
    x_tr, x_te = _standardise(x_tr, x_te)
    return TaskData(x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te, num_classes=2,
                    label_names=tuple(str(name) for name in bunch.target_names))


def load_synthetic_task(settings: Any, seed: int) -> TaskData:
    """Generated CIFAR-shaped images (`fedstack.task.synthetic`), split like the others."""
    from fedstack.task.synthetic import generate_images

    x, y = generate_images(
        int(settings.num_samples),
        int(settings.num_classes),
        int(settings.channels),
        int(settings.image_size),
        float(settings.noise),
        seed,
    )
    x_tr, x_te, y_tr, y_te = split_examples(x, y, settings.test_fraction, seed)
    return TaskData(x_tr, y_tr, x_te, y_te, num_classes=int(settings.num_classes))


def _data_file_patterns(data_files: Any) -> list[str]:
    """Every path or glob in `task.data_files` (a string, a list, or a {split: ...} mapping)."""
    if isinstance(data_files, str):
        return [data_files]
    if isinstance(data_files, dict):
        return [p for value in data_files.values() for p in _data_file_patterns(value)]
    return [str(p) for p in data_files]


def check_data_files(data_files: Any) -> list[Path]:
    """The local files `task.data_files` names; ConfigError if one is missing, unreadable or empty.

    Why before the builder: `datasets` reports a missing file as FileNotFoundError and an
    empty csv as a bare `DatasetGenerationError`, neither naming the key. Remote URLs
    (`scheme://...`) are left to the builder.
    """
    found: list[Path] = []
    for pattern in _data_file_patterns(data_files):
        if URL_MARK in pattern:
            continue
        expanded = Path(os.path.expanduser(pattern))
        if any(ch in pattern for ch in GLOB_CHARS):
            candidates = [Path(m) for m in sorted(glob.glob(str(expanded), recursive=True))]
        elif expanded.is_dir():
            candidates = sorted(expanded.rglob("*"))
        else:
            candidates = [expanded]
        # `datasets` skips hidden files (".*", "__*"); so does this check.
        files = [p for p in candidates if p.is_file() and not p.name.startswith((".", "__"))]
        if not files:
            raise ConfigError(f"task.data_files={pattern!r}: no such file (relative paths are "
                              f"resolved against {os.getcwd()})")
        for path in files:
            if not os.access(path, os.R_OK):
                raise ConfigError(f"task.data_files={pattern!r}: {path} is not readable")
            if path.stat().st_size == 0:
                raise ConfigError(f"task.data_files={pattern!r}: {path} is empty")
        found.extend(files)
    return found


def _label_values(ds: Any, settings: Any) -> np.ndarray:
    label_col = settings.label_column
    if label_col not in ds.column_names:
        raise ConfigError(f"task.label_column={label_col!r} is not a column of the dataset "
                          f"(columns: {ds.column_names})")
    return np.asarray(ds[label_col])


def _class_label_names(ds: Any, settings: Any) -> tuple[str, ...] | None:
    """The names of a `ClassLabel` column (e.g. imagefolder's directory names), if any."""
    names = getattr(ds.features.get(settings.label_column), "names", None)
    return tuple(str(n) for n in names) if names else None


def encode_labels(*columns: np.ndarray) -> tuple[list[np.ndarray], tuple[str, ...] | None]:
    """Integer class indices for label columns that together define the classes.

    Integer labels are kept as they are. Text (or float) labels are mapped to 0..C-1 by the
    sorted distinct values of *all* columns together, so a split that lacks a class still
    agrees with the others, and every party derives the same mapping from the same data.
    Returns (encoded columns, the original value of each index or None for integer labels).
    """
    for col in columns:
        missing = int(sum(v is None or (isinstance(v, float) and v != v) for v in col.tolist()))
        if missing:
            raise ConfigError(f"task.label_column: {missing} rows have no label")
    numeric = [col.dtype.kind in "iuf" for col in columns]
    if any(numeric) and not all(numeric):
        raise ConfigError("task.label_column: the splits disagree on the label type "
                          f"({', '.join(str(col.dtype) for col in columns)})")
    if all(col.dtype.kind in "iu" for col in columns):
        return [col.astype(np.int64) for col in columns], None
    kind: Any = np.float64 if all(numeric) else str
    classes = np.unique(np.concatenate([col.astype(kind) for col in columns]))
    encoded = [np.searchsorted(classes, col.astype(kind)).astype(np.int64) for col in columns]
    return encoded, tuple(str(c) for c in classes.tolist())


#: PIL modes kept as they are when `task.image_mode` is null, with their value range.
NATIVE_IMAGE_SCALE: dict[str, float] = {
    "L": 255.0,
    "LA": 255.0,
    "RGB": 255.0,
    "RGBA": 255.0,
    "I;16": 65535.0,
    "I": 1.0,
    "F": 1.0,
}
#: What other PIL modes become when `task.image_mode` is null ("1": bilevel, "P": palette).
NATIVE_IMAGE_FALLBACK: dict[str, str] = {"1": "L", "P": "RGB", "PA": "RGBA"}
#: Channel count of the PIL modes fedstack can convert to (task.image_mode).
IMAGE_MODE_CHANNELS: dict[str, int] = {
    "L": 1,
    "LA": 2,
    "RGB": 3,
    "RGBA": 4,
    "I;16": 1,
    "I": 1,
    "F": 1,
}


def _native_mode(img: Any) -> str:
    mode = str(img.mode)
    if mode in NATIVE_IMAGE_SCALE:
        return mode
    if mode == "P" and "transparency" in getattr(img, "info", {}):
        return "RGBA"
    return NATIVE_IMAGE_FALLBACK.get(mode, "RGB")


def image_array(images: Any, mode: str | None, size: int | None) -> np.ndarray:
    """(N, C, H, W) float32 pixels of PIL images, at their native size and channels.

    `mode` (task.image_mode, a PIL mode such as "L" or "RGB") converts every image, `size`
    (task.image_size) resizes every image to size x size; None keeps what the files have
    (RGB 32x32 stays 3x32x32), and then every image must agree, or the error names the key
    that makes them agree. 8-bit values scale to [0, 1], 16-bit ones by 65535.
    """
    arrays: list[np.ndarray] = []
    modes: set[str] = set()
    shapes: set[tuple[int, ...]] = set()
    for img in images:
        target = mode if mode is not None else _native_mode(img)
        if img.mode != target:
            img = img.convert(target)
        if size is not None:
            img = img.resize((int(size), int(size)))
        pixels = np.asarray(img, dtype=np.float32) / NATIVE_IMAGE_SCALE.get(target, 255.0)
        pixels = pixels[None, :, :] if pixels.ndim == 2 else np.moveaxis(pixels, -1, 0)
        modes.add(target)
        shapes.add(pixels.shape[1:])
        arrays.append(pixels)
    if not arrays:
        raise ConfigError("task.image_column: the split has no images")
    if len(modes) > 1:
        raise ConfigError(
            f"task.image_mode=null keeps each image's channels, but the images "
            f"have modes {sorted(modes)}: set task.image_mode (e.g. RGB or L) "
            "to convert them to one"
        )
    if len(shapes) > 1:
        listed = sorted(f"{h}x{w}" for h, w in shapes)
        raise ConfigError(
            f"task.image_size=null keeps each image's size, but the images "
            f"have sizes {listed[:5]}{' ...' if len(listed) > 5 else ''}: set "
            "task.image_size to resize them to one"
        )
    return np.stack(arrays)


def _hf_features(ds: Any, settings: Any) -> np.ndarray:
    """The feature array of a `datasets.Dataset` (images or numeric columns)."""
    label_col = settings.label_column
    if settings.image_column:
        col = settings.image_column
        if col not in ds.column_names:
            raise ConfigError(
                f"task.image_column={col!r} is not a column of the dataset "
                f"(columns: {ds.column_names})"
            )
        return image_array(ds[col], settings.image_mode, settings.image_size)
    columns = settings.feature_columns
    if columns is None:
        columns = [c for c in ds.column_names if c != label_col
                   and np.asarray(ds[c][:1]).dtype.kind in "iufb"]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(f"task.feature_columns: no such columns {missing} "
                          f"(columns: {ds.column_names})")
    if not columns:
        raise ConfigError("task.feature_columns: the dataset has no numeric feature column")
    return np.stack([np.asarray(ds[c], dtype=np.float32) for c in columns], axis=1)


def _load_split(fds: Any, split: str, settings: Any, key: str) -> Any:
    """One split, with the builder's failures turned into errors that name the keys."""
    from datasets.exceptions import DatasetGenerationError

    source = (f"task.dataset={settings.dataset!r}, task.data_files={settings.data_files!r}"
              if settings.data_files is not None else f"task.dataset={settings.dataset!r}")
    try:
        ds = fds.load_split(split)
    except DatasetGenerationError as exc:
        cause = exc.__cause__ or exc.__context__ or exc
        raise ConfigError(f"{source}: the {settings.dataset!r} builder cannot read the data "
                          f"({type(cause).__name__}: {cause})") from None
    except (FileNotFoundError, ConnectionError) as exc:
        raise ConfigError(f"{source}: cannot find or download the dataset "
                          f"({type(exc).__name__}: {exc})") from None
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{key}={split!r}: cannot load this split from {source} "
                          f"({type(exc).__name__}: {exc})") from None
    if len(ds) == 0:
        raise ConfigError(f"{key}={split!r}: the split has no rows ({source})")
    return ds


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
        check_data_files(data_files)
        kwargs["data_files"] = data_files
    fds = FederatedDataset(dataset=settings.dataset, partitioners={settings.split: 1},
                           shuffle=True, seed=seed, **kwargs)
    train = _load_split(fds, settings.split, settings, "task.split")
    test = _load_split(fds, settings.test_split, settings, "task.test_split") \
        if settings.test_split else None
    raw = [_label_values(train, settings)] + ([_label_values(test, settings)] if test else [])
    labels, label_names = encode_labels(*raw)
    label_names = label_names or _class_label_names(train, settings)
    x = _hf_features(train, settings)
    if test is not None:
        x_tr, y_tr = x, labels[0]
        x_te, y_te = _hf_features(test, settings), labels[1]
    else:
        try:
            x_tr, x_te, y_tr, y_te = split_examples(x, labels[0], settings.test_fraction, seed)
        except ValueError as exc:
            raise ConfigError(
                f"task.test_fraction={settings.test_fraction}: cannot carve a "
                f"test split stratified by task.label_column="
                f"{settings.label_column!r} from {len(x)} rows ({exc})"
            ) from None
    if x_tr.shape[1:] != x_te.shape[1:]:
        raise ConfigError(
            f"task.split={settings.split!r} has examples of shape "
            f"{x_tr.shape[1:]} but task.test_split={settings.test_split!r} "
            f"{x_te.shape[1:]}"
            + (
                ": set task.image_size and task.image_mode to make them one"
                if x_tr.ndim == 4
                else ""
            )
        )
    if x_tr.ndim == 2:
        x_tr, x_te = _standardise(x_tr, x_te)
    seen = int(max(y_tr.max(), y_te.max()) + 1)
    if min(y_tr.min(), y_te.min()) < 0:
        raise ConfigError(f"task.label_column={settings.label_column!r}: integer labels must "
                          "be class indices 0..C-1 (found a negative label)")
    if settings.num_classes is not None and settings.num_classes < seen:
        raise ConfigError(f"task.num_classes={settings.num_classes} but the labels go up to "
                          f"{seen - 1}")
    num_classes = settings.num_classes or seen
    return TaskData(x_tr.astype(np.float32), y_tr, x_te.astype(np.float32), y_te, num_classes,
                    label_names=label_names)


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
    if settings.name == "synthetic_cifar":
        return load_synthetic_task(settings, seed)
    raise ValueError(f"unknown task {settings.name!r}")


def load_task_data(task_settings: Any, seed: int) -> TaskData:
    """The task's data for a run (cached per process: Ray actors serve many messages)."""
    from omegaconf import OmegaConf

    return _load_cached(OmegaConf.to_yaml(task_settings, resolve=True), int(seed))
