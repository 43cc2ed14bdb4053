"""A ClientApp written the way Flower's own quickstart writes one trains under fedstack.

The ClientApp below imports nothing from fedstack: its own model (the same layout as the
server's breast_cancer model), its own data loading by `partition-id`, and the standard reply
records (`arrays`, `metrics` with `num-examples`). Under `aggregation=fedavg` the server
aggregates it like any other client; under `aggregation=secagg` or `he` it cannot take part
(those need fedstack's ClientApp mods), and the run fails loudly instead of training on
nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from sklearn.datasets import load_breast_cancer
from torch import nn

from fedstack.config import compose_config
from fedstack.server_app import run_server
from tests.inprocess_grid import InProcessGrid

NUM_CLIENTS = 3

quickstart = ClientApp()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(30, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                                 nn.Linear(32, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_data(partition_id: int, num_partitions: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    part = np.array_split(np.random.default_rng(0).permutation(len(y)), num_partitions)
    idx = part[partition_id]
    return torch.tensor(x[idx], dtype=torch.float32), torch.tensor(y[idx])


@quickstart.train()
def train(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]),
                     int(context.node_config["num-partitions"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss.item(),
                                                   "num-examples": len(y)})})
    return Message(content=content, reply_to=msg)


@quickstart.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = load_data(int(context.node_config["partition-id"]),
                     int(context.node_config["num-partitions"]))
    with torch.no_grad():
        logits = model(x)
    metrics = {"eval_loss": float(nn.functional.cross_entropy(logits, y)),
               "eval_acc": float((logits.argmax(1) == y).float().mean()),
               "num-examples": len(y)}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


def _cfg(tmp_path: Path, aggregation: str):
    return compose_config(["task=breast_cancer", f"aggregation={aggregation}",
                           f"num_clients={NUM_CLIENTS}", "num_rounds=3", "partition=iid",
                           f"output_dir={tmp_path}", f"run_name={aggregation}",
                           "round_timeout=30"])


def test_flower_quickstart_client_trains_under_fedavg(tmp_path: Path) -> None:
    summary = run_server(InProcessGrid(quickstart, NUM_CLIENTS), _cfg(tmp_path, "fedavg"))
    assert summary["status"] == "completed" and summary["rounds_completed"] == 3
    assert summary["final_accuracy"] > 0.9  # the server's central test split


@pytest.mark.parametrize("aggregation", ["secagg", "he"])
def test_protocol_layers_need_fedstacks_client(tmp_path: Path, aggregation: str) -> None:
    summary = run_server(InProcessGrid(quickstart, NUM_CLIENTS),
                         _cfg(tmp_path, aggregation))
    assert summary["status"] == "failed" and summary["rounds_completed"] == 0
