"""Honest plots: whole-number round ticks, accuracy on [0, 1], ε drawn against its budget.

The figures are inspected as matplotlib artists (Agg), not as pixels.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fedstack.outputs.plots import (
    ACCURACY_LIMITS,
    BUDGET_LABEL,
    epsilon_figure,
    metric_figure,
    plot_epsilon,
    plot_history,
)


def _history(rounds: int, accuracy_from: float = 0.90, step: float = 0.004) -> list[dict]:
    """A short run whose accuracy barely moves (the case a zoomed axis exaggerates)."""
    return [{"round": r, "eval_accuracy": accuracy_from + step * r,
             "central_accuracy": accuracy_from + step * r + 0.001, "eval_loss": 1.0 / (r + 1),
             "central_loss": 1.1 / (r + 1), "train_loss": 1.2 / (r + 1)}
            for r in range(rounds + 1)]


def _drawn_ticks(fig: Figure) -> list[float]:
    FigureCanvasAgg(fig).draw()
    ax = fig.axes[0]
    low, high = ax.get_xlim()
    return [t for t in ax.get_xticks() if low <= t <= high]


@pytest.mark.parametrize("rounds", [1, 2, 3, 7])
@pytest.mark.parametrize("metric", ["accuracy", "loss"])
def test_round_ticks_are_whole_numbers(metric: str, rounds: int) -> None:
    ticks = _drawn_ticks(metric_figure(_history(rounds), metric, "t"))
    assert len(ticks) >= 2
    assert all(float(t).is_integer() for t in ticks), ticks


def test_accuracy_axis_is_zero_to_one() -> None:
    fig = metric_figure(_history(3), "accuracy", "t")
    assert fig.axes[0].get_ylim() == ACCURACY_LIMITS == (0.0, 1.0)


def test_epsilon_plot_has_the_budget_line() -> None:
    series = {"client 0": [(1, 1.5), (2, 2.9), (3, 4.1)], "client 1": [(1, 1.2), (2, 2.0)]}
    fig = epsilon_figure(series, budget=8.0)
    ax = fig.axes[0]
    budget_lines = [line for line in ax.lines if line.get_label() == BUDGET_LABEL]
    assert len(budget_lines) == 1
    assert list(budget_lines[0].get_ydata()) == [8.0, 8.0]
    low, high = ax.get_ylim()
    assert low == 0.0 and high > 8.0  # visible though every client is far below it
    assert _drawn_ticks(fig) and all(float(t).is_integer() for t in _drawn_ticks(fig))


def test_epsilon_plot_with_per_client_budgets() -> None:
    ax = epsilon_figure({"client 0": [(1, 1.0)], "client 1": [(1, 2.0)]},
                        budget=[8.0, 4.0, 8.0]).axes[0]
    budgets = {line.get_label(): list(line.get_ydata()) for line in ax.lines
               if line.get_label().startswith(BUDGET_LABEL)}
    assert budgets == {f"{BUDGET_LABEL} 4": [4.0, 4.0], f"{BUDGET_LABEL} 8": [8.0, 8.0]}


def test_epsilon_plot_without_budget_or_finite_values() -> None:
    ax = epsilon_figure({"client 0": [(1, float("inf")), (2, 3.0)]}, budget=None).axes[0]
    assert [line.get_label() for line in ax.lines] == ["client 0"]
    assert list(ax.lines[0].get_ydata()) == [3.0]


def test_plots_are_written(tmp_path: Path) -> None:
    written = plot_history(_history(2), tmp_path, "t")
    written.append(plot_epsilon({"client 0": [(1, 1.0)]}, 8.0, tmp_path / "epsilon.png"))
    assert [p.name for p in written] == ["accuracy.png", "loss.png", "epsilon.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in written)
