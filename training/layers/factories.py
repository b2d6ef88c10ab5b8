"""Activation and normalization layers built by name.

Every family that takes an activation or a normalization as a config string builds it here, so the
names, the defaults behind each name and the error for an unknown name are the same everywhere.
Each call returns a fresh module (parametrised activations such as PReLU never share a slope).
The `check_*` functions validate config values with the same style of error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn as nn

# name -> factory of a fresh module. Constants follow the ConvDecoder original (LeakyReLU slope 0.2,
# Threshold(0.1, 0.0)); the others are PyTorch's defaults. "swish" is SiLU.
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "prelu": nn.PReLU,
    "rrelu": nn.RReLU,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "celu": nn.CELU,
    "gelu": nn.GELU,
    "swish": nn.SiLU,
    "silu": nn.SiLU,
    "mish": nn.Mish,
    "hardswish": nn.Hardswish,
    "hardsigmoid": nn.Hardsigmoid,
    "hardtanh": nn.Hardtanh,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "logsigmoid": nn.LogSigmoid,
    "softplus": nn.Softplus,
    "softshrink": nn.Softshrink,
    "softsign": nn.Softsign,
    "tanhshrink": nn.Tanhshrink,
    "hardshrink": nn.Hardshrink,
    "threshold": lambda: nn.Threshold(0.1, 0.0),
    "identity": nn.Identity,
    "none": nn.Identity,
}
# GLU is deliberately absent: it halves the channel count, so it cannot sit between two convolutions
# that were sized for the same width.

# Output activations and the range of values each one produces (None = unbounded).
_FINAL_ACTIVATIONS: dict[str, tuple[Callable[[], nn.Module], tuple[float, float] | None]] = {
    "sigmoid": (nn.Sigmoid, (0.0, 1.0)),
    "hardsigmoid": (nn.Hardsigmoid, (0.0, 1.0)),
    "tanh": (nn.Tanh, (-1.0, 1.0)),
    "hardtanh": (nn.Hardtanh, (-1.0, 1.0)),
    "softsign": (nn.Softsign, (-1.0, 1.0)),
    "identity": (nn.Identity, None),
    "none": (nn.Identity, None),
}

NORMALIZATIONS: tuple[str, ...] = ("batch", "layer", "group", "instance", "none")
ACTIVATIONS: tuple[str, ...] = tuple(_ACTIVATIONS)
FINAL_ACTIVATIONS: tuple[str, ...] = tuple(_FINAL_ACTIVATIONS)


def check_choice(option: str, value: object, allowed: tuple[str, ...]) -> None:
    """Raise a ValueError naming `option` and the allowed values when `value` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not supported; allowed values: {', '.join(allowed)}")


def check_positive_int(option: str, value: Any, minimum: int = 1) -> None:
    """Raise unless `value` is an int (not a bool) >= minimum."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{option} must be an integer >= {minimum}; got {value!r}")


def check_int_pair(option: str, value: Any) -> tuple[int, int]:
    """A pair (H, W) of positive ints as a tuple; raises for anything else."""
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{option} must be a pair (H, W) of positive integers; got {value!r}")
    for v in value:
        check_positive_int(option, v)
    return (int(value[0]), int(value[1]))


def check_bool(option: str, value: Any) -> None:
    """Raise unless `value` is True or False."""
    if not isinstance(value, bool):
        raise ValueError(f"{option} must be True or False; got {value!r}")


def make_activation(name: str) -> nn.Module:
    """A fresh hidden-layer activation module by name (see `ACTIVATIONS`)."""
    check_choice("activation", name, ACTIVATIONS)
    return _ACTIVATIONS[name]()


def make_final_activation(name: str) -> nn.Module:
    """A fresh output activation module by name (see `FINAL_ACTIVATIONS`)."""
    check_choice("final_activation", name, FINAL_ACTIVATIONS)
    return _FINAL_ACTIVATIONS[name][0]()


def final_activation_range(name: str) -> tuple[float, float] | None:
    """The value range of an output activation, or None when it is unbounded (identity)."""
    check_choice("final_activation", name, FINAL_ACTIVATIONS)
    return _FINAL_ACTIVATIONS[name][1]


def make_norm2d(kind: str, channels: int, max_groups: int = 8) -> nn.Module:
    """A normalization for NCHW feature maps with `channels` channels.

    batch -> BatchNorm2d; layer -> GroupNorm(1, C) (normalises over C, H, W per sample);
    group -> GroupNorm(g, C) with g the largest divisor of C not above `max_groups` (8 as in the
    ConvDecoder original, where C is always a multiple of 8 or below it); instance -> InstanceNorm2d
    (no affine, no running statistics); none -> Identity.
    """
    check_choice("normalization", kind, NORMALIZATIONS)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    if kind == "group":
        groups = min(max_groups, channels)
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels)
    return nn.Identity()
