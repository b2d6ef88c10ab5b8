"""A `torch.export` program (.pt2): runs an op and computes input-gradient saliency.

torch is optional for the service and costs seconds and hundreds of MB to import, so a program is
loaded at its first use (a saliency request), from the verified bytes it was handed; only when torch is
already imported (nothing left to save) is it loaded at once. Without torch installed the program is
refused at once, before anything runs.

What `torch.export.load` may unpickle (torch 2.4-2.13, `torch.export.pt2_archive._package`): weights
and tensor constants saved with `use_pickle` (tensor subclasses: `torch.load(weights_only=False)`),
torchbind custom objects (`custom_obj_*`, the TorchScript unpickler), opaque objects (`opaque_obj_*`,
plain `pickle.loads`), legacy `data/weights|constants/<model>.pt` files, the sample inputs
(`torch.load`, retried with `weights_only=False` when the safe load fails) and, for archives without
`archive_format`, the pre-2.8 zip layout; an archive with `data/aotinductor/` files also gets its
compiled native code loaded. A service must run none of that from a file it was handed, so:
- only the bytes whose sha256 matched the manifest are loaded (`data`, read once by the store and
  handed over as bytes: never the path again, so a file swapped after verification is not loaded);
- `refuse_unsafe_archive` inspects the archive first, with torch's own reader, and refuses every
  entry above that would unpickle or load native code;
- the load runs with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1, so any `torch.load` left (the sample inputs)
  uses the weights-only unpickler, which builds tensors and containers and nothing else.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from app.runtime.base import RuntimeLoadError
from app.runtime.threads import resolve_threads
from app.schemas.manifest import SaliencySpec

log = logging.getLogger(__name__)

SALIENCY_METHOD = "input-gradient via torch.export program"


TORCH_MISSING = "torch is not installed (pip install 'aeserve[torch]')"


def import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise RuntimeLoadError(TORCH_MISSING) from exc
    return torch


def torch_imported() -> bool:
    """True once `import torch` was attempted in this process (a blocked import counts: it fails at once)."""
    return "torch" in sys.modules


def require_torch_installed() -> None:
    """RuntimeLoadError when torch cannot be imported here; looks it up without importing it."""
    try:
        found = importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise RuntimeLoadError(TORCH_MISSING)


def pick_torch_device(torch: Any, device: Literal["auto", "cpu", "cuda"]) -> str:
    usable = torch.cuda.is_available()
    if device == "cuda" and not usable:
        raise RuntimeLoadError("device=cuda but torch sees no usable CUDA device")
    return "cuda" if usable and device != "cpu" else "cpu"


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside uses the weights-only unpickler, whatever its caller asks for."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def unsafe_entries(data: bytes) -> list[str]:
    """The entries of a .pt2 archive whose loading would unpickle or load native code."""
    from torch.export.pt2_archive import PT2ArchiveReader
    from torch.export.pt2_archive import constants as pt2

    found = []
    reader = PT2ArchiveReader(io.BytesIO(data))  # refuses archives without archive_format (the old zip)
    for name in reader.get_file_names():
        in_payload_dir = name.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR))
        if name.startswith(pt2.AOTINDUCTOR_DIR) or (in_payload_dir and name.endswith(".pt")):
            found.append(name)
        elif in_payload_dir and name.endswith("_config.json"):
            config = json.loads(reader.read_string(name)).get("config", {})
            for fqn, payload in config.items():
                pickled = payload.get("use_pickle") or str(payload.get("path_name", "")).startswith(
                    (pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX)
                )
                if pickled:
                    found.append(f"{name}:{fqn}")
    return found


def refuse_unsafe_archive(data: bytes, name: str) -> None:
    """RuntimeLoadError unless the .pt2 holds only plain tensors and the serialized graph."""
    try:
        found = unsafe_entries(data)
    except Exception as exc:
        raise RuntimeLoadError(f"cannot read torch.export archive {name}: {exc}") from exc
    if found:
        raise RuntimeLoadError(
            f"torch.export archive {name} holds pickled objects or native code ({', '.join(found[:5])});"
            " the service loads only plain tensors"
        )


def first_tensor(output: Any) -> Any:
    if isinstance(output, (tuple, list)):
        return output[0]
    if isinstance(output, dict):
        return next(iter(output.values()))
    return output


class TorchExportRuntime:
    """`torch.export.load(path).module()`, fed positionally in the manifest's input order; loaded at first
    use unless torch is already imported (see the module doc)."""

    format = "torch_export"

    def __init__(
        self,
        path: Path,
        *,
        input_names: list[str],
        output_names: list[str],
        device: Literal["auto", "cpu", "cuda"] = "auto",
        intra_op_threads: int = 0,
        data: bytes | None = None,
    ) -> None:
        """`data`: the verified bytes of the program at `path` (read from `path` when None)."""
        self.name = Path(path).name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.threads = resolve_threads(intra_op_threads)
        self._device_setting: Literal["auto", "cpu", "cuda"] = device
        self.device = ""  # known once loaded
        self.module: Any = None
        self._torch: Any = None
        self._load_error: RuntimeLoadError | None = None
        self._lock = threading.Lock()  # one call in flight: the module is not re-entrant under autograd
        try:
            self._program_bytes: bytes | None = data if data is not None else Path(path).read_bytes()
        except OSError as exc:
            raise RuntimeLoadError(f"cannot read torch.export program {self.name}: {exc}") from exc
        if torch_imported():
            self._load()
        else:
            require_torch_installed()
            log.info("torch.export %s: loads at its first use", self.name)

    @property
    def loaded(self) -> bool:
        return self.module is not None

    @property
    def provider(self) -> str:
        return f"torch:{self.device}" if self.loaded else "torch (loads at first use)"

    def describe(self) -> dict[str, Any]:
        """How the program is configured (for `/v1/models`)."""
        return {"format": self.format, "provider": self.provider, "threads": self.threads, "loaded": self.loaded}

    def load(self) -> None:
        """Load the program now unless it is (blocking; thread-safe); RuntimeLoadError when it cannot be."""
        with self._lock:
            self._load()

    def _load(self) -> None:
        """Import torch, refuse an unsafe archive, load the program from the verified bytes (once)."""
        if self.module is not None:
            return
        if self._load_error is not None:
            raise self._load_error
        try:
            torch = import_torch()
            torch.set_num_threads(self.threads)
            device = pick_torch_device(torch, self._device_setting)
            program_bytes = self._program_bytes or b""
            refuse_unsafe_archive(program_bytes, self.name)
            try:
                with weights_only_loads():
                    program = torch.export.load(io.BytesIO(program_bytes))
            except Exception as exc:
                raise RuntimeLoadError(f"cannot load torch.export program {self.name}: {exc}") from exc
            self._torch = torch
            self.module = program.module().to(device)
        except RuntimeLoadError as exc:
            self._load_error = exc
            raise
        self.device = device
        self._program_bytes = None
        log.info("torch.export %s on %s", self.name, self.provider)

    def _tensors(self, inputs: dict[str, np.ndarray]) -> list[Any]:
        return [
            self._torch.from_numpy(np.ascontiguousarray(inputs[n])).to(self.device) for n in self.input_names
        ]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self._lock:
            self._load()
            with self._torch.no_grad():
                output = self.module(*self._tensors(inputs))
        outputs = output if isinstance(output, (tuple, list)) else [first_tensor(output)]
        return {name: t.detach().cpu().numpy() for name, t in zip(self.output_names, outputs, strict=False)}

    def input_gradient(self, x: np.ndarray, spec: SaliencySpec) -> np.ndarray:
        """|d/dx sum((f(x) - x)^2)| per element, unnormalised (per-sample independent, so batchable)."""
        if spec.objective != "sum_squared_reconstruction_error":  # pragma: no cover - schema allows one
            raise ValueError(f"unknown saliency objective {spec.objective}")
        with self._lock:
            self._load()
            return self._gradient(x)

    def _gradient(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.enable_grad():
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
