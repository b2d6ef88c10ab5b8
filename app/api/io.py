"""Request bodies in and responses out for the v1 routes (decoding/encoding runs in a threadpool)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from app import codecs
from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from app.schemas.manifest import OpSpec, Preprocessing
from app.settings import Settings

IMAGE_MEDIA_TYPES = ("image/", "application/x-npy", "application/octet-stream", "multipart/form-data")
LATENT_MEDIA_TYPES = ("application/json", "application/x-npy", "application/octet-stream")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


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


async def _parse_form(request: Request, body: bytes, settings: Settings):
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    replay = Request(request.scope, receive)
    try:
        return await replay.form(
            max_files=settings.max_frames, max_fields=64, max_part_size=settings.max_upload_bytes
        )
    except MultiPartException as exc:
        raise InvalidInput(f"bad multipart body: {exc}", field="files", limit=settings.max_frames) from exc


async def read_image_blobs(request: Request, settings: Settings) -> list[tuple[str, bytes]]:
    """(field, bytes) of each uploaded image: the raw body, or each multipart part named files/file."""
    kind = media_type(request)
    if kind and not kind.startswith(IMAGE_MEDIA_TYPES):
        raise UnsupportedMediaType(
            f"content-type {kind!r} is not an image upload",
            field="content-type",
            limit=["image/png", "image/tiff", "application/x-npy", "multipart/form-data"],
        )
    body = await read_body(request, settings.max_upload_bytes)
    if kind != "multipart/form-data":
        return [("file", body)]
    form = await _parse_form(request, body, settings)
    blobs = []
    for key in ("files", "file"):
        for index, part in enumerate(form.getlist(key)):
            if isinstance(part, UploadFile):
                blobs.append((f"{key}[{index}]", await part.read()))
    if not blobs:
        raise InvalidInput(
            "multipart body has no file under 'files' or 'file'", field="files", limit="1+ files"
        )
    return blobs


def decode_and_prepare(
    blobs: list[tuple[str, bytes]], preprocessing: Preprocessing, input_shape: list[int], max_frames: int
) -> np.ndarray:
    """Decode every blob and convert it to the model's input (N, C, H, W): integer images scaled to [0, 1]."""
    prepared, total = [], 0
    for field, data in blobs:
        images = codecs.decode_image_bytes(data, field)
        total += images.shape[0]
        if total > max_frames:
            raise InvalidInput(
                f"{total}+ frames in one request", field=field, limit=max_frames, code="too_many_frames"
            )
        prepared.append(
            codecs.prepare_images(images, preprocessing, input_shape, max_frames=max_frames, field=field)
        )
    shapes = {p.shape[1:] for p in prepared}
    if len(shapes) > 1:
        raise InvalidInput(
            "images of one request must share a size after preprocessing",
            field="files",
            limit=[list(s) for s in sorted(shapes)],
        )
    return prepared[0] if len(prepared) == 1 else np.concatenate(prepared)


async def read_images(
    request: Request, settings: Settings, preprocessing: Preprocessing, op: OpSpec
) -> np.ndarray:
    """Model input (N, C, H, W) for `op` from any supported upload."""
    blobs = await read_image_blobs(request, settings)
    return await run_in_threadpool(
        decode_and_prepare, blobs, preprocessing, op.inputs[0].shape, settings.max_frames
    )


async def read_latents(request: Request, settings: Settings, dim: int) -> np.ndarray:
    """(N, dim) latents from a JSON `{"latents": ...}` or NPY body."""
    kind = media_type(request)
    body = await read_body(request, settings.max_upload_bytes)
    if codecs.sniff_format(body) == "npy":
        return await run_in_threadpool(codecs.decode_latents_npy, body, dim, max_frames=settings.max_frames)
    if kind in ("", "application/json") or kind.endswith("+json"):
        return await run_in_threadpool(codecs.decode_latents_json, body, dim, max_frames=settings.max_frames)
    raise UnsupportedMediaType(
        f"content-type {kind!r} is not latents", field="content-type", limit=list(LATENT_MEDIA_TYPES)
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
    return Response(png, media_type=codecs.PNG_MEDIA_TYPE, headers=headers)


async def image_response(
    images: np.ndarray,
    output_range: tuple[float, float],
    fmt: str,
    *,
    bit_depth: int = 8,
    headers: dict[str, str] | None = None,
) -> Response:
    """Model images (N, C, H, W) as PNG (one image or a grid), NPY (raw values) or JSON."""
    if bit_depth not in (8, 16) or (bit_depth == 16 and fmt == "png" and images.shape[1] != 1):
        allowed = [8, 16] if images.shape[1] == 1 else [8]
        raise InvalidInput(
            f"bit_depth={bit_depth} for {images.shape[1]}-channel images", field="bit_depth", limit=allowed
        )
    headers = {**(headers or {}), "X-Output-Range": f"{output_range[0]},{output_range[1]}"}
    if fmt == "png":
        return await run_in_threadpool(_png_response, images, output_range, bit_depth, headers)
    if fmt == "npy":
        data = await run_in_threadpool(codecs.encode_npy, images.astype(np.float32))
        return Response(data, media_type=codecs.NPY_MEDIA_TYPE, headers=headers)
    body = {"images": images, "shape": list(images.shape), "output_range": list(output_range)}
    return Response(
        await run_in_threadpool(json_bytes, body), media_type=codecs.JSON_MEDIA_TYPE, headers=headers
    )


def json_bytes(body: dict[str, Any]) -> bytes:
    """JSON of a dict whose arrays become nested lists (run in a threadpool for big arrays)."""
    return json.dumps({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in body.items()}).encode()


async def latents_response(latents: np.ndarray, fmt: str) -> Response:
    if fmt == "npy":
        return Response(codecs.encode_npy(latents.astype(np.float32)), media_type=codecs.NPY_MEDIA_TYPE)
    return JSONResponse(codecs.encode_latents_json(latents))
