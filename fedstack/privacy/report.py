"""Human-readable views of the privacy ledger: `privacy_report.md` and the ε plot.

Why a separate module: the ledger is the record; this is presentation, and it pulls in
matplotlib, which nothing else on the server path needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedstack.privacy.ledger import PrivacyLedger
    from fedstack.privacy.schedule import PublicSchedule

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
    from fedstack.audit.report import audit_section  # audit mode on? measured attacks

    lines += audit_section(ledger.run_dir)
    lines += _clear_section(ledger)
    if getattr(ledger, "client_level", None) is not None:
        return "\n".join(lines + client_level_lines(ledger))
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


def _clear_section(ledger: PrivacyLedger) -> list[str]:
    """Every value the server received in the clear, and the public DP schedule if any."""
    lines: list[str] = []
    if ledger.in_the_clear:
        lines += ["## In the clear (everything the server received readable)", ""]
        lines += [f"- {item}" for item in ledger.in_the_clear]
        lines.append("")
    schedule = ledger.schedule
    if schedule is not None and ledger.dp_name == "local":
        lines += ["## Public DP schedule", "",
                  "Every client trains with the same public parameters, none of them derived "
                  "from its number of examples; the ledger recomputed each reported ε and δ "
                  "from them and refused any reply off the schedule.", "",
                  f"- δ = {_fmt(schedule.delta, 3)} ({_delta_source(ledger, schedule)})",
                  f"- sample rate q = {_fmt(schedule.sample_rate, 6)} (dp.sample_rate), "
                  f"{schedule.steps_per_epoch} steps per local epoch, "
                  f"{schedule.steps_per_round} per round",
                  f"- σ = {_fmt(schedule.noise_multiplier())}",
                  f"- ε after 1 round: {_fmt(schedule.epsilon_after(1))}; after "
                  f"{schedule.planned_rounds} (planned): "
                  f"{_fmt(schedule.epsilon_after(schedule.planned_rounds))}", ""]
    return lines


def _delta_source(ledger: PrivacyLedger, schedule: PublicSchedule) -> str:
    if ledger.dp.get("delta") is not None:
        return "dp.delta"
    return f"1/(10·{schedule.weight_bound_key}), {schedule.weight_bound} the public bound on n_k"


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
        public = _public_history(ledger, account.epsilon) if state is None else None
        if public is not None:  # the schedule's history for the rounds this ε stands for
            sigma, q, steps, delta = public
            accountant = f"{str(ledger.dp.get('accountant', '')).upper()} (public)"
        elif state is None:
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
    if ledger.schedule is not None and any(a.state is None for _, a in accounts):
        lines += ["", "(public): the replies carried ε and δ only; the history shown is the "
                  "public schedule's for the number of rounds that ε stands for, the same for "
                  "every client that trained as often."]
    elif any(account.state is None for _, account in accounts):
        lines += ["", "–: the replies carried ε but no accountant history (under secure "
                  "aggregation the history would reveal q ≈ B/n_k, the example count it "
                  "hides); ε is recorded as the clients reported it."]
    lines += ["", "Clients are named by partition id everywhere (history.jsonl's "
              "`client_of_node` maps node ids to them). `privacy.json` → `clients` holds each "
              "client's full accountant history; docs/dp.md shows how to recompute ε from it "
              "with Opacus."]
    return lines


def _public_history(ledger: PrivacyLedger,
                    epsilon: float | None) -> tuple[str, str, str, str] | None:
    """(σ, q, steps, δ) of the public schedule behind a reported ε, if there is one."""
    schedule = ledger.schedule
    if schedule is None or epsilon is None:
        return None
    rounds = schedule.rounds_for(epsilon, ledger.round_cap())
    if rounds is None:
        return None
    return (_fmt(schedule.noise_multiplier()), _fmt(schedule.sample_rate),
            str(rounds * schedule.steps_per_round), _fmt(schedule.delta, 3))


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


#: What dp=central does not cover, stated in its report.
CENTRAL_NOT_COVERED = (
    "- ε bounds what the released global models reveal about any one client's whole data "
    "(whether it took part, and what it sent). The server itself is trusted: it saw every "
    "update in the clear, and its own records (history.jsonl: who was sampled, train "
    "losses, example counts) are outside the guarantee.\n"
    "- Evaluation replies (loss/accuracy on a client's local validation split) and the "
    "metrics in train replies are computed without noise.\n"
    "- Cohorts are Poisson-sampled and the noise is drawn from AES-256-CTR keyed from the "
    "OS; the floating-point Gaussian sampler is not hardened against Mironov's (2012) attack."
)
#: Per client-level DP mode: its "Not covered" text (dp=distributed adds its own).
CLIENT_LEVEL_NOT_COVERED: dict[str, str] = {"central": CENTRAL_NOT_COVERED}


def client_level_lines(ledger: PrivacyLedger) -> list[str]:
    """The report of a client-level DP layer: unit, trust, mechanism, ε per round."""
    from fedstack.privacy.ledger import DP_GUARANTEES

    record = ledger.client_level or {}
    if record.get("mechanism") == "skellam":
        from fedstack.privacy.distributed.report import report_lines

        return report_lines(ledger)
    guarantee = DP_GUARANTEES.get(ledger.dp_name, {})
    details = record.get("details", {})
    clips = details.get("clip_norm") or []
    fractions = details.get("noisy_unclipped_fraction") or []
    sampling = ("Poisson: each client independently with probability q per round (the "
                "accountant applies amplification by sampling)"
                if record.get("sampling") == "poisson" else
                "every client every round (q = 1: no amplification claimed)")
    lines = ["## Differential privacy (client level)", "",
             f"- protects: each **{guarantee.get('unit', 'client')}** (all of its data), in "
             "every released global model",
             f"- must be trusted: {guarantee.get('trusted', '(not recorded)')}",
             _mechanism_line(record),
             f"- client sampling: {sampling}; q = {_fmt(record.get('sample_rate'))}",
             f"- accountant: {str(record.get('accountant')).upper()}, δ = "
             f"{_fmt(record.get('delta'), 3)}, ε = {_fmt(record.get('epsilon'))} after "
             f"{len(record.get('rounds', []))} rounds",
             f"- budget: {_fmt(ledger.run_budget())}"]
    if ledger.stopped:
        lines.append(f"- **run stopped early**: {ledger.stopped}")
    lines += ["", "## ε per round (cumulative) and clipping bound", "",
              "| round | ε | C | noisy fraction within C |", "|---|---|---|---|"]
    for i, (rnd, eps) in enumerate(zip(record.get("rounds", []), record.get("epsilons", []),
                                       strict=True)):
        clip = clips[i] if i < len(clips) else None
        fraction = fractions[i] if i < len(fractions) else None
        lines.append(f"| {rnd} | {_fmt(eps)} | {_fmt(clip)} | {_fmt(fraction, 3)} |")
    lines += ["", "`privacy.json` → `client_level` holds the accountant's history "
              "`[[σ, q, rounds]]` and δ: Opacus's RDPAccountant/PRVAccountant recompute ε "
              "from them (docs/dp.md).", "", "## Not covered by the guarantee", "",
              CLIENT_LEVEL_NOT_COVERED.get(ledger.dp_name, "(not recorded)"), ""]
    return lines


def _mechanism_line(record: dict) -> str:
    """The noise of a client-level record: the Gaussian's σ split, else its scalar details."""
    details = record.get("details", {})
    if record.get("mechanism") != "gaussian":
        facts = ", ".join(f"{k} = {_fmt(v) if isinstance(v, float) else v}"
                          for k, v in details.items() if not isinstance(v, (list, dict)))
        return (f"- mechanism: {record.get('mechanism')}, noise multiplier "
                f"{_fmt(record.get('noise_multiplier'))}; {facts}")
    return (f"- mechanism: Gaussian, σ = {_fmt(record.get('noise_multiplier'))} accounted "
            f"(update σ_Δ = {_fmt(details.get('update_noise_multiplier'))}"
            + (f", clipped-count σ_b = {_fmt(details.get('clipped_count_stddev'))}"
               if details.get("adaptive_clipping") else "")
            + f"), divided by the expected cohort m = {_fmt(details.get('expected_clients'))}")
