"""An auditor recomputes every client's ε from the run directory alone, and the ledger keeps
ε monotonic when clients lose their own DP state (real ServerApp body and ClientApp on the
in-process grid, no Ray)."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.privacy import local_trainer
from fedstack.privacy.accountant_state import PrivacyState
from fedstack.privacy.ledger_sync import Reconciled, reconcile
from fedstack.server_app import run_server
from fedstack.task.client_data import load_client_data
from tests.inprocess_grid import InProcessGrid, PowerCut, die_in_round

BASE = ["task=breast_cancer", "partition=iid", "num_clients=3", "min_train_nodes=1",
        "dp=local"]
ACCOUNTANTS = {"rdp": RDPAccountant, "prv": PRVAccountant}


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def auditor_epsilon(client: dict) -> float:
    """What docs/dp.md tells an auditor to run on one entry of privacy.json's `clients`."""
    accountant = ACCOUNTANTS[client["accountant"]]()
    accountant.history = [tuple(entry) for entry in client["history"]]
    return float(accountant.get_epsilon(delta=client["delta"]))


@pytest.mark.parametrize("accountant,noise", [("rdp", None), ("prv", 1.0)])
def test_every_epsilon_recomputes_from_privacy_json(tmp_path: Path, accountant: str,
                                                    noise: float | None) -> None:
    settings = ([f"dp.noise_multiplier={noise}", "dp.target_epsilon=null"] if noise
                else ["dp.target_epsilon=8"])
    cfg = compose_config([*BASE, *settings, f"dp.accountant={accountant}", "num_rounds=2",
                          f"output_dir={tmp_path}", "run_name=r"])
    grid = InProcessGrid(client_app, 3)
    summary = run_server(grid, cfg)
    run_dir = tmp_path / "r"
    ledger = json.loads((run_dir / "privacy.json").read_text())
    clients = ledger["clients"]
    assert list(clients) == list(summary["epsilon_per_client"]) == ["0", "1", "2"]
    report = (run_dir / "privacy_report.md").read_text()
    for name, client in clients.items():
        assert client["accountant"] == accountant and client["delta"] > 0
        assert client["epsilon"] == summary["epsilon_per_client"][name]
        # Bit for bit: the client computed its ε with the same Opacus call.
        assert auditor_epsilon(client) == client["epsilon"]
        partition = int(name)
        assert client["node_id"] == grid.node_ids[partition]
        assert summary["client_node_ids"][name] == grid.node_ids[partition]
        # The history is what the client really ran: q = 1/ceil(n/B), every step counted.
        n = len(load_client_data(cfg, partition, 3).train)
        steps = math.ceil(n / cfg.task.batch_size)
        assert client["history"] == [[client["noise_multiplier"], 1 / steps,
                                      2 * steps * cfg.task.local_epochs]]
        assert client["rounds"] == [1, 2]
        if noise is None:  # σ derived from the target, which is also the budget
            assert client["budget"] == 8.0 and client["epsilon"] <= 8.0
        else:
            assert client["noise_multiplier"] == noise and client["budget"] is None
        assert f"{client['noise_multiplier']:.4g}" in report  # the σ actually used
    assert ledger["summary"]["epsilon_per_client"] == summary["epsilon_per_client"]
    if noise is None:
        assert summary["epsilon_budget"] == 8.0
        assert "budget: 8 (dp.max_epsilon is null: the target dp.target_epsilon=8)" in report
    else:
        assert "budget: none" in report
    mapping = {str(node): str(i) for i, node in enumerate(grid.node_ids)}
    assert all(row["client_of_node"] == mapping for row in _rows(run_dir)[1:])


