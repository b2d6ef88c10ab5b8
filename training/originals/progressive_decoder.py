"""Original PRISM `ProgressiveDecoder` checkpoints (its BatchNorm wrapper's `.main.` is dropped)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from training.models.progressive_decoder import ProgressiveDecoder

_DEPRECATED_ARGS = {"use_leaky": True, "middle_activation": "tanh", "complex_data": False}


def load_original(constructor_args: dict[str, Any],
                  state_dict: dict[str, torch.Tensor]) -> ProgressiveDecoder:
    """Build from PRISM's constructor arguments and load its state_dict (``.main.`` of the BN wrapper
    dropped), strictly; eval mode."""
    args = dict(constructor_args)
    for name, default in _DEPRECATED_ARGS.items():
        if name in args and args.pop(name) != default:
            warnings.warn(f"{name} is ignored by ProgressiveDecoder (deprecated in PRISM)",
                          DeprecationWarning, stacklevel=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = ProgressiveDecoder.create(**args)
    mapped = {key.replace(".main.", "."): value for key, value in state_dict.items()}
    model.load_state_dict(mapped, strict=True)
    return model.eval()
