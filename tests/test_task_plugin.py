"""The task plug-in contract, driven through the real ServerApp body and ClientApp.

The user's project (tests/task_project) has its own model, its own csv loader with its own
Dataset class and partitions, and is importable only from its own directory: the tests run
there, as `fedstack run` does from a project directory. Every aggregation and dp=local run
on it in-process (tests/inprocess_grid.py, no Ray); the Ray-backed ways in are covered by
tests/test_examples_e2e.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedstack.client_app import app as client_app
from fedstack.config import ConfigError, compose_config
from fedstack.preflight import check_run
from fedstack.server_app import run_server
from fedstack.task import plugin
from fedstack.task.contract import Partition, TaskContext, as_dataset, partition_pool
from fedstack.task.plugin import TaskError, load_task, task_context
from tests.inprocess_grid import InProcessGrid

PROJECT = Path(__file__).resolve().parent / "task_project"
PACKAGE = "plugin_task"
MODULE = f"{PACKAGE}.task"
NUM_CLIENTS = 3
FEATURES = 4


def _write_blobs(path: Path, n: int, seed: int) -> None:
    """Two well-separated Gaussian classes: any working pipeline reaches high accuracy."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, FEATURES)) + np.where(y[:, None] == 1, 1.5, -1.5)
    header = ",".join([*(f"f{i}" for i in range(FEATURES)), "label"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="")


def _forget_project() -> None:
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]
    plugin._TASKS.clear()


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Run from the user's project directory (its package is not on sys.path otherwise);
    yields the overrides that select its task and data."""
    data = tmp_path / "data"
    data.mkdir()
    _write_blobs(data / "train.csv", 240, seed=1)
    _write_blobs(data / "test.csv", 80, seed=2)
    saved_path = list(sys.path)
    _forget_project()
    monkeypatch.chdir(PROJECT)
    yield ["task=custom", f"task.module={MODULE}",
           f"+task.options.train_csv={data / 'train.csv'}",
           f"+task.options.test_csv={data / 'test.csv'}",
           f"+task.options.features={FEATURES}", "+task.options.classes=2",
           f"num_clients={NUM_CLIENTS}", f"output_dir={tmp_path / 'out'}", "run_name=r"]
    sys.path[:] = saved_path
    _forget_project()


def test_the_project_is_not_importable_without_the_fallback() -> None:
    # What makes the cwd fallback necessary (and the tests below meaningful).
    assert str(PROJECT) not in sys.path
    with pytest.raises(ModuleNotFoundError):
        __import__(MODULE)


LAYERS = [("fedavg", "none"), ("secagg", "none"), ("he", "none"), ("fedavg", "local")]


@pytest.mark.parametrize(("aggregation", "dp"), LAYERS, ids=[f"{a}-{d}" for a, d in LAYERS])
def test_plugin_task_runs_under_every_layer(project: list[str], tmp_path: Path,
                                            aggregation: str, dp: str) -> None:
    dp_keys = ["dp.noise_multiplier=0.3", "dp.target_epsilon=null"] if dp == "local" else []
    cfg = compose_config([*project, f"aggregation={aggregation}", f"dp={dp}", *dp_keys,
                          "num_rounds=2", "task.learning_rate=0.1"])
    grid = InProcessGrid(client_app, NUM_CLIENTS)
    summary = run_server(grid, cfg)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 2
    assert summary["final_accuracy"] > 0.85, summary
    run_dir = tmp_path / "out" / "r"
    report = json.loads((run_dir / "preflight.json").read_text())
    # The start-up check used the user's own loader: its partitions, its test split, its labels.
    task = load_task(cfg.task)
    for sizes in report["clients"]:
        part = task.load_partition(task_context(cfg), sizes["partition_id"])
        assert (sizes["train"], sizes["val"]) == (len(part.train), len(part.val))
    assert report["test_size"] == 80 and report["input_shape"] == [FEATURES]
    assert report["label_mapping"] == {"class-0": 0, "class-1": 1}
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert len(rows[-1]["aggregated"]) == NUM_CLIENTS
    if dp == "local":
        assert set(summary["epsilon_per_client"]) == {str(i) for i in range(NUM_CLIENTS)}


def test_custom_loss_by_dotted_path_is_used_also_under_dp(project: list[str]) -> None:
    loss_key = f"task.loss_fn={MODULE}:smoothed_loss"
    cfg = compose_config([*project, loss_key, "num_rounds=1"])
    summary = run_server(InProcessGrid(client_app, NUM_CLIENTS), cfg)
    assert summary["status"] == "completed"
    calls = sys.modules[MODULE].LOSS_CALLS["count"]
    assert calls > 0  # the clients trained (and evaluated) with the task's own loss
    dp_cfg = compose_config([*project, loss_key, "dp=local", "run_name=dp"])
    before = calls
    dp_summary = run_server(InProcessGrid(client_app, NUM_CLIENTS), dp_cfg)
    assert dp_summary["status"] == "completed"
    # DP-SGD trained with the task's loss too (clipped per example: test_dp_custom_loss.py)
    assert sys.modules[MODULE].LOSS_CALLS["count"] > before


def test_model_that_fails_the_dp_check_is_refused_naming_the_layer(project: list[str],
                                                                    tmp_path: Path) -> None:
    cfg = compose_config([*project, f"task.model_fn={MODULE}:build_batchnorm_model",
                          "dp=local"])
    with pytest.raises(ConfigError, match=r"build_model\) with dp=local.*BatchNorm"):
        check_run(cfg)
    assert not (tmp_path / "out").exists()
    # Without DP the same model is fine: the DP check is dp=local's only.
    check_run(compose_config([*project, f"task.model_fn={MODULE}:build_batchnorm_model"]))


def test_task_path_imports_from_any_directory(project: list[str], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the project: only task.path can find it
    with pytest.raises(TaskError, match=r"task\.module='plugin_task\.task': no such module.*"
                                        r"task\.path"):
        load_task(compose_config(project).task)
    cfg = compose_config([*project, f"task.path={PROJECT}"])
    assert load_task(cfg.task).source == "task.module=plugin_task.task"
    assert sys.path[0] == str(PROJECT)


def test_build_model_is_seeded_by_the_run(project: list[str]) -> None:
    cfg = compose_config(project)
    task = load_task(cfg.task)
    a, b = task.build_model(task_context(cfg)), task.build_model(task_context(cfg))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    other = compose_config([*project, "seed=7"])
    c = task.build_model(task_context(other))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_loader_and_model_mismatch_is_found_at_start_up(project: list[str],
                                                        tmp_path: Path) -> None:
    # The model has 1 output but the labels are 0/1: the loss cannot take them.
    cfg = compose_config([*project, "task.options.classes=1"])
    with pytest.raises(ConfigError, match=r"the loss on outputs \(2, 1\).*classes"):
        check_run(cfg)
    assert not (tmp_path / "out").exists()


def test_missing_functions_and_broken_modules_are_named(project: list[str],
                                                        tmp_path: Path) -> None:
    (tmp_path / "half_task.py").write_text("def build_model(ctx):\n    return None\n")
    (tmp_path / "needs_dep.py").write_text("import not_installed_anywhere_xyz\n")
    for name, pattern in [
        ("half_task", r"task\.module='half_task' has no load_partition.*task\.partition_fn"),
        ("needs_dep", r"a module it imports is missing.*not_installed_anywhere_xyz"),
    ]:
        cfg = compose_config([*project, f"task.module={name}", f"task.path={tmp_path}"])
        with pytest.raises(TaskError, match=pattern):
            load_task(cfg.task)
    with pytest.raises(ConfigError, match=r"task\.module.*must name your task module"):
        compose_config(["task=custom"])
    with pytest.raises(ConfigError, match=r"task\.model_fn='a b'.*dotted Python path"):
        compose_config([*project, "task.model_fn='a b'"])


def test_a_loader_returning_the_wrong_thing_is_named(project: list[str],
                                                    tmp_path: Path) -> None:
    (tmp_path / "bad_loader.py").write_text(
        "def load(ctx, partition_id):\n    return 'rows.csv'\n\n"
        "def load_arrays(ctx, partition_id):\n    return ([[1.0]], [0]), ('text', [0])\n")
    for function, pattern in [("load", r"load_partition\(ctx, 0\) returned str"),
                              ("load_arrays", r"load_partition\(ctx, 0\) val inputs: dtype "
                                              r"<U4 is not numeric")]:
        cfg = compose_config([*project, f"task.partition_fn=bad_loader:{function}",
                              f"task.path={tmp_path}"])
        with pytest.raises(TaskError, match=pattern):
            load_task(cfg.task).load_partition(task_context(cfg), 0)


def test_partition_pool_matches_the_builtin_tasks() -> None:
    """The helper a user's loader calls is the built-in tasks' own path: same sizes."""
    from fedstack.task.client_data import load_client_data
    from fedstack.task.datasets import load_task_data

    cfg = compose_config(["task=breast_cancer", "num_clients=4"])
    data = load_task_data(cfg.task, cfg.seed)
    for pid in range(4):
        part = partition_pool(task_context(cfg), pid, data.x_train, data.y_train)
        client = load_client_data(cfg, pid, 4)
        np.testing.assert_array_equal(part.val[1], client.y_val)
        assert len(part.train[1]) == len(client.train)


def test_as_dataset_accepts_arrays_and_datasets_and_names_bad_input() -> None:
    ds = as_dataset((np.zeros((3, 2), dtype=np.float64), np.arange(3)), "x")
    assert ds[0][0].dtype == torch.float32 and len(ds) == 3  # float64 arrays become float32
    assert as_dataset(ds, "x") is ds
    with pytest.raises(ValueError, match="3 inputs but 2 targets"):
        as_dataset((np.zeros((3, 2)), np.arange(2)), "x")
    with pytest.raises(TypeError, match=r"load_test: expected a torch Dataset"):
        as_dataset("data.csv", "load_test")


def test_builtin_tasks_use_the_same_contract() -> None:
    cfg = compose_config(["task=digits"])
    task = load_task(cfg.task)
    assert task.builtin and task.source == "task=digits"
    part = task.load_partition(task_context(cfg), 0)
    assert isinstance(part, Partition) and len(part.train) > len(part.val) > 0
    assert isinstance(task_context(cfg), TaskContext) and task_context(cfg).options == {}
