"""Forward operators and the single-image measurement data set."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import default_collate

from training.data.single_image import IMAGES, SingleImageDataset, load_image
from training.forward_operators import (
    OPERATOR_NAMES,
    FourierAmplitudeOperator,
    FourierIntensityOperator,
    FourierOperator,
    IdentityOperator,
    build_operator,
    extract_object,
    fourier_mask,
    object_offset,
    operator_from_batch,
    pixel_mask,
    place_object,
)
from training.layers.crop_pad import crop_pad


def test_place_object_matches_croppad_and_extract_inverts_it() -> None:
    obj = torch.rand(2, 1, 30, 30)
    for grid in (30, 31, 64, 65):
        placed = place_object(obj, grid)
        assert placed.shape == (2, 1, grid, grid)
        if grid >= 30:
            assert torch.equal(placed, crop_pad(obj, grid))  # same placement as the model's CropPad
        assert torch.equal(extract_object(placed, 30), obj)
    assert object_offset(64, 30) == 17
    with pytest.raises(ValueError, match="must not exceed grid_size"):
        object_offset(16, 30)


def test_identity_operator_masks_the_object_region() -> None:
    mask = pixel_mask(8, observed_fraction=0.5, seed=3)
    assert 0.2 < mask.mean().item() < 0.8
    op = IdentityOperator(8, mask)
    grid = place_object(torch.rand(1, 1, 8, 8), 16)
    out = op(grid)
    assert out.shape == (1, 1, 8, 8)
    assert torch.equal(out, mask * extract_object(grid, 8))
    outside = 1.0 - place_object(torch.ones(1, 1, 8, 8), 16)
    assert torch.equal(op(grid + 5 * outside), out)  # pixels outside the object are ignored
    with pytest.raises(ValueError, match="identity mask must be 8x8"):
        IdentityOperator(8, torch.ones(1, 4, 4))


def test_fourier_operator_is_unitary_and_linear() -> None:
    torch.manual_seed(0)
    op = FourierOperator(10, fourier_mask(32))
    x, y = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    fx = op(x)
    assert fx.shape == (1, 1, 32, 32, 2)
    assert torch.allclose(fx.pow(2).sum(), x.pow(2).sum(), rtol=1e-5)  # Parseval with norm="ortho"
    assert torch.allclose(op(2 * x - y), 2 * fx - op(y), atol=1e-5)
    back = torch.fft.ifft2(torch.view_as_complex(fx), norm="ortho").real
    assert torch.allclose(back, x, atol=1e-5)
    with pytest.raises(ValueError, match="expects a 32x32 grid"):
        op(torch.rand(1, 1, 16, 16))


def test_magnitude_operators() -> None:
    mask = fourier_mask(16, aperture_radius=0.5)
    x = torch.rand(1, 1, 16, 16)
    spectrum = torch.fft.fft2(x, norm="ortho")
    amplitude = FourierAmplitudeOperator(8, mask)(x)
    intensity = FourierIntensityOperator(8, mask)(x)
    assert torch.allclose(amplitude, mask * spectrum.abs(), atol=1e-6)
    assert torch.allclose(intensity, amplitude**2, atol=1e-5)
    twin = torch.flip(x, dims=(-2, -1)).roll(shifts=(1, 1), dims=(-2, -1))  # x(-r): same magnitudes
    assert torch.allclose(FourierAmplitudeOperator(8, mask)(twin), amplitude, atol=1e-5)
    assert FourierIntensityOperator.twin_ambiguous and not FourierOperator.twin_ambiguous


def test_fourier_mask_aperture_and_sampling() -> None:
    full = fourier_mask(32)
    assert full.shape == (1, 32, 32) and bool((full == 1).all())
    pupil = fourier_mask(32, aperture_radius=0.5)
    freqs = torch.fft.fftfreq(32) * 2
    radius = (freqs[:, None] ** 2 + freqs[None, :] ** 2).sqrt()
    assert torch.equal(pupil[0].bool(), radius <= 0.5)
    sampled = fourier_mask(32, observed_fraction=0.3, seed=1)
    assert sampled[0, 0, 0] == 1.0  # DC always kept
    assert 0.2 < sampled.mean().item() < 0.4
    assert torch.equal(sampled, fourier_mask(32, observed_fraction=0.3, seed=1))
    with pytest.raises(ValueError, match="aperture_radius must be in"):
        fourier_mask(32, aperture_radius=2.0)
    with pytest.raises(ValueError, match="observed_fraction must be in"):
        fourier_mask(32, observed_fraction=0.0)


def test_build_operator_and_batch_round_trip() -> None:
    for name in OPERATOR_NAMES:
        op = build_operator(name, 12, 32, observed_fraction=0.7, seed=2)
        assert op.name == name
        item = {"target": torch.rand(1, 12, 12), **op.to_batch()}
        batch = default_collate([item, item])
        rebuilt = operator_from_batch(batch)
        assert type(rebuilt) is type(op) and rebuilt.object_size == 12
        assert torch.equal(rebuilt.mask, op.mask)
        grid = torch.rand(1, 1, 32, 32)
        assert torch.allclose(rebuilt(grid), op(grid))
    with pytest.raises(ValueError, match="unknown forward operator 'radon'; allowed: identity"):
        build_operator("radon", 12, 32)
    with pytest.raises(ValueError, match="needs grid_size"):
        build_operator("fourier", 12)
    with pytest.raises(ValueError, match="Fourier operators only"):
        build_operator("identity", 12, aperture_radius=0.5)
    with pytest.raises(KeyError, match="'mask'"):
        operator_from_batch({"operator": torch.tensor(0), "target": torch.rand(1, 4, 4)})


def test_load_image_is_a_real_scaled_image() -> None:
    image = load_image("camera", 32)
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    assert 0.0 <= image.min().item() < 0.2 and 0.8 < image.max().item() <= 1.0
    assert image.std().item() > 0.1  # real content, not a constant
    signed = load_image("camera", 32, value_range=(-1.0, 1.0))
    assert torch.allclose(signed, image * 2 - 1, atol=1e-6)
    assert load_image("astronaut", 16).shape == (1, 16, 16)  # RGB converted to gray
    assert "camera" in IMAGES
    with pytest.raises(ValueError, match="unknown image 'lena'; allowed: camera"):
        load_image("lena", 16)


def test_single_image_dataset_identity_noise() -> None:
    ds = SingleImageDataset.from_options(32, "identity", noise_std=0.1, seed=5, length=3)
    assert len(ds) == 3
    item = ds[0]
    assert set(item) == {"measurement", "target", "operator", "mask"}
    assert item["target"].shape == item["measurement"].shape == (1, 32, 32)
    noise = item["measurement"] - item["target"]
    assert 0.08 < noise.std().item() < 0.12
    again = SingleImageDataset.from_options(32, "identity", noise_std=0.1, seed=5)[0]
    assert torch.equal(again["measurement"], item["measurement"])  # seeded
    other = SingleImageDataset.from_options(32, "identity", noise_std=0.1, seed=6)[0]
    assert not torch.equal(other["measurement"], item["measurement"])
    with pytest.raises(IndexError):
        ds[3]


def test_single_image_dataset_masked_and_fourier() -> None:
    masked = SingleImageDataset.from_options(16, "identity", noise_std=0.1, observed_fraction=0.5)[0]
    hidden = masked["mask"] == 0
    assert hidden.any() and bool((masked["measurement"][hidden] == 0).all())  # no noise where unobserved

    ds = SingleImageDataset.from_options(16, "fourier", grid_size=32, aperture_radius=0.5, noise_std=0.01)
    item = ds[0]
    assert item["measurement"].shape == (1, 32, 32, 2) and item["mask"].shape == (1, 32, 32)
    op = operator_from_batch(default_collate([item]))
    clean = op(place_object(item["target"].unsqueeze(0), 32))[0]
    assert 0.005 < (item["measurement"] - clean)[item["mask"].bool()].std().item() < 0.015
    assert bool((item["measurement"][~item["mask"].bool()] == 0).all())
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        SingleImageDataset.from_options(16, "identity", noise_std=-1.0)
