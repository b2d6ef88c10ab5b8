"""4D-STEM ResNet autoencoder (family "stem-autoencoder").

A faithful re-implementation of `Autoencoder(latent_dim, out_shape)` from lusephjoe/4DSTEM_AE_MSc at
commit 72436df (see shared/reference/stem-autoencoder.md). Diffraction patterns (B, 1, H, W) are
encoded into a non-negative latent vector (B, latent_dim); the decoder always renders 256x256 from a
4x4 seed and resamples to the target size T = max(out_shape).

Original behaviour kept on purpose (the fixtures decide):
* BatchNorm inside the residual blocks and after `conv_post`/`conv_final` is skipped on 1x1 maps
  (64x64 and 32x32 inputs reach 1x1 after the three pooling blocks).
* Each ResNet block pools to (t, t) with t = max(1, width // 4) — the width alone decides, so a
  non-square map becomes square.
* The final 4x4 adaptive average pool repeats values when the map is smaller than 4x4.
* No activation after the decoder's `linear` and `conv_initial`; sigmoid before the final resize.
* One reconstruction costs about 44 GMAC whatever the input size (128 channels at 256x256).

Adaptive average pooling is written as two averaging matrices built from the (static) map size,
which is exactly torch's `adaptive_avg_pool2d` and exports cleanly to ONNX.

`channels` (default 128, the original) sets the trunk width; the stem (`conv_input`) and `conv_post`
use channels // 2. Narrower widths exist for fast tests and cheap CPU training only.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.losses.stem_autoencoder import compute_loss
from training.models.base import ExportOp, OpModule, config_to_dict
from training.registry import register_model

FAMILY = "stem-autoencoder"
POOL_FACTOR = 4            # each encoder ResNet block divides the width by this
EMBED_GRID = 4             # the encoder's final adaptive pool: 4x4 = 16 embedding inputs
DECODER_SEED_SIZE = 4      # decoder starts from (channels, 4, 4)
DECODER_UP_FACTOR = 4      # each of the three decoder up blocks upsamples by this
DECODER_RENDER_SIZE = DECODER_SEED_SIZE * DECODER_UP_FACTOR**3   # 256


@dataclass(frozen=True)
class StemAutoencoderConfig:
    """Only constructor argument of `StemAutoencoder`.

    latent_dim:  size of the (non-negative) latent vector.
    out_shape:   (H, W) the model is used at; the decoder resamples to T x T with T = max(out_shape)
                 and this is the service's input size. It changes no parameter.
    channels:    trunk width (original: 128); conv_input and conv_post use channels // 2.
    lambda_act, lambda_sim, lambda_div: loss weights of `training.losses.stem_autoencoder` (the defaults of the
                 original `compute_loss`).
    """

    latent_dim: int = 32
    out_shape: tuple[int, int] = (64, 64)
    channels: int = 128
    lambda_act: float = 1e-4
    lambda_sim: float = 5e-5
    lambda_div: float = 2e-4

    def __post_init__(self) -> None:
        if not isinstance(self.latent_dim, int) or self.latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer; got {self.latent_dim!r}")
        shape = tuple(self.out_shape)
        if len(shape) != 2 or not all(isinstance(s, int) and s >= 1 for s in shape):
            raise ValueError(f"out_shape must be two positive integers (H, W); got {self.out_shape!r}")
        object.__setattr__(self, "out_shape", shape)
        if not isinstance(self.channels, int) or self.channels < 2 or self.channels % 2:
            raise ValueError(f"channels must be an even integer >= 2; got {self.channels!r}")
        for name in ("lambda_act", "lambda_sim", "lambda_div"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}")

    @property
    def target_size(self) -> int:
        """Side of the decoder's square output."""
        return max(self.out_shape)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StemAutoencoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown StemAutoencoderConfig fields {unknown}; allowed: {sorted(known)}")
        values = dict(data)
        if "out_shape" in values:
            values["out_shape"] = tuple(values["out_shape"])
        return cls(**values)


# ----------------------------------------------------------------------------------------- helpers


def _is_single_pixel(x: torch.Tensor) -> bool:
    return x.shape[-1] == 1 and x.shape[-2] == 1


