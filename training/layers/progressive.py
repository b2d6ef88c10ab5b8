"""The layer stack of the ProgressiveDecoder (PRISM) and its gradient-checkpointing helper.

See `training.models.progressive_decoder`: `build_decoder` follows PRISM's layer order, so the
state_dict keys are the original ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch.nn as nn

from training.layers.crop_pad import CropPad

if TYPE_CHECKING:  # the family module imports the builders from here
    from training.models.progressive_decoder import ProgressiveDecoderConfig, ResolvedArchitecture


def _hidden_activation(name: str) -> nn.Module:
    factories = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "gelu": nn.GELU, "silu": nn.SiLU}
    return factories[name]()


def _output_activation(name: str) -> nn.Module:
    factories = {
        "sigmoid": nn.Sigmoid,
        "tanh": nn.Tanh,
        "relu": lambda: nn.ReLU(inplace=True),
        "leaky": lambda: nn.LeakyReLU(0.2),
        "hardsigmoid": nn.Hardsigmoid,
        "none": nn.Identity,
    }
    return factories[name]()


def build_decoder(config: ProgressiveDecoderConfig, arch: ResolvedArchitecture) -> nn.Sequential:
    """PRISM's layer order, one Sequential entry per module (ReLUs count in the indices)."""
    progression, n, bn = arch.channel_progression, arch.num_upsample_layers, config.use_bn
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(arch.latent_channels, progression[0], 4, stride=1, padding=0, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(progression[0]))
    layers.append(_hidden_activation(config.activation))
    for i in range(n):
        layers.append(nn.ConvTranspose2d(progression[i], progression[i + 1], 4, stride=2, padding=1,
                                         bias=not bn))
        if bn:
            layers.append(nn.BatchNorm2d(progression[i + 1]))
        layers.append(_hidden_activation(config.activation))
    last = len(progression) - 1
    for i in range(n + 1, len(progression)):
        out_channels = progression[i]
        final = i == last
        normed = bn and out_channels > 1 and not final
        layers.append(nn.Conv2d(progression[i - 1], out_channels, 3, stride=1, padding=0 if final else 1,
                                bias=out_channels == 1 or not normed))
        if normed:
            layers.append(nn.BatchNorm2d(out_channels))
            layers.append(_hidden_activation(config.activation))
    layers.append(_output_activation(config.output_activation))
    layers.append(CropPad(arch.output_size))
    layers.append(CropPad(arch.input_size))
    return nn.Sequential(*layers)


def initialize_weights(decoder: nn.Module, method: str) -> None:
    """Re-initialise every conv weight by `method` (biases to zero); "default" keeps PyTorch's."""
    if method == "default":
        return
    for module in decoder.modules():
        if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
            if method == "xavier":
                nn.init.xavier_uniform_(module.weight)
            elif method == "kaiming":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif method == "orthogonal":
                nn.init.orthogonal_(module.weight)
            elif method == "normal":
                nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def no_bn_update_on_recompute(model: nn.Module) -> Callable[[], tuple[Any, Any]]:
    """checkpoint `context_fn`: BatchNorm running stats are updated in forward but not again in the
    backward recomputation (momentum 0 leaves them unchanged)."""

    @contextlib.contextmanager
    def frozen_stats() -> Iterator[None]:
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
                 for m in norms]
        for m in norms:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, (momentum, tracked) in zip(norms, saved, strict=True):
                m.momentum = momentum
                if tracked is not None:
                    m.num_batches_tracked.copy_(tracked)

    def context_fn() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), frozen_stats()

    return context_fn
