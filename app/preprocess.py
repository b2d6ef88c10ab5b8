"""Client images -> model input, as the manifest's `Preprocessing` says: channels, size, resizing.

Sizes are decided from the declared size alone (`model_input_size`, `frame_work_bytes`), before
anything is decoded; `prepare_frame` then converts one decoded frame at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.errors import InvalidInput
from app.image_headers import ImageHeader
from app.schemas.manifest import Preprocessing

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as Pillow's "L" conversion


def model_channels(preprocessing: Preprocessing, input_shape: Sequence[int]) -> int:
    """Channels of the model input: the op's input spec when fixed, else the manifest's."""
    return int(input_shape[1]) if len(input_shape) == 4 and input_shape[1] > 0 else preprocessing.channels


def model_input_size(
    have: tuple[int, int],
    preprocessing: Preprocessing,
    input_shape: Sequence[int],
    *,
    field: str = "file",
    max_hw: tuple[int, int] | None = None,
    max_pixels: int | None = None,
) -> tuple[int, int]:
    """(H, W) the model gets for a client image of size `have`, or 422.

    Fixed H, W in the spec (or a dynamic graph of a model without `dynamic_hw`: its `input_size`):
    resized bilinearly if the manifest allows it. Dynamic H, W with `dynamic_hw`: any size from
    `preprocessing.min_hw` up to `max_hw` and `max_pixels` is passed through unchanged.
    """
    want_h, want_w = (int(input_shape[2]), int(input_shape[3])) if len(input_shape) == 4 else (-1, -1)
    if (want_h <= 0 or want_w <= 0) and not preprocessing.dynamic_hw and preprocessing.input_size is not None:
        want_h, want_w = preprocessing.input_size  # the graph is dynamic but the model is not meant to be
    if want_h > 0 and want_w > 0:
        if have != (want_h, want_w) and preprocessing.resize == "none":
            raise InvalidInput(
                f"image is {have[0]}x{have[1]}; this model does not resize",
                field=field,
                limit=f"{want_h}x{want_w}",
                code="wrong_image_size",
            )
        return want_h, want_w
    min_h, min_w = preprocessing.min_hw
    if have[0] < min_h or have[1] < min_w:
        raise InvalidInput(
            f"image is {have[0]}x{have[1]}", field=field, limit=f">= {min_h}x{min_w}", code="image_too_small"
        )
    side_ok = max_hw is None or (have[0] <= max_hw[0] and have[1] <= max_hw[1])
    if not side_ok or (max_pixels is not None and have[0] * have[1] > max_pixels):
        bounds = [f"<= {max_hw[0]}x{max_hw[1]}"] if max_hw else []
        bounds += [f"<= {max_pixels} pixels"] if max_pixels else []
        raise InvalidInput(
            f"image is {have[0]}x{have[1]}; this model's memory grows with the pixel count",
            field=field,
            limit=" and ".join(bounds),
            code="image_too_large",
        )
    return have


def check_channels(have: int, channels: int, field: str = "file") -> None:
    """422 unless `have` channels convert to `channels` (1, RGB, RGBA or already right)."""
    if have not in (1, 3, 4, channels):
        raise InvalidInput(f"image has {have} channels", field=field, limit=f"1 or {channels} channels")


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
    """(N, C, H, W) -> (N, channels, H, W): RGB->gray by luma, alpha dropped, gray->RGB repeated."""
    have = images.shape[1]
    check_channels(have, channels)
    if have == 4:
        images, have = images[:, :3], 3
    if have == channels:
        return images
    if have == 3 and channels == 1:
        return np.tensordot(images, _LUMA, axes=([1], [0]))[:, None].astype(np.float32)
    return np.repeat(images, channels, axis=1)


def _interpolate_axis(images: np.ndarray, axis: int, out_len: int) -> np.ndarray:
    """Linear interpolation along one axis, half-pixel centres (torch align_corners=False)."""
    in_len = images.shape[axis]
    src = (np.arange(out_len, dtype=np.float64) + 0.5) * (in_len / out_len) - 0.5
    src = np.clip(src, 0, in_len - 1)
    low = np.floor(src).astype(np.int64)
    high = np.minimum(low + 1, in_len - 1)
    shape = [1] * images.ndim
    shape[axis] = out_len
    weight = (src - low).astype(np.float32).reshape(shape)
    out = np.take(images, low, axis=axis)
    out *= 1 - weight
    upper = np.take(images, high, axis=axis)
    upper *= weight
    out += upper
    return out


def resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (..., H, W) to `size` (H, W); the axis whose pass leaves less in between goes first,
    so a 1 x 1,000,000 strip costs what its pixels cost at any aspect ratio."""
    out_h, out_w = size
    in_h, in_w = images.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return images
    images = images.astype(np.float32, copy=False)
    if out_h * in_w <= in_h * out_w:
        return _interpolate_axis(_interpolate_axis(images, -2, out_h), -1, out_w)
    return _interpolate_axis(_interpolate_axis(images, -1, out_w), -2, out_h)


def frame_work_bytes(header: ImageHeader, channels: int, size: tuple[int, int]) -> int:
    """Bytes one frame of `header` needs on its way to the model: float32 copy, finite check, conversion
    and the two resize passes (the smaller intermediate first)."""
    pixels, (out_h, out_w) = header.height * header.width, size
    between = min(out_h * header.width, header.height * out_w)
    resize = 0 if size == (header.height, header.width) else 4 * channels * (3 * between + 2 * out_h * out_w)
    return pixels * (5 * header.bands + 4 * channels) + resize


def prepare_frame(frame: np.ndarray, channels: int, size: tuple[int, int]) -> np.ndarray:
    """One (C, H, W) frame -> (channels, *size) float32."""
    return resize_bilinear(convert_channels(frame[None], channels)[0], size)


def prepare_images(
    images: np.ndarray,
    preprocessing: Preprocessing,
    input_shape: Sequence[int],
    *,
    max_frames: int,
    field: str = "file",
) -> np.ndarray:
    """Client images (N, C, H, W) -> model input for an op whose input spec has shape `input_shape`
    (sizes as `model_input_size` decides)."""
    if images.shape[0] > max_frames:
        raise InvalidInput(
            f"{images.shape[0]} frames in one request", field=field, limit=max_frames, code="too_many_frames"
        )
    images = convert_channels(images, model_channels(preprocessing, input_shape))
    size = model_input_size(tuple(images.shape[-2:]), preprocessing, input_shape, field=field)
    return np.ascontiguousarray(resize_bilinear(images, size), dtype=np.float32)
