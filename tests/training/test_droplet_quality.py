"""Issue 9 (V3 on droplet videos): the default store's droplet models start from committed weights that beat
the equal-size bicubic thumbnail on frames of videos no autoencoder run reads (the quality report's data)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from training.data.droplets import generate_sequence, stream_seed
from training.quality.baselines import bicubic_thumbnail
from training.quality.evaluation import per_image_psnr
from training.recipes import load_recipe
from training.registry import create_model

RECIPES = Path(__file__).resolve().parents[2] / "model_store" / "recipes"
# recipe file -> (frames checked, margin over the thumbnail in dB that the committed weights must keep). The
# report's 40 held-out frames measured +5.8 dB for the crops (4.6..7.3 dB per frame on these 8) and +2.25 dB
# for the strips (1.2..3.0 per frame, +2.27 on these 4): the bounds leave room for other CPUs' float rounding
# and the smaller samples; the strips' is the issue's target (+1 dB).
DROPLET_RECIPES = {"15-v3-droplet-201.yaml": (8, 3.0), "25-v3-droplet-1280x152.yaml": (4, 1.0)}


@pytest.mark.parametrize(("recipe_file", "frames", "margin_db"),
                         [(name, *bounds) for name, bounds in DROPLET_RECIPES.items()])
def test_committed_droplet_weights_beat_the_thumbnail_on_heldout_frames(
    recipe_file: str, frames: int, margin_db: float
) -> None:
    recipe = load_recipe(RECIPES / recipe_file)
    config = recipe.train_config()
    assert recipe.init_path() is not None and recipe.init_path().is_file()
    assert config.epochs == 0  # the store exports the committed weights as they are
    model = create_model(recipe.model, **config.model_overrides).eval()
    model.load_state_dict({k: v.float() for k, v in load_file(str(recipe.init_path())).items()}, strict=True)
    size = tuple(model.config.input_size)
    view = "strip" if size[1] > 4 * size[0] else "crop"
    images = []
    for index in range(frames):  # as training.quality.autoencoders._droplet_frames picks them
        video = stream_seed("lstm-heldout", index, config.seed)
        frame = int(np.random.default_rng([video, 3]).integers(64))
        images.append(generate_sequence(video, 64, view, size, indices=[frame]).frames[0][None])
    batch = torch.from_numpy(np.stack(images).astype(np.float32))
    with torch.no_grad():
        reconstruction = model.reconstruct(batch).clamp(0.0, 1.0)
    thumbnail, values = bicubic_thumbnail(batch, model.config.latent_dim)
    assert abs(values - model.config.latent_dim) <= 20  # an equal-size baseline
    gain = float(per_image_psnr(batch, reconstruction).mean() - per_image_psnr(batch, thumbnail).mean())
    assert gain >= margin_db, f"{recipe.name}: {gain:+.2f} dB over the bicubic thumbnail"
