"""A `torch.export` program (.pt2): runs an op and computes input-gradient saliency.

torch is optional for the service; it is imported only when such an artifact is loaded.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.runtime.base import RuntimeLoadError
from app.schemas.manifest import SaliencySpec

log = logging.getLogger(__name__)

SALIENCY_METHOD = "input-gradient via torch.export program"


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise RuntimeLoadError("torch is not installed (pip install 'aeserve[torch]')") from exc
    return torch


def pick_torch_device(torch: Any, device: Literal["auto", "cpu", "cuda"]) -> str:
    usable = torch.cuda.is_available()
    if device == "cuda" and not usable:
        raise RuntimeLoadError("device=cuda but torch sees no usable CUDA device")
    return "cuda" if usable and device != "cpu" else "cpu"


def first_tensor(output: Any) -> Any:
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict):
        return next(iter(output.values()))
    return output


class TorchExportRuntime:
    """`torch.export.load(path).module()`, fed positionally in the manifest's input order."""

    format = "torch_export"

    def __init__(
        self,
        path: Path,
        *,
        input_names: list[str],
        output_names: list[str],
        device: Literal["auto", "cpu", "cuda"] = "auto",
        intra_op_threads: int = 1,
    ) -> None:
        torch = import_torch()
        self._torch = torch
        torch.set_num_threads(intra_op_threads)
        self.device = pick_torch_device(torch, device)
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise RuntimeLoadError(f"cannot load torch.export program {Path(path).name}: {exc}") from exc
        self.module = program.module().to(self.device)
        self.provider = f"torch:{self.device}"
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self._lock = threading.Lock()  # one call in flight: the module is not re-entrant under autograd
        log.info("torch.export %s on %s", Path(path).name, self.provider)

    def _tensors(self, inputs: dict[str, np.ndarray]) -> list[Any]:
        return [
            self._torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in self.input_names
        ]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock, self._torch.no_grad():
            output = self.module(*self._tensors(inputs))
        outputs = output if isinstance(output, (tuple, list)) else [first_tensor(output)]
        return {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, outputs, strict=False)}

    def input_gradient(self, x: np.ndarray, spec: SaliencySpec) -> np.ndarray:
        """|d/dx sum((f(x) - x)^2)| per element, unnormalised (per-sample independent, so batchable)."""
        torch = self._torch
        if spec.objective != "sum_squared_reconstruction_error":  # pragma: no cover - schema allows one
            raise ValueError(f"unknown saliency objective {spec.objective}")
        with self._lock, torch.enable_grad():
            xt = (
                torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
                .to(self.device)
                .requires_grad_(True)
            )
            recon = first_tensor(self.module(xt))
            loss = ((recon - xt) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, xt)
        return grad.abs().detach().cpu().numpy().astype(np.float32)


def normalize_saliency(grad_abs: np.ndarray, spec: SaliencySpec) -> np.ndarray:
    """One global min-max over the whole tensor (the request's batch), `eps` in the denominator."""
    low = float(grad_abs.min())
    high = float(grad_abs.max())
    return ((grad_abs - low) / (high - low + spec.eps)).astype(np.float32)
