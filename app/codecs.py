"""Pure functions between bytes and arrays: images (PNG/TIFF/NPY), latents (JSON/NPY), PNG grids.

Nothing here knows about HTTP or models beyond the manifest's `Preprocessing`; every problem with a
client's bytes is an `InvalidInput` naming the field and the limit. Image arrays are float32 NCHW.
Sizes come first, from the headers (`app.image_headers`); images are then decoded one frame at a time
(`iter_frames`) and each frame prepared for the model (`app.preprocess`), so the working memory of a
request is what its headers declare, not a multiple of it.
Each decoder and encoder is timed once, here (`app.metrics.timed_codec`, `timed_frames`).
Choosing the response format from the request is HTTP, not a codec: see `app.api.negotiation`.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tifffile
from PIL import Image

from app.errors import InvalidInput, ServiceError
from app.image_headers import (
    ACCEPTED_FORMATS,
    PLAIN_TIFF,
    VALUE_KINDS,
    ImageHeader,
    npy_array,
    npy_header,
    read_header,
    sniff_format,
)
from app.metrics import timed_codec, timed_frames
from app.preprocess import convert_channels

__all__ = ["sniff_format"]

NPY_MEDIA_TYPE = "application/x-npy"
PNG_MEDIA_TYPE = "image/png"
JSON_MEDIA_TYPE = "application/json"

PILLOW_FORMATS = ("PNG",)  # all Pillow may parse: TIFF goes to tifffile, NPY to numpy; never EPS/PS/GIF...
MAX_DECODED_PIXELS = 2**28  # values per uploaded file (a body or one multipart part): 1 GiB as float32
_JSON_BYTES_PER_NUMBER = 40  # a parsed JSON number: a Python float (24 B) and its list slot, with slack


# ----------------------------------------------------------------------------------------------- images in
def to_unit_float(array: np.ndarray, field: str = "file") -> np.ndarray:
    """Integer images are divided by their dtype's max (-> [0, 1]); floats are kept; NaN/Inf is refused."""
    kind = array.dtype.kind
    if kind == "b":
        out = array.astype(np.float32)
    elif kind in "iu":
        out = array.astype(np.float32)
        out /= np.float32(np.iinfo(array.dtype).max)
    elif kind == "f":
        out = array.astype(np.float32, copy=False)
    else:
        raise InvalidInput(f"unsupported array dtype {array.dtype}", field=field, limit=VALUE_KINDS)
    if not np.isfinite(out).all():
        raise InvalidInput("image contains NaN or Inf values", field=field, limit="finite values")
    return out


def raw_values(array: np.ndarray, field: str = "file") -> np.ndarray:
    """Detector frames as stored: integers kept (counts), floats as float32 (`to_unit_float`'s checks)."""
    return array if array.dtype.kind in "iu" else to_unit_float(array, field)


def _pil_frame(image: Image.Image, convert: Callable[..., np.ndarray] = to_unit_float) -> np.ndarray:
    """One Pillow PNG frame -> (C, H, W) float32 in [0, 1] (gray frames through `convert`)."""
    mode = image.mode
    if mode in ("1", "L", "I;16", "I;16B"):  # PNG modes of Pillow >= 10 (16-bit gray is I;16, never I)
        array = np.asarray(image)
        if mode == "1":
            array = array.astype(np.uint8) * 255
        return convert(array)[None]
    if mode == "LA":
        image = image.convert("LA")
        return convert(np.asarray(image)[..., 0])[None]
    if mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
    array = np.asarray(image)[..., :3]
    return np.moveaxis(to_unit_float(array), -1, 0)


def _png_frames(data: bytes, field: str, convert: Callable[..., np.ndarray]) -> Iterator[np.ndarray]:
    with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as image:
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            yield _pil_frame(image, convert)


def _tiff_frames(data: bytes, field: str, convert: Callable[..., np.ndarray]) -> Iterator[np.ndarray]:
    """The first series of a plain TIFF (its declared size, read at once), one (C, H, W) frame at a time."""
    with tifffile.TiffFile(io.BytesIO(data), **PLAIN_TIFF) as tif:
        series = tif.series[0]
        array, axes = series.asarray(maxworkers=1), series.axes
    # samples (colour channels) become axis -3, every other leading axis a frame
    array = np.moveaxis(array, axes.index("S"), -3) if "S" in axes else array[..., None, :, :]
    for index in np.ndindex(*array.shape[:-3]):
        yield convert(array[index], field)


def _npy_frames(data: bytes, field: str, convert: Callable[..., np.ndarray]) -> Iterator[np.ndarray]:
    array = npy_array(data, npy_header(data, field))  # a view of `data`
    array = array[None, None] if array.ndim == 2 else array[:, None] if array.ndim == 3 else array
    for frame in array:
        yield convert(frame, field)


