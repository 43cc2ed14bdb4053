"""Audit mode's server-view recorder keeps exactly what the server sent and received in the
chosen round: compared byte for byte with the messages the grid carried (tests/audit_runs)."""

from __future__ import annotations

import json
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from fedstack.audit.inversion_audit import audit_inversion
from fedstack.config import ConfigError, compose_config
from fedstack.outputs.run_directory import load_checkpoint
from fedstack.outputs.server_view import (
    RECEIVED,
    SENT,
    ServerView,
    ServerViewRecorder,
)
from fedstack.strategies.he.records import is_encrypted_model
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.secagg.mod import MASKED_RECORD
from tests.audit_runs import RECORD_ROUND, recorded_run


def _multiset(items):
    return Counter((d, n, tuple(sorted(r.items()))) for d, n, r in items)


def _recorded(view: ServerView):
    out = []
    for msg in view.messages:
        records = {e["name"]: (view.dir / e["file"]).read_bytes() for e in msg.records}
        out.append((msg.direction, msg.node, records))
    return out


@pytest.mark.parametrize("aggregation", ["fedavg", "secagg", "he"])
def test_view_is_exactly_the_messages_of_the_round(aggregation: str) -> None:
    run = recorded_run(aggregation)
    view = ServerView.of_run(run.run_dir)
    assert view.round == RECORD_ROUND and view.complete and view.aggregation == aggregation
    carried = [(d, n, r) for rnd, d, n, r in run.carried if rnd == RECORD_ROUND]
    assert carried and {d for d, _, _ in carried} == {SENT, RECEIVED}
    # Byte-equal, message for message: nothing added, nothing missing, nothing of round 1.
    assert _multiset(_recorded(view)) == _multiset(carried)
    # The model the clients received is the global model after round 1.
    ckpt = load_checkpoint(run.run_dir / "checkpoints" / "round-0001.npz")
    sent = view.global_model()
    for name in ckpt:
        np.testing.assert_array_equal(sent[name].numpy(), ckpt[name].numpy())
    summary = json.loads((run.run_dir / "summary.json").read_text())
    assert summary["audit_record_round"] == RECORD_ROUND
    assert "Audit mode was on" in (run.run_dir / "privacy_report.md").read_text()


def test_fedavg_view_holds_each_plaintext_update() -> None:
    view = ServerView.of_run(recorded_run("fedavg").run_dir)
    replies = view.train_replies()
    assert len(replies) == 5
    for msg in replies.values():
        metrics = msg.record("metrics")
        assert metrics["num-examples"] >= 1 and "partition-id" in metrics
        assert set(msg.record("arrays").keys()) == set(view.global_model().keys())


def test_secagg_view_holds_masked_vectors_and_the_unmasked_sum_only() -> None:
    run = recorded_run("secagg")
    view = ServerView.of_run(run.run_dir)
    replies = view.train_replies()
    assert len(replies) == 5
    layout = ModelLayout.of(view.global_model())
    for msg in replies.values():
        assert not msg.has("arrays")  # never a plaintext update
        words = msg.record(MASKED_RECORD)["words"].numpy()
        assert words.shape == (layout.size + 1,) and words.dtype.kind == "u"
        assert "num-examples" not in msg.record("metrics")
    computed = view.computed()
    mean = computed["weighted_sum"] / int(computed["weight_sum"])
    new_model = load_checkpoint(run.run_dir / "checkpoints" / f"round-{RECORD_ROUND:04d}.npz")
    np.testing.assert_allclose(layout.flatten(new_model), mean, atol=1e-6)
    np.testing.assert_allclose(layout.flatten(view.aggregate_record("arrays")), mean, atol=1e-6)


def test_he_view_holds_ciphertexts_the_server_cannot_decrypt() -> None:
    run = recorded_run("he")
    view = ServerView.of_run(run.run_dir)
    assert is_encrypted_model(view.global_model())  # round 2: clients got the encrypted sum
    replies = view.train_replies()
    assert len(replies) == 5
    for msg in replies.values():
        assert all(name.startswith("he.") for name in msg.record("arrays"))
    result = audit_inversion(view, run.cfg, run.run_dir)
    assert not result["applicable"] and "ciphertexts" in result["reason"]
    assert result["he_decryption"]["replies"] == 5
    assert result["he_decryption"]["decryption_refused"] == 5


def test_tampered_record_is_detected() -> None:
    view = ServerView.of_run(recorded_run("fedavg").run_dir)
    msg = next(iter(view.train_replies().values()))
    entry = next(e for e in msg.records if e["name"] == "metrics")
    path = view.dir / entry["file"]
    original = path.read_bytes()
    try:
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(ValueError, match="altered"):
            msg.record("metrics")
    finally:
        path.write_bytes(original)


def test_audit_mode_is_off_by_default_and_validated() -> None:
    assert compose_config([]).audit.record_round is None
    strategy = SimpleNamespace(view_recorders=[])
    cfg = SimpleNamespace(audit=SimpleNamespace(record_round=None))
    assert ServerViewRecorder.attach(strategy, "unused", cfg) is None
    assert strategy.view_recorders == []
    with pytest.raises(ConfigError, match=r"audit\.record_round"):
        compose_config(["num_rounds=3", "audit.record_round=4"])
