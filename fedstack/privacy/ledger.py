"""Server-side privacy ledger: what every client reported it spent, round by round.

Why on the server: clients account for themselves (only they know their data size and
noise), but the run owner needs one place that says which layers were on, what the server
could see, and how much ε each client has spent against its budget, and needs it to
survive a server restart. The ledger only *records* clients' reports; it never computes
ε itself, so a run's report is exactly what the clients enforced.

Files in the run directory: `privacy.json` (the ledger, reloadable: `PrivacyLedger.load`),
`privacy_report.md` (for people) and `privacy_epsilon.png` (ε against rounds).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedstack.privacy.budget import BUDGET_EXHAUSTED_PREFIX

LEDGER_FILE = "privacy.json"
REPORT_FILE = "privacy_report.md"
PLOT_FILE = "privacy_epsilon.png"
LEDGER_FORMAT = 1


@dataclass
class ClientEntry:
    """One client's report in one round."""

    server_round: int
    client: str
    epsilon: float | None
    delta: float | None
    declined: bool = False
    reason: str | None = None
    budget: float | None = None

    @property
    def exhausted(self) -> bool:
        return self.declined and (self.reason or "").startswith(BUDGET_EXHAUSTED_PREFIX)


@dataclass
class PrivacyLedger:
    """Per-client ε over rounds, the run's privacy layers and what the server saw."""

    run_dir: Path
    layers: list[str] = field(default_factory=list)
    visibility: str = ""
    dp: dict[str, Any] = field(default_factory=dict)
    num_clients: int | None = None
    entries: list[ClientEntry] = field(default_factory=list)
    rounds_closed: list[int] = field(default_factory=list)
    stopped: str | None = None

    # -- recording ------------------------------------------------------------------------
    def record_reply(
        self,
        server_round: int,
        client: str | int,
        metrics: Mapping[str, Any],
        reason: str | None = None,
    ) -> ClientEntry:
        """Record one train reply's metrics (`epsilon`, `delta`, `declined`, ...)."""
        entry = ClientEntry(
            server_round=int(server_round),
            client=str(client),
            epsilon=_finite_or_none(metrics.get("epsilon")),
            delta=_finite_or_none(metrics.get("delta")),
            declined=bool(int(metrics.get("declined", 0) or 0)),
            reason=reason,
            budget=_finite_or_none(metrics.get("epsilon-budget")),
        )
        self.entries = [
            e for e in self.entries
            if not (e.server_round == entry.server_round and e.client == entry.client)
        ]
        self.entries.append(entry)
        return entry

    def record_message(self, server_round: int, client: str | int, content: Any) -> ClientEntry:
        """Record a Flower reply's RecordDict (metrics + optional "decline" ConfigRecord)."""
        metrics: dict[str, Any] = {}
        if "metrics" in content.metric_records:
            metrics = dict(content.metric_records["metrics"])
        reason = None
        if "decline" in content.config_records:
            reason = str(content.config_records["decline"].get("reason", ""))
        return self.record_reply(server_round, client, metrics, reason)

    def close_round(self, server_round: int) -> dict[str, Any]:
        """Mark a round complete, write the files, and return its history columns."""
        if server_round not in self.rounds_closed:
            self.rounds_closed.append(int(server_round))
        self.write()
        return self.round_columns(server_round)

    def mark_stopped(self, reason: str) -> None:
        self.stopped = reason
        self.write()

    # -- queries --------------------------------------------------------------------------
    def latest_epsilon(self, up_to_round: int | None = None) -> dict[str, float]:
        """Each client's most recent reported ε (cumulative), up to a round."""
        latest: dict[str, tuple[int, float]] = {}
        for e in self.entries:
            if e.epsilon is None or (up_to_round is not None and e.server_round > up_to_round):
                continue
            if e.client not in latest or e.server_round >= latest[e.client][0]:
                latest[e.client] = (e.server_round, e.epsilon)
        return {c: v for c, (_, v) in sorted(latest.items())}

    def exhausted_clients(self) -> set[str]:
        """Clients whose latest reply declined because the budget is spent."""
        last: dict[str, ClientEntry] = {}
        for e in sorted(self.entries, key=lambda e: e.server_round):
            last[e.client] = e
        return {c for c, e in last.items() if e.exhausted}

    def all_exhausted(self, num_clients: int | None = None) -> bool:
        """True when every client of the run has run out of budget (stop the run)."""
        total = num_clients if num_clients is not None else self.num_clients
        exhausted = self.exhausted_clients()
        if total is None:
            known = {e.client for e in self.entries}
            return bool(known) and exhausted == known
        return len(exhausted) >= total

    def round_columns(self, server_round: int) -> dict[str, Any]:
        """ε columns for history.jsonl after `server_round`."""
        latest = self.latest_epsilon(server_round)
        this_round = [e for e in self.entries if e.server_round == server_round]
        return {
            "epsilon_max": max(latest.values()) if latest else None,
            "epsilon_per_client": latest,
            "dp_declined": sorted(e.client for e in this_round if e.declined),
        }

    def summary(self) -> dict[str, Any]:
        """Fields for summary.json."""
        latest = self.latest_epsilon()
        deltas = sorted({e.delta for e in self.entries if e.delta is not None})
        budgets = sorted({e.budget for e in self.entries if e.budget is not None})
        return {
            "epsilon_max": max(latest.values()) if latest else None,
            "epsilon_per_client": latest,
            "delta_max": deltas[-1] if deltas else None,
            "epsilon_budget": budgets[0] if len(budgets) == 1 else (budgets or None),
            "clients_exhausted": sorted(self.exhausted_clients()),
            "stopped_early": self.stopped,
        }

    # -- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "layers": self.layers,
            "visibility": self.visibility,
            "dp": self.dp,
            "num_clients": self.num_clients,
            "rounds_closed": self.rounds_closed,
            "stopped": self.stopped,
            "entries": [asdict(e) for e in self.entries],
            "summary": self.summary(),
        }

    def write(self) -> None:
        """Write privacy.json (atomically), the report and the plot."""
        from fedstack.privacy.report import write_plot, write_report

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / LEDGER_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, allow_nan=False))
        os.replace(tmp, path)
        write_report(self, self.run_dir / REPORT_FILE)
        write_plot(self, self.run_dir / PLOT_FILE)

    @classmethod
    def load(cls, run_dir: str | Path) -> PrivacyLedger:
        """Reload a ledger from a run directory (resume after a server restart)."""
        run_dir = Path(run_dir)
        data = json.loads((run_dir / LEDGER_FILE).read_text())
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{run_dir / LEDGER_FILE}: unknown format {data.get('format')!r}")
        return cls(
            run_dir=run_dir,
            layers=list(data.get("layers", [])),
            visibility=str(data.get("visibility", "")),
            dp=dict(data.get("dp", {})),
            num_clients=data.get("num_clients"),
            entries=[ClientEntry(**e) for e in data.get("entries", [])],
            rounds_closed=[int(r) for r in data.get("rounds_closed", [])],
            stopped=data.get("stopped"),
        )

    @classmethod
    def open(cls, run_dir: str | Path, **kwargs: Any) -> PrivacyLedger:
        """Load the run's ledger if it exists (resume), else start a new one."""
        run_dir = Path(run_dir)
        if (run_dir / LEDGER_FILE).exists():
            ledger = cls.load(run_dir)
            for key, value in kwargs.items():  # descriptions may be refreshed
                if value is not None:
                    setattr(ledger, key, value)
            return ledger
        return cls(run_dir=run_dir, **kwargs)

    def forget_after(self, server_round: int) -> None:
        """Drop entries of rounds after `server_round` (resuming from an older checkpoint).

        Clients' own accountants still count those rounds' steps; the next replies report
        the higher ε, so the ledger stays an under-statement only until then.
        """
        self.entries = [e for e in self.entries if e.server_round <= server_round]
        self.rounds_closed = [r for r in self.rounds_closed if r <= server_round]


def _finite_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def entries_by_round(entries: Iterable[ClientEntry]) -> dict[int, dict[str, ClientEntry]]:
    table: dict[int, dict[str, ClientEntry]] = {}
    for e in entries:
        table.setdefault(e.server_round, {})[e.client] = e
    return dict(sorted(table.items()))
