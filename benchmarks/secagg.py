"""Secure-aggregation benchmark: Shamir, protocol core, and rounds against plain FedAvg and
Flower's SecAgg+ -- all measured side by side in one run.

Sections:
  shamir  split + reconstruct of a 256-bit secret at (n=100, t=51) and (n=500, t=251): ours vs
          PyCryptodome's ``Crypto.Protocol.SecretSharing.Shamir`` (16-byte secrets, looped over
          the secret's two chunks as Flower's SecAgg+ does) and Flower's own helpers.
  core    the protocol core with simulated parties (no Flower) at 20 and 100 clients.
  rounds  plain WeightedFedAvg, ours (complete and sparse graph) and Flower's
          SecAggPlusWorkflow (legacy API + secaggplus_mod) through their real strategies and
          client mods, in process (the lead's InProcessGrid, each message deep-copied as over a
          wire), d = 1e5 / 1e6 parameters, 5 / 20 clients, 0% / 20% dropout (the masked-input
          reply of 20% of the clients is lost every round). Training is a cheap stand-in, so
          the seconds are what each protocol adds. Headline: ratio_ours_over_plain and
          ratio_flower_over_ours at 5 clients, d = 1e5, 0% dropout.
  ray     5 clients, the digits CNN (85k parameters) with real local training, through Flower's
          simulation runtime (Ray); medians of rounds 2.. (round 1 pays Ray's start-up).
          ray_ratio_* keys. Skipped with --quick.
  scale   (only with --scale or --sections scale) one round of the protocol core at 100, 300 and
          1000 clients x d = 1e6, SecAgg+ graph, 10% of the clients dropping after sharing (the
          server must rebuild their mask keys and expand their pairwise masks): every client
          runs its real stages, every masked input goes to the real server, the unmasked sum is
          checked bit for bit. Per-client seconds (median over survivors of the time spent in
          their own stages), server seconds, traced peak memory, and least-squares fits of the
          growth. Plus one complete-graph round at 100 clients for contrast. Key "scale".
  malicious (only with --malicious or --sections malicious) aggregation.security=malicious
          against semi-honest in the same run, same in-process workload (5 clients, d = 1e5,
          complete and sparse graph, 5 rounds): exchanges per steady-state round (counted per
          round by the strategy), seconds per round (median of rounds 2..), bytes per client
          per round. Key "malicious" (exchanges_per_steady_round,
          ratio_over_semi_honest_inprocess).
          With --deploy: also a real deployment (fedstack.deploy.local: SuperLink + 3
          SuperNodes, TLS, node authentication, each node pinning its own identity and the
          roster), runs in ABBA order (semi-honest, malicious, malicious, semi-honest),
          breast_cancer, real training, central
          evaluation only; seconds per steady round (median of rounds 2..) from the runs'
          history: ratio_over_semi_honest_deploy. ~12-15 min on 2 cores: take the heavy lock.

Prints a table per section and writes its keys into benchmarks/results/secagg.json (the keys
of sections not run are kept).
Usage: python benchmarks/secagg.py [--quick] [--sections shamir,core,rounds,ray] [--scale]
       [--malicious [--deploy]]
Default run ~7-10 min on 2 busy cores (Ray start-up dominates its last section); --quick ~1 min;
--scale alone ~5 min (each size runs twice: untraced for time, traced for memory).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from copy import deepcopy
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedstack.crypto import shamir  # noqa: E402
from fedstack.crypto.quantise import FixedPointCodec, auto_scale  # noqa: E402
from fedstack.strategies.secagg.params import ProtocolParams  # noqa: E402
from fedstack.strategies.secagg.simulate import (  # noqa: E402
    SERVER,
    Meter,
    SimulatedFederation,
)

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

        def ours_cold(sec=sec, n=n, t=t, picked=picked, secret=secret):
            shamir.clear_lagrange_cache()
            shares = shamir.split(sec, n, t)
            assert shamir.reconstruct(picked + 1, shares[:, picked]).tobytes() == secret

        def ours_warm(sec=sec, n=n, t=t, picked=picked, secret=secret):
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
            "ours_s": ours_c,
            "ours_cached_lagrange_s": ours_w,
            "pycryptodome_s": pyc,
            "flower_create_combine_s": flw,
            "speedup_vs_pycryptodome": pyc / ours_c,
            "speedup_cached_vs_pycryptodome": pyc / ours_w,
        }
    print("\n== Shamir split + reconstruct of a 256-bit secret (median seconds) ==")
    print(
        f"{'size':<14}{'ours':>10}{'ours(cached)':>14}{'pycryptodome':>14}{'flwr':>10}{'speed-up':>10}"
    )
    for k, r in rows.items():
        print(
            f"{k:<14}{r['ours_s']:>10.5f}{r['ours_cached_lagrange_s']:>14.5f}{r['pycryptodome_s']:>14.4f}"
            f"{r['flower_create_combine_s']:>10.4f}{r['speedup_vs_pycryptodome']:>9.0f}x"
        )
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
                    "seconds_all_parties": total,
                    "seconds_per_client_avg": total / n,
                    "degree": params.degree(n),
                    "threshold": params.round_threshold(n),
                }
    print(
        "\n== Protocol core, simulated parties in one process (all parties + server, one round) =="
    )
    print(f"{'config':<40}{'k':>5}{'t':>5}{'total s':>10}{'s/client':>10}")
    for k, r in rows.items():
        print(
            f"{k:<40}{r['degree']:>5}{r['threshold']:>5}{r['seconds_all_parties']:>10.3f}"
            f"{r['seconds_per_client_avg']:>10.4f}"
        )
    return rows


# ------------------------------------------------------------------ rounds through Flower

DROP_FRACTION = 0.2
SYNTH_WEIGHT_BASE = 100  # n_k = 100 + partition id (below Flower's default max_weight=1000)
SYSTEMS = ("plain", "ours-complete", "ours-sparse", "flower-secagg+")


def _counting_grid_cls():
    from flwr.app import Message

    from fedstack.strategies.round_log import payload_bytes
    from tests.inprocess_grid import RUN_ID, InProcessGrid

    class CountingGrid(InProcessGrid):
        """The lead's in-process Grid, counting exchanges and payload bytes both ways."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.exchanges = 0
            self.bytes_down = 0
            self.bytes_up = 0

        @property
        def run(self):  # Flower's legacy client manager reads grid.run.run_id
            return SimpleNamespace(run_id=RUN_ID)

        def send_and_receive(self, messages, *, timeout=None):
            """Each client gets its own copy of the content (as over a real transport: Flower's
            SecAgg+ workflow shares one ConfigRecord between messages and its client mod pops
            keys from it); `lose(node, message)` decides, before delivery, whose reply is lost."""
            messages = list(messages)
            self.exchanges += 1
            self.bytes_down += sum(payload_bytes(m.content) for m in messages)
            replies = []
            for m in messages:
                lost = self.lose(m.metadata.dst_node_id, m)
                copy = Message(
                    deepcopy(m.content),
                    dst_node_id=m.metadata.dst_node_id,
                    message_type=m.metadata.message_type,
                    group_id=m.metadata.group_id,
                )
                got = list(super().send_and_receive([copy], timeout=timeout))
                if not lost:
                    replies.extend(got)
            self.bytes_up += sum(payload_bytes(r.content) for r in replies if not r.has_error())
            return replies

        @staticmethod
        def lose(node: int, message) -> bool:
            return False

    return CountingGrid


