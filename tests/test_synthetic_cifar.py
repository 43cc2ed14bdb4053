"""`task=synthetic_cifar`: generated CIFAR-shaped data and ResNet-18-GN, the big-model path.

A round with one local step per client (each client's training set fits in one batch) keeps
the ≈ 11M-parameter path through the real ServerApp body and ClientApp covered in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.outputs.run_directory import load_checkpoint
from fedstack.privacy.engine import check_dp_model
from fedstack.server_app import run_server
from fedstack.task.datasets import load_task_data
from fedstack.task.models import build_model
from fedstack.task.synthetic import generate_images
from tests.inprocess_grid import InProcessGrid

#: ResNet-18 (CIFAR stem) with 10 classes: 11,173,962 parameters (GroupNorm keeps BN's count).
RESNET18_PARAMS = 11_173_962
#: A pool so small that every client's training set is one batch: one local step.
ONE_STEP = ["task=synthetic_cifar", "task.num_samples=60", "partition=iid", "num_clients=2",
            "num_rounds=1", "task.batch_size=32"]


def test_resnet18_gn_has_resnet18_size_and_passes_the_dp_model_check() -> None:
    model = build_model("resnet18_gn", (3, 32, 32), 10, 0)
    assert sum(p.numel() for p in model.parameters()) == RESNET18_PARAMS
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for mode in ("bk", "hooks"):
        check_dp_model(model, mode)  # raises, naming the layer, if it could not be clipped
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_generated_data_is_cifar_shaped_seeded_and_learnable() -> None:
    cfg = compose_config(["task=synthetic_cifar"])
    data = load_task_data(cfg.task, cfg.seed)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert data.x_train.dtype == np.float32
    assert len(data.y_train) + len(data.y_test) == 1000
    assert np.bincount(np.concatenate([data.y_train, data.y_test])).tolist() == [100] * 10
    x1, _ = generate_images(50, 10, 3, 32, 1.0, seed=1)
    x1b, _ = generate_images(50, 10, 3, 32, 1.0, seed=1)
    x2, _ = generate_images(50, 10, 3, 32, 1.0, seed=2)
    assert np.array_equal(x1, x1b) and not np.array_equal(x1, x2)
    # Not noise: class means of the train pool classify the test split well above chance.
    means = np.stack([data.x_train[data.y_train == k].mean(0) for k in range(10)])
    dist = ((data.x_test[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
    assert (dist.argmin(1) == data.y_test).mean() > 0.5


@pytest.mark.parametrize("dp", ["none", "local"])
def test_one_resnet18_round_through_the_real_apps(tmp_path: Path, dp: str) -> None:
    extra = ["dp.noise_multiplier=1.0", "dp.target_epsilon=null"] if dp == "local" else []
    cfg = compose_config([*ONE_STEP, f"dp={dp}", *extra, f"output_dir={tmp_path}",
                          "run_name=r"])
    summary = run_server(InProcessGrid(client_app, 2), cfg)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 1
    run_dir = tmp_path / "r"
    report = json.loads((run_dir / "preflight.json").read_text())
    assert report["input_shape"] == [3, 32, 32]
    assert all(0 < c["train"] <= cfg.task.batch_size for c in report["clients"])  # one step
    before = load_checkpoint(run_dir / "checkpoints" / "round-0000.npz")
    after = load_checkpoint(run_dir / "checkpoints" / "round-0001.npz")
    assert sum(before[k].numpy().size for k in before) == RESNET18_PARAMS
    assert not np.array_equal(before["classifier.weight"].numpy(),
                              after["classifier.weight"].numpy())


def test_too_few_samples_for_a_stratified_split_name_the_keys() -> None:
    from fedstack.config import ConfigError

    with pytest.raises(ConfigError, match=r"task\.num_samples=40 with task\.test_fraction=0\.2 "
                                          r"gives 8 test.*task\.num_classes=10"):
        compose_config(["task=synthetic_cifar", "task.num_samples=40"])
