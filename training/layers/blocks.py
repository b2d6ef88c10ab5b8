"""Convolutional building blocks: ResNet basic, Squeeze-and-Excitation, ResNeXt and Inception.

Layer order, attribute names and channel rules follow the AutoEncoder CNN V3 original (see
`/work/shared/reference/autoencoder-cnn-v3.md`, section 2), so its state_dict keys load unchanged.
Every block exposes `out_channels`: the number of channels it really outputs (2·out for ResNeXt).
Convolutions are bias-free; BatchNorms use PyTorch defaults.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK_TYPES = ("resnet", "resnext", "se", "inception")


def _conv_bn_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module:
    """Identity when shapes already agree, else a strided 1×1 projection + BN."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class SEBlock(nn.Module):
    """Squeeze-and-Excitation: global mean → Linear(C→r) → ReLU → Linear(r→C) → sigmoid gate,
    with r = max(C // reduction, 8)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.excitation = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.excitation(x.mean(dim=(2, 3)))
        return x * gate.unsqueeze(-1).unsqueeze(-1)


class ResNetBasicBlock(nn.Module):
    """conv3×3(stride) → BN → ReLU → conv3×3 → BN → [SE] → + shortcut → ReLU (expansion 1)."""

    expansion = 1

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1,
                 use_se: bool = False) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=dilation,
                               dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _conv_bn_shortcut(in_channels, out_channels, stride)
        self.se = SEBlock(out_channels) if use_se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return F.relu(out + self.shortcut(x))


class ResNeXtBlock(nn.Module):
    """Bottleneck with a grouped 3×3: conv1×1 → BN → ReLU → gconv3×3(stride, groups=cardinality) → BN →
    ReLU → conv1×1 → BN → [SE] → + shortcut → ReLU. Outputs `2·out_channels` (expansion 2); the inner
    width is `int(out_channels·base_width/64)·cardinality`."""

    expansion = 2

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, cardinality: int = 32,
                 base_width: int = 4, use_se: bool = False) -> None:
        super().__init__()
        width = (out_channels * base_width // 64) * cardinality
        if width < 1:
            raise ValueError(
                f"ResNeXtBlock: out_channels={out_channels} with base_width={base_width} gives an empty "
                f"grouped width; out_channels must be at least {-(-64 // base_width)}"
            )
        expanded = out_channels * self.expansion
        self.out_channels = expanded
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, kernel_size=3, stride=stride, padding=1, groups=cardinality,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, expanded, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(expanded)
        self.shortcut = _conv_bn_shortcut(in_channels, expanded, stride)
        self.se = SEBlock(expanded) if use_se else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        return F.relu(out + self.shortcut(x))


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=kernel_size, stride=stride,
                  padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


class InceptionBlock(nn.Module):
    """Four parallel branches of `out_channels // 4` channels, concatenated (no residual):
    1×1(stride); 1×1 → 3×3(stride); 1×1 → 3×3 → 3×3(stride); [maxpool3×3(stride)] → 1×1."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        if out_channels % 4:
            raise ValueError(f"InceptionBlock: out_channels must be a multiple of 4, got {out_channels}")
        branch = out_channels // 4
        self.out_channels = out_channels
        self.branch1x1 = nn.Sequential(*_conv_bn_relu(in_channels, branch, 1, stride))
        self.branch3x3 = nn.Sequential(*_conv_bn_relu(in_channels, branch, 1),
                                       *_conv_bn_relu(branch, branch, 3, stride))
        self.branch5x5 = nn.Sequential(*_conv_bn_relu(in_channels, branch, 1),
                                       *_conv_bn_relu(branch, branch, 3),
                                       *_conv_bn_relu(branch, branch, 3, stride))
        pool: nn.Module = (nn.MaxPool2d(kernel_size=3, stride=stride, padding=1) if stride > 1
                           else nn.Identity())
        self.branch_pool = nn.Sequential(pool, *_conv_bn_relu(in_channels, branch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = (self.branch1x1, self.branch3x3, self.branch5x5, self.branch_pool)
        return torch.cat([branch(x) for branch in branches], dim=1)


def build_block(block_type: str, in_channels: int, out_channels: int, stride: int = 1, *,
                dilation: int = 1, use_se: bool = False, cardinality: int = 32,
                base_width: int = 4) -> nn.Module:
    """Block by name (case-insensitive): "resnet", "resnext", "se" (= resnet with SE) or "inception".
    The returned module's `out_channels` is what the next layer receives."""
    kind = block_type.lower()
    if kind == "resnet":
        return ResNetBasicBlock(in_channels, out_channels, stride, dilation, use_se)
    if kind == "se":
        return ResNetBasicBlock(in_channels, out_channels, stride, dilation, use_se=True)
    if kind == "resnext":
        return ResNeXtBlock(in_channels, out_channels, stride, cardinality, base_width, use_se)
    if kind == "inception":
        return InceptionBlock(in_channels, out_channels, stride)
    raise ValueError(f"unknown block type {block_type!r}; choose from: {', '.join(BLOCK_TYPES)}")
