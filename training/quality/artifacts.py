"""A store version as the quality report uses it: its manifest, its ops run from the stored artifacts
(ONNX through onnxruntime as the service runs them, else the torch.export program), and the model
rebuilt from `manifest.architecture` + `manifest.config` + `weights.safetensors` where a number needs
more than the ops give (e.g. the VAE's posterior variance for its KL).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch.nn as nn

from app.schemas.manifest import Manifest
from app.schemas.store_format import WEIGHTS_NAME, resolve_artifact, verify_version


@dataclass
class StoreVersion:
    """One verified `<store>/<name>/<version>/`."""

    path: Path
    manifest: Manifest
    _ops: dict[str, Callable[..., np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: str | Path) -> StoreVersion:
        return cls(Path(path), verify_version(path))

    @property
    def name(self) -> str:
        return self.manifest.name

    def latent_size(self) -> int:
        """Values per item of the `encode` op's output (the latent the service hands out)."""
        shape = self.manifest.ops["encode"].outputs[0].shape
        return int(np.prod(shape[1:]))

    def op(self, name: str) -> Callable[..., np.ndarray]:
        """The op as `f(*inputs) -> first output` on numpy arrays, run in chunks of its max batch size."""
        if name not in self._ops:
            self._ops[name] = _load_op(self.path, self.manifest, name)
        return self._ops[name]

    def rebuilt_model(self) -> nn.Module:
        """The eager model: the registered architecture with the manifest's config and stored weights."""
        from safetensors.torch import load_file

        from training.registry import create_model

        if not self.manifest.architecture:
            raise ValueError(f"{self.path}: the manifest names no architecture; the model cannot be rebuilt")
        model = create_model(self.manifest.architecture, **self.manifest.config)
        model.load_state_dict(load_file(str(self.path / WEIGHTS_NAME)), strict=True)
        return model.eval()


def _load_op(path: Path, manifest: Manifest, name: str) -> Callable[..., np.ndarray]:
    spec = manifest.ops[name]
    if "onnx" in spec.artifacts:
        import onnxruntime as ort

        session = ort.InferenceSession(
            str(resolve_artifact(path, spec.artifacts["onnx"])), providers=["CPUExecutionProvider"]
        )
        names = [i.name for i in session.get_inputs()]
        run = lambda *arrays: session.run(None, dict(zip(names, arrays, strict=True)))[0]  # noqa: E731
    elif "torch_export" in spec.artifacts:
        import torch

        module = torch.export.load(str(resolve_artifact(path, spec.artifacts["torch_export"]))).module()

        def run(*arrays: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                out = module(*(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))
            return (out[0] if isinstance(out, tuple | list) else out).numpy()
    else:
        raise ValueError(f"{path}: op {name!r} has neither an onnx nor a torch_export artifact")
    return _chunked(run, spec.max_batch_size)


def _chunked(run: Callable[..., np.ndarray], max_batch: int) -> Callable[..., np.ndarray]:
    def call(*arrays: np.ndarray) -> np.ndarray:
        if not arrays:
            return np.asarray(run())
        total = len(arrays[0])
        parts = [run(*(a[i : i + max_batch] for a in arrays)) for i in range(0, total, max_batch)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    return call
