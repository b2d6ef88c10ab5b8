"""Load the original projects' checkpoints into our families (fidelity against the fixtures).

`load_original(family, constructor_args, state_dict)` builds our model from the original
constructor arguments, maps the original state_dict keys, loads strictly and returns an eval-mode
module. Each family module provides `load_original(constructor_args, state_dict)` with its own key
map; this module only dispatches by the fixture folder name.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn as nn

FAMILY_LOADERS = {
    "autoencoder-cnn-v3": "training.models.autoencoder_cnn_v3",
    "stem-autoencoder": "training.models.stem_autoencoder",
    "progressive-decoder": "training.models.progressive_decoder",
    "conv-decoder": "training.models.conv_decoder",
    "diffusion-decoder": "training.models.diffusion_unet",
}


def load_original(family: str, constructor_args: dict[str, Any],
                  state_dict: dict[str, torch.Tensor]) -> nn.Module:
    if family not in FAMILY_LOADERS:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILY_LOADERS)}")
    module = importlib.import_module(FAMILY_LOADERS[family])
    model = module.load_original(constructor_args, state_dict)
    return model.eval()
