"""Server-side privacy ledger: records, summaries, files, resume after a restart, and its
monotonicity (refusals, the records it sends each client, the client's reconciliation)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedstack.client_app import app as client_app
from fedstack.config import compose_config
from fedstack.privacy.accountant_state import PrivacyState
from fedstack.privacy.budget import BUDGET_EXHAUSTED_PREFIX
from fedstack.privacy.ledger import PrivacyLedger
from fedstack.privacy.ledger_sync import (
    ACCOUNTANT_RECORD,
    LEDGER_RECORD,
    STATUS_RECORDED,
    STATUS_UNMATCHED,
    LedgerView,
    parse_server_record,
    reconcile,
)
from fedstack.strategies.fedavg import WeightedFedAvg
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.round_log import RoundLog
from tests.inprocess_grid import InProcessGrid
from tests.reply_factory import array_record, train_reply

REASON = f"{BUDGET_EXHAUSTED_PREFIX}: epsilon would reach 3.1 after this round"


class _Strategy:
    visibility = "every client's noisy update, in the clear"
    stop_reason: str | None = None


def _cfg(tmp_path: Path):
    return compose_config(["dp=local", "num_clients=2", f"output_dir={tmp_path}"])


def _round(server_round: int, replies: dict[int, dict], declined: dict[int, str] | None = None):
    log = RoundLog(server_round=server_round)
    for node, metrics in replies.items():
        log.client_metrics[node] = metrics
        log.client_partitions[node] = node - 100
    log.declined = dict(declined or {})
    return log


def _fill(ledger: PrivacyLedger) -> list[dict]:
    rows = [{"round": 0}, {"round": 1}, {"round": 2}]
    ledger.on_round(rows[0], _round(0, {}))
    ledger.on_round(rows[1], _round(1, {
        100: {"epsilon": 1.0, "delta": 1e-4, "epsilon-budget": 3.0},
        101: {"epsilon": 1.5, "delta": 2e-4, "epsilon-budget": 3.0}}))
    ledger.on_round(rows[2], _round(2, {
        100: {"epsilon": 2.0, "delta": 1e-4, "epsilon-budget": 3.0},
        101: {"epsilon": 1.5, "delta": 2e-4, "declined": 1, "num-examples": 0}},
        declined={101: REASON}))
    return rows


def test_rounds_summary_and_history_columns(tmp_path: Path) -> None:
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path), strategy=_Strategy())
    rows = _fill(ledger)
    s = ledger.summary_fields()
    assert s["epsilon_max"] == 2.0 and s["epsilon_per_client"] == {"0": 2.0, "1": 1.5}
    assert s["delta_max"] == 2e-4 and s["epsilon_budget"] == 3.0
    assert s["clients_exhausted"] == ["1"]
    assert rows[1]["epsilon_max"] == 1.5
    assert rows[1]["epsilon_per_client"] == {"0": 1.0, "1": 1.5}
    assert rows[2]["dp_exhausted"] == ["1"] and rows[1]["dp_exhausted"] == []
    assert ledger.rounds_closed == [1, 2]
    assert not ledger.all_exhausted()
    ledger.record_reply(3, 0, {"epsilon": 2.0, "declined": 1}, reason=REASON)
    assert ledger.all_exhausted()


def test_other_declines_do_not_count_as_exhausted(tmp_path: Path) -> None:
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path))
    ledger.record_reply(1, 0, {"declined": 1}, reason="aggregation he not allowed by node policy")
    ledger.record_reply(1, 1, {"declined": 1}, reason=REASON)
    assert ledger.exhausted_clients() == {"1"} and not ledger.all_exhausted()


def test_files_written_and_readable(tmp_path: Path) -> None:
    strategy = _Strategy()
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path), strategy=strategy)
    _fill(ledger)
    strategy.stop_reason = "all 2 connected clients declined permanently"
    ledger.finish()
    data = json.loads((tmp_path / "privacy.json").read_text())
    assert data["summary"]["epsilon_max"] == 2.0 and len(data["entries"]) == 4
    report = (tmp_path / "privacy_report.md").read_text()
    for text in ["Federated averaging", "DP-SGD on every client", "noisy update, in the clear",
                 "| 2 | 2 | declined (1.5) |", REASON, "budget: 3 (",
                 "outside the (ε, δ) guarantee", "run stopped early", "declined permanently"]:
        assert text in report, text
    png = (tmp_path / "epsilon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_resume_from_privacy_json(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=cfg, strategy=_Strategy())
    _fill(ledger)
    # An entry of a round that was in flight when the server died is dropped on resume.
    ledger.record_reply(3, 0, {"epsilon": 9.9})
    ledger.write()
    again = PrivacyLedger(run_dir=tmp_path, cfg=cfg, strategy=_Strategy(), resume=True)
    assert again.summary() == {**ledger.summary(), "epsilon_max": 2.0,
                               "epsilon_per_client": {"0": 2.0, "1": 1.5}}
    row = {"round": 3}
    again.on_round(row, _round(3, {100: {"epsilon": 2.6, "delta": 1e-4}}))
    assert row["epsilon_per_client"] == {"0": 2.6, "1": 1.5}
    assert PrivacyLedger.load(tmp_path).summary()["epsilon_per_client"] == {"0": 2.6, "1": 1.5}
    fresh = PrivacyLedger(run_dir=tmp_path, cfg=cfg, resume=False)
    assert fresh.summary()["epsilon_max"] is None


def test_record_flower_message_content(tmp_path: Path) -> None:
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path))
    content = RecordDict({
        "metrics": MetricRecord({"declined": 1, "num-examples": 0, "epsilon": 0.7,
                                 "delta": 1e-5}),
        "decline": ConfigRecord({"reason": REASON}),
    })
    entry = ledger.record_message(4, 17, content)
    assert entry.declined and entry.exhausted and entry.epsilon == 0.7 and entry.client == "17"


def test_layers_follow_the_config(tmp_path: Path) -> None:
    cfg = compose_config(["aggregation=secagg", f"output_dir={tmp_path}"])
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=cfg)
    assert any("Secure aggregation" in layer for layer in ledger.layers)
    assert any("No differential privacy" in layer for layer in ledger.layers)


# -- monotonicity: the ledger refuses accounting that goes backwards --------------------------

DELTA = 1e-5


def _trained(rounds: list[int], sigma: float = 1.0, q: float = 0.1, steps: int = 10,
             start: PrivacyState | None = None) -> PrivacyState:
    """A client's accountant state after training `rounds` (as the engine closes rounds)."""
    state = start or PrivacyState("rdp", delta=DELTA, noise_multiplier=sigma)
    for server_round in rounds:
        state = state.with_steps(sigma, q, steps)
        state = state.with_round(server_round, state.epsilon(DELTA))
    return state