def _synthetic_train(msg, context):
    """Stand-in for local training: a cheap deterministic change of every weight, so that the
    timings isolate what each aggregation protocol adds."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    pid = int(context.node_config["partition-id"])
    arrays = msg.content["arrays"]
    out = ArrayRecord({k: Array(arrays[k].numpy() + np.float32(1e-3 * (pid + 1))) for k in arrays})
    return Message(
        RecordDict(
            {
                "arrays": out,
                "metrics": MetricRecord(
                    {
                        "num-examples": SYNTH_WEIGHT_BASE + pid,
                        "train-loss": 0.0,
                        "partition-id": pid,
                    }
                ),
            }
        ),
        reply_to=msg,
    )


def _fedstack_client_app():
    from flwr.clientapp import ClientApp

    from fedstack.strategies.client_mods import protocol_mod

    app = ClientApp()
    app.train(mods=[protocol_mod])(_synthetic_train)
    return app


def _flower_client_app():
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod

    class SyntheticClient(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):
            return (
                [p + np.float32(1e-3 * (self.pid + 1)) for p in parameters],
                SYNTH_WEIGHT_BASE + self.pid,
                {},
            )

    def client_fn(context):
        return SyntheticClient(int(context.node_config["partition-id"])).to_client()

    return ClientApp(client_fn=client_fn, mods=[secaggplus_mod])


def _dropped(n: int) -> set[int]:
    """Node ids (InProcessGrid numbers them 101..) that lose their masked-input/train reply."""
    return {101 + i for i in range(math.ceil(DROP_FRACTION * n))}


def _run_fedstack(
    system: str,
    n: int,
    d: int,
    drop: bool,
    rounds: int,
    tmp: Path,
    security: str = "semi-honest",
) -> dict:
    from flwr.app import Array, ArrayRecord, ConfigRecord

    from fedstack.config import CONFIG_MESSAGE_KEY, compose_config, config_to_yaml
    from fedstack.strategies import build_strategy

    overrides = [
        f"num_clients={n}",
        "fraction_evaluate=0.0",
        "min_evaluate_nodes=0",
        f"output_dir={tmp}",
        f"num_rounds={rounds}",
    ]
    overrides += (
        ["aggregation=fedavg"]
        if system == "plain"
        else [
            "aggregation=secagg",
            f"aggregation.graph={system.split('-')[1]}",
            f"aggregation.security={security}",
        ]
    )
    cfg = compose_config(overrides)
    grid = _counting_grid_cls()(_fedstack_client_app(), num_nodes=n)
    lost = _dropped(n) if drop else set()
    grid.lose = lambda node, msg: node in lost and "arrays" in msg.content.array_records
    strategy = build_strategy(cfg, tmp)
    stamps: list[float] = []
    exchanges: list[int] = []

    class Clock:
        def on_round_end(self, round_log, arrays) -> None:
            stamps.append(time.perf_counter())
            exchanges.append(round_log.exchanges)

    config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg)})
    start = time.perf_counter()
    strategy.start(
        grid,
        ArrayRecord({"w": Array(np.zeros(d, np.float32))}),
        num_rounds=rounds,
        train_config=config,
        evaluate_config=config,
        recorder=Clock(),
    )
    per_round = np.diff([start, *stamps])
    out = _cost(grid, n, rounds, per_round)
    out["exchanges_by_round"] = exchanges
    if system != "plain":
        out["secagg_degree"] = strategy.params.degree(n)
    return out


def _run_flower(n: int, d: int, drop: bool, rounds: int, threshold: int) -> dict:
    from flwr.app import Context, RecordDict
    from flwr.common import ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    grid = _counting_grid_cls()(_flower_client_app(), num_nodes=n)
    lost = _dropped(n) if drop else set()

    def lose(node, msg) -> bool:
        record = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        return (
            node in lost
            and record is not None
            and record.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS
        )

    grid.lose = lose
    stamps: list[float] = []
    secagg = SecAggPlusWorkflow(num_shares=n, reconstruction_threshold=threshold, timeout=60.0)

    def timed_fit(grid_, context_) -> None:
        secagg(grid_, context_)
        stamps.append(time.perf_counter())

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n - len(lost),
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([np.zeros(d, np.float32)]),
    )
    context = LegacyContext(
        context=Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=rounds),
        strategy=strategy,
    )
    start = time.perf_counter()
    DefaultWorkflow(fit_workflow=timed_fit)(grid, context)
    per_round = np.diff([start, *stamps])
    return _cost(grid, n, rounds, per_round)


def _cost(grid, n: int, rounds: int, per_round: np.ndarray) -> dict:
    return {
        "seconds_per_round": float(np.mean(per_round)),
        "seconds_first_round": float(per_round[0]),
        "seconds_later_rounds": float(np.median(per_round[1:])) if len(per_round) > 1 else None,
        "exchanges_per_round": grid.exchanges / rounds,
        "bytes_down_per_client_round": grid.bytes_down / n / rounds,
        "bytes_up_per_client_round": grid.bytes_up / n / rounds,
    }


def bench_rounds(quick: bool) -> dict:
    """Every system on the same synthetic workload, in process (lead's InProcessGrid)."""
    import logging
    import tempfile

    logging.getLogger("flwr").setLevel(logging.WARNING)
    sizes = [100_000] if quick else [100_000, 1_000_000]
    clients = [5] if quick else [5, 20]
    rounds = 2 if quick else 3
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for system in SYSTEMS:  # warm-up: imports, config parsing, first-call caches
            if system == "flower-secagg+":
                _run_flower(5, 1000, False, 2, 3)
            else:
                _run_fedstack(system, 5, 1000, False, 2, Path(tmp))
        for d in sizes:
            for n in clients:
                for drop in (False, True):
                    t = math.ceil(0.6 * n)
                    for system in SYSTEMS:
                        key = f"{system},n={n},d={d},drop={int(100 * DROP_FRACTION * drop)}%"
                        if system == "flower-secagg+":
                            rows[key] = _run_flower(n, d, drop, rounds, t)
                        else:
                            rows[key] = _run_fedstack(system, n, d, drop, rounds, Path(tmp))
                        print(f"  {key}: {rows[key]['seconds_per_round']:.3f} s/round", flush=True)
    print(
        "\n== Rounds in process, synthetic training "
        "(mean s/round incl. round 1; bytes per client per round) =="
    )
    header = ("system,config", "s/round", "round 1", "later", "exch", "MB down", "MB up")
    print(f"{header[0]:<46}" + "".join(f"{h:>9}" for h in header[1:]))
    for k, r in rows.items():
        later = r["seconds_later_rounds"]
        cells = (
            r["seconds_per_round"],
            r["seconds_first_round"],
            later if later is not None else float("nan"),
            r["exchanges_per_round"],
            r["bytes_down_per_client_round"] / 1e6,
            r["bytes_up_per_client_round"] / 1e6,
        )
        print(f"{k:<46}" + "".join(f"{c:>9.3f}" for c in cells))
    return rows


# ------------------------------------------------------------------ malicious vs semi-honest

MALICIOUS_ROUNDS = 5


def bench_malicious(quick: bool) -> dict:
    """security=malicious against semi-honest on one workload, in process, same run."""
    import logging
    import tempfile

    logging.getLogger("flwr").setLevel(logging.WARNING)
    n, d = 5, (10_000 if quick else 100_000)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for security in ("semi-honest", "malicious"):  # warm-up
            _run_fedstack("ours-complete", n, 1000, False, 2, Path(tmp) / f"w-{security}",
                          security)
        for graph in ("complete", "sparse"):
            for security in ("semi-honest", "malicious"):
                key = f"{graph},{security}"
                run_dir = Path(tmp) / f"{graph}-{security}"
                rows[key] = _run_fedstack(
                    f"ours-{graph}", n, d, False, MALICIOUS_ROUNDS, run_dir, security
                )
                print(f"  {key}: {rows[key]['seconds_later_rounds']:.3f} s/round", flush=True)
    print(f"\n== security=malicious vs semi-honest, in process, n={n}, d={d} ==")
    header = ("graph,security", "exch/steady", "round 1", "s/steady", "kB down", "kB up")
    print(f"{header[0]:<26}" + "".join(f"{h:>12}" for h in header[1:]))
    for key, r in rows.items():
        r["exchanges_per_steady_round"] = statistics.median(r["exchanges_by_round"][1:])
        cells = (
            r["exchanges_per_steady_round"],
            r["seconds_first_round"],
            r["seconds_later_rounds"],
            r["bytes_down_per_client_round"] / 1e3,
            r["bytes_up_per_client_round"] / 1e3,
        )
        print(f"{key:<26}" + "".join(f"{c:>12.3f}" for c in cells))
    mal, semi = rows["complete,malicious"], rows["complete,semi-honest"]
    total = {k: r["bytes_down_per_client_round"] + r["bytes_up_per_client_round"]
             for k, r in rows.items()}
    out = {
        "n": n,
        "d": d,
        "rounds": MALICIOUS_ROUNDS,
        "rows": rows,
        "exchanges_per_steady_round": max(
            rows[f"{g},malicious"]["exchanges_per_steady_round"] for g in ("complete", "sparse")
        ),
        "semi_honest_exchanges_per_steady_round": semi["exchanges_per_steady_round"],
        "ratio_over_semi_honest_inprocess": mal["seconds_later_rounds"]
        / semi["seconds_later_rounds"],
        "bytes_per_client_ratio": total["complete,malicious"] / total["complete,semi-honest"],
    }
    print(
        f"malicious: {out['exchanges_per_steady_round']} exchanges per steady round "
        f"(semi-honest {out['semi_honest_exchanges_per_steady_round']}); "
        f"{out['ratio_over_semi_honest_inprocess']:.2f}x the semi-honest seconds per steady "
        f"round in process; {out['bytes_per_client_ratio']:.2f}x the bytes per client"
    )
    return out


DEPLOY_ROUNDS = 3


def bench_malicious_deploy(rounds: int = DEPLOY_ROUNDS) -> dict:
    """security=malicious vs semi-honest through a real local deployment (TLS + node auth)."""
    import importlib.util

    from fedstack.deploy.local import LocalDeployment

    # benchmarks/ is not a package (and a PyPI "benchmarks" may shadow it): load by path.
    spec = importlib.util.spec_from_file_location("bench_deploy", ROOT / "benchmarks" / "deploy.py")
    deploy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deploy)
    NUM_NODES, run_one = deploy.NUM_NODES, deploy.run_one

    runs: dict[str, list[dict]] = {"semi-honest": [], "malicious": []}
    # ABBA order: a machine whose load drifts during the runs biases neither mode.
    order = ("semi-honest", "malicious", "malicious", "semi-honest")
    # The nodes pin the roster; require-signatures=false lets them take semi-honest rounds too.
    with LocalDeployment(num_supernodes=NUM_NODES, require_signatures=False) as dep:
        dep.wait_for_nodes(NUM_NODES)
        for security in order:
            run = run_one(dep, "secagg", rounds, [f"aggregation.security={security}"])
            runs[security].append(run)
            print(f"  deploy {security}: {run['seconds_per_round']} s/round, "
                  f"exchanges {run['exchanges_per_round']}", flush=True)
    steady = {k: statistics.median(s for r in v for s in r["round_seconds"][1:])
              for k, v in runs.items()}
    ratio = steady["malicious"] / steady["semi-honest"]
    print(f"deployment: malicious / semi-honest seconds per steady round = {ratio:.2f} "
          f"({steady['malicious']:.1f} / {steady['semi-honest']:.1f} s)")
    return {"supernodes": NUM_NODES, "rounds": rounds, "order": list(order), "tls": True,
            "node_auth": True, "seconds_per_steady_round": steady, "runs": runs,
            "ratio_over_semi_honest_deploy": round(ratio, 3)}