def iter_frames(data: bytes, header: ImageHeader, field: str = "file", unit: bool = True) -> Iterator[np.ndarray]:
    """Decode an upload whose `header` was read (and sized): float32 (C, H, W) frames, C as stored, integers
    scaled to [0, 1]; with `unit=False` integer frames keep their values and dtype (`raw_values`: counts)."""
    return timed_frames(_checked_frames(data, header, field, unit), header.kind)


def _checked_frames(data: bytes, header: ImageHeader, field: str, unit: bool) -> Iterator[np.ndarray]:
    frames = {"npy": _npy_frames, "tiff": _tiff_frames}.get(header.kind, _png_frames)
    source = frames(data, field, to_unit_float if unit else raw_values)
    expected = (header.bands, header.height, header.width)
    try:
        for count, frame in enumerate(source, start=1):
            if frame.shape != expected or count > header.frames:
                raise InvalidInput(
                    f"decoded frame {count} has shape {list(frame.shape)}, its header declares {header.describe}",
                    field=field,
                    limit=list(expected),
                )
            yield frame
    except ServiceError:
        raise
    except Exception as exc:  # Pillow, tifffile and numpy raise many types for corrupt files
        raise InvalidInput(f"cannot decode image: {exc}", field=field, limit=ACCEPTED_FORMATS) from exc


def decode_image_bytes(data: bytes, field: str = "file") -> np.ndarray:
    """Bytes of a PNG / TIFF / NPY -> float32 (N, C, H, W), C as stored (at most MAX_DECODED_PIXELS values)."""
    header = read_header(data, field, max_frames=MAX_DECODED_PIXELS)
    if header.values > MAX_DECODED_PIXELS:
        raise InvalidInput(
            f"image decodes to {header.values} values",
            field=field,
            limit=MAX_DECODED_PIXELS,
            code="image_too_large",
        )
    return np.stack(list(iter_frames(data, header, field)))


# ----------------------------------------------------------------------------------------------- latents
def latents_json_bytes(data: bytes, dim: int, *, max_frames: int) -> int:
    """Memory a JSON latents body may take once parsed, counted before parsing; 422 for bodies that
    cannot be (N <= max_frames, dim) latents: far too many numbers or lists (deep nesting included)."""
    numbers, lists, objects = data.count(b",") + 1, data.count(b"["), data.count(b"{")
    if numbers > 2 * max_frames * dim + 64 or lists > 2 * max_frames + 8 or objects > 64:
        raise InvalidInput(
            f"JSON body of {numbers} numbers in {lists} lists and {objects} objects",
            field="latents",
            limit=f'{{"latents": (N, {dim})}}, N <= {max_frames}',
            code="json_too_large",
        )
    return len(data) + numbers * _JSON_BYTES_PER_NUMBER


