"""Synthetic design layouts conditioned on (goal, format, tone), for the diffusion decoder.

Each item is a small rendered page — header bar, text-line blocks, an image area, a call-to-action
button — drawn procedurally and conditioned like the original ai-design meta vector
v_meta = (goal id, format id, tone):

* **format** picks the page geometry: `poster` (portrait page, image on top, one text column),
  `social_post` (full square, large image, short caption), `flyer` (portrait page, two text
  columns, small image), `banner` (wide strip, image left, text right).
* **goal** picks the palette hue (10 hues) and the header/text alignment (left, centre, right).
* **tone** in [0, 1] sets saturation and contrast (0 = muted and soft, 1 = vivid and punchy).

Within those, every sample varies margins, line counts and lengths, image size and colour jitter.
Items are deterministic in (seed, index) and independent of access order. Pages are drawn at 4×
and box-averaged down, so edges are anti-aliased at any size (32×32 and 64×64 are the intended ones).
Items: {"image": (3, H, W) float32 in [−1, 1], "condition": (3,) float32 = [goal id, format id, tone]}.

Held-out test layouts (`DesignLayouts.heldout`, read only by the quality report) use the reserved seed
`HELDOUT_SEED`, which a training or validation set cannot be built with.
"""

from __future__ import annotations

import colorsys
import math
import numbers
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

GOALS = ("promote_event", "announce_product", "share_info", "inspire", "educate", "advertise",
         "celebrate", "inform", "motivate", "brand_awareness")
FORMATS = ("poster", "social_post", "flyer", "banner")
TONES = {"calm": 0.3, "neutral": 0.5, "upbeat": 0.7, "energetic": 0.9}   # named tone levels
CONDITION_KEYS = ("goal", "format", "tone")
TONE_RANGE = (0.3, 0.9)          # tones drawn for the data set (the original's range)
SUPERSAMPLE = 4
MIN_SIZE = 16
HELDOUT_SEED = 2**31 - 1         # reserved for the quality report's test layouts


def condition_vocabulary() -> dict[str, list[str] | dict[str, float]]:
    """Named values of each condition slot, for the manifest: goal/format names map to their ids, tone
    names to their level."""
    return {"goal": list(GOALS), "format": list(FORMATS), "tone": dict(TONES)}


def encode_condition(meta: Mapping[str, object]) -> torch.Tensor:
    """{"goal": name, "format": name, "tone": name or number in [0, 1]} -> float32 (3,) vector."""
    unknown = sorted(set(meta) - set(CONDITION_KEYS))
    if unknown:
        raise ValueError(f"unknown condition key(s) {unknown}; allowed keys: {list(CONDITION_KEYS)}")
    missing = [k for k in CONDITION_KEYS if k not in meta]
    if missing:
        raise ValueError(f"missing condition key(s) {missing}; required keys: {list(CONDITION_KEYS)}")
    goal, fmt, tone = meta["goal"], meta["format"], meta["tone"]
    if goal not in GOALS:
        raise ValueError(f"condition 'goal' = {goal!r} is not allowed; allowed values: {list(GOALS)}")
    if fmt not in FORMATS:
        raise ValueError(f"condition 'format' = {fmt!r} is not allowed; allowed values: {list(FORMATS)}")
    return torch.tensor([GOALS.index(goal), FORMATS.index(fmt), _tone_value(tone)], dtype=torch.float32)


def _tone_value(tone: object) -> float:
    if isinstance(tone, str) and tone in TONES:
        return TONES[tone]
    if isinstance(tone, numbers.Real) and not isinstance(tone, bool):
        value = float(tone)
        if 0.0 <= value <= 1.0:
            return value
    raise ValueError(f"condition 'tone' = {tone!r} is not allowed; allowed values: {list(TONES)} "
                     f"or a number in [0, 1]")


