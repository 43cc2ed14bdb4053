"""DP-SGD benchmarks: speed of each per-sample clipping mode, and privacy vs utility.

Part 1 (default, `--speed`): per-epoch training time of the digits CNN and the breast-cancer
MLP on the task's whole training split, with the task's batch size: no DP vs every Opacus
grad-sample mode vs our book-keeping clipper (`bk`). All modes run side by side in one
process, interleaved (round-robin over modes, repeated); each mode reports its best and
median epoch and the median of its per-repetition ratios to the no-DP epoch timed in the same
repetition. Ratios are against the no-DP loop over the *same* in-memory batches, so they
measure the cost of DP and nothing else. The plain trainer's own loop (a torch DataLoader)
is timed too, for reference, and for the CNN the plain loop in channels-last memory format
(faster on this CPU; neither trainer uses it, so it is a reference row, not the baseline).
Batches are standard NCHW tensors, as both trainers build them.

Part 2 (`--utility`): privacy-utility sweep through `fedstack run -m` (Hydra multirun) over
ε ∈ {1, 2, 4, 8, ∞} on digits with 5 clients, IID and Dirichlet(0.5) partitions; final
central test accuracy per (ε, partition), a table and a PNG plot.

Part 3 (`--utility-levels`): client-level DP (`dp=central`, and each mechanism registered in
`benchmarks/dp_levels.py`) against non-private FedAvg, digits over 100 and 10 clients,
client-level ε ∈ {1, 2, 4, 8}; in-process (no Ray). Table dp_levels.md, plot dp_levels.png.
`--seeds 42,43` repeats every cell (mean and min–max reported); `--levels-runs FILE` keeps
each finished run (an interrupted grid resumes; with `--collect-only` it is only tabulated).

Results: benchmarks/results/dp.json (each part updates its own key), dp_utility.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fedstack.privacy.engine import LocalDP  # noqa: E402
from fedstack.privacy.settings import GRAD_SAMPLE_MODES, LocalDPSettings  # noqa: E402
from fedstack.task.datasets import load_breast_cancer_task, load_digits_task  # noqa: E402
from fedstack.task.models import build_model  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RESULT_FILE = RESULTS / "dp.json"
PLOT_FILE = RESULTS / "dp_utility.png"
DEFAULT_MODE = LocalDPSettings().grad_sample_mode
OPACUS_MODES = [m for m in GRAD_SAMPLE_MODES if m != "bk"]
#: The (task, model, batch size) pairs of part 1: the tasks' shipped configs.
SPEED_CASES = {
    "digits_cnn": ("digits", "digits_cnn", 32),
    "tabular_mlp": ("breast_cancer", "tabular_mlp", 16),
}
#: Shortest timing sample of part 1, in seconds (short epochs are timed in groups).
MIN_SAMPLE_S = 0.25
SWEEP_EPSILONS = ["1", "2", "4", "8", "inf"]
SWEEP_PARTITIONS = ["iid", "dirichlet"]  # dirichlet: alpha=0.5 (conf/partition/dirichlet.yaml)


# ------------------------------------------------------------------------- part 1: speed
def _task_data(task: str) -> TensorDataset:
    data = load_digits_task(0.2, 42) if task == "digits" else load_breast_cancer_task(0.2, 42)
    # Canonical strides: the loader's (N, 1, 8, 8) view of (N, 8, 8) has a stride pattern
    # that torch also reads as channels-last, and mkldnn then runs the whole CNN in that
    # layout. Neither trainer ever sees it (DataLoader's collate and Poisson batches both
    # build standard NCHW batches), so the benchmark must not either.
    x = torch.empty(data.x_train.shape, dtype=torch.float32)
    x.copy_(torch.from_numpy(data.x_train))
    return TensorDataset(x, torch.from_numpy(data.y_train))


class _PlainRunner:
    """Non-private SGD over shuffled in-memory batches (the baseline of every ratio).

    Batches are gathered with ``index_select``, as the DP path's Poisson batches are, so
    both feed the model identically laid-out tensors.
    """

    def __init__(self, model: nn.Module, data: TensorDataset, batch: int) -> None:
        self.model, self.data, self.batch = model, data, batch
        self.opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        self.crit = nn.CrossEntropyLoss()

    def epoch(self) -> None:
        x, y = self.data.tensors
        perm = torch.randperm(len(y))
        for start in range(0, len(y), self.batch):
            idx = perm[start:start + self.batch]
            self.opt.zero_grad(set_to_none=True)
            self.crit(self.model(x.index_select(0, idx)), y.index_select(0, idx)).backward()
            self.opt.step()


class _DataLoaderRunner(_PlainRunner):
    """The lead's plain trainer loop: torch DataLoader over the TensorDataset."""

    def epoch(self) -> None:
        for xb, yb in DataLoader(self.data, batch_size=self.batch, shuffle=True):
            self.opt.zero_grad(set_to_none=True)
            self.crit(self.model(xb), yb).backward()
            self.opt.step()


