"""Training objective of the 4D-STEM autoencoder: the original regularised loss.

total = mse + lambda_act * mean|z| + lambda_sim * contrastive + lambda_div * divergence, with the
weights of the model's config (the defaults of the original `compute_loss`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from training.image_quality import mse, psnr, ssim

if TYPE_CHECKING:  # the model module imports `compute_loss` from here
    from training.models.stem_autoencoder import StemAutoencoder

CONTRASTIVE_MARGIN = 1.0
DIVERGENCE_EPS = 1e-8


def contrastive_loss(z: torch.Tensor, margin: float = CONTRASTIVE_MARGIN) -> torch.Tensor:
    """Mean over pairs i < j of ReLU(cos(z_i, z_j) - margin); 0 for a batch of one."""
    batch = z.shape[0]
    if batch < 2:
        return z.new_zeros(())
    normed = F.normalize(z, p=2, dim=1)
    similarity = normed @ normed.t()
    rows, cols = torch.triu_indices(batch, batch, offset=1, device=z.device)
    return F.relu(similarity[rows, cols] - margin).mean()


def divergence_loss(z: torch.Tensor, eps: float = DIVERGENCE_EPS) -> torch.Tensor:
    """Mean over latent dims of 1 / (unbiased batch variance + eps).

    The original returns NaN for a batch of one (unbiased variance of one sample); here it is 0.
    """
    if z.shape[0] < 2:
        return z.new_zeros(())
    variance = torch.var(z, dim=0)
    return torch.mean(1.0 / (variance + eps))


def compute_loss(x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor, lambda_act: float = 1e-4,
                 lambda_sim: float = 5e-5, lambda_div: float = 2e-4) -> dict[str, torch.Tensor]:
    """Every term of the original regularised loss (key names as the original's dict).

    total = mse + lambda_act * mean|z| + lambda_sim * contrastive + lambda_div * divergence.
    """
    mse_loss = F.mse_loss(x_hat, x)
    l1_reg = torch.mean(torch.abs(z))
    contrastive_reg = contrastive_loss(z)
    divergence_reg = divergence_loss(z)
    total = mse_loss + lambda_act * l1_reg + lambda_sim * contrastive_reg + lambda_div * divergence_reg
    return {
        "total_loss": total,
        "mse_loss": mse_loss,
        "l1_reg": l1_reg,
        "contrastive_reg": contrastive_reg,
        "divergence_reg": divergence_reg,
    }


def training_losses(model: StemAutoencoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original loss terms for batch["image"] (B, 1, H, W); "loss" = total_loss."""
    x = batch["image"]
    z = model.embed(x)
    x_hat = model.decoder(z)
    if x_hat.shape[-2:] != x.shape[-2:]:
        x_hat = F.interpolate(x_hat, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    cfg = model.config
    terms = compute_loss(x, x_hat, z, lambda_act=cfg.lambda_act, lambda_sim=cfg.lambda_sim,
                         lambda_div=cfg.lambda_div)
    return {"loss": terms["total_loss"], **terms}


@torch.no_grad()
def validation_metrics(model: StemAutoencoder, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """PSNR, SSIM and MSE of the reconstruction (data range 1)."""
    x = batch["image"]
    x_hat = model(x)
    return {
        "psnr": float(psnr(x_hat, x, data_range=1.0)),
        "ssim": float(ssim(x_hat, x, data_range=1.0)),
        "mse": float(mse(x_hat, x)),
    }
