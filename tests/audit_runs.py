"""Small recorded runs shared by the audit tests (in-process grid, real ClientApp, no Ray).

One run per aggregation per test session (cached): the recorder's tests compare the recorded
view with the messages the grid really carried; the inversion tests attack the same views.
Clients hold a handful of examples and take one full-batch SGD step, the inversion attack's
best case, so a failed reconstruction is the defence's doing, not the setting's.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.outputs.server_view import _record_bytes
from fedstack.server_app import run_server
from tests.inprocess_grid import InProcessGrid

#: 40 clients share digits' 1437 pool examples (~36 each); keeping 90% for validation
#: leaves each ~4 to train on, in one full-batch SGD step; 5 clients train per round.
NUM_CLIENTS = 40
RECORD_ROUND = 2
BASE = [
    "task=digits", "task.model=digits_cnn_small", "task.batch_size=64",
    "task.client_val_fraction=0.9", "partition=iid", f"num_clients={NUM_CLIENTS}",
    "min_train_nodes=5", "fraction_train=0.1", "fraction_evaluate=0",
    "min_evaluate_nodes=0", "num_rounds=2", "central_evaluation=false", "log_table=false",
    f"audit.record_round={RECORD_ROUND}",
]
_TMP = tempfile.TemporaryDirectory(prefix="fedstack-audit-")


@dataclass
class RecordedRun:
    run_dir: Path
    cfg: Any
    #: Every message the grid carried: (round, direction, node, record name -> bytes).
    carried: list[tuple[int, str, int, dict[str, bytes]]] = field(default_factory=list)


def _records(msg: Message) -> dict[str, bytes]:
    if msg.has_error():
        return {}
    return {name: _record_bytes(name, record) for name, record in msg.content.items()}


@functools.cache
def recorded_run(aggregation: str) -> RecordedRun:
    """A 2-round run under `aggregation` whose round 2 is recorded (cached per session)."""
    cfg = compose_config([*BASE, f"aggregation={aggregation}", f"output_dir={_TMP.name}",
                          f"run_name={aggregation}"])
    carried: list[tuple[int, str, int, dict[str, bytes]]] = []

    class CarryingGrid(InProcessGrid):
        """Keeps the bytes of every message as it crosses the wire (before a ClientApp in
        this process can touch the shared request object)."""

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[override]
            messages = list(messages)
            # Every request of one exchange belongs to one round (its config says which).
            rounds = {int(m.content["config"]["server-round"]) for m in messages}
            assert len(rounds) == 1, rounds
            (rnd,) = rounds
            for msg in messages:
                carried.append((rnd, "sent", msg.metadata.dst_node_id, _records(msg)))
            replies = super().send_and_receive(messages, timeout=timeout)
            for msg in replies:
                carried.append((rnd, "received", msg.metadata.src_node_id, _records(msg)))
            return replies

    grid = CarryingGrid(client_app, NUM_CLIENTS)
    summary = run_server(grid, cfg)
    assert summary["status"] == "completed", summary
    return RecordedRun(Path(summary["run_dir"]), cfg, carried)
