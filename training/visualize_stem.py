"""Latent maps of a 4D-STEM scan: each latent channel shown as an image over the scan grid.

Rendering uses matplotlib's Agg canvas directly (no pyplot, no global backend state).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch.utils.data import Dataset


def _as_batch_tensor(data: Dataset | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Patterns as (N, 1, H, W) float32 from a tensor, an array or a Dataset yielding {"image": ...}."""
    if isinstance(data, Dataset):
        images = getattr(data, "images", None)
        if isinstance(images, torch.Tensor):
            return images.float()
        return torch.stack([data[i]["image"] for i in range(len(data))]).float()
    tensor = torch.as_tensor(np.asarray(data) if not isinstance(data, torch.Tensor) else data).float()
    if tensor.dim() == 3:
        tensor = tensor.unsqueeze(1)
    if tensor.dim() != 4:
        raise ValueError(f"patterns must be (N, H, W) or (N, 1, H, W); got shape {tuple(tensor.shape)}")
    return tensor


@torch.no_grad()
def embed_scan(model: nn.Module, data: Dataset | np.ndarray | torch.Tensor, scan_shape: tuple[int, int],
               batch_size: int = 16) -> np.ndarray:
    """Latents of every scan position as (latent_dim, scan_y, scan_x); patterns must be in scan order."""
    patterns = _as_batch_tensor(data)
    n_positions = scan_shape[0] * scan_shape[1]
    if patterns.shape[0] != n_positions:
        raise ValueError(f"{patterns.shape[0]} patterns do not fill a scan grid of {scan_shape} "
                         f"({n_positions} positions); pass one configuration in scan order")
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        latents = torch.cat([model.embed(patterns[i:i + batch_size].to(device)).cpu()
                             for i in range(0, n_positions, batch_size)])
    finally:
        model.train(was_training)
    return latents.T.reshape(-1, *scan_shape).numpy()


def render_embedding_maps(model: nn.Module, dataset_or_array: Dataset | np.ndarray | torch.Tensor,
                          scan_shape: tuple[int, int], path: str | Path, columns: int = 8,
                          title: str | None = None) -> np.ndarray:
    """Write one PNG with every latent channel as a map over the scan grid; returns the maps.

    Each map has its own colour scale (channels differ by orders of magnitude); a channel that is
    constant over the scan is labelled "const".
    """
    maps = embed_scan(model, dataset_or_array, scan_shape)
    n = maps.shape[0]
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    fig = Figure(figsize=(1.6 * columns, 1.75 * rows + 0.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= n:
            continue
        channel = maps[index]
        low, high = float(channel.min()), float(channel.max())
        ax.imshow(channel, cmap="viridis", vmin=low, vmax=high if high > low else low + 1e-12,
                  interpolation="nearest")
        label = f"z{index} const {high:.2g}" if high <= low else f"z{index} max {high:.2g}"
        ax.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return maps
