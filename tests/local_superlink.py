"""The local SuperLink that `flwr run .` starts is detached and outlives the command: tests
that run `flwr run` give it a private FLWR_HOME and stop it by that, as `make stop-superlink`
does."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path


def stop_local_superlink(home: Path) -> None:
    """Kill the detached SuperLink that `flwr run` started (found by its private FLWR_HOME)."""
    found = subprocess.run(["pgrep", "-f", f"{home}/local-superlink"], capture_output=True,
                           text=True)
    for pid in found.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)
