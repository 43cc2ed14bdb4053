"""`dp=distributed` end to end: the real ServerApp body and ClientApp (secagg mod, input
codec) on the in-process grid (no Ray). The model learns, every round is accounted as a
Skellam release and epsilon recomputes from privacy.json, and no plaintext update leaves a
client."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.privacy.distributed.accountant import SkellamRelease, epsilon
from fedstack.server_app import run_server
from fedstack.strategies.secagg import wire
from fedstack.strategies.secagg.mod import MASKED_RECORD, SECAGG_RECORD
from tests.inprocess_grid import InProcessGrid

CLIENTS = 5
ROUNDS = 3
#: Node config per partition: 0's noise floor is above the run's (it refuses every round);
#: 1 requires DP and accepts dp=distributed (its update never leaves without noise).
POLICIES = {0: {"min-noise-multiplier": 1.0}, 1: {"require-dp": True}}


def _node_config(i: int) -> dict:
    return {"partition-id": i, "num-partitions": CLIENTS, **POLICIES.get(i, {})}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("distributed")
    cfg = compose_config([
        "task=breast_cancer", "partition=iid", f"num_clients={CLIENTS}",
        f"num_rounds={ROUNDS}", "fraction_evaluate=0", "min_evaluate_nodes=0",
        "aggregation=secagg", "dp=distributed", "dp.noise_multiplier=0.5",
        "dp.target_epsilon=null", "dp.clip_norm=0.5", "dp.dropout_slack=0.2",
        "task.local_epochs=1",
        f"output_dir={out}", "run_name=r"])
    grid = InProcessGrid(client_app, CLIENTS, node_config=_node_config)
    replies: list = []
    grid.reply_hook = lambda node, request, reply: replies.append((node, reply)) or reply
    summary = run_server(grid, cfg)
    return out / "r", summary, replies


def test_a_distributed_dp_run_learns(run) -> None:
    run_dir, summary, _ = run
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert summary["status"] == "completed" and summary["rounds_completed"] == ROUNDS, summary
    assert all(row["aborted"] is None for row in rows[1:])
    assert rows[0]["central_accuracy"] < 0.75
    assert summary["final_accuracy"] > 0.85, summary


def test_every_round_is_one_skellam_release(run) -> None:
    run_dir, summary, _ = run
    ledger = json.loads((run_dir / "privacy.json").read_text())
    record = ledger["client_level"]
    assert record["mechanism"] == "skellam" and record["unit"] == "client"
    assert record["rounds"] == list(range(1, ROUNDS + 1))
    # Partition 0 refuses (noise floor) in round 1, after sharing keys: 4 of 5 expected
    # survive, within the slack (n_min = 4), so the round is released with the planned
    # noise; its decline is permanent, so later rounds expect the other 4.
    assert record["details"]["survivors"] == [CLIENTS - 1] * ROUNDS
    assert record["details"]["expected"] == [CLIENTS] + [CLIENTS - 1] * (ROUNDS - 1)
    d = record["details"]
    one_shot = epsilon([SkellamRelease(d["variance"], d["l2_sensitivity"],
                                       d["l1_sensitivity"], ROUNDS)], record["delta"])
    assert record["epsilon"] == one_shot == summary["epsilon_max"]
    assert record["delta"] == pytest.approx(1 / (10 * CLIENTS))


def test_no_plaintext_update_leaves_a_client(run) -> None:
    _, _, replies = run
    trained = [(n, m) for n, m in replies if m.has_content() and m.content.array_records]
    refusing = 101  # partition 0's node: its policy refused, it sent no input at all
    assert len(trained) == (CLIENTS - 1) * ROUNDS
    assert refusing not in {n for n, _ in trained}
    for _, reply in trained:
        assert set(reply.content.array_records) == {MASKED_RECORD}
        words = reply.content.array_records[MASKED_RECORD]["words"].numpy()
        # Masked words are uniform in Z_2^32, nothing like a small rounded update.
        assert np.abs(words.astype(np.int64) - 2**31).mean() > 2**29


def test_dropouts_beyond_the_slack_abort_before_unmasking(tmp_path) -> None:
    """dp.dropout_slack=0.1 with 5 clients: n_min = 5. Partition 0 refuses round 1 after
    sharing keys, so round 1 aborts before any unmask request (nothing released, nothing
    accounted); it is then left out, and rounds 2-3 expect and get the other 4."""
    cfg = compose_config([
        "task=breast_cancer", "partition=iid", f"num_clients={CLIENTS}",
        f"num_rounds={ROUNDS}", "fraction_evaluate=0", "min_evaluate_nodes=0",
        "max_failed_rounds=1", "aggregation=secagg", "dp=distributed",
        "dp.noise_multiplier=0.5", "dp.target_epsilon=null", "dp.dropout_slack=0.1",
        "task.local_epochs=1", f"output_dir={tmp_path}", "run_name=r"])
    grid = InProcessGrid(client_app, CLIENTS, node_config=_node_config)
    unmask_rounds: list[int] = []

    def hook(node, request, reply):
        records = request.content.config_records
        if SECAGG_RECORD in records and wire.UNMASK_REQ in records[SECAGG_RECORD]:
            unmask_rounds.append(int(records[SECAGG_RECORD][wire.UNMASK_REQ]))
        return reply

    grid.reply_hook = hook
    summary = run_server(grid, cfg)
    rows = [json.loads(line) for line in (tmp_path / "r" / "history.jsonl").read_text()
            .splitlines()]
    assert "dp.dropout_slack" in rows[1]["aborted"]
    assert rows[2]["aborted"] is None and rows[3]["aborted"] is None
    record = json.loads((tmp_path / "r" / "privacy.json").read_text())["client_level"]
    assert record["rounds"] == [2, 3]  # the aborted round released nothing
    assert record["details"]["survivors"] == [CLIENTS - 1] * 2
    assert summary["rounds_completed"] == ROUNDS - 1  # rounds that produced a model
    assert 1 not in unmask_rounds and {2, 3} <= set(unmask_rounds)  # no unmasking in round 1