# ------------------------------------------------------------------ Flower's Ray runtime

RAY_ROUNDS = 5
#: At 5 clients the auto sparse degree is n-1: "ours-sparse" would be the complete graph again.
RAY_SYSTEMS = ("plain", "ours-complete", "flower-secagg+")


def _ray_simulate(server_main, client_app, num_clients: int) -> None:
    import os

    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from fedstack.cli import SIMULATION_CPUS_PER_CLIENT

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    server_app = ServerApp()
    server_app.main()(server_main)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": SIMULATION_CPUS_PER_CLIENT, "num_gpus": 0.0}
        },
    )


def _ray_fedstack(system: str, tmp: Path) -> list[float]:
    """Real digits training through Flower's simulation runtime; wall seconds per round."""
    from flwr.app import ArrayRecord, ConfigRecord

    from fedstack.client_app import app as client_app
    from fedstack.config import CONFIG_MESSAGE_KEY, compose_config, config_to_yaml
    from fedstack.strategies import build_strategy
    from fedstack.task.datasets import load_task_data
    from fedstack.task.models import build_model

    overrides = [
        "fraction_evaluate=0.0",
        "min_evaluate_nodes=0",
        f"output_dir={tmp}",
        f"num_rounds={RAY_ROUNDS}",
    ]
    overrides += (
        ["aggregation=fedavg"]
        if system == "plain"
        else ["aggregation=secagg", f"aggregation.graph={system.split('-')[1]}"]
    )
    cfg = compose_config(overrides)
    stamps: list[float] = []

    class Clock:
        def on_round_end(self, round_log, arrays) -> None:
            stamps.append(time.perf_counter())

    def main(grid, context) -> None:
        data = load_task_data(cfg.task, cfg.seed)
        model = build_model(cfg.task.model, data.input_shape, data.num_classes, cfg.seed)
        config = ConfigRecord({CONFIG_MESSAGE_KEY: config_to_yaml(cfg)})
        stamps.append(time.perf_counter())
        build_strategy(cfg, tmp).start(
            grid,
            ArrayRecord(model.state_dict()),
            num_rounds=RAY_ROUNDS,
            train_config=config,
            evaluate_config=config,
            recorder=Clock(),
        )

    _ray_simulate(main, client_app, int(cfg.num_clients))
    return list(np.diff(stamps))


