"""A run's outcome is one truthful fact: summary.json's status, and the exit code.

Driven through the real ServerApp body (`run_server`) and the real ClientApp on an in-process
grid; `fedstack run` and `fedstack outcome` as subprocesses where the exit code is the point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.app import Error, Message

from fedstack.client_app import app as client_app
from fedstack.config import ConfigError, compose_config
from fedstack.outputs.outcome import outcome_main, run_outcome
from fedstack.server_app import run_server
from tests.inprocess_grid import InProcessGrid

BASE = ["task=breast_cancer", "partition=iid", "num_clients=3", "min_train_nodes=2",
        "central_evaluation=false"]


def _every_client_fails(node: int, request: Message, reply: Message) -> Message:
    if request.metadata.message_type == "train":
        return Message(Error(code=0, reason="client-side failure"), reply_to=request)
    return reply


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_run_where_no_client_can_train_is_a_failure(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=3", f"output_dir={tmp_path}", "run_name=r",
                          "max_failed_rounds=5"])
    grid = InProcessGrid(client_app, 3)
    grid.reply_hook = _every_client_fails
    summary = run_server(grid, cfg)
    assert summary == _summary(tmp_path / "r")
    assert summary["status"] == "failed"
    assert summary["reason"] == "no round produced a new global model"
    assert summary["rounds_completed"] == 0 and summary["rounds_failed"] == [1, 2, 3]
    assert set(summary["failure_reasons"]) == {"1", "2", "3"}


def test_too_many_failed_rounds_end_the_run(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=6", f"output_dir={tmp_path}", "run_name=r",
                          "max_failed_rounds=1"])
    grid = InProcessGrid(client_app, 3)

    def fail_from_round_3(node: int, request: Message, reply: Message) -> Message:
        if int(request.content["config"]["server-round"]) >= 3:
            return _every_client_fails(node, request, reply)
        return reply

    grid.reply_hook = fail_from_round_3
    summary = run_server(grid, cfg)
    assert summary["status"] == "failed" and "max_failed_rounds=1" in summary["reason"]
    # rounds 1-2 trained; 3 failed (tolerated); 4 failed: stop, never reaching 5-6
    assert summary["rounds_completed"] == 2 and summary["rounds_failed"] == [3, 4]
    assert summary["final_round"] == 2


def test_a_tolerated_failed_round_still_completes(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=3", f"output_dir={tmp_path}", "run_name=r",
                          "max_failed_rounds=1"])
    grid = InProcessGrid(client_app, 3)

    def fail_round_2(node: int, request: Message, reply: Message) -> Message:
        if int(request.content["config"]["server-round"]) == 2:
            return _every_client_fails(node, request, reply)
        return reply

    grid.reply_hook = fail_round_2
    summary = run_server(grid, cfg)
    assert summary["status"] == "completed" and summary["reason"] is None
    assert summary["rounds_completed"] == 2 and summary["rounds_failed"] == [2]
    assert summary["final_round"] == 3


def test_an_error_mid_run_is_recorded_as_failed(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=3", f"output_dir={tmp_path}", "run_name=r"])
    grid = InProcessGrid(client_app, 3)

    def power_cut(node: int, request: Message, reply: Message) -> Message:
        if int(request.content["config"]["server-round"]) == 2:
            raise OSError("power cut")
        return reply

    grid.reply_hook = power_cut
    with pytest.raises(OSError, match="power cut"):
        run_server(grid, cfg)
    summary = _summary(tmp_path / "r")
    assert summary["status"] == "failed" and "power cut" in summary["reason"]
    assert summary["rounds_completed"] == 1


def test_too_few_supernodes_fail_before_a_run_directory_exists(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=1", f"output_dir={tmp_path}", "run_name=r",
                          "round_timeout=1"])
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"num_clients=3 but the simulation has 2 SuperNodes"):
        run_server(InProcessGrid(client_app, 2), cfg)
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []


def test_resume_extends_a_finished_run(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=2", f"output_dir={tmp_path}", "run_name=r"])
    run_server(InProcessGrid(client_app, 3), cfg)
    run_dir = tmp_path / "r"
    # Equal values (e.g. --run-config defaults) are fine; num_rounds may grow.
    resumed = compose_config([f"resume={run_dir}", "num_rounds=4", "task=breast_cancer"])
    saved = (run_dir / "config.yaml").read_text()
    assert resumed.num_rounds == 4 and f"run_id: {resumed.run_id}" in saved
    summary = run_server(InProcessGrid(client_app, 3), resumed)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    rows = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert "num_rounds: 4" in (run_dir / "config.yaml").read_text()


def test_resume_refuses_overrides_that_change_the_run(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=2", f"output_dir={tmp_path}", "run_name=r"])
    run_server(InProcessGrid(client_app, 3), cfg)
    with pytest.raises(ConfigError) as err:
        compose_config([f"resume={tmp_path / 'r'}", "num_rounds=3", "task=digits", "seed=7",
                        "dp.noise_multiplier=1.0"])
    message = str(err.value)
    assert "task=digits" in message and "seed=7" in message
    assert "dp.noise_multiplier" in message and "num_rounds" in message.split("Refused")[0]
    with pytest.raises(ConfigError, match="below the 2 rounds"):
        run_server(InProcessGrid(client_app, 3),
                   compose_config([f"resume={tmp_path / 'r'}", "num_rounds=1"]))


def test_outcome_rules() -> None:
    assert run_outcome(completed=3, num_rounds=3, stop_reason=None, failure=None).succeeded
    stopped = run_outcome(completed=0, num_rounds=3, stop_reason="budgets", failure=None)
    assert stopped.status == "stopped" and stopped.succeeded
    failed = run_outcome(completed=3, num_rounds=3, stop_reason="x", failure="boom")
    assert failed.status == "failed" and not failed.succeeded


def test_outcome_command_reads_the_summaries(tmp_path: Path, capsys) -> None:
    assert outcome_main([str(tmp_path)]) == 1  # nothing there: the run never finished
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(json.dumps(
        {"status": "completed", "rounds_completed": 2, "num_rounds": 2}))
    assert outcome_main([str(tmp_path)]) == 0
    marker = tmp_path / "marker"
    marker.write_text("")
    os.utime(tmp_path / "a" / "summary.json", (0, 0))
    assert outcome_main([str(tmp_path), "--newer-than", str(marker)]) == 1
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps(
        {"status": "failed", "reason": "no round produced a new global model"}))
    assert outcome_main([str(tmp_path), "--newer-than", str(marker)]) == 1
    assert "failed (no round produced a new global model)" in capsys.readouterr().out


def test_fedstack_run_exits_non_zero_before_the_runtime_starts(tmp_path: Path) -> None:
    """A run refused at start-up exits 1 in seconds (no Ray) and leaves no run directory."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fedstack", "run", "task=breast_cancer", "num_clients=1000",
         "partition=iid", f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "num_clients" in proc.stderr
    assert time.monotonic() - started < 60
    assert list(tmp_path.iterdir()) == []


def test_deployment_waits_for_supernodes_then_refuses(tmp_path: Path, monkeypatch) -> None:
    """Deployment: SuperNodes connect over time; fewer than num_clients within
    round_timeout refuses the run (naming the key) before a run directory exists."""
    import fedstack.server_app as server_app

    monkeypatch.setattr(server_app, "is_deployment", lambda grid: True)
    cfg = compose_config([*BASE, "num_rounds=1", f"output_dir={tmp_path}", "run_name=r",
                          "round_timeout=1.5"])
    grid = InProcessGrid(client_app, 3)
    grid.offline = {grid.node_ids[2]}
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"num_clients=3 but only 2 SuperNodes connected "
                                          r"within round_timeout=1.5s"):
        run_server(grid, cfg)
    assert 1.5 <= time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []
    # A node that connects while the server waits is counted.
    grid.offline = set()
    assert server_app.wait_for_clients(grid, cfg) == 3
