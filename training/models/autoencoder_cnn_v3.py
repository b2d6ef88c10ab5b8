"""AutoEncoder CNN V3: a grayscale image autoencoder with a pure latent bottleneck.

Faithful re-implementation of the original `AutoEncoder_CNNV3_0` (droplet-viscosity project; facts in
`/work/shared/reference/autoencoder-cnn-v3.md`). Module names equal the original's, so original
checkpoints load with the identity key map.

    encoder: stem (conv7×7/2 → BN → ReLU → maxpool3×3/2, c0//2 channels) → one block per stage
             → [self-attention over the H·W positions] → latent projection
             conv:    adaptive-avg-pool 4×4 → flatten → Linear → ReLU          latent (B, latent_size)
             spatial: adaptive-avg-pool 4×4 → conv1×1 → BN → ReLU              latent (B, Cz, 4, 4)
    decoder: unprojection to (B, ch[-1], 4, 4) → per stage (nearest ×2 → block) with the reversed
             block/channel lists, the last stage always 64 channels → head (nearest ×2 → conv3×3 → BN →
             ReLU → conv3×3 → sigmoid) renders a square 4·2^(S+1) image → bilinear resize to input_size.

The 4×4 pooling uses averaging matrices built from the runtime H/W (training/layers/pooling.py), so
`encode` exports to ONNX with dynamic H/W. Quirks kept on purpose: the stem is c0//2 wide, the decoder's
last stage is hard-wired to 64 channels, and `dropout` (the original's `DropOut`) applies Dropout(0.45)
to the latent in `forward` only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.layers.blocks import BLOCK_TYPES
from training.layers.v3_encoder_decoder import DECODER_LAST_CHANNELS, LATENT_GRID, Decoder, Encoder
from training.models.base import ExportOp, OpModule, config_to_dict
from training.registry import register_model

LATENT_STRATEGIES = ("conv", "spatial")
LATENT_SIZE_RANGE = (128, 8192)
LATENT_DROPOUT = 0.45

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"latent_size": 128, "block_config": ("resnet", "resnet"),
             "channel_config": (32, 64), "stride_config": (2, 2)},
    "small": {"latent_size": 512, "block_config": ("resnet", "se", "resnet"),
              "channel_config": (64, 128, 256), "stride_config": (2, 2, 2)},
    "medium": {"latent_size": 2048, "block_config": ("resnet", "resnext", "se"),
               "channel_config": (64, 128, 256), "stride_config": (2, 2, 2)},
    "large": {"latent_size": 8192, "block_config": ("resnext", "resnext", "se", "se"),
              "channel_config": (64, 128, 256, 512), "stride_config": (2, 2, 2, 2)},
}


@dataclass(frozen=True)
class AutoEncoderV3Config:
    """Everything that defines an AutoEncoderCNNV3 (defaults = the original class defaults = small/conv).

    `input_size` is (H, W). `embedding_dim` is the V1 alias: when set it replaces `latent_size`.
    `dropout` is the original's `DropOut` flag (Dropout(0.45) on the latent in `forward`, train mode).
    """

    latent_size: int = 512
    block_config: tuple[str, ...] = ("resnet", "se", "resnet")
    channel_config: tuple[int, ...] = (64, 128, 256)
    stride_config: tuple[int, ...] = (2, 2, 2)
    latent_strategy: str = "conv"
    use_attention: bool = True
    input_size: tuple[int, int] = (201, 201)
    dropout: bool = False
    embedding_dim: int | None = None

    def __post_init__(self) -> None:
        def setattr_(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        setattr_("block_config", tuple(str(b).lower() for b in self.block_config))
        setattr_("channel_config", tuple(int(c) for c in self.channel_config))
        setattr_("stride_config", tuple(int(s) for s in self.stride_config))
        setattr_("input_size", tuple(int(s) for s in self.input_size))
        if self.embedding_dim is not None:
            setattr_("latent_size", int(self.embedding_dim))
        self._validate()

    def _validate(self) -> None:
        lo, hi = LATENT_SIZE_RANGE
        if not lo <= self.latent_size <= hi:
            raise ValueError(
                f"latent_size (or embedding_dim) must lie in [{lo}, {hi}], got {self.latent_size}")
        if self.latent_strategy not in LATENT_STRATEGIES:
            raise ValueError(
                f"latent_strategy must be one of {LATENT_STRATEGIES}, got {self.latent_strategy!r}")
        unknown = [b for b in self.block_config if b not in BLOCK_TYPES]
        if unknown:
            raise ValueError(
                f"block_config has unknown block types {unknown}; allowed: {', '.join(BLOCK_TYPES)}")
        lengths = (len(self.block_config), len(self.channel_config), len(self.stride_config))
        if len(set(lengths)) != 1 or lengths[0] == 0:
            raise ValueError("block_config, channel_config and stride_config must be non-empty and "
                             f"equally long, got lengths {lengths}")
        if self.channel_config[0] < 2 or min(self.channel_config) < 1:
            raise ValueError(
                f"channel_config must be positive with channel_config[0] >= 2, got {self.channel_config}")
        if min(self.stride_config) < 1:
            raise ValueError(f"stride_config entries must be >= 1, got {self.stride_config}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size must be (H, W) with positive entries, got {self.input_size}")
        decoder_outs = (*reversed(self.channel_config[:-1]), DECODER_LAST_CHANNELS)
        for block, out in zip((*self.block_config, *reversed(self.block_config)),
                              (*self.channel_config, *decoder_outs), strict=True):
            if block == "inception" and out % 4:
                raise ValueError(
                    f"block_config: an 'inception' stage needs channels divisible by 4, got {out}")
            if block == "resnext" and out < 16:
                raise ValueError(f"block_config: a 'resnext' stage needs at least 16 channels, got {out}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AutoEncoderV3Config:
        """Inverse of `config_to_dict` (lists become tuples)."""
        return cls(**values)

    @property
    def num_stages(self) -> int:
        return len(self.block_config)

    @property
    def latent_channels(self) -> int:
        """Cz of the spatial latent (B, Cz, 4, 4)."""
        return max(self.latent_size // (LATENT_GRID * LATENT_GRID), 8)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Native latent shape per sample: (latent_size,) or (Cz, 4, 4)."""
        if self.latent_strategy == "conv":
            return (self.latent_size,)
        return (self.latent_channels, LATENT_GRID, LATENT_GRID)

    @property
    def latent_dim(self) -> int:
        """Length of the flat latent `encode` returns."""
        return math.prod(self.latent_shape)

    @property
    def total_stride(self) -> int:
        """Input pixels per final encoder cell along each axis (stem ÷4, then each stage's stride)."""
        return 4 * math.prod(self.stride_config)

    @property
    def min_input_side(self) -> int:
        """Smallest H and W served: one more than the total stride, so the final encoder map is at least
        2 cells wide (a 1-cell map still runs in eager/ONNX, but torch.export specialises size-1 axes)."""
        return self.total_stride + 1

    @property
    def rendered_size(self) -> int:
        """Side of the square image the decoder renders before the final bilinear resize."""
        return LATENT_GRID * 2 ** (self.num_stages + 1)


