"""Client-level DP utility: `python benchmarks/dp.py --utility-levels` (this module's `run`).

digits split IID over 100 (and 10) simulated clients, a target client-level ε ∈ {1, 2, 4, 8}:
final central test accuracy of each client-level DP mechanism against non-private FedAvg run
with the same settings, plus seconds and upload bytes per round. Every run goes through the
real ServerApp body and ClientApp on the in-process grid (no Ray: 100 virtual clients cost
nothing but their training), one after another in this process.

Adding a mechanism is one entry in `MECHANISMS`: its Hydra overrides for a target ε. The
goals of issue 12 compare `distributed` with `central` and with the non-private run; their
keys stay null until a `distributed` entry exists.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Settings shared by every run (the non-private baseline is not re-tuned: same settings).
#: Each client holds ~14 (100 clients) or ~144 (10 clients) training examples; every client
#: takes part in every round (fraction_train=1: the accountant claims no amplification).
LEVEL_SETTINGS = ["task=digits", "task.model=digits_linear", "partition=iid",
                  "task.batch_size=16", "task.local_epochs=2", "task.learning_rate=0.5",
                  "task.momentum=0.0", "fraction_train=1.0", "fraction_evaluate=0",
                  "min_evaluate_nodes=0", "log_table=false", "log_level=warning"]
LEVEL_ROUNDS, LEVEL_ROUNDS_QUICK = 25, 8
LEVEL_EPSILONS = [1.0, 2.0, 4.0, 8.0]
LEVEL_CLIENTS = [100, 10]
#: Clipping bound of the central runs: a little below the median update norm with these
#: settings (~0.6 in rounds 15-30; found by adaptive clipping at negligible noise).
CENTRAL_CLIP = 0.5
#: Name of the non-private baseline.
NON_PRIVATE = "nondp"


@dataclass(frozen=True)
class Mechanism:
    """One way to train: its overrides for a target ε (ignored by the baseline)."""

    overrides: Callable[[float], list[str]]
    private: bool = True


#: Every mechanism the table compares. dp=distributed adds one entry here.
MECHANISMS: dict[str, Mechanism] = {
    NON_PRIVATE: Mechanism(lambda eps: ["dp=none"], private=False),
    "central": Mechanism(lambda eps: ["dp=central", f"dp.target_epsilon={eps:g}",
                                      f"dp.clip_norm={CENTRAL_CLIP}"]),
    # dp=distributed (helper E): Skellam noise added by the clients inside secure
    # aggregation, same clip bound; "secagg" is its non-private baseline for round time and
    # upload bytes. max_clients=100 covers both client counts (the ring's wrap check uses it).
    "distributed": Mechanism(lambda eps: ["aggregation=secagg", "aggregation.max_clients=100",
                                          "dp=distributed", f"dp.target_epsilon={eps:g}",
                                          f"dp.clip_norm={CENTRAL_CLIP}"]),
    "secagg": Mechanism(lambda eps: ["aggregation=secagg", "aggregation.max_clients=100",
                                     "dp=none"], private=False),
}


def run_one(overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """One in-process run: final accuracy, ε, and per-round seconds and upload bytes."""
    from fedstack.client_app import app as client_app
    from fedstack.config import compose_config
    from fedstack.server_app import run_server
    from tests.inprocess_grid import InProcessGrid

    cfg = compose_config([*overrides, f"output_dir={out_dir}"])
    started = time.perf_counter()
    summary = run_server(InProcessGrid(client_app, int(cfg.num_clients)), cfg)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in
            (Path(summary["run_dir"]) / "history.jsonl").read_text().splitlines()][1:]
    round_seconds = [sum(v for k, v in row["seconds"].items() if k != "central_evaluate")
                     for row in rows]
    return {
        "final_accuracy": summary["final_accuracy"],
        "epsilon": summary.get("epsilon_max"),
        "status": summary["status"],
        "rounds_completed": summary["rounds_completed"],
        "round_seconds_median": statistics.median(round_seconds) if round_seconds else None,
        "upload_bytes_per_round": (statistics.median(row["bytes_up"] for row in rows)
                                   if rows else None),
        "wall_seconds": round(wall, 1),
    }


def run(quick: bool = False, mechanisms: list[str] | None = None,
        clients: list[int] | None = None, epsilons: list[float] | None = None,
        out_dir: Path | None = None) -> dict[str, Any]:
    """The whole grid: every mechanism x client count x ε (the baseline once per count)."""
    import torch

    # One thread, as a 1-CPU simulation client: a 650-parameter model gains nothing from
    # more, and on a shared machine torch's thread pool made each tiny step ~50x slower.
    torch.set_num_threads(1)
    rounds = LEVEL_ROUNDS_QUICK if quick else LEVEL_ROUNDS
    names = mechanisms or list(MECHANISMS)
    clients = clients or LEVEL_CLIENTS
    epsilons = epsilons or ([1.0, 8.0] if quick else LEVEL_EPSILONS)
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="fedstack-dp-levels-"))
    started = time.time()
    runs: list[dict[str, Any]] = []
    for num_clients in clients:
        for name in names:
            mechanism = MECHANISMS[name]
            for eps in (epsilons if mechanism.private else [None]):
                overrides = [*LEVEL_SETTINGS, f"num_clients={num_clients}",
                             f"num_rounds={rounds}", *mechanism.overrides(eps or 0.0),
                             f"run_name={name}-{num_clients}-{eps or 'inf'}"]
                print(f"  {name:<12} clients={num_clients:<4} eps={eps or 'inf'}", flush=True)
                result = run_one(overrides, out_dir)
                print(f"    accuracy {result['final_accuracy']:.3f}, eps "
                      f"{result['epsilon']}, {result['round_seconds_median']:.3f} s/round",
                      flush=True)
                runs.append({"mechanism": name, "clients": num_clients,
                             "target_epsilon": eps, **result})
    return {"rounds": rounds, "settings": LEVEL_SETTINGS, "central_clip_norm": CENTRAL_CLIP,
            "runs": runs, "accuracy": accuracy_table(runs), "goals": goals(runs),
            "seconds": round(time.time() - started, 1)}


def _eps_key(eps: float | None) -> str:
    return "inf" if eps is None else f"{eps:g}"


def accuracy_table(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """clients -> mechanism -> ε ('inf' for the baseline) -> final accuracy."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for r in runs:
        table.setdefault(str(r["clients"]), {}).setdefault(r["mechanism"], {})[
            _eps_key(r["target_epsilon"])] = r["final_accuracy"]
    return table


