"""Request bodies in and responses out for the v1 routes.

Image uploads are sized from their headers against the request's memory budget before anything is
decoded, then decoded in a small pool of threads (`max_concurrent_decodes`); answers are sized in the
format asked for before they are encoded (`app.budget`). Inside `input_memory` (the route's whole
request) the readers hold the request's input bytes in the app's pool (`max_inflight_memory_bytes`):
the body's Content-Length before reading it, then the headers' estimate before decoding; the writers
hold the answer's estimate on top before encoding it (429 when the pool has no room). Sizing and decoding
an upload from its headers is `app.api.uploads`. Latent answers honour `?dtype=float32|float16`; every
answer whose media type the request negotiated carries `Vary: Accept`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import anyio
import numpy as np
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import FormData, QueryParams, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app import codecs, preprocess
from app.api.deps import ROUTE_OPS
from app.api.negotiation import vary_on_accept
from app.api.uploads import decode_and_prepare as decode_and_prepare  # moved there; callers still find it here
from app.api.uploads import decode_upload, plan_upload
from app.budget import (
    InputReservation,
    MemoryBudget,
    answers_held_by,
    check_answer,
    decode_limiter,
    hold_answer,
    input_pool,
)
from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from app.schemas.manifest import OpSpec, Preprocessing
from app.settings import Settings

IMAGE_MEDIA_TYPES = ("image/", "application/x-npy", "application/octet-stream", "multipart/form-data")
LATENT_MEDIA_TYPES = ("application/json", "application/x-npy", "application/octet-stream")


RESERVATION_KEY = "aeserve_input_reservation"  # request.state attribute of the open `input_memory`
# Latent bodies count this many times their size against `inline_codec_bytes`: parsed JSON takes ~40 bytes
# per number written in ~10-20 (measured: 32 numbers 23 us, 2048 numbers 0.8 ms; a thread trip ~60-160 us).
INLINE_LATENT_COST = 16
# Answers count values x this against it: a PNG encodes ~20k values per ms, an NPY copies ~2M (measured).
INLINE_ANSWER_COST = {"png": 24, "npy": 1}
# `?dtype=` of latent answers (NPY and JSON): the values are rounded to it; float32 when the query names none
LATENT_DTYPES = {"float32": np.float32, "float16": np.float16}
_latent_dtype: ContextVar[str] = ContextVar("aeserve_latent_dtype", default="float32")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def rejection_labels(request: Request) -> tuple[str, str, str]:
    """(model, version, op) of a v1 request, from its path and the registry, for `aeserve_rejections_total`."""
    name = str(request.path_params.get("name", ""))
    registry = getattr(request.app.state, "models", None)
    version = request.path_params.get("version")
    record = None
    if registry is not None and name:
        record = registry.get(name) if version is None else registry.get_version(name, str(version))
    op = str(request.scope.get("path", "")).rsplit("/", 1)[-1]
    return name, record.label_version if record is not None else "", op if op in ROUTE_OPS else ""


@asynccontextmanager
async def input_memory(
    request: Request, settings: Settings, labels: tuple[str, str, str] | None = None
) -> AsyncIterator[InputReservation]:
    """Hold the request's input bytes, then its answer's, in the app's pool until the block exits, however
    it exits.

    The route wraps the whole request in it: the readers raise the hold as the size becomes known (the
    decoded arrays wait in the batcher's queues long after the read has returned), and the writers raise
    it by the answer's estimate before encoding (`app.budget.hold_answer`, through the request's context).
    `labels` (model, version, op) name its rejections in the metrics; by default the path's.
    """
    dtype = _latent_dtype.set(latent_dtype_of(request))  # 422 before anything is read or held
    reservation = InputReservation(input_pool(request.app.state, settings), labels or rejection_labels(request))
    setattr(request.state, RESERVATION_KEY, reservation)
    answers_held_by(reservation)
    try:
        yield reservation
    finally:
        answers_held_by(None)
        reservation.release()
        _latent_dtype.reset(dtype)


def latent_dtype_of(request: Request) -> str:
    """The request's `?dtype=` for latent answers ("float32" when absent); 422 naming the allowed values."""
    value = QueryParams(request.scope.get("query_string", b"")).get("dtype")
    return check_latent_dtype(value)


def check_latent_dtype(value: str | None) -> str:
    """`value` if it names a latent dtype (None: float32); else 422 naming `dtype` and the allowed values."""
    if value is None:
        return "float32"
    if value not in LATENT_DTYPES:
        raise InvalidInput(f"dtype={value!r} is not offered for latents", field="dtype", limit=list(LATENT_DTYPES))
    return value