@timed_codec("decode", "json")
def decode_latents_json(data: bytes, dim: int, *, max_frames: int) -> np.ndarray:
    """`{"latents": [[...], ...]}` (or one flat vector) -> float32 (N, dim); integers are read as floats."""
    latents_json_bytes(data, dim, max_frames=max_frames)
    try:
        payload = json.loads(data, parse_int=float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidInput(f"body is not JSON: {exc}", field="latents", limit='{"latents": [[...]]}') from exc
    if not isinstance(payload, dict) or "latents" not in payload:
        raise InvalidInput("JSON body needs a 'latents' key", field="latents", limit='{"latents": [[...]]}')
    try:
        array = np.asarray(payload["latents"], dtype=np.float32)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidInput(
            f"latents are not a numeric matrix: {exc}", field="latents", limit=f"(N, {dim})"
        ) from exc
    return check_latents(array, dim, max_frames=max_frames)


@timed_codec("decode", "npy")
def decode_latents_npy(data: bytes, dim: int, *, max_frames: int) -> np.ndarray:
    """An NPY of (N, dim) or (dim,) integers or floats -> float32 (N, dim); sized from its header first."""
    header = npy_header(data, "latents", kinds="iuf", kinds_limit="float or int")
    rows = header.shape[0] if len(header.shape) == 2 else 1
    if len(header.shape) in (1, 2) and rows > max_frames:
        raise InvalidInput(
            f"{rows} latents in one request", field="latents", limit=max_frames, code="too_many_frames"
        )
    if len(header.shape) not in (1, 2) or header.shape[-1] != dim:
        raise InvalidInput(
            f"latents have shape {list(header.shape)}",
            field="latents",
            limit=f"(N, {dim})",
            code="wrong_latent_shape",
        )
    return check_latents(npy_array(data, header).astype(np.float32), dim, max_frames=max_frames)


def check_latents(array: np.ndarray, dim: int, *, max_frames: int) -> np.ndarray:
    if array.ndim == 1:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != dim or array.shape[0] == 0:
        raise InvalidInput(
            f"latents have shape {list(array.shape)}",
            field="latents",
            limit=f"(N, {dim})",
            code="wrong_latent_shape",
        )
    if array.shape[0] > max_frames:
        raise InvalidInput(
            f"{array.shape[0]} latents in one request",
            field="latents",
            limit=max_frames,
            code="too_many_frames",
        )
    if not np.isfinite(array).all():
        raise InvalidInput(
            "latents contain NaN or Inf", field="latents", limit="finite values", code="non_finite"
        )
    return np.ascontiguousarray(array, dtype=np.float32)


@timed_codec("encode", "json")
def encode_latents_json(latents: np.ndarray) -> dict[str, Any]:
    return {"latents": latents.tolist(), "shape": list(latents.shape)}


# ----------------------------------------------------------------------------------------------- outputs
@timed_codec("encode", "npy")
def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def to_unit_range(images: np.ndarray, output_range: tuple[float, float]) -> np.ndarray:
    """Model output in `output_range` -> [0, 1], clipped."""
    low, high = output_range
    return np.clip((images - low) / (high - low), 0.0, 1.0)


def grid_shape(count: int) -> tuple[int, int]:
    """Rows, cols of a near-square grid holding `count` tiles (cols >= rows)."""
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    return rows, cols


def tile_grid(images: np.ndarray, padding: int = 2) -> tuple[np.ndarray, int, int]:
    """(N, C, H, W) in [0, 1] -> one (C, H', W') grid with `padding` pixels of 0 between tiles."""
    count, channels, height, width = images.shape
    if count == 1:
        return images[0], 1, 1
    rows, cols = grid_shape(count)
    grid = np.zeros(
        (channels, rows * height + (rows - 1) * padding, cols * width + (cols - 1) * padding),
        dtype=images.dtype,
    )
    for index in range(count):
        r, c = divmod(index, cols)
        top, left = r * (height + padding), c * (width + padding)
        grid[:, top : top + height, left : left + width] = images[index]
    return grid, rows, cols


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> gray, gray+alpha, RGB, RGBA


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(image_chw: np.ndarray, bit_depth: int = 8) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes (8-bit gray/gray+alpha/RGB/RGBA, or 16-bit gray).

    Written directly (PNG spec: IHDR, one IDAT of zlib level 1 over unfiltered rows, IEND): the same pixels
    as Pillow's writer at a fraction of its per-image Python cost (28x28: 59 us against 124 us), which
    small answers pay on the event loop."""
    channels, height, width = image_chw.shape
    if bit_depth == 16 and channels == 1:
        rows = np.round(image_chw[0] * 65535).astype(">u2")
    else:
        bit_depth = 8
        rows = np.moveaxis(np.round(image_chw * 255).astype(np.uint8), 0, -1)
    scanlines = np.zeros((height, 1 + width * channels * rows.itemsize), np.uint8)  # filter byte 0: none
    scanlines[:, 1:] = np.ascontiguousarray(rows).reshape(height, -1).view(np.uint8)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, PNG_COLOR_TYPES[channels], 0, 0, 0)
    return b"".join((PNG_SIGNATURE, _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(scanlines.tobytes(), 1)), _png_chunk(b"IEND", b"")))


@timed_codec("encode", "png")
def encode_png_grid(images01: np.ndarray, bit_depth: int = 8) -> tuple[bytes, int, int]:
    """(N, C, H, W) in [0, 1] -> PNG bytes of one image or a grid, plus (rows, cols)."""
    grid, rows, cols = tile_grid(images01)
    return encode_png(grid, bit_depth), rows, cols


def heat_overlay(images01: np.ndarray, heat01: np.ndarray, alpha: float = 0.6, percentile: float = 99.0) -> np.ndarray:
    """Blend a [0, 1] heatmap (N, 1|C, H, W) as a red-yellow map over [0, 1] images -> (N, 3, H, W).

    Gradient saliency is heavy-tailed (a few pixels hold the maximum), so for display each frame's
    heat is stretched to its `percentile` and clipped; the numbers (`format=json`) stay unstretched."""
    base = convert_channels(images01, 3) if images01.shape[1] != 3 else images01
    heat = heat01.max(axis=1, keepdims=True) if heat01.shape[1] != 1 else heat01
    top = np.percentile(heat.reshape(heat.shape[0], -1), percentile, axis=1).reshape(-1, 1, 1, 1)
    heat = np.clip(heat / np.maximum(top, 1e-12), 0, 1)
    colour = np.concatenate(
        [np.clip(2 * heat, 0, 1), np.clip(2 * heat - 1, 0, 1), np.zeros_like(heat)], axis=1
    )
    weight = alpha * heat
    return (base * (1 - weight) + colour * weight).astype(np.float32)
