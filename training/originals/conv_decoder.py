"""Original ImageDGD `ConvDecoder` checkpoints (spectral-norm hook names become parametrizations)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from training.models.conv_decoder import ConvDecoder, ConvDecoderConfig


def config_from_original(constructor_args: dict[str, Any]) -> ConvDecoderConfig:
    """Map the original `ConvDecoder(**kwargs)` arguments onto a ConvDecoderConfig.

    `use_batch_norm=False` with normalization 'batch' means 'none'; normalization 'spectral' (accepted
    by the original) means no normalization and, by the bias rule, bias-free convolutions.
    """
    args = dict(constructor_args)
    use_batch_norm = args.pop("use_batch_norm", True)
    normalization = args.get("normalization", "batch")
    if normalization == "batch" and not use_batch_norm:
        normalization = "none"
    if normalization == "spectral":
        normalization = "none"
        args["bias"] = False
    args["normalization"] = normalization
    known = {f.name for f in dataclasses.fields(ConvDecoderConfig)}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unsupported original ConvDecoder arguments: {', '.join(unknown)}")
    return ConvDecoderConfig(**args)


def _map_original_key(key: str) -> str:
    """Original spectral-norm hook names -> parametrization names; everything else is unchanged."""
    for suffix, ours in (("weight_orig", "parametrizations.weight.original"),
                         ("weight_u", "parametrizations.weight.0._u"),
                         ("weight_v", "parametrizations.weight.0._v")):
        if key.endswith("." + suffix):
            return key[: -len(suffix)] + ours
    return key


def load_original(constructor_args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> ConvDecoder:
    """Build a ConvDecoder from the original constructor args and load the original state_dict strictly."""
    model = ConvDecoder(config_from_original(constructor_args))
    model.load_state_dict({_map_original_key(k): v for k, v in state_dict.items()}, strict=True)
    return model.eval()
