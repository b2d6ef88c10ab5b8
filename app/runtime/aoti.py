"""An AOTInductor package (.pt2 from `aoti_compile_and_package`).

AOTI programs accept wrong shapes silently (and may read out of bounds), so every input is checked
against the manifest's TensorSpec in Python before it runs: dtype, rank and every fixed axis.

Loading a package unpickles nothing but runs its compiled shared library (native code, by design):
only a store the operator trusts may hold one, and only the bytes whose sha256 matched the manifest
are loaded. The loader needs a path, so the verified bytes (`data`) are written to a new file in a
private directory (mode 0700) and loaded from there, then deleted: the store's file, which could be
swapped after verification, is never opened again.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.runtime.base import RuntimeLoadError
from app.runtime.threads import resolve_threads
from app.runtime.torch_export import import_torch, pick_torch_device
from app.schemas.manifest import TensorSpec

log = logging.getLogger(__name__)


def check_inputs(inputs: dict[str, np.ndarray], specs: list[TensorSpec]) -> None:
    """Raise ValueError unless every spec'd input is present with its dtype, rank and fixed dims (-1: any)."""
    for spec in specs:
        if spec.name not in inputs:
            raise ValueError(f"missing input {spec.name!r}")
        array = inputs[spec.name]
        if str(array.dtype) != spec.dtype:
            raise ValueError(f"input {spec.name!r} has dtype {array.dtype}, expected {spec.dtype}")
        if array.ndim != len(spec.shape):
            raise ValueError(f"input {spec.name!r} has rank {array.ndim}, expected shape {spec.shape}")
        for have, want in zip(array.shape, spec.shape, strict=True):
            if want > 0 and have != want:
                raise ValueError(f"input {spec.name!r} has shape {list(array.shape)}, expected {spec.shape}")


class AotiRuntime:
    """An AOTInductor package, fed positionally in the manifest's input order after `check_inputs`."""

    format = "aoti"

    def __init__(
        self,
        path: Path,
        *,
        inputs: list[TensorSpec],
        outputs: list[TensorSpec],
        device: Literal["auto", "cpu", "cuda"] = "auto",
        intra_op_threads: int = 0,
        loader: Any = None,
        data: bytes | None = None,
    ) -> None:
        """`data`: the verified bytes of the package at `path` (None: load `path` itself)."""
        torch = import_torch()
        self._torch = torch
        self.threads = resolve_threads(intra_op_threads)
        torch.set_num_threads(self.threads)
        self.device = pick_torch_device(torch, device)
        try:
            load = loader or torch._inductor.aoti_load_package
            if data is None:
                self.program = load(str(path))
            else:
                with tempfile.TemporaryDirectory(prefix="aeserve-aoti-") as private:  # created 0700
                    copy = Path(private) / Path(path).name
                    copy.write_bytes(data)
                    self.program = load(str(copy))
        except Exception as exc:
            raise RuntimeLoadError(f"cannot load AOTInductor package {Path(path).name}: {exc}") from exc
        self.inputs = list(inputs)
        self.input_names = [s.name for s in inputs]
        self.output_names = [s.name for s in outputs]
        self.provider = f"aoti:{self.device}"
        self._lock = threading.Lock()
        log.info("aoti %s on %s", Path(path).name, self.provider)

    def describe(self) -> dict[str, Any]:
        """How the package is configured (for `/v1/models`)."""
        return {"format": self.format, "provider": self.provider, "threads": self.threads}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        check_inputs(inputs, self.inputs)
        tensors = [torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in self.input_names]
        with self._lock, torch.no_grad():
            result = self.program(*tensors)
        result = list(result) if isinstance(result, (tuple, list)) else [result]
        return {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, result, strict=False)}