def _round_seconds(runs: list[dict[str, Any]], mechanism: str) -> float | None:
    values = [r["round_seconds_median"] for r in runs if r["mechanism"] == mechanism]
    return statistics.median(values) if values else None


def goals(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Issue 12's goals; null until the mechanisms they compare have run."""
    table = accuracy_table(runs)
    gaps = []
    for per_mechanism in table.values():
        central, distributed = per_mechanism.get("central"), per_mechanism.get("distributed")
        if central and distributed:
            gaps += [(central[e] - distributed[e]) * 100 for e in central if e in distributed]
    hundred = table.get("100", {})
    eps8 = hundred.get("distributed", {}).get("8")
    baseline = hundred.get(NON_PRIVATE, {}).get("inf")
    secagg = _round_seconds(runs, "secagg")
    distributed_time = _round_seconds(runs, "distributed")
    return {
        "distributed_vs_central_max_gap_points": max(gaps) if gaps else None,
        "distributed_vs_nondp_gap_eps8_100clients_points": (
            (baseline - eps8) * 100 if eps8 is not None and baseline is not None else None),
        "distributed_over_secagg_round_time": (
            distributed_time / secagg if distributed_time and secagg else None),
        "central_vs_nondp_gap_eps8_100clients_points": (
            (baseline - hundred["central"]["8"]) * 100
            if baseline is not None and "8" in hundred.get("central", {}) else None),
    }


def table_markdown(result: dict[str, Any]) -> str:
    """The utility table (one block per client count) for the results file and docs."""
    epsilons = sorted({r["target_epsilon"] for r in result["runs"]
                       if r["target_epsilon"] is not None})
    lines = [f"Final central test accuracy, digits (digits_linear), IID, "
             f"{result['rounds']} rounds, every client every round; client-level ε "
             "(δ = 1/(10 N)).", ""]
    for clients, per_mechanism in result["accuracy"].items():
        lines += [f"**{clients} clients**", "",
                  "| mechanism | " + " | ".join(f"ε={e:g}" for e in epsilons)
                  + " | no DP | s/round |",
                  "|---|" + "---|" * (len(epsilons) + 2)]
        for name, accs in per_mechanism.items():
            seconds = statistics.median(
                r["round_seconds_median"] for r in result["runs"]
                if r["mechanism"] == name and str(r["clients"]) == clients)
            cells = [f"{accs[_eps_key(e)]:.3f}" if _eps_key(e) in accs else "–"
                     for e in epsilons]
            lines.append(f"| {name} | " + " | ".join(cells)
                         + f" | {accs.get('inf', float('nan')):.3f} | {seconds:.3f} |"
                         .replace("nan", "–"))
        lines.append("")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against ε per mechanism and client count; the baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(result["accuracy"].items())
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.0 * len(blocks), 3.8), squeeze=False)
    for ax, (clients, per_mechanism) in zip(axes[0], blocks, strict=True):
        for name, accs in per_mechanism.items():
            if "inf" in accs:
                ax.axhline(accs["inf"], linestyle="--", color="gray", label="non-private FedAvg")
                continue
            xs = sorted(float(e) for e in accs)
            ax.plot(xs, [accs[f"{x:g}"] for x in xs], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("client-level ε")
        ax.set_ylabel("central test accuracy")
        ax.set_title(f"digits, {clients} clients, {result['rounds']} rounds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
