"""Original ai-design `ConditionalUNet` checkpoints: module paths are the original's (no key map)."""

from __future__ import annotations

from typing import Any

import torch

from training.models.diffusion_unet import DiffusionUNet, DiffusionUNetConfig

_ORIGINAL_ARG_NAMES = {"use_gradient_checkpointing": "gradient_checkpointing"}


def config_from_original(constructor_args: dict[str, Any], **extra: Any) -> DiffusionUNetConfig:
    """Our config from the original `ConditionalUNet(**constructor_args)` (+ our own fields)."""
    values = {_ORIGINAL_ARG_NAMES.get(k, k): v for k, v in constructor_args.items()}
    return DiffusionUNetConfig.from_dict({**values, **extra})


def load_original(constructor_args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> DiffusionUNet:
    """Build from the original constructor args and load its state_dict (same keys) strictly."""
    model = DiffusionUNet(config_from_original(constructor_args))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
