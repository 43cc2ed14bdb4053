"""End to end through Flower's simulation runtime (Ray): accuracy parity and a mid-round crash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedstack.cli import run_in_simulation
from fedstack.config import compose_config
from fedstack.strategies.client_mods import protocol_mod
from tests.conftest import DIGITS_BASELINE

pytestmark = pytest.mark.e2e

#: Rounds for the parity run: enough for digits to converge (~97%), so that the tiny
#: quantisation differences cannot move the final accuracy by a point.
PARITY_ROUNDS = 10  # DIGITS_BASELINE's num_rounds


def _history(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "history.jsonl").read_text().splitlines()]


def test_secagg_reaches_fedavg_accuracy(tmp_path, digits_baseline):
    cfg = compose_config(
        [*DIGITS_BASELINE, "aggregation=secagg", f"output_dir={tmp_path}", "run_name=secagg"]
    )
    runs = {"fedavg": digits_baseline, "secagg": run_in_simulation(cfg)}
    assert (
        runs["secagg"]["rounds_completed"] == PARITY_ROUNDS and not runs["secagg"]["rounds_failed"]
    )
    assert runs["fedavg"]["final_accuracy"] > 0.9
    assert abs(runs["secagg"]["final_accuracy"] - runs["fedavg"]["final_accuracy"]) <= 0.01
    rows = _history(runs["secagg"]["run_dir"])
    # the default malicious mode: advertise, share, train, consistency, unmask in round 1,
    # then train, consistency, unmask (next round's keys and shares ride along); no
    # federated evaluation under secagg
    assert [r["exchanges"] for r in rows if r["round"] >= 1][:3] == [5, 3, 3]
    assert rows[-1]["train_loss"] is None  # per-client losses never leave the clients


def _crashing_client_app():
    """The real handlers, plus a crash of partition 1 while unmasking round 2 and a training
    failure of partition 2 in round 3 (test-only)."""
    from flwr.clientapp import ClientApp

    from fedstack.client_app import evaluate, train
    from fedstack.strategies.secagg import wire
    from fedstack.strategies.secagg.mod import SECAGG_RECORD

    def crash_mod(msg, context, call_next):
        parts = msg.content.config_records.get(SECAGG_RECORD)
        if (
            int(context.node_config["partition-id"]) == 1
            and parts is not None
            and parts.get(wire.UNMASK_REQ) == 2
        ):
            raise RuntimeError("test: client crashed while unmasking")
        return call_next(msg, context)

    def flaky_train(msg, context):
        if (
            int(context.node_config["partition-id"]) == 2
            and msg.content["config"]["server-round"] == 3
        ):
            raise RuntimeError("test: training failed")
        return train(msg, context)

    app = ClientApp()
    app.train(mods=[crash_mod, protocol_mod])(flaky_train)
    app.evaluate(mods=[protocol_mod])(evaluate)
    return app


def test_run_survives_clients_failing_mid_round(tmp_path):
    cfg = compose_config(
        [
            "aggregation=secagg",
            "num_rounds=3",
            f"output_dir={tmp_path}",
            "aggregation.stage_timeout=60",
        ]
    )
    summary = run_in_simulation(cfg, _crashing_client_app())
    assert summary["rounds_completed"] == 3 and not summary["rounds_failed"]
    rows = {r["round"]: r for r in _history(summary["run_dir"])}
    assert rows[2]["extra"]["secagg"]["survivors"] == 5  # crashed after its masked input
    assert len(rows[2]["rejected"]) == 1 and "unmask" in next(iter(rows[2]["rejected"].values()))
    # round 3's shares rode on round 2's unmask exchange, which partition 1 never answered:
    # it sits round 3 out; partition 2 shared but failed to train, so its mask key is rebuilt
    third = rows[3]["extra"]["secagg"]
    assert (third["participants"], third["shared"], third["survivors"]) == (5, 4, 3)
    assert len(third["dropped"]) == 1
    assert rows[3]["central_accuracy"] > rows[1]["central_accuracy"]
