"""secagg + dp=local: nothing the server receives lets it compute a client's n_k (issue 11).

Two in-process runs of the real ServerApp body and ClientApp differ ONLY in client 0's
number of training examples. Every reply the server receives is recorded; the masked ring
words and the fresh cryptographic material (public keys, encrypted shares, unmasking shares:
random bytes, compared by length only) are set aside, and every remaining clear value
(metrics, config records, errors, message types, which nodes replied) must be identical
between the two runs. With the per-client DP parameters used before the public schedule
(δ = 1/(10 n_k), q = 1/⌈n_k/B⌉, σ for that q), the same comparison finds δ and ε differing:
the server read n_k off δ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from torch.utils.data import TensorDataset

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.privacy import local_trainer
from fedstack.privacy.schedule import PublicSchedule, public_schedule
from fedstack.server_app import run_server
from fedstack.task.contract import Partition
from fedstack.task.plugin import Task
from tests.inprocess_grid import InProcessGrid

NUM_CLIENTS = 3
#: Training examples client 0 loses in the second run (its n_k is all that differs).
SHRINK = 25
RATE = 0.5
SETTINGS = [
    "task=breast_cancer", "partition=iid", f"num_clients={NUM_CLIENTS}",
    "task.local_epochs=1", "central_evaluation=false",
    "aggregation=secagg", "dp=local", f"dp.sample_rate={RATE}", "dp.noise_multiplier=1.0",
    "dp.target_epsilon=null",
    # Per-client evaluation replies (loss, accuracy, validation size) are not part of the DP
    # side of this test; the secagg strategy owns what it sends for evaluation.
    "fraction_evaluate=0.0", "min_evaluate_nodes=0",
]


def _shrunk(dataset: Any, count: int) -> TensorDataset:
    tensors = dataset.tensors
    return TensorDataset(*(t[:len(t) - count] for t in tensors))


def _clear(value: Any) -> Any:
    """A record value as the comparison sees it: bytes by length only (random material)."""
    if isinstance(value, bytes):
        return ("bytes", len(value))
    if isinstance(value, list):
        return [_clear(v) for v in value]
    return value


def _view(reply: Any) -> dict[str, Any]:
    """Everything readable in one reply, minus masked words and cryptographic randomness."""
    out: dict[str, Any] = {"type": reply.metadata.message_type,
                           "node": reply.metadata.src_node_id}
    if reply.has_error():
        out["error"] = (reply.error.code, reply.error.reason)
        return out
    content = reply.content
    out["metrics"] = {name: dict(record) for name, record in content.metric_records.items()}
    out["configs"] = {name: {k: _clear(v) for k, v in record.items()}
                      for name, record in content.config_records.items()}
    # The masked input: its shape is public (the model's size); its words are masked.
    out["arrays"] = {name: {k: tuple(a.shape) for k, a in record.items()}
                     for name, record in content.array_records.items()}
    return out


def _run(tmp_path: Path, name: str, shrink: int, monkeypatch: pytest.MonkeyPatch,
         rounds: int, budget: float = 50.0,
         ) -> tuple[list[dict[str, Any]], dict[int, int], dict[str, Any]]:
    """One run; (every reply the server received, as clear views; n_k per partition)."""
    original = Task.load_partition
    sizes: dict[int, int] = {}

    def load_partition(self: Task, ctx: Any, partition_id: int) -> Partition:
        part = original(self, ctx, partition_id)
        if partition_id == 0 and shrink:
            part = Partition(_shrunk(part.train, shrink), part.val)
        sizes[partition_id] = len(part.train)
        return part

    monkeypatch.setattr(Task, "load_partition", load_partition)
    monkeypatch.setenv("FEDSTACK_DP_STATE_DIR", str(tmp_path / f"dp-state-{name}"))
    cfg = compose_config([*SETTINGS, f"num_rounds={rounds}", f"max_failed_rounds={rounds}",
                          f"dp.max_epsilon={budget}",
                          f"output_dir={tmp_path}", f"run_name={name}"])
    grid = InProcessGrid(client_app, NUM_CLIENTS)
    received: list[dict[str, Any]] = []

    def record(node: int, request: Any, reply: Any) -> Any:
        received.append(_view(reply))
        return reply

    grid.reply_hook = record
    summary = run_server(grid, cfg)
    monkeypatch.setattr(Task, "load_partition", original)
    return received, sizes, summary


def _differences(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[str]:
    if len(a) != len(b):
        return [f"{len(a)} replies vs {len(b)}"]
    out = []
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for part in sorted(set(x) | set(y)):
            if x.get(part) != y.get(part):
                out.append(f"reply {i} ({x['type']}, node {x['node']}): {part}: "
                           f"{x.get(part)} != {y.get(part)}")
    return out


def test_nothing_in_the_clear_depends_on_n_k(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds 1-2 train (round 2's keys rode round 1's exchange); round 3 would exceed the
    budget, so every client declines it: training and declining replies are both compared."""
    schedule = public_schedule(compose_config([*SETTINGS, "num_rounds=3"]))
    assert schedule is not None
    budget = schedule.epsilon_after(2) * 1.001
    same, sizes_a, summary = _run(tmp_path, "a", 0, monkeypatch, rounds=3, budget=budget)
    other, sizes_b, _ = _run(tmp_path, "b", SHRINK, monkeypatch, rounds=3, budget=budget)
    assert summary["rounds_completed"] == 2 and summary["rounds_failed"] == [3]
    assert sizes_a[0] - sizes_b[0] == SHRINK
    assert {p: n for p, n in sizes_a.items() if p} == {p: n for p, n in sizes_b.items() if p}
    assert _differences(same, other) == []
    # The comparison saw the DP values: every train reply carried the public ε and δ.
    ledger = json.loads((tmp_path / "a" / "privacy.json").read_text())
    assert PublicSchedule.from_json(ledger["public_schedule"]) == schedule
    trained = [r["metrics"]["metrics"] for r in same if "metrics" in r.get("metrics", {})
               and "epsilon" in r["metrics"]["metrics"]]
    assert len(trained) == 3 * NUM_CLIENTS  # 2 trained rounds, then the declines
    declines = [r["configs"]["decline"] for r in same if "decline" in r.get("configs", {})]
    assert [d["reason"] for d in declines] == ["privacy budget exhausted"] * NUM_CLIENTS
    assert {m["delta"] for m in trained} == {schedule.delta} == {1 / (10 * 5000)}
    assert ledger["summary"]["epsilon_per_client"] == {
        str(i): schedule.epsilon_after(2) for i in range(NUM_CLIENTS)}
    assert not any(e["refused"] for e in ledger["entries"])
    report = (tmp_path / "a" / "privacy_report.md").read_text()
    assert "## In the clear" in report and "## Public DP schedule" in report


def test_per_client_dp_parameters_reveal_n_k(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Today's per-client δ, q and σ (no public schedule on the clients): δ = 1/(10 n_k)
    and ε differ between the runs, and the server's ledger refuses them as off-schedule."""
    monkeypatch.setattr(local_trainer, "public_schedule", lambda cfg: None)
    same, sizes_a, _ = _run(tmp_path, "a", 0, monkeypatch, rounds=1)
    other, _, _ = _run(tmp_path, "b", SHRINK, monkeypatch, rounds=1)
    found = _differences(same, other)
    assert any("'delta'" in line for line in found), found
    delta = next(r["metrics"]["metrics"]["delta"] for r in same
                 if r["node"] == 101 and "delta" in r.get("metrics", {}).get("metrics", {}))
    assert round(1 / (10 * delta)) == sizes_a[0]  # n_k, read off the clear δ
    refused = json.loads((tmp_path / "a" / "privacy.json").read_text())["entries"]
    assert len(refused) == NUM_CLIENTS
    assert all(e["refused"] and "public delta" in e["refused"] for e in refused)