def adaptive_pool_matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) averaging matrix of torch's adaptive average pooling along one axis.

    Cell i averages inputs floor(i*in/out) .. ceil((i+1)*in/out) - 1 (it repeats values when
    out_size > in_size). Built from Python numbers so exporters record it as a constant.
    """
    rows = []
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(in_size)])
    return torch.tensor(rows, dtype=like.dtype, device=like.device)


def adaptive_avg_pool(x: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """`F.adaptive_avg_pool2d` as two matrix products (ONNX-friendly, same numbers)."""
    height, width = int(x.shape[-2]), int(x.shape[-1])
    if (height, width) == out_hw:
        return x
    pool_h = adaptive_pool_matrix(height, out_hw[0], x)
    pool_w = adaptive_pool_matrix(width, out_hw[1], x)
    return torch.matmul(torch.matmul(pool_h, x), pool_w.t())


class ConditionalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that is skipped on 1x1 maps (as the original's `if H > 1 or W > 1`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if _is_single_pixel(x) else super().forward(x)


def _conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=True)


# ------------------------------------------------------------------------------------------ blocks


class ConvBlock(nn.Module):
    """conv1-[BN]-ReLU-conv2-[BN]-ReLU-conv3-[BN] + skip, ReLU (BN skipped on 1x1 maps)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out)
        self.bn1 = ConditionalBatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = ConditionalBatchNorm2d(c_out)
        self.conv3 = _conv3x3(c_out, c_out)
        self.bn3 = ConditionalBatchNorm2d(c_out)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.skip(x))


