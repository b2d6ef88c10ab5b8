"""Client images -> model input, as the manifest's `Preprocessing` says: channels, size, resizing.

Sizes are decided from the declared size alone (`model_input_size`, `frame_work_bytes`), before
anything is decoded; `prepare_frame` then converts one decoded frame at a time.
Models whose preprocessing has an `intensity` scaling (4D-STEM) take raw detector frames instead
(`raw_detector`, `RawDetector`): intensities or counts of any size and angular sampling, rebinned onto the
model's pattern grid and log-scaled as its training data were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from app.errors import InvalidInput
from app.image_headers import ImageHeader
from app.schemas.manifest import IntensityScaling, PatternGeometry, Preprocessing

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


def prepare_frame(
    frame: np.ndarray, channels: int, size: tuple[int, int], raw: RawDetector | None = None, field: str = "file"
) -> np.ndarray:
    """One (C, H, W) frame -> (channels, *size) float32 (a raw detector frame as `raw` says)."""
    if raw is not None:
        return raw.prepare(frame, field)
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


# ------------------------------------------------------------------------------------ raw detector frames
def rebin_matrix(out_len: int, out_step: float, in_len: int, in_step: float) -> np.ndarray:
    """(out_len, in_len) share of each input pixel inside each output pixel's footprint along one axis, both
    grids with the zero angle at pixel len // 2: flux-conserving rebinning (an equal step is a plain crop)."""
    out_centres = (np.arange(out_len) - out_len // 2) * out_step
    in_centres = (np.arange(in_len) - in_len // 2) * in_step
    low = np.maximum.outer(out_centres - out_step / 2, in_centres - in_step / 2)
    high = np.minimum.outer(out_centres + out_step / 2, in_centres + in_step / 2)
    return np.round(np.clip(high - low, 0.0, None) / in_step, 12)


def log_scale(intensity: np.ndarray, scaling: IntensityScaling) -> np.ndarray:
    """Intensities (fraction of the incident probe) -> model input in [0, 1], as `IntensityScaling` says."""
    eps = scaling.i_max / scaling.dynamic_range
    floored = np.maximum(intensity, np.float32(scaling.floor))
    return np.minimum(np.log1p(floored / np.float32(eps)) / np.float32(math.log1p(scaling.i_max / eps)), 1.0)


def _positive_numbers(text: str, count: tuple[int, ...], field: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) not in count or not all(math.isfinite(v) and v > 0 for v in values):
        limit = "a positive number" + (" or two, ky,kx" if 2 in count else "")
        raise InvalidInput(f"{field}={text!r}", field=field, limit=limit)
    return values


@dataclass(frozen=True)
class RawDetector:
    """One request's raw 4D-STEM frames (floats: intensities as a fraction of the incident probe; integers:
    counts) and how they become the model's input: its `Preprocessing.intensity` and `.pattern`."""

    intensity: IntensityScaling
    pattern: PatternGeometry
    sampling_mrad: tuple[float, float] | None = None  # the detector's (ky, kx) per pixel; None: the model's
    counts_per_probe: float | None = None  # counts of the whole incident probe; None: 1 (floats), frame sum (ints)

    def frame_sampling(self, have: tuple[int, int], field: str = "file") -> tuple[float, float]:
        """The detector's (ky, kx) mrad per pixel for frames of `have` (H, W), or 422: given unless the frame is
        the model's size, not coarser than `max_sampling_ratio` model pixels, its field covering the model's."""
        model = self.pattern.angular_sampling_mrad
        if self.sampling_mrad is None and have != self.pattern.size:
            raise InvalidInput(
                f"frames are {have[0]}x{have[1]}, not the model's {self.pattern.size[0]}x{self.pattern.size[1]}: "
                "give their angular sampling",
                field="angular_sampling_mrad",
                limit=f"mrad per pixel (the model's: {model[0]:.6g},{model[1]:.6g})",
                code="angular_sampling_required",
            )
        sampling = self.sampling_mrad or model
        axes = zip(("ky", "kx"), have, sampling, self.pattern.size, model, strict=True)
        for axis, size, step, want, step_want in axes:
            covers = [(-(size // 2) - 0.5) * step, (size - size // 2 - 0.5) * step]
            needs = [(-(want // 2) - 0.5) * step_want, (want - want // 2 - 0.5) * step_want]
            tolerance = 1e-6 * step_want
            if (
                step > self.pattern.max_sampling_ratio * step_want
                or covers[0] > needs[0] + tolerance
                or covers[1] < needs[1] - tolerance
            ):
                raise InvalidInput(
                    f"{axis}: {size} pixels of {step:.6g} mrad cover {covers[0]:.4g}..{covers[1]:.4g} mrad",
                    field="angular_sampling_mrad",
                    code="angular_sampling_out_of_range",
                    limit=f"<= {self.pattern.max_sampling_ratio * step_want:.6g} mrad per pixel and a field "
                    f"covering {needs[0]:.4g}..{needs[1]:.4g} mrad around pixel {size // 2}",
                )
        return sampling

    def model_size(self, have: tuple[int, int], bands: int, field: str = "file") -> tuple[int, int]:
        """The model's pattern size for one-channel frames of `have` (H, W) (422 as `frame_sampling`)."""
        if bands != 1:
            raise InvalidInput(f"image has {bands} channels", field=field, limit="1 channel (a detector frame)")
        self.frame_sampling(have, field)
        return self.pattern.size

    def prepare(self, frame: np.ndarray, field: str = "file") -> np.ndarray:
        """One (1, H, W) frame as stored (integer counts or float intensities) -> (1, h, w) float32 model input:
        divided by the counts of the probe, rebinned onto the model's pixels, log-scaled."""
        values = frame[0]
        scale = self.counts_per_probe
        if scale is None:
            scale = float(values.sum(dtype=np.float64)) if values.dtype.kind in "iub" else 1.0
        if not scale > 0:
            raise InvalidInput("a frame of integer counts sums to 0", field=field, limit="counts_per_probe > 0")
        (step_y, step_x), (size_y, size_x) = self.frame_sampling(values.shape, field), values.shape
        (want_y, want_x), (model_y, model_x) = self.pattern.size, self.pattern.angular_sampling_mrad
        rows = rebin_matrix(want_y, model_y, size_y, step_y).astype(np.float32)
        cols = rebin_matrix(want_x, model_x, size_x, step_x).astype(np.float32)
        intensity = values.astype(np.float32) / np.float32(scale)
        return log_scale(rows @ intensity @ cols.T, self.intensity)[None].astype(np.float32, copy=False)


def raw_detector(preprocessing: Preprocessing, query: Mapping[str, str]) -> RawDetector | None:
    """The raw-frame settings of a request (query `angular_sampling_mrad=s` or `=ky,kx`, `counts_per_probe=n`),
    or None: the model takes [0, 1] images (no `intensity` in its preprocessing, or `intensity=scaled`)."""
    if preprocessing.intensity is None or preprocessing.pattern is None:
        return None
    mode = query.get("intensity", "raw")
    if mode not in ("raw", "scaled"):
        raise InvalidInput(f"intensity={mode!r}", field="intensity", limit=["raw", "scaled"])
    if mode == "scaled":
        return None
    sampling = query.get("angular_sampling_mrad")
    counts = query.get("counts_per_probe")
    values = None if sampling is None else _positive_numbers(sampling, (1, 2), "angular_sampling_mrad")
    return RawDetector(
        preprocessing.intensity,
        preprocessing.pattern,
        None if values is None else (values[0], values[-1]),
        None if counts is None else _positive_numbers(counts, (1,), "counts_per_probe")[0],
    )
