"""`task=hf` through flwr-datasets on local csv / parquet / image files written by the test."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedstack.config import ConfigError, compose_config
from fedstack.task.client_data import load_client_data
from fedstack.task.datasets import load_task_data


def _tabular_frame(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"])
    frame["note"] = ["text"] * n  # non-numeric column: must be ignored by default
    frame["label"] = y
    return frame


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_local_tabular_files(tmp_path: Path, fmt: str) -> None:
    frame = _tabular_frame()
    path = tmp_path / f"data.{fmt}"
    frame.to_csv(path, index=False) if fmt == "csv" else frame.to_parquet(path, index=False)
    cfg = compose_config(["task=hf", f"task.dataset={fmt}", f"task.data_files={path}",
                          "partition=iid", "num_clients=3", "min_train_nodes=2"])
    data = load_task_data(cfg.task, cfg.seed)
    assert data.input_shape == (4,) and data.num_classes == 2
    assert len(data.y_train) + len(data.y_test) == len(frame)
    sizes = [len(load_client_data(cfg, i, 3).train) + len(load_client_data(cfg, i, 3).y_val)
             for i in range(3)]
    assert sum(sizes) == len(data.y_train)


def test_selected_feature_columns_and_string_labels(tmp_path: Path) -> None:
    frame = _tabular_frame()
    frame["label"] = np.where(frame["label"] == 1, "sick", "healthy")
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    cfg = compose_config(["task=hf", "task.dataset=csv", f"task.data_files={path}",
                          "task.feature_columns=[a,b]", "partition=iid"])
    data = load_task_data(cfg.task, cfg.seed)
    assert data.input_shape == (2,) and set(np.unique(data.y_train)) == {0, 1}
    assert data.label_mapping == {"healthy": 0, "sick": 1}


def test_local_image_folder(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(30):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "train" / label / f"{i}.png")
    cfg = compose_config(["task=hf", "task.dataset=imagefolder",
                          f"task.data_files={tmp_path}/train/**", "task.image_column=image",
                          "task.image_size=8", "task.image_mode=L", "partition=iid",
                          "num_clients=2"])
    data = load_task_data(cfg.task, cfg.seed)
    assert data.input_shape == (1, 8, 8) and data.num_classes == 2
    assert data.x_train.min() >= 0.0 and data.x_train.max() <= 1.0
    # imagefolder's class names (its directories) say what each index means
    assert data.label_mapping == {"cats": 0, "dogs": 1}


def test_missing_label_column_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    _tabular_frame().rename(columns={"label": "y"}).to_csv(path, index=False)
    cfg = compose_config(["task=hf", "task.dataset=csv", f"task.data_files={path}"])
    with pytest.raises(ConfigError, match=r"task\.label_column='label'"):
        load_task_data(cfg.task, cfg.seed)


def test_empty_csv_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.touch()
    cfg = compose_config(["task=hf", "task.dataset=csv", f"task.data_files={path}"])
    with pytest.raises(ConfigError, match=r"task\.data_files=.* is empty"):
        load_task_data(cfg.task, cfg.seed)


def test_missing_labels_are_refused(tmp_path: Path) -> None:
    frame = _tabular_frame()
    frame["label"] = np.where(frame["label"] == 1, "sick", "healthy")
    frame.loc[3, "label"] = None
    path = tmp_path / "data.csv"
    frame.to_csv(path, index=False)
    cfg = compose_config(["task=hf", "task.dataset=csv", f"task.data_files={path}"])
    with pytest.raises(ConfigError, match=r"task\.label_column: 1 rows have no label"):
        load_task_data(cfg.task, cfg.seed)


def test_hf_needs_a_dataset() -> None:
    with pytest.raises(ConfigError, match=r"task\.dataset"):
        compose_config(["task=hf"])


# --------------------------------------------------------------------------- native images


def _write_images(root: Path, sizes: dict[str, tuple[int, int]], modes: dict[str, str],
                  per_class: int = 12) -> dict[bytes, str]:
    """Image files per class (one size and mode per class); {pixel bytes: class} written."""
    from PIL import Image

    rng = np.random.default_rng(0)
    written: dict[bytes, str] = {}
    for label, (height, width) in sizes.items():
        (root / label).mkdir(parents=True)
        channels = 3 if modes[label] == "RGB" else 1
        for i in range(per_class):
            pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
            img = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, modes[label])
            img.save(root / label / f"{i}.png")
            written[np.moveaxis(pixels, -1, 0).astype(np.float32).tobytes()] = label
    return written


def _image_cfg(root: Path, *extra: str) -> Any:
    return compose_config(["task=hf", "task.dataset=imagefolder",
                           f"task.data_files={root}/**", "task.image_column=image",
                           "partition=iid", "num_clients=2", *extra])


def test_rgb_images_keep_their_native_size_and_channels(tmp_path: Path) -> None:
    written = _write_images(tmp_path / "img", {"cats": (32, 32), "dogs": (32, 32)},
                            {"cats": "RGB", "dogs": "RGB"})
    cfg = _image_cfg(tmp_path / "img")
    data = load_task_data(cfg.task, cfg.seed)
    assert data.input_shape == (3, 32, 32)  # not grayscale, not resized
    # Every example is exactly one of the files, pixel for pixel (scaled to [0, 1]).
    for x, y in zip(np.concatenate([data.x_train, data.x_test]),
                    np.concatenate([data.y_train, data.y_test]), strict=True):
        key = np.rint(x * 255.0).astype(np.float32).tobytes()
        assert written[key] == data.label_names[y]
    assert len(data.y_train) + len(data.y_test) == len(written)


def test_rgb_images_train_through_the_real_apps(tmp_path: Path) -> None:
    from fedstack.client_app import app as client_app
    from fedstack.server_app import run_server
    from tests.inprocess_grid import InProcessGrid

    _write_images(tmp_path / "img", {"cats": (32, 32), "dogs": (32, 32)},
                  {"cats": "RGB", "dogs": "RGB"})
    cfg = _image_cfg(tmp_path / "img", "num_rounds=1", f"output_dir={tmp_path / 'out'}",
                     "run_name=rgb")
    summary = run_server(InProcessGrid(client_app, 2), cfg)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    report = json.loads((tmp_path / "out" / "rgb" / "preflight.json").read_text())
    assert report["input_shape"] == [3, 32, 32]


def test_mixed_sizes_and_modes_name_the_key_that_unifies_them(tmp_path: Path) -> None:
    _write_images(tmp_path / "sizes", {"a": (32, 32), "b": (28, 28)}, {"a": "RGB", "b": "RGB"})
    with pytest.raises(ConfigError, match=r"task\.image_size=null.*28x28.*32x32.*"
                                          r"set task\.image_size"):
        load_task_data(_image_cfg(tmp_path / "sizes").task, 42)
    resized = _image_cfg(tmp_path / "sizes", "task.image_size=16")
    assert load_task_data(resized.task, 42).input_shape == (3, 16, 16)
    _write_images(tmp_path / "modes", {"a": (8, 8), "b": (8, 8)}, {"a": "RGB", "b": "L"})
    with pytest.raises(ConfigError, match=r"task\.image_mode=null.*\['L', 'RGB'\].*"
                                          r"set task\.image_mode"):
        load_task_data(_image_cfg(tmp_path / "modes").task, 42)
    for mode, channels in (("RGB", 3), ("L", 1)):
        converted = _image_cfg(tmp_path / "modes", f"task.image_mode={mode}")
        assert load_task_data(converted.task, 42).input_shape == (channels, 8, 8)
    with pytest.raises(ConfigError, match=r"task\.image_mode='CMYK' must be one of"):
        _image_cfg(tmp_path / "modes", "task.image_mode=CMYK")
