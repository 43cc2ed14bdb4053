"""A run's directory: config, history (JSON lines + CSV), checkpoints, plots, summary, resume.

Driven through the real ServerApp body (`run_server`) and the real ClientApp on an in-process
grid, so it is fast; the Ray runtime is covered by the e2e tests.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.outputs.run_directory import latest_checkpoint, load_checkpoint
from fedstack.server_app import run_server
from tests.inprocess_grid import InProcessGrid, PowerCut, die_in_round

BASE = ["task=breast_cancer", "partition=iid", "num_clients=3", "min_train_nodes=2"]


def _run_dir(tmp_path: Path) -> Path:
    (run_dir,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return run_dir


def test_run_writes_every_output(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=3", f"output_dir={tmp_path}", "run_name=r1"])
    summary = run_server(InProcessGrid(client_app, 3), cfg)
    run_dir = tmp_path / "r1"
    assert summary["run_dir"] == str(run_dir)
    assert (run_dir / "config.yaml").read_text().count("breast_cancer") >= 1
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for row in rows[1:]:
        assert row["train_loss"] > 0 and 0 <= row["eval_accuracy"] <= 1
        assert 0 <= row["central_accuracy"] <= 1 and row["bytes_down"] > row["bytes_up"] > 0
        assert {"train", "evaluate", "central_evaluate", "aggregate"} <= set(row["seconds"])
        assert row["exchanges"] == 2 and len(row["aggregated"]) == 3
    with open(run_dir / "history.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("rounds_completed", "final_accuracy", "final_loss", "aggregation", "dp", "task",
                "num_clients"):
        assert key in saved
    assert saved["rounds_completed"] == 3 and saved["final_accuracy"] > 0.85
    assert saved["aggregation"] == "fedavg" and saved["task"] == "breast_cancer"
    # round 0 is the initial model (a fresh start point for resume), then one per round
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("round-*.npz"))
    assert checkpoints == [f"round-{r:04d}.npz" for r in range(4)]
    for png in ("accuracy.png", "loss.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_result(tmp_path: Path) -> None:
    results = []
    for name in ("a", "b"):
        cfg = compose_config([*BASE, "num_rounds=2", f"output_dir={tmp_path}", f"run_name={name}"])
        run_server(InProcessGrid(client_app, 3), cfg)
        _, path = latest_checkpoint(tmp_path / name)
        results.append(load_checkpoint(path))
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key].numpy(), results[1][key].numpy())


def test_resume_after_the_server_dies_mid_round(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=4", f"output_dir={tmp_path}", "run_name=crash"])
    grid = InProcessGrid(client_app, 3)

    grid.reply_hook = die_in_round(3)
    with pytest.raises(PowerCut):
        run_server(grid, cfg)
    run_dir = tmp_path / "crash"
    assert latest_checkpoint(run_dir)[0] == 2
    crashed = json.loads((run_dir / "summary.json").read_text())
    assert crashed["status"] == "failed" and "power cut" in crashed["reason"]

    resumed = compose_config([f"resume={run_dir}"])
    summary = run_server(InProcessGrid(client_app, 3), resumed)
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert summary["rounds_completed"] == 4 and summary["run_dir"] == str(run_dir)
    assert summary["status"] == "completed"
    assert latest_checkpoint(run_dir)[0] == 4

    # Resuming a finished run does nothing but re-write the summary.
    again = run_server(InProcessGrid(client_app, 3), resumed)
    assert again["rounds_completed"] == 4


def test_resume_of_a_directory_that_is_no_run_fails_clearly(tmp_path: Path) -> None:
    from fedstack.config import ConfigError

    with pytest.raises(ConfigError, match="not a run dir"):
        run_server(InProcessGrid(client_app, 3), compose_config([f"resume={tmp_path}"]))


def test_round_with_too_few_clients_keeps_the_model(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=1", f"output_dir={tmp_path}", "run_name=few",
                          "min_valid_replies=3", "round_timeout=2"])
    grid = InProcessGrid(client_app, 3)
    grid.reply_hook = lambda node, req, rep: None if node == grid.node_ids[0] else rep
    summary = run_server(grid, cfg)
    rows = [json.loads(line) for line in (tmp_path / "few" / "history.jsonl").read_text()
            .splitlines()]
    assert rows[1]["aborted"] and "min_valid_replies=3" in rows[1]["aborted"]
    assert rows[1]["central_accuracy"] == rows[0]["central_accuracy"]
    assert summary["rounds_failed"] == [1] and summary["rounds_completed"] == 0
    assert summary["status"] == "failed" and "max_failed_rounds=0" in summary["reason"]
