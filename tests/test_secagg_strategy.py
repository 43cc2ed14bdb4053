"""SecAggFedAvg + secagg_mod through the real ClientApp in process (no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from fedstack.client_app import app as client_app
from fedstack.config import CONFIG_MESSAGE_KEY, compose_config, config_to_yaml
from fedstack.strategies import build_strategy
from fedstack.strategies.secagg import wire
from fedstack.strategies.secagg.mod import (
    REFUSED_CODE,
    SECAGG_RECORD,
    STATE_RECORD,
    refusal_reason,
    secagg_mod,
)
from fedstack.task.models import build_model
from tests.inprocess_grid import InProcessGrid

NUM_CLIENTS = 4


class Logs:
    """Recorder that keeps every round's log."""

    def __init__(self) -> None:
        self.rounds = []

    def on_round_end(self, round_log, arrays) -> None:
        self.rounds.append(round_log)


def _cfg(tmp_path: Path, aggregation: str, *extra: str):
    return compose_config(
        [
            "task=breast_cancer",
            f"aggregation={aggregation}",
            "partition=iid",
            f"num_clients={NUM_CLIENTS}",
            "num_rounds=3",
            f"output_dir={tmp_path}",
            *extra,
        ]
    )


def _run(cfg, tmp_path: Path, rounds: int = 1, hook=None):
    grid = InProcessGrid(client_app, num_nodes=NUM_CLIENTS)
    grid.reply_hook = hook
    strategy = build_strategy(cfg, tmp_path)
    model = build_model("tabular_mlp", (30,), 2, seed=int(cfg.seed))
    initial = ArrayRecord(model.state_dict())
    config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg)})
    logs = Logs()
    result = strategy.start(
        grid, initial, num_rounds=rounds, train_config=config, evaluate_config=config, recorder=logs
    )
    return strategy, result, logs, grid, initial


def _flat(arrays: ArrayRecord) -> np.ndarray:
    return np.concatenate([arrays[k].numpy().ravel().astype(np.float64) for k in arrays])


def _drop_at(node_index: int, phase_key: str, message_type: str = MessageType.TRAIN):
    """Reply hook: the node's reply to requests carrying `phase_key` is lost."""

    def hook(node, request, reply):
        if node != 101 + node_index or request.metadata.message_type != message_type:
            return reply
        parts = request.content.config_records.get(SECAGG_RECORD)
        return None if parts is not None and phase_key in parts else reply

    return hook


@pytest.mark.parametrize(("security", "exchanges"),
                         [("semi-honest", (4, 2)), ("malicious", (5, 3))])
def test_masked_round_matches_plain_fedavg_and_counts_exchanges(tmp_path, security, exchanges):
    mode = f"aggregation.security={security}"
    _, plain, _, _, _ = _run(_cfg(tmp_path, "fedavg"), tmp_path / "p")
    strategy, masked, _, _, _ = _run(_cfg(tmp_path, "secagg", mode), tmp_path / "s")
    bound = strategy.params.codec.error_bound
    assert np.abs(_flat(masked.arrays) - _flat(plain.arrays)).max() <= bound + 1e-6
    strategy, masked, logs, grid, _ = _run(_cfg(tmp_path, "secagg", mode), tmp_path / "s2",
                                           rounds=2)
    first, second = logs.rounds
    # semi-honest round 1: advertise, share, train(+masked input), unmask(+next shares);
    # malicious adds the signed-view (consistency) exchange to every round. No federated
    # evaluation under secagg (per-client metrics would leave in the clear).
    assert (first.exchanges, second.exchanges) == exchanges
    assert not any(m.metadata.message_type == MessageType.EVALUATE for m in grid.sent)
    assert first.extra["secagg"]["survivors"] == NUM_CLIENTS
    # no reply to the server ever carried plaintext weights or n_k
    for msg in grid.sent:
        assert (
            msg.metadata.message_type != MessageType.TRAIN
            or "arrays" not in msg.content
            or SECAGG_RECORD in msg.content.config_records
        )


@pytest.mark.parametrize("phase_key", [wire.SHARE_REQ, wire.MASK_REQ, wire.UNMASK_REQ])
def test_dropout_mid_round_completes(tmp_path, phase_key):
    _, result, logs, _, initial = _run(
        _cfg(tmp_path, "secagg"), tmp_path, rounds=2, hook=_drop_at(1, phase_key)
    )
    assert all(log.aborted is None for log in logs.rounds)
    assert not np.array_equal(_flat(result.arrays), _flat(initial))
    survivors = [log.extra["secagg"]["survivors"] for log in logs.rounds]
    assert min(survivors) == NUM_CLIENTS - 1


def test_dropped_train_reply_gives_the_survivors_mean(tmp_path):
    def hook(node, request, reply):  # node 103 loses its reply to the model-carrying message
        return None if node == 103 and "arrays" in request.content.array_records else reply

    _, plain, _, _, _ = _run(_cfg(tmp_path, "fedavg"), tmp_path / "p", hook=hook)
    strategy, masked, logs, _, _ = _run(_cfg(tmp_path, "secagg"), tmp_path / "s", hook=hook)
    assert logs.rounds[0].extra["secagg"]["dropped"] == [103]
    assert (
        np.abs(_flat(masked.arrays) - _flat(plain.arrays)).max()
        <= strategy.params.codec.error_bound + 1e-6
    )


