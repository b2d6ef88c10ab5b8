"""training.image_quality: MSE, PSNR and SSIM against closed forms and scikit-image."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from training.image_quality import gaussian_window, mse, psnr, psnr_from_mse, ssim


def _pair(shape: tuple[int, ...], noise: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=gen)
    y = (x + noise * torch.randn(shape, generator=gen)).clamp(0, 1)
    return x, y


def _skimage_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float) -> float:
    values = [
        structural_similarity(x[b].double().numpy(), y[b].double().numpy(), channel_axis=0,
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                              data_range=data_range)
        for b in range(x.shape[0])
    ]
    return float(np.mean(values))


def test_mse_closed_form() -> None:
    x = torch.zeros(2, 1, 4, 4)
    y = torch.full((2, 1, 4, 4), 0.5)
    value = mse(x, y)
    assert value.dim() == 0
    assert value.item() == pytest.approx(0.25)


def test_psnr_matches_skimage_per_image_mean() -> None:
    x, y = _pair((3, 1, 32, 32))
    expected = np.mean([peak_signal_noise_ratio(x[b].numpy(), y[b].numpy(), data_range=1.0)
                        for b in range(3)])
    value = psnr(x, y)
    assert value.dim() == 0
    assert value.item() == pytest.approx(expected, abs=1e-4)


def test_psnr_data_range_and_identical_images() -> None:
    x, y = _pair((2, 1, 16, 16))
    # Scaling both images and the range by 255 leaves PSNR unchanged.
    assert psnr(x * 255, y * 255, data_range=255.0).item() == pytest.approx(psnr(x, y).item(), abs=1e-3)
    same = psnr(x, x)
    assert math.isfinite(same.item()) and same.item() == pytest.approx(100.0)
    assert psnr_from_mse(0.01) == pytest.approx(20.0)


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 3, 40, 33), (3, 1, 11, 11)])
def test_ssim_matches_skimage(shape: tuple[int, ...]) -> None:
    x, y = _pair(shape, seed=shape[-1])
    value = ssim(x, y)
    assert value.dim() == 0
    assert value.item() == pytest.approx(_skimage_ssim(x, y, 1.0), abs=1e-5)


def test_ssim_data_range_matches_skimage() -> None:
    x, y = _pair((2, 1, 24, 24), noise=0.2, seed=3)
    x, y = 4.0 * x, 4.0 * y
    assert ssim(x, y, data_range=4.0).item() == pytest.approx(_skimage_ssim(x, y, 4.0), abs=1e-5)


def test_ssim_identity_and_gradient() -> None:
    x, y = _pair((2, 1, 20, 20))
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    y = y.clone().requires_grad_(True)
    ssim(x, y).backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0


def test_gaussian_window_is_normalised_and_symmetric() -> None:
    taps = gaussian_window(11, 1.5)
    assert taps.sum().item() == pytest.approx(1.0)
    assert torch.allclose(taps, taps.flip(0))


def test_errors_name_the_problem() -> None:
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="window=11"):
        ssim(x, x)
    with pytest.raises(ValueError, match="odd"):
        ssim(x, x, window=4)
    with pytest.raises(ValueError, match="same shape"):
        mse(x, torch.rand(1, 1, 8, 9))
    with pytest.raises(ValueError, match="NCHW"):
        psnr(torch.rand(8, 8), torch.rand(8, 8))
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0.0)


def test_half_and_integer_inputs_are_promoted() -> None:
    x, y = _pair((1, 1, 16, 16))
    assert mse(x.half(), y.half()).dtype == torch.float32
    assert ssim(x.half(), y.half()).item() == pytest.approx(ssim(x, y).item(), abs=2e-3)
    xi, yi = (x * 255).round().to(torch.uint8), (y * 255).round().to(torch.uint8)
    assert psnr(xi, yi, data_range=255.0).item() == pytest.approx(psnr(x, y).item(), abs=0.1)
