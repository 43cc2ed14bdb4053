"""PNG plots of a run: accuracy and loss against rounds, ε spent against rounds.

Figures are built with `matplotlib.figure.Figure` directly, not pyplot: the ServerApp runs in
a thread of `fedstack run`'s process, and pyplot's global figure registry is neither
thread-safe nor needed (`Figure.savefig` renders with Agg, no display).

Honest axes: rounds are whole numbers (no 1.5 tick), accuracy is always drawn on [0, 1] (a
zoomed axis makes 0.90 -> 0.91 look like a leap), and ε is drawn against its budget.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Figure size (inches) and resolution of every plot.
FIGSIZE = (6.4, 4.0)
DPI = 100
#: Range every accuracy axis shows.
ACCURACY_LIMITS = (0.0, 1.0)
#: Legend label of the ε budget line (tests find the line by it).
BUDGET_LABEL = "budget"
#: Per-client ε budget(s) to draw: one value, the distinct values, or None (no limit).
Budget = float | Sequence[float] | None


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if value is not None:
            xs.append(int(row["round"]))
            ys.append(float(value))
    return xs, ys


def _new_axes(title: str, ylabel: str) -> tuple[Figure, Axes]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE)
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def metric_figure(history: list[dict[str, Any]], metric: str, title: str) -> Figure:
    """`metric` ("accuracy" or "loss") of federated and central evaluation (and train loss)
    against rounds."""
    fig, ax = _new_axes(title, metric)
    curves = [("federated (clients)", f"eval_{metric}"),
              ("central (test split)", f"central_{metric}")]
    if metric == "loss":
        curves.append(("train", "train_loss"))
    for label, key in curves:
        xs, ys = _series(history, key)
        if xs:
            # clip_on=False: a marker at accuracy 1.0 sits on the frame, drawn whole.
            ax.plot(xs, ys, marker="o", label=label, clip_on=metric != "accuracy")
    if metric == "accuracy":
        ax.set_ylim(*ACCURACY_LIMITS)
    if ax.lines:
        ax.legend()
    return fig


def plot_history(history: list[dict[str, Any]], run_dir: Path, title: str) -> list[Path]:
    """accuracy.png and loss.png in `run_dir`."""
    return [_save(metric_figure(history, metric, title), run_dir / f"{metric}.png")
            for metric in ("accuracy", "loss")]


def epsilon_figure(series: Mapping[str, Sequence[tuple[int, float]]], budget: Budget,
                   title: str = "Privacy spent per client") -> Figure:
    """Cumulative ε per client (label -> [(round, ε), ...]) with the per-client budget as a
    dashed horizontal line, so a reader sees how much of it is left.

    `budget` is one ε for every client, or the distinct budgets when node policies differ
    (one line each, labelled with its value), or None when nothing limits ε. Non-finite ε
    (no noise) cannot be drawn and is left out; the axis starts at 0 and always shows the
    budget line, even before any client comes near it.
    """
    fig, ax = _new_axes(title, "ε spent (cumulative)")
    for label, points in series.items():
        finite = sorted((int(r), float(e)) for r, e in points if math.isfinite(e))
        if finite:
            ax.plot([r for r, _ in finite], [e for _, e in finite], marker="o", ms=3,
                    label=label)
    top = max((max(line.get_ydata()) for line in ax.lines), default=0.0)
    budgets = sorted({float(b) for b in ([] if budget is None else
                                         [budget] if isinstance(budget, (int, float))
                                         else budget) if math.isfinite(b)})
    for value in budgets:
        label = BUDGET_LABEL if len(budgets) == 1 else f"{BUDGET_LABEL} {value:g}"
        ax.axhline(value, ls="--", color="grey", label=label)
        top = max(top, value)
    # 5% headroom above the highest of the curves and the budget.
    ax.set_ylim(0.0, top * 1.05 if top > 0 else 1.0)
    if ax.lines:
        ax.legend(fontsize="small", ncol=2)
    return fig


def plot_epsilon(series: Mapping[str, Sequence[tuple[int, float]]], budget: Budget,
                 path: Path, title: str = "Privacy spent per client") -> Path:
    """epsilon.png: `epsilon_figure` saved to `path`."""
    return _save(epsilon_figure(series, budget, title), path)
