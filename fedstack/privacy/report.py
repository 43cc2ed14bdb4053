"""Human-readable views of the privacy ledger: `privacy_report.md` and the ε plot.

Why a separate module: the ledger is the record; this is presentation, and it pulls in
matplotlib, which nothing else on the server path needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedstack.privacy.ledger import PrivacyLedger

#: What the DP layer itself does not cover, stated in every report.
NOT_COVERED = (
    "- `num-examples` and `train-loss` in each train reply, and every evaluation reply "
    "(loss/accuracy on a client's local validation split), are computed without noise: "
    "they are outside the (ε, δ) guarantee.\n"
    "- ε is per client and per record (example-level DP), over all rounds the client "
    "trained in; it says nothing about a client's participation itself.\n"
    "- Noise and Poisson sampling come from AES-256-CTR when `secure_rng` is true (see the "
    "settings above), otherwise from torch's Mersenne Twister seeded from the OS CSPRNG, "
    "which is not itself a CSPRNG. In neither case is the floating-point hardening of "
    "Opacus's `secure_mode` (torchcsprng, not available here) applied to the Gaussian "
    "sampler."
)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def render_report(ledger: PrivacyLedger) -> str:
    from fedstack.privacy.ledger import client_sort_key, entries_by_round

    summary = ledger.summary()
    clients = sorted({e.client for e in ledger.entries}, key=client_sort_key)
    lines = ["# Privacy report", ""]
    lines += ["## Layers on", ""]
    lines += [f"- {layer}" for layer in ledger.layers] or ["- (none recorded)"]
    lines += ["", "## What the server could see", "", ledger.visibility or "(not recorded)", ""]
    if ledger.dp_name != "local":
        lines += ["## Differential privacy", "",
                  f"dp={ledger.dp_name}: clients train without DP-SGD, so no ε is accounted "
                  "and nothing bounds what the released model or updates reveal about one "
                  "record.", ""]
        if ledger.stopped:
            lines += [f"**Run stopped early**: {ledger.stopped}", ""]
        return "\n".join(lines)
    if ledger.dp:
        lines += ["## Differential privacy settings", ""]
        lines += [f"- `{k}`: {v}" for k, v in ledger.dp.items()]
        lines.append("")
    lines += ["## Budget and spend", ""]
    lines.append(f"- largest ε spent by any client: {_fmt(summary['epsilon_max'])}")
    lines.append(f"- δ (largest of any client): {_fmt(summary['delta_max'], 3)}")
    lines.append(f"- per-client ε budget: {_budget_text(ledger, summary['epsilon_budget'])}")
    exhausted = summary["clients_exhausted"]
    lines.append(f"- clients out of budget: {', '.join(exhausted) if exhausted else 'none'}")
    if ledger.stopped:
        lines.append(f"- **run stopped early**: {ledger.stopped}")
    lines += ["", "## Accountant per client", ""]
    lines += _accounts_table(ledger)
    lines += ["", "## ε per client per round (cumulative)", ""]
    if clients:
        lines.append("| round | " + " | ".join(f"client {c}" for c in clients) + " |")
        lines.append("|---|" + "---|" * len(clients))
        for rnd, row in entries_by_round(ledger.entries).items():
            cells = []
            for c in clients:
                e = row.get(c)
                if e is None:
                    cells.append("")
                elif e.refused is not None:
                    cells.append(f"refused ({_fmt(e.epsilon)})")
                elif e.declined:
                    cells.append(f"declined ({_fmt(e.epsilon)})")
                elif e.rejected is not None:
                    cells.append(f"{_fmt(e.epsilon)} (not aggregated)")
                else:
                    cells.append(_fmt(e.epsilon))
            lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
        lines += ["", "Empty cell: not sampled that round. Declined: the value is ε already "
                  "spent; the client did not train. Not aggregated: the server rejected the "
                  "update, but the client spent the ε. Refused: the ledger did not accept the "
                  "reported ε (see below); it is not counted and the update was not used."]
    else:
        lines.append("(no client reported yet)")
    reasons = sorted({(e.client, e.reason) for e in ledger.entries if e.declined and e.reason},
                     key=lambda cr: client_sort_key(cr[0]))
    if reasons:
        lines += ["", "## Declines", ""]
        lines += [f"- client {c}: {r}" for c, r in reasons]
    refused = [e for e in ledger.entries if e.refused is not None]
    if refused:
        lines += ["", "## Refused replies", ""]
        lines += [f"- round {e.server_round}, client {e.client}: {e.refused}"
                  for e in sorted(refused, key=lambda e: (e.server_round,
                                                          client_sort_key(e.client)))]
    lines += ["", "## Not covered by the guarantee", "", NOT_COVERED, ""]
    return "\n".join(lines)


def _budget_text(ledger: PrivacyLedger, budget: object) -> str:
    """The effective budget, and where it comes from (a null max_epsilon means the target)."""
    run = ledger.run_budget()
    max_epsilon, target = ledger.dp.get("max_epsilon"), ledger.dp.get("target_epsilon")
    if run is None:
        source = "dp.max_epsilon and dp.target_epsilon are null"
    elif max_epsilon is None:
        source = f"dp.max_epsilon is null: the target dp.target_epsilon={_fmt(target)}"
    else:
        source = f"dp.max_epsilon={_fmt(max_epsilon)}"
    if budget is None or budget == run:
        return f"{'none' if run is None else _fmt(run)} ({source})"
    values = budget if isinstance(budget, list) else [budget]
    shown = ", ".join(_fmt(b) for b in values)  # type: ignore[arg-type]
    return (f"{shown} (as the clients enforce it, tightened by a node's max-epsilon; the "
            f"run's: {'none' if run is None else _fmt(run)}, {source})")


def _accounts_table(ledger: PrivacyLedger) -> list[str]:
    """Per client: node id, accountant and its history (σ, q, steps), δ, ε, budget."""
    accounts = ledger.sorted_accounts()
    if not accounts:
        return ["(no accounting recorded yet)"]
    lines = ["| client | node id | accountant | σ | q | steps | δ | ε | budget |",
             "|---|---|---|---|---|---|---|---|---|"]
    for client, account in accounts:
        state = account.state
        if state is None:
            sigma = q = steps = delta = accountant = "–"
        else:
            accountant = state.mechanism.upper()
            sigma = ", ".join(_fmt(h[0]) for h in state.history) or "–"
            q = ", ".join(_fmt(h[1]) for h in state.history) or "–"
            steps = str(state.steps)
            delta = _fmt(state.delta, 3)
        node = "–" if account.node_id is None else str(account.node_id)
        lines.append(f"| {client} | {node} | {accountant} | {sigma} | {q} | {steps} | {delta} "
                     f"| {_fmt(account.epsilon)} | {_fmt(account.budget)} |")
    if any(account.state is None for _, account in accounts):
        lines += ["", "–: the replies carried ε but no accountant history (under secure "
                  "aggregation the history would reveal q ≈ B/n_k, the example count it "
                  "hides); ε is recorded as the clients reported it."]
    lines += ["", "Clients are named by partition id everywhere (history.jsonl's "
              "`client_of_node` maps node ids to them). `privacy.json` → `clients` holds each "
              "client's full accountant history; docs/dp.md shows how to recompute ε from it "
              "with Opacus."]
    return lines


def write_report(ledger: PrivacyLedger, path: Path) -> None:
    path.write_text(render_report(ledger))


def write_plot(ledger: PrivacyLedger, path: Path) -> None:
    """ε (cumulative) per client against rounds, with the budget as a dashed line."""
    from fedstack.outputs.plots import plot_epsilon
    from fedstack.privacy.ledger import client_sort_key

    clients = sorted({e.client for e in ledger.entries}, key=client_sort_key)
    series = {f"client {c}": [(e.server_round, e.epsilon) for e in ledger.entries
                              if e.client == c and e.epsilon is not None] for c in clients}
    plot_epsilon(series, ledger.summary()["epsilon_budget"], path)
