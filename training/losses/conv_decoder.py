"""Training objective of the conv-decoder family: the ELBO of its ConvVAE (`training.models.conv_vae`).

Reconstruction likelihood (`ConvVAEConfig.reconstruction_loss`): "bce" = Bernoulli likelihood, binary
cross-entropy summed over the pixels of an image (needs a [0, 1] output: sigmoid or hardsigmoid);
"mse" = Gaussian likelihood with fixed unit variance up to constants, squared error summed over the
pixels. Both and the KL term are sums per image, averaged over the batch, so `beta=1` is the standard
ELBO.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.image_quality import mse, psnr, ssim
from training.models.conv_vae import ConvVAE


def _reconstruction_loss(model: ConvVAE, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood summed over the pixels of each image, averaged over the batch.

    Computed in float32 outside autocast (binary_cross_entropy refuses to autocast, and sums of
    thousands of pixels need the precision).
    """
    with torch.autocast(device_type=recon.device.type, enabled=False):
        recon, target = recon.float(), target.float()
        if model.config.reconstruction_loss == "bce":
            per_batch = F.binary_cross_entropy(recon, target, reduction="sum")
        else:
            per_batch = F.mse_loss(recon, target, reduction="sum")
    return per_batch / recon.shape[0]


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent, averaged over the batch."""
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum() / mu.shape[0]


def _require_vae(model: nn.Module) -> ConvVAE:
    if not isinstance(model, ConvVAE):
        raise TypeError(f"the conv-decoder family trains as a ConvVAE; got {type(model).__name__} "
                        "(build it with create_model('conv_decoder_vae'))")
    return model


def training_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"loss": recon + beta * kl, "recon", "kl"} for a batch {"image": (B, C, H, W) in [0, 1]}."""
    vae = _require_vae(model)
    image = batch["image"]
    recon, mu, logvar = vae(image)
    rec = _reconstruction_loss(vae, recon, vae.to_output_range(image))
    kl = kl_divergence(mu, logvar)
    return {"loss": rec + vae.config.beta * kl, "recon": rec.detach(), "kl": kl.detach()}


@torch.no_grad()
def validation_metrics(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """psnr/ssim/mse of decode(mean) against the image, and the deterministic loss terms.

    "loss" = recon(decode(mu)) + beta * kl, i.e. the training objective with z at the posterior mean,
    so it is free of sampling noise.
    """
    vae = _require_vae(model)
    was_training = vae.training
    vae.eval()
    try:
        image = batch["image"]
        mu, logvar = vae.encode_stats(image)
        recon = vae.decode(mu)
    finally:
        vae.train(was_training)
    target = vae.to_output_range(image)
    lo, hi = vae.config.decoder.output_range
    rec = _reconstruction_loss(vae, recon, target)
    kl = kl_divergence(mu, logvar)
    smallest_side = min(image.shape[-2:])
    window = 11 if smallest_side >= 11 else (smallest_side - 1) // 2 * 2 + 1  # odd window that fits
    return {
        "loss": float(rec + vae.config.beta * kl),
        "recon": float(rec),
        "kl": float(kl),
        "mse": float(mse(recon, target)),
        "psnr": float(psnr(recon, target, data_range=hi - lo)),
        "ssim": float(ssim(recon, target, data_range=hi - lo, window=window)),
    }
