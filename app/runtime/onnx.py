"""ONNX Runtime session: CUDA when a GPU really works (checked after creating the session), else CPU.

Nothing is unpickled: an ONNX file is a protobuf. The session is built from the bytes the store
verified (`data`, whose sha256 matched the manifest), never by reopening the path, so a file swapped
after verification is not what runs. The service loads only self-contained ONNX files: a model that
keeps tensors in external files (whose locations could leave the version folder, and which no sha256
covers) is refused: by inspecting it with `onnx` when installed (parsed from bytes, which reads no
external data), and in any case by ONNX Runtime, which gets no model path and an external-data folder
that cannot exist.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.runtime.base import RunFn, RuntimeLoadError
from app.runtime.threads import resolve_threads

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
# where ONNX Runtime looks for external data of a model built from bytes: a folder that never exists
NO_EXTERNAL_DATA_FOLDER = os.path.join(os.devnull, "no-external-data")


def external_data_locations(data: bytes) -> list[str] | None:
    """The external-data file of every tensor that has one (None: `onnx` is not installed to tell)."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data
    except ImportError:
        return None
    model = onnx.load_model_from_string(data)  # from bytes: external data is never read
    return [ExternalDataInfo(t).location for t in _get_all_tensors(model) if uses_external_data(t)]


def refuse_external_data(data: bytes, name: str) -> None:
    """RuntimeLoadError when the model keeps tensors outside its own file."""
    try:
        locations = external_data_locations(data)
    except Exception as exc:
        raise RuntimeLoadError(f"cannot parse ONNX model {name}: {exc}") from exc
    if locations:
        raise RuntimeLoadError(
            f"ONNX model {name} keeps tensors in external files {sorted(set(locations))}; the service loads"
            " only self-contained ONNX files (external data is neither hashed nor confined to the version folder)"
        )


def session_options(ort: Any, intra_op_threads: int, *, cpu_mem_arena: bool = False) -> Any:
    """Sequential, no spinning threads, every graph optimisation, no external data; the CPU arena only when
    asked (it keeps the session's largest run allocated for good)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = cpu_mem_arena
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", NO_EXTERNAL_DATA_FOLDER)
    options.log_severity_level = 3
    return options


class OnnxRuntime:
    """One `onnxruntime.InferenceSession`; `provider` says which execution provider really runs it."""

    format = "onnx"

    def __init__(
        self,
        path: Path,
        *,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        intra_op_threads: int = 0,
        data: bytes | None = None,
        cpu_mem_arena: bool = False,
        lone_threads: int = 0,
    ) -> None:
        """`data`: the verified bytes of the model at `path` (read from `path` when None);
        `intra_op_threads` 0: the machine's cores. `lone_threads` more than those (on the CPU only): a second
        session of that many threads, `run_alone`, for a batch that has the cores to itself."""
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - the cpu/gpu extra installs it
            raise RuntimeLoadError("onnxruntime is not installed (pip install 'aeserve[cpu]')") from exc
        self.threads = resolve_threads(intra_op_threads)
        self.cpu_mem_arena = cpu_mem_arena
        options = session_options(ort, self.threads, cpu_mem_arena=cpu_mem_arena)
        self.path = Path(path)
        model = data if data is not None else self._read(self.path)
        refuse_external_data(model, self.path.name)
        self.session = None
        self.fallback_reason = ""
        if device in ("auto", "cuda") and CUDA in ort.get_available_providers():
            try:
                session = ort.InferenceSession(model, options, providers=[CUDA, CPU])
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
                self.session = ort.InferenceSession(model, options, providers=[CPU])
            except Exception as exc:
                raise RuntimeLoadError(f"cannot load ONNX model {self.path.name}: {exc}") from exc
        self.providers: list[str] = list(self.session.get_providers())  # what the session really got
        self.provider: str = self.providers[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.lone_threads = lone_threads if lone_threads > self.threads and self.provider == CPU else 0
        self.lone_session = None
        if self.lone_threads:
            lone_options = session_options(ort, self.lone_threads, cpu_mem_arena=cpu_mem_arena)
            self.lone_session = ort.InferenceSession(model, lone_options, providers=[CPU])
        log.info(
            "onnx %s on %s, %d threads%s%s",
            self.path.name,
            self.provider,
            self.threads,
            f" ({self.lone_threads} for a lone batch)" if self.lone_threads else "",
            f" ({self.fallback_reason})" if self.fallback_reason else "",
        )

    @staticmethod
    def _read(path: Path) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise RuntimeLoadError(f"cannot read ONNX model {path.name}: {exc}") from exc

    def describe(self) -> dict[str, Any]:
        """How the session is configured (for `/v1/models`)."""
        return {"format": self.format, "provider": self.provider, "threads": self.threads,
                "lone_batch_threads": self.lone_threads or None, "cpu_mem_arena": self.cpu_mem_arena}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._named_outputs(self.session, inputs)

    @property
    def run_alone(self) -> RunFn | None:
        """`run` on the lone-batch session (all its threads), or None when there is none."""
        return None if self.lone_session is None else self._run_alone

    def drop_lone_session(self) -> None:
        """Free the lone-batch session (an op too light to gain from more threads: `app.lifespan.warm_up`)."""
        self.lone_session, self.lone_threads = None, 0

    def _run_alone(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._named_outputs(self.lone_session, inputs)

    def _named_outputs(self, session: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, session.run(self.output_names, inputs), strict=True))
