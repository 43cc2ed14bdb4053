"""Server-side privacy ledger: records, summaries, files, and resume after a restart."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedstack.privacy.budget import BUDGET_EXHAUSTED_PREFIX
from fedstack.privacy.ledger import PrivacyLedger

REASON = f"{BUDGET_EXHAUSTED_PREFIX}: epsilon would reach 3.1 after this round"


def _ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger(run_dir=tmp_path, layers=["FedAvg", "DP-SGD"],
                         visibility="every client's noisy update, in the clear",
                         dp={"accountant": "rdp"}, num_clients=2)


def _fill(ledger: PrivacyLedger) -> None:
    ledger.record_reply(1, 0, {"epsilon": 1.0, "delta": 1e-4, "epsilon-budget": 3.0})
    ledger.record_reply(1, 1, {"epsilon": 1.5, "delta": 2e-4, "epsilon-budget": 3.0})
    ledger.close_round(1)
    ledger.record_reply(2, 0, {"epsilon": 2.0, "delta": 1e-4, "epsilon-budget": 3.0})
    ledger.record_reply(2, 1, {"epsilon": 1.5, "delta": 2e-4, "declined": 1,
                               "num-examples": 0}, reason=REASON)
    ledger.close_round(2)


def test_summary_and_history_columns(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _fill(ledger)
    s = ledger.summary()
    assert s["epsilon_max"] == 2.0 and s["epsilon_per_client"] == {"0": 2.0, "1": 1.5}
    assert s["delta_max"] == 2e-4 and s["epsilon_budget"] == 3.0
    assert s["clients_exhausted"] == ["1"]
    assert ledger.round_columns(1) == {"epsilon_max": 1.5,
                                       "epsilon_per_client": {"0": 1.0, "1": 1.5},
                                       "dp_declined": []}
    assert ledger.round_columns(2)["dp_declined"] == ["1"]
    assert not ledger.all_exhausted()
    ledger.record_reply(3, 0, {"epsilon": 2.0, "declined": 1}, reason=REASON)
    assert ledger.all_exhausted()


def test_other_declines_do_not_count_as_exhausted(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    ledger.record_reply(1, 0, {"declined": 1}, reason="aggregation he not allowed by node policy")
    ledger.record_reply(1, 1, {"declined": 1}, reason=REASON)
    assert ledger.exhausted_clients() == {"1"} and not ledger.all_exhausted()


def test_files_written_and_readable(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _fill(ledger)
    data = json.loads((tmp_path / "privacy.json").read_text())
    assert data["summary"]["epsilon_max"] == 2.0 and len(data["entries"]) == 4
    report = (tmp_path / "privacy_report.md").read_text()
    for text in ["FedAvg", "noisy update, in the clear", "| 2 | 2 | declined (1.5) |",
                 REASON, "budget: 3.0", "outside the (ε, δ) guarantee"]:
        assert text in report
    png = (tmp_path / "privacy_epsilon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_resume_from_privacy_json(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _fill(ledger)
    # A restarted server reopens the ledger and continues where it stopped.
    again = PrivacyLedger.open(tmp_path, visibility="updated text")
    assert again.summary() == ledger.summary() and again.visibility == "updated text"
    again.record_reply(3, 0, {"epsilon": 2.6, "delta": 1e-4})
    again.close_round(3)
    assert PrivacyLedger.load(tmp_path).summary()["epsilon_per_client"] == {"0": 2.6, "1": 1.5}
    again.forget_after(1)
    assert again.latest_epsilon() == {"0": 1.0, "1": 1.5}


def test_record_flower_message_content(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    content = RecordDict({
        "metrics": MetricRecord({"declined": 1, "num-examples": 0, "epsilon": 0.7,
                                 "delta": 1e-5}),
        "decline": ConfigRecord({"reason": REASON}),
    })
    entry = ledger.record_message(4, 17, content)
    assert entry.declined and entry.exhausted and entry.epsilon == 0.7 and entry.client == "17"


def test_stopped_reason_reported(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    _fill(ledger)
    ledger.mark_stopped("every client's privacy budget is exhausted")
    assert "run stopped early" in (tmp_path / "privacy_report.md").read_text()
    assert PrivacyLedger.load(tmp_path).summary()["stopped_early"].startswith("every client")
