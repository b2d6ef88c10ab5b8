"""Image quality metrics on NCHW tensors: MSE, PSNR and SSIM.

Every function takes two tensors of the same shape (B, C, H, W) and returns a 0-d tensor averaged
over the batch (PSNR and SSIM are computed per image, then averaged). They are differentiable and
run on the inputs' device, in float32 at least (integer/half inputs are promoted).

SSIM is the standard Gaussian-window SSIM of Wang et al. (2004) and matches
`skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=...)`: an 11-tap Gaussian window (sigma 1.5, i.e. scipy's
truncate=3.5), K1 = 0.01, K2 = 0.03, the SSIM map averaged over the pixels the window fits inside
("valid" region — skimage crops the same border), per channel, then over channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SSIM_K1 = 0.01
SSIM_K2 = 0.03
# PSNR of two identical images is +inf; the per-image MSE is floored at this fraction of
# data_range**2 so batch means stay finite (caps PSNR at 100 dB).
_PSNR_MSE_FLOOR = 1e-10


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return both in a common floating dtype of at least float32."""
    if x.shape != y.shape:
        raise ValueError(f"metrics need tensors of the same shape; got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.dim() != 4:
        raise ValueError(f"metrics expect NCHW tensors (4-D); got shape {tuple(x.shape)}")
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    return x.to(dtype), y.to(dtype)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element (= batch mean of the per-image MSE)."""
    x, y = _check_pair(x, y)
    return torch.mean((x - y) ** 2)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, computed per image and averaged over the batch."""
    x, y = _check_pair(x, y)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0; got {data_range}")
    per_image = torch.mean((x - y) ** 2, dim=(1, 2, 3))
    per_image = per_image.clamp_min(_PSNR_MSE_FLOOR * data_range**2)
    return torch.mean(10.0 * torch.log10(data_range**2 / per_image))


def gaussian_window(window: int, sigma: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of `window` taps (odd) centred on the middle tap."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer; got {window}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0; got {sigma}")
    radius = window // 2
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).to(dtype=dtype, device=device)


def _blur_valid(img: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, 'valid' region only, applied to each channel on its own."""
    channels = img.shape[1]
    k = taps.numel()
    kernel_h = taps.view(1, 1, k, 1).expand(channels, 1, k, 1)
    kernel_w = taps.view(1, 1, 1, k).expand(channels, 1, 1, k)
    out = F.conv2d(img, kernel_h, groups=channels)
    return F.conv2d(out, kernel_w, groups=channels)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Gaussian window), averaged over pixels, channels and the batch."""
    x, y = _check_pair(x, y)
    if data_range <= 0:
        raise ValueError(f"data_range must be > 0; got {data_range}")
    height, width = x.shape[-2:]
    if height < window or width < window:
        raise ValueError(f"ssim window={window} does not fit an image of {height}x{width}; "
                         "pass a smaller odd window")
    taps = gaussian_window(window, sigma, dtype=x.dtype, device=x.device)
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2

    mu_x = _blur_valid(x, taps)
    mu_y = _blur_valid(y, taps)
    # Population (biased) moments, as skimage with use_sample_covariance=False.
    var_x = _blur_valid(x * x, taps) - mu_x * mu_x
    var_y = _blur_valid(y * y, taps) - mu_y * mu_y
    cov_xy = _blur_valid(x * y, taps) - mu_x * mu_y

    numerator = (2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
    denominator = (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)
    ssim_map = numerator / denominator
    return ssim_map.mean()


def psnr_from_mse(mse_value: float, data_range: float = 1.0) -> float:
    """PSNR in dB of a known MSE (for logging aggregated values)."""
    if mse_value <= 0:
        return math.inf
    return 10.0 * math.log10(data_range**2 / mse_value)
