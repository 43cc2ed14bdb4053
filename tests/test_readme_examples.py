"""The README's examples run as written (with fewer rounds), and `make run` reports failure.

The "Two ways in" block is executed by bash, line for line, after two substitutions that keep
it fast and private: every `num_rounds=N` becomes N/10 (at least 1; a sweep without one gets
1), and `$PWD` in its exports becomes a temporary directory (outputs and the local SuperLink's
FLWR_HOME). Every command must exit 0, and every run it started must have `status`
completed: `flwr run` exits 0 even when the ServerApp fails, so exit codes alone prove
nothing.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.local_superlink import stop_local_superlink

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
#: The README section whose code block is executed.
RUNNING_BLOCK_MARKER = "# 1. Flower's CLI"

pytestmark = pytest.mark.e2e


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def fast(script: str, base: Path) -> str:
    """The README block with fewer rounds and a private output base / Flower home."""
    script = re.sub(r"num_rounds=(\d+)", lambda m: f"num_rounds={max(1, int(m[1]) // 10)}",
                    script)
    script = re.sub(r"^(\.venv/bin/fedstack run -m (?:(?!num_rounds).)*?)(\s+#.*)?$",
                    r"\1 num_rounds=1\2", script, flags=re.M)
    return script.replace("$PWD/.flwr-home", str(base / ".flwr-home")).replace(
        "FEDSTACK_OUTPUT_BASE=$PWD", f"FEDSTACK_OUTPUT_BASE={base}")


def summaries(base: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in (base / "outputs").glob("*/summary.json")}


def test_fast_rewrite_keeps_every_command() -> None:
    (block,) = [b for b in bash_blocks(README.read_text()) if RUNNING_BLOCK_MARKER in b]
    rewritten = fast(block, Path("/tmp/x"))
    assert "num_rounds=2 " in rewritten and "num_rounds=3" in rewritten
    assert "-m partition.alpha=0.5,1.0 num_rounds=1" in rewritten
    assert "$PWD" not in rewritten
    commands = [line for line in block.splitlines() if line.startswith(".venv/bin/")]
    assert len(commands) == len([line for line in rewritten.splitlines()
                                 if line.startswith(".venv/bin/")]) == 5


def test_readme_running_examples(tmp_path: Path) -> None:
    (block,) = [b for b in bash_blocks(README.read_text()) if RUNNING_BLOCK_MARKER in b]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "FEDSTACK_"))}
    env["FEDSTACK_DP_STATE_DIR"] = str(tmp_path / "dp-state")
    try:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", fast(block, tmp_path)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    finally:
        stop_local_superlink(tmp_path / ".flwr-home")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = summaries(tmp_path)
    assert {"bc-flwr", "bc"} <= set(runs) and len(runs) == 4, sorted(runs)
    assert all(s["status"] == "completed" for s in runs.values()), runs
    assert runs["bc"]["rounds_completed"] == 3  # 2 rounds, then extended to 3 by resume=
    assert runs["bc-flwr"]["rounds_completed"] == 2


def test_make_run_fails_when_the_run_fails(tmp_path: Path) -> None:
    """`flwr run` exits 0 although the ServerApp refused the run: `make run` must not."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLWR_", "FEDSTACK_"))}
    env.update(FLWR_HOME=str(tmp_path / ".flwr-home"), FEDSTACK_OUTPUT_BASE=str(tmp_path))
    try:
        proc = subprocess.run(
            ["make", "--no-print-directory", "run",
             "RUN_CONFIG=overrides='num_rounds=1 num_clients=3'"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        stop_local_superlink(tmp_path / ".flwr-home")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "num_clients=3 but the simulation has 5 SuperNodes" in out, out[-3000:]
    assert "no finished run found" in out
    assert not (tmp_path / "outputs").exists() or summaries(tmp_path) == {}
