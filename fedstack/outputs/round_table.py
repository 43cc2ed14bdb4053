"""The per-round progress table printed to the log while a run goes, and the number format
every console line uses (`format_number`)."""

from __future__ import annotations

import math
import numbers
from typing import Any

#: Significant digits of a non-integer number in a log line: enough to compare rounds, few
#: enough to read (an accuracy of 0.9749999999999999 prints as 0.9750).
SIGNIFICANT_DIGITS = 4
#: What a missing value prints as.
MISSING = "-"

#: (header, history key) of each column.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("round", "round"),
    ("train loss", "train_loss"),
    ("fed loss", "eval_loss"),
    ("fed acc", "eval_accuracy"),
    ("test loss", "central_loss"),
    ("test acc", "central_accuracy"),
    ("ok/sent", "clients"),
    ("MB down", "mb_down"),
    ("MB up", "mb_up"),
    ("sec", "seconds_total"),
    ("eps max", "epsilon_max"),
)
#: Minimum width of a column: fits any 4-digit number down to 0.001 (0.001234).
MIN_WIDTH = 8


def format_number(value: Any, digits: int = SIGNIFICANT_DIGITS) -> str:
    """`value` for a log line: integers as they are, other reals with `digits` significant
    digits, '-' when missing, anything else as str().

    Trailing zeros are kept (0.9000, 13.60) so a column's digits line up from row to row.
    """
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    number = float(value)
    if not math.isfinite(number):
        return str(number)
    text = f"{number:#.{digits}g}"
    # '#' keeps a bare trailing point on numbers with `digits` integer digits ("1235.").
    return text[:-1] if text.endswith(".") else text


def _width(head: str) -> int:
    return max(len(head), MIN_WIDTH)


def header() -> str:
    line = " | ".join(head.rjust(_width(head)) for head, _ in COLUMNS)
    return line + "\n" + "-" * len(line)


def row(record: dict[str, Any]) -> str:
    derived = dict(record)
    derived["clients"] = f"{len(record.get('aggregated', []))}/{len(record.get('sampled', []))}"
    derived["mb_down"] = record.get("bytes_down", 0) / 1e6
    derived["mb_up"] = record.get("bytes_up", 0) / 1e6
    derived["seconds_total"] = float(sum(record.get("seconds", {}).values()))
    return " | ".join(format_number(derived.get(key)).rjust(_width(head))
                      for head, key in COLUMNS)
