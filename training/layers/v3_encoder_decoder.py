"""Encoder and decoder networks of AutoEncoder CNN V3 (see `training.models.autoencoder_cnn_v3`).

Module names equal the original's, so original checkpoints load with the identity key map.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.layers.attention import SelfAttentionBlock
from training.layers.blocks import build_block
from training.layers.pooling import AdaptiveAvgPool2dExportable

if TYPE_CHECKING:  # the family module imports the networks from here
    from training.models.autoencoder_cnn_v3 import AutoEncoderV3Config

LATENT_GRID = 4                 # the encoder always pools its last feature map to 4×4
DECODER_LAST_CHANNELS = 64      # original quirk: the decoder's last stage always outputs 64 channels


class Encoder(nn.Module):
    """Image (B, 1, H, W), any H/W → latent of `config.latent_shape`."""

    def __init__(self, config: AutoEncoderV3Config) -> None:
        super().__init__()
        stem_channels = config.channel_config[0] // 2
        self.stem = nn.Sequential(
            nn.Conv2d(1, stem_channels, kernel_size=7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(stem_channels),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.stages = nn.ModuleList()
        channels = stem_channels
        for block_type, out, stride in zip(config.block_config, config.channel_config, config.stride_config,
                                           strict=True):
            block = build_block(block_type, channels, out, stride)
            self.stages.append(block)
            channels = block.out_channels
        self.final_channels = channels
        self.attention = SelfAttentionBlock(channels, num_heads=4) if config.use_attention else None
        pool = AdaptiveAvgPool2dExportable((LATENT_GRID, LATENT_GRID))
        if config.latent_strategy == "conv":
            self.latent_proj = nn.Sequential(
                pool,
                nn.Flatten(),
                nn.Linear(channels * LATENT_GRID * LATENT_GRID, config.latent_size),
                nn.ReLU(),
            )
        else:
            self.latent_proj = nn.Sequential(
                pool,
                nn.Conv2d(channels, config.latent_channels, kernel_size=1, bias=False),
                nn.BatchNorm2d(config.latent_channels),
                nn.ReLU(),
            )
        self.latent_shape = config.latent_shape

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages: the map the attention looks at, (B, final_channels, h, w)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def attention_matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Head-averaged attention (B, N, N) over the final map's N = h·w positions (row-major)."""
        if self.attention is None:
            raise RuntimeError("this model has no self-attention (use_attention=False)")
        return self.attention.attend(self.features(x))[1]

    def forward(self, x: torch.Tensor, record_attention: bool = True) -> torch.Tensor:
        x = self.features(x)
        if self.attention is not None:
            x = self.attention(x, record=record_attention)
        return self.latent_proj(x)


class Decoder(nn.Module):
    """Native latent → image (B, 1, H, W) at `config.input_size` (rendered square, then bilinear)."""

    def __init__(self, config: AutoEncoderV3Config) -> None:
        super().__init__()
        blocks = list(reversed(config.block_config))
        channels_r = list(reversed(config.channel_config))
        start = channels_r[0]
        if config.latent_strategy == "conv":
            self.latent_unproj = nn.Sequential(
                nn.Linear(config.latent_size, start * LATENT_GRID * LATENT_GRID),
                nn.ReLU(),
                nn.Unflatten(1, (start, LATENT_GRID, LATENT_GRID)),
            )
        else:
            self.latent_unproj = nn.Sequential(
                nn.Conv2d(config.latent_channels, start, kernel_size=1, bias=False),
                nn.BatchNorm2d(start),
                nn.ReLU(),
            )
        self.stages = nn.ModuleList()
        channels = start
        for block_type, out in zip(blocks, [*channels_r[1:], DECODER_LAST_CHANNELS], strict=True):
            block = build_block(block_type, channels, out, stride=1)
            self.stages.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), block))
            channels = block.out_channels
        self.head = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"),
            nn.Conv2d(channels, 32, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 1, kernel_size=3, padding=1),
            nn.Sigmoid(),
        )
        self.output_size = config.input_size
        self.needs_resize = (config.rendered_size, config.rendered_size) != config.input_size

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.latent_unproj(latent)
        for stage in self.stages:
            x = stage(x)
        x = self.head(x)
        if self.needs_resize:
            x = F.interpolate(x, size=self.output_size, mode="bilinear", align_corners=False)
        return x
