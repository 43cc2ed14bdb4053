"""The fedstack logger and the console it prints to.

Our logger is a child of Flower's ("flwr"), so our lines show in `flwr run --stream` /
`flwr log` with Flower's formatting, in the ServerApp and ClientApp processes alike.

`configure_console(level)` makes that console quiet and readable; call it where a process
starts a run (the ServerApp, the ClientApp, `fedstack run`). It fixes three kinds of noise:

- Every line printed twice. Flower prints "flwr" records with its own console handler and
  also lets them propagate to the root logger. Importing Opacus calls `logging.basicConfig`
  (opacus/utils/module_utils.py), which puts a stderr handler on the root logger, so every
  record was printed again there, DEBUG ones included ("12/01/2026 14:10:52:INFO:...").
  Flower's own cure for duplicates (used in notebooks) is to stop "flwr" propagating; so do we.
- Flower's DEBUG lines: its console handler shows them only at `log_level=debug`.
- Known third-party notices that say nothing about the run (`KNOWN_NOISE_*`): hidden unless
  `log_level=debug`.
"""

from __future__ import annotations

import logging
import warnings

#: Name of Flower's logger; its console handler prints every "flwr.*" record once.
FLOWER_LOGGER_NAME = "flwr"

logger = logging.getLogger(f"{FLOWER_LOGGER_NAME}.fedstack")

#: Values of the `log_level` config key. debug also shows Flower's DEBUG lines, timestamps and
#: the known third-party notices below.
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_LEVEL = "info"

#: Log records that are hidden below debug: (logger name, text in the formatted message).
KNOWN_NOISE_RECORDS: tuple[tuple[str, str], ...] = (
    # `fedstack run` calls `flwr.simulation.run_simulation` on purpose (the only way to run a
    # Hydra command line in-process); the banner repeats on every run and asks for `flwr run`.
    (FLOWER_LOGGER_NAME, "`run_simulation` function is deprecated"),
)
#: Python warnings hidden below debug: (category, regex matching the start of the message).
KNOWN_NOISE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # Ray's driver start-up tip about CUDA_VISIBLE_DEVICES and num_gpus=0; our clients ask for
    # no GPU and run CPU torch, so neither behaviour changes anything.
    (FutureWarning, r"Tip: In future versions of Ray, Ray will no longer override accelerator"),
)


def get_logger(module_name: str) -> logging.Logger:
    """The logger for a fedstack module (`__name__`), under ours so Flower's console prints it.

    A plain `logging.getLogger(__name__)` ("fedstack.x") reaches no console handler except
    whatever a library put on the root logger.
    """
    return logger.getChild(module_name.removeprefix("fedstack."))


class _KnownNoiseFilter(logging.Filter):
    """Drops `KNOWN_NOISE_RECORDS` unless the console is at DEBUG."""

    def __init__(self) -> None:
        super().__init__()
        self.show_all = False

    def filter(self, record: logging.LogRecord) -> bool:
        if self.show_all:
            return True
        message = record.getMessage()
        return not any(
            (record.name == name or record.name.startswith(name + ".")) and text in message
            for name, text in KNOWN_NOISE_RECORDS)


def _flower_console_handler() -> logging.Handler:
    # Importing Flower's logger module is what creates its console handler.
    from flwr.common.logger import console_handler

    return console_handler


def _set_known_warnings(hidden: bool) -> None:
    """Add (or remove) one `ignore` filter per `KNOWN_NOISE_WARNINGS` entry, idempotently."""
    ours = {(category, pattern) for category, pattern in KNOWN_NOISE_WARNINGS}
    warnings.filters[:] = [
        f for f in warnings.filters
        if not (f[0] == "ignore" and f[1] is not None and (f[2], f[1].pattern) in ours)]
    if hidden:
        for category, pattern in KNOWN_NOISE_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)


def configure_console(level: str = DEFAULT_LOG_LEVEL) -> None:
    """Print each log line once, at `level` (a `LOG_LEVELS` value); idempotent.

    Raises ValueError naming `log_level` for an unknown level.
    """
    name = str(level).lower()
    if name not in LOG_LEVELS:
        raise ValueError(f"log_level={level!r}: must be one of {', '.join(LOG_LEVELS)}")
    debug = name == "debug"
    flower = logging.getLogger(FLOWER_LOGGER_NAME)
    flower.propagate = False
    handler = _flower_console_handler()
    handler.setLevel(name.upper())
    # Flower shows timestamps with DEBUG (FLWR_LOG_LEVEL=debug); keep that convention.
    handler.timestamps = debug  # type: ignore[attr-defined]
    noise = next((f for f in handler.filters if isinstance(f, _KnownNoiseFilter)), None)
    if noise is None:
        noise = _KnownNoiseFilter()
        handler.addFilter(noise)
    noise.show_all = debug
    _set_known_warnings(hidden=not debug)