def decode_condition(vector: torch.Tensor) -> dict[str, object]:
    """The inverse of `encode_condition` (tone as a float)."""
    goal, fmt, tone = (float(v) for v in vector.reshape(-1)[:3])
    return {"goal": GOALS[int(goal)], "format": FORMATS[int(fmt)], "tone": tone}


class DesignLayouts(Dataset):
    """`length` procedurally drawn layouts of `size`×`size`, deterministic in (seed, index)."""

    def __init__(self, size: int = 32, length: int = 2048, seed: int = 0, *, heldout: bool = False) -> None:
        if (seed == HELDOUT_SEED) != heldout:
            raise ValueError(f"seed {HELDOUT_SEED} is reserved for the held-out test layouts "
                             "(DesignLayouts.heldout); training and validation use any other seed")
        if not isinstance(size, int) or size < MIN_SIZE:
            raise ValueError(f"size must be an integer >= {MIN_SIZE}; got {size!r}")
        if length < 1:
            raise ValueError(f"length must be >= 1; got {length}")
        self.size = size
        self.length = length
        self.seed = seed

    @classmethod
    def heldout(cls, size: int = 32, length: int = 256) -> DesignLayouts:
        """The quality report's test layouts (seed `HELDOUT_SEED`, which no other set may use)."""
        return cls(size=size, length=length, seed=HELDOUT_SEED, heldout=True)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} layouts")
        index %= self.length
        rng = np.random.default_rng((self.seed, index))
        goal = int(rng.integers(len(GOALS)))
        fmt = int(rng.integers(len(FORMATS)))
        tone = float(rng.uniform(*TONE_RANGE))
        image = render_layout(goal, fmt, tone, self.size, rng)
        return {"image": torch.from_numpy(image),
                "condition": torch.tensor([goal, fmt, tone], dtype=torch.float32)}


# ------------------------------------------------------------------------------------- rendering


def _rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(hue % 1.0, min(max(saturation, 0.0), 1.0),
                                        min(max(value, 0.0), 1.0)), dtype=np.float32)


class _Canvas:
    """An RGB float canvas in [0, 1] addressed in page units (0 … 1 on both axes)."""

    def __init__(self, pixels: int, background: np.ndarray) -> None:
        self.pixels = pixels
        self.array = np.empty((pixels, pixels, 3), dtype=np.float32)
        self.array[:] = background

    def rect(self, x0: float, y0: float, x1: float, y1: float, color: np.ndarray) -> None:
        p = self.pixels
        c0, c1 = round(min(max(x0, 0.0), 1.0) * p), round(min(max(x1, 0.0), 1.0) * p)
        r0, r1 = round(min(max(y0, 0.0), 1.0) * p), round(min(max(y1, 0.0), 1.0) * p)
        if c1 > c0 and r1 > r0:
            self.array[r0:r1, c0:c1] = color

    def disc(self, cx: float, cy: float, radius: float, color: np.ndarray,
             clip: tuple[float, float, float, float]) -> None:
        p = self.pixels
        coords = (np.arange(p, dtype=np.float32) + 0.5) / p
        inside = ((coords[None, :] - cx) ** 2 + (coords[:, None] - cy) ** 2) <= radius**2
        x0, y0, x1, y1 = clip
        inside &= (coords[None, :] >= x0) & (coords[None, :] < x1)
        inside &= (coords[:, None] >= y0) & (coords[:, None] < y1)
        self.array[inside] = color

    def downsampled(self, factor: int) -> np.ndarray:
        size = self.pixels // factor
        return self.array.reshape(size, factor, size, factor, 3).mean(axis=(1, 3))


def _text_block(canvas: _Canvas, x0: float, y0: float, x1: float, y1: float, line_height: float,
                align: int, color: np.ndarray, rng: np.random.Generator) -> None:
    """Lines of 'text' (thin bars, ragged on the non-aligned side) filling the box."""
    gap = line_height * 0.8
    y = y0
    width = x1 - x0
    while y + line_height <= y1 + 1e-6:
        length = width * float(rng.uniform(0.55, 1.0))
        if align == 0:
            left = x0
        elif align == 1:
            left = x0 + (width - length) / 2
        else:
            left = x1 - length
        canvas.rect(left, y, left + length, y + line_height, color)
        y += line_height + gap


