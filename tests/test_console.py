"""The console: each line once, Flower's DEBUG and known notices only at log_level=debug,
4-digit numbers, `fedstack --version` and `fedstack run --help`.

All in-process, no Ray; one subprocess reproduces the real cause of the doubled lines
(Opacus's import-time `logging.basicConfig`).
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import pytest
from flwr.common.logger import console_handler as flower_console
from flwr.common.logger import log as flower_log
from flwr.common.logger import warn_deprecated_feature
from omegaconf import OmegaConf

from fedstack.cli import main
from fedstack.config import conf_dir
from fedstack.log import KNOWN_NOISE_WARNINGS, configure_console, get_logger, logger
from fedstack.outputs.round_table import format_number, row

#: Flower's banner for `run_simulation`, as flwr/simulation/run_simulation.py words it.
RUN_SIMULATION_BANNER = ("The `run_simulation` function is deprecated and will be removed in a "
                         "future version of Flower. Please use `flwr run` in the CLI instead.")
#: Ray's driver start-up notice (ray/_private/worker.py), as a FutureWarning.
RAY_TIP = ("Tip: In future versions of Ray, Ray will no longer override accelerator visible "
           "devices env var if num_gpus=0 or num_gpus=None (default).")


@dataclass
class Console:
    """What Flower's console handler and a library's root handler printed."""

    flower: io.StringIO
    root: io.StringIO

    def text(self) -> str:
        return self.flower.getvalue() + self.root.getvalue()


@pytest.fixture
def console() -> Iterator[Console]:
    """Flower's console and a root handler like the one Opacus installs, both into buffers;
    every global that configure_console touches is restored afterwards."""
    flwr_logger = logging.getLogger("flwr")
    saved = (flower_console.stream, flower_console.level, flower_console.timestamps,
             list(flower_console.filters), flwr_logger.propagate, list(warnings.filters))
    out = Console(io.StringIO(), io.StringIO())
    root_handler = logging.StreamHandler(out.root)
    root_handler.setFormatter(logging.Formatter("%(asctime)s:%(levelname)s:%(message)s"))
    logging.getLogger().addHandler(root_handler)
    flower_console.stream = out.flower
    try:
        yield out
    finally:
        logging.getLogger().removeHandler(root_handler)
        (flower_console.stream, level, flower_console.timestamps, filters,
         flwr_logger.propagate, warnings.filters[:]) = saved
        flower_console.setLevel(level)
        flower_console.filters[:] = filters


def test_an_info_line_is_printed_once_despite_a_root_handler(console: Console) -> None:
    configure_console("info")
    logger.info("the-line %s", 1)
    assert console.text().count("the-line 1") == 1


def test_module_loggers_print_once_through_flowers_console(console: Console) -> None:
    configure_console("info")
    get_logger("fedstack.privacy.budget").warning("module-line")
    assert get_logger("fedstack.privacy.budget").name == "flwr.fedstack.privacy.budget"
    assert console.flower.getvalue().count("module-line") == 1
    assert "module-line" not in console.root.getvalue()


def test_flower_debug_is_hidden_at_info_and_shown_at_debug(console: Console) -> None:
    configure_console("info")
    flower_log(logging.DEBUG, "debug-line-a")
    logger.debug("debug-line-b")
    assert "debug-line" not in console.text()
    configure_console("debug")
    flower_log(logging.DEBUG, "debug-line-c")
    assert console.text().count("debug-line-c") == 1


def test_warning_level_hides_info(console: Console) -> None:
    configure_console("warning")
    logger.info("info-line")
    logger.warning("warning-line")
    assert "info-line" not in console.text()
    assert console.text().count("warning-line") == 1


def test_the_run_simulation_banner_is_hidden_unless_debug(console: Console) -> None:
    configure_console("info")
    warn_deprecated_feature(RUN_SIMULATION_BANNER)
    warn_deprecated_feature("some other feature")  # not known noise: still shown
    assert "run_simulation" not in console.text()
    assert console.text().count("some other feature") == 1
    configure_console("debug")
    warn_deprecated_feature(RUN_SIMULATION_BANNER)
    assert console.text().count("`run_simulation` function is deprecated") == 1


def test_rays_future_warning_is_hidden_unless_debug(console: Console) -> None:
    assert any(pattern.startswith("Tip: In future versions of Ray")
               for _, pattern in KNOWN_NOISE_WARNINGS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        configure_console("info")
        warnings.warn(RAY_TIP, FutureWarning, stacklevel=1)
        warnings.warn("an unrelated future change", FutureWarning, stacklevel=1)
        assert [str(w.message) for w in caught] == ["an unrelated future change"]
        configure_console("debug")
        warnings.warn(RAY_TIP, FutureWarning, stacklevel=1)
        assert [str(w.message) for w in caught][-1] == RAY_TIP


def test_configure_console_is_idempotent(console: Console) -> None:
    for _ in range(3):
        configure_console("info")
    logger.info("repeat-line")
    assert console.text().count("repeat-line") == 1
    assert sum(type(f).__name__ == "_KnownNoiseFilter" for f in flower_console.filters) == 1


def test_unknown_level_names_the_config_key() -> None:
    with pytest.raises(ValueError, match="log_level='loud'"):
        configure_console("loud")


def test_importing_opacus_does_not_double_lines() -> None:
    """The real cause: Opacus's import puts a handler on the root logger."""
    script = (
        "import opacus.utils.module_utils, logging\n"
        "from flwr.common.logger import log\n"
        "from fedstack.log import configure_console, logger\n"
        "assert logging.getLogger().handlers, 'opacus no longer installs a root handler'\n"
        "configure_console('info')\n"
        "logger.info('once-line')\n"
        "log(logging.DEBUG, 'flower-debug-line')\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True)
    output = done.stdout + done.stderr
    assert output.count("once-line") == 1, output
    assert "flower-debug-line" not in output, output


# --------------------------------------------------------------------------- numbers


@pytest.mark.parametrize(("value", "text"), [
    (0.9749999999999999, "0.9750"), (0.8888888888888888, "0.8889"), (13.6, "13.60"),
    (2.0, "2.000"), (1234.5, "1234"), (1.23456e-5, "1.235e-05"), (7, "7"), (None, "-"),
    (float("inf"), "inf"),
])
def test_numbers_have_four_significant_digits(value: object, text: str) -> None:
    assert format_number(value) == text


def test_round_table_row_has_no_long_numbers() -> None:
    record = {"round": 3, "train_loss": 0.123456789, "eval_loss": 0.3218271255493164,
              "eval_accuracy": 0.9749999999999999, "central_loss": 0.30000000000000004,
              "central_accuracy": 0.8888888888888888, "bytes_down": 1_371_234,
              "bytes_up": 684_321, "seconds": {"train": 0.5123, "evaluate": 0.4234},
              "epsilon_max": 3.14159265358979, "sampled": [1, 2], "aggregated": [1, 2]}
    cells = [c.strip() for c in row(record).split("|")]
    assert cells == ["3", "0.1235", "0.3218", "0.9750", "0.3000", "0.8889", "2/2", "1.371",
                     "0.6843", "0.9357", "3.142"]


# --------------------------------------------------------------------------- CLI


def test_version_names_fedstack_flower_and_torch(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"fedstack {version('fedstack')}"
    assert f"flwr {version('flwr')}" in lines
    assert f"torch {version('torch')}" in lines


def test_version_from_the_console_script() -> None:
    done = subprocess.run([sys.executable, "-m", "fedstack", "--version"], capture_output=True,
                          text=True, timeout=120, check=True)
    assert done.stdout.startswith(f"fedstack {version('fedstack')}\n")


def _expected_settings() -> tuple[dict[str, list[str]], list[str]]:
    """group -> its options, and every `key=default` line help must show, read from conf/."""
    root = conf_dir()
    groups, settings = {}, []
    for group in sorted(d for d in root.iterdir() if d.is_dir() and any(d.glob("*.yaml"))):
        groups[group.name] = sorted(p.stem for p in group.glob("*.yaml"))
        for option in group.glob("*.yaml"):
            values = OmegaConf.to_container(OmegaConf.load(option), resolve=False)
            settings += [f"{group.name}.{k}=" for k in values if k != "name"]
    top = OmegaConf.to_container(OmegaConf.load(root / "config.yaml"), resolve=False)
    for k, v in top.items():
        if k in ("defaults", "hydra"):
            continue
        if isinstance(v, dict):  # a nested section (audit:): one line per key
            settings += [f"{k}.{sub}={_yaml_scalar(x)}" for sub, x in v.items()]
        else:
            settings.append(f"{k}={_yaml_scalar(v)}")
    return groups, settings


def _yaml_scalar(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_run_help_lists_groups_options_and_keys(capsys: pytest.CaptureFixture[str],
                                                flag: str) -> None:
    with pytest.raises(SystemExit) as done:
        main(["run", "num_rounds=3", flag])
    assert done.value.code == 0
    text = capsys.readouterr().out
    groups, settings = _expected_settings()
    assert len(groups) >= 4 and len(settings) > 40
    for group, options in groups.items():
        assert f"{group}: " in text
        for option in options:
            assert f"{group}={option}" in text, (group, option)
    missing = [s for s in settings if s not in text]
    assert not missing, missing
    # Defaults of the chosen options are marked, values come from the files.
    assert "task=digits*" in text and "dp=none*" in text
    assert "dp.target_epsilon=8.0" in text and "aggregation.bits=32" in text


def test_run_help_starts_no_run(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["run", f"output_dir={tmp_path}", "--help"])
    assert not any(tmp_path.iterdir())
