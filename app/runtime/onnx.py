"""ONNX Runtime session: CUDA when a GPU really works (checked after creating the session), else CPU."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np

from app.runtime.base import RuntimeLoadError

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class OnnxRuntime:
    """One `onnxruntime.InferenceSession`; `provider` says which execution provider really runs it."""

    format = "onnx"

    def __init__(
        self, path: Path, *, device: Literal["auto", "cpu", "cuda"] = "auto", intra_op_threads: int = 1
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - the cpu/gpu extra installs it
            raise RuntimeLoadError("onnxruntime is not installed (pip install 'aeserve[cpu]')") from exc
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        options.log_severity_level = 3

        self.path = Path(path)
        self.session = None
        self.fallback_reason = ""
        if device in ("auto", "cuda") and CUDA in ort.get_available_providers():
            try:
                session = ort.InferenceSession(str(path), options, providers=[CUDA, CPU])
                if session.get_providers()[0] == CUDA:
                    self.session = session
                else:
                    self.fallback_reason = "CUDAExecutionProvider was built but did not initialise"
            except Exception as exc:  # CUDA libraries missing or broken
                self.fallback_reason = f"CUDAExecutionProvider failed: {exc}"
        elif device == "cuda":
            self.fallback_reason = "this onnxruntime build has no CUDAExecutionProvider"
        if self.session is None:
            if device == "cuda":
                raise RuntimeLoadError(f"device=cuda but CUDA is not usable: {self.fallback_reason}")
            try:
                self.session = ort.InferenceSession(str(path), options, providers=[CPU])
            except Exception as exc:
                raise RuntimeLoadError(f"cannot load ONNX model {self.path.name}: {exc}") from exc
        self.provider: str = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        log.info(
            "onnx %s on %s%s",
            self.path.name,
            self.provider,
            f" ({self.fallback_reason})" if self.fallback_reason else "",
        )

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs, strict=True))
