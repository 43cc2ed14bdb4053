"""Client-level DP utility: `python benchmarks/dp.py --utility-levels` (this module's `run`).

digits split IID over 100 (and 10) simulated clients, a target client-level ε ∈ {1, 2, 4, 8}:
final central test accuracy of each client-level DP mechanism against non-private FedAvg run
with the same settings, plus seconds and upload bytes per round. Every run goes through the
real ServerApp body and ClientApp on the in-process grid (no Ray: 100 virtual clients cost
nothing but their training), one after another in this process.

Adding a mechanism is one entry in `MECHANISMS`: its Hydra overrides for a target ε. The
goals of issue 12 compare `distributed` with `central` and with the non-private run (means
over the seeds of `--seeds`); `goals_met` checks them against `GOAL_TARGETS`.
`noise_on_the_mean` states the noise std each mechanism adds to the mean update at each ε,
from the runs' own plans: the part of a gap that is the mechanism's, not run-to-run noise.
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
#: The run config's default seed; `--seeds` repeats every cell with others.
LEVEL_SEED = 42
#: digits: 8x8 grey images, 10 classes (to size the model for the noise comparison).
DIGITS_INPUT_SHAPE, DIGITS_CLASSES = (64,), 10
#: Issue 12's goals: the most each measured value may be (points, or a ratio).
GOAL_TARGETS = {"distributed_vs_central_max_gap_points": 1.0,
                "distributed_vs_nondp_gap_eps8_100clients_points": 3.0,
                "distributed_over_secagg_round_time": 1.2}


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


def noise_on_the_mean(clients: int, epsilon: float, rounds: int) -> dict[str, float]:
    """Per-coordinate std of the noise each mechanism adds to the mean update (model units).

    From the runs' own plans (same config as `run`): central adds N(0, (σC)²) to the sum
    and divides by m = N; distributed's sum carries μ·n/n_min in ring units when nobody
    drops (the dropout slack), divided by γ² and by n². The ratio is the noise price of
    distributing the trust, before any run-to-run variation.
    """
    from fedstack.config import compose_config
    from fedstack.privacy.central import plan_from_config
    from fedstack.privacy.distributed.codec import DistributedCodec
    from fedstack.task.models import build_model

    base = [*LEVEL_SETTINGS, f"num_clients={clients}", f"num_rounds={rounds}"]
    central = plan_from_config(compose_config(
        [*base, *MECHANISMS["central"].overrides(epsilon)]))
    cfg = compose_config([*base, *MECHANISMS["distributed"].overrides(epsilon)])
    size = sum(p.numel() for p in build_model(
        str(cfg.task.model), DIGITS_INPUT_SHAPE, DIGITS_CLASSES, 0).parameters())
    plan = DistributedCodec.from_config(cfg).plan(size)
    central_std = central.update_noise_multiplier * central.clip_norm / central.expected_clients
    summed = plan.variance * clients / plan.min_survivors(clients)
    distributed_std = summed ** 0.5 / plan.scale / clients
    return {"central_std": central_std, "central_noise_multiplier": central.noise_multiplier,
            "distributed_std": distributed_std,
            "distributed_noise_multiplier": plan.noise_multiplier,
            "distributed_scale": plan.scale,
            "distributed_rounding_inflation": plan.l2_sensitivity / (
                plan.scale * plan.settings.clip),
            "distributed_over_central_std": distributed_std / central_std}


def _cell(run: dict[str, Any]) -> tuple[str, int, float | None, int]:
    return run["mechanism"], int(run["clients"]), run["target_epsilon"], int(run["seed"])


def run(quick: bool = False, mechanisms: list[str] | None = None,
        clients: list[int] | None = None, epsilons: list[float] | None = None,
        out_dir: Path | None = None, seeds: list[int] | None = None,
        runs_file: Path | None = None, collect_only: bool = False) -> dict[str, Any]:
    """The whole grid: every seed x client count x mechanism x ε (the baseline once).

    ``runs_file`` (JSON lines): every finished run is appended; cells already in it (same
    mechanism, clients, ε, seed, and the same rounds) are not run again, so an interrupted
    grid resumes, and ``collect_only`` tabulates what is there.
    """
    import torch

    # One thread, as a 1-CPU simulation client: a 650-parameter model gains nothing from
    # more, and on a shared machine torch's thread pool made each tiny step ~50x slower.
    torch.set_num_threads(1)
    rounds = LEVEL_ROUNDS_QUICK if quick else LEVEL_ROUNDS
    names = mechanisms or list(MECHANISMS)
    clients = clients or LEVEL_CLIENTS
    epsilons = epsilons or ([1.0, 8.0] if quick else LEVEL_EPSILONS)
    seeds = seeds or [LEVEL_SEED]
    out_dir = out_dir or Path(tempfile.mkdtemp(prefix="fedstack-dp-levels-"))
    started = time.time()
    done: list[dict[str, Any]] = []
    if runs_file is not None and runs_file.exists():
        done = [r for r in (json.loads(line) for line in runs_file.read_text().splitlines()
                            if line.strip()) if r.get("rounds", rounds) == rounds]
    finished = {_cell(r): r for r in done}
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        for num_clients in clients:
            for name in names:
                mechanism = MECHANISMS[name]
                for eps in (epsilons if mechanism.private else [None]):
                    cell = (name, num_clients, eps, seed)
                    if cell in finished:
                        runs.append(finished[cell])
                        continue
                    if collect_only:
                        continue
                    overrides = [*LEVEL_SETTINGS, f"num_clients={num_clients}",
                                 f"num_rounds={rounds}", f"seed={seed}",
                                 *mechanism.overrides(eps or 0.0),
                                 f"run_name={name}-{num_clients}-{eps or 'inf'}-s{seed}"]
                    print(f"  {name:<12} clients={num_clients:<4} eps={eps or 'inf'} "
                          f"seed={seed}", flush=True)
                    result = run_one(overrides, out_dir)
                    print(f"    accuracy {result['final_accuracy']:.3f}, eps "
                          f"{result['epsilon']}, {result['round_seconds_median']:.3f} s/round",
                          flush=True)
                    entry = {"mechanism": name, "clients": num_clients, "target_epsilon": eps,
                             "seed": seed, "rounds": rounds, **result}
                    runs.append(entry)
                    if runs_file is not None:
                        with runs_file.open("a") as f:
                            f.write(json.dumps(entry) + "\n")
    noise = {str(n): {f"{e:g}": noise_on_the_mean(n, e, rounds) for e in epsilons}
             for n in clients} if {"central", "distributed"} <= set(names) else {}
    return {"rounds": rounds, "settings": LEVEL_SETTINGS, "central_clip_norm": CENTRAL_CLIP,
            "seeds": sorted({r["seed"] for r in runs}), "runs": runs,
            "accuracy": accuracy_table(runs), "accuracy_range": accuracy_range(runs),
            "runs_per_cell": runs_per_cell(runs), "noise_on_the_mean": noise,
            "goal_targets": GOAL_TARGETS, "goals": goals(runs),
            "distributed_vs_central_gap_points": central_gaps(runs),
            "round_time_ratio_by_clients": round_time_ratios(runs),
            "goals_met": goals_met(goals(runs)), "seconds": round(time.time() - started, 1)}


def _eps_key(eps: float | None) -> str:
    return "inf" if eps is None else f"{eps:g}"


def _cells(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """clients -> mechanism -> ε ('inf' for the baselines) -> accuracies over the seeds."""
    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in runs:
        table.setdefault(str(r["clients"]), {}).setdefault(r["mechanism"], {}).setdefault(
            _eps_key(r["target_epsilon"]), []).append(r["final_accuracy"])
    return table


def accuracy_table(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """clients -> mechanism -> ε ('inf' for the baseline) -> mean final accuracy over seeds."""
    return {c: {m: {e: statistics.fmean(v) for e, v in accs.items()}
                for m, accs in per.items()} for c, per in _cells(runs).items()}


def accuracy_range(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Like `accuracy_table`, the [min, max] over the seeds (the spread of a cell)."""
    return {c: {m: {e: [min(v), max(v)] for e, v in accs.items()}
                for m, accs in per.items()} for c, per in _cells(runs).items()}


