"""Server-side privacy ledger: what every client reported it spent, round by round.

Why on the server: clients account for themselves (only they know their data size and
noise), but the run owner needs one place that says which layers were on, what the server
could see, and how much ε each client has spent against its budget, and it must survive a
server restart. The ledger *records* clients' reports; it never computes ε itself, so the
report shows exactly what the clients enforced, and `privacy.json` keeps each client's
accountant history so that anyone can recompute that ε with Opacus (docs/dp.md). Under the
public schedule (secagg/he: `fedstack.privacy.schedule`) ε is a public function of the config
and the rounds a client trained, so there the ledger does recompute it, and refuses a reply
whose ε or δ is off that schedule (Opacus is then imported lazily, on the first reply).

It is also the clients' memory of last resort, and it is monotonic: each train message
carries the receiving client's last recorded accountant state (`fedstack.privacy.
ledger_sync`), so a client that lost its own continues from it instead of from ε = 0; and a
reply whose cumulative ε went down, or whose history does not extend the recorded one, is
refused: not recorded as spend and never aggregated (the strategy's `train_hooks`).

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

from fedstack.privacy.accountant_state import STATE_FORMAT, PrivacyState, PrivacyStateError
from fedstack.privacy.budget import BUDGET_EXHAUSTED_PREFIX
from fedstack.privacy.clear_view import clear_items
from fedstack.privacy.distributed.report import GUARANTEE as DISTRIBUTED_GUARANTEE
from fedstack.privacy.ledger_sync import (
    CLIENT_KEY,
    EPSILON_RELATIVE_SLACK,
    IDENTITY_ACTION,
    LEDGER_RECORD,
    STATUS_RECORDED,
    STATUS_UNMATCHED,
    LedgerView,
    client_label,
    identities,
    identity_queries,
    reply_state,
    server_record,
)
from fedstack.privacy.schedule import ROUNDS_SLACK, PublicSchedule, public_schedule

LEDGER_FILE = "privacy.json"
REPORT_FILE = "privacy_report.md"
PLOT_FILE = "epsilon.png"
LEDGER_FORMAT = 1
#: Seconds to wait for nodes to say which client they are (when no strategy is attached).
DEFAULT_IDENTITY_TIMEOUT = 60.0
#: Relative tolerance between a reply's ε and the last ε in its accountant record: both
#: come from the same computation on the client, so any difference is a malformed reply.
ACCOUNTANT_EPSILON_TOLERANCE = 1e-9

#: One line per aggregation: what that layer adds (the strategy's `visibility` says what
#: the server then sees).
AGGREGATION_LAYERS = {
    "fedavg": "Federated averaging (weighted FedAvg): raw data never leaves a client",
    "secagg": ("Secure aggregation (pairwise and self masks, Shamir-shared seeds): the server "
               "learns only the sum of the surviving clients' updates"),
    "he": ("CKKS homomorphic averaging: the server adds ciphertexts and never holds the "
           "secret key"),
}
#: Per DP layer: the unit its ε protects and whom the guarantee requires to be trusted.
DP_GUARANTEES: dict[str, dict[str, str]] = {
    "local": {"unit": "record", "trusted": "nobody: each client adds the noise to its own "
                                           "training (DP-SGD)"},
    "central": {"unit": "client", "trusted": "the server: it sees every client's update in "
                                             "the clear and must clip it and add the noise "
                                             "honestly"},
    "distributed": DISTRIBUTED_GUARANTEE,
}
#: Key of the client-level accountant's record in privacy.json (dp=central/distributed).
CLIENT_LEVEL_KEY = "client_level"


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
    node_id: int | None = None
    #: Why the strategy did not aggregate this reply; its ε is spent all the same.
    rejected: str | None = None
    #: Why the ledger refused this reply's accounting (ε went down...): not counted as
    #: the client's spend, and the reply was never aggregated.
    refused: str | None = None

    @property
    def valid(self) -> bool:
        return self.refused is None

    @property
    def exhausted(self) -> bool:
        return (self.valid and self.declined
                and (self.reason or "").startswith(BUDGET_EXHAUSTED_PREFIX))


@dataclass
class ClientAccount:
    """The latest accounting the ledger accepted from one client."""

    client: str
    server_round: int
    node_id: int | None
    epsilon: float | None
    budget: float | None
    #: The client's accountant state (None where the reply path forwards none).
    state: PrivacyState | None

    def to_json(self, accountant: str | None) -> dict[str, Any]:
        """The `clients` entry of privacy.json: enough for Opacus to recompute ε."""
        state = self.state
        return {
            "node_id": self.node_id,
            "accountant": state.mechanism if state is not None else accountant,
            "history": None if state is None else [list(e) for e in state.history],
            "delta": None if state is None else state.delta,
            "epsilon": self.epsilon,
            "budget": self.budget,
            "noise_multiplier": None if state is None else state.noise_multiplier,
            "steps": None if state is None else state.steps,
            "round": self.server_round,
            "rounds": None if state is None else list(state.rounds),
            "round_steps": (None if state is None or state.round_steps is None
                            else list(state.round_steps)),
            "epsilons": None if state is None else list(state.epsilons),
        }

    @classmethod
    def from_json(cls, client: str, data: dict[str, Any]) -> ClientAccount:
        """Rebuild from privacy.json; a damaged history raises (PrivacyStateError)."""
        state = None
        if data.get("history") is not None:
            history = data["history"]
            record = {
                "format": STATE_FORMAT,
                "mechanism": data["accountant"],
                "noise_multipliers": [h[0] for h in history],
                "sample_rates": [h[1] for h in history],
                "steps": [h[2] for h in history],
                "rounds": data.get("rounds") or [],
                "epsilons": data.get("epsilons") or [],
                "delta": data.get("delta"),
                "noise_multiplier": data.get("noise_multiplier"),
            }
            if data.get("round_steps") is not None:
                record["round_steps"] = data["round_steps"]
            state = PrivacyState.from_record(record)
        return cls(client=client, server_round=int(data["round"]), node_id=data.get("node_id"),
                   epsilon=data.get("epsilon"), budget=data.get("budget"), state=state)


@dataclass
class _Reply:
    """A train reply's accounting, between the strategy's check and the round's end."""

    client: str
    state: PrivacyState | None
    refused: str | None
    metrics: dict[str, float]


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
        #: The run's public DP schedule (secagg/he): every reply's ε and δ must be on it.
        self.schedule: PublicSchedule | None = public_schedule(cfg) if cfg is not None else None
        #: What the server receives in the clear under this stack (privacy report).
        self.in_the_clear: list[str] = (
            clear_items(str(cfg.aggregation.name), self.dp_name, self.schedule)
            if cfg is not None else [])
        self.entries: list[ClientEntry] = []
        #: client -> its latest accepted accounting (what train messages carry back).
        self.accounts: dict[str, ClientAccount] = {}
        self.rounds_closed: list[int] = []
        self.stopped: str | None = None
        self._strategy = strategy
        #: The client-level accountant's record (privacy.json `client_level`), kept from a
        #: strategy with `client_level_record()` (dp=central/distributed).
        self.client_level: dict[str, Any] | None = None
        #: node id -> client, as learnt in *this* process (node ids change across restarts).
        self._node_clients: dict[int, str] = {}
        #: node id -> this round's train reply accounting, checked before aggregation.
        self._replies: dict[int, _Reply] = {}
        if resume and (self.run_dir / LEDGER_FILE).exists():
            self._load()
        if self.dp_name == "local" and hasattr(strategy, "train_hooks"):
            strategy.train_hooks.append(self)

    # -- RoundListener ------------------------------------------------------------------
    def on_round(self, record: dict[str, Any], round_log: Any) -> None:
        """Take a round's replies; add ε columns to its history row; write the files."""
        server_round = int(round_log.server_round)
        for node, client in round_log.client_partitions.items():
            self._node_clients[int(node)] = client_label(client)
        replies, self._replies = self._replies, {}
        nodes = list(round_log.client_metrics) + [n for n in replies
                                                  if n not in round_log.client_metrics]
        for node in nodes:
            reply = replies.get(node)
            metrics = round_log.client_metrics.get(node, reply.metrics if reply else {})
            if "epsilon" not in metrics and node not in round_log.declined and (
                    reply is None or reply.state is None):
                continue
            client = reply.client if reply is not None else self._client_of(node, metrics)
            if reply is not None and reply.refused is not None:
                self._record_refused(server_round, client, metrics, node, reply.refused)
                continue
            self.record_reply(server_round, client, metrics,
                              reason=round_log.declined.get(node), node_id=int(node),
                              state=reply.state if reply is not None else None,
                              rejected=round_log.rejected.get(node))
        if server_round >= 1 and server_round not in self.rounds_closed:
            self.rounds_closed.append(server_round)
        client_level = getattr(self._strategy, "client_level_record", None)
        if client_level is not None:
            self.client_level = client_level().to_json()
        record.update(self.round_columns(server_round))
        record["client_of_node"] = {
            str(node): self._node_clients[node]
            for node in sorted({*round_log.sampled, *round_log.client_metrics,
                                *round_log.rejected, *round_log.declined})
            if node in self._node_clients
        }
        self.write()

    def summary_fields(self) -> dict[str, Any]:
        """Fields for summary.json."""
        return self.summary()

    def finish(self) -> None:
        stop = getattr(self._strategy, "stop_reason", None)
        if stop:
            self.stopped = str(stop)
        self.write()

    # -- the strategy's train hooks -----------------------------------------------------
    def train_records(self, grid: Any, node_ids: list[int]) -> dict[int, dict[str, dict]]:
        """Each node's `dp-ledger` record: the ledger's last accounting of that client.

        Nodes not yet seen in this process (a restart gives them new ids) are first asked
        who they are, but only while some recorded client is still unattributed.
        """
        if not self.accounts:
            return {}
        unknown = [n for n in node_ids if n not in self._node_clients]
        if unknown and self._unattributed():
            self._identify(grid, unknown)
        out: dict[int, dict[str, dict]] = {}
        for node in node_ids:
            client = self._node_clients.get(node)
            if client is None:
                if self._unattributed():
                    out[node] = {LEDGER_RECORD: server_record(LedgerView(STATUS_UNMATCHED))}
                continue
            account = self.accounts.get(client)
            if account is not None:
                out[node] = {LEDGER_RECORD: server_record(LedgerView(
                    STATUS_RECORDED, client=client, server_round=account.server_round,
                    epsilon=account.epsilon, state=account.state))}
        return out

    def check_train_reply(self, node_id: int, metrics: dict[str, float],
                          content: Any) -> str | None:
        """Refusal reason for a train reply whose accounting goes backwards, else None."""
        client = self._client_of(node_id, metrics)
        self._node_clients[int(node_id)] = client
        try:
            state = reply_state(content)
        except PrivacyStateError as exc:
            state, refused = None, f"unreadable accountant record: {exc}"
        else:
            refused = self.vet(client, _finite_or_none(metrics.get("epsilon")), state,
                               delta=_finite_or_none(metrics.get("delta")))
        self._replies[int(node_id)] = _Reply(client, state, refused, dict(metrics))
        return refused

    # -- recording ------------------------------------------------------------------------
    def vet(self, client: str, epsilon: float | None,
            state: PrivacyState | None, *, delta: float | None = None) -> str | None:
        """Why a reply's accounting cannot be accepted (None: it can).

        The ledger is monotonic: a client's cumulative ε never goes down and its accountant
        history only ever extends the one recorded before. Under the public schedule ε, δ
        and the history must also be the schedule's, which the ledger recomputes.
        """
        if self.schedule is not None:
            off = self.schedule.check_reply(epsilon, delta, max_rounds=self.round_cap(),
                                            state=state)
            if off is not None:
                return off
        accountant = self.dp.get("accountant")
        if state is not None and accountant and state.mechanism != accountant:
            return (f"accountant record uses {state.mechanism!r}, the run dp.accountant="
                    f"{accountant!r}")
        if (state is not None and epsilon is not None and state.epsilons
                and not _close(epsilon, state.epsilons[-1])):
            return (f"reported epsilon {epsilon:.6g} is not the epsilon of its accountant "
                    f"record ({state.epsilons[-1]:.6g})")
        account = self.accounts.get(client)
        if account is None:
            return None
        if (epsilon is not None and account.epsilon is not None
                and epsilon < account.epsilon * (1 - EPSILON_RELATIVE_SLACK)):
            return (f"cumulative epsilon went down: client {client} reported {epsilon:.6g}, "
                    f"the ledger recorded {account.epsilon:.6g} after round "
                    f"{account.server_round} (its DP state was lost or reset?)")
        if state is not None and account.state is not None and not state.covers(account.state):
            return (f"accountant history of client {client} ({state.steps} steps) does not "
                    f"extend the one the ledger recorded after round {account.server_round} "
                    f"({account.state.steps} steps)")
        return None

    def record_reply(
        self,
        server_round: int,
        client: str | int,
        metrics: Mapping[str, Any],
        reason: str | None = None,
        *,
        node_id: int | None = None,
        state: PrivacyState | None = None,
        rejected: str | None = None,
    ) -> ClientEntry:
        """Record one train reply's metrics (`epsilon`, `delta`, `declined`, ...).

        A reply that fails `vet` is recorded as refused: it does not count as spend.
        """
        entry = ClientEntry(
            server_round=int(server_round),
            client=client_label(client),
            epsilon=_finite_or_none(metrics.get("epsilon")),
            delta=_finite_or_none(metrics.get("delta")),
            declined=bool(int(metrics.get("declined", 0) or 0)) or reason is not None,
            reason=reason,
            budget=_finite_or_none(metrics.get("epsilon-budget")),
            node_id=node_id,
            rejected=rejected,
        )
        if entry.delta is None and state is not None:
            entry.delta = state.delta
        entry.refused = self.vet(entry.client, entry.epsilon, state, delta=entry.delta)
        self._replace_entry(entry)
        if entry.refused is not None:
            self._warn_refused(entry)
        elif entry.epsilon is not None:
            previous = self.accounts.get(entry.client)
            self.accounts[entry.client] = ClientAccount(
                client=entry.client,
                server_round=entry.server_round,
                node_id=node_id if node_id is not None else (previous and previous.node_id),
                epsilon=entry.epsilon,
                budget=entry.budget if entry.budget is not None else self.run_budget(),
                state=state,
            )
        return entry

    def record_message(self, server_round: int, client: str | int, content: Any) -> ClientEntry:
        """Record a Flower reply's RecordDict (metrics + optional "decline" ConfigRecord)."""
        metrics: dict[str, Any] = {}
        if "metrics" in content.metric_records:
            metrics = dict(content.metric_records["metrics"])
        reason = None
        if "decline" in content.config_records:
            reason = str(content.config_records["decline"].get("reason", ""))
        return self.record_reply(server_round, client, metrics, reason,
                                 state=reply_state(content))

    def mark_stopped(self, reason: str) -> None:
        self.stopped = reason
        self.write()

    def _record_refused(self, server_round: int, client: str, metrics: Mapping[str, Any],
                        node_id: int, refused: str) -> None:
        entry = ClientEntry(server_round=int(server_round), client=client,
                            epsilon=_finite_or_none(metrics.get("epsilon")),
                            delta=_finite_or_none(metrics.get("delta")),
                            declined=bool(int(metrics.get("declined", 0) or 0)),
                            node_id=node_id, refused=refused)
        self._replace_entry(entry)

    def _replace_entry(self, entry: ClientEntry) -> None:
        self.entries = [
            e for e in self.entries
            if not (e.server_round == entry.server_round and e.client == entry.client)
        ]
        self.entries.append(entry)

    @staticmethod
    def _warn_refused(entry: ClientEntry) -> None:
        from fedstack.log import logger

        logger.warning("privacy ledger: round %s: refused the accounting of client %s: %s",
                       entry.server_round, entry.client, entry.refused)

    def _client_of(self, node_id: int, metrics: Mapping[str, Any]) -> str:
        if CLIENT_KEY in metrics:
            return client_label(metrics[CLIENT_KEY])
        return self._node_clients.get(int(node_id), client_label(node_id))

    def round_cap(self) -> int:
        """Most rounds a client can have trained so far (resumed runs re-run a round)."""
        assert self.schedule is not None
        done = max(self.rounds_closed, default=0) + 1
        return ROUNDS_SLACK * max(self.schedule.planned_rounds, done)

    def _unattributed(self) -> bool:
        """Whether some recorded client has no node known in this process."""
        return bool(set(self.accounts) - set(self._node_clients.values()))

    def _identify(self, grid: Any, node_ids: list[int]) -> None:
        """Ask nodes which client they are (one exchange, counted in the round's log)."""
        messages = identity_queries(node_ids)
        exchange = getattr(self._strategy, "exchange", None)
        if exchange is not None:
            replies = exchange(grid, messages, IDENTITY_ACTION)
        else:
            replies = grid.send_and_receive(messages, timeout=DEFAULT_IDENTITY_TIMEOUT)
        found = identities(replies)
        self._node_clients.update(found)
        missing = sorted(set(node_ids) - set(found))
        if missing:
            from fedstack.log import logger

            logger.warning("privacy ledger: nodes %s did not say which client they are; they "
                           "are told only that the ledger holds unattributed records",
                           missing)

    # -- queries --------------------------------------------------------------------------
    def run_budget(self) -> float | None:
        """The run's per-client ε budget: dp.max_epsilon, else dp.target_epsilon."""
        if self.dp_name not in DP_GUARANTEES:
            return None
        for key in ("max_epsilon", "target_epsilon"):
            value = _finite_or_none(self.dp.get(key))
            if value is not None:
                return value
        return None

    def latest_epsilon(self, up_to_round: int | None = None) -> dict[str, float]:
        """Each client's most recent accepted ε (cumulative), up to a round."""
        latest: dict[str, tuple[int, float]] = {}
        for e in self.entries:
            if e.epsilon is None or not e.valid or (
                    up_to_round is not None and e.server_round > up_to_round):
                continue
            if e.client not in latest or e.server_round >= latest[e.client][0]:
                latest[e.client] = (e.server_round, e.epsilon)
        return {c: v for c, (_, v) in sorted(latest.items(), key=lambda kv: client_sort_key(kv[0]))}

    def exhausted_clients(self) -> set[str]:
        """Clients whose latest accepted reply declined because the budget is spent."""
        last: dict[str, ClientEntry] = {}
        for e in sorted(self.entries, key=lambda e: e.server_round):
            if e.valid:
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
        client_level = self.client_level_epsilon(server_round)
        if client_level is not None:
            return {"epsilon_max": client_level, "epsilon_client_level": client_level,
                    "epsilon_per_client": latest, "dp_exhausted": [], "dp_refused": {}}
        return {
            "epsilon_max": max(latest.values()) if latest else None,
            "epsilon_per_client": latest,
            "dp_exhausted": sorted((e.client for e in this_round if e.exhausted),
                                   key=client_sort_key),
            "dp_refused": {e.client: e.refused for e in this_round if e.refused is not None},
        }

    def client_level_epsilon(self, up_to_round: int | None = None) -> float | None:
        """Client-level ε after the last recorded round (up to a round); None without one."""
        record = self.client_level
        if record is None:
            return None
        spent = [e for r, e in zip(record["rounds"], record["epsilons"], strict=True)
                 if up_to_round is None or r <= up_to_round]
        return spent[-1] if spent else 0.0

    def summary(self) -> dict[str, Any]:
        client_level = self.client_level_epsilon()
        if client_level is not None:
            record = self.client_level or {}
            return {"epsilon_max": client_level, "epsilon_client_level": client_level,
                    "epsilon_per_client": {}, "delta_max": record.get("delta"),
                    "epsilon_budget": self.run_budget(), "clients_exhausted": [],
                    "client_node_ids": {}, "dp_unit": DP_GUARANTEES.get(
                        self.dp_name, {}).get("unit")}
        latest = self.latest_epsilon()
        valid = [e for e in self.entries if e.valid]
        deltas = sorted({e.delta for e in valid if e.delta is not None})
        budgets = sorted({e.budget for e in valid if e.budget is not None})
        if not budgets and self.run_budget() is not None:
            budgets = [self.run_budget()]
        return {
            "epsilon_max": max(latest.values()) if latest else None,
            "epsilon_per_client": latest,
            "delta_max": deltas[-1] if deltas else None,
            "epsilon_budget": budgets[0] if len(budgets) == 1 else (budgets or None),
            "clients_exhausted": sorted(self.exhausted_clients(), key=client_sort_key),
            "client_node_ids": {c: a.node_id for c, a in self.sorted_accounts()},
        }

    def sorted_accounts(self) -> list[tuple[str, ClientAccount]]:
        """(client, its latest accepted accounting), in client order."""
        return sorted(self.accounts.items(), key=lambda kv: client_sort_key(kv[0]))

    # -- persistence ----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        accountant = self.dp.get("accountant")
        return {
            "format": LEDGER_FORMAT,
            "dp": self.dp_name,
            "dp_settings": self.dp,
            "epsilon_budget": self.run_budget(),
            "public_schedule": None if self.schedule is None else self.schedule.to_json(),
            "in_the_clear": self.in_the_clear,
            "layers": self.layers,
            "guarantee": DP_GUARANTEES.get(self.dp_name),
            "visibility": self.visibility,
            "num_clients": self.num_clients,
            "rounds_closed": self.rounds_closed,
            "stopped": self.stopped,
            "clients": {c: a.to_json(accountant) for c, a in self.sorted_accounts()},
            CLIENT_LEVEL_KEY: self.client_level,
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
        if data.get("public_schedule") is not None:
            # The run's original schedule: its clients fixed σ and δ at their first round.
            self.schedule = PublicSchedule.from_json(data["public_schedule"])
        if data.get("in_the_clear"):
            self.in_the_clear = list(data["in_the_clear"])
        self.entries = [ClientEntry(**e) for e in data.get("entries", [])]
        self.rounds_closed = [int(r) for r in data.get("rounds_closed", [])]
        self.stopped = data.get("stopped")
        self.client_level = data.get(CLIENT_LEVEL_KEY)
        # Rounds that were in flight when the server stopped are re-run: drop their entries.
        last = max(self.rounds_closed, default=0)
        self.entries = [e for e in self.entries if e.server_round <= last]
        self.accounts = {}
        for client, account in data.get("clients", {}).items():
            if int(account["round"]) <= last:
                self.accounts[client] = ClientAccount.from_json(client, account)
        for e in sorted(self.entries, key=lambda e: e.server_round):
            # A client whose account was of a dropped round keeps its last surviving ε.
            kept = self.accounts.get(e.client)
            if e.valid and e.epsilon is not None and (kept is None
                                                      or kept.server_round < e.server_round):
                self.accounts[e.client] = ClientAccount(
                    e.client, e.server_round, e.node_id, e.epsilon,
                    e.budget if e.budget is not None else self.run_budget(), None)

    @classmethod
    def load(cls, run_dir: str | Path) -> PrivacyLedger:
        """A ledger reloaded from a run directory's privacy.json (no config needed)."""
        run_dir = Path(run_dir)
        data = json.loads((run_dir / LEDGER_FILE).read_text())
        ledger = cls(run_dir, layers=list(data.get("layers", [])),
                     visibility=str(data.get("visibility", "")))
        ledger.dp_name = str(data.get("dp", "local"))
        ledger.dp = dict(data.get("dp_settings", {}))
        ledger.num_clients = data.get("num_clients")
        ledger._load()
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
        public = public_schedule(cfg) is not None
        noise = (f"noise multiplier {dp.noise_multiplier}" if dp.noise_multiplier is not None
                 else f"noise derived {'once' if public else 'per client'} for target "
                      f"ε={dp.target_epsilon} over {cfg.num_rounds} rounds")
        if public:
            noise += (f", one public schedule for every client (sample rate "
                      f"{dp.sample_rate}, δ and σ from the config, none from n_k)")
        layers.append(
            f"DP-SGD on every client (example-level): clipping C={dp.max_grad_norm}, {noise}, "
            f"Poisson sampling, {dp.accountant.upper()} accountant accumulated over all "
            f"rounds, per-sample clipping mode '{dp.grad_sample_mode}'"
        )
    elif str(cfg.dp.name) == "central":
        dp = cfg.dp
        noise = (f"noise multiplier {dp.noise_multiplier}" if dp.noise_multiplier is not None
                 else f"noise derived for target ε={dp.target_epsilon} over {cfg.num_rounds} "
                      "rounds")
        clipping = (f"adaptive clipping from C={dp.clip_norm} towards the "
                    f"{dp.target_quantile} quantile of update norms" if dp.adaptive_clipping
                    else f"clipping C={dp.clip_norm}")
        sampling = ("every client every round (no amplification by sampling)"
                    if float(cfg.fraction_train) >= 1.0 else
                    f"Poisson client sampling q={cfg.fraction_train}")
        layers.append(
            f"Central DP-FedAvg (client-level, by the trusted server): each update clipped "
            f"by the server ({clipping}), Gaussian noise on the sum ({noise}), divided by the "
            f"expected cohort; {sampling}; {dp.accountant.upper()} accountant over all rounds")
    elif str(cfg.dp.name) == "distributed":
        from fedstack.privacy.distributed.report import layer_line

        layers.append(layer_line(cfg))
    else:
        layers.append("No differential privacy: the model and the updates carry no formal "
                      "per-record guarantee (ε is unbounded)")
    return layers


def _dp_settings_of(cfg: Any) -> dict[str, Any]:
    if cfg is None:
        return {}
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(cfg.dp, resolve=True))  # type: ignore[arg-type]


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=ACCOUNTANT_EPSILON_TOLERANCE, abs_tol=0.0)


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
