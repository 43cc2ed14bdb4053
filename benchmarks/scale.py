"""The privacy layers at real sizes: ResNet-18-GN (11.2M parameters) and d = 1e6.

Sections (`--sections`, default all that run here):

- `bk`: DP-SGD on the ResNet-18-GN (task=synthetic_cifar, 3x32x32, batch 32): per-epoch time
  of no DP vs our book-keeping clipper (`bk`) vs Opacus's modes, interleaved in one process
  (round-robin, repeated; the runners of benchmarks/dp.py), and each mode's peak memory
  (maximum RSS of a fresh process running one epoch, minus that process's RSS before it).
  Goal: bk <= 1.5x non-private time and <= 2x its memory.
- `rounds`: one whole round of fedavg, secagg, he and dp=local on the ResNet-18-GN with 5
  clients through Flower's simulation runtime (`run_in_simulation`; round 2 is timed, round 1
  pays the runtime's start-up): seconds and bytes per round, ratio to fedavg.
- `he` and `secagg`: the HE server aggregation (benchmarks/he.py, section `scale`) and the
  secure aggregation protocol core at 100-1000 clients (benchmarks/secagg.py, `--scale`) have
  their own scripts, which measure their baselines side by side; this script copies their
  latest results (with the file they came from) into scale.json's `goals`.

Results: benchmarks/results/scale.json (each section updates its own key).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

RESULTS = REPO / "benchmarks" / "results"
RESULT_FILE = RESULTS / "scale.json"
#: The big model and its data (conf/task/synthetic_cifar.yaml).
MODEL = "resnet18_gn"
SHAPE = (3, 32, 32)
CLASSES = 10
BATCH = 32
#: Examples per DP timing epoch (4 steps of 32).
EPOCH_EXAMPLES = 128
#: Opacus modes timed on the big model (functorch and hooks materialise 32 x 11M per-sample
#: gradients, 1.4 GB each, and are the slowest here; ew and ghost are Opacus's fast paths).
OPACUS_MODES_AT_SCALE = ("hooks", "ew", "ghost")
#: Round benchmark: 5 clients, a pool small enough for a couple of local steps each.
ROUND_CLIENTS = 5
ROUND_OVERRIDES = ["task=synthetic_cifar", "task.num_samples=400", "partition=iid",
                   f"num_clients={ROUND_CLIENTS}", "num_rounds=2", "task.local_epochs=1",
                   "fraction_evaluate=0", "min_evaluate_nodes=0"]
ROUND_STACKS = {
    "fedavg": ["aggregation=fedavg"],
    "secagg": ["aggregation=secagg"],
    "he": ["aggregation=he"],
    "dp_local": ["aggregation=fedavg", "dp=local", "dp.noise_multiplier=1.0",
                 "dp.target_epsilon=null"],
}
#: Seconds between resident-size samples while an epoch runs.
MEMORY_SAMPLE_S = 0.001
#: Goals of issue 14.
BK_TIME_GOAL = 1.5
BK_MEMORY_GOAL = 2.0
HE_SPEEDUP_GOAL = 10.0


def _dataset(n: int) -> Any:
    import torch
    from torch.utils.data import TensorDataset

    from fedstack.task.synthetic import generate_images

    x, y = generate_images(n, CLASSES, SHAPE[0], SHAPE[1], 1.0, seed=0)
    return TensorDataset(torch.from_numpy(x.astype("float32")), torch.from_numpy(y))


def _runner(mode: str, data: Any) -> Any:
    from dp import _DPRunner, _PlainRunner

    from fedstack.task.models import build_model

    model = build_model(MODEL, SHAPE, CLASSES, 0)
    if mode == "no_dp":
        return _PlainRunner(model, data, BATCH)
    return _DPRunner(model, data, BATCH, mode, epochs=1000)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_memory_child(mode: str) -> None:
    """One epoch of `mode` in this (fresh) process; prints the peak RSS it added, in MB.

    The baseline is the resident size just before the epoch (model, data and the DP set-up
    built); a thread samples the resident size every millisecond during the epoch. What the
    epoch allocates and keeps (bk's workspaces, the optimizer's momentum) counts too.
    """
    import threading

    data = _dataset(EPOCH_EXAMPLES)
    runner = _runner(mode, data)
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(MEMORY_SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    runner.epoch()
    done.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_mb())
    print(json.dumps({"mode": mode, "peak_added_mb": peak[0] - before,
                      "peak_rss_mb": peak[0],
                      "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def _peak_memory(mode: str) -> dict[str, float]:
    proc = subprocess.run([sys.executable, __file__, "--memory-child", mode],
                          capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_bk(reps: int, warmup: int) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    data = _dataset(EPOCH_EXAMPLES)
    modes = ["no_dp", "bk", *OPACUS_MODES_AT_SCALE]
    runners = {m: _runner(m, data) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(reps + warmup):
        order = modes if rep % 2 == 0 else list(reversed(modes))
        for m in order:
            start = time.perf_counter()
            runners[m].epoch()
            if rep >= warmup:
                times[m].append(time.perf_counter() - start)
    del runners
    memory = {m: _peak_memory(m) for m in modes}
    base_min, base_med = min(times["no_dp"]), statistics.median(times["no_dp"])
    out: dict[str, Any] = {"model": MODEL, "params": 11_173_962, "batch_size": BATCH,
                           "epoch_examples": EPOCH_EXAMPLES, "reps": reps, "modes": {}}
    for m in modes:
        out["modes"][m] = {
            "epoch_s_min": min(times[m]), "epoch_s_median": statistics.median(times[m]),
            "ratio_vs_no_dp": min(times[m]) / base_min,
            "ratio_vs_no_dp_median": statistics.median(times[m]) / base_med,
            "ratio_vs_no_dp_paired_median": statistics.median(
                t / b for t, b in zip(times[m], times["no_dp"], strict=True)),
            "peak_added_mb": memory[m]["peak_added_mb"],
            "memory_ratio_vs_no_dp": memory[m]["peak_added_mb"]
            / max(memory["no_dp"]["peak_added_mb"], 1e-9),
        }
    out["fastest_opacus_mode"] = min(OPACUS_MODES_AT_SCALE,
                                     key=lambda m: out["modes"][m]["epoch_s_min"])
    return out


def print_bk(result: dict[str, Any]) -> None:
    print(f"\nDP-SGD on {result['model']} ({result['params']:,} params), batch "
          f"{result['batch_size']}, {result['epoch_examples']} examples per epoch, "
          f"best of {result['reps']}")
    print(f"{'mode':>8} | {'epoch s':>8} | {'x no DP':>8} | {'paired':>7} | {'peak MB':>8} | "
          f"{'mem x':>6}")
    for m, r in result["modes"].items():
        print(f"{m:>8} | {r['epoch_s_min']:8.3f} | {r['ratio_vs_no_dp']:8.2f} | "
              f"{r['ratio_vs_no_dp_paired_median']:7.2f} | {r['peak_added_mb']:8.0f} | "
              f"{r['memory_ratio_vs_no_dp']:6.2f}")


def bench_rounds() -> dict[str, Any]:
    from fedstack.cli import run_in_simulation
    from fedstack.config import compose_config

    out: dict[str, Any] = {}
    base = Path(tempfile.mkdtemp(prefix="fedstack-scale-rounds-"))
    for name, extra in ROUND_STACKS.items():
        cfg = compose_config([*ROUND_OVERRIDES, *extra, f"output_dir={base}",
                              f"run_name={name}"])
        started = time.perf_counter()
        summary = run_in_simulation(cfg)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in
                (base / name / "history.jsonl").read_text().splitlines()]
        last = next(r for r in rows if r["round"] == 2)
        out[name] = {
            "status": summary["status"],
            "round_s": sum(last["seconds"].values()),
            "seconds": last["seconds"],
            "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"],
            "exchanges": last["exchanges"], "run_wall_s": wall,
        }
    for r in out.values():
        r["round_time_vs_fedavg"] = r["round_s"] / out["fedavg"]["round_s"]
        r["bytes_up_vs_fedavg"] = r["bytes_up"] / out["fedavg"]["bytes_up"]
    return {"clients": ROUND_CLIENTS, "overrides": ROUND_OVERRIDES, "stacks": out}


def print_rounds(result: dict[str, Any]) -> None:
    print(f"\nOne round (round 2) on {MODEL}, {result['clients']} clients, Ray simulation")
    print(f"{'stack':>8} | {'round s':>8} | {'x fedavg':>8} | {'MB up':>8} | {'MB down':>8} | "
          f"{'up x':>5} | exch")
    for name, r in result["stacks"].items():
        print(f"{name:>8} | {r['round_s']:8.2f} | {r['round_time_vs_fedavg']:8.2f} | "
              f"{r['bytes_up'] / 1e6:8.1f} | {r['bytes_down'] / 1e6:8.1f} | "
              f"{r['bytes_up_vs_fedavg']:5.2f} | {r['exchanges']}")


def collected_goals(result: dict[str, Any]) -> dict[str, Any]:
    """The issue's goal keys, from this run's sections and the HE/secagg scripts' results."""
    goals: dict[str, Any] = dict(result.get("goals", {}))
    if "bk" in result:
        bk = result["bk"]["modes"]["bk"]
        goals["bk_resnet18gn_time_ratio"] = bk["ratio_vs_no_dp"]
        goals["bk_resnet18gn_time_ratio_paired_median"] = bk["ratio_vs_no_dp_paired_median"]
        goals["bk_resnet18gn_memory_ratio"] = bk["memory_ratio_vs_no_dp"]
        goals["bk_resnet18gn_met"] = (bk["ratio_vs_no_dp"] <= BK_TIME_GOAL
                                      and bk["memory_ratio_vs_no_dp"] <= BK_MEMORY_GOAL)
    he_file, secagg_file = RESULTS / "he.json", RESULTS / "secagg.json"
    if he_file.exists():
        he = json.loads(he_file.read_text()).get("aggregate_at_scale")
        if he:
            per_size = {d: next(r["speedup_vs_nvflare"] for r in size["rows"]
                                if r["scheme"] == "ours")
                        for d, size in he["sizes"].items()}
            goals["he_aggregate_speedup_vs_nvflare"] = min(per_size.values())
            goals["he_aggregate_speedup_vs_nvflare_per_d"] = per_size
            goals["he_aggregate_met"] = min(per_size.values()) >= HE_SPEEDUP_GOAL
            goals["he_aggregate_source"] = "benchmarks/results/he.json aggregate_at_scale"
    if secagg_file.exists():
        scale = json.loads(secagg_file.read_text()).get("scale")
        if scale:
            goals["secagg_1000_server_s"] = scale["goal"]["server_s"]
            goals["secagg_1000_client_s"] = scale["goal"]["client_s"]
            goals["secagg_1000_met"] = scale["goal"]["met"]
            goals["secagg_source"] = "benchmarks/results/secagg.json scale"
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="bk,rounds",
                        help="comma-separated: bk, rounds (he and secagg: see their scripts)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        _peak_memory_child(args.memory_child)
        return
    sections = set(args.sections.split(","))
    RESULTS.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.exists() else {}
    import torch

    result["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if "bk" in sections:
        result["bk"] = bench_bk(*((3, 1) if args.quick else (7, 1)))
        print_bk(result["bk"])
    if "rounds" in sections:
        result["rounds"] = bench_rounds()
        print_rounds(result["rounds"])
    result["goals"] = collected_goals(result)
    print("\ngoals: " + json.dumps(result["goals"], indent=1))
    RESULT_FILE.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULT_FILE}")


if __name__ == "__main__":
    main()
