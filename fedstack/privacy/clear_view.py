"""Exactly what the server receives in the clear, per stack, for the privacy report.

Why a list and not prose: a data owner reads the report to decide whether a run is
acceptable, so it must name every value that leaves a node readable by the server, and
nothing vaguer. The list follows the code paths: fedavg replies carry the trained arrays
and their metrics as they are; the secagg mod replaces them with masked ring words and lets
only its public metrics through; the HE mod encrypts the arrays and forwards the handler's
metrics. Under secagg/he with `dp=local`, ε and δ come from the public schedule
(`fedstack.privacy.schedule`), so they are the same function of the config for every client.
"""

from __future__ import annotations

from typing import Any

#: Under every stack: who took part and how the round ended for each node.
COMMON = (
    "which nodes were sampled, which replied, declined or dropped out, and at which "
    "exchange; decline and error replies with their reason text (fixed codes for node-policy "
    "refusals and, under the public DP schedule, for DP declines)",
    "the global model of every round (except under he, where it stays encrypted)",
)

FEDAVG = (
    "each sampled client's trained model (its update), in the clear",
    "each client's num-examples (n_k), train-loss and partition-id",
    "each client's federated-evaluation reply: eval-loss, eval-accuracy and its validation "
    "size (num-examples)",
)

SECAGG = (
    "each client's partition-id (the ledger's client name)",
    "protocol material: public keys, shares encrypted to peers, commitments and signatures, "
    "which are fresh randomness and say nothing about the data",
    "each client's masked input: ring words that look uniformly random without the "
    "unmasking shares of its peers",
    "the unmasked sum over the surviving clients of their quantised n_k * w_k and of n_k "
    "(never one client's)",
)

HE = (
    "each client's update and n_k as CKKS ciphertexts under a key the server does not hold",
    "each client's num-examples (n_k) in the clear (the HE strategy checks it against "
    "aggregation.max_weight) and the train metrics its node's policy lets out "
    "(clear-metrics: by default partition-id, epsilon, delta, epsilon-budget)",
    "one pass/fail bit per group check when an aggregate fails verification",
)


def clear_items(aggregation: str, dp: str, schedule: Any = None) -> list[str]:
    """Every kind of value the server receives in the clear under this stack."""
    items = list({"secagg": SECAGG, "he": HE}.get(aggregation, FEDAVG))
    if aggregation == "secagg" and dp == "distributed":
        from fedstack.privacy.distributed.report import CLEAR_SUM

        items[items.index(SECAGG[-1])] = CLEAR_SUM
    if dp == "local":
        if schedule is not None:
            items.append(
                f"each client's epsilon and delta, from the run's public schedule "
                f"(delta={schedule.delta:.3g}, q={schedule.sample_rate:.6g}, "
                f"{schedule.steps_per_round} steps per round, sigma from the config): "
                "the same function of the number of rounds it trained for every client, "
                "so they reveal nothing about its data")
        else:
            items.append(
                "each client's epsilon and delta (default delta = 1/(10 n_k)) and its "
                "accountant history (sigma, q = 1/ceil(n_k/B), steps): functions of n_k")
        items.append("the privacy budget a client enforces (epsilon-budget: the run's, or "
                     "its node's tighter max-epsilon; under secagg only in a decline)")
    items.extend(COMMON)
    return items
