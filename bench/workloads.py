"""The three workloads of `make bench`, bound to a store: what is sent, to which route, what comes back.

| workload | model, op | request body | answer |
|---|---|---|---|
| light  | conv-decoder-vae decode (28x28) | NPY (1, 32) float32 latents, standard normal, seed 0 | 8-bit PNG 28x28 |
| middle | v3-small-201 reconstruct | bench/inputs/camera_201.png (8-bit gray 201x201) | 8-bit PNG 201x201 |
| heavy  | stem-ae encode (64x64) | bench/inputs/stem_pattern.png (16-bit gray 64x64) | NPY (1, 32) float32 latents |

Every server gets the same body for a workload, one item per request; images are already at the model's
size (no resizing anywhere). `expected` is the in-process answer (ONNX Runtime, batch 1, one thread,
through `bench.peers.common`'s codecs) that each server's sample answer is compared with.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.schemas.manifest import Manifest
from app.schemas.store_format import newest_version_dir, read_manifest
from bench.peers.common import PeerSpec, answer_batch, decode_answer, decode_request, make_session

INPUTS = Path(__file__).resolve().parent / "inputs"


@dataclass(frozen=True)
class Workload:
    name: str
    model: str
    op: str
    request: str  # "npy" | "png"
    answer: str  # "npy" | "png"
    picture: str | None = None  # a file of bench/inputs for "png" requests


WORKLOADS = {
    "light": Workload("light", "conv-decoder-vae", "decode", "npy", "png"),
    "middle": Workload("middle", "v3-small-201", "reconstruct", "png", "png", "camera_201.png"),
    "heavy": Workload("heavy", "stem-ae", "encode", "png", "npy", "stem_pattern.png"),
}


@dataclass(frozen=True)
class Prepared:
    """A workload resolved against a store: the newest version's files, the body and its answer."""

    workload: Workload
    directory: Path
    manifest: Manifest
    spec: PeerSpec
    body: bytes
    expected: bytes  # the in-process answer to `body`

    @property
    def item(self) -> np.ndarray:
        """The engine input of one request, (1, ...) float32."""
        return decode_request(self.spec.request, self.body)

    def artifact(self, fmt: str) -> Path | None:
        relative = self.manifest.ops[self.workload.op].artifacts.get(fmt)
        return None if relative is None else self.directory / relative


def latest(store: Path, model: str) -> tuple[Path, Manifest]:
    """The newest version of `model` (the store's own version order) and its manifest."""
    directory = newest_version_dir(store / model)
    if directory is None:
        raise SystemExit(f"no built version of {model!r} under {store}; run `make store` first")
    return directory, read_manifest(directory)


def png_body(picture: Path, size: tuple[int, int]) -> bytes:
    """The picture's bytes when it is already `size` (H, W), else an 8-bit gray PNG resized to it."""
    data = picture.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        if image.size == (size[1], size[0]):
            return data
        resized = image.convert("L").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    resized.save(buffer, format="PNG")
    return buffer.getvalue()


def request_body(workload: Workload, manifest: Manifest) -> bytes:
    op = manifest.ops[workload.op]
    if workload.request == "npy":
        latents = np.random.default_rng(0).standard_normal((1, op.inputs[0].shape[-1]), dtype=np.float32)
        buffer = io.BytesIO()
        np.save(buffer, latents, allow_pickle=False)
        return buffer.getvalue()
    if workload.picture is None or manifest.preprocessing.input_size is None:
        raise SystemExit(f"{workload.name}: an image workload needs a picture and a fixed input size")
    return png_body(INPUTS / workload.picture, tuple(manifest.preprocessing.input_size))


def prepare(store: Path, workload: Workload) -> Prepared:
    directory, manifest = latest(store, workload.model)
    op = manifest.ops[workload.op]
    spec = PeerSpec(
        name=workload.name,
        route=f"/v1/models/{workload.model}/{workload.op}",
        onnx=str((directory / op.artifacts["onnx"]).resolve()),
        input=op.inputs[0].name,
        output=op.outputs[0].name,
        request=workload.request,
        answer=workload.answer,
        output_range=tuple(manifest.preprocessing.output_range),
    )
    body = request_body(workload, manifest)
    expected = answer_batch(spec, make_session(spec.onnx, 1), [body])[0]
    return Prepared(workload, directory, manifest, spec, body, expected)


def compare(kind: str, got: bytes, want: bytes) -> dict[str, float | int | bool]:
    """How an answer differs from the in-process one: PNG to the last pixel, NPY within 1e-5."""
    try:
        a, b = decode_answer(kind, got), decode_answer(kind, want)
    except Exception as exc:  # not an image / NPY at all: a wrong answer
        return {"identical": False, "error": str(exc)[:200]}
    if a.shape != b.shape:
        return {"identical": False, "error": f"shape {list(a.shape)} != {list(b.shape)}"}
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    if kind == "png":
        return {
            "identical": bool((diff == 0).all()),
            "differing_pixels": int((diff > 0).sum()),
            "max_abs_diff": float(diff.max()),
        }
    return {"identical": bool(diff.max() <= 1e-5), "max_abs_diff": float(diff.max())}