def _ray_flower_secaggplus() -> list[float]:
    """Flower's SecAgg+ (legacy API) on the same digits task, model and local training."""
    import torch
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    from fedstack.client_app import partition_of
    from fedstack.config import compose_config
    from fedstack.task.client_data import load_client_data
    from fedstack.task.datasets import load_task_data
    from fedstack.task.models import build_model
    from fedstack.task.training import SGDTrainer

    cfg = compose_config([f"num_rounds={RAY_ROUNDS}"])
    n = int(cfg.num_clients)

    class DigitsClient(NumPyClient):
        def __init__(self, context) -> None:
            self.pid, parts = partition_of(context)
            self.data = load_client_data(cfg, self.pid, parts)

        def fit(self, parameters, config):
            model = build_model(
                cfg.task.model, self.data.task.input_shape, self.data.task.num_classes, cfg.seed
            )
            keys = list(model.state_dict().keys())
            model.load_state_dict(
                {k: torch.from_numpy(v.copy()) for k, v in zip(keys, parameters, strict=True)}
            )
            out = SGDTrainer(cfg.task, int(cfg.seed), self.pid).train(model, self.data.train, 1)
            return [v.detach().numpy() for v in model.state_dict().values()], out.num_examples, {}

    client_app = ClientApp(
        client_fn=lambda context: DigitsClient(context).to_client(), mods=[secaggplus_mod]
    )
    stamps: list[float] = []
    secagg = SecAggPlusWorkflow(
        num_shares=n, reconstruction_threshold=math.ceil(0.6 * n), timeout=120.0
    )

    def timed_fit(grid_, context_) -> None:
        secagg(grid_, context_)
        stamps.append(time.perf_counter())

    def main(grid, context) -> None:
        data = load_task_data(cfg.task, cfg.seed)
        model = build_model(cfg.task.model, data.input_shape, data.num_classes, cfg.seed)
        init = ndarrays_to_parameters([v.detach().numpy() for v in model.state_dict().values()])
        strategy = FedAvg(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_available_clients=n,
            initial_parameters=init,
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=RAY_ROUNDS), strategy=strategy
        )
        stamps.append(time.perf_counter())
        DefaultWorkflow(fit_workflow=timed_fit)(grid, legacy)

    _ray_simulate(main, client_app, n)
    return list(np.diff(stamps))


