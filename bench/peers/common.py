"""What every peer server (and the harness's in-process reference) does with a request, in one place.

Pure numpy + Pillow + onnxruntime: the PyTriton peer imports this from a venv of its own (numpy<2),
so nothing here imports `app`, `training` or torch. The codecs reproduce aeserve's arithmetic exactly
for the benchmark's bodies, so every server answers the same bytes' worth of pixels:
- request "npy": an NPY of (1, D) or (D,) numbers -> float32 (1, D), refused unless finite;
- request "png": an 8- or 16-bit grayscale PNG already at the model's size -> float32 (1, 1, H, W),
  integers divided by their dtype's max (aeserve's `to_unit_float`), refused unless finite;
- answer "png": (1, 1, H, W) in `output_range` -> [0, 1], clipped, x255 rounded to 8 bits, PNG by Pillow at
  compress_level 1: the pixels of aeserve's `to_unit_range` + `encode_png` (aeserve writes the PNG itself,
  cheaper per image; the bytes differ, the pixels do not);
- answer "npy": (1, ...) -> float32 (1, D) NPY (aeserve's latents answer).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MEDIA_TYPES = {"npy": "application/x-npy", "png": "image/png"}


@dataclass(frozen=True)
class PeerSpec:
    """One workload as a peer serves it: its route, ONNX file, tensor names and body kinds."""

    name: str  # light | middle | heavy
    route: str  # /v1/models/<model>/<op>, the same path as aeserve's
    onnx: str  # absolute path of the op's ONNX file in the store
    input: str  # the ONNX input name
    output: str  # the ONNX output name
    request: str  # "npy" (latents) | "png" (an image)
    answer: str  # "npy" | "png"
    output_range: tuple[float, float] = (0.0, 1.0)

    @property
    def triton_name(self) -> str:
        return self.name

    @property
    def content_type(self) -> str:
        return MEDIA_TYPES[self.request]

    @property
    def accept(self) -> str:
        return MEDIA_TYPES[self.answer]


def write_specs(specs: list[PeerSpec], path: Path) -> Path:
    path.write_text(json.dumps([spec.__dict__ for spec in specs], indent=2))
    return path


def read_specs(path: str | Path) -> list[PeerSpec]:
    return [
        PeerSpec(**{**raw, "output_range": tuple(raw["output_range"])}) for raw in json.loads(Path(path).read_text())
    ]


# ------------------------------------------------------------------------------------------- codecs
def _unit_float(array: np.ndarray) -> np.ndarray:
    out = array.astype(np.float32)
    if array.dtype.kind in "iu":
        out /= np.float32(np.iinfo(array.dtype).max)
    if not np.isfinite(out).all():
        raise ValueError("non-finite values")
    return out


def decode_request(kind: str, body: bytes) -> np.ndarray:
    """One request body -> the model input of one item (batch axis first)."""
    if kind == "npy":
        latents = np.load(io.BytesIO(body), allow_pickle=False).astype(np.float32)
        latents = latents.reshape(1, -1) if latents.ndim == 1 else latents
        if not np.isfinite(latents).all():
            raise ValueError("non-finite latents")
        return np.ascontiguousarray(latents)
    if kind == "png":
        with Image.open(io.BytesIO(body), formats=("PNG",)) as image:
            if image.mode not in ("L", "I;16", "I;16B"):
                raise ValueError(f"expected a grayscale PNG, got mode {image.mode}")
            return _unit_float(np.asarray(image))[None, None]
    raise ValueError(f"unknown request kind {kind!r}")


def encode_answer(kind: str, item: np.ndarray, output_range: tuple[float, float]) -> bytes:
    """One item of the model output (batch axis first, size 1) -> the answer's bytes."""
    if kind == "npy":
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(item.reshape(item.shape[0], -1).astype(np.float32)), allow_pickle=False)
        return buffer.getvalue()
    if kind == "png":
        low, high = output_range
        unit = np.clip((item[0] - low) / (high - low), 0.0, 1.0)  # (C, H, W)
        pixels = np.round(unit * 255).astype(np.uint8)
        image = Image.fromarray(pixels[0]) if pixels.shape[0] == 1 else Image.fromarray(np.moveaxis(pixels, 0, -1))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", compress_level=1)
        return buffer.getvalue()
    raise ValueError(f"unknown answer kind {kind!r}")


def decode_answer(kind: str, body: bytes) -> np.ndarray:
    """An answer's bytes -> its array: PNG pixels (uint8) or NPY values, to compare servers."""
    if kind == "png":
        with Image.open(io.BytesIO(body), formats=("PNG",)) as image:
            return np.asarray(image).copy()
    return np.load(io.BytesIO(body), allow_pickle=False)


# ------------------------------------------------------------------------------------------- engine
def make_session(path: str, intra_op_threads: int, *, spinning: bool = False, parallel: bool = False) -> Any:
    """A CPU ONNX Runtime session: `intra_op_threads` threads, spinning and inter-op execution as asked."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = intra_op_threads if parallel else 1
    options.execution_mode = ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spin = "1" if spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    options.add_session_config_entry("session.inter_op.allow_spinning", spin)
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def answer_batch(spec: PeerSpec, session: Any, bodies: list[bytes]) -> list[bytes]:
    """Decode every body, run them as one batch, encode each item: what a batching peer does."""
    batch = np.concatenate([decode_request(spec.request, body) for body in bodies])
    output = session.run([spec.output], {spec.input: batch})[0]
    return [encode_answer(spec.answer, output[i : i + 1], spec.output_range) for i in range(len(bodies))]
