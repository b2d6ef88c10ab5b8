"""Pure functions between bytes and arrays: images (PNG/TIFF/NPY), latents (JSON/NPY), PNG grids.

Nothing here knows about HTTP or models beyond the manifest's `Preprocessing`; every problem with a
client's bytes is an `InvalidInput` naming the field and the limit. Image arrays are float32 NCHW.
Choosing the response format from the request is HTTP, not a codec: see `app.api.negotiation`.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError
from PIL.Image import DecompressionBombError

from app.errors import InvalidInput
from app.schemas.manifest import Preprocessing

NPY_MEDIA_TYPE = "application/x-npy"
PNG_MEDIA_TYPE = "image/png"
JSON_MEDIA_TYPE = "application/json"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_NPY_MAGIC = b"\x93NUMPY"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
MAX_DECODED_PIXELS = 2**28  # per uploaded file (a body or one multipart part): 1 GiB as float32
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's "L" conversion


# ----------------------------------------------------------------------------------------------- images in
def sniff_format(data: bytes) -> str:
    """'png' | 'tiff' | 'npy' | 'other' from the first bytes."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_NPY_MAGIC):
        return "npy"
    if data[:4] in _TIFF_MAGICS:
        return "tiff"
    return "other"


def to_unit_float(array: np.ndarray, field: str = "file") -> np.ndarray:
    """Integer images are divided by their dtype's max (-> [0, 1]); floats are kept; NaN/Inf is refused."""
    if array.dtype == np.bool_:
        out = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        out = array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    elif np.issubdtype(array.dtype, np.floating):
        out = array.astype(np.float32, copy=False)
    else:
        raise InvalidInput(f"unsupported array dtype {array.dtype}", field=field, limit="integer or float")
    if not np.isfinite(out).all():
        raise InvalidInput("image contains NaN or Inf values", field=field, limit="finite values")
    return out


def _check_pixels(count: int, field: str) -> None:
    if count > MAX_DECODED_PIXELS:
        raise InvalidInput(
            f"image decodes to {count} values", field=field, limit=MAX_DECODED_PIXELS, code="image_too_large"
        )


def _pil_to_nchw(data: bytes, field: str) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
        count = getattr(image, "n_frames", 1)
        _check_pixels(count * image.width * image.height * len(image.getbands()), field)
        frames = []
        for index in range(count):
            image.seek(index)
            frames.append(_pil_frame(image))
    except (UnidentifiedImageError, DecompressionBombError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"cannot decode image: {exc}", field=field, limit="PNG, TIFF or NPY") from exc
    shapes = {f.shape for f in frames}
    if len(shapes) != 1:
        raise InvalidInput("frames of the image differ in size", field=field)
    return np.stack(frames)


def _pil_frame(image: Image.Image) -> np.ndarray:
    """One Pillow frame -> (C, H, W) float32 in [0, 1] (8/16/32-bit integer or float modes)."""
    mode = image.mode
    if mode in ("1", "L", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        array = np.asarray(image)
        if mode == "1":
            array = array.astype(np.uint8) * 255
        return to_unit_float(array)[None]
    if mode == "I":  # 32-bit integer container; PNG/TIFF 16-bit data arrive this way in some Pillow builds
        array = np.asarray(image)
        bits = 16 if array.max(initial=0) <= 65535 and array.min(initial=0) >= 0 else 32
        return (array.astype(np.float64) / (2**bits - 1)).astype(np.float32)[None]
    if mode in ("LA", "PA"):
        image = image.convert("LA")
        return to_unit_float(np.asarray(image)[..., 0])[None]
    if mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in mode or "transparency" in image.info else "RGB")
    array = np.asarray(image)[..., :3]
    return np.moveaxis(to_unit_float(array), -1, 0)


def _tiff_to_nchw(data: bytes, field: str) -> np.ndarray:
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            axes = series.axes
            _check_pixels(int(np.prod(series.shape)), field)
            array = series.asarray()
    except InvalidInput:
        raise
    except Exception as exc:  # tifffile raises many types for corrupt files
        raise InvalidInput(f"cannot decode TIFF: {exc}", field=field, limit="PNG, TIFF or NPY") from exc
    if "S" in axes:  # samples (colour channels) become axis 1, every other leading axis N
        array = np.moveaxis(array, axes.index("S"), -1)
        array = array.reshape(-1, *array.shape[-3:])
        array = np.moveaxis(array, -1, 1)
    else:
        array = array.reshape(-1, 1, *array.shape[-2:]) if array.ndim >= 2 else array
    if array.ndim != 4:
        raise InvalidInput(f"TIFF has shape {series.shape}", field=field, limit="(H,W), (N,H,W) or RGB")
    return to_unit_float(array, field)


def _npy_to_nchw(data: bytes, field: str) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # ValueError, EOFError, UnpicklingError...
        raise InvalidInput(f"cannot read NPY: {exc}", field=field, limit="NPY without pickles") from exc
    if array.ndim == 2:
        array = array[None, None]
    elif array.ndim == 3:
        array = array[:, None]
    elif not (array.ndim == 4 and array.shape[1] in (1, 3, 4)):
        raise InvalidInput(
            f"NPY image has shape {list(array.shape)}",
            field=field,
            limit="(H,W) | (N,H,W) | (N,C,H,W), C in 1,3,4",
        )
    return to_unit_float(array, field)