def hold_input(request: Request, total: int, *, field: str, what: str) -> None:
    """Hold `total` input bytes for the request (413 past the pool, 429 when it is full); a read outside
    `input_memory` holds nothing."""
    reservation: InputReservation | None = getattr(request.state, RESERVATION_KEY, None)
    if reservation is not None:
        reservation.hold(total, field=field, what=what)


async def read_held_body(request: Request, settings: Settings) -> bytes:
    """The body (`read_body`), held for the request: its Content-Length before reading (a 429 then costs
    nothing), what arrived after."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) <= settings.max_upload_bytes:
        hold_input(request, int(declared), field="body", what=f"a body of {declared} bytes")
    body = await read_body(request, settings.max_upload_bytes)
    hold_input(request, len(body), field="body", what=f"a body of {len(body)} bytes")
    return body


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) anything over `limit` bytes before and while reading it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes", field="body", limit=limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body exceeds {limit} bytes", field="body", limit=limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_form(request: Request, body: bytes, settings: Settings) -> FormData:
    """The multipart form of `body` (already read); any malformed body or boundary is a 422."""

    async def chunks() -> AsyncIterator[bytes]:
        yield body

    parser = MultiPartParser(
        request.headers,
        chunks(),
        max_files=settings.max_frames,
        max_fields=64,
        max_part_size=settings.max_upload_bytes,
    )
    try:
        return await parser.parse()
    except (MultiPartException, ValueError, KeyError) as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise InvalidInput(
            f"bad multipart body: {message}",
            field="files",
            limit=f"multipart/form-data with a boundary, <= {settings.max_frames} files",
        ) from exc


async def read_image_blobs(request: Request, settings: Settings) -> list[tuple[str, bytes]]:
    """(field, bytes) of each uploaded image: the raw body, or each multipart part named files/file."""
    kind = media_type(request)
    if kind and not kind.startswith(IMAGE_MEDIA_TYPES):
        raise UnsupportedMediaType(
            f"content-type {kind!r} is not an image upload",
            field="content-type",
            limit=["image/png", "image/tiff", "application/x-npy", "multipart/form-data"],
        )
    body = await read_held_body(request, settings)
    if kind != "multipart/form-data":
        return [("file", body)]
    form = await _parse_form(request, body, settings)
    blobs = []
    try:
        for key in ("files", "file"):
            for index, part in enumerate(form.getlist(key)):
                if isinstance(part, UploadFile):
                    blobs.append((f"{key}[{index}]", await part.read()))
    finally:
        await form.close()
    if not blobs:
        raise InvalidInput(
            "multipart body has no file under 'files' or 'file'", field="files", limit="1+ files"
        )
    return blobs


async def read_images(
    request: Request, settings: Settings, preprocessing: Preprocessing, op: OpSpec
) -> np.ndarray:
    """Model input (N, C, H, W) for `op` from any supported upload, held for the request from its headers'
    estimate before it is decoded (sized and decoded in a bounded pool of threads)."""
    # 4D-STEM models take raw detector frames (their query parameters are read only for them)
    raw = preprocess.raw_detector(preprocessing, request.query_params) if preprocessing.intensity else None
    blobs = await read_image_blobs(request, settings)
    limiter = decode_limiter(request.app.state, settings)
    shape = op.inputs[0].shape
    if sum(len(data) for _, data in blobs) <= settings.inline_codec_bytes:  # headers of a small upload
        plan = plan_upload(blobs, preprocessing, shape, settings, raw)
    else:
        plan = await anyio.to_thread.run_sync(plan_upload, blobs, preprocessing, shape, settings, raw, limiter=limiter)
    hold_input(request, plan.held_bytes, field=plan.field, what=f"the model input {list(plan.shape)} and its upload")
    if plan.held_bytes <= settings.inline_codec_bytes:  # cheaper here than a trip through a thread
        return decode_upload(plan)
    return await anyio.to_thread.run_sync(decode_upload, plan, limiter=limiter)


def decode_latents(body: bytes, kind: str, dim: int, settings: Settings) -> np.ndarray:
    """(N, dim) latents from NPY or JSON bytes; a JSON body is sized against the budget before parsing."""
    if codecs.sniff_format(body) == "npy":
        return codecs.decode_latents_npy(body, dim, max_frames=settings.max_frames)
    if kind in ("", "application/json") or kind.endswith("+json"):
        parsed = codecs.latents_json_bytes(body, dim, max_frames=settings.max_frames)
        MemoryBudget(settings.max_request_memory_bytes).charge(parsed, field="latents", what="parsing the JSON")
        return codecs.decode_latents_json(body, dim, max_frames=settings.max_frames)
    raise UnsupportedMediaType(
        f"content-type {kind!r} is not latents", field="content-type", limit=list(LATENT_MEDIA_TYPES)
    )


async def read_latents(request: Request, settings: Settings, dim: int) -> np.ndarray:
    """(N, dim) latents from a JSON `{"latents": ...}` or NPY body."""
    kind = media_type(request)
    body = await read_held_body(request, settings)
    latents = 4 * settings.max_frames * dim  # the float32 array at most (decoding refuses more rows)
    hold_input(request, len(body) + latents, field="latents", what="the latents and their body")
    if len(body) * INLINE_LATENT_COST <= settings.inline_codec_bytes:  # cheaper here than a trip to a thread
        return decode_latents(body, kind, dim, settings)
    return await anyio.to_thread.run_sync(
        decode_latents, body, kind, dim, settings, limiter=decode_limiter(request.app.state, settings)
    )


def _png_response(
    images: np.ndarray, output_range: tuple[float, float], bit_depth: int, headers: dict[str, str]
) -> Response:
    png, rows, cols = codecs.encode_png_grid(codecs.to_unit_range(images, output_range), bit_depth)
    headers = {
        **headers,
        "X-Image-Count": str(images.shape[0]),
        "X-Grid-Rows": str(rows),
        "X-Grid-Cols": str(cols),
        "X-Image-Shape": ",".join(map(str, images.shape[1:])),
    }
    return vary_on_accept(Response(png, media_type=codecs.PNG_MEDIA_TYPE, headers=headers))


async def image_response(
    images: np.ndarray,
    output_range: tuple[float, float],
    fmt: str,
    *,
    bit_depth: int = 8,
    headers: dict[str, str] | None = None,
    inline_bytes: int = 0,
) -> Response:
    """Model images (N, C, H, W) as PNG (one image or a grid), NPY (raw values) or JSON; PNG and NPY answers
    that cost at most `inline_bytes` (`INLINE_ANSWER_COST`) are encoded on the event loop."""
    if bit_depth not in (8, 16) or (bit_depth == 16 and fmt == "png" and images.shape[1] != 1):
        allowed = [8, 16] if images.shape[1] == 1 else [8]
        raise InvalidInput(
            f"bit_depth={bit_depth} for {images.shape[1]}-channel images", field="bit_depth", limit=allowed
        )
    check_answer(images.size, fmt, ("png", "npy", "json"))
    hold_answer(images.size, fmt)
    headers = {**(headers or {}), "X-Output-Range": f"{output_range[0]},{output_range[1]}"}
    inline = images.size * INLINE_ANSWER_COST.get(fmt, 0) <= inline_bytes  # cheaper here than in a thread
    if fmt == "png":
        if inline:
            return _png_response(images, output_range, bit_depth, headers)
        return await run_in_threadpool(_png_response, images, output_range, bit_depth, headers)
    if fmt == "npy":
        if inline:
            data = codecs.encode_npy(images.astype(np.float32, copy=False))
        else:
            data = await run_in_threadpool(codecs.encode_npy, images.astype(np.float32, copy=False))
        return vary_on_accept(Response(data, media_type=codecs.NPY_MEDIA_TYPE, headers=headers))
    body = {"images": images, "shape": list(images.shape), "output_range": list(output_range)}
    return vary_on_accept(Response(await json_answer(body), media_type=codecs.JSON_MEDIA_TYPE, headers=headers))


async def json_answer(body: dict[str, Any]) -> bytes:
    """`json_bytes` in a threadpool, its arrays checked and held in the request's pool share first."""
    values = sum(v.size for v in body.values() if isinstance(v, np.ndarray))
    check_answer(values, "json", ("json",))
    hold_answer(values, "json")
    return await run_in_threadpool(json_bytes, body)


