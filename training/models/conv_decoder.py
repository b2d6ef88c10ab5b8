"""ConvDecoder family: a latent -> image convolutional decoder, and the VAE it is trained in.

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

`ConvVAE` wraps a ConvDecoder with a small strided-conv encoder (mean and log-variance heads), the
reparameterisation trick and a KL term; it is the model the store serves
(encode / decode / reconstruct / sample).

Reconstruction likelihood (`reconstruction_loss`): "bce" = Bernoulli likelihood, binary cross-entropy
summed over the pixels of an image (needs a [0, 1] output: sigmoid or hardsigmoid); "mse" = Gaussian
likelihood with fixed unit variance up to constants, squared error summed over the pixels. Both and the
KL term are sums per image, averaged over the batch, so `beta=1` is the standard ELBO.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.layers.factories import (
    ACTIVATIONS,
    FINAL_ACTIVATIONS,
    NORMALIZATIONS,
    check_choice,
    final_activation_range,
    make_activation,
    make_final_activation,
    make_norm2d,
)
from training.models.base import ExportOp, config_to_dict
from training.registry import register_model

UPSAMPLING_MODES: tuple[str, ...] = ("transpose", "bilinear", "nearest", "bicubic")
RECONSTRUCTION_LOSSES: tuple[str, ...] = ("bce", "mse")


def _positive_int(option: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}; got {value!r}")


def _int_pair(option: str, value: Any) -> tuple[int, int]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{option} must be a pair (H, W) of positive integers; got {value!r}")
    for v in value:
        _positive_int(option, v)
    return (int(value[0]), int(value[1]))


def _check_bool(option: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False; got {value!r}")


# --------------------------------------------------------------------------------------------------
# Configs
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
        object.__setattr__(self, "output_size", _int_pair("output_size", self.output_size))
        if self.init_size is not None:
            object.__setattr__(self, "init_size", _int_pair("init_size", self.init_size))
        self._validate()

    def _validate(self) -> None:
        _positive_int("latent_dim", self.latent_dim)
        if not isinstance(self.hidden_dims, tuple) or not self.hidden_dims:
            raise ValueError("hidden_dims must be a non-empty list of positive integers; "
                             f"got {self.hidden_dims!r}")
        for width in self.hidden_dims:
            _positive_int("hidden_dims", width)
        _positive_int("output_channels", self.output_channels)
        _positive_int("kernel_size", self.kernel_size)
        _positive_int("stride", self.stride)
        _positive_int("padding", self.padding, minimum=0)
        _positive_int("output_padding", self.output_padding, minimum=0)
        for flag in ("bias", "use_spectral_norm", "use_self_attention"):
            _check_bool(flag, getattr(self, flag))
        check_choice("normalization", self.normalization, NORMALIZATIONS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_choice("final_activation", self.final_activation, FINAL_ACTIVATIONS)
        check_choice("upsampling_mode", self.upsampling_mode, UPSAMPLING_MODES)
        if isinstance(self.dropout_rate, bool) or not isinstance(self.dropout_rate, int | float) \
                or not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be a number in [0, 1); got {self.dropout_rate!r}")
        _positive_int("attention_resolution", self.attention_resolution)
        _positive_int("attention_heads", self.attention_heads)
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
            _positive_int("encoder_channels", width)
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


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H·W positions with a plain residual (original layout).

    `query`/`key`/`value`/`proj_out` are conv1×1 C->C with bias; channel `head·d + j` belongs to head
    `head` (d = C / heads); softmax(qᵀk · d^-0.5) over the keys; output = x + proj_out(attention).
    Uses `scaled_dot_product_attention`, so eager runs never hold the (N, N) matrix where a fused
    kernel exists.
    """

    def __init__(self, channels: int, heads: int = 8) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"SelfAttention2d needs channels ({channels}) divisible by heads ({heads})")
        self.heads = heads
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, heads, N, d)
        return t.flatten(2).unflatten(1, (self.heads, -1)).transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v)                  # (B, heads, N, d)
        out = out.transpose(-2, -1).flatten(1, 2).unflatten(2, x.shape[-2:])
        return x + self.proj_out(out)


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
# ConvVAE
# --------------------------------------------------------------------------------------------------


class _EncodeMean(nn.Module):
    """Export wrapper: image -> posterior mean (B, D)."""

    def __init__(self, vae: ConvVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(image)


class _Reconstruct(nn.Module):
    """Export wrapper: image -> decode(posterior mean)."""

    def __init__(self, vae: ConvVAE) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.reconstruct(image)


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
            ExportOp(name="encode", module=_EncodeMean(frozen).eval(), example_inputs=(images,),
                     input_names=["image"], output_names=["latent"],
                     check_shapes=[((b, *image),) for b in other_batches]),
            ExportOp(name="decode", module=frozen.decoder,
                     example_inputs=(torch.randn(batch_size, d, device=device),),
                     input_names=["latent"], output_names=["image"],
                     check_shapes=[((b, d),) for b in other_batches]),
            ExportOp(name="reconstruct", module=_Reconstruct(frozen).eval(), example_inputs=(images,),
                     input_names=["image"], output_names=["reconstruction"],
                     check_shapes=[((b, *image),) for b in other_batches]),
        ]


