"""The loss-curve PNG of a run: per-step training loss, per-epoch train and validation loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curve(history: dict[str, list[dict[str, Any]]], path: str | Path, title: str = "") -> Path:
    """Write a PNG (log-scale loss vs optimizer step) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = history.get("steps", [])
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.8, alpha=0.6, label="train (step)")
    epochs = history.get("epochs", [])
    if epochs:
        xs = [r["step"] for r in epochs]
        ax.plot(xs, [r["train_loss"] for r in epochs], "o-", ms=3, label="train (epoch mean)")
        ax.plot(xs, [r["val_loss"] for r in epochs], "s-", ms=3, label="validation")
    values = [r["loss"] for r in steps] + [r["val_loss"] for r in epochs]
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if steps or epochs:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
