"""Training objective of the AutoEncoder CNN V3 family: MSE reconstruction."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training import image_quality
from training.models.autoencoder_cnn_v3 import AutoEncoderCNNV3


def training_losses(model: AutoEncoderCNNV3, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MSE reconstruction loss of batch["image"] (B, 1, H, W) in [0, 1] at the model's input_size."""
    image = batch["image"]
    mse = F.mse_loss(model(image), image)
    return {"loss": mse, "mse": mse.detach()}


@torch.no_grad()
def validation_metrics(model: AutoEncoderCNNV3, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """PSNR, SSIM (data range 1) and MSE of the reconstruction of batch["image"]."""
    image = batch["image"]
    recon = model(image)
    return {
        "psnr": float(image_quality.psnr(recon, image, data_range=1.0)),
        "ssim": float(image_quality.ssim(recon, image, data_range=1.0)),
        "mse": float(image_quality.mse(recon, image)),
    }
