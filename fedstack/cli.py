"""The `fedstack` command.

    fedstack run [key=value ...]         one run through Flower's simulation runtime (Hydra)
    fedstack run -m key=a,b ...          a Hydra multirun sweep, one simulation per job
    fedstack run --help                  config groups, their options and every key's default
    fedstack keys --out DIR              CKKS contexts for `aggregation=he`
    fedstack decrypt --secret-context F RUN_DIR   plaintext final model of an HE run
    fedstack certs --out DIR --host NAME_OR_IP ... CA + SuperLink TLS certificate
    fedstack supernode-keys --out DIR NAME ...    SuperNode auth keys (P-384, OpenSSH)
    fedstack outcome RUN_DIR|DIR [--newer-than F] exit 0 iff the run(s) completed or stopped
    fedstack audit RUN_DIR [--round N ...]        attacks on the recorded server view and the
                                                  final model -> audit.json (docs/audit.md)
    fedstack identity new NAME --out DIR          a member's signing identity (Ed25519)
    fedstack roster build A.pub B.pub ... --out roster.txt   the roster every node pins
    fedstack roster show roster.txt               members and fingerprints of a roster
    fedstack --version                   versions of fedstack, Flower, PyTorch, Opacus, TenSEAL

`fedstack run` exits 0 only when every run completed or stopped by design (summary.json's
`status`); a run that failed, or failed to start, exits 1.

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
    "outcome": "fedstack.outputs.outcome:outcome_main",
    "audit": "fedstack.audit.runner:audit_main",
    "identity": "fedstack.consortium_cli:identity_main",
    "roster": "fedstack.consortium_cli:roster_main",
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

    from fedstack.log import configure_console
    from fedstack.preflight import check_run
    from fedstack.server_app import run_server

    # Checks that need no client run before the runtime boots (it takes 20 s or more).
    preflight = check_run(cfg, deployment=False)
    configure_console(cfg.log_level)
    if client_app is None:
        from fedstack.client_app import app as client_app

    outcome: dict[str, Any] = {}

    from flwr.serverapp import Grid, ServerApp

    from fedstack.log import logger

    logger.info("starting %s simulated clients (the runtime takes a while to boot; round 1 "
                "includes it)...", cfg.num_clients)

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Any) -> None:
        try:
            outcome["summary"] = run_server(grid, cfg, preflight)
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
    if "--help" in args or "-h" in args:
        print(run_help())
        return 0
    import hydra
    from omegaconf import DictConfig

    from fedstack.config import compose_config, conf_dir, validate_config
    from fedstack.outputs.outcome import SUCCESS_STATUSES

    results: list[dict[str, Any]] = []
    failures: list[str] = []

    @hydra.main(config_path=str(conf_dir()), config_name="config", version_base=None)
    def job(cfg: DictConfig) -> None:
        if cfg.get("resume"):
            # A resumed run is its saved config plus the few keys that may change.
            from hydra.core.hydra_config import HydraConfig

            cfg = compose_config(list(HydraConfig.get().overrides.task))
        try:
            summary = run_in_simulation(validate_config(cfg))
        except Exception as exc:
            failures.append(str(exc))
            print(f"fedstack run: FAILED: {exc}", file=sys.stderr)
            return
        results.append(summary)
        print(json.dumps({k: summary.get(k) for k in (
            "status", "reason", "run_dir", "rounds_completed", "final_accuracy",
            "final_loss")}))

    saved_argv = sys.argv
    sys.argv = ["fedstack run", *args]
    try:
        job()
    finally:
        sys.argv = saved_argv
    bad = [s for s in results if s.get("status") not in SUCCESS_STATUSES]
    return 1 if failures or bad or not results else 0


# --------------------------------------------------------------------------- --version, run --help

#: Libraries whose versions `fedstack --version` reports (each changes what a run computes).
VERSION_REPORTED_PACKAGES = ("flwr", "torch", "opacus", "tenseal")
#: Config keys that are not run settings (Hydra's own, and the group choices list).
HELP_HIDDEN_KEYS = ("defaults", "hydra")
#: A group option's `name` only repeats the option, so help does not list it as a key.
GROUP_NAME_KEY = "name"
#: Width `fedstack run --help` wraps comments to.
HELP_WIDTH = 100
#: Hydra's marker of a value the user must give.
MISSING_VALUE = "???"


def version_text() -> str:
    """`fedstack <version>`, then the versions of the libraries a run's numbers depend on."""
    from importlib.metadata import PackageNotFoundError, version

    from fedstack import __version__

    lines = [f"fedstack {__version__}"]
    for package in VERSION_REPORTED_PACKAGES:
        try:
            lines.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            lines.append(f"{package} (not installed)")
    return "\n".join(lines)