def runs_per_cell(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, int]]]:
    """How many seeds each cell of the tables averages."""
    return {c: {m: {e: len(v) for e, v in accs.items()} for m, accs in per.items()}
            for c, per in _cells(runs).items()}


def _round_seconds(runs: list[dict[str, Any]], mechanism: str, clients: int) -> float | None:
    values = [r["round_seconds_median"] for r in runs
              if r["mechanism"] == mechanism and int(r["clients"]) == clients]
    return statistics.median(values) if values else None


def round_time_ratios(runs: list[dict[str, Any]]) -> dict[str, float]:
    """clients -> median s/round of `distributed` over plain `secagg` at that client count
    (a 10-client round is not compared with a 100-client one)."""
    ratios = {}
    for clients in sorted({int(r["clients"]) for r in runs}):
        distributed = _round_seconds(runs, "distributed", clients)
        secagg = _round_seconds(runs, "secagg", clients)
        if distributed and secagg:
            ratios[str(clients)] = distributed / secagg
    return ratios


def central_gaps(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """clients -> ε -> points of mean accuracy `central` has over `distributed`."""
    out: dict[str, dict[str, float]] = {}
    for clients, per_mechanism in accuracy_table(runs).items():
        central, distributed = per_mechanism.get("central"), per_mechanism.get("distributed")
        if central and distributed:
            out[clients] = {e: (central[e] - distributed[e]) * 100
                            for e in central if e in distributed}
    return out


def goals(runs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Issue 12's goals; null until the mechanisms they compare have run."""
    table = accuracy_table(runs)
    gaps = [gap for per_eps in central_gaps(runs).values() for gap in per_eps.values()]
    hundred = table.get("100", {})
    eps8 = hundred.get("distributed", {}).get("8")
    baseline = hundred.get(NON_PRIVATE, {}).get("inf")
    time_ratios = round_time_ratios(runs)
    return {
        "distributed_vs_central_max_gap_points": max(gaps) if gaps else None,
        "distributed_vs_nondp_gap_eps8_100clients_points": (
            (baseline - eps8) * 100 if eps8 is not None and baseline is not None else None),
        "distributed_over_secagg_round_time": (
            max(time_ratios.values()) if time_ratios else None),
        "central_vs_nondp_gap_eps8_100clients_points": (
            (baseline - hundred["central"]["8"]) * 100
            if baseline is not None and "8" in hundred.get("central", {}) else None),
    }


def goals_met(values: dict[str, float | None]) -> dict[str, bool | None]:
    """Each goal of `GOAL_TARGETS` against its measured value (None: not measured)."""
    return {k: (None if values.get(k) is None else bool(values[k] <= limit))
            for k, limit in GOAL_TARGETS.items()}


def _cell_text(mean: float, spread: list[float], count: int) -> str:
    return f"{mean:.3f}" if count < 2 else f"{mean:.3f} ({spread[0]:.3f}–{spread[1]:.3f})"


def table_markdown(result: dict[str, Any]) -> str:
    """The utility table (one block per client count) for the results file and docs."""
    epsilons = sorted({r["target_epsilon"] for r in result["runs"]
                       if r["target_epsilon"] is not None})
    seeds = ", ".join(str(s) for s in result.get("seeds", [LEVEL_SEED]))
    lines = [f"Final central test accuracy, digits (digits_linear), IID, "
             f"{result['rounds']} rounds, every client every round; client-level ε "
             f"(δ = 1/(10 N)). Mean over seeds {seeds} (min–max in brackets where a cell "
             "has more than one run).", ""]
    spread, counts = result["accuracy_range"], result["runs_per_cell"]
    for clients, per_mechanism in result["accuracy"].items():
        lines += [f"**{clients} clients**", "",
                  "| mechanism | " + " | ".join(f"ε={e:g}" for e in epsilons)
                  + " | no DP | s/round |",
                  "|---|" + "---|" * (len(epsilons) + 2)]
        for name, accs in per_mechanism.items():
            seconds = statistics.median(
                r["round_seconds_median"] for r in result["runs"]
                if r["mechanism"] == name and str(r["clients"]) == clients)
            cells = [_cell_text(accs[k], spread[clients][name][k], counts[clients][name][k])
                     if (k := _eps_key(e)) in accs else "–" for e in epsilons]
            base = (_cell_text(accs["inf"], spread[clients][name]["inf"],
                               counts[clients][name]["inf"]) if "inf" in accs else "–")
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {base} | {seconds:.3f} |")
        lines.append("")
    goals, met = result["goals"], result.get("goals_met", {})
    lines += ["Goals (issue 12): " + "; ".join(
        f"{k} = {'–' if v is None else f'{v:.2f}'}"
        + ("" if met.get(k) is None else f" (≤ {GOAL_TARGETS[k]:g}: "
           f"{'met' if met[k] else 'NOT met'})")
        for k, v in goals.items()), ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy against ε per mechanism and client count (mean, bars: min–max over seeds);
    the non-private baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(result["accuracy"].items())
    fig, axes = plt.subplots(1, len(blocks), figsize=(5.0 * len(blocks), 3.8), squeeze=False)
    for ax, (clients, per_mechanism) in zip(axes[0], blocks, strict=True):
        for name, accs in per_mechanism.items():
            if "inf" in accs:
                ax.axhline(accs["inf"], linestyle="--" if name == NON_PRIVATE else ":",
                           color="gray", label=f"{name} (no DP)")
                continue
            xs = sorted(float(e) for e in accs)
            means = [accs[f"{x:g}"] for x in xs]
            spread = [result["accuracy_range"][clients][name][f"{x:g}"] for x in xs]
            below = [m - lo for m, (lo, _) in zip(means, spread, strict=True)]
            above = [hi - m for m, (_, hi) in zip(means, spread, strict=True)]
            ax.errorbar(xs, means, yerr=[below, above], marker="o", capsize=3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("client-level ε")
        ax.set_ylabel("central test accuracy")
        ax.set_title(f"digits, {clients} clients, {result['rounds']} rounds")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
