"""What every family offers to the training loop, the exporter and the store.

A family module defines a frozen config dataclass (its only constructor argument), the nn.Module,
its capability methods, `export_ops()` and registered variants; its training objective lives in
`training.losses` and its original-checkpoint loader in `training.originals` (see
`training.registry.FAMILIES`). An exported op is a model method wrapped in `OpModule`. The exporter
and `training.store` only ever talk to a model through this protocol.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn as nn


@dataclass
class ExportOp:
    """One computation to export (to ONNX, torch.export and AOTInductor) and serve.

    `module(*example_inputs)` must return one tensor (or a tuple matching `output_names`).
    Names follow `app/schemas/manifest.py` (`encode`, `decode`, `reconstruct`, `attention_matrix`,
    `denoise`). Axis 0 of every input/output is the dynamic batch; `dynamic_hw` also frees axes 2/3 of
    image inputs. `check_shapes` are further input-shape tuples (one shape per input) at which the
    exported ONNX is compared with eager torch — always include sizes unlike the example input.
    """

    name: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_hw: bool = False
    check_shapes: list[tuple[tuple[int, ...], ...]] = field(default_factory=list)
    aoti: bool = True           # also compile an AOTInductor package for this op
    torch_export: bool = True   # also save a fused torch.export program (needed for saliency)


@runtime_checkable
class Family(Protocol):
    """The protocol every family model implements."""

    family: ClassVar[str]        # fixture folder name, e.g. "autoencoder-cnn-v3"

    def get_config(self) -> dict[str, Any]: ...

    def capabilities(self) -> list[str]: ...

    def export_ops(self, batch_size: int = 2) -> list[ExportOp]: ...

    def preprocessing(self) -> dict[str, Any]: ...


MAX_OP_INPUTS = 3


class OpModule(nn.Module):
    """Export adapter: `OpModule(model, "encode")(*inputs)` is `model.encode(*inputs, **kwargs)`.

    The op's inputs are the method's required positional parameters (at most `MAX_OP_INPUTS`).
    `forward` takes them as ordinary positional parameters, so torch.export, the ONNX exporter and
    torch.fx (Conv-BN folding) see a plain signature with one dynamic-shape spec per input. It shares
    the model's train/eval mode, so an exporter restoring the adapter's mode cannot flip the model's.
    """

    def __init__(self, model: nn.Module, method: str, **kwargs: Any) -> None:
        super().__init__()
        bound = getattr(model, method, None)
        if not callable(bound):
            raise AttributeError(f"{type(model).__name__} has no method {method!r}")
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.arity = sum(1 for p in inspect.signature(bound).parameters.values()
                         if p.kind in positional and p.default is p.empty and p.name not in kwargs)
        if self.arity > MAX_OP_INPUTS:
            raise ValueError(f"{method} takes {self.arity} inputs; an op takes at most {MAX_OP_INPUTS}")
        self.model = model
        self.method = method
        self.kwargs = kwargs
        self.train(model.training)

    def forward(self, input0: torch.Tensor | None = None, input1: torch.Tensor | None = None,
                input2: torch.Tensor | None = None) -> Any:
        inputs = (input0, input1, input2)[: self.arity]
        return getattr(self.model, self.method)(*inputs, **self.kwargs)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Frozen dataclass -> plain JSON-able dict (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