class IdentityBlock(nn.Module):
    """conv-[BN]-ReLU (no residual, despite the original's name)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv3x3(channels, channels)
        self.bn = ConditionalBatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResNetBlock(nn.Module):
    """ConvBlock, IdentityBlock, then adaptive average pool to (t, t), t = max(1, width // 4)."""

    def __init__(self, c_in: int, c_out: int, pool_factor: int = POOL_FACTOR) -> None:
        super().__init__()
        self.conv_block = ConvBlock(c_in, c_out)
        self.identity_block = IdentityBlock(c_out)
        self.pool_factor = pool_factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.identity_block(self.conv_block(x))
        side = max(1, x.shape[-1] // self.pool_factor)
        return adaptive_avg_pool(x, (side, side))


class ResNetUpBlock(nn.Module):
    """Bilinear x4 upsampling (align_corners=False), ConvBlock, IdentityBlock."""

    def __init__(self, c_in: int, c_out: int, scale: int = DECODER_UP_FACTOR) -> None:
        super().__init__()
        self.scale = scale
        self.conv_block = ConvBlock(c_in, c_out)
        self.identity_block = IdentityBlock(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        return self.identity_block(self.conv_block(x))


class EmbeddingLayer(nn.Module):
    """Linear then ReLU: non-negative latents."""

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(x))


# --------------------------------------------------------------------------------- encoder/decoder


class Encoder(nn.Module):
    """(B, 1, H, W) -> (B, latent_dim), non-negative. Accepts any H, W >= 1."""

    def __init__(self, latent_dim: int, channels: int) -> None:
        super().__init__()
        stem = channels // 2
        self.conv_input = _conv3x3(1, stem)
        self.bn_input = nn.BatchNorm2d(stem)
        self.conv_pre = _conv3x3(stem, channels)
        self.bn_pre = nn.BatchNorm2d(channels)
        self.resnet1 = ResNetBlock(channels, channels)
        self.resnet2 = ResNetBlock(channels, channels)
        self.resnet3 = ResNetBlock(channels, channels)
        self.conv_post = _conv3x3(channels, stem)
        self.bn_post = ConditionalBatchNorm2d(stem)
        self.conv_final = _conv3x3(stem, 1)
        self.bn_final = ConditionalBatchNorm2d(1)
        self.embedding = EmbeddingLayer(EMBED_GRID * EMBED_GRID, latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn_input(self.conv_input(x)))
        x = F.relu(self.bn_pre(self.conv_pre(x)))
        x = self.resnet3(self.resnet2(self.resnet1(x)))
        x = F.relu(self.bn_post(self.conv_post(x)))
        x = F.relu(self.bn_final(self.conv_final(x)))
        x = adaptive_avg_pool(x, (EMBED_GRID, EMBED_GRID))
        return self.embedding(torch.flatten(x, 1))


class Decoder(nn.Module):
    """(B, latent_dim) -> (B, 1, T, T) in [0, 1]: 4x4 seed, three x4 up blocks to 256, sigmoid, resize.

    This is the original `Decoder` with its inner `AdaptiveDecoder` flattened (original keys
    `decoder.decoder.*` are ours `decoder.*`).
    """

    def __init__(self, latent_dim: int, channels: int, target_size: int) -> None:
        super().__init__()
        self.channels = channels
        self.target_size = target_size
        self.linear = nn.Linear(latent_dim, channels * DECODER_SEED_SIZE * DECODER_SEED_SIZE)
        self.conv_initial = _conv3x3(channels, channels)
        self.resnet_up1 = ResNetUpBlock(channels, channels)
        self.resnet_up2 = ResNetUpBlock(channels, channels)
        self.resnet_up3 = ResNetUpBlock(channels, channels)
        self.conv_final = _conv3x3(channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.linear(z).view(z.shape[0], self.channels, DECODER_SEED_SIZE, DECODER_SEED_SIZE)
        x = self.conv_initial(x)
        x = self.resnet_up3(self.resnet_up2(self.resnet_up1(x)))
        x = torch.sigmoid(self.conv_final(x))
        if x.shape[-1] != self.target_size or x.shape[-2] != self.target_size:
            x = F.interpolate(x, size=(self.target_size, self.target_size), mode="bilinear",
                              align_corners=False)
        return x


# ------------------------------------------------------------------------------------------- model


class StemAutoencoder(nn.Module):
    """Encoder + decoder; `forward` reconstructs at the input's (H, W)."""

    family: ClassVar[str] = FAMILY

    def __init__(self, config: StemAutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config.latent_dim, config.channels)
        self.decoder = Decoder(config.latent_dim, config.channels, config.target_size)

    # -- capabilities
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> non-negative latent (B, latent_dim)."""
        return self.encoder(x)

    encode = embed

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, latent_dim) -> (B, 1, T, T) in [0, 1], T = max(out_shape)."""
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.decoder(self.encoder(x))
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        return y

    reconstruct = forward

    def compute_loss(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor,
                     lambda_act: float = 1e-4, lambda_sim: float = 5e-5,
                     lambda_div: float = 2e-4) -> dict[str, torch.Tensor]:
        """The original method: see `training.losses.stem_autoencoder.compute_loss`."""
        return compute_loss(x, x_hat, z, lambda_act=lambda_act, lambda_sim=lambda_sim,
                            lambda_div=lambda_div)

    # -- Family protocol
    def get_config(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def capabilities(self) -> list[str]:
        return ["encode", "decode", "reconstruct"]

    def preprocessing(self) -> dict[str, Any]:
        """[0, 1] patterns of `out_shape`; when that is the pattern size of the committed SrTiO3 data the family
        trains on, also that data's raw-detector normalisation (`intensity`, `pattern`), so the service takes
        raw detector frames (intensities or counts, any size and angular sampling) as the training data were."""
        from training.data.stem_4d import ASSET_PATH, raw_preprocessing

        fields: dict[str, Any] = {
            "channels": 1,
            "input_size": list(self.config.out_shape),
            "resize": "bilinear",
            "dynamic_hw": False,
            "output_range": [0.0, 1.0],   # sigmoid, then bilinear resampling (a convex combination)
        }
        raw = raw_preprocessing(ASSET_PATH) if ASSET_PATH.is_file() else None
        if raw is not None and tuple(raw["pattern"]["size"]) == self.config.out_shape:
            fields.update(raw)
        return fields

    def export_ops(self, batch_size: int = 2) -> list[ExportOp]:
        """encode, decode and reconstruct at the configured input size (static H, W).

        The encoder accepts other sizes in eager mode, but its control flow (BN skipped on 1x1 maps,
        pool sizes from the width) depends on the size, so exports are fixed-size; the service
        resizes to `out_shape`. `check_shapes` vary the batch.
        """
        height, width = self.config.out_shape
        image = torch.rand(batch_size, 1, height, width)
        latent = torch.rand(batch_size, self.config.latent_dim)
        other_batches = sorted({1, batch_size + 1} - {batch_size})
        encode, decode = OpModule(self, "embed"), OpModule(self, "decode")
        return [
            ExportOp(name="encode", module=encode, example_inputs=(image,),
                     input_names=["image"], output_names=["latent"],
                     check_shapes=[((b, 1, height, width),) for b in other_batches]),
            ExportOp(name="decode", module=decode, example_inputs=(latent,),
                     input_names=["latent"], output_names=["image"],
                     check_shapes=[((b, self.config.latent_dim),) for b in other_batches]),
            ExportOp(name="reconstruct", module=self, example_inputs=(image,),
                     input_names=["image"], output_names=["reconstruction"],
                     check_shapes=[((b, 1, height, width),) for b in other_batches]),
        ]


# ---------------------------------------------------------------------------------------- variants


@register_model("stem_ae")
def stem_ae(**overrides: Any) -> StemAutoencoder:
    """The original 3,914,404-parameter model: latent 32, 64x64 diffraction patterns."""
    return StemAutoencoder(StemAutoencoderConfig.from_dict({"latent_dim": 32, "out_shape": (64, 64),
                                                           **overrides}))