class _DPRunner:
    def __init__(self, model: nn.Module, data: TensorDataset, batch: int, mode: str,
                 epochs: int, secure_rng: bool = False) -> None:
        settings = LocalDPSettings(grad_sample_mode=mode, noise_multiplier=1.0,
                                   target_epsilon=None, secure_rng=secure_rng)
        self.dp = LocalDP(settings, num_examples=len(data), batch_size=batch,
                          local_epochs=epochs, planned_rounds=1)
        start = time.perf_counter()
        self.private = self.dp.make_private(
            model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), data)
        self.setup_s = time.perf_counter() - start

    def epoch(self) -> None:
        self.private.train_epoch()


def bench_speed(reps: int, warmup: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    for case, (task, model_name, batch) in SPEED_CASES.items():
        data = _task_data(task)
        shape, classes = tuple(data.tensors[0].shape[1:]), int(data.tensors[1].max()) + 1

        def fresh(name: str = model_name, shape: tuple = shape, k: int = classes) -> nn.Module:
            return build_model(name, shape, k, 0)

        runners: dict[str, Any] = {
            "no_dp": _PlainRunner(fresh(), data, batch),
            "no_dp_dataloader": _DataLoaderRunner(fresh(), data, batch),
        }
        if len(shape) == 3:
            # Reference only (no trainer uses it yet): the same plain loop with the model in
            # channels-last memory format, which mkldnn runs faster on this CPU.
            runners["no_dp_channels_last"] = _PlainRunner(
                fresh().to(memory_format=torch.channels_last), data, batch)
        # One timing sample is several epochs when an epoch is short (the MLP's is ~15 ms),
        # so that scheduler and timer noise stay small against it.
        probe = runners["no_dp"]
        probe.epoch()
        start = time.perf_counter()
        probe.epoch()
        per_sample = max(1, math.ceil(MIN_SAMPLE_S / (time.perf_counter() - start)))
        for mode in [*OPACUS_MODES, "bk"]:
            runners[mode] = _DPRunner(fresh(), data, batch, mode, (reps + warmup) * per_sample)
        # bk with dp.secure_rng (noise and sampling from AES-256-CTR): the price of a CSPRNG.
        runners["bk_secure_rng"] = _DPRunner(fresh(), data, batch, "bk",
                                             (reps + warmup) * per_sample, secure_rng=True)
        times: dict[str, list[float]] = {name: [] for name in runners}
        for rep in range(reps + warmup):
            order = list(runners) if rep % 2 == 0 else list(reversed(runners))
            for name in order:
                start = time.perf_counter()
                for _ in range(per_sample):
                    runners[name].epoch()
                if rep >= warmup:
                    times[name].append((time.perf_counter() - start) / per_sample)
        base_min = min(times["no_dp"])
        base_med = statistics.median(times["no_dp"])
        modes = {}
        for name, ts in times.items():
            modes[name] = {
                "epoch_s_min": min(ts),
                "epoch_s_median": statistics.median(ts),
                # Headline: best-of-N (interference from other processes only adds time).
                "ratio_vs_no_dp": min(ts) / base_min,
                "ratio_vs_no_dp_median": statistics.median(ts) / base_med,
                # Each repetition's ratio against the no-DP sample of the same repetition
                # (timed moments apart), then the median: robust to slow drifts in speed.
                "ratio_vs_no_dp_paired_median": statistics.median(
                    t / b for t, b in zip(ts, times["no_dp"], strict=True)),
            }
            if isinstance(runners[name], _DPRunner):
                modes[name]["setup_s"] = runners[name].setup_s
        fastest_opacus = min(OPACUS_MODES, key=lambda m: modes[m]["epoch_s_min"])
        out[case] = {
            "task": task, "batch_size": batch, "num_examples": len(data),
            "epochs_per_sample": per_sample,
            "params": sum(p.numel() for p in fresh().parameters()),
            "steps_per_epoch": math.ceil(len(data) / batch),
            "modes": modes,
            "fastest_opacus_mode": fastest_opacus,
            "fastest_correct_mode": min([*OPACUS_MODES, "bk"],
                                        key=lambda m: modes[m]["epoch_s_min"]),
        }
    return out


def print_speed(result: dict[str, Any]) -> None:
    for case, r in result.items():
        print(f"\n{case}: {r['num_examples']} examples, batch {r['batch_size']}, "
              f"{r['params']} params, epochs of {r['steps_per_epoch']} steps")
        print(f"  {'mode':<20}{'best ms':>9}{'x no-DP':>9}{'median ms':>11}{'x no-DP':>9}"
              f"{'paired x':>10}{'setup ms':>10}")
        for name, m in r["modes"].items():
            setup = f"{m['setup_s'] * 1e3:10.1f}" if "setup_s" in m else " " * 10
            print(f"  {name:<20}{m['epoch_s_min'] * 1e3:9.1f}{m['ratio_vs_no_dp']:9.2f}"
                  f"{m['epoch_s_median'] * 1e3:11.1f}{m['ratio_vs_no_dp_median']:9.2f}"
                  f"{m['ratio_vs_no_dp_paired_median']:10.2f}{setup}")
        print(f"  fastest Opacus mode: {r['fastest_opacus_mode']}; "
              f"fastest overall: {r['fastest_correct_mode']}")


# ------------------------------------------------------------------------ part 2: utility
#: Training settings of the sweep, identical for every ε, the no-DP baseline (ε = ∞, dp=none)
#: included: same model, rounds, batch size, epochs, optimizer. They are chosen for DP-SGD
#: (docs/dp.md, "Privacy vs utility"): `digits_linear` (650 parameters; DP noise grows with
#: √d, the default CNN has 85k and loses 20+ points at ε = 8); batch 64 (sample rate ~1/4:
#: less noise per step relative to the summed clipped gradients) and one local epoch (fewer
#: steps for the same budget, less client drift under label skew); lr 1.0, because clipping
#: (C = 1, per-example gradient norms ~4 at initialisation) shrinks the steps, and at the
#: task's lr 0.05 the DP model stays under-trained (clipping without noise already costs the
#: gap). The no-DP baseline is not re-tuned: it runs these exact settings with dp=none.
SWEEP_SETTINGS = ["task=digits", "num_clients=5", "log_table=false",
                  "task.model=digits_linear", "task.batch_size=64", "task.local_epochs=1",
                  "task.learning_rate=1.0"]
SWEEP_ROUNDS, SWEEP_ROUNDS_QUICK = 20, 6


def _fedstack_multirun(overrides: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "fedstack", "run", "-m", *overrides]
    print("$ fedstack run -m " + " ".join(overrides), flush=True)
    subprocess.run(cmd, cwd=REPO, env=env, check=True)


def _collect_sweep(sweep_dir: Path) -> list[dict[str, Any]]:
    import yaml

    rows = []
    for summary_path in sorted(sweep_dir.rglob("summary.json")):
        summary = json.loads(summary_path.read_text())
        cfg = yaml.safe_load((summary_path.parent / "config.yaml").read_text())
        target = cfg["dp"].get("target_epsilon") if cfg["dp"]["name"] == "local" else None
        rows.append({
            "partition": summary["partition"],
            "target_epsilon": f"{float(target):g}" if target is not None else "inf",
            "final_accuracy": summary["final_accuracy"],
            "epsilon_max": summary.get("epsilon_max"),
            "rounds_completed": summary["rounds_completed"],
            "num_rounds": summary["num_rounds"],
            "run_dir": summary["run_dir"],
        })
    return rows


def run_utility(quick: bool, out_dir: Path, partitions: list[str], rounds: int | None,
                collect_only: bool) -> dict[str, Any]:
    """Two `fedstack run -m` sweeps (DP over the ε grid, and dp=none) per partition list.

    `collect_only` re-reads the runs already under `out_dir` (e.g. when the partitions ran
    as two processes side by side) and only builds the table.
    """
    rounds = rounds or (SWEEP_ROUNDS_QUICK if quick else SWEEP_ROUNDS)
    epsilons = ["1", "8"] if quick else [e for e in SWEEP_EPSILONS if e != "inf"]
    common = [*SWEEP_SETTINGS, f"num_rounds={rounds}",
              f"partition={','.join(partitions)}", f"output_dir={out_dir}"]
    started = time.time()
    if not collect_only:
        _fedstack_multirun([*common, "dp=local", f"dp.target_epsilon={','.join(epsilons)}"])
        _fedstack_multirun([*common, "dp=none"])
    rows = _collect_sweep(out_dir)
    rounds = max((r["num_rounds"] for r in rows), default=rounds)
    table: dict[str, dict[str, float]] = {}
    for row in rows:
        table.setdefault(row["partition"], {})[str(row["target_epsilon"])] = row["final_accuracy"]
    gaps = {part: (accs["inf"] - accs["8"]) * 100 for part, accs in table.items()
            if "inf" in accs and "8" in accs}
    return {"rounds": rounds, "settings": SWEEP_SETTINGS, "runs": rows, "accuracy": table,
            "gap_points_eps8_vs_no_dp": gaps, "seconds": round(time.time() - started, 1)}


def print_utility(result: dict[str, Any]) -> None:
    keys = [e for e in SWEEP_EPSILONS if any(e in a for a in result["accuracy"].values())]
    print(f"\naccuracy (central test split) after {result['rounds']} rounds, digits, "
          "5 clients")
    print(f"  {'partition':<12}" + "".join(f"{'eps=' + k:>10}" for k in keys))
    for part, accs in result["accuracy"].items():
        print(f"  {part:<12}" + "".join(
            f"{accs[k]:10.3f}" if k in accs else f"{'-':>10}" for k in keys))
    for part, gap in result["gap_points_eps8_vs_no_dp"].items():
        print(f"  {part}: eps=8 is {gap:.1f} points below no-DP")


def plot_utility(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [e for e in SWEEP_EPSILONS if any(e in a for a in result["accuracy"].values())]
    fig, ax = plt.subplots(figsize=(6.0, 4.0))
    for part, accs in result["accuracy"].items():
        xs = [i for i, k in enumerate(keys) if k in accs]
        ax.plot(xs, [accs[keys[i]] for i in xs], marker="o", label=part)
    ax.set_xticks(range(len(keys)), ["∞ (no DP)" if k == "inf" else k for k in keys])
    ax.set_xlabel("per-client ε (δ = 1/(10 n_k))")
    ax.set_ylabel("central test accuracy")
    ax.set_title(f"digits, 5 clients, {result['rounds']} rounds: privacy vs utility")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions / runs")
    parser.add_argument("--speed", action="store_true", help="part 1 only")
    parser.add_argument("--utility", action="store_true", help="part 2 only")
    parser.add_argument("--sweep-dir", default=None,
                        help="where the sweep's runs go (default: a new /tmp directory)")
    parser.add_argument("--partitions", default=",".join(SWEEP_PARTITIONS),
                        help="partitions of the sweep (comma-separated)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds per run (default {SWEEP_ROUNDS}, "
                             f"--quick {SWEEP_ROUNDS_QUICK})")
    parser.add_argument("--collect-only", action="store_true",
                        help="only tabulate the runs already in --sweep-dir (part 2) or "
                             "--levels-runs (part 3)")
    parser.add_argument("--utility-levels", action="store_true",
                        help="part 3 only: client-level DP mechanisms vs non-private FedAvg")
    parser.add_argument("--mechanisms", default=None,
                        help="part 3: comma-separated mechanisms (default: all registered)")
    parser.add_argument("--seeds", default=None,
                        help="part 3: comma-separated run seeds; each cell is run once per "
                             "seed and the tables show the mean (default: 42)")
    parser.add_argument("--levels-runs", default=None,
                        help="part 3: JSON-lines file of finished runs (appended to; cells "
                             "already there are not run again)")
    parser.add_argument("--clients", default=None,
                        help="part 3: comma-separated client counts (default: 100,10)")
    parser.add_argument("--epsilons", default=None,
                        help="part 3: comma-separated target epsilons (default: 1,2,4,8)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads for part 1 (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    do_levels = args.utility_levels
    do_speed = args.speed or not (args.utility or do_levels)
    do_utility = args.utility
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.exists() else {}
    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(),
                         "torch": torch.__version__}
    if do_speed:
        reps, warmup = (5, 1) if args.quick else (21, 2)
        speed = bench_speed(reps, warmup)
        print_speed(speed)
        result["speed"] = {"reps": reps, "warmup": warmup, "torch_threads": torch.get_num_threads(),
                           "cases": speed}
        result["default_mode"] = DEFAULT_MODE
        result["opacus_overhead_ratio"] = {
            case: r["modes"][DEFAULT_MODE]["ratio_vs_no_dp"] for case, r in speed.items()
        }
        result["opacus_overhead_ratio_paired_median"] = {
            case: r["modes"][DEFAULT_MODE]["ratio_vs_no_dp_paired_median"]
            for case, r in speed.items()
        }
        result["best_opacus_mode_ratio"] = {
            case: r["modes"][r["fastest_opacus_mode"]]["ratio_vs_no_dp"]
            for case, r in speed.items()
        }
        print(f"\nopacus_overhead_ratio (default mode {DEFAULT_MODE!r}, best of "
              f"{reps}; paired median in brackets): " + ", ".join(
                  f"{k} {v:.2f}x ({result['opacus_overhead_ratio_paired_median'][k]:.2f}x)"
                  for k, v in result["opacus_overhead_ratio"].items()))
    if do_utility:
        out_dir = Path(args.sweep_dir or f"/tmp/fedstack-dp-sweep-{int(time.time())}")
        utility = run_utility(args.quick, out_dir, args.partitions.split(","), args.rounds,
                              args.collect_only)
        print_utility(utility)
        plot_utility(utility, PLOT_FILE)
        result["utility"] = utility
    if do_levels:
        import dp_levels

        levels = dp_levels.run(
            args.quick, args.mechanisms.split(",") if args.mechanisms else None,
            clients=[int(c) for c in args.clients.split(",")] if args.clients else None,
            seeds=[int(s) for s in args.seeds.split(",")] if args.seeds else None,
            epsilons=[float(e) for e in args.epsilons.split(",")] if args.epsilons else None,
            runs_file=Path(args.levels_runs) if args.levels_runs else None,
            collect_only=args.collect_only)
        table = dp_levels.table_markdown(levels)
        print("\n" + table)
        (RESULTS / "dp_levels.md").write_text(table)
        dp_levels.plot(levels, RESULTS / "dp_levels.png")
        result["utility_levels"] = levels
    # Re-read before writing: the two parts may run as separate (even concurrent) processes,
    # and each must keep the other's results.
    latest = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.exists() else {}
    fresh_keys = (["speed", "default_mode", "opacus_overhead_ratio",
                   "opacus_overhead_ratio_paired_median", "best_opacus_mode_ratio"]
                  if do_speed else []) + (["utility"] if do_utility else []) + (
                      ["utility_levels"] if do_levels else [])
    latest.update({k: result[k] for k in ["machine", *fresh_keys]})
    RESULT_FILE.write_text(json.dumps(latest, indent=2))
    print(f"wrote {RESULT_FILE}")


if __name__ == "__main__":
    main()
