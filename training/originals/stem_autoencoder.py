"""Original `Autoencoder(latent_dim, out_shape)` checkpoints of 4DSTEM_AE_MSc (Lightning or plain)."""

from __future__ import annotations

from typing import Any

import torch

from training.models.stem_autoencoder import StemAutoencoder, StemAutoencoderConfig

_ORIGINAL_PREFIXES = ("model.",)   # Lightning wraps the autoencoder as `model`


def original_key_to_ours(key: str) -> str:
    """Original state_dict key -> ours (drops a Lightning `model.` prefix, flattens decoder.decoder)."""
    for prefix in _ORIGINAL_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    if key.startswith("decoder.decoder."):
        key = "decoder." + key[len("decoder.decoder."):]
    return key


def load_original(constructor_args: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> StemAutoencoder:
    """Build from the original `Autoencoder(latent_dim, out_shape)` arguments and load its weights."""
    allowed = {"latent_dim", "out_shape"}
    unknown = sorted(set(constructor_args) - allowed)
    if unknown:
        raise ValueError(f"unknown original Autoencoder arguments {unknown}; allowed: {sorted(allowed)}")
    config = StemAutoencoderConfig(
        latent_dim=int(constructor_args.get("latent_dim", 32)),
        out_shape=tuple(int(s) for s in constructor_args.get("out_shape", (256, 256))),
    )
    model = StemAutoencoder(config)
    model.load_state_dict({original_key_to_ours(k): v for k, v in state_dict.items()}, strict=True)
    return model.eval()
