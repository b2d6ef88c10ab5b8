"""Photometric and geometric augmentation of grayscale crops, deterministic by a torch.Generator.

`random_scaled_crop` cuts a window of (H/s, W/s) pixels at a random scale s and resizes it to (H, W)
(antialiased), so one picture yields textures at many scales; `augment_crop` then applies a random
rotation by a multiple of 90° (square crops only), flips, a gamma curve and, half the time, Gaussian
sensor noise. Every draw comes from the generator passed in, so a crop is a pure function of its seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentRanges:
    """Ranges of the random draws (uniform unless said)."""

    scale: tuple[float, float] = (0.6, 1.6)  # > 1 zooms in (a smaller window upscaled)
    gamma: tuple[float, float] = (0.7, 1.45)  # drawn log-uniformly
    noise_std: tuple[float, float] = (0.0, 0.03)  # applied with probability noise_probability
    noise_probability: float = 0.5


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def random_scaled_crop(
    source: torch.Tensor, size: tuple[int, int], gen: torch.Generator, scale: tuple[float, float]
) -> torch.Tensor:
    """A (1, H, W) crop of `source` (1, SH, SW) at a random scale, resized to `size`."""
    h, w = size
    largest = min(source.shape[-2] / h, source.shape[-1] / w)  # the window must fit in the source
    s = _uniform(gen, max(scale[0], 1.0 / largest), scale[1])
    win_h = min(source.shape[-2], max(1, round(h / s)))
    win_w = min(source.shape[-1], max(1, round(w / s)))
    top = int(torch.randint(source.shape[-2] - win_h + 1, (1,), generator=gen))
    left = int(torch.randint(source.shape[-1] - win_w + 1, (1,), generator=gen))
    window = source[:, top : top + win_h, left : left + win_w]
    if (win_h, win_w) == (h, w):
        return window
    return F.interpolate(window[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def augment_crop(crop: torch.Tensor, gen: torch.Generator, ranges: AugmentRanges) -> torch.Tensor:
    """Rotation (square crops), flips, gamma and optional noise of a (1, H, W) crop in [0, 1]."""
    if crop.shape[-1] == crop.shape[-2]:
        crop = torch.rot90(crop, int(torch.randint(4, (1,), generator=gen)), dims=(-2, -1))
    if bool(torch.randint(2, (1,), generator=gen)):
        crop = crop.flip(-1)
    if bool(torch.randint(2, (1,), generator=gen)):
        crop = crop.flip(-2)
    log_gamma = _uniform(gen, *(torch.log(torch.tensor(ranges.gamma)).tolist()))
    crop = crop.clamp(0.0, 1.0) ** float(torch.exp(torch.tensor(log_gamma)))
    noisy = float(torch.rand((), generator=gen)) < ranges.noise_probability
    std = _uniform(gen, *ranges.noise_std)
    if noisy and std > 0:
        crop = crop + std * torch.randn(crop.shape, generator=gen)
    return crop.clamp(0.0, 1.0)