def bench_ray() -> dict:
    """5 clients, digits CNN (85k parameters), real local training, Flower's Ray runtime."""
    import tempfile

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for system in RAY_SYSTEMS:
            per_round = (
                _ray_flower_secaggplus()
                if system == "flower-secagg+"
                else _ray_fedstack(system, Path(tmp))
            )
            rows[system] = {
                "seconds_per_round": per_round,
                "seconds_later_rounds": float(np.median(per_round[1:])),
            }
    print(
        "\n== Flower simulation runtime (Ray), digits CNN 85k params, 5 clients, real training =="
    )
    print(f"{'system':<18}{'round 1':>9}{'later (median)':>16}")
    for k, r in rows.items():
        print(f"{k:<18}{r['seconds_per_round'][0]:>9.2f}{r['seconds_later_rounds']:>16.3f}")
    return rows


# ------------------------------------------------------------------ protocol core at scale

SCALE_CLIENTS = (100, 300, 1000)
SCALE_DIM = 1_000_000
SCALE_DROPOUT = 0.1
SCALE_QUICK = ((20, 50, 100), 100_000)
SCALE_CONTRAST_CLIENTS = 100  # one complete-graph round: what the sparse graph saves
SCALE_MAX_CLIENTS = 1000  # codec bound: the 1000-client sum must not wrap
SCALE_MAX_WEIGHT = 1000
SCALE_CLIP = 4.0
SCALE_THRESHOLD = 0.6
SCALE_SEED = 14
MB = 1e6


