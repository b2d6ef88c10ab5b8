"""Training objective of the diffusion decoder: ε-prediction MSE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from training.image_quality import psnr
from training.models.diffusion_unet import DiffusionUNet
from training.schedules import q_sample

# Fixed timesteps and noise seed of `validation_metrics` (comparable across epochs).
VALIDATION_TIMESTEPS = (50, 250, 500, 750, 950)
VALIDATION_SEED = 1234


def training_losses(model: DiffusionUNet, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ε-prediction MSE with t ~ U{0 … T−1} and ε ~ N(0, I) from the global generator."""
    image = batch["image"]
    condition = batch.get("condition")
    schedule = model.noise_schedule().to(image.device)
    t = torch.randint(0, schedule.num_train_timesteps, (image.shape[0],), device=image.device)
    noise = torch.randn_like(image)
    eps = model(q_sample(schedule, image, t, noise), t, condition)
    loss = F.mse_loss(eps, noise)
    return {"loss": loss, "eps_mse": loss.detach()}


@torch.no_grad()
def validation_metrics(model: DiffusionUNet, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """ε-MSE at the fixed timesteps VALIDATION_TIMESTEPS with noise from a fixed-seed generator.

    Also the PSNR (data range 2) of the x̂_0 implied by the prediction. Runs in eval mode.
    """
    image = batch["image"]
    condition = batch.get("condition")
    schedule = model.noise_schedule().to(image.device)
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    was_training = model.training
    model.eval()
    metrics: dict[str, float] = {}
    total, total_psnr = 0.0, 0.0
    try:
        for step in VALIDATION_TIMESTEPS:
            noise = torch.randn(image.shape, generator=generator).to(image.device)
            t = torch.full((image.shape[0],), step, dtype=torch.long, device=image.device)
            x_t = q_sample(schedule, image, t, noise)
            eps = model(x_t, t, condition)
            value = F.mse_loss(eps, noise).item()
            alpha_bar = schedule.alphas_cumprod[step]
            x0 = ((x_t - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()).clamp(-1, 1)
            metrics[f"eps_mse_t{step}"] = value
            total += value
            total_psnr += psnr(x0, image, data_range=2.0).item()
    finally:
        model.train(was_training)
    metrics["eps_mse"] = total / len(VALIDATION_TIMESTEPS)
    metrics["x0_psnr"] = total_psnr / len(VALIDATION_TIMESTEPS)
    return metrics
