"""The fedstack ServerApp: compose the config, build task and strategy, run rounds, write outputs.

Two entry points share `run_server`: the `app` below (for `flwr run .` and deployment, config
from Flower's run config) and `fedstack run` (fedstack.cli: config composed by Hydra
in-process, where Flower gives the ServerApp no run config).
"""

from __future__ import annotations

import secrets
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from fedstack.config import (
    CONFIG_MESSAGE_KEY,
    ConfigError,
    compose_config,
    config_to_yaml,
    overrides_from_run_config,
    with_values,
)
from fedstack.log import configure_console, logger
from fedstack.outputs.recorder import RoundListener, RunRecorder
from fedstack.outputs.run_directory import (
    CONFIG_FILE,
    latest_checkpoint,
    load_checkpoint,
    new_run_dir,
)
from fedstack.outputs.server_view import ServerViewRecorder
from fedstack.preflight import PreflightReport, check_run
from fedstack.strategies import build_strategy, load_object
from fedstack.strategies.runtime import is_deployment
from fedstack.task.plugin import load_task, task_context
from fedstack.task.training import evaluate_dataset

#: The privacy ledger follows every run (it also states what the server could see).
PRIVACY_LEDGER = "fedstack.privacy.ledger:PrivacyLedger"


#: Seconds a simulated run waits for its first virtual SuperNode to register (they register
#: right after the ServerApp starts, before the runtime boots), and for their number to settle.
SIMULATION_NODE_WAIT_SECONDS = 15.0
SIMULATION_NODE_SETTLE_SECONDS = 1.0
#: Seconds between checks while waiting for SuperNodes.
NODE_WAIT_POLL_SECONDS = 0.25


def wait_for_clients(grid: Grid, cfg: DictConfig) -> int:
    """Wait until `num_clients` SuperNodes are connected; refuse a run that cannot have them.

    Simulation: the virtual SuperNodes must number exactly `num_clients` (each trains one of
    `num_clients` partitions); they all register at once, so a count that stays put for a
    second is final. Deployment: at least `num_clients` must connect within `round_timeout`.
    """
    simulated = not is_deployment(grid)
    wanted = int(cfg.num_clients)
    started = time.monotonic()
    deadline = started + (SIMULATION_NODE_WAIT_SECONDS if simulated
                          else float(cfg.round_timeout))
    count, changed = -1, started
    while True:
        now = time.monotonic()
        current = len(list(grid.get_node_ids()))
        if current != count:
            count, changed = current, now
            if not simulated and count < wanted:
                logger.info("waiting for %s SuperNodes to connect (%s so far, up to %ss)",
                            wanted, count, cfg.round_timeout)
        if count >= wanted or now >= deadline:
            break
        if simulated and count > 0 and now - changed >= SIMULATION_NODE_SETTLE_SECONDS:
            break
        time.sleep(NODE_WAIT_POLL_SECONDS)
    if simulated and count != wanted:
        raise ConfigError(
            f"num_clients={wanted} but the simulation has {count} SuperNodes: run "
            f"`flwr run . --federation-config \"num-supernodes={wanted}\"` or set "
            f"num_clients={count}")
    if count < wanted:
        raise ConfigError(f"num_clients={wanted} but only {count} SuperNodes connected within "
                          f"round_timeout={cfg.round_timeout}s")
    return count


#: Bytes of the audit canaries' key (256 bits, hex in the run config).
CANARY_KEY_BYTES = 32


def prepare_run(cfg: DictConfig) -> tuple[DictConfig, Path, int, ArrayRecord | None]:
    """(config, run dir, first round, initial arrays or None) for a new or resumed run.

    A resumed run's config was composed from its saved one (`config.compose_resumed`); the
    saved copy is updated with what may change (e.g. a larger `num_rounds`).
    """
    if cfg.resume:
        run_dir = Path(str(cfg.resume))
        latest = latest_checkpoint(run_dir)
        done = latest[0] if latest is not None else 0
        if int(cfg.num_rounds) < done:
            raise ConfigError(f"num_rounds={cfg.num_rounds} is below the {done} rounds "
                              f"{run_dir} already ran (resume=)")
        (run_dir / CONFIG_FILE).write_text(config_to_yaml(with_values(cfg, resume=None)))
        if latest is None:
            logger.warning("resume: %s has no checkpoint; starting from round 1", run_dir)
            return cfg, run_dir, 1, None
        last_round, path = latest
        logger.info("resume: continuing %s after round %s (%s) up to round %s", run_dir,
                    last_round, path.name, cfg.num_rounds)
        return cfg, run_dir, last_round + 1, load_checkpoint(path)
    if cfg.run_id is None:
        cfg = with_values(cfg, run_id=uuid.uuid4().hex)
    if int(cfg.audit.canaries or 0) > 0 and not cfg.audit.canary_key:
        # Audit mode: the key of the canaries' inclusion bits, drawn when the run is made; the
        # config carries it to the holders, audit_canaries.json keeps the plan for the audit.
        audit = OmegaConf.to_container(cfg.audit)
        audit["canary_key"] = secrets.token_hex(CANARY_KEY_BYTES)  # type: ignore[index]
        cfg = with_values(cfg, audit=audit)
    run_dir = new_run_dir(cfg)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(cfg))
    if int(cfg.audit.canaries or 0) > 0:
        from fedstack.audit.canaries import plan_from_config, save_plan

        plan = plan_from_config(cfg)
        if plan is not None:
            save_plan(run_dir, plan)
    return cfg, run_dir, 1, None


