"""ConvDecoder family: a latent -> image convolutional decoder (the VAE it is trained in: `conv_vae`).

`ConvDecoder` reproduces the decoder of ImageDGD (`adriansousapoza/ImageDGD@b1608a1`,
`src/models/dgd.py`); see `/work/shared/reference/conv-decoder.md`. Shape of the network:

    z (B, D) -> Linear -> (B, c[0], h0, w0) -> m blocks [upsample ×2 -> conv -> norm -> act
    -> dropout -> self-attention?] -> final [upsample ×2 -> conv c[m]->c[m] -> norm -> act
    -> conv3×3 -> final activation] -> resize to output_size when the rendered size differs

Behaviour kept from the original because the fixtures depend on it: `hidden_dims` is extended and then
*reversed* (the widest layer sits next to the image), the extension repeats one value, the final layer
adds one ×2 more than `n_up` counts (28×28 is rendered at 48×48 and resampled), convolutions carry a
bias only without normalization, group norm uses min(8, C) groups, attention is inserted where the
nominal height h0·2^(i+1) reaches `attention_resolution`. Deliberate differences: the caller's list is
never modified, every block gets its own activation module (the original shares one instance; the
outputs of a loaded checkpoint are identical), and the final resize is decided from the size the
layers really produce (the original compares a nominal size, which is the same for stride-2 defaults).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from training.layers.attention import SelfAttention2d
from training.layers.factories import (
    ACTIVATIONS,
    FINAL_ACTIVATIONS,
    NORMALIZATIONS,
    check_bool,
    check_choice,
    check_int_pair,
    check_positive_int,
    final_activation_range,
    make_activation,
    make_final_activation,
    make_norm2d,
)
from training.models.base import ExportOp, config_to_dict
from training.registry import register_model

UPSAMPLING_MODES: tuple[str, ...] = ("transpose", "bilinear", "nearest", "bicubic")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvDecoderConfig:
    """Every hyperparameter of the ConvDecoder; defaults are the original constructor's.

    `hidden_dims` has the original's meaning: listed from the image side towards the latent (the list
    is extended to `n_up + 1` entries and reversed, so the first entry is the width next to the
    output). `init_size=None` means (max(2, H // 8), max(2, W // 8)). `attention_resolution` is the
    original default 32 (the hyperparameter document says 16). `stride`/`output_padding` only matter
    with `upsampling_mode="transpose"`.
    """

    latent_dim: int = 64
    hidden_dims: tuple[int, ...] = (512, 256, 128, 64, 32)
    output_channels: int = 1
    output_size: tuple[int, int] = (28, 28)
    init_size: tuple[int, int] | None = None
    kernel_size: int = 3
    stride: int = 2
    padding: int = 1
    output_padding: int = 1
    bias: bool = True
    normalization: str = "batch"
    activation: str = "leaky_relu"
    final_activation: str = "sigmoid"
    dropout_rate: float = 0.0
    upsampling_mode: str = "transpose"
    use_spectral_norm: bool = False
    use_self_attention: bool = False
    attention_resolution: int = 32
    attention_heads: int = 8

    def __post_init__(self) -> None:
        # JSON/YAML give lists; the frozen config keeps tuples.
        if isinstance(self.hidden_dims, list | tuple):
            object.__setattr__(self, "hidden_dims", tuple(self.hidden_dims))
        object.__setattr__(self, "output_size", check_int_pair("output_size", self.output_size))
        if self.init_size is not None:
            object.__setattr__(self, "init_size", check_int_pair("init_size", self.init_size))
        self._validate()

    def _validate(self) -> None:
        check_positive_int("latent_dim", self.latent_dim)
        if not isinstance(self.hidden_dims, tuple) or not self.hidden_dims:
            raise ValueError("hidden_dims must be a non-empty list of positive integers; "
                             f"got {self.hidden_dims!r}")
        for width in self.hidden_dims:
            check_positive_int("hidden_dims", width)
        check_positive_int("output_channels", self.output_channels)
        check_positive_int("kernel_size", self.kernel_size)
        check_positive_int("stride", self.stride)
        check_positive_int("padding", self.padding, minimum=0)
        check_positive_int("output_padding", self.output_padding, minimum=0)
        for flag in ("bias", "use_spectral_norm", "use_self_attention"):
            check_bool(flag, getattr(self, flag))
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("final_activation", self.final_activation, FINAL_ACTIVATIONS)
        check_choice("upsampling_mode", self.upsampling_mode, UPSAMPLING_MODES)
        if isinstance(self.dropout_rate, bool) or not isinstance(self.dropout_rate, int | float) \
                or not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be a number in [0, 1); got {self.dropout_rate!r}")
        check_positive_int("attention_resolution", self.attention_resolution)
        check_positive_int("attention_heads", self.attention_heads)
        if self.upsampling_mode == "transpose" and self.output_padding >= self.stride:
            raise ValueError(f"output_padding={self.output_padding} must be smaller than "
                             f"stride={self.stride} with upsampling_mode='transpose'")
        channels = self.channels
        for i in self.attention_blocks:
            if channels[i + 1] % self.attention_heads:
                raise ValueError(f"use_self_attention needs the channels of block {i} ({channels[i + 1]}) to "
                                 f"be divisible by attention_heads={self.attention_heads}")
        for stage, (h, w) in enumerate(self.stage_sizes):
            if h < 1 or w < 1:
                raise ValueError(f"kernel_size={self.kernel_size}, padding={self.padding} shrink the feature "
                                 f"map to {h}x{w} at stage {stage}; use a larger padding")

    # ---- derived sizes (section 1 of the reference) ----

    @property
    def resolved_init_size(self) -> tuple[int, int]:
        if self.init_size is not None:
            return self.init_size
        height, width = self.output_size
        return (max(2, height // 8), max(2, width // 8))

    @property
    def num_upsamples(self) -> int:
        (height, width), (h0, w0) = self.output_size, self.resolved_init_size
        return max(int(math.log2(height / h0)), int(math.log2(width / w0)))

    @property
    def channels(self) -> tuple[int, ...]:
        """Channel widths c[0..m] from the latent side to the image side (extended, reversed)."""
        dims = list(self.hidden_dims)
        missing = self.num_upsamples + 1 - len(dims)
        if missing > 0:
            last = dims[-1]
            dims.extend([last // 2 if last > 8 else last] * missing)
        return tuple(reversed(dims))

    @property
    def attention_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks that end with self-attention (the test uses the init height only)."""
        if not self.use_self_attention:
            return ()
        h0 = self.resolved_init_size[0]
        return tuple(i for i in range(len(self.channels) - 1)
                     if h0 * 2 ** (i + 1) >= self.attention_resolution)

    def _upsampled(self, size: int) -> int:
        if self.upsampling_mode == "transpose":
            return (size - 1) * self.stride - 2 * self.padding + self.kernel_size + self.output_padding
        return 2 * size + 2 * self.padding - self.kernel_size + 1

    @property
    def stage_sizes(self) -> list[tuple[int, int]]:
        """(H, W) after the projection, after every block and after the final layer."""
        sizes = [self.resolved_init_size]
        for _ in range(len(self.channels)):  # m blocks + the final layer's upsampling conv
            h, w = sizes[-1]
            sizes.append((self._upsampled(h), self._upsampled(w)))
            if min(sizes[-1]) < 1:
                break
        return sizes

    @property
    def rendered_size(self) -> tuple[int, int]:
        """Size the layers produce before the final resize."""
        return self.stage_sizes[-1]

    @property
    def output_range(self) -> tuple[float, float]:
        """Range of the decoded images; unbounded outputs (identity) are nominally trained on [0, 1]."""
        return final_activation_range(self.final_activation) or (0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def _upsample(mode: str) -> nn.Upsample:
    if mode == "nearest":
        return nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Upsample(scale_factor=2, mode=mode, align_corners=False)


def _upsampling_conv(config: ConvDecoderConfig, in_channels: int, out_channels: int) -> nn.Module:
    """The conv of a block: ConvTranspose2d in transpose mode, else a stride-1 Conv2d."""
    bias = config.bias and config.normalization == "none"
    if config.upsampling_mode == "transpose":
        conv: nn.Module = nn.ConvTranspose2d(in_channels, out_channels, config.kernel_size, config.stride,
                                             config.padding, config.output_padding, bias=bias)
    else:
        conv = nn.Conv2d(in_channels, out_channels, config.kernel_size, 1, config.padding, bias=bias)
    if config.use_spectral_norm:
        conv = nn.utils.parametrizations.spectral_norm(conv)
    return conv


def materialized_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict with every parametrized tensor (spectral norm) replaced by its eval-mode value.

    `X.parametrizations.weight.original` / `._u` / `._v` become one plain `X.weight` = original / sigma,
    sigma taken from the stored power-iteration vectors (what eager inference computes), so a model
    built without parametrizations loads it and computes the same function with plain weights.
    """
    was_training = module.training
    module.eval()
    try:
        state: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key, value in module.state_dict().items():
                if ".parametrizations." not in key:
                    state[key] = value
                    continue
                prefix, rest = key.split(".parametrizations.", 1)
                name, _, tail = rest.partition(".")
                if tail == "original":
                    state[f"{prefix}.{name}"] = getattr(module.get_submodule(prefix), name).detach().clone()
    finally:
        module.train(was_training)
    return state


# --------------------------------------------------------------------------------------------------
# ConvDecoder
# --------------------------------------------------------------------------------------------------


class ConvDecoder(nn.Module):
    """Latent (B, latent_dim) -> image (B, output_channels, H, W); see the module docstring."""

    family: ClassVar[str] = "conv-decoder"

    def __init__(self, config: ConvDecoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels
        h0, w0 = config.resolved_init_size
        self.decoder_input = nn.Linear(config.latent_dim, c[0] * h0 * w0, bias=config.bias)
        attention = set(config.attention_blocks)
        blocks = []
        for i in range(len(c) - 1):
            layers = self._stage(c[i], c[i + 1])
            if config.dropout_rate > 0:
                layers.append(nn.Dropout(config.dropout_rate))
            if i in attention:
                layers.append(SelfAttention2d(c[i + 1], config.attention_heads))
            blocks.append(nn.Sequential(*layers))
        self.final_layer = nn.Sequential(
            *self._stage(c[-1], c[-1]),
            nn.Conv2d(c[-1], config.output_channels, 3, padding=1),
            make_final_activation(config.final_activation),
        )
        self.decoder = nn.Sequential(*blocks)  # registered last, as in the original (state_dict order)
        self.final_resize: nn.Module = nn.Identity()
        if config.rendered_size != config.output_size:
            mode = "bilinear" if config.upsampling_mode == "transpose" else config.upsampling_mode
            align = None if mode == "nearest" else False
            self.final_resize = nn.Upsample(size=config.output_size, mode=mode, align_corners=align)

    def _stage(self, in_channels: int, out_channels: int) -> list[nn.Module]:
        """[upsample ×2] -> conv -> norm -> activation (no module for normalization 'none')."""
        cfg = self.config
        layers: list[nn.Module] = []
        if cfg.upsampling_mode != "transpose":
            layers.append(_upsample(cfg.upsampling_mode))
        layers.append(_upsampling_conv(cfg, in_channels, out_channels))
        if cfg.normalization != "none":  # the original adds no module at all for 'none'
            layers.append(make_norm2d(cfg.normalization, out_channels))
        layers.append(make_activation(cfg.activation))
        return layers

    # ---- computation ----

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, output_channels, *output_size)."""
        h0, w0 = self.config.resolved_init_size
        x = self.decoder_input(z).unflatten(1, (-1, h0, w0))
        x = self.final_layer(self.decoder(x))
        return self.final_resize(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode `n` latents drawn from the N(0, I) prior."""
        device = self.decoder_input.weight.device
        z = torch.randn(n, self.config.latent_dim, generator=generator, device=device)
        return self.decode(z)

    # ---- family protocol ----

    def get_config(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def capabilities(self) -> list[str]:
        return ["decode", "sample"]

    def preprocessing(self) -> dict[str, Any]:
        return {"channels": self.config.output_channels, "input_size": None, "resize": "none",
                "output_range": list(self.config.output_range)}

    def sampler_spec(self) -> dict[str, Any]:
        return {"kind": "prior_gaussian", "latent_dim": self.config.latent_dim}

    def export_module(self) -> ConvDecoder:
        """An eval-mode copy with spectral norm folded into plain weights (what gets exported)."""
        plain = ConvDecoder(dataclasses.replace(self.config, use_spectral_norm=False))
        plain.load_state_dict(materialized_state_dict(self))
        return plain.to(self.decoder_input.weight.device).eval()

    def export_ops(self, batch_size: int = 2) -> list[ExportOp]:
        d = self.config.latent_dim
        return [ExportOp(
            name="decode", module=self.export_module(),
            example_inputs=(torch.randn(batch_size, d, device=self.decoder_input.weight.device),),
            input_names=["latent"], output_names=["image"],
            check_shapes=[((1, d),), ((batch_size + 3, d),)],
        )]


# --------------------------------------------------------------------------------------------------
# Registered variants: the four recommended configurations of the hyperparameter document
# --------------------------------------------------------------------------------------------------

PRESETS: dict[str, dict[str, Any]] = {
    "fashion_mnist": dict(latent_dim=64, hidden_dims=(256, 128, 64), output_size=(28, 28), activation="relu",
                          final_activation="sigmoid", normalization="batch", upsampling_mode="bilinear",
                          dropout_rate=0.1),
    "cifar10": dict(latent_dim=128, hidden_dims=(512, 256, 128, 64), output_size=(32, 32), activation="gelu",
                    final_activation="sigmoid", normalization="group", upsampling_mode="bilinear",
                    dropout_rate=0.1),
    # Attention at every block from 32×32 up (N up to 256² positions): memory-heavy by design.
    "high_res": dict(latent_dim=256, hidden_dims=(1024, 512, 256, 128, 64), output_size=(128, 128),
                     activation="swish", final_activation="sigmoid", normalization="group",
                     upsampling_mode="bilinear", use_self_attention=True, attention_resolution=32,
                     dropout_rate=0.1),
    # The document gives no size: the constructor default 28×28.
    "gan": dict(latent_dim=128, hidden_dims=(512, 256, 128, 64), activation="relu", final_activation="tanh",
                normalization="none", use_spectral_norm=True, upsampling_mode="transpose"),
}


def _decoder(preset: dict[str, Any], overrides: dict[str, Any]) -> ConvDecoder:
    return ConvDecoder(ConvDecoderConfig(**{**preset, **overrides}))


@register_model("conv_decoder_fashion_mnist")
def conv_decoder_fashion_mnist(**overrides: Any) -> ConvDecoder:
    return _decoder(PRESETS["fashion_mnist"], overrides)


@register_model("conv_decoder_cifar10")
def conv_decoder_cifar10(**overrides: Any) -> ConvDecoder:
    return _decoder(PRESETS["cifar10"], overrides)


@register_model("conv_decoder_high_res")
def conv_decoder_high_res(**overrides: Any) -> ConvDecoder:
    return _decoder(PRESETS["high_res"], overrides)


@register_model("conv_decoder_gan")
def conv_decoder_gan(**overrides: Any) -> ConvDecoder:
    return _decoder(PRESETS["gan"], overrides)
