"""Model registry (timm style): families register small variant factories; everything else builds
models through `create_model(name, **overrides)`."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Family modules that register variants when imported (one file per family).
FAMILY_MODULES = (
    "training.models.autoencoder_cnn_v3",
    "training.models.stem_autoencoder",
    "training.models.progressive_decoder",
    "training.models.conv_decoder",
    "training.models.diffusion_unet",
)


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: `@register_model("v3_small")` on a function `(**overrides) -> nn.Module`."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _import_families() -> None:
    for module in FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:  # a family not written yet must not break the others
            if exc.name != module:
                raise


def list_models() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered variant; keyword overrides replace fields of its config."""
    _import_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name](**overrides)
