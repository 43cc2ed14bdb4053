"""Shared fixtures.

`digits_baseline` is the plain-FedAvg digits run that several end-to-end tests compare
against (learning goal, secagg and HE parity): one Ray simulation per test session instead of
one per test, because CI has a time budget.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

# Clients persist their DP accountant on "their disk"; keep the test suite's out of $HOME.
# Set at import time so Ray workers and subprocesses started by tests inherit it.
os.environ.setdefault("FEDSTACK_DP_STATE_DIR", tempfile.mkdtemp(prefix="fedstack-dp-state-"))

#: The shared digits configuration: 5 clients, Dirichlet(0.5), 10 rounds, seed 42.
DIGITS_BASELINE = ["task=digits", "partition=dirichlet", "partition.alpha=0.5",
                   "num_clients=5", "num_rounds=10", "seed=42"]


@pytest.fixture(scope="session")
def digits_baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Summary of a plain FedAvg run of DIGITS_BASELINE (run dir under a session tmp dir)."""
    from fedstack.cli import run_in_simulation
    from fedstack.config import compose_config

    out: Path = tmp_path_factory.mktemp("digits-baseline")
    cfg = compose_config([*DIGITS_BASELINE, f"output_dir={out}", "run_name=fedavg"])
    return run_in_simulation(cfg)
