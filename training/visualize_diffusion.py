"""A PNG grid of DDIM samples of a diffusion decoder (the training report and `python -m training sample`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from training.models.diffusion_unet import DiffusionUNet
from training.schedules import NoiseSchedule, ddim_sample


def sample_grid_png(model: DiffusionUNet, schedule: NoiseSchedule | None, conditions: torch.Tensor,
                    path: str | Path, steps: int = 50, seed: int = 0, eta: float = 0.0,
                    nrow: int | None = None) -> Path:
    """DDIM-sample one image per condition row and write them as a PNG grid (1-pixel gaps)."""
    from PIL import Image

    c = model.config
    schedule = schedule or model.noise_schedule()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    n = conditions.shape[0]
    x_T = torch.randn((n, c.in_channels, c.image_size, c.image_size), generator=generator).to(device)
    was_training = model.training
    model.eval()
    try:
        images = ddim_sample(model, x_T, conditions.to(device), steps, eta, True,
                             schedule=schedule.to(device), generator=generator)
    finally:
        model.train(was_training)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    channels, size = pixels.shape[1], c.image_size
    grid = torch.full((channels, rows * (size + 1) + 1, nrow * (size + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = 1 + r * (size + 1), 1 + col * (size + 1)
        grid[:, top:top + size, left:left + size] = pixels[i]
    array = grid.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if channels == 1 else array).save(path)
    return path