def _metrics(state: PrivacyState, client: int) -> dict:
    return {"partition-id": client, "epsilon": state.epsilons[-1], "delta": DELTA}


def test_decreasing_epsilon_is_refused_and_not_counted(tmp_path: Path) -> None:
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path))
    two = _trained([1, 2])
    ledger.record_reply(2, 0, _metrics(two, 0), state=two)
    restarted = _trained([3])  # its DP state dir was emptied: it trained round 3 from zero
    entry = ledger.record_reply(3, 0, _metrics(restarted, 0), state=restarted)
    assert entry.refused is not None and "went down" in entry.refused
    assert ledger.latest_epsilon() == {"0": two.epsilons[-1]}
    assert ledger.accounts["0"].state == two and ledger.accounts["0"].server_round == 2
    # Without a history either: the reported ε alone is checked.
    assert ledger.record_reply(3, 0, {"epsilon": 0.5}).refused is not None
    ledger.write()
    data = json.loads((tmp_path / "privacy.json").read_text())
    assert data["clients"]["0"]["epsilon"] == two.epsilons[-1]
    assert [e["refused"] is not None for e in data["entries"]] == [False, True]
    report = (tmp_path / "privacy_report.md").read_text()
    assert "## Refused replies" in report and "refused (" in report


def test_history_that_does_not_extend_the_record_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path))
    two = _trained([1, 2])
    ledger.record_reply(2, 0, _metrics(two, 0), state=two)
    other = _trained([1, 2, 3], q=0.125)  # a larger ε, but not this client's history
    assert other.epsilons[-1] > two.epsilons[-1]
    refused = ledger.record_reply(3, 0, _metrics(other, 0), state=other).refused
    assert refused is not None and "does not extend" in refused
    later = _trained([3], start=two)
    assert ledger.record_reply(3, 0, _metrics(later, 0), state=later).refused is None
    assert ledger.accounts["0"].state == later
    # An ε that does not match the record it came with is refused as malformed.
    forged = {**_metrics(_trained([4], start=later), 0), "epsilon": 99.0}
    assert "not the epsilon" in ledger.record_reply(
        4, 0, forged, state=_trained([4], start=later)).refused


def _with_accountant(reply, state: PrivacyState):
    reply.content.config_records[ACCOUNTANT_RECORD] = ConfigRecord(state.to_record())
    return reply


def test_refused_reply_is_rejected_from_aggregation(tmp_path: Path) -> None:
    """Through the strategy's reply screening: the refused update never reaches the sum."""
    arrays = {"w": np.ones((2, 3), dtype=np.float32)}
    strategy = WeightedFedAvg()
    strategy._spec = ModelLayout.of(array_record(arrays))
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path), strategy=strategy)
    assert strategy.train_hooks == [ledger]
    two = _trained([1, 2])
    ledger.record_reply(2, 0, _metrics(two, 0), state=two, node_id=101)
    restarted, fine = _trained([3]), _trained([1, 2, 3], q=0.2)
    strategy.round_log = RoundLog(server_round=3)
    replies = [_with_accountant(train_reply(101, arrays, _metrics(restarted, 0)), restarted),
               _with_accountant(train_reply(102, arrays, _metrics(fine, 1)), fine)]
    arrays_out, _ = strategy.aggregate_train(3, replies)
    assert arrays_out is not None and strategy.round_log.aggregated == [102]
    assert "went down" in strategy.round_log.rejected[101]
    row: dict = {"round": 3}
    ledger.on_round(row, strategy.round_log)
    assert row["epsilon_per_client"] == {"0": two.epsilons[-1], "1": fine.epsilons[-1]}
    assert set(row["dp_refused"]) == {"0"} and row["client_of_node"] == {"101": "0", "102": "1"}
    assert ledger.accounts["1"].state == fine and ledger.accounts["1"].node_id == 102


