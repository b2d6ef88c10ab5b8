"""What the client sends and how it reads the answers: shared by `Client` and `AsyncClient`, no I/O here.

Each call is built as a `Call` (method, path, query, headers, body) and each answer is parsed by a pure
function, so the sync and async transports only send. Arrays travel as NPY both ways (the efficient
path: no JSON numbers, no PNG rounding); images given as PIL images, file bytes or paths go as they are.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import numpy as np

NPY = "application/x-npy"
JSON = "application/json"
PNG = "image/png"
NPY_MAGIC = b"\x93NUMPY"
RETRY_STATUSES = frozenset({429, 503})
LatentDtype = Literal["float32", "float16"]
LATENT_DTYPES: dict[str, type[np.floating]] = {"float32": np.float32, "float16": np.float16}
# An image: an array (H,W) | (C,H,W) | (N,H,W) | (N,C,H,W), a PIL image, PNG/TIFF/NPY file bytes or a path
ImageLike = Any


@dataclass(frozen=True)
class Call:
    """One HTTP request of the API, ready for either transport."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    content: bytes | None = None
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None

    def send_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `httpx.Client.request` / `httpx.AsyncClient.request`."""
        kwargs: dict[str, Any] = {"params": self.params or None, "headers": self.headers}
        if self.files is not None:
            kwargs["files"] = self.files
        elif self.content is not None:
            kwargs["content"] = self.content
        return kwargs


@dataclass(frozen=True)
class RetryPolicy:
    """How 429/503 answers (and connections refused) are retried: at most `retries` more tries, each after
    the answer's `Retry-After` (else an exponential backoff from `backoff_s`), capped at `max_wait_s`, plus
    up to `jitter` of it at random so that many clients do not come back at the same instant."""

    retries: int = 8
    backoff_s: float = 0.25
    max_wait_s: float = 30.0
    jitter: float = 0.2

    def delay_s(self, attempt: int, retry_after_s: float | None) -> float:
        """Seconds to wait before try `attempt + 1` (attempt counts from 0)."""
        base = retry_after_s if retry_after_s is not None else self.backoff_s * 2**attempt
        base = min(base, self.max_wait_s)
        return base * (1.0 + random.uniform(0.0, self.jitter))


@dataclass(frozen=True)
class AttentionMap:
    """The attention-map answer: head-averaged attention (N, T, T), saliency (N, C, H, W) or None, methods."""

    attention: np.ndarray
    saliency: np.ndarray | None
    methods: dict[str, str]


def model_path(model: str, capability: str = "") -> str:
    path = f"/v1/models/{quote(model, safe='')}"
    return f"{path}/{capability}" if capability else path


# ----------------------------------------------------------------------------------------------- bodies
def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def upload_array(array: np.ndarray) -> np.ndarray:
    """An image array as sent: integers and float32 as they are (uint8 is 4x smaller than float32, and the
    service scales integers to [0, 1] by their type), other floats and booleans as float32 / uint8."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    return array


def file_bytes(image: ImageLike) -> tuple[bytes, str]:
    """(bytes, media type) of a PIL image (sent as PNG), file bytes or a path (PNG, TIFF or NPY)."""
    if isinstance(image, str | PathLike):
        image = Path(image).read_bytes()
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        if data.startswith(NPY_MAGIC):
            return data, NPY
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return data, "image/tiff"
        return data, PNG
    if hasattr(image, "save"):  # a PIL image
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue(), PNG
    raise TypeError(f"cannot upload a {type(image).__name__} as an image")


