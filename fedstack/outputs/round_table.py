"""The per-round progress table printed to the log while a run goes."""

from __future__ import annotations

from typing import Any

#: (header, history key, number format) of each column; "-" where a value is missing.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("round", "round", "{:d}"),
    ("train loss", "train_loss", "{:.4f}"),
    ("fed loss", "eval_loss", "{:.4f}"),
    ("fed acc", "eval_accuracy", "{:.4f}"),
    ("test loss", "central_loss", "{:.4f}"),
    ("test acc", "central_accuracy", "{:.4f}"),
    ("ok/sent", "clients", "{}"),
    ("MB down", "mb_down", "{:.2f}"),
    ("MB up", "mb_up", "{:.2f}"),
    ("sec", "seconds_total", "{:.2f}"),
    ("eps max", "epsilon_max", "{:.3f}"),
)
#: Minimum width of a column.
MIN_WIDTH = 7


def _width(head: str) -> int:
    return max(len(head), MIN_WIDTH)


def header() -> str:
    line = " | ".join(head.rjust(_width(head)) for head, _, _ in COLUMNS)
    return line + "\n" + "-" * len(line)


def row(record: dict[str, Any]) -> str:
    derived = dict(record)
    derived["clients"] = f"{len(record.get('aggregated', []))}/{len(record.get('sampled', []))}"
    derived["mb_down"] = record.get("bytes_down", 0) / 1e6
    derived["mb_up"] = record.get("bytes_up", 0) / 1e6
    derived["seconds_total"] = sum(record.get("seconds", {}).values())
    cells = []
    for head, key, fmt in COLUMNS:
        value = derived.get(key)
        cells.append(("-" if value is None else fmt.format(value)).rjust(_width(head)))
    return " | ".join(cells)
