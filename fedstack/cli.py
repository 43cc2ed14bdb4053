"""The `fedstack` command.

    fedstack run [key=value ...]         one run through Flower's simulation runtime (Hydra)
    fedstack run -m key=a,b ...          a Hydra multirun sweep, one simulation per job
    fedstack keys --out DIR              CKKS contexts for `aggregation=he`
    fedstack decrypt --secret-context F RUN_DIR   plaintext final model of an HE run
    fedstack certs --out DIR --host NAME_OR_IP ... CA + SuperLink TLS certificate
    fedstack supernode-keys --out DIR NAME ...    SuperNode auth keys (P-384, OpenSSH)

`fedstack run` composes exactly the config `flwr run .` would and runs the same ServerApp and
ClientApp through `flwr.simulation.run_simulation`, in this process.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

#: Subcommands provided by optional layers: name -> "module:function(argv) -> int".
SUBCOMMANDS: dict[str, str] = {
    "keys": "fedstack.strategies.he.cli:keys_main",
    "decrypt": "fedstack.strategies.he.cli:decrypt_main",
    "certs": "fedstack.deploy.cli:certs_main",
    "supernode-keys": "fedstack.deploy.cli:supernode_keys_main",
}
#: CPUs reserved per simulated client (2 cores here: two clients train side by side).
SIMULATION_CPUS_PER_CLIENT = 1

USAGE = __doc__ or ""


def run_in_simulation(cfg: Any, client_app: Any = None) -> dict[str, Any]:
    """Run one configured job through Flower's simulation runtime; returns its summary.

    `client_app` defaults to fedstack's; tests pass one with extra (fault-injecting) mods.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.simulation import run_simulation

    from fedstack.server_app import run_server

    if client_app is None:
        from fedstack.client_app import app as client_app

    outcome: dict[str, Any] = {}

    from flwr.serverapp import Grid, ServerApp

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Any) -> None:
        try:
            outcome["summary"] = run_server(grid, cfg)
        except BaseException as exc:
            outcome["error"] = exc
            raise

    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=int(cfg.num_clients),
        backend_config={"client_resources": {"num_cpus": SIMULATION_CPUS_PER_CLIENT,
                                             "num_gpus": 0.0}},
    )
    if "error" in outcome:
        raise RuntimeError(f"the run failed: {outcome['error']}") from outcome["error"]
    if "summary" not in outcome:
        raise RuntimeError("the simulation ended without running the ServerApp to completion")
    return outcome["summary"]


def run_command(args: list[str]) -> int:
    """`fedstack run ...`: Hydra parses the overrides (and -m sweeps), each job simulates."""
    import hydra
    from omegaconf import DictConfig

    from fedstack.config import conf_dir, validate_config

    results: list[dict[str, Any]] = []

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
    def job(cfg: DictConfig) -> None:
        summary = run_in_simulation(validate_config(cfg))
        results.append(summary)
        print(json.dumps({k: summary.get(k) for k in (
            "run_dir", "rounds_completed", "final_accuracy", "final_loss", "stop_reason")}))

    saved_argv = sys.argv
    sys.argv = ["fedstack run", *args]
    try:
        job()
    finally:
        sys.argv = saved_argv
    return 0


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "run":
        sys.exit(run_command(rest))
    if command in SUBCOMMANDS:
        from fedstack.strategies import load_object

        sys.exit(load_object(SUBCOMMANDS[command])(rest))
    print(f"fedstack: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    sys.exit(2)
