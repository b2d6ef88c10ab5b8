"""An AOTInductor package (.pt2 from `aoti_compile_and_package`).

AOTI programs accept wrong shapes silently (and may read out of bounds), so every input is checked
against the manifest's TensorSpec in Python before it runs. A program compiled for a fixed batch is
fed zero-padded batches and its outputs are cut back.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.runtime.base import RuntimeLoadError
from app.runtime.torch_export import import_torch, pick_torch_device
from app.schemas.manifest import TensorSpec

log = logging.getLogger(__name__)


def check_inputs(inputs: dict[str, np.ndarray], specs: list[TensorSpec]) -> None:
    """Raise ValueError unless every spec'd input is present with its dtype, rank and fixed dims."""
    for spec in specs:
        if spec.name not in inputs:
            raise ValueError(f"missing input {spec.name!r}")
        array = inputs[spec.name]
        if str(array.dtype) != spec.dtype:
            raise ValueError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise ValueError(f"input {spec.name!r} has rank {array.ndim}, expected shape {spec.shape}")
        for axis, (have, want) in enumerate(zip(array.shape, spec.shape, strict=True)):
            if axis > 0 and want > 0 and have != want:
                raise ValueError(f"input {spec.name!r} has shape {list(array.shape)}, expected {spec.shape}")


class AotiRuntime:
    format = "aoti"

    def __init__(
        self,
        path: Path,
        *,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        device: Literal["auto", "cpu", "cuda"] = "auto",
        intra_op_threads: int = 1,
        loader: Any = None,
    ) -> None:
        torch = import_torch()
        self._torch = torch
        torch.set_num_threads(intra_op_threads)
        self.device = pick_torch_device(torch, device)
        try:
            load = loader or torch._inductor.aoti_load_package
            self.program = load(str(path))
        except Exception as exc:
            raise RuntimeLoadError(f"cannot load AOTInductor package {Path(path).name}: {exc}") from exc
        self.inputs = list(inputs)
        self.input_names = [s.name for s in inputs]
        self.output_names = [s.name for s in outputs]
        fixed = {s.shape[0] for s in inputs if s.shape and s.shape[0] > 0}
        self.fixed_batch: int | None = fixed.pop() if len(fixed) == 1 else None
        self.provider = f"aoti:{self.device}"
        self._lock = threading.Lock()
        log.info("aoti %s on %s (fixed batch: %s)", Path(path).name, self.provider, self.fixed_batch)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        padded = dict(inputs)
        batch = next(iter(inputs.values())).shape[0] if inputs else 0
        if self.fixed_batch is not None:
            if batch > self.fixed_batch:
                raise ValueError(f"batch {batch} exceeds the compiled batch {self.fixed_batch}")
            for name, array in inputs.items():
                if array.shape[0] < self.fixed_batch:
                    pad = np.zeros((self.fixed_batch - array.shape[0], *array.shape[1:]), dtype=array.dtype)
                    padded[name] = np.concatenate([array, pad])
        check_inputs(padded, self.inputs)
        tensors = [
            torch.from_numpy(np.ascontiguousarray(padded[n])).to(self.device) for n in self.input_names
        ]
        with self._lock, torch.no_grad():
            result = self.program(*tensors)
        result = list(result) if isinstance(result, (tuple, list)) else [result]
        out = {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, result, strict=False)}
        if self.fixed_batch is not None and batch < self.fixed_batch:
            out = {name: array[:batch] for name, array in out.items()}
        return out
