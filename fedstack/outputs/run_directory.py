"""Where a run's outputs live, and how a run is found again to resume it."""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from fedstack.config import ConfigError

#: Environment variable giving the base of a relative `output_dir` (set by the README's
#: commands, because the local SuperLink runs the ServerApp in its own working directory).
OUTPUT_BASE_ENV = "FEDSTACK_OUTPUT_BASE"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LATEST_CHECKPOINT = "latest.json"
#: What a run name may contain (it becomes a directory name).
RUN_NAME_PATTERN = r"[A-Za-z0-9._=,+-]+"


def output_base(output_dir: str) -> Path:
    path = Path(os.path.expanduser(output_dir))
    if not path.is_absolute():
        path = Path(os.environ.get(OUTPUT_BASE_ENV) or os.getcwd()) / path
    return path.resolve()


def default_run_name(cfg: Any) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{cfg.task.name}-{cfg.aggregation.name}-{cfg.dp.name}-{stamp}"


def new_run_dir(cfg: Any) -> Path:
    """A fresh directory `<output_dir>/<run_name>` (suffixed if the name is taken)."""
    base = output_base(cfg.output_dir)
    name = cfg.run_name or default_run_name(cfg)
    if not re.fullmatch(RUN_NAME_PATTERN, name):
        raise ConfigError(f"run_name={name!r}: use letters, digits and . _ = , + - only")
    base.mkdir(parents=True, exist_ok=True)
    candidate, suffix = base / name, 1
    while True:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1
            candidate = base / f"{name}-{suffix}"


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord) -> Path:
    """Write the global model after `server_round` and point `latest.json` at it atomically."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(exist_ok=True)
    path = ckpt_dir / f"round-{server_round:04d}.npz"
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{f"arr_{i}": arrays[k].numpy() for i, k in enumerate(arrays.keys())},
             __names__=np.array(list(arrays.keys())))
    os.replace(tmp, path)
    latest = ckpt_dir / LATEST_CHECKPOINT
    tmp_latest = latest.with_suffix(".tmp")
    tmp_latest.write_text(json.dumps({"round": server_round, "file": path.name}))
    os.replace(tmp_latest, latest)
    return path


def load_checkpoint(path: Path) -> ArrayRecord:
    with np.load(path, allow_pickle=False) as data:
        names = [str(n) for n in data["__names__"]]
        return ArrayRecord({n: Array(np.ascontiguousarray(data[f"arr_{i}"]))
                            for i, n in enumerate(names)})


def latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    latest = run_dir / CHECKPOINT_DIR / LATEST_CHECKPOINT
    if not latest.exists():
        return None
    info = json.loads(latest.read_text())
    return int(info["round"]), run_dir / CHECKPOINT_DIR / info["file"]
