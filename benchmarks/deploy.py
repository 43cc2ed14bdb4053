"""Seconds per round in a real deployment (SuperLink + 3 SuperNodes, TLS, node auth).

One local deployment (fedstack.deploy.local) runs fedavg, secagg and he side by side on the
same task and settings; per round it reads the run's history (seconds per stage, exchanges)
and, from the SuperNodes' timestamped logs, where an exchange's time goes (polling and
transfer vs the ClientApp process). It also times the imports a fresh ClientApp process pays
for every message. Writes benchmarks/results/deploy.json.

    python benchmarks/deploy.py            # 3 rounds each (~8-10 min on 2 cores)
    python benchmarks/deploy.py --quick    # 2 rounds each, fedavg and secagg only
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedstack.deploy.local import LocalDeployment, venv_bin

RESULTS = Path(__file__).resolve().parent / "results" / "deploy.json"
NUM_NODES = 3
BASE_RUN = {"task": "breast_cancer", "partition": "iid"}
#: Central evaluation only (no federated-evaluate exchange): the round is the protocol's own
#: exchanges. HE cannot evaluate centrally, so its rounds carry no evaluation at all here.
BASE_OVERRIDES = ["num_clients=3", "min_train_nodes=3", "min_evaluate_nodes=2",
                  "round_timeout=120", "fraction_evaluate=0"]
#: Modules a ClientApp process imports; each timed in a fresh interpreter.
IMPORTS = ["flwr.clientapp", "fedstack.config", "fedstack.strategies.client_mods",
           "fedstack.strategies.secagg.mod", "fedstack.strategies.he.mod", "torch",
           "fedstack.client_app"]
HEAVY = ("torch", "tenseal", "opacus")
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) (.*)$")


def time_imports(repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Median seconds to import each module in a fresh process, and which heavy libs it pulls."""
    out: dict[str, dict[str, Any]] = {}
    code = ("import sys, time; t = time.perf_counter(); import {m}; "
            "print(time.perf_counter() - t, *[h for h in {heavy!r} if h in sys.modules])")
    for module in IMPORTS:
        times, heavy = [], []
        for _ in range(repeats):
            proc = subprocess.run([sys.executable, "-c", code.format(m=module, heavy=HEAVY)],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode != 0:
                times = []
                heavy = [f"import failed: {proc.stderr.strip().splitlines()[-1]}"]
                break
            fields = proc.stdout.split()
            times.append(float(fields[0]))
            heavy = fields[1:]
        out[module] = {"seconds": round(statistics.median(times), 3) if times else None,
                       "pulls": heavy}
    return out


def _clock(text: str) -> float:
    t = datetime.strptime(text, "%H:%M:%S.%f")
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def supernode_timings(log_dir: Path, since: float) -> dict[str, float | int | None]:
    """Median seconds per message on a SuperNode: received -> ClientApp started -> reply sent."""
    to_start, in_app = [], []
    for path in sorted(log_dir.glob("supernode-*.log")):
        received = started = None
        for line in path.read_text(errors="replace").splitlines():
            match = STAMP.match(line)
            if not match:
                continue
            t = _clock(match.group(1))
            if t < since:
                continue
            body = match.group(2)
            if "Received successfully" in body:
                received, started = t, None
            elif "Start `flwr-clientapp` process" in body and received is not None:
                started = t
                to_start.append(started - received)
            elif "Sending:" in body and started is not None:
                in_app.append(t - started)
                received = started = None
    return {"messages": len(in_app),
            "median_receive_to_clientapp_s": round(statistics.median(to_start), 2)
            if to_start else None,
            "median_clientapp_s": round(statistics.median(in_app), 2) if in_app else None}


def run_one(dep: LocalDeployment, aggregation: str, rounds: int,
            extra: list[str]) -> dict[str, Any]:
    since = _clock(time.strftime("%H:%M:%S") + ".000")
    result = dep.run({**BASE_RUN, "aggregation": aggregation},
                     [*BASE_OVERRIDES, f"num_rounds={rounds}", *extra],
                     run_name=f"bench-{aggregation}-{int(time.time())}", timeout=1200)
    if result.summary is None:
        raise RuntimeError(f"{aggregation} run failed:\n{result.log[-3000:]}")
    rows = [r for r in result.history if r["round"] >= 1]
    per_round = [round(sum(r["seconds"].values()), 2) for r in rows]
    steady = per_round[1:] or per_round
    return {
        "seconds_per_round": round(statistics.median(steady), 2),
        "round_seconds": per_round,
        "exchanges_per_round": [r["exchanges"] for r in rows],
        "run_wall_s": round(result.seconds, 1),
        "final_accuracy": result.summary.get("final_accuracy"),
        "bytes_up_per_round": rows[-1]["bytes_up"],
        "bytes_down_per_round": rows[-1]["bytes_down"],
        "supernode": supernode_timings(dep.logs_dir, since),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 rounds, fedavg and secagg")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    aggregations = ["fedavg", "secagg"] if args.quick else ["fedavg", "secagg", "he"]

    imports = time_imports()
    results: dict[str, Any] = {}
    started = time.time()
    with LocalDeployment(args.work_dir, num_supernodes=NUM_NODES) as dep:
        he_extra: list[str] = []
        if "he" in aggregations:
            keys = dep.work_dir / "he-keys"
            subprocess.run([str(venv_bin() / "fedstack"), "keys", "--out", str(keys)],
                           check=True, capture_output=True, timeout=120)
            he_extra = [f"aggregation.public_context={keys / 'he_public.ckks'}",
                        f"aggregation.secret_context={keys / 'he_secret.ckks'}"]
        dep.wait_for_nodes(NUM_NODES)
        for aggregation in aggregations:
            extra = he_extra if aggregation == "he" else []
            results[aggregation] = run_one(dep, aggregation, rounds, extra)
            print(f"{aggregation}: {results[aggregation]['seconds_per_round']} s/round",
                  flush=True)

    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() \
        else []
    payload: dict[str, Any] = {
        "setup": {"supernodes": NUM_NODES, "task": "breast_cancer", "rounds": rounds,
                  "tls": True, "node_auth": True, "fraction_evaluate": 0,
                  "load_average_at_end": load, "wall_s": round(time.time() - started, 1)},
        **{f"{agg}_seconds_per_round": results[agg]["seconds_per_round"] for agg in results},
        "ratio_secagg_over_fedavg": round(results["secagg"]["seconds_per_round"]
                                          / results["fedavg"]["seconds_per_round"], 2),
        "runs": results,
        "clientapp_imports": imports,
    }
    if "he" in results:
        payload["ratio_he_over_fedavg"] = round(results["he"]["seconds_per_round"]
                                                / results["fedavg"]["seconds_per_round"], 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2) + "\n")

    print(f"\n{'aggregation':<12}{'s/round':>10}{'exchanges':>11}{'round 1 s':>11}"
          f"{'msg->app s':>12}{'app s':>8}{'accuracy':>10}")
    for agg, r in results.items():
        acc = r["final_accuracy"]
        print(f"{agg:<12}{r['seconds_per_round']:>10.1f}{r['exchanges_per_round'][-1]:>11}"
              f"{r['round_seconds'][0]:>11.1f}"
              f"{r['supernode']['median_receive_to_clientapp_s'] or 0:>12.1f}"
              f"{r['supernode']['median_clientapp_s'] or 0:>8.1f}"
              f"{(acc if acc is not None else float('nan')):>10.3f}")
    print(f"ratio secagg/fedavg: {payload['ratio_secagg_over_fedavg']}")
    print("\nClientApp imports (fresh process, median s):")
    for module, info in imports.items():
        print(f"  {module:<36}{info['seconds'] if info['seconds'] is not None else '-':>8}"
              f"  pulls {', '.join(info['pulls']) or '-'}")
    print(f"\nwrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
