"""The fedstack ServerApp: compose the config, build task and strategy, run rounds, write outputs.

Two entry points share `run_server`: the `app` below (for `flwr run .` and deployment, config
from Flower's run config) and `fedstack run` (fedstack.cli: config composed by Hydra
in-process, where Flower gives the ServerApp no run config).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig

from fedstack.config import (
    CONFIG_MESSAGE_KEY,
    ConfigError,
    compose_config,
    config_from_yaml,
    config_to_yaml,
    overrides_from_run_config,
    with_values,
)
from fedstack.log import logger
from fedstack.outputs.recorder import RoundListener, RunRecorder
from fedstack.outputs.run_directory import (
    CONFIG_FILE,
    latest_checkpoint,
    load_checkpoint,
    new_run_dir,
)
from fedstack.strategies import build_strategy, load_object
from fedstack.task.datasets import load_task_data
from fedstack.task.models import build_model
from fedstack.task.training import evaluate_model

#: The privacy ledger follows every run (it also states what the server could see).
PRIVACY_LEDGER = "fedstack.privacy.ledger:PrivacyLedger"


def prepare_run(cfg: DictConfig) -> tuple[DictConfig, Path, int, ArrayRecord | None]:
    """(config, run dir, first round, initial arrays or None) for a new or resumed run."""
    if cfg.resume:
        run_dir = Path(str(cfg.resume)).expanduser().resolve()
        saved = run_dir / CONFIG_FILE
        if not saved.exists():
            raise ConfigError(f"resume={cfg.resume!r}: no {CONFIG_FILE} there (not a run dir)")
        resumed = config_from_yaml(saved.read_text())
        latest = latest_checkpoint(run_dir)
        if latest is None:
            logger.warning("resume: %s has no checkpoint; starting from round 1", run_dir)
            return resumed, run_dir, 1, None
        last_round, path = latest
        logger.info("resume: continuing %s after round %s (%s)", run_dir, last_round, path.name)
        return resumed, run_dir, last_round + 1, load_checkpoint(path)
    if cfg.run_id is None:
        cfg = with_values(cfg, run_id=uuid.uuid4().hex)
    run_dir = new_run_dir(cfg)
    (run_dir / CONFIG_FILE).write_text(config_to_yaml(cfg))
    return cfg, run_dir, 1, None


def central_evaluator(cfg: DictConfig) -> Any:
    """evaluate_fn(round, arrays) on the held-out test split (server-side data only)."""
    data = load_task_data(cfg.task, cfg.seed)
    model = build_model(cfg.task.model, data.input_shape, data.num_classes, cfg.seed)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = evaluate_model(model, data.x_test, data.y_test)
        return MetricRecord({"loss": loss, "accuracy": accuracy})

    return evaluate


def build_listeners(cfg: DictConfig, run_dir: Path, strategy: Any,
                    resuming: bool) -> list[RoundListener]:
    ledger_cls = load_object(PRIVACY_LEDGER)
    return [ledger_cls(run_dir=run_dir, cfg=cfg, strategy=strategy, resume=resuming)]


def run_server(grid: Grid, cfg: DictConfig) -> dict[str, Any]:
    """Run every round of a configured run; returns its summary."""
    cfg, run_dir, first_round, arrays = prepare_run(cfg)
    logger.info("fedstack run: task=%s aggregation=%s dp=%s partition=%s clients=%s "
                "rounds=%s -> %s", cfg.task.name, cfg.aggregation.name, cfg.dp.name,
                cfg.partition.name, cfg.num_clients, cfg.num_rounds, run_dir)
    data = load_task_data(cfg.task, cfg.seed)
    if arrays is None:
        model = build_model(cfg.task.model, data.input_shape, data.num_classes, cfg.seed)
        arrays = ArrayRecord(model.state_dict())
    strategy = build_strategy(cfg, run_dir)
    recorder = RunRecorder(
        run_dir, cfg,
        title=f"{cfg.task.name} / {cfg.aggregation.name} / dp={cfg.dp.name}",
        listeners=build_listeners(cfg, run_dir, strategy, resuming=first_round > 1),
        resume_from_round=first_round - 1 if first_round > 1 else None,
    )
    evaluate_fn = central_evaluator(cfg) if cfg.central_evaluation else None
    if evaluate_fn is not None and not strategy.server_sees_model:
        logger.info("central evaluation is off: under aggregation=%s the server cannot read "
                    "the model", cfg.aggregation.name)
    config_text = config_to_yaml(cfg)
    if first_round <= cfg.num_rounds:
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
        )
    else:
        logger.info("resume: all %s rounds were already done", cfg.num_rounds)
    return recorder.finish(strategy.stop_reason)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run .` / deployment: the config comes from Flower's run config."""
    cfg = compose_config(overrides_from_run_config(context.run_config))
    run_server(grid, cfg)