# --- task: model and data (fedstack.task.plugin; the same path for built-in and plug-in tasks)
def initial_arrays(cfg: DictConfig) -> ArrayRecord:
    """The task's freshly built model (seeded by the run's seed), as round 1's global model."""
    return ArrayRecord(load_task(cfg.task).build_model(task_context(cfg)).state_dict())


def central_evaluator(cfg: DictConfig) -> Any:
    """evaluate_fn(round, arrays) on the task's test split (server-side data only), or None
    when the task has none (a plug-in without load_test)."""
    task = load_task(cfg.task)
    ctx = task_context(cfg)
    test = task.load_test(ctx)
    if test is None:
        logger.info("central evaluation is off: %s has no test split (load_test)", task.source)
        return None
    model = task.build_model(ctx)
    loss_fn = task.per_example_loss() if task.has_custom_loss else None

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate_dataset(model, test, loss_fn)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    return evaluate


# --- end task


def build_listeners(
    cfg: DictConfig, run_dir: Path, strategy: Any, resuming: bool
) -> list[RoundListener]:
    ledger_cls = load_object(PRIVACY_LEDGER)
    listeners: list[RoundListener] = [
        ledger_cls(run_dir=run_dir, cfg=cfg, strategy=strategy, resume=resuming)]
    # Audit mode (audit.record_round): the server's view of one round, for `fedstack audit`.
    view = ServerViewRecorder.attach(strategy, run_dir, cfg)
    if view is not None:
        listeners.append(view)
    return listeners


def run_server(grid: Grid, cfg: DictConfig,
               preflight: PreflightReport | None = None) -> dict[str, Any]:
    """Run every round of a configured run; returns its summary (`status` says how it ended).

    Everything checkable is checked before anything is created: the config, the data and
    its partitions, files and keys, the output directory and the connected SuperNodes. A
    new run that fails while setting up leaves no run directory behind; once rounds have
    started, a failure is written to `summary.json` (status `failed`) and re-raised.
    """
    configure_console(cfg.log_level)
    if preflight is None:  # `fedstack run` checked before the runtime booted
        preflight = check_run(cfg, deployment=is_deployment(grid))
    wait_for_clients(grid, cfg)
    cfg, run_dir, first_round, arrays = prepare_run(cfg)
    logger.info("%s", preflight.summary())
    resuming = first_round > 1 or bool(cfg.resume)
    logger.info("fedstack run: task=%s aggregation=%s dp=%s partition=%s clients=%s "
                "rounds=%s -> %s", cfg.task.name, cfg.aggregation.name, cfg.dp.name,
                cfg.partition.name, cfg.num_clients, cfg.num_rounds, run_dir)
    try:
        preflight.write(run_dir)
        if arrays is None:
            arrays = initial_arrays(cfg)
        strategy = build_strategy(cfg, run_dir)
        recorder = RunRecorder(
            run_dir, cfg,
            title=f"{cfg.task.name} / {cfg.aggregation.name} / dp={cfg.dp.name}",
            listeners=build_listeners(cfg, run_dir, strategy, resuming=first_round > 1),
            resume_from_round=first_round - 1 if first_round > 1 else None,
        )
        evaluate_fn = central_evaluator(cfg) if cfg.central_evaluation else None
    except BaseException:
        if not resuming:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    if evaluate_fn is not None and not strategy.server_sees_model:
        logger.info("central evaluation is off: under aggregation=%s the server cannot read "
                    "the model", cfg.aggregation.name)
    config_text = config_to_yaml(cfg)
    failed_before = len(recorder.failed_rounds())
    try:
        if first_round <= cfg.num_rounds:
            logger.info("round %s: sending to %s clients%s", first_round, cfg.num_clients,
                        " (the first exchange also waits for the runtime to start them)"
                        if not is_deployment(grid) else "")
            strategy.start(
                grid,
                arrays,
                num_rounds=int(cfg.num_rounds),
                timeout=float(cfg.round_timeout),
                train_config=ConfigRecord({CONFIG_MESSAGE_KEY: config_text}),
                evaluate_config=ConfigRecord({CONFIG_MESSAGE_KEY: config_text}),
                evaluate_fn=evaluate_fn,
                first_round=first_round,
                recorder=recorder,
                max_failed_rounds=int(cfg.max_failed_rounds),
                failed_before=failed_before,
            )
        else:
            logger.info("resume: all %s rounds were already done", cfg.num_rounds)
    except BaseException as exc:
        recorder.finish(strategy.stop_reason, failure=f"{type(exc).__name__}: {exc}")
        raise
    return recorder.finish(strategy.stop_reason, failure=strategy.failure)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .` / deployment: the config comes from Flower's run config."""
    cfg = compose_config(overrides_from_run_config(context.run_config))
    run_server(grid, cfg)
