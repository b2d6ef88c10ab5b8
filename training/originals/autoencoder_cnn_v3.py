"""Original `AutoEncoder_CNNV3_0` checkpoints: module names are the original's (identity key map)."""

from __future__ import annotations

from typing import Any

import torch

from training.models.autoencoder_cnn_v3 import (
    AutoEncoderCNNV3,
    AutoEncoderV3Config,
    config_kwargs,
    create_autoencoder,
)


def load_original(constructor_args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> AutoEncoderCNNV3:
    """Build from the original constructor arguments (`create_autoencoder` args with "preset", or the
    class's own keyword arguments) and load an original state_dict. Key map: identity."""
    args = dict(constructor_args)
    if "preset" in args:
        model = create_autoencoder(**args)
    else:
        model = AutoEncoderCNNV3(AutoEncoderV3Config(**config_kwargs(args)))
    model.load_state_dict(state_dict, strict=True)
    return model.eval()