class _Palette(NamedTuple):
    """The colours of one page (RGB float32 in [0, 1])."""

    paper: np.ndarray
    ink: np.ndarray
    accent: np.ndarray
    second: np.ndarray
    surround: np.ndarray
    sky: np.ndarray
    ground: np.ndarray
    sun: np.ndarray


def _palette(goal: int, tone: float, rng: np.random.Generator) -> _Palette:
    """Goal -> hue (jittered), tone -> saturation and contrast."""
    hue = goal / len(GOALS) + float(rng.uniform(-0.02, 0.02))
    saturation = 0.15 + 0.8 * tone
    contrast = 0.45 + 0.5 * tone
    return _Palette(
        paper=_rgb(hue, 0.06 + 0.1 * tone, 0.97 - 0.05 * (1 - tone)),
        ink=_rgb(hue, saturation * 0.5, 0.55 - 0.45 * contrast),
        accent=_rgb(hue, saturation, 0.55 + 0.4 * tone),
        second=_rgb(hue + 0.5, saturation * 0.8, 0.5 + 0.4 * tone),
        surround=_rgb(hue, 0.2 * saturation, 0.25 + 0.1 * (1 - tone)),
        sky=_rgb(hue + 0.08, saturation * 0.45, 0.85),
        ground=_rgb(hue - 0.1, saturation * 0.7, 0.35 + 0.3 * tone),
        sun=_rgb(0.12, 0.4 + 0.5 * tone, 0.98),
    )


def _image_area(canvas: _Canvas, x0: float, y0: float, x1: float, y1: float, colors: _Palette,
                rng: np.random.Generator) -> None:
    """A picture placeholder: sky, a sun disc and a ground band."""
    canvas.rect(x0, y0, x1, y1, colors.sky)
    w, h = x1 - x0, y1 - y0
    canvas.disc(x0 + w * float(rng.uniform(0.25, 0.75)), y0 + h * float(rng.uniform(0.25, 0.45)),
                min(w, h) * float(rng.uniform(0.12, 0.22)), colors.sun, (x0, y0, x1, y1))
    canvas.rect(x0, y0 + h * float(rng.uniform(0.6, 0.75)), x1, y1, colors.ground)


def _jitter(rng: np.random.Generator, spread: float) -> float:
    return float(rng.uniform(-spread, spread))


def _poster(canvas: _Canvas, colors: _Palette, line: float, align: int, rng: np.random.Generator) -> None:
    """Portrait page: image on top, header bar, one text column, a button."""
    px0, px1 = 0.16 + _jitter(rng, 0.03), 0.84 + _jitter(rng, 0.03)
    py0, py1 = 0.03, 0.97
    canvas.rect(px0, py0, px1, py1, colors.paper)
    m = 0.05 + _jitter(rng, 0.01)
    image_bottom = py0 + 0.42 + _jitter(rng, 0.06)
    _image_area(canvas, px0 + m, py0 + m, px1 - m, image_bottom, colors, rng)
    header_top = image_bottom + 0.05
    canvas.rect(px0 + m, header_top, px1 - m, header_top + 0.09, colors.accent)
    _text_block(canvas, px0 + m, header_top + 0.14, px1 - m, py1 - 0.15, line, align, colors.ink, rng)
    canvas.rect(px0 + m, py1 - 0.11, px0 + m + 0.3, py1 - 0.05, colors.second)


