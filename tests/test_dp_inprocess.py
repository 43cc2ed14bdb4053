"""dp=local through the real ServerApp body and ClientApp (in-process grid, no Ray).

The client's own privacy state (in its Context), the replies, history.jsonl, summary.json
and the ledger must all tell the same ε; budgets stop clients and, finally, the run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.privacy.accountant_state import PrivacyState
from fedstack.privacy.local_trainer import load_privacy_state
from fedstack.server_app import run_server
from fedstack.task.client_data import load_client_data
from tests.inprocess_grid import InProcessGrid, PowerCut, die_in_round

BASE = ["task=breast_cancer", "partition=iid", "num_clients=3", "min_train_nodes=1",
        "dp=local", "dp.noise_multiplier=1.0", "dp.target_epsilon=null"]


def _one_shot_rdp(cfg, partition_id: int, rounds: int) -> float:
    n = len(load_client_data(cfg, partition_id, cfg.num_clients).train)
    steps = math.ceil(n / cfg.task.batch_size)
    state = PrivacyState("rdp", ((1.0, 1.0 / steps, rounds * steps * cfg.task.local_epochs),))
    acc = state.accountant()  # plain Opacus accountant, no caching
    return float(acc.get_epsilon(delta=1 / (10 * n)))


def test_epsilon_agrees_everywhere(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=3", f"output_dir={tmp_path}", "run_name=r"])
    grid = InProcessGrid(client_app, 3)
    summary = run_server(grid, cfg)
    run_dir = tmp_path / "r"
    rows = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    ledger = json.loads((run_dir / "privacy.json").read_text())
    for i, node in enumerate(grid.node_ids):
        state = load_privacy_state(grid.contexts[node])
        assert state is not None and state.rounds == (1, 2, 3)
        want = _one_shot_rdp(cfg, i, 3)
        assert state.epsilons[-1] == pytest.approx(want, rel=1e-12)
        assert summary["epsilon_per_client"][str(i)] == pytest.approx(want, rel=1e-12)
        assert rows[-1]["epsilon"][str(i)] == pytest.approx(want, rel=1e-12)
        assert ledger["summary"]["epsilon_per_client"][str(i)] == pytest.approx(want, rel=1e-12)
    assert summary["epsilon_max"] == max(summary["epsilon_per_client"].values())
    assert [r["epsilon_max"] for r in rows[1:]] == sorted(r["epsilon_max"] for r in rows[1:])
    report = (run_dir / "privacy_report.md").read_text()
    assert "DP-SGD on every client" in report and "in the clear" in report
    assert (run_dir / "epsilon.png").stat().st_size > 5000


def test_node_budget_declines_and_run_continues(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=3", f"output_dir={tmp_path}", "run_name=r"])
    eps_one_round = _one_shot_rdp(cfg, 0, 1)
    budget = eps_one_round * 1.01  # partition 0 can afford one round only

    def node_config(i: int) -> dict:
        conf = {"partition-id": i, "num-partitions": 3}
        if i == 0:
            conf["max-epsilon"] = budget
        return conf

    grid = InProcessGrid(client_app, 3, node_config=node_config)
    summary = run_server(grid, cfg)
    assert summary["rounds_completed"] == 3 and summary["stop_reason"] is None
    assert summary["epsilon_per_client"]["0"] <= budget
    assert summary["clients_exhausted"] == ["0"]
    rows = [json.loads(x) for x in (tmp_path / "r" / "history.jsonl").read_text().splitlines()]
    assert rows[2]["dp_exhausted"] == ["0"] and len(rows[2]["aggregated"]) == 2
    assert "privacy budget exhausted" in (tmp_path / "r" / "privacy_report.md").read_text()


def test_every_client_exhausted_stops_the_run(tmp_path: Path) -> None:
    cfg0 = compose_config([*BASE, "num_rounds=5", f"output_dir={tmp_path}", "run_name=r"])
    budget = max(_one_shot_rdp(cfg0, i, 2) for i in range(3)) * 1.001
    cfg = compose_config([*BASE, "num_rounds=5", f"dp.max_epsilon={budget}",
                          f"output_dir={tmp_path}", "run_name=r"])
    summary = run_server(InProcessGrid(client_app, 3), cfg)
    assert summary["rounds_completed"] == 2  # rounds 1-2 trained; round 3 all declined
    assert summary["status"] == "stopped" and summary["rounds_failed"] == [3]
    assert "declined permanently" in summary["stop_reason"]
    assert sorted(summary["clients_exhausted"]) == ["0", "1", "2"]
    assert summary["epsilon_max"] <= budget
    report = (tmp_path / "r" / "privacy_report.md").read_text()
    assert "run stopped early" in report


def test_ledger_resumes_with_the_run(tmp_path: Path) -> None:
    cfg = compose_config([*BASE, "num_rounds=2", f"output_dir={tmp_path}", "run_name=r"])
    grid = InProcessGrid(client_app, 3)
    run_server(grid, cfg)
    resumed = compose_config([f"resume={tmp_path / 'r'}", "num_rounds=2"])
    summary = run_server(grid, resumed)  # nothing left to run: the ledger is reloaded
    ledger = json.loads((tmp_path / "r" / "privacy.json").read_text())
    assert ledger["rounds_closed"] == [1, 2]
    assert summary["epsilon_per_client"] == ledger["summary"]["epsilon_per_client"]
    assert len(summary["epsilon_per_client"]) == 3


def test_dp_none_report_says_no_dp(tmp_path: Path) -> None:
    cfg = compose_config(["task=breast_cancer", "partition=iid", "num_clients=2",
                          "num_rounds=1", f"output_dir={tmp_path}", "run_name=r"])
    summary = run_server(InProcessGrid(client_app, 2), cfg)
    assert summary["epsilon_max"] is None
    report = (tmp_path / "r" / "privacy_report.md").read_text()
    assert "no ε is accounted" in report and not (tmp_path / "r" / "epsilon.png").exists()


def test_epsilon_survives_a_server_restart(tmp_path: Path, monkeypatch) -> None:
    """A resumed run is a new Flower run (empty node state): ε must continue, not restart."""
    monkeypatch.setenv("FEDSTACK_DP_STATE_DIR", str(tmp_path / "node-disk"))
    cfg = compose_config([*BASE, "num_rounds=3", f"output_dir={tmp_path}", "run_name=r"])
    grid = InProcessGrid(client_app, 3)

    grid.reply_hook = die_in_round(2)
    with pytest.raises(PowerCut):
        run_server(grid, cfg)
    first = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text()
             .splitlines()][1]["epsilon"]
    fresh = InProcessGrid(client_app, 3)  # new contexts: nothing in context.state
    run_server(fresh, compose_config([f"resume={tmp_path / 'r'}"]))
    rows = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text()
            .splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    for pid, eps in rows[2]["epsilon"].items():
        assert eps > first[pid]
        # Partition 0 answered first and trained round 2 before the server died: the server
        # lost that round, but the client's privacy loss is real and still counts (3 rounds
        # trained). The others trained rounds 1 and 2 once each.
        trained = 3 if pid == "0" else 2
        assert eps == pytest.approx(_one_shot_rdp(cfg, int(pid), trained), rel=1e-9)
    files = sorted((tmp_path / "node-disk").glob("*/partition-*.json"))
    assert len(files) == 3
