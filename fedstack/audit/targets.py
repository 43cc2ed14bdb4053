"""What an attacker at the server can invert, per stack, from a recorded server view.

- fedavg (and dp=local on top of it): every train reply carries the client's new weights in
  the clear, with its `num-examples`: one target per client, batch = n_k.
- secagg: one target, the unmasked aggregate sum_k n_k w_k / sum_k n_k, batch = sum_k n_k (the
  server learns the total weight too). Its ground truth is the union of the survivors' data;
  each survivor is scored as the target in turn. A single masked vector is uniformly random
  in the ring and is not attacked.
- he: nothing: replies and aggregate are CKKS ciphertexts under a key the server does not
  hold; `he_decryption_check` tries (and fails) to decrypt each reply with the server's
  context, as the audit's evidence.

The partition ids used to find each target's true data (for scoring only) come from the
replies' `partition-id` metric, which fedstack clients send in the clear under every stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedstack.outputs.server_view import ServerView, ViewMessage
from fedstack.strategies.model_layout import ModelLayout
from fedstack.strategies.reply_validation import NUM_EXAMPLES_KEY

#: Metric naming a reply's partition (fedstack.client_app).
PARTITION_KEY = "partition-id"
KIND_UPDATE, KIND_AGGREGATE = "client update", "aggregate"


@dataclass
class InversionTarget:
    """One vector the server holds that is (close to) a gradient of some clients' data."""

    label: str
    kind: str
    #: The weights after training (θ_k, or the aggregate mean), by parameter name.
    observed: dict[str, np.ndarray]
    #: Examples the attacker believes the vector was computed on (n_k or sum of n_k).
    batch: int
    #: Partitions whose data the vector was computed from (ground truth, scoring only).
    partitions: list[int] = field(default_factory=list)


def _metrics(msg: ViewMessage) -> dict[str, Any]:
    return dict(msg.record("metrics")) if msg.has("metrics") else {}


def _arrays(record: Any) -> dict[str, np.ndarray]:
    return {name: record[name].numpy() for name in record}


def inversion_targets(view: ServerView) -> tuple[list[InversionTarget], str | None]:
    """(targets, None), or ([], why nothing can be inverted from this view)."""
    replies = view.train_replies()
    if not replies:
        return [], "no train reply was recorded in this round"
    if view.aggregation == "he":
        return [], ("the server holds only CKKS ciphertexts of every update and of the "
                    "aggregate, and no secret key: there is no plaintext to invert")
    partitions = {node: int(m[PARTITION_KEY]) for node, msg in replies.items()
                  if PARTITION_KEY in (m := _metrics(msg))}
    if view.aggregation == "secagg":
        mean = _secagg_mean(view)
        if mean is None:
            return [], "the round's secure aggregation produced no unmasked sum (aborted)"
        observed, weight = mean
        return [InversionTarget(
            label=f"aggregate of {len(replies)} clients", kind=KIND_AGGREGATE,
            observed=observed, batch=weight, partitions=sorted(partitions.values()))], None
    targets = []
    for node, msg in sorted(replies.items()):
        if not msg.has("arrays"):
            continue
        metrics = _metrics(msg)
        n = metrics.get(NUM_EXAMPLES_KEY)
        if n is None or node not in partitions:
            continue
        targets.append(InversionTarget(
            label=f"client {partitions[node]} (node {node})", kind=KIND_UPDATE,
            observed=_arrays(msg.record("arrays")), batch=int(n),
            partitions=[partitions[node]]))
    if not targets:
        return [], "no train reply carried plaintext arrays with num-examples and partition-id"
    return targets, None


def _secagg_mean(view: ServerView) -> tuple[dict[str, np.ndarray], int] | None:
    """(the unmasked mean by parameter, its total weight), from the decoded sum when the
    strategy recorded one, else from the new global model and its `num-examples`."""
    computed = view.computed()
    if "weighted_sum" in computed:
        weight = int(np.asarray(computed["weight_sum"]))
        layout = ModelLayout.of(view.global_model())
        return _arrays(layout.unflatten(np.asarray(computed["weighted_sum"], np.float64)
                                        / weight)), weight
    try:
        arrays, metrics = view.aggregate_record("arrays"), view.aggregate_record("metrics")
    except KeyError:
        return None
    return _arrays(arrays), max(1, round(float(metrics.get(NUM_EXAMPLES_KEY, 1))))


def he_decryption_check(view: ServerView, run_dir: Path, cfg: Any) -> dict[str, Any]:
    """Try to decrypt every recorded encrypted reply with the context the server holds.

    Evidence for the audit that the server's view is opaque to it: each attempt must fail
    with "no secret key". (In simulation the secret context also lies in the run directory,
    for the simulated clients; a deployed server never has that file.)
    """
    from fedstack.strategies.he.ckks import decrypt_mean
    from fedstack.strategies.he.keys import (
        PUBLIC_CONTEXT_FILENAME,
        HEKeyError,
        load_public_context,
    )
    from fedstack.strategies.he.provisioning import SIMULATION_KEY_DIR
    from fedstack.strategies.he.records import encrypted_from_record

    public = (Path(str(cfg.aggregation.public_context)) if cfg.aggregation.public_context
              else Path(run_dir) / SIMULATION_KEY_DIR / PUBLIC_CONTEXT_FILENAME)
    ctx = load_public_context(public)
    attempts, refused, reasons = 0, 0, set()
    for msg in view.train_replies().values():
        if not msg.has("arrays"):
            continue
        attempts += 1
        try:
            decrypt_mean(ctx, encrypted_from_record(msg.record("arrays")))
        except HEKeyError as exc:
            refused += 1
            reasons.add(str(exc))
    return {"context": str(public), "replies": attempts, "decryption_refused": refused,
            "reasons": sorted(reasons), "ciphertext_bytes_per_reply": _reply_bytes(view)}


def _reply_bytes(view: ServerView) -> int | None:
    sizes = [e["bytes"] for m in view.train_replies().values() for e in m.records
             if e["name"] == "arrays"]
    return int(np.median(sizes)) if sizes else None
