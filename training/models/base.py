"""What every family offers to the training loop, the exporter and the store.

A family module defines a frozen config dataclass (its only constructor argument), the nn.Module,
its capability methods, `export_ops()` and registered variants. The exporter and `training.store`
only ever talk to a model through this protocol.
"""

from __future__ import annotations

import dataclasses
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


def config_to_dict(config: Any) -> dict[str, Any]:
    """Frozen dataclass -> plain JSON-able dict (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}
