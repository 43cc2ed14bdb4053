"""`dp=central` end to end: the real ServerApp body and ClientApp on the in-process grid (no
Ray). The model learns, ε recomputes from privacy.json with Opacus alone and equals a
one-shot computation of the same mechanism, the report states the unit and whom to trust,
and a data owner who requires DP without trusting the server's DP refuses to take part."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.privacy.client_accountant import client_level_epsilon
from fedstack.server_app import run_server
from tests.inprocess_grid import InProcessGrid

ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}
CLIENTS = 6
ROUNDS = 5
#: Node config per partition: 0 requires DP and does not trust the server's; 1 trusts it.
POLICIES = {0: {"require-dp": True}, 1: {"require-dp": True, "trust-server-dp": True}}


def _node_config(i: int) -> dict:
    return {"partition-id": i, "num-partitions": CLIENTS, **POLICIES.get(i, {})}


def auditor_epsilon(record: dict) -> float:
    """docs/dp.md's recipe for privacy.json's `client_level` entry."""
    accountant = ACCOUNTANTS[record["accountant"]]()
    accountant.history = [tuple(entry) for entry in record["history"]]
    return float(accountant.get_epsilon(delta=record["delta"]))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, InProcessGrid]:
    out = tmp_path_factory.mktemp("central")
    cfg = compose_config([
        "task=breast_cancer", "partition=iid", f"num_clients={CLIENTS}", f"num_rounds={ROUNDS}",
        "fraction_train=0.7", "fraction_evaluate=0", "min_evaluate_nodes=0", "dp=central",
        "dp.noise_multiplier=0.8", "dp.target_epsilon=null", "dp.adaptive_clipping=true",
        "dp.clip_norm=0.5", "task.local_epochs=1", f"output_dir={out}", "run_name=r"])
    grid = InProcessGrid(client_app, CLIENTS, node_config=_node_config)
    summary = run_server(grid, cfg)
    return out / "r", summary, grid


def test_a_central_dp_run_learns(run: tuple[Path, dict, InProcessGrid]) -> None:
    run_dir, summary, _ = run
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS
    assert rows[0]["central_accuracy"] < 0.75
    assert summary["final_accuracy"] > 0.85
    assert all(row["aborted"] is None for row in rows[1:])


def test_epsilon_recomputes_from_privacy_json(run: tuple[Path, dict, InProcessGrid]) -> None:
    run_dir, summary, _ = run
    ledger = json.loads((run_dir / "privacy.json").read_text())
    record = ledger["client_level"]
    assert record["unit"] == "client" and ledger["guarantee"]["unit"] == "client"
    assert "server" in ledger["guarantee"]["trusted"]
    assert record["sampling"] == "poisson" and record["sample_rate"] == 0.7
    assert record["delta"] == pytest.approx(1 / (10 * CLIENTS))
    assert record["history"] == [[0.8, 0.7, ROUNDS]]  # every round is a release
    one_shot = client_level_epsilon(0.8, 0.7, ROUNDS, record["delta"], "rdp")
    assert auditor_epsilon(record) == record["epsilon"] == one_shot == summary["epsilon_max"]
    assert record["epsilons"][-1] == record["epsilon"]
    clips = record["details"]["clip_norm"]
    assert clips[0] == 0.5 and len(clips) == ROUNDS and len(set(clips)) > 1  # adaptive C
    # The update carries more noise than the accounted σ: part of it went to the count.
    assert record["details"]["update_noise_multiplier"] > 0.8
    report = (run_dir / "privacy_report.md").read_text()
    assert "protects: each **client**" in report
    assert "must be trusted: the server" in report
    assert f"{one_shot:.4g}" in report


def test_a_node_requiring_dp_refuses_central_dp_unless_it_trusts_the_server(
        run: tuple[Path, dict, InProcessGrid]) -> None:
    run_dir, _, grid = run
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    refusing, trusting = str(grid.node_ids[0]), grid.node_ids[1]
    declined = [row["declined"][refusing] for row in rows if refusing in row["declined"]]
    assert declined == ["node policy refuses: dp-required"]  # once, then never sampled again
    assert not any(int(refusing) in row["aggregated"] for row in rows)
    assert any(trusting in row["aggregated"] for row in rows)
