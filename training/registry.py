"""Model registry (timm style): families register small variant factories; everything else builds
models through `create_model(name, **overrides)`.

Every module of `training.models` is imported before a lookup, so a family registers its variants
by being there. `FAMILIES` is the one table of the families: each has a module of the same name in
`training.models` (config, nn.Module, registered variants), `training.losses` (training objective)
and `training.originals` (loading the original project's checkpoints).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch.nn as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Family name (the fixture folder, `model.family`) -> its module name in models/, losses/, originals/.
FAMILIES: dict[str, str] = {
    "autoencoder-cnn-v3": "autoencoder_cnn_v3",
    "stem-autoencoder": "stem_autoencoder",
    "progressive-decoder": "progressive_decoder",
    "conv-decoder": "conv_decoder",
    "diffusion-decoder": "diffusion_unet",
}


def family_module(family: str, package: str = "models") -> ModuleType:
    """The module of `family` in `training.<package>` ("models", "losses" or "originals")."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return importlib.import_module(f"training.{package}.{FAMILIES[family]}")


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: `@register_model("v3_small")` on a function `(**overrides) -> nn.Module`."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def _import_families() -> None:
    """Import every module of `training.models`: the family modules register their variants."""
    import training.models

    for module in pkgutil.iter_modules(training.models.__path__):
        importlib.import_module(f"training.models.{module.name}")


def list_models() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered variant; keyword overrides replace fields of its config.

    The model is tagged with its variant name as `model.architecture` (recorded in store manifests).
    """
    _import_families()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    model = _REGISTRY[name](**overrides)
    model.architecture = name
    return model