def json_bytes(body: dict[str, Any]) -> bytes:
    """JSON of a dict whose arrays become nested lists (run in a threadpool for big arrays); 413 up front
    for arrays too big to encode within the answer budget."""
    check_answer(sum(v.size for v in body.values() if isinstance(v, np.ndarray)), "json", ("json",))
    return json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in body.items()}).encode()


async def latents_response(latents: np.ndarray, fmt: str, dtype: str | None = None) -> Response:
    """(N, D) latents as NPY or JSON (`{"latents", "shape", "dtype"}`), rounded to `dtype` (None: the
    request's `?dtype=`, read by `input_memory`; float32 outside a request)."""
    dtype = check_latent_dtype(dtype) if dtype is not None else _latent_dtype.get()
    check_answer(latents.size, fmt, ("json", "npy"))
    hold_answer(latents.size, fmt)
    values = latents.astype(LATENT_DTYPES[dtype])
    if fmt == "npy":
        return vary_on_accept(Response(codecs.encode_npy(values), media_type=codecs.NPY_MEDIA_TYPE))
    body = json.dumps({**codecs.encode_latents_json(values), "dtype": dtype}, separators=(",", ":")).encode()
    return vary_on_accept(Response(body, media_type=codecs.JSON_MEDIA_TYPE))