def _crash_in_round_3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict]:
    """Two rounds, then the server dies in round 3; returns the run dir and round-2 ε."""
    monkeypatch.setenv("FEDSTACK_DP_STATE_DIR", str(tmp_path / "node-disk"))
    cfg = compose_config([*BASE, "dp.noise_multiplier=1.0", "dp.target_epsilon=null",
                          "num_rounds=3", f"output_dir={tmp_path}", "run_name=r"])
    grid = InProcessGrid(client_app, 3)

    grid.reply_hook = die_in_round(3)
    with pytest.raises(PowerCut):
        run_server(grid, cfg)
    return tmp_path / "r", _rows(tmp_path / "r")[2]["epsilon_per_client"]


def _one_shot(run_dir: Path, partition: int, rounds: int) -> float:
    cfg = compose_config([f"resume={run_dir}"])
    n = len(load_client_data(cfg, partition, cfg.num_clients).train)
    steps = math.ceil(n / cfg.task.batch_size)
    state = PrivacyState("rdp", ((1.0, 1.0 / steps, rounds * steps * cfg.task.local_epochs),))
    return float(state.accountant().get_epsilon(delta=1 / (10 * n)))


def test_epsilon_never_restarts_below_the_ledger(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The issue's case: resumed with every node's DP state directory emptied."""
    run_dir, before = _crash_in_round_3(tmp_path, monkeypatch)
    shutil.rmtree(tmp_path / "node-disk")
    # A resumed run is a new Flower run: empty node state, and new node ids.
    fresh = InProcessGrid(client_app, 3, first_node_id=501)
    from fedstack.log import logger

    # The run configures the console (flwr.* records stop propagating to the root logger,
    # where caplog listens): listen on fedstack's logger itself.
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger=logger.name):
            summary = run_server(fresh, compose_config([f"resume={run_dir}"]))
    finally:
        logger.removeHandler(caplog.handler)
    assert "continuing from the server ledger's record" in caplog.text
    after = summary["epsilon_per_client"]
    for pid in ("0", "1", "2"):
        assert after[pid] > before[pid]
        # Rounds 1-2 from the ledger, plus the re-run round 3. (Partition 0 also trained
        # the lost round 3 before the crash; that spend died with its disk, unknowable.)
        assert after[pid] == pytest.approx(_one_shot(run_dir, int(pid), 3), rel=1e-9)
    ledger = json.loads((run_dir / "privacy.json").read_text())
    assert not [e for e in ledger["entries"] if e["refused"]]
    assert {c["node_id"] for c in ledger["clients"].values()} == set(fresh.node_ids)
    for pid, client in ledger["clients"].items():
        assert client["rounds"] == [1, 2, 3]
        assert auditor_epsilon(client) == pytest.approx(after[pid], rel=1e-6)


def test_a_client_that_restarts_at_zero_is_refused(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that ignores the ledger (lost state, old code) reports a lower cumulative ε:
    the ledger refuses it, and its update is not aggregated."""
    run_dir, before = _crash_in_round_3(tmp_path, monkeypatch)
    shutil.rmtree(tmp_path / "node-disk")

    def forgetful(own, view, client):
        return Reconciled(own) if client == "1" else reconcile(own, view, client)

    monkeypatch.setattr(local_trainer, "reconcile", forgetful)
    fresh = InProcessGrid(client_app, 3)
    summary = run_server(fresh, compose_config([f"resume={run_dir}"]))
    row = _rows(run_dir)[3]
    node = fresh.node_ids[1]
    assert "cumulative epsilon went down" in row["rejected"][str(node)]
    assert node not in row["aggregated"] and len(row["aggregated"]) == 2
    assert set(row["dp_refused"]) == {"1"}
    assert summary["epsilon_per_client"]["1"] == before["1"]  # the ledger holds on
    ledger = json.loads((run_dir / "privacy.json").read_text())
    refused = [e for e in ledger["entries"] if e["refused"]]
    assert [(e["server_round"], e["client"]) for e in refused] == [(3, "1")]
    assert refused[0]["epsilon"] < before["1"]
    assert "## Refused replies" in (run_dir / "privacy_report.md").read_text()
