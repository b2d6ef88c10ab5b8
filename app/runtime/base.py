"""What every runtime offers: `run(inputs: dict[str, ndarray]) -> dict[str, ndarray]` and a provider name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np

RunFn = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


class RuntimeLoadError(RuntimeError):
    """An artifact could not be loaded (missing dependency, bad file, device not usable)."""


@runtime_checkable
class Runtime(Protocol):
    format: str  # "onnx" | "torch_export" | "aoti"
    provider: str  # e.g. "CUDAExecutionProvider", "CPUExecutionProvider", "torch:cpu"
    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...