def test_a_client_record_goes_only_to_its_own_node(tmp_path: Path) -> None:
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=_cfg(tmp_path))
    two, one = _trained([1, 2]), _trained([1, 2], q=0.2)
    log = _round(2, {100: _metrics(two, 0), 101: _metrics(one, 1)})
    ledger.on_round({"round": 2}, log)  # no states: only ε is known
    ledger.accounts["0"].state = two
    records = ledger.train_records(None, [100, 101, 555])
    view = parse_server_record(records[100][LEDGER_RECORD])
    assert view is not None and view.client == "0" and view.state == two
    assert parse_server_record(records[101][LEDGER_RECORD]).state is None
    assert 555 not in records  # a new node: every recorded client is accounted for


def test_after_a_restart_unknown_nodes_are_identified_first(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    ledger = PrivacyLedger(run_dir=tmp_path, cfg=cfg)
    states = {i: _trained([1], q=0.1 * (i + 1)) for i in range(3)}
    ledger.on_round({"round": 1}, _round(1, {100 + i: _metrics(s, i) for i, s in states.items()}))
    for i, state in states.items():
        ledger.accounts[str(i)].state = state
    ledger.write()
    resumed = PrivacyLedger(run_dir=tmp_path, cfg=cfg, resume=True)  # node ids now unknown
    grid = InProcessGrid(client_app, 3, first_node_id=200)  # the real ClientApp answers
    grid.offline = {202}
    records = resumed.train_records(grid, [200, 201, 202])
    assert [(m.metadata.dst_node_id, m.metadata.message_type) for m in grid.sent] == [
        (node, "query.dp_identity") for node in (200, 201, 202)]
    for node, i in ((200, 0), (201, 1)):
        view = parse_server_record(records[node][LEDGER_RECORD])
        assert view is not None and view.client == str(i) and view.state == states[i]
    unmatched = parse_server_record(records[202][LEDGER_RECORD])
    assert unmatched is not None and unmatched.status == STATUS_UNMATCHED
    assert unmatched.state is None and unmatched.client is None


# -- the client side: continue from whichever covers the other, never below the ledger -------

def _view(state: PrivacyState | None, client: str = "0", epsilon: float | None = None):
    return LedgerView(STATUS_RECORDED, client=client, server_round=2,
                      epsilon=epsilon if epsilon is not None else (
                          state.epsilons[-1] if state else None), state=state)


def test_client_without_state_continues_from_the_ledger() -> None:
    two = _trained([1, 2])
    out = reconcile(None, _view(two), "0")
    assert out.state == two and out.changed and out.decline is None
    assert "continuing from the server ledger's record" in out.note


def test_client_behind_the_ledger_takes_the_ledger_and_ahead_keeps_its_own() -> None:
    one, two = _trained([1]), _trained([1, 2])
    behind = reconcile(one, _view(two), "0")
    assert behind.state == two and behind.changed and "behind" in behind.note
    ahead = reconcile(_trained([3], start=two), _view(two), "0")
    assert ahead.state == _trained([3], start=two) and not ahead.changed and ahead.note is None


def test_diverged_states_keep_every_round_once() -> None:
    """Own state restored from round 1, then trained round 3 the ledger never saw."""
    recorded = _trained([1, 2])
    own = _trained([3], start=_trained([1]))
    out = reconcile(own, _view(recorded), "0")
    everything = _trained([1, 2, 3])
    assert out.state is not None and out.state.events == everything.events
    assert out.state.history == everything.history
    assert out.state.epsilons[-1] == pytest.approx(everything.epsilons[-1], rel=1e-12)
    assert "diverged" in out.note


def test_client_declines_when_it_cannot_continue_honestly() -> None:
    unmatched = reconcile(None, LedgerView(STATUS_UNMATCHED), "0")
    assert unmatched.decline is not None and not unmatched.permanent
    assert reconcile(_trained([1]), LedgerView(STATUS_UNMATCHED), "0").decline is None
    epsilon_only = reconcile(_trained([1]), _view(None, epsilon=50.0), "0")
    assert epsilon_only.decline is not None and epsilon_only.permanent
    assert reconcile(_trained([1, 2]), _view(None, epsilon=0.1), "0").decline is None
    other = reconcile(None, _view(_trained([1, 2]), client="4"), "0")
    assert other.state is None and other.decline is not None and "client 4" in other.note
