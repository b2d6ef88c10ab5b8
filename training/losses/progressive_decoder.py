"""Training objective of the ProgressiveDecoder: fit measurements through a forward operator.

``loss = mean |A(model()) - measurement|²`` for the operator ``A`` the batch describes (see
`training.forward_operators.operator_from_batch` and `training.data.single_image`).
"""

from __future__ import annotations

import math

import torch

from training.forward_operators import operator_from_batch
from training.image_quality import mse, psnr, ssim
from training.models.progressive_decoder import ProgressiveDecoder


def training_losses(model: ProgressiveDecoder, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``loss = mean |A(model()) - measurement|²`` (A from the batch) + logged object MSE."""
    operator = operator_from_batch(batch)
    image = model()
    predicted = operator(image.float())
    loss = (predicted - batch["measurement"]).pow(2).mean()
    with torch.no_grad():
        obj = operator.object_of(image.float())
        object_mse = (obj - batch["target"]).pow(2).mean()
    return {"loss": loss, "data_mse": loss.detach(), "object_mse": object_mse}


@torch.no_grad()
def validation_metrics(model: ProgressiveDecoder, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """PSNR / SSIM / MSE of the rendered object region against the true object, plus the data misfit."""
    operator = operator_from_batch(batch)
    image = model.generate_fp32()
    target = batch["target"].float()
    obj = operator.object_of(image).expand_as(target)
    if operator.twin_ambiguous and mse(obj.flip(-1, -2), target) < mse(obj, target):
        obj = obj.flip(-1, -2)  # |F x| cannot tell x from its 180° twin: score the better orientation
    low, high = model.output_range()
    data_range = high - low
    window = min(11, target.shape[-1] - (1 - target.shape[-1] % 2))
    data_mse = (operator(image) - batch["measurement"]).pow(2).mean()
    return {
        "psnr": float(psnr(obj, target, data_range=data_range)),
        "ssim": float(ssim(obj, target, data_range=data_range, window=window)) if window >= 3 else math.nan,
        "mse": float(mse(obj, target)),
        "data_mse": float(data_mse),
    }
