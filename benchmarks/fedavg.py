"""Aggregation of K replies of d float32 parameters: our WeightedFedAvg vs Flower's FedAvg.

Both strategies aggregate the same reply Messages in the same process, alternately, several
times; we report the median seconds and the peak extra memory of the call (tracemalloc: what
the aggregation allocates on top of the replies it receives), and the ratios ours/Flower.

    python benchmarks/fedavg.py            # K in {10, 100}, d in {1e5, 1e6}
    python benchmarks/fedavg.py --quick    # K in {10}, d in {1e5}
Writes benchmarks/results/fedavg.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fedstack.strategies.fedavg import WeightedFedAvg  # noqa: E402
from fedstack.strategies.model_layout import ModelLayout  # noqa: E402
from tests.reply_factory import array_record, train_reply  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "fedavg.json"


def model_shapes(d: int) -> dict[str, tuple[int, ...]]:
    """An MLP-like layout of about d parameters (several arrays of different sizes)."""
    hidden = max(8, int((d / 1.3) ** 0.5))
    first = d - hidden * hidden // 4 - hidden - hidden // 4 - 10 * (hidden // 4) - 10
    first_in = max(1, first // hidden)
    return {
        "fc1.weight": (hidden, first_in),
        "fc1.bias": (hidden,),
        "fc2.weight": (hidden // 4, hidden),
        "fc2.bias": (hidden // 4,),
        "out.weight": (10, hidden // 4),
        "out.bias": (10,),
    }


def make_replies(k: int, d: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list]:
    rng = np.random.default_rng(seed)
    shapes = model_shapes(d)
    ref = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    replies = [train_reply(i + 1, {n: rng.standard_normal(s, dtype=np.float32)
                                   for n, s in shapes.items()}, num_examples=int(10 + i))
               for i in range(k)]
    return ref, replies


def measure(fn) -> tuple[float, int]:
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del out
    return seconds, peak


def timed(fn) -> float:
    gc.collect()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_case(k: int, d: int, repeats: int) -> dict:
    ref, replies = make_replies(k, d)
    spec = ModelLayout.of(array_record(ref))

    def ours():
        strategy = WeightedFedAvg(max_num_examples=10**9)
        strategy._spec = spec
        return strategy.aggregate_train(1, replies)

    def flowers():
        return FedAvg().aggregate_train(1, replies)

    # correctness first: the two agree
    a, _ = ours()
    b, _ = flowers()
    max_diff = max(float(np.max(np.abs(a[n].numpy() - b[n].numpy()))) for n in ref)
    times = {"ours": [], "flower": []}
    for _ in range(repeats):  # alternate, so drift on a noisy machine hits both
        times["ours"].append(timed(ours))
        times["flower"].append(timed(flowers))
    _, peak_ours = measure(ours)
    _, peak_flower = measure(flowers)
    t_ours, t_flower = statistics.median(times["ours"]), statistics.median(times["flower"])
    params = sum(int(np.prod(s)) for s in model_shapes(d).values())
    return {
        "K": k, "d": params,
        "seconds_ours": t_ours, "seconds_flower": t_flower,
        "peak_bytes_ours": peak_ours, "peak_bytes_flower": peak_flower,
        "time_ratio_ours_over_flower": t_ours / t_flower,
        "memory_ratio_flower_over_ours": peak_flower / peak_ours,
        "max_abs_difference": max_diff,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    ks, ds = ([10], [100_000]) if args.quick else ([10, 100], [100_000, 1_000_000])
    rows = [bench_case(k, d, args.repeats) for d in ds for k in ks]
    header = (f"{'K':>4} {'d':>9} | {'ours s':>8} {'Flower s':>8} {'t ours/Fl':>9} | "
              f"{'ours MB':>8} {'Flower MB':>9} {'mem Fl/ours':>11} | {'max diff':>8}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['K']:>4} {r['d']:>9} | {r['seconds_ours']:>8.4f} {r['seconds_flower']:>8.4f} "
              f"{r['time_ratio_ours_over_flower']:>9.2f} | {r['peak_bytes_ours'] / 1e6:>8.2f} "
              f"{r['peak_bytes_flower'] / 1e6:>9.2f} {r['memory_ratio_flower_over_ours']:>11.2f}"
              f" | {r['max_abs_difference']:>8.1e}")
    target = next((r for r in rows if r["K"] == 100 and r["d"] >= 900_000), None)
    result = {
        "benchmark": "fedavg aggregation: fedstack WeightedFedAvg vs flwr FedAvg.aggregate_train",
        "machine": platform.platform(), "python": platform.python_version(),
        "repeats": args.repeats, "quick": args.quick, "cases": rows,
        "goal": "ours no slower and >= 2x less peak memory at K=100, d=1e6",
    }
    if target is not None:
        result["goal_met"] = bool(target["time_ratio_ours_over_flower"] <= 1.0
                                  and target["memory_ratio_flower_over_ours"] >= 2.0)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
