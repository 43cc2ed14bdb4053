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
    budget = summary["epsilon_budget"]
    lines.append(f"- per-client ε budget: {budget if budget is not None else 'none'}")
    exhausted = summary["clients_exhausted"]
    lines.append(f"- clients out of budget: {', '.join(exhausted) if exhausted else 'none'}")
    if ledger.stopped:
        lines.append(f"- **run stopped early**: {ledger.stopped}")
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
                elif e.declined:
                    cells.append(f"declined ({_fmt(e.epsilon)})")
                else:
                    cells.append(_fmt(e.epsilon))
            lines.append(f"| {rnd} | " + " | ".join(cells) + " |")
        lines += ["", "Empty cell: not sampled that round. Declined: the value is ε already "
                  "spent; the client did not train."]
    else:
        lines.append("(no client reported yet)")
    reasons = sorted({(e.client, e.reason) for e in ledger.entries if e.declined and e.reason},
                     key=lambda cr: client_sort_key(cr[0]))
    if reasons:
        lines += ["", "## Declines", ""]
        lines += [f"- client {c}: {r}" for c, r in reasons]
    lines += ["", "## Not covered by the guarantee", "", NOT_COVERED, ""]
    return "\n".join(lines)


def write_report(ledger: PrivacyLedger, path: Path) -> None:
    path.write_text(render_report(ledger))


def write_plot(ledger: PrivacyLedger, path: Path) -> None:
    """ε (cumulative) per client against rounds, with the budget as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    from fedstack.privacy.ledger import client_sort_key

    clients = sorted({e.client for e in ledger.entries}, key=client_sort_key)
    for c in clients:
        points = sorted((e.server_round, e.epsilon) for e in ledger.entries
                        if e.client == c and e.epsilon is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=3,
                    label=f"client {c}")
    budget = ledger.summary()["epsilon_budget"]
    if isinstance(budget, (int, float)):
        ax.axhline(budget, ls="--", color="grey", label="budget")
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent (cumulative)")
    ax.set_title("Privacy spent per client")
    if clients:
        ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
