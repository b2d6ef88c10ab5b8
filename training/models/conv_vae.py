"""The VAE the ConvDecoder family trains and serves: `ConvVAE` (family "conv-decoder").

`ConvVAE` wraps a ConvDecoder (`training.models.conv_decoder`) with a small strided-conv encoder (mean
and log-variance heads), the reparameterisation trick and a KL term; it is the model the store serves
(encode / decode / reconstruct / sample). Its objective lives in `training.losses.conv_decoder`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from training.layers.factories import (
    check_choice,
    check_positive_int,
    final_activation_range,
    make_activation,
    make_norm2d,
)
from training.models.base import ExportOp, OpModule, config_to_dict
from training.models.conv_decoder import ConvDecoder, ConvDecoderConfig, materialized_state_dict
from training.registry import register_model

RECONSTRUCTION_LOSSES: tuple[str, ...] = ("bce", "mse")


@dataclass(frozen=True)
class ConvVAEConfig:
    """A ConvDecoder plus the encoder and loss settings of the VAE it is trained in.

    The encoder is `len(encoder_channels)` blocks of conv3×3 stride 2 -> normalization -> activation
    (the decoder's `normalization`/`activation`), then flatten and two linear heads (mean, log-variance).
    Images are `decoder.output_channels` × `decoder.output_size`, with values in [0, 1].
    """

    decoder: ConvDecoderConfig = dataclasses.field(default_factory=ConvDecoderConfig)
    encoder_channels: tuple[int, ...] = (32, 64, 128)
    beta: float = 1.0
    reconstruction_loss: str = "bce"

    def __post_init__(self) -> None:
        if isinstance(self.decoder, dict):
            object.__setattr__(self, "decoder", ConvDecoderConfig(**self.decoder))
        if not isinstance(self.decoder, ConvDecoderConfig):
            raise ValueError("decoder must be a ConvDecoderConfig or a dict of its fields; "
                             f"got {self.decoder!r}")
        if isinstance(self.encoder_channels, list | tuple):
            object.__setattr__(self, "encoder_channels", tuple(self.encoder_channels))
        if not isinstance(self.encoder_channels, tuple) or not self.encoder_channels:
            raise ValueError(f"encoder_channels must be a non-empty list of positive integers; "
                             f"got {self.encoder_channels!r}")
        for width in self.encoder_channels:
            check_positive_int("encoder_channels", width)
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or self.beta < 0:
            raise ValueError(f"beta must be a number >= 0; got {self.beta!r}")
        check_choice("reconstruction_loss", self.reconstruction_loss, RECONSTRUCTION_LOSSES)
        final = self.decoder.final_activation
        if self.reconstruction_loss == "bce" and final_activation_range(final) != (0.0, 1.0):
            raise ValueError("reconstruction_loss='bce' needs outputs in [0, 1] (final_activation sigmoid "
                             f"or hardsigmoid); got final_activation={final!r}; use 'mse'")

    @property
    def encoder_output_size(self) -> tuple[int, int]:
        h, w = self.decoder.output_size
        for _ in self.encoder_channels:
            h, w = (h + 1) // 2, (w + 1) // 2   # conv3×3, stride 2, padding 1
        return (h, w)


class ConvVAE(nn.Module):
    """Variational autoencoder whose decoder is a ConvDecoder (the served conv-decoder model)."""

    family: ClassVar[str] = "conv-decoder"

    def __init__(self, config: ConvVAEConfig) -> None:
        super().__init__()
        self.config = config
        dec = config.decoder
        layers: list[nn.Module] = []
        in_channels = dec.output_channels
        for width in config.encoder_channels:
            conv = nn.Conv2d(in_channels, width, 3, stride=2, padding=1, bias=dec.normalization == "none")
            layers += [conv, make_norm2d(dec.normalization, width), make_activation(dec.activation)]
            in_channels = width
        self.encoder = nn.Sequential(*layers)
        eh, ew = config.encoder_output_size
        self.fc_mu = nn.Linear(in_channels * eh * ew, dec.latent_dim)
        self.fc_logvar = nn.Linear(in_channels * eh * ew, dec.latent_dim)
        self.decoder = ConvDecoder(dec)

    @property
    def latent_dim(self) -> int:
        return self.config.decoder.latent_dim

    # ---- computation ----

    def encode_stats(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, C, H, W) in [0, 1] -> posterior mean and log-variance, each (B, latent_dim)."""
        features = self.encoder(image).flatten(1)
        return self.fc_mu(features), self.fc_logvar(features)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The posterior mean (deterministic embedding)."""
        return self.encode_stats(image)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image))

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, mu, logvar); z is sampled in training mode and the mean in eval mode."""
        mu, logvar = self.encode_stats(image)
        z = self.reparameterize(mu, logvar) if self.training else mu
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decoder.sample(n, generator)

    def to_output_range(self, image: torch.Tensor) -> torch.Tensor:
        """Map a [0, 1] image to the decoder's output range (the reconstruction target)."""
        lo, hi = self.config.decoder.output_range
        return image * (hi - lo) + lo

    # ---- family protocol ----

    def get_config(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def capabilities(self) -> list[str]:
        return ["encode", "decode", "reconstruct", "sample"]

    def preprocessing(self) -> dict[str, Any]:
        dec = self.config.decoder
        return {"channels": dec.output_channels, "input_size": list(dec.output_size), "resize": "bilinear",
                "output_range": list(dec.output_range)}

    def sampler_spec(self) -> dict[str, Any]:
        return {"kind": "prior_gaussian", "latent_dim": self.latent_dim}

    def export_module(self) -> ConvVAE:
        """An eval-mode copy with spectral norm folded into plain weights (what gets exported)."""
        decoder = dataclasses.replace(self.config.decoder, use_spectral_norm=False)
        plain = ConvVAE(dataclasses.replace(self.config, decoder=decoder))
        plain.load_state_dict(materialized_state_dict(self))
        return plain.to(self.fc_mu.weight.device).eval()

    def export_ops(self, batch_size: int = 2) -> list[ExportOp]:
        frozen = self.export_module()
        dec = self.config.decoder
        device = frozen.fc_mu.weight.device
        image = (dec.output_channels, *dec.output_size)
        d = dec.latent_dim
        images = torch.rand(batch_size, *image, device=device)
        other_batches = [1, batch_size + 3]
        return [
            ExportOp(name="encode", module=OpModule(frozen, "encode").eval(), example_inputs=(images,),
                     input_names=["image"], output_names=["latent"],
                     check_shapes=[((b, *image),) for b in other_batches]),
            ExportOp(name="decode", module=frozen.decoder,
                     example_inputs=(torch.randn(batch_size, d, device=device),),
                     input_names=["latent"], output_names=["image"],
                     check_shapes=[((b, d),) for b in other_batches]),
            ExportOp(name="reconstruct", module=OpModule(frozen, "reconstruct").eval(), example_inputs=(images,),
                     input_names=["image"], output_names=["reconstruction"],
                     check_shapes=[((b, *image),) for b in other_batches]),
        ]


# --------------------------------------------------------------------------------------------------
# Registered variants
# --------------------------------------------------------------------------------------------------

# The served VAE's decoder: small enough to train on a CPU. init_size is chosen so the network renders
# just above the target (4·2³ = 32 for 28×28, 5·2³ = 40 for 32×32) instead of twice its size; batch
# norm learned clearly faster than group norm in short runs on the patch data (same step count).
VAE_DECODER = dict(latent_dim=32, hidden_dims=(64, 32, 16), output_size=(28, 28), init_size=(4, 4),
                   activation="leaky_relu", final_activation="sigmoid", normalization="batch",
                   upsampling_mode="bilinear")
VAE_DECODER_32 = {**VAE_DECODER, "output_size": (32, 32), "init_size": (5, 5)}


def _vae(decoder_preset: dict[str, Any], overrides: dict[str, Any]) -> ConvVAE:
    """Overrides may name VAE fields, a whole `decoder` (dict or config) or single decoder fields."""
    vae_fields = {f.name for f in dataclasses.fields(ConvVAEConfig)} - {"decoder"}
    decoder = overrides.pop("decoder", None)
    if isinstance(decoder, ConvDecoderConfig):
        decoder = config_to_dict(decoder)
    decoder_args = {**decoder_preset, **(decoder or {})}
    vae_args = {k: overrides.pop(k) for k in list(overrides) if k in vae_fields}
    decoder_args.update(overrides)
    return ConvVAE(ConvVAEConfig(decoder=ConvDecoderConfig(**decoder_args), **vae_args))


@register_model("conv_decoder_vae")
def conv_decoder_vae(**overrides: Any) -> ConvVAE:
    """The served VAE at 28×28 (see `conv_decoder_vae_32` for 32×32)."""
    return _vae(VAE_DECODER, overrides)


@register_model("conv_decoder_vae_32")
def conv_decoder_vae_32(**overrides: Any) -> ConvVAE:
    """The served VAE at 32×32."""
    return _vae(VAE_DECODER_32, overrides)
