"""What the privacy report and ledger say about ``dp=distributed`` (texts kept with the code
they describe, so they stay true to it). The shared report (``fedstack.privacy.report``) and
ledger call these for a record whose mechanism is ``skellam``."""

from __future__ import annotations

from typing import Any

#: The ledger's DP_GUARANTEES entry: the unit protected and whom the guarantee must trust.
GUARANTEE = {
    "unit": "client",
    "trusted": "nobody beyond secure aggregation's own assumption (fewer than t parties of a "
               "neighbourhood collude with the server): each client adds its share of the "
               "noise inside the masked input, so only the noisy sum is ever unmasked; the "
               "planned noise holds while at least n_min = ceil((1 - dp.dropout_slack) |U1|) "
               "survivors did not collude with the server",
}

#: What the server receives in the clear instead of secagg's "unmasked sum" item.
CLEAR_SUM = (
    "the unmasked sum over the surviving clients of their clipped, rotated, rounded model "
    "deltas plus the sum of their Skellam noise shares (the released noisy model), and how "
    "many clients it holds (never one client's update, n_k or noise share)"
)

NOT_COVERED = (
    "- ε bounds what the released global models reveal about any one client's whole data "
    "(add/remove one client's contribution). Who took part in a round is not hidden: the "
    "server knows the survivor set.\n"
    "- A client that colludes with the server knows its own noise share; the planned noise "
    "holds while at least n_min survivors did not collude (the dropout slack).\n"
    "- Clients' train losses and example counts never leave them under secure aggregation; "
    "a client sending words outside the contract can bias the sum within the bounds "
    "`check_bounds` enforces.\n"
    "- No amplification by client sampling is claimed (every round counts for every "
    "client). The Skellam noise is drawn from AES-256-CTR keyed from the OS (53-bit "
    "uniforms), the rotation's signs are public."
)


def layer_line(cfg: Any) -> str:
    """The report's "Layers on" line for dp=distributed."""
    dp = cfg.dp
    noise = (f"noise multiplier {dp.noise_multiplier}" if dp.noise_multiplier is not None
             else f"noise derived for target ε={dp.target_epsilon} over {cfg.num_rounds} rounds")
    return (
        "Distributed DP (client-level, noise added by the clients inside secure aggregation): "
        f"each client clips its model delta to C={dp.clip_norm}, rotates (randomized "
        "Hadamard, public signs), scales and conditionally rounds it into the ring and adds "
        f"its share of Skellam noise ({noise}; dropout slack {dp.dropout_slack}); only the "
        "noisy sum is unmasked; Skellam RDP accountant over all rounds, no amplification "
        "by sampling"
    )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def report_lines(ledger: Any) -> list[str]:
    """The report's client-level section for a ``skellam`` record."""
    record = ledger.client_level or {}
    d = record.get("details", {})
    lines = [
        "## Differential privacy (client level, distributed)", "",
        f"- protects: each **{GUARANTEE['unit']}** (all of its data), in every released "
        "global model",
        f"- must be trusted: {GUARANTEE['trusted']}",
        f"- mechanism: Skellam noise added by the clients in the secure-aggregation ring; "
        f"noise multiplier z = {_fmt(record.get('noise_multiplier'))} relative to the rounded "
        f"sensitivity Δ₂ = {_fmt(d.get('l2_sensitivity'), 8)} (ring units; Δ₁ = "
        f"{_fmt(d.get('l1_sensitivity'), 8)}), total variance μ = {_fmt(d.get('variance'), 8)} "
        f"on the sum; clip C = {_fmt(d.get('l2_clip'))}, scale γ = {_fmt(d.get('scale'), 8)}, "
        f"d' = {_fmt(d.get('padded_dim'))}; noise std on the sum {_fmt(d.get('noise_std'))} "
        f"= {_fmt(d.get('effective_noise_multiplier'))} x C; dropout slack "
        f"{_fmt(d.get('dropout_slack'))}",
        "- client sampling: every round counts for every client (q = 1: no amplification "
        "claimed)",
        f"- accountant: Skellam RDP (Agarwal et al. 2021, Thm 3.5), δ = "
        f"{_fmt(record.get('delta'), 3)}, ε = {_fmt(record.get('epsilon'))} after "
        f"{len(record.get('rounds', []))} released rounds",
        f"- budget: {_fmt(ledger.run_budget())}",
    ]
    if getattr(ledger, "stopped", None):
        lines.append(f"- **run stopped early**: {ledger.stopped}")
    survivors = d.get("survivors") or []
    expected = d.get("expected") or []
    lines += ["", "## ε per released round (cumulative)", "",
              "| round | ε | survivors / expected |", "|---|---|---|"]
    for i, (rnd, eps) in enumerate(zip(record.get("rounds", []), record.get("epsilons", []),
                                       strict=True)):
        got = survivors[i] if i < len(survivors) else None
        of = expected[i] if i < len(expected) else None
        lines.append(f"| {rnd} | {_fmt(eps)} | {_fmt(got)} / {_fmt(of)} |")
    lines += ["", "`privacy.json` → `client_level` → `details` holds μ, Δ₂, Δ₁ (ring units): "
              "`fedstack.privacy.distributed.accountant.epsilon([SkellamRelease(μ, Δ₂, Δ₁, "
              "rounds)], δ)` recomputes ε (docs/dp.md, \"distributed\").", "",
              "## Not covered by the guarantee", "", NOT_COVERED, ""]
    return lines
