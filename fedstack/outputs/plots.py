"""PNG plots of a run's history (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if value is not None:
            xs.append(int(row["round"]))
            ys.append(float(value))
    return xs, ys


def plot_history(history: list[dict[str, Any]], run_dir: Path, title: str) -> list[Path]:
    """accuracy.png and loss.png: federated and central evaluation against rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, ylabel, filename in (("accuracy", "accuracy", "accuracy.png"),
                                     ("loss", "loss", "loss.png")):
        fig, ax = plt.subplots(figsize=(6, 4))
        curves = [("federated (clients)", f"eval_{metric}"),
                  ("central (test split)", f"central_{metric}")]
        if metric == "loss":
            curves.append(("train", "train_loss"))
        for label, key in curves:
            xs, ys = _series(history, key)
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        path = run_dir / filename
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