def _scale_round(n: int, d: int, graph: str, seed: int, trace_memory: bool = True) -> dict:
    """One round with n real clients and the real server; returns its costs."""
    codec = FixedPointCodec(
        32,
        SCALE_CLIP,
        auto_scale(32, SCALE_CLIP, SCALE_MAX_CLIENTS, SCALE_MAX_WEIGHT),
        SCALE_MAX_CLIENTS,
        SCALE_MAX_WEIGHT,
    )
    params = ProtocolParams(codec, graph=graph, threshold=SCALE_THRESHOLD)
    rng = np.random.default_rng(seed)
    nodes = sorted(int(v) for v in rng.choice(2**40, size=n, replace=False))  # arbitrary ids
    dropped = {int(v) for v in rng.choice(nodes, size=round(SCALE_DROPOUT * n), replace=False)}
    fed = SimulatedFederation(params, nodes)
    reference = np.zeros(d + 1, dtype=codec.dtype)

    def make_input(u: int) -> tuple[np.ndarray, int]:
        """A float32 model update (local training's output) and its example count."""
        r = np.random.default_rng([seed, u])
        x, w = r.standard_normal(d, dtype=np.float32), int(r.integers(1, SCALE_MAX_WEIGHT))
        reference[:] += codec.encode(x, w)  # the plain ring sum, outside the meter
        return x, w

    meter = Meter(trace_memory=trace_memory)
    weighted, weight, server = fed.run_round_streaming(
        1, nodes, make_input, d, drop={"masked-input": dropped}, meter=meter
    )
    ref_weighted, ref_weight = codec.decode(reference)
    if fed.refusals or weight != ref_weight or not np.array_equal(weighted, ref_weighted):
        raise AssertionError(f"n={n}: unmasked sum differs from the plain sum ({fed.refusals})")
    survivors, lost = set(server.survivors), set(server.dropped)
    k = params.degree(n)
    pair_streams = sum(len(set(server.nbrs[u]) & survivors) for u in lost)
    client_streams = [1 + len(set(server.nbrs[u]) & set(server.shared)) for u in survivors]
    costs = [meter.parties[u] for u in survivors]
    srv = meter.parties[SERVER]
    return {
        "n": n,
        "d": d,
        "graph": graph,
        "dropout": SCALE_DROPOUT,
        "k": k,
        "t": params.round_threshold(n),
        "survivors": len(survivors),
        "dropped": len(lost),
        "client_s": float(np.median([c.wall_s for c in costs])),
        "client_cpu_s": float(np.median([c.cpu_s for c in costs])),
        "client_p90_s": float(np.percentile([c.wall_s for c in costs], 90)),
        "client_max_s": float(max(c.wall_s for c in costs)),
        "client_peak_mb": float(np.median([c.peak_bytes for c in costs]) / MB)
        if trace_memory
        else None,
        "client_streams": float(np.mean(client_streams)),
        "server_s": srv.wall_s,
        "server_cpu_s": srv.cpu_s,
        "server_peak_mb": srv.peak_bytes / MB if trace_memory else None,
        "server_streams": {
            "inputs_added": len(survivors),
            "self_masks": len(survivors),
            "pair_masks": pair_streams,
        },
        "peak_mb": tracemalloc.get_traced_memory()[1] / MB if trace_memory else None,
        # where the time goes: server seconds per stage, client seconds per call of a stage
        "server_stage_s": {
            st: c.wall_s for (kind, st), c in meter.stages.items() if kind == SERVER
        },
        "client_stage_s_mean": {
            st: c.wall_s / c.calls for (kind, st), c in meter.stages.items() if kind != SERVER
        },
        "exact": True,
    }


