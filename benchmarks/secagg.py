"""Secure-aggregation benchmark: Shamir vs PyCryptodome, protocol core cost, Flower rounds.

Sections (all measured side by side in this one run):
  shamir   split + reconstruct of a 256-bit secret, ours vs PyCryptodome's
           (``Crypto.Protocol.SecretSharing.Shamir``, 16-byte secrets, looped over the two
           chunks of the secret as Flower's SecAgg+ does) and Flower's own helpers.
  core     the protocol core with simulated parties (no Flower): per-client and server
           seconds per round, complete vs sparse graph, with dropouts.
  flower   (phase 2) rounds through Flower's simulation runtime.

Prints a table per section and writes benchmarks/results/secagg.json.
Usage: python benchmarks/secagg.py [--quick] [--sections shamir,core,flower]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedstack.crypto import shamir  # noqa: E402
from fedstack.crypto.quantise import FixedPointCodec, auto_scale  # noqa: E402
from fedstack.strategies.secagg.params import ProtocolParams  # noqa: E402
from fedstack.strategies.secagg.simulate import SimulatedFederation  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "secagg.json"
SHAMIR_SIZES = [(100, 51), (500, 251)]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shamir(quick: bool) -> dict:
    from Crypto.Protocol.SecretSharing import Shamir
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    rows = {}
    for n, t in SHAMIR_SIZES:
        secret = os.urandom(32)
        sec = np.frombuffer(secret, np.uint8).reshape(1, 32)
        picked = np.arange(t)

        def ours_cold(sec=sec, n=n, t=t, picked=picked):
            shamir.clear_lagrange_cache()
            shares = shamir.split(sec, n, t)
            assert shamir.reconstruct(picked + 1, shares[:, picked]).tobytes() == secret

        def ours_warm(sec=sec, n=n, t=t, picked=picked):
            shares = shamir.split(sec, n, t)
            assert shamir.reconstruct(picked + 1, shares[:, picked]).tobytes() == secret

        def pycryptodome(secret=secret, n=n, t=t):
            chunks = [secret[:16], secret[16:]]
            per_chunk = [Shamir.split(t, n, c) for c in chunks]
            rec = b"".join(Shamir.combine(sh[:t]) for sh in per_chunk)
            assert rec == secret

        def flower(secret=secret, n=n, t=t):
            assert combine_shares(create_shares(secret, t, n)[:t]) == secret

        reps_fast = 5 if quick else 20
        reps_slow = 1 if (quick or n > 100) else 3
        ours_c = _median_time(ours_cold, reps_fast)
        ours_w = _median_time(ours_warm, reps_fast)
        pyc = _median_time(pycryptodome, reps_slow)
        flw = _median_time(flower, reps_slow)
        rows[f"n={n},t={t}"] = {
            "ours_s": ours_c, "ours_cached_lagrange_s": ours_w, "pycryptodome_s": pyc,
            "flower_create_combine_s": flw, "speedup_vs_pycryptodome": pyc / ours_c,
            "speedup_cached_vs_pycryptodome": pyc / ours_w}
    print("\n== Shamir split + reconstruct of a 256-bit secret (median seconds) ==")
    print(f"{'size':<14}{'ours':>10}{'ours(cached)':>14}{'pycryptodome':>14}{'flwr':>10}{'speed-up':>10}")
    for k, r in rows.items():
        print(f"{k:<14}{r['ours_s']:>10.5f}{r['ours_cached_lagrange_s']:>14.5f}{r['pycryptodome_s']:>14.4f}"
              f"{r['flower_create_combine_s']:>10.4f}{r['speedup_vs_pycryptodome']:>9.0f}x")
    return rows


def bench_core(quick: bool) -> dict:
    """Protocol core with simulated parties: where the per-round CPU goes."""
    configs = [(20, 100_000), (100, 100_000)] if not quick else [(20, 20_000)]
    rows = {}
    for n, d in configs:
        codec = FixedPointCodec(32, 4.0, auto_scale(32, 4.0, 1000, 1000), 1000, 1000)
        rng = np.random.default_rng(0)
        inputs = {u: (rng.normal(size=d), 100) for u in range(1, n + 1)}
        for graph in ("complete", "sparse"):
            for drop_frac in (0.0, 0.1):
                params = ProtocolParams(codec, graph=graph, threshold=0.6)
                fed = SimulatedFederation(params, list(inputs))
                dropped = set(list(inputs)[: int(drop_frac * n)])
                t0 = time.perf_counter()
                fed.run_round(1, inputs, drop={"masked-input": dropped})
                total = time.perf_counter() - t0
                rows[f"n={n},d={d},{graph},drop={drop_frac:.0%}"] = {
                    "seconds_all_parties": total, "seconds_per_client_avg": total / n,
                    "degree": params.degree(n), "threshold": params.round_threshold(n)}
    print("\n== Protocol core, simulated parties in one process (all parties + server, one round) ==")
    print(f"{'config':<40}{'k':>5}{'t':>5}{'total s':>10}{'s/client':>10}")
    for k, r in rows.items():
        print(f"{k:<40}{r['degree']:>5}{r['threshold']:>5}{r['seconds_all_parties']:>10.3f}"
              f"{r['seconds_per_client_avg']:>10.4f}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (~1 min)")
    ap.add_argument("--sections", default="shamir,core,flower")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    out: dict = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
                 "quick": args.quick}
    if "shamir" in sections:
        out["shamir"] = bench_shamir(args.quick)
        out["shamir_speedup_vs_pycryptodome"] = out["shamir"]["n=100,t=51"]["speedup_vs_pycryptodome"]
    if "core" in sections:
        out["core"] = bench_core(args.quick)
    if "flower" in sections:
        try:
            from benchmarks_secagg_flower import bench_flower  # type: ignore[import-not-found]
        except ImportError:
            print("\n(flower section not available yet)")
        else:
            out.update(bench_flower(args.quick))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
