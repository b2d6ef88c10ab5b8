"""The report's PNG figures: examples as `input · model · each baseline` with per-image PSNR, and image grids."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _show(ax, image: np.ndarray, title: str, value_range: tuple[float, float]) -> None:
    """One panel: (C, H, W) grayscale or RGB in `value_range`."""
    low, high = value_range
    pixels = np.clip((np.asarray(image, dtype=np.float32) - low) / (high - low), 0.0, 1.0)
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(pixels.transpose(1, 2, 0), interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig, path: Path) -> Path:
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.4 / fig.get_figheight()))   # room for the suptitle
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)
    os.replace(tmp, path)
    return path


def comparison_figure(
    path: Path,
    title: str,
    columns: dict[str, np.ndarray],
    psnr: dict[str, np.ndarray],
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Path:
    """Examples (rows) x methods (columns, the first being the input): each panel titled with its PSNR.
    Wide images (more than twice as wide as high) stack the methods of an example instead."""
    plt = _pyplot()
    names = list(columns)
    count, (_, height, width) = len(columns[names[0]]), columns[names[0]].shape[1:]
    wide = width > 2 * height
    rows, cols = (count * len(names), 1) if wide else (count, len(names))
    panel_w = 12.0 if wide else 2.2
    panel_h = panel_w * height / width + 0.3
    fig, axes = plt.subplots(rows, cols, figsize=(panel_w * cols, panel_h * rows), squeeze=False)
    for i in range(count):
        for j, name in enumerate(names):
            ax = axes[i * len(names) + j, 0] if wide else axes[i, j]
            label = name if name not in psnr else f"{name}: {psnr[name][i]:.1f} dB"
            _show(ax, columns[name][i], label, value_range)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def image_grid(
    path: Path,
    title: str,
    rows: list[np.ndarray],
    row_labels: list[str],
    column_labels: list[str],
    value_range: tuple[float, float] = (0.0, 1.0),
) -> Path:
    """A grid of (C, H, W) images, one list per row, labelled by row and column."""
    plt = _pyplot()
    n_cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(1.6 * n_cols, 1.75 * len(rows)), squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            ax = axes[i, j]
            if j < len(row):
                _show(ax, row[j], column_labels[j] if i == 0 and j < len(column_labels) else "", value_range)
            else:
                ax.axis("off")
        axes[i, 0].set_ylabel(row_labels[i], fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)
