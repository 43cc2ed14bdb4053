"""Server-side privacy ledger: records, summaries, files, and resume after a restart."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedstack.config import compose_config
from fedstack.privacy.budget import BUDGET_EXHAUSTED_PREFIX
from fedstack.privacy.ledger import PrivacyLedger
from fedstack.strategies.round_log import RoundLog

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
                 "| 2 | 2 | declined (1.5) |", REASON, "budget: 3.0",
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
