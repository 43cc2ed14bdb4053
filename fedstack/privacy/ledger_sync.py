"""What the server's privacy ledger and a client tell each other about the client's spend.

Why: a client's accountant lives on its own node. If the node loses it (an emptied DP state
directory, a new machine, a resumed run's fresh node state) the client would start again at
ε = 0 while the server's ledger still holds what it spent. So:

- every train message carries the ledger's last record of *the receiving* client (its
  accountant state: history, δ, σ, rounds), ConfigRecord `dp-ledger`;
- every train reply carries the client's accountant state back, ConfigRecord
  `dp-accountant`, which the ledger checks (ε and history never go backwards) and records,
  so `privacy.json` holds everything an auditor needs to recompute ε;
- a client continues from whichever of its own state and the ledger's record covers the
  other, or from their union if they diverged (`reconcile`), and says so in its log.

A client's record goes only to the node that is that client. After a restart Flower gives
nodes new ids, so the ledger first asks unknown nodes who they are (one `query.dp_identity`
exchange); a node that does not answer is told only that the ledger holds records it cannot
attribute, and a client with no state of its own then sits the round out instead of
restarting at zero. Nothing here imports Flower or Opacus at module level.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedstack.privacy.accountant_state import PrivacyState, PrivacyStateError, combined

#: ConfigRecord of a train message: the ledger's record of the receiving client.
LEDGER_RECORD = "dp-ledger"
#: ConfigRecord of a train reply: the client's accountant state after the round.
ACCOUNTANT_RECORD = "dp-accountant"
#: Query action (message type `query.dp_identity`) asking a node which client it is.
IDENTITY_ACTION = "dp_identity"
#: Metric key naming the client (its partition) in replies and identity answers.
CLIENT_KEY = "partition-id"
#: `dp-ledger` status: the ledger's record of this client follows (possibly none yet).
STATUS_RECORDED = "recorded"
#: `dp-ledger` status: the ledger holds records it could not yet attribute to this node.
STATUS_UNMATCHED = "unmatched"
#: Relative slack when comparing ε values that should be equal (float round-off only).
EPSILON_RELATIVE_SLACK = 1e-9


@dataclass(frozen=True)
class LedgerView:
    """What the ledger told a node about the client it is."""

    status: str
    client: str | None = None
    server_round: int | None = None
    epsilon: float | None = None
    state: PrivacyState | None = None


def client_label(value: Any) -> str:
    """A client's name in every output: its partition id as text (`3`, not `3.0`)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def server_record(view: LedgerView) -> dict[str, Any]:
    """`view` as a flat ConfigRecord-compatible dict (the state's keys inline)."""
    record: dict[str, Any] = {"status": view.status}
    if view.client is not None:
        record["client"] = view.client
    if view.server_round is not None:
        record["round"] = int(view.server_round)
    if view.epsilon is not None:
        record["epsilon"] = float(view.epsilon)
    if view.state is not None:
        record.update(view.state.to_record())
    return record


def parse_server_record(record: Mapping[str, Any] | None) -> LedgerView | None:
    """The ledger's record from a train message (None when the server sent none)."""
    if record is None:
        return None
    status = str(record.get("status", ""))
    if status not in (STATUS_RECORDED, STATUS_UNMATCHED):
        raise PrivacyStateError(f"{LEDGER_RECORD}: unknown status {status!r}")
    epsilon = record.get("epsilon")
    if epsilon is not None and not (isinstance(epsilon, (int, float))
                                    and math.isfinite(epsilon) and epsilon >= 0):
        raise PrivacyStateError(f"{LEDGER_RECORD}: epsilon={epsilon!r} is not a number >= 0")
    server_round = record.get("round")
    return LedgerView(
        status=status,
        client=None if record.get("client") is None else str(record["client"]),
        server_round=None if server_round is None else int(server_round),
        epsilon=None if epsilon is None else float(epsilon),
        state=PrivacyState.from_record(record) if "format" in record else None,
    )


def reply_state(content: Any) -> PrivacyState | None:
    """The accountant state a train reply carries (None if it carries none)."""
    record = content.config_records.get(ACCOUNTANT_RECORD)
    return None if record is None else PrivacyState.from_record(dict(record))