# --------------------------------------------------------------------------------------------------
# Training contract
# --------------------------------------------------------------------------------------------------


def _reconstruction_loss(model: ConvVAE, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood summed over the pixels of each image, averaged over the batch.

    Computed in float32 outside autocast (binary_cross_entropy refuses to autocast, and sums of
    thousands of pixels need the precision).
    """
    with torch.autocast(device_type=recon.device.type, enabled=False):
        recon, target = recon.float(), target.float()
        if model.config.reconstruction_loss == "bce":
            per_batch = F.binary_cross_entropy(recon, target, reduction="sum")
        else:
            per_batch = F.mse_loss(recon, target, reduction="sum")
    return per_batch / recon.shape[0]


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent, averaged over the batch."""
    mu, logvar = mu.float(), logvar.float()
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).sum() / mu.shape[0]


def _require_vae(model: nn.Module) -> ConvVAE:
    if not isinstance(model, ConvVAE):
        raise TypeError(f"the conv-decoder family trains as a ConvVAE; got {type(model).__name__} "
                        "(build it with create_model('conv_decoder_vae'))")
    return model


def training_losses(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{"loss": recon + beta * kl, "recon", "kl"} for a batch {"image": (B, C, H, W) in [0, 1]}."""
    vae = _require_vae(model)
    image = batch["image"]
    recon, mu, logvar = vae(image)
    rec = _reconstruction_loss(vae, recon, vae.to_output_range(image))
    kl = kl_divergence(mu, logvar)
    return {"loss": rec + vae.config.beta * kl, "recon": rec.detach(), "kl": kl.detach()}


@torch.no_grad()
def validation_metrics(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """psnr/ssim/mse of decode(mean) against the image, and the deterministic loss terms.

    "loss" = recon(decode(mu)) + beta * kl, i.e. the training objective with z at the posterior mean,
    so it is free of sampling noise.
    """
    from training.metrics import mse, psnr, ssim

    vae = _require_vae(model)
    was_training = vae.training
    vae.eval()
    try:
        image = batch["image"]
        mu, logvar = vae.encode_stats(image)
        recon = vae.decode(mu)
    finally:
        vae.train(was_training)
    target = vae.to_output_range(image)
    lo, hi = vae.config.decoder.output_range
    rec = _reconstruction_loss(vae, recon, target)
    kl = kl_divergence(mu, logvar)
    smallest_side = min(image.shape[-2:])
    window = 11 if smallest_side >= 11 else (smallest_side - 1) // 2 * 2 + 1  # odd window that fits
    return {
        "loss": float(rec + vae.config.beta * kl),
        "recon": float(rec),
        "kl": float(kl),
        "mse": float(mse(recon, target)),
        "psnr": float(psnr(recon, target, data_range=hi - lo)),
        "ssim": float(ssim(recon, target, data_range=hi - lo, window=window)),
    }


# --------------------------------------------------------------------------------------------------
# Original checkpoints
# --------------------------------------------------------------------------------------------------

_ORIGINAL_ONLY_ARGS = ("use_batch_norm",)


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


# --------------------------------------------------------------------------------------------------
# Registered variants: the four recommended configurations of the hyperparameter document, and the VAE
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

# The served VAE's decoder: small enough to train on a CPU. init_size is chosen so the network renders
# just above the target (4·2³ = 32 for 28×28, 5·2³ = 40 for 32×32) instead of twice its size; batch
# norm learned clearly faster than group norm in short runs on the patch data (same step count).
VAE_DECODER = dict(latent_dim=32, hidden_dims=(64, 32, 16), output_size=(28, 28), init_size=(4, 4),
                   activation="leaky_relu", final_activation="sigmoid", normalization="batch",
                   upsampling_mode="bilinear")
VAE_DECODER_32 = {**VAE_DECODER, "output_size": (32, 32), "init_size": (5, 5)}


def _decoder(preset: dict[str, Any], overrides: dict[str, Any]) -> ConvDecoder:
    return ConvDecoder(ConvDecoderConfig(**{**preset, **overrides}))


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


@register_model("conv_decoder_vae")
def conv_decoder_vae(**overrides: Any) -> ConvVAE:
    """The served VAE at 28×28 (see `conv_decoder_vae_32` for 32×32)."""
    return _vae(VAE_DECODER, overrides)


@register_model("conv_decoder_vae_32")
def conv_decoder_vae_32(**overrides: Any) -> ConvVAE:
    """The served VAE at 32×32."""
    return _vae(VAE_DECODER_32, overrides)