def image_call(model: str, capability: str, images: ImageLike | Sequence[ImageLike], accept: str,
               params: Mapping[str, Any] | None = None) -> Call:
    """POST images to `capability`: one NPY body for arrays (a list of equal-size arrays is stacked), the
    file itself for one PIL image / file / path, a multipart `files` body for several."""
    query = {k: str(v) for k, v in (params or {}).items() if v is not None}
    headers = {"Accept": accept}
    path = model_path(model, capability)
    if isinstance(images, np.ndarray):
        return Call("POST", path, query, {**headers, "Content-Type": NPY}, npy_bytes(upload_array(images)))
    if isinstance(images, list | tuple):
        if all(isinstance(item, np.ndarray) for item in images):
            stack = np.stack([upload_array(item) for item in images])
            return Call("POST", path, query, {**headers, "Content-Type": NPY}, npy_bytes(stack))
        files = [("files", (f"image{i}", *file_bytes(item))) for i, item in enumerate(images)]
        return Call("POST", path, query, headers, files=files)
    data, media = file_bytes(images)
    return Call("POST", path, query, {**headers, "Content-Type": media}, data)


def encode_call(model: str, images: ImageLike, dtype: LatentDtype = "float32",
                params: Mapping[str, Any] | None = None) -> Call:
    if dtype not in LATENT_DTYPES:
        raise ValueError(f"dtype must be one of {list(LATENT_DTYPES)}, not {dtype!r}")
    query = {**(params or {}), **({"dtype": dtype} if dtype != "float32" else {})}
    return image_call(model, "encode", images, NPY, query)


def decode_call(model: str, latents: np.ndarray | None, params: Mapping[str, Any] | None = None) -> Call:
    """POST latents (N, D) as NPY float32 (a fixed-render decoder: `latents=None`, an empty body)."""
    query = {k: str(v) for k, v in (params or {}).items() if v is not None}
    if latents is None:
        return Call("POST", model_path(model, "decode"), query, {"Accept": NPY}, b"")
    array = np.asarray(latents, np.float32)
    array = array.reshape(1, -1) if array.ndim == 1 else array.reshape(array.shape[0], -1)
    return Call("POST", model_path(model, "decode"), query, {"Accept": NPY, "Content-Type": NPY}, npy_bytes(array))


def sample_call(model: str, num_samples: int = 1, seed: int | None = None, steps: int | None = None,
                eta: float | None = None, condition: Any = None) -> Call:
    body = {"num_samples": num_samples, "seed": seed, "steps": steps, "eta": eta, "condition": condition}
    content = json.dumps({k: v for k, v in body.items() if v is not None}).encode()
    return Call("POST", model_path(model, "sample"), {}, {"Accept": NPY, "Content-Type": JSON}, content)


def attention_call(model: str, image: ImageLike, saliency: bool = True) -> Call:
    return image_call(model, "attention-map", image, JSON, {"saliency": str(saliency).lower()})


# ----------------------------------------------------------------------------------------------- answers
def parse_array(response: httpx.Response) -> np.ndarray:
    """The NPY array of an answer (checked by its magic bytes, not by its media type)."""
    if not response.content.startswith(NPY_MAGIC):
        kind = response.headers.get("content-type", "?")
        raise ValueError(f"expected an NPY answer from {response.request.url}, got {kind}")
    return load_npy(response.content)


def parse_latents(response: httpx.Response, dtype: LatentDtype = "float32", rows: int | None = None) -> np.ndarray:
    """(N, D) latents of an encode answer in `dtype`; `rows`: the frames sent (a mismatch is an error)."""
    latents = parse_array(response)
    latents = latents.reshape(latents.shape[0], -1) if latents.ndim != 2 else latents
    if rows is not None and latents.shape[0] != rows:
        raise ValueError(f"encode answered {latents.shape[0]} latents for {rows} frames")
    return latents.astype(LATENT_DTYPES[dtype], copy=False)


def parse_attention(response: httpx.Response) -> AttentionMap:
    body = response.json()
    saliency = body.get("saliency")
    return AttentionMap(
        np.asarray(body["attention"], np.float32),
        None if saliency is None else np.asarray(saliency, np.float32),
        dict(body.get("methods") or {}),
    )


def parse_models(response: httpx.Response) -> list[dict[str, Any]]:
    return list(response.json()["models"])