@dataclass(frozen=True)
class Reconciled:
    """The state a client continues from, and what it must say or do about it."""

    state: PrivacyState | None
    #: What was done, for the node's log (None: nothing to report).
    note: str | None = None
    #: Set when the client must not train this round (the reason it gives the server).
    decline: str | None = None
    #: Whether the decline holds for the rest of the run.
    permanent: bool = True
    #: Whether `state` differs from the node's own (it must be saved).
    changed: bool = False


def _spent(state: PrivacyState | None) -> float:
    return state.epsilons[-1] if state is not None and state.epsilons else 0.0


def reconcile(own: PrivacyState | None, view: LedgerView | None, client: str) -> Reconciled:
    """Continue from `own` or the ledger's record: never below what the ledger holds.

    - no record sent (a new run, or a node the ledger has nothing on): `own`;
    - the ledger cannot attribute its records to this node: `own` if the node has one,
      else decline the round (not for good: the next round may bring the record);
    - a record with an accountant state: the state that covers the other, or their
      union when they diverged (`combined`);
    - a record with ε but no history (a reply path that forwards no state): `own` if it
      has spent at least that much, else decline for good (it cannot be reconstructed).
    """
    if view is None:
        return Reconciled(own)
    note = None
    if view.status == STATUS_RECORDED and view.client not in (None, client):
        note = (f"the server ledger's record is for client {view.client}, this node is "
                f"client {client}: ignored")
        view = LedgerView(STATUS_UNMATCHED)
    if view.status == STATUS_UNMATCHED:
        if own is not None:
            return Reconciled(own, note=note)
        return Reconciled(None, note=note, permanent=False, decline=(
            "no privacy state on this node for this run, and the server's ledger holds "
            "records it could not attribute to this node: sitting this round out rather "
            "than restarting at epsilon 0"))
    recorded = view.state
    where = f"after round {view.server_round}" if view.server_round is not None else "so far"
    if recorded is None:
        if view.epsilon is None or view.epsilon <= 0:
            return Reconciled(own)
        if own is not None and _spent(own) >= view.epsilon * (1 - EPSILON_RELATIVE_SLACK):
            return Reconciled(own)
        return Reconciled(own, decline=(
            f"privacy state on this node (epsilon {_spent(own):.4g}) is behind the server's "
            f"ledger (epsilon {view.epsilon:.4g} {where}), which holds no accountant history "
            "to continue from: declining for good rather than under-counting"))
    if own is None:
        return Reconciled(recorded, changed=True, note=(
            f"no privacy state on this node: continuing from the server ledger's record "
            f"(epsilon {_spent(recorded):.4g} {where}, {recorded.steps} steps)"))
    if own.covers(recorded):
        return Reconciled(own)
    merged = combined(recorded, own)
    if merged is recorded:
        return Reconciled(recorded, changed=True, note=(
            f"this node's privacy state (epsilon {_spent(own):.4g}, {own.steps} steps) is "
            f"behind the server ledger's record (epsilon {_spent(recorded):.4g} {where}, "
            f"{recorded.steps} steps): continuing from the ledger's"))
    return Reconciled(merged, changed=True, note=(
        f"this node's privacy state (epsilon {_spent(own):.4g}) and the server ledger's "
        f"record (epsilon {_spent(recorded):.4g} {where}) diverged (state restored from an "
        f"older copy?): continuing from every round of both, epsilon {_spent(merged):.4g}"))


def identity_queries(node_ids: Iterable[int]) -> list[Any]:
    """One `query.dp_identity` message per node (server side)."""
    from flwr.app import Message, MessageType, RecordDict

    return [Message(RecordDict(), dst_node_id=node,
                    message_type=f"{MessageType.QUERY}.{IDENTITY_ACTION}")
            for node in node_ids]


def identity_reply(partition_id: int, msg: Any) -> Any:
    """A node's answer to `query.dp_identity` (client side)."""
    from flwr.app import Message, MetricRecord, RecordDict

    return Message(RecordDict({"metrics": MetricRecord({CLIENT_KEY: partition_id})}),
                   reply_to=msg)


def identities(replies: Iterable[Any]) -> dict[int, str]:
    """node id -> client, from the answers to `query.dp_identity` (errors are skipped)."""
    found: dict[int, str] = {}
    for reply in replies:
        if reply.has_error():
            continue
        metrics = reply.content.metric_records.get("metrics")
        if metrics is not None and CLIENT_KEY in metrics:
            found[int(reply.metadata.src_node_id)] = client_label(metrics[CLIENT_KEY])
    return found
