"""Server-side privacy ledger: what every client reported it spent, round by round.

Why on the server: clients account for themselves (only they know their data size and
noise), but the run owner needs one place that says which layers were on, what the server
could see, and how much ε each client has spent against its budget, and it must survive a
server restart. The ledger only *records* clients' reports; it never computes ε itself, so
the report shows exactly what the clients enforced.

It follows every run as a `RoundListener` of the run recorder (dp=none too: the report then
says there is no DP). Files in the run directory: `privacy.json` (the ledger; reloaded on
resume), `privacy_report.md` (for people) and `epsilon.png` (ε against rounds).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedstack.privacy.budget import BUDGET_EXHAUSTED_PREFIX

LEDGER_FILE = "privacy.json"
REPORT_FILE = "privacy_report.md"
PLOT_FILE = "epsilon.png"
LEDGER_FORMAT = 1

#: One line per aggregation: what that layer adds (the strategy's `visibility` says what
#: the server then sees).
AGGREGATION_LAYERS = {
    "fedavg": "Federated averaging (weighted FedAvg): raw data never leaves a client",
    "secagg": ("Secure aggregation (pairwise and self masks, Shamir-shared seeds): the server "
               "learns only the sum of the surviving clients' updates"),
    "he": ("CKKS homomorphic averaging: the server adds ciphertexts and never holds the "
           "secret key"),
}


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


class PrivacyLedger:
    """Per-client ε over rounds, the run's privacy layers and what the server saw."""

    def __init__(
        self,
        run_dir: str | Path,
        cfg: Any = None,
        strategy: Any = None,
        resume: bool = False,
        *,
        layers: list[str] | None = None,
        visibility: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.dp_name = str(cfg.dp.name) if cfg is not None else "local"
        self.layers = layers if layers is not None else _layers_of(cfg)
        self.visibility = visibility if visibility is not None else str(
            getattr(strategy, "visibility", "") or "")
        self.dp = _dp_settings_of(cfg)
        self.num_clients = int(cfg.num_clients) if cfg is not None else None
        self.entries: list[ClientEntry] = []
        self.rounds_closed: list[int] = []
        self.stopped: str | None = None
        self._strategy = strategy
        if resume and (self.run_dir / LEDGER_FILE).exists():
            self._load()

    # -- RoundListener ------------------------------------------------------------------
    def on_round(self, record: dict[str, Any], round_log: Any) -> None:
        """Take a round's replies; add ε columns to its history row; write the files."""
        server_round = int(round_log.server_round)
        for node, metrics in round_log.client_metrics.items():
            if "epsilon" not in metrics and node not in round_log.declined:
                continue
            client = round_log.client_partitions.get(node, metrics.get("partition-id", node))
            self.record_reply(server_round, _client_name(client), metrics,
                              reason=round_log.declined.get(node))
        if server_round >= 1 and server_round not in self.rounds_closed:
            self.rounds_closed.append(server_round)
        record.update(self.round_columns(server_round))
        self.write()

    def summary_fields(self) -> dict[str, Any]:
        """Fields for summary.json."""
        return self.summary()

    def finish(self) -> None:
        stop = getattr(self._strategy, "stop_reason", None)
        if stop:
            self.stopped = str(stop)
        self.write()

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
            declined=bool(int(metrics.get("declined", 0) or 0)) or reason is not None,
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
        return {c: v for c, (_, v) in sorted(latest.items(), key=lambda kv: client_sort_key(kv[0]))}

    def exhausted_clients(self) -> set[str]:
        """Clients whose latest reply declined because the budget is spent."""
        last: dict[str, ClientEntry] = {}
        for e in sorted(self.entries, key=lambda e: e.server_round):
            last[e.client] = e
        return {c for c, e in last.items() if e.exhausted}

    def all_exhausted(self, num_clients: int | None = None) -> bool:
        """True when every client of the run has run out of budget."""
        total = num_clients if num_clients is not None else self.num_clients
        exhausted = self.exhausted_clients()
        if total is None:
            known = {e.client for e in self.entries}
            return bool(known) and exhausted == known
        return len(exhausted) >= total

    def round_columns(self, server_round: int) -> dict[str, Any]:
        """ε columns for history.jsonl after `server_round`.

        `epsilon_max` is the largest ε any client has spent so far (a client not sampled
        this round still counts with its last report); `epsilon_per_client` likewise.
        """
        latest = self.latest_epsilon(server_round)
        this_round = [e for e in self.entries if e.server_round == server_round]
        return {
            "epsilon_max": max(latest.values()) if latest else None,
            "epsilon_per_client": latest,
            "dp_exhausted": sorted((e.client for e in this_round if e.exhausted),
                                   key=client_sort_key),
        }

    def summary(self) -> dict[str, Any]:
        latest = self.latest_epsilon()
        deltas = sorted({e.delta for e in self.entries if e.delta is not None})
        budgets = sorted({e.budget for e in self.entries if e.budget is not None})
        return {
            "epsilon_max": max(latest.values()) if latest else None,
            "epsilon_per_client": latest,
            "delta_max": deltas[-1] if deltas else None,
            "epsilon_budget": budgets[0] if len(budgets) == 1 else (budgets or None),
            "clients_exhausted": sorted(self.exhausted_clients(), key=client_sort_key),
        }

    # -- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "dp": self.dp_name,
            "dp_settings": self.dp,
            "layers": self.layers,
            "visibility": self.visibility,
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
        if self.dp_name == "local":
            write_plot(self, self.run_dir / PLOT_FILE)

    def _load(self) -> None:
        data = json.loads((self.run_dir / LEDGER_FILE).read_text())
        if data.get("format") != LEDGER_FORMAT:
            raise ValueError(f"{self.run_dir / LEDGER_FILE}: unknown format {data.get('format')!r}")
        self.entries = [ClientEntry(**e) for e in data.get("entries", [])]
        self.rounds_closed = [int(r) for r in data.get("rounds_closed", [])]
        self.stopped = data.get("stopped")
        # Rounds that were in flight when the server stopped are re-run: drop their entries.
        last = max(self.rounds_closed, default=0)
        self.entries = [e for e in self.entries if e.server_round <= last]

    @classmethod
    def load(cls, run_dir: str | Path) -> PrivacyLedger:
        """A ledger reloaded from a run directory's privacy.json (no config needed)."""
        run_dir = Path(run_dir)
        data = json.loads((run_dir / LEDGER_FILE).read_text())
        ledger = cls(run_dir, layers=list(data.get("layers", [])),
                     visibility=str(data.get("visibility", "")), resume=True)
        ledger.dp_name = str(data.get("dp", "local"))
        ledger.dp = dict(data.get("dp_settings", {}))
        ledger.num_clients = data.get("num_clients")
        return ledger


def _layers_of(cfg: Any) -> list[str]:
    if cfg is None:
        return []
    aggregation = str(cfg.aggregation.name)
    layers = [AGGREGATION_LAYERS.get(aggregation, f"aggregation={aggregation}")]
    if aggregation != "fedavg":
        layers.insert(0, AGGREGATION_LAYERS["fedavg"])
    if str(cfg.dp.name) == "local":
        dp = cfg.dp
        noise = (f"noise multiplier {dp.noise_multiplier}" if dp.noise_multiplier is not None
                 else f"noise derived per client for target ε={dp.target_epsilon} over "
                      f"{cfg.num_rounds} rounds")
        layers.append(
            f"DP-SGD on every client (example-level): clipping C={dp.max_grad_norm}, {noise}, "
            f"Poisson sampling, {dp.accountant.upper()} accountant accumulated over all "
            f"rounds, per-sample clipping mode '{dp.grad_sample_mode}'"
        )
    else:
        layers.append("No differential privacy: the model and the updates carry no formal "
                      "per-record guarantee (ε is unbounded)")
    return layers


def _dp_settings_of(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(cfg.dp, resolve=True))  # type: ignore[arg-type]


def _client_name(client: Any) -> str:
    if isinstance(client, float) and client.is_integer():
        return str(int(client))
    return str(client)


def _finite_or_none(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def client_sort_key(client: str) -> tuple[int, int, str]:
    """Numeric client names (partition ids) in numeric order, others after them."""
    return (0, int(client), "") if client.isdigit() else (1, 0, client)


def entries_by_round(entries: Iterable[ClientEntry]) -> dict[int, dict[str, ClientEntry]]:
    table: dict[int, dict[str, ClientEntry]] = {}
    for e in entries:
        table.setdefault(e.server_round, {})[e.client] = e
    return dict(sorted(table.items()))