def _key_comments(yaml_text: str) -> dict[str, str]:
    """Top-level key -> its comment in a YAML file: the comment on the key's line, else the
    comment block right above it (the first sentence, on one line)."""
    import re

    comments: dict[str, str] = {}
    block: list[str] = []
    parent = ""
    for line in yaml_text.splitlines():
        if line.lstrip().startswith("#"):
            block.append(line.lstrip().lstrip("#").strip())
            continue
        key = re.match(r"( *)([A-Za-z_][\w-]*)\s*:(.*)$", line)
        if key:
            # A key of a nested section (e.g. `audit:`) is named `section.key`.
            name = f"{parent}.{key.group(2)}" if key.group(1) and parent else key.group(2)
            if not key.group(1):
                parent = key.group(2)
            inline = key.group(3).partition(" #")[2].strip()
            text = inline or " ".join(block)
            sentence = re.match(r"(.+?[.;])(\s+[A-Z(]|$)", text)
            comments[name] = sentence.group(1) if sentence else text
        block = []
    return comments


def _default_text(value: Any) -> str:
    if value is None:
        return "null"
    if value == MISSING_VALUE:
        return f"{MISSING_VALUE} (required)"
    if isinstance(value, str):
        return value if value else "''"
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _key_lines(path: Any, prefix: str, skip: tuple[str, ...], indent: str) -> list[str]:
    """`prefix+key=default   comment` for each top-level key of the YAML file at `path`."""
    from omegaconf import OmegaConf

    text = path.read_text()
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    comments = _key_comments(text)
    flat: list[tuple[str, Any]] = []
    for key, value in values.items():
        if key in skip:
            continue
        if isinstance(value, dict) and value:  # a nested section: one row per key
            flat += [(f"{key}.{sub}", v) for sub, v in value.items()]
        else:
            flat.append((key, value))
    rows = [(f"{prefix}{key}={_default_text(value)}", comments.get(key, ""))
            for key, value in flat]
    width = max((len(setting) for setting, _ in rows), default=0)
    return [_help_line(f"{indent}{setting.ljust(width)}   ", comment) for setting, comment in rows]


def _help_line(lead: str, comment: str) -> str:
    """`lead` then `comment`, wrapped to HELP_WIDTH with continuation lines under the comment."""
    import textwrap

    if not comment:
        return lead.rstrip()
    return textwrap.fill(comment, width=max(HELP_WIDTH, len(lead) + 30), initial_indent=lead,
                         subsequent_indent=" " * len(lead))


def run_help() -> str:
    """`fedstack run --help`: every config group with its options and their keys, then the
    top-level keys, each with its default and its comment, read from the config files."""
    from omegaconf import OmegaConf

    from fedstack.config import conf_dir

    root = conf_dir()
    main_file = root / "config.yaml"
    chosen: dict[str, str] = {}
    for entry in OmegaConf.to_container(OmegaConf.load(main_file)).get("defaults", []):
        if isinstance(entry, dict):
            chosen.update({str(k): str(v) for k, v in entry.items()})
    groups = sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.yaml")))
    lines = [
        "usage: fedstack run [group=option ...] [key=value ...] [group.key=value ...]",
        "       fedstack run -m key=a,b ...     (a sweep: one run per combination)",
        "",
        "Runs one federated job in this process (Flower simulation). Settings come from",
        f"{root}: choose one option per group and override any key. * marks a default.",
        "Hydra's own flags also work, e.g. --cfg job (print the composed config, no run).",
        "",
        "Config groups:",
    ]
    for group in groups:
        options = sorted(group.glob("*.yaml"))
        lines.append(f"  {group.name}: " + ", ".join(
            p.stem + ("*" if chosen.get(group.name) == p.stem else "") for p in options))
        for option in options:
            about = _key_comments(option.read_text()).get(GROUP_NAME_KEY, "")
            star = "*" if chosen.get(group.name) == option.stem else ""
            lines.append(_help_line(f"    {group.name}={option.stem}{star}   ", about))
            lines.extend(_key_lines(option, f"{group.name}.", (GROUP_NAME_KEY,), " " * 6))
    lines += ["", "Top-level keys:"]
    lines.extend(_key_lines(main_file, "", HELP_HIDDEN_KEYS, "  "))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    if argv[0] == "--version":
        print(version_text())
        sys.exit(0)
    command, rest = argv[0], argv[1:]
    if command == "run":
        sys.exit(run_command(rest))
    if command in SUBCOMMANDS:
        from fedstack.strategies import load_object

        sys.exit(load_object(SUBCOMMANDS[command])(rest))
    print(f"fedstack: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    sys.exit(2)