def test_below_threshold_aborts_and_keeps_the_model(tmp_path):
    def hook(node, request, reply):
        parts = request.content.config_records.get(SECAGG_RECORD)
        if node in (101, 102) and parts is not None and wire.MASK_REQ in parts:
            return None
        return reply

    _, result, logs, _, initial = _run(_cfg(tmp_path, "secagg"), tmp_path, hook=hook)
    assert "aborted" in logs.rounds[0].aborted and "below t=3" in logs.rounds[0].aborted
    assert np.array_equal(_flat(result.arrays), _flat(initial))


@pytest.mark.parametrize(("security", "stages"), [("semi-honest", 3), ("malicious", 4)])
def test_protocol_exchanges_use_the_stage_timeout(tmp_path, monkeypatch, security, stages):
    timeouts: list[tuple[bool, float]] = []
    original = InProcessGrid.send_and_receive

    def recording(self, messages, *, timeout=None):
        messages = list(messages)
        carries_model = any("arrays" in m.content.array_records for m in messages)
        timeouts.append((carries_model, timeout))
        return original(self, messages, timeout=timeout)

    monkeypatch.setattr(InProcessGrid, "send_and_receive", recording)
    _run(_cfg(tmp_path, "secagg", "aggregation.stage_timeout=7", "round_timeout=99",
              f"aggregation.security={security}"), tmp_path)
    protocol = [t for model, t in timeouts if not model]
    # advertise, share, [malicious: consistency,] unmask
    assert len(protocol) == stages and set(protocol) == {7.0}
    assert {t for model, t in timeouts if model} == {99.0}  # train (no federated evaluation)


def _context(node_id: int = 5) -> Context:
    return Context(
        run_id=1,
        node_id=node_id,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )


def _train_message(cfg, secagg: dict | None) -> Message:
    model = build_model("tabular_mlp", (30,), 2, seed=0)
    content = {
        "arrays": ArrayRecord(model.state_dict()),
        "config": ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg), "server-round": 1}),
    }
    if secagg is not None:
        content[SECAGG_RECORD] = ConfigRecord(secagg)
    return Message(RecordDict(content), dst_node_id=5, message_type=MessageType.TRAIN)


def _never_called(msg, context):
    raise AssertionError("the train handler must not run")


def test_mod_refuses_plaintext_train_and_malformed_requests(tmp_path):
    # semi-honest: this node has no identity (malicious-mode refusals: test_secagg_malicious)
    cfg = _cfg(tmp_path, "secagg", "aggregation.security=semi-honest")
    ctx = _context()
    reply = secagg_mod(_train_message(cfg, None), ctx, _never_called)
    assert (
        reply.has_error() and reply.error.code == REFUSED_CODE and "unmasked" in reply.error.reason
    )
    assert reply.error.reason == refusal_reason("unmasked-train")  # a fixed code, no details
    # advertise works and stores state; a malformed share request is refused, state kept
    reply = secagg_mod(_train_message(cfg, {wire.ADVERTISE_REQ: 1}), ctx, _never_called)
    assert not reply.has_error() and wire.ADVERT in reply.content.config_records[SECAGG_RECORD]
    state = bytes(ctx.state.config_records[STATE_RECORD]["state"])
    bad = {wire.SHARE_REQ: 1, "sreq.seed": b"x" * 31, "sreq.participants": b"", "sreq.keys": b""}
    reply = secagg_mod(_train_message(cfg, bad), ctx, _never_called)
    assert reply.has_error() and reply.error.reason == refusal_reason("protocol")
    assert bytes(ctx.state.config_records[STATE_RECORD]["state"]) == state
    # a mask request for another round than the train message's is refused before training
    mreq = {wire.MASK_REQ: 2, "mreq.shared": b"", "mreq.senders": b"", "mreq.cts": b""}
    reply = secagg_mod(_train_message(cfg, mreq), ctx, _never_called)
    assert reply.has_error() and reply.error.reason == refusal_reason("stale")


def test_node_with_lost_reply_sits_one_round_out_without_extra_exchanges(tmp_path):
    def hook(node, request, reply):
        parts = request.content.config_records.get(SECAGG_RECORD)
        lost = node == 103 and parts is not None and parts.get(wire.MASK_REQ) == 1
        return None if lost else reply

    _, _, logs, _, _ = _run(_cfg(tmp_path, "secagg", "aggregation.security=semi-honest"),
                            tmp_path, rounds=3, hook=hook)
    facts = [(log.extra["secagg"]["participants"], log.exchanges) for log in logs.rounds]
    # round 1 sets up (4 protocol exchanges); 103's masked input (and its keys for round 2)
    # are lost, so it sits round 2 out and rejoins in round 3 -- never an extra exchange
    assert facts == [(4, 4), (3, 2), (4, 2)]
    assert logs.rounds[0].extra["secagg"]["dropped"] == [103]
