"""Every training run of a family with a report writes its pictures: STEM latent maps over the scan grid,
diffusion sample grids."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from training.config import TrainConfig
from training.registry import create_model
from training.tasks import task_for_family


def test_stem_run_renders_embedding_maps_over_the_scan_grid(tmp_path):
    torch.manual_seed(0)
    model = create_model("stem_ae", channels=8).eval()
    config = TrainConfig(model="stem_ae", model_overrides={"channels": 8})
    written = task_for_family("stem-autoencoder").report(model, config, tmp_path)
    assert [p.name for p in written] == ["embedding_maps_config0.png"]
    image = np.asarray(Image.open(written[0]))
    assert image.ndim == 3 and min(image.shape[:2]) > 100  # a grid of 32 maps, not an empty file
    assert image.std() > 0


def test_diffusion_run_writes_a_sample_grid(tmp_path):
    torch.manual_seed(0)
    model = create_model("diffusion_unet_tiny").eval()
    config = TrainConfig(model="diffusion_unet_tiny")
    with torch.no_grad():
        written = task_for_family("diffusion-decoder").report(model, config, tmp_path)
    image = Image.open(written[0])
    size = model.config.image_size
    side = 3 * (size + 1) + 1  # 8 samples (the condition grid) in a 3x3 grid with 1-pixel gaps
    assert written[0].name == "samples.png" and image.size == (side, side)
    pixels = np.asarray(image)
    assert pixels[1:1 + size, 1:1 + size].std() > 0  # a sample, not the background
