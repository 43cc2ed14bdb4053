"""The example user project (examples/my-project) runs under both ways in, through Ray.

The project is copied out of the repository first, so nothing of it is importable except
from its own directory, as on a newcomer's machine: `fedstack run` finds `my_project.task`
in the current directory, `flwr run .` in the app bundle Flower installs from the project.
One test, two runs (CI has a time budget): the plug-in contract itself is covered
in-process under every layer by tests/test_task_plugin.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.local_superlink import local_flwr_env, stop_local_superlink

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "my-project"
VENV_BIN = Path(sys.executable).parent
#: Images per class of the sample data (3 classes): small, a round takes seconds.
PER_CLASS = 20


def _summary(outputs: Path, name: str) -> dict:
    return json.loads((outputs / name / "summary.json").read_text())


def test_example_project_runs_under_both_ways_in(tmp_path: Path) -> None:
    project = tmp_path / "my-project"
    shutil.copytree(EXAMPLE, project,
                    ignore=shutil.ignore_patterns("data", "outputs", "__pycache__"))
    data = tmp_path / "images"
    subprocess.run([sys.executable, "make_sample_data.py", str(data), "--per-class",
                    str(PER_CLASS)], cwd=project, check=True, capture_output=True, timeout=120)
    outputs = tmp_path / "outputs"
    home = tmp_path / "flwr-home"
    env = local_flwr_env(home)
    overrides = ["task.module=my_project.task", f"+task.options.data_dir={data}",
                 "num_clients=2", "num_rounds=1", f"output_dir={outputs}"]

    # 1. fedstack run, from the project directory (the README's command).
    proc = subprocess.run([str(VENV_BIN / "fedstack"), "run", "task=custom", *overrides,
                           "run_name=via-fedstack"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # 2. flwr run . with the project's own pyproject (its run config, our overrides).
    run_config = f"overrides='{' '.join(overrides)} run_name=via-flwr'"
    try:
        proc = subprocess.run(
            [str(VENV_BIN / "flwr"), "run", ".", "--stream", "--run-config", run_config,
             "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
            cwd=project, env=env, capture_output=True, text=True, timeout=400)
    finally:
        stop_local_superlink(home)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    for name in ("via-fedstack", "via-flwr"):
        summary = _summary(outputs, name)
        assert summary["status"] == "completed" and summary["rounds_completed"] == 1, summary
        assert summary["task"] == "custom"
        report = json.loads((outputs / name / "preflight.json").read_text())
        assert report["input_shape"] == [3, 32, 32]  # the files' own size and channels
        assert report["label_mapping"] == {"circles": 0, "squares": 1, "stripes": 2}
        assert report["test_size"] > 0 and len(report["clients"]) == 2
