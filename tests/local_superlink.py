"""The local SuperLink that `flwr run .` starts is detached and outlives the command: tests
that run `flwr run` give it a private FLWR_HOME and stop it by that, as `make stop-superlink`
does."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path


def stop_local_superlink(home: Path) -> None:
    """Kill the detached SuperLink that `flwr run` started (found by its private FLWR_HOME)."""
    found = subprocess.run(["pgrep", "-f", f"{home}/local-superlink"], capture_output=True,
                           text=True)
    for pid in found.stdout.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def local_flwr_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment for `flwr run .` on a private local SuperLink: its own
    FLWR_HOME and free ports (no clash with another SuperLink), no runtime dependency
    installation, the venv's tools first on PATH; stale FLWR_*/PYTHONPATH values dropped."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "PYTHONPATH"))}
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
               FLWR_LOCAL_CONTROL_API_PORT=str(free_port()),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", **extra)
    return env
