"""Issue 9 (VAE quality): train-split augmentation of the patches and the served recipe's model settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import training.data.patches as patches
from training.data.patches import ImagePatches, augment_patch
from training.recipes import load_recipe
from training.registry import create_model

RECIPE = Path(__file__).resolve().parents[2] / "model_store" / "recipes" / "50-conv-decoder-vae.yaml"


def _symmetries(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 symmetries of the square, each also inverted (16 images)."""
    out = []
    for k in range(4):
        rotated = torch.rot90(image, k, (-2, -1))
        for candidate in (rotated, rotated.flip(-1)):
            out += [candidate, 1.0 - candidate]
    return out


def test_augment_without_contrast_is_a_symmetry_or_inversion(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patches, "CONTRAST_LOG_STD", 0.0)
    image = torch.rand(1, 28, 28)
    generator = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        out = augment_patch(image, generator)
        matches = [i for i, c in enumerate(_symmetries(image)) if torch.allclose(out, c, atol=1e-6)]
        assert matches, "augmented patch is not a symmetry/inversion of the input"
        seen.add(matches[0])
    assert len(seen) == 16  # every rotation, mirror and inversion occurs


def test_augment_contrast_stays_in_unit_range_and_is_seeded() -> None:
    image = torch.rand(1, 28, 28)
    outs = [augment_patch(image, torch.Generator().manual_seed(s)) for s in range(50)]
    assert all(o.shape == image.shape and o.dtype == torch.float32 for o in outs)
    assert all(float(o.min()) >= 0.0 and float(o.max()) <= 1.0 for o in outs)
    spreads = torch.tensor([float(o.std()) for o in outs])
    assert float(spreads.max() / spreads.min()) > 1.3  # contrast really varies
    again = augment_patch(image, torch.Generator().manual_seed(3))
    assert torch.equal(again, outs[3])


def test_augment_applies_to_train_only_and_is_validated() -> None:
    val = ImagePatches("val", scales=(0.25,), augment=True)
    assert not val.augment
    assert torch.equal(val[5]["image"], val.images[5])
    train = ImagePatches("train", scales=(0.25,), augment=True)
    torch.manual_seed(0)
    changed = sum(not torch.equal(train[i]["image"], train.images[i]) for i in range(20))
    assert changed >= 15
    with pytest.raises(ValueError, match="augment must be true or false"):
        ImagePatches("val", scales=(0.25,), augment="yes")  # type: ignore[arg-type]


def test_recipe_builds_the_measured_configuration() -> None:
    recipe = load_recipe(RECIPE)
    config = recipe.train_config()
    assert config.data == {"augment": True}
    vae = create_model("conv_decoder_vae", **config.model_overrides)
    assert vae.config.reconstruction_loss == "mse" and vae.config.beta == pytest.approx(1e-3)
    assert vae.config.decoder.channels == (128, 64, 32)  # widest next to the latent
    # hardsigmoid saturates: a saturated patch is reproduced to float rounding (the final 32->28 bilinear
    # resize), i.e. at the PSNR floor (MSE 1e-10), where a sigmoid output stays ~40 dB off.
    with torch.no_grad():
        vae.decoder.final_layer[-2].bias.fill_(100.0)
        out = vae.eval().decode(torch.zeros(2, vae.latent_dim))
    assert float((out - 1.0).abs().max()) < 1e-6


def test_heldout_patches_leave_out_the_flat_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = patches.heldout_patches(28)
    spans = kept.amax(dim=(1, 2, 3)) - kept.amin(dim=(1, 2, 3))
    assert bool((spans >= patches.FLAT_RANGE).all())
    monkeypatch.setattr(patches, "FLAT_RANGE", -1.0)  # keep everything: the logo and phantom have flat patches
    everything = patches.heldout_patches(28)
    flat = everything[(everything.amax(dim=(1, 2, 3)) - everything.amin(dim=(1, 2, 3))) < 1.0 / 255]
    assert len(flat) > 0 and len(everything) == len(kept) + len(flat)