def decode_image_bytes(data: bytes, field: str = "file") -> np.ndarray:
    """Bytes of a PNG / TIFF / NPY (or other Pillow format) -> float32 (N, C, H, W), C as stored."""
    if not data:
        raise InvalidInput("empty image body", field=field, limit="PNG, TIFF or NPY bytes")
    kind = sniff_format(data)
    if kind == "npy":
        array = _npy_to_nchw(data, field)
    elif kind == "tiff":
        array = _tiff_to_nchw(data, field)
    else:
        array = _pil_to_nchw(data, field)
    if array.shape[-1] == 0 or array.shape[-2] == 0 or array.shape[0] == 0:
        raise InvalidInput(f"image has an empty axis: {list(array.shape)}", field=field, limit="non-empty")
    return np.ascontiguousarray(array, dtype=np.float32)


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, C, H, W) -> (N, channels, H, W): RGB->gray by luma, alpha dropped, gray->RGB repeated."""
    have = images.shape[1]
    if have == 4:
        images, have = images[:, :3], 3
    if have == channels:
        return images
    if have == 3 and channels == 1:
        return np.tensordot(images, _LUMA, axes=([1], [0]))[:, None].astype(np.float32)
    if have == 1:
        return np.repeat(images, channels, axis=1)
    raise InvalidInput(f"image has {have} channels", field="file", limit=f"1 or {channels} channels")


def resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) to `size` (H, W), half-pixel centres (torch align_corners=False)."""
    out_h, out_w = size
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return images

    def axis(in_len: int, out_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
        src = np.clip(src, 0, in_len - 1)
        low = np.floor(src).astype(np.int64)
        high = np.minimum(low + 1, in_len - 1)
        return low, high, (src - low).astype(np.float32)

    y0, y1, wy = axis(in_h, out_h)
    x0, x1, wx = axis(in_w, out_w)
    rows = images[..., y0, :] * (1 - wy)[:, None] + images[..., y1, :] * wy[:, None]
    return (rows[..., x0] * (1 - wx) + rows[..., x1] * wx).astype(np.float32)


def prepare_images(
    images: np.ndarray,
    preprocessing: Preprocessing,
    input_shape: Sequence[int],
    *,
    max_frames: int,
    field: str = "file",
) -> np.ndarray:
    """Client images (N, C, H, W) -> model input for an op whose input spec has shape `input_shape`.

    Fixed H, W in the spec (or a dynamic graph of a model without `dynamic_hw`: its `input_size`):
    resize bilinearly if the manifest allows it, else 422. Dynamic H, W with `dynamic_hw`: any size
    >= `preprocessing.min_hw` is passed through unchanged.
    """
    if images.shape[0] > max_frames:
        raise InvalidInput(
            f"{images.shape[0]} frames in one request", field=field, limit=max_frames, code="too_many_frames"
        )
    channels = input_shape[1] if len(input_shape) == 4 and input_shape[1] > 0 else preprocessing.channels
    images = convert_channels(images, channels)
    want_h, want_w = (int(input_shape[2]), int(input_shape[3])) if len(input_shape) == 4 else (-1, -1)
    if (want_h <= 0 or want_w <= 0) and not preprocessing.dynamic_hw and preprocessing.input_size is not None:
        want_h, want_w = preprocessing.input_size  # the graph is dynamic but the model is not meant to be
    have = tuple(images.shape[-2:])
    if want_h > 0 and want_w > 0:
        if have != (want_h, want_w):
            if preprocessing.resize == "none":
                raise InvalidInput(
                    f"image is {have[0]}x{have[1]}; this model does not resize",
                    field=field,
                    limit=f"{want_h}x{want_w}",
                    code="wrong_image_size",
                )
            images = resize_bilinear(images, (want_h, want_w))
    else:
        min_h, min_w = preprocessing.min_hw
        if have[0] < min_h or have[1] < min_w:
            raise InvalidInput(
                f"image is {have[0]}x{have[1]}",
                field=field,
                limit=f">= {min_h}x{min_w}",
                code="image_too_small",
            )
    return np.ascontiguousarray(images, dtype=np.float32)


# ----------------------------------------------------------------------------------------------- latents
def decode_latents_json(data: bytes, dim: int, *, max_frames: int) -> np.ndarray:
    """`{"latents": [[...], ...]}` (or one flat vector) -> float32 (N, dim)."""
    try:
        payload = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"body is not JSON: {exc}", field="latents", limit='{"latents": [[...]]}') from exc
    if not isinstance(payload, dict) or "latents" not in payload:
        raise InvalidInput("JSON body needs a 'latents' key", field="latents", limit='{"latents": [[...]]}')
    try:
        array = np.asarray(payload["latents"], dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"latents are not a numeric matrix: {exc}", field="latents", limit=f"(N, {dim})"
        ) from exc
    return check_latents(array, dim, max_frames=max_frames)


def decode_latents_npy(data: bytes, dim: int, *, max_frames: int) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:
        raise InvalidInput(f"cannot read NPY: {exc}", field="latents", limit="NPY without pickles") from exc
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise InvalidInput(f"latents have dtype {array.dtype}", field="latents", limit="float or int")
    return check_latents(array.astype(np.float32), dim, max_frames=max_frames)


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


def encode_latents_json(latents: np.ndarray) -> dict[str, Any]:
    return {"latents": latents.tolist(), "shape": list(latents.shape)}


# ----------------------------------------------------------------------------------------------- outputs
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


def encode_png(image_chw: np.ndarray, bit_depth: int = 8) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes (8-bit gray/RGB/RGBA, or 16-bit gray)."""
    channels = image_chw.shape[0]
    if bit_depth == 16 and channels == 1:
        array = np.round(image_chw[0] * 65535).astype(np.uint16)
        image = Image.fromarray(array)
    else:
        array = np.round(image_chw * 255).astype(np.uint8)
        image = Image.fromarray(array[0]) if channels == 1 else Image.fromarray(np.moveaxis(array, 0, -1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


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