def _fit(x: list[float], y: list[float]) -> dict:
    """y = a + b x by least squares, with R^2 and the largest relative residual."""
    xa, ya = np.asarray(x, float), np.asarray(y, float)
    b, a = np.polyfit(xa, ya, 1)
    pred = a + b * xa
    ss = float(((ya - ya.mean()) ** 2).sum())
    r2 = 1.0 - float(((ya - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return {
        "intercept_s": float(a),
        "slope_s": float(b),
        "r2": r2,
        "max_rel_residual": float(np.max(np.abs(ya - pred) / ya)),
    }


def _loglog_slope(n: list[int], y: list[float]) -> float:
    return float(np.polyfit(np.log(n), np.log(y), 1)[0])


def _scale_point(n: int, d: int, graph: str, seed: int) -> dict:
    """Times from an untraced round (tracemalloc slows Python-heavy stages ~3x), memory from
    a traced rerun with the same seed: the same ids, graph and dropouts."""
    gc.collect()
    row = _scale_round(n, d, graph, seed, trace_memory=False)
    gc.collect()
    traced = _scale_round(n, d, graph, seed, trace_memory=True)
    tracemalloc.stop()
    for key in ("client_peak_mb", "server_peak_mb", "peak_mb"):
        row[key] = traced[key]
    row["traced_server_s"], row["traced_client_s"] = traced["server_s"], traced["client_s"]
    print(
        f"  {graph} n={n}: client {row['client_s']:.3f} s, server {row['server_s']:.3f} s, "
        f"server peak {row['server_peak_mb']:.1f} MB",
        flush=True,
    )
    return row


def bench_scale(quick: bool) -> dict:
    """The protocol core at 100/300/1000 clients x d = 1e6, sparse graph, 10% dropout."""
    sizes, d = SCALE_QUICK if quick else (SCALE_CLIENTS, SCALE_DIM)
    rows = [_scale_point(n, d, "sparse", SCALE_SEED + n) for n in sizes]
    contrast = (
        None
        if quick
        else _scale_point(
            SCALE_CONTRAST_CLIENTS, d, "complete", SCALE_SEED + SCALE_CONTRAST_CLIENTS
        )
    )
    ns = [r["n"] for r in rows]
    server_streams = [
        r["server_streams"]["self_masks"] + r["server_streams"]["pair_masks"] for r in rows
    ]
    fits: dict = {
        "server_streams_model": "|survivors| self masks + sum over dropped u of "
        "|N(u) & survivors| pair masks (~ |survivors| + k |dropped|), d words each",
        "client_streams_model": "1 self mask + |N(u) & U1| pair masks (~ k + 1), d words each",
        "n_squared_ratio": (ns[-1] / ns[0]) ** 2,
        "server_streams_ratio": server_streams[-1] / server_streams[0],
        "client_streams_ratio": rows[-1]["client_streams"] / rows[0]["client_streams"],
    }
    for unit in ("s", "cpu_s"):  # wall and CPU: CPU is what one core spent, load or not
        client, server = [r[f"client_{unit}"] for r in rows], [r[f"server_{unit}"] for r in rows]
        fits[f"client_{unit}_vs_streams"] = _fit([r["client_streams"] for r in rows], client)
        fits[f"server_{unit}_vs_streams"] = _fit(server_streams, server)
        fits[f"client_{unit}_loglog_slope_vs_n"] = _loglog_slope(ns, client)
        fits[f"server_{unit}_loglog_slope_vs_n"] = _loglog_slope(ns, server)
        fits[f"server_{unit}_ratio"] = server[-1] / server[0]
        fits[f"client_{unit}_ratio"] = client[-1] / client[0]
    out = {
        "d": d,
        "dropout": SCALE_DROPOUT,
        "graph": "sparse",
        "rows": rows,
        "contrast_complete_graph": contrast,
        "fits": fits,
    }
    biggest = rows[-1]
    out["goal"] = {
        "n": biggest["n"],
        "server_s": biggest["server_s"],
        "client_s": biggest["client_s"],
        "server_goal_s": 10.0,
        "client_goal_s": 2.0,
        "met": biggest["server_s"] <= 10.0 and biggest["client_s"] <= 2.0,
    }
    print(
        f"\n== Protocol core at scale: d = {d}, sparse graph, {SCALE_DROPOUT:.0%} dropout after "
        "sharing (one round, every party real; seconds wall / CPU) =="
    )
    head = (
        "graph",
        "n",
        "k",
        "t",
        "U2",
        "drop",
        "client s",
        "cl cpu",
        "server s",
        "srv cpu",
        "srv MB",
        "cl MB",
        "srv streams",
    )
    print(f"{head[0]:<9}" + "".join(f"{h:>10}" for h in head[1:-1]) + f"{head[-1]:>12}")
    for r in [*rows, *([contrast] if contrast else [])]:
        streams = r["server_streams"]["self_masks"] + r["server_streams"]["pair_masks"]
        cells = (r["n"], r["k"], r["t"], r["survivors"], r["dropped"])
        print(
            f"{r['graph']:<9}"
            + "".join(f"{c:>10d}" for c in cells)
            + "".join(
                f"{c:>10.3f}"
                for c in (r["client_s"], r["client_cpu_s"], r["server_s"], r["server_cpu_s"])
            )
            + f"{r['server_peak_mb']:>10.1f}{r['client_peak_mb']:>10.1f}{streams:>12d}"
        )
    f = out["fits"]
    for who in ("server", "client"):
        for unit in ("s", "cpu_s"):
            fit = f[f"{who}_{unit}_vs_streams"]
            print(
                f"{who} {unit:<5} = {fit['intercept_s']:.3f} + {fit['slope_s'] * 1e3:.3f} ms x "
                f"streams (R^2 {fit['r2']:.3f}); x{f[f'{who}_{unit}_ratio']:.1f} from n={ns[0]} "
                f"to n={ns[-1]} (streams x{f[f'{who}_streams_ratio']:.1f}, n^2 "
                f"x{f['n_squared_ratio']:.0f}); log-log slope vs n "
                f"{f[f'{who}_{unit}_loglog_slope_vs_n']:.2f}"
            )
    big = rows[-1]
    print(
        f"n={big['n']} server seconds by stage: "
        + ", ".join(f"{k} {v:.3f}" for k, v in big["server_stage_s"].items())
    )
    print(
        f"n={big['n']} client seconds per call by stage: "
        + ", ".join(f"{k} {v:.4f}" for k, v in big["client_stage_s_mean"].items())
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and few repeats (~1 min)")
    ap.add_argument("--sections", default="shamir,core,rounds,ray")
    ap.add_argument("--scale", action="store_true", help="run only the scale section")
    ap.add_argument(
        "--malicious", action="store_true", help="run only the malicious-vs-semi-honest section"
    )
    ap.add_argument(
        "--deploy", action="store_true", help="with --malicious: also the deployment ratio"
    )
    args = ap.parse_args()
    if args.scale:
        sections = {"scale"}
    elif args.malicious:
        sections = {"malicious"}
    else:
        sections = set(args.sections.split(","))
    alone = sections in ({"scale"}, {"malicious"})
    # Keep the keys of the sections not run this time (e.g. --scale alone).
    out: dict = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    machine = {"python": platform.python_version(), "cpus": os.cpu_count()}
    if not alone:
        out["machine"], out["quick"] = machine, args.quick
    if "malicious" in sections:
        previous = out.get("malicious", {})
        deploy = previous.get("ratio_over_semi_honest_deploy")
        out["malicious"] = bench_malicious(args.quick)
        out["malicious"]["machine"] = {**machine, "load_average_at_end": os.getloadavg()}
        out["malicious"]["quick"] = args.quick
        if args.deploy:
            out["malicious"]["deploy"] = bench_malicious_deploy()
            deploy = out["malicious"]["deploy"]["ratio_over_semi_honest_deploy"]
        elif deploy is not None:  # measured by an earlier --deploy run: keep it
            out["malicious"]["deploy"] = previous.get("deploy")
        if deploy is not None:
            out["malicious"]["ratio_over_semi_honest_deploy"] = deploy
    if "scale" in sections:
        out["scale"] = bench_scale(args.quick)
        out["scale"]["machine"] = {**machine, "load_average_at_end": os.getloadavg()}
        out["scale"]["quick"] = args.quick
    if "shamir" in sections:
        out["shamir"] = bench_shamir(args.quick)
        out["shamir_speedup_vs_pycryptodome"] = out["shamir"]["n=100,t=51"][
            "speedup_vs_pycryptodome"
        ]
    if "core" in sections:
        out["core"] = bench_core(args.quick)
    if "rounds" in sections:
        rows = out["rounds"] = bench_rounds(args.quick)
        head = "n=5,d=100000,drop=0%"
        ours, plain = rows[f"ours-complete,{head}"], rows[f"plain,{head}"]
        flower = rows[f"flower-secagg+,{head}"]
        # headline: mean seconds per round over all rounds (ours pays its setup in round 1)
        out["ratio_ours_over_plain"] = ours["seconds_per_round"] / plain["seconds_per_round"]
        out["ratio_flower_over_ours"] = flower["seconds_per_round"] / ours["seconds_per_round"]
    if "ray" in sections and not args.quick:
        ray = out["ray"] = bench_ray()
        later = {k: v["seconds_later_rounds"] for k, v in ray.items()}
        out["ray_ratio_ours_over_plain"] = later["ours-complete"] / later["plain"]
        out["ray_ratio_flower_over_ours"] = later["flower-secagg+"] / later["ours-complete"]
    if not alone:
        out["machine"]["load_average_at_end"] = os.getloadavg()
    print(
        "\n"
        + json.dumps({k: v for k, v in out.items() if "ratio" in k or "speedup" in k}, indent=1)
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