class AutoEncoderCNNV3(nn.Module):
    """The V3 autoencoder. API of the original: `forward`, `Embedding`, `encode`, `decode`,
    `decode_from_latent`, `get_attention_matrix`, `get_attention_map`, `get_config`."""

    family: ClassVar[str] = "autoencoder-cnn-v3"

    def __init__(self, config: AutoEncoderV3Config) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.dropout = nn.Dropout(p=LATENT_DROPOUT)

    # --- original API -------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, 1, H, W) at input_size; x must be (B, 1, *input_size)."""
        latent = self.encoder(x)
        if self.config.dropout:
            latent = self.dropout(latent)
        return self.decoder(latent)

    def Embedding(self, x: torch.Tensor) -> torch.Tensor:
        """Latent in its native shape: (B, latent_size) or (B, Cz, 4, 4)."""
        return self.encoder(x)

    def encode(self, x: torch.Tensor, record_attention: bool = True) -> torch.Tensor:
        """Flat latent (B, latent_dim) for LSTMs; accepts any H/W."""
        return self.encoder(x, record_attention=record_attention).flatten(1)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Image (B, 1, *input_size) from a flat (B, D) or native latent."""
        if self.config.latent_strategy == "spatial" and latent.ndim == 2:
            latent = latent.reshape(latent.shape[0], *self.config.latent_shape)
        return self.decoder(latent)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The served reconstruction: like `forward` without latent dropout or recorded attention."""
        return self.decoder(self.encoder(x, record_attention=False))

    def decode_from_latent(self, latent: torch.Tensor) -> torch.Tensor:
        """Alias of `decode`."""
        return self.decode(latent)

    def get_attention_matrix(self, x: torch.Tensor) -> torch.Tensor | None:
        """Head-averaged self-attention (B, N, N) of an encoder pass over x; None without attention."""
        if self.encoder.attention is None:
            return None
        self.encoder(x)
        return self.encoder.attention.attention_weights

    def get_attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """Gradient saliency (B, 1, H, W): |∂ sum((forward(x) − x)²) / ∂x|, min-max normalised with one
        global min and max over the whole batch (denominator + 1e-8). Works under `torch.no_grad()` and,
        unlike the original, leaves no gradients on the parameters."""
        with torch.enable_grad():
            x_leaf = x.detach().clone().requires_grad_(True)
            error = F.mse_loss(self.forward(x_leaf), x_leaf, reduction="sum")
            (grad,) = torch.autograd.grad(error, x_leaf)
        saliency = grad.abs()
        return (saliency - saliency.min()) / (saliency.max() - saliency.min() + 1e-8)

    def get_config(self) -> dict[str, Any]:
        """The config as a plain dict; `AutoEncoderV3Config.from_dict` rebuilds it."""
        return config_to_dict(self.config)

    # --- convenience attributes of the original -------------------------------------------------
    @property
    def latent_size(self) -> int:
        return self.config.latent_size

    @property
    def latent_strategy(self) -> str:
        return self.config.latent_strategy

    @property
    def use_attention(self) -> bool:
        return self.config.use_attention

    @property
    def input_size(self) -> tuple[int, int]:
        return self.config.input_size

    # --- family protocol ------------------------------------------------------------------------
    def capabilities(self) -> list[str]:
        caps = ["encode", "decode", "reconstruct"]
        if self.config.use_attention:
            caps.append("attention-map")
        return caps

    def preprocessing(self) -> dict[str, Any]:
        side = self.config.min_input_side
        return {
            "channels": 1,
            "input_size": list(self.config.input_size),
            "resize": "bilinear",
            "dynamic_hw": True,
            "min_hw": [side, side],
            # encode runs at any size; its working memory grows with the pixels (v3_small on ONNX Runtime
            # CPU: +11 MiB per 512x512 frame, +475 MiB at 2048x2048), so the service caps a frame at
            # 512x512 worth of pixels (a batch of 32 stays under 0.5 GB) and either side at 4096
            "max_hw": [4096, 4096],
            "max_pixels": 512 * 512,
            "output_range": [0.0, 1.0],
        }

    def encode_check_sizes(self) -> list[tuple[int, int]]:
        """(H, W) sizes unlike input_size at which the dynamic-H/W encode export must be verified."""
        h, w = self.config.input_size
        smallest = self.config.min_input_side
        sizes = [(h, max(smallest, w // 2 + 3)), (180, 240), (max(smallest, h // 2 + 5), w + 37)]
        unique = list(dict.fromkeys(s for s in sizes if s != (h, w)))
        return unique

    def export_ops(self, batch_size: int = 2) -> list[ExportOp]:
        h, w = self.config.input_size
        image = torch.rand(batch_size, 1, h, w)
        latent = torch.rand(batch_size, self.config.latent_dim)
        ops = [
            ExportOp(
                name="encode", module=OpModule(self, "encode", record_attention=False), example_inputs=(image,),
                input_names=["image"], output_names=["latent"], dynamic_hw=True,
                check_shapes=[((batch_size + i % 2, 1, sh, sw),)
                              for i, (sh, sw) in enumerate(self.encode_check_sizes())],
            ),
            ExportOp(
                name="decode", module=OpModule(self, "decode"), example_inputs=(latent,),
                input_names=["latent"], output_names=["image"],
                check_shapes=[((batch_size + 1, self.config.latent_dim),)],
            ),
            ExportOp(
                name="reconstruct", module=OpModule(self, "reconstruct"), example_inputs=(image,),
                input_names=["image"], output_names=["reconstruction"],
                check_shapes=[((batch_size + 1, 1, h, w),)],
            ),
        ]
        if self.config.use_attention:
            ops.append(ExportOp(
                name="attention_matrix", module=OpModule(self.encoder, "attention_matrix"), example_inputs=(image,),
                input_names=["image"], output_names=["attention"],
                check_shapes=[((batch_size + 1, 1, h, w),)],
            ))
        return ops


# --- factory (original names) -------------------------------------------------------------------
_ORIGINAL_ALIASES = {"DropOut": "dropout"}
_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(AutoEncoderV3Config))


def config_kwargs(values: dict[str, Any]) -> dict[str, Any]:
    """Original keyword names (e.g. `DropOut`) → config field names; unknown names raise."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = _ORIGINAL_ALIASES.get(key, key)
        if name not in _CONFIG_FIELDS:
            allowed = ", ".join((*_CONFIG_FIELDS, *_ORIGINAL_ALIASES))
            raise TypeError(f"unknown AutoEncoderCNNV3 option {key!r}; allowed: {allowed}")
        out[name] = value
    return out


def preset_config(preset: str, input_size: tuple[int, int] | list[int] = (201, 201),
                  **overrides: Any) -> AutoEncoderV3Config:
    """Config of a preset ("tiny", "small", "medium", "large") with overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from: {', '.join(PRESETS)}")
    values = {**PRESETS[preset], **config_kwargs(overrides), "input_size": tuple(input_size)}
    return AutoEncoderV3Config(**values)


def create_autoencoder(preset: str = "small", input_size: tuple[int, int] | list[int] = (201, 201),
                       **overrides: Any) -> AutoEncoderCNNV3:
    """The original factory: preset + (H, W) input size + overrides (original or config names)."""
    return AutoEncoderCNNV3(preset_config(preset, input_size, **overrides))


# --- registered variants ----------------------------------------------------------------------
@register_model("v3_tiny")
def v3_tiny(**overrides: Any) -> AutoEncoderCNNV3:
    return create_autoencoder("tiny", **overrides)


@register_model("v3_small")
def v3_small(**overrides: Any) -> AutoEncoderCNNV3:
    return create_autoencoder("small", **overrides)


@register_model("v3_medium")
def v3_medium(**overrides: Any) -> AutoEncoderCNNV3:
    return create_autoencoder("medium", **overrides)


@register_model("v3_large")
def v3_large(**overrides: Any) -> AutoEncoderCNNV3:
    return create_autoencoder("large", **overrides)