def _social_post(canvas: _Canvas, colors: _Palette, line: float, align: int, rng: np.random.Generator) -> None:
    """Full square: header bar, large image, short caption."""
    canvas.rect(0.0, 0.0, 1.0, 1.0, colors.paper)
    canvas.rect(0.0, 0.0, 1.0, 0.1 + _jitter(rng, 0.02), colors.accent)
    image_bottom = 0.72 + _jitter(rng, 0.06)
    _image_area(canvas, 0.08, 0.16, 0.92, image_bottom, colors, rng)
    _text_block(canvas, 0.08, image_bottom + 0.06, 0.92, 0.97, line, align, colors.ink, rng)


def _flyer(canvas: _Canvas, colors: _Palette, line: float, align: int, rng: np.random.Generator) -> None:
    """Portrait page: header bar, two text columns, a small image in the right one."""
    px0, px1 = 0.12 + _jitter(rng, 0.03), 0.88 + _jitter(rng, 0.03)
    canvas.rect(px0, 0.03, px1, 0.97, colors.paper)
    m = 0.05
    header_bottom = 0.2 + _jitter(rng, 0.03)
    canvas.rect(px0 + m, 0.07, px1 - m, header_bottom, colors.accent)
    mid = (px0 + px1) / 2
    columns_top = header_bottom + 0.06
    _text_block(canvas, px0 + m, columns_top, mid - 0.02, 0.92, line, align, colors.ink, rng)
    image_bottom = columns_top + 0.3 + _jitter(rng, 0.05)
    _image_area(canvas, mid + 0.02, columns_top, px1 - m, image_bottom, colors, rng)
    _text_block(canvas, mid + 0.02, image_bottom + 0.05, px1 - m, 0.92, line, align, colors.ink, rng)


def _banner(canvas: _Canvas, colors: _Palette, line: float, align: int, rng: np.random.Generator) -> None:
    """Wide strip: image left, header bar and text right."""
    top, bottom = 0.28 + _jitter(rng, 0.04), 0.72 + _jitter(rng, 0.04)
    canvas.rect(0.02, top, 0.98, bottom, colors.paper)
    m = 0.04
    image_right = 0.4 + _jitter(rng, 0.05)
    _image_area(canvas, 0.02 + m, top + m, image_right, bottom - m, colors, rng)
    canvas.rect(image_right + 0.05, top + m, 0.94, top + m + 0.1, colors.accent)
    _text_block(canvas, image_right + 0.05, top + m + 0.15, 0.94, bottom - m, line, align, colors.ink, rng)


_PAGES = {"poster": _poster, "social_post": _social_post, "flyer": _flyer, "banner": _banner}


def render_layout(goal: int, fmt: int, tone: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Render one layout; returns (3, size, size) float32 in [−1, 1]."""
    if not 0 <= goal < len(GOALS):
        raise ValueError(f"goal id must be within [0, {len(GOALS) - 1}]; got {goal}")
    if not 0 <= fmt < len(FORMATS):
        raise ValueError(f"format id must be within [0, {len(FORMATS) - 1}]; got {fmt}")
    colors = _palette(goal, tone, rng)
    canvas = _Canvas(size * SUPERSAMPLE, colors.surround)
    line = max(0.045, 1.6 / size)    # at least ~1.6 output pixels per text line
    _PAGES[FORMATS[fmt]](canvas, colors, line, goal % 3, rng)
    image = canvas.downsampled(SUPERSAMPLE)
    image = image + rng.normal(0.0, 0.01, size=image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0) * 2.0 - 1.0
    return np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float32)


def condition_grid(n_per_format: int = 2, tone: float = 0.7) -> torch.Tensor:
    """A (4·n, 3) batch of conditions cycling formats and spreading goals, for sample grids."""
    rows = []
    for fmt in range(len(FORMATS)):
        for j in range(n_per_format):
            goal = (fmt * 3 + j * math.ceil(len(GOALS) / max(n_per_format, 1))) % len(GOALS)
            rows.append([goal, fmt, tone])
    return torch.tensor(rows, dtype=torch.float32)
