"""Rendering of the sliding-drop videos of `training.data.droplets`: a backlit (shadowgraph) side view.

What a high-speed contact-angle rig records, per frame, in world millimetres mapped to pixels:

* backlight: a diffuse bright panel with vignetting and a gentle gradient;
* drop: a dark silhouette (its outline two cubic Béziers from the receding to the advancing contact
  point, leaving the plate at the dynamic contact angles and meeting at the apex), with the bright spot of
  the backlight refracted through the drop and a small specular glint of the light source;
* plate: a darker face below the contact line with a fixed surface texture (streaks and dust) and the
  drop's mirror image in its polished top, fading with depth;
* the camera: horizontal motion blur over the exposure, per-frame jitter (an AR(1) shake) and lamp
  flicker, then the whole stack gets Gaussian optical blur, shot + read noise and 8-bit quantisation.

The "strip" view is a fixed camera; the "crop" view is the tracked drop's box (a fixed size per video,
with tracking error) resized to the frame, so the plate texture streams past the drop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from training.data.droplets import Motion

STRIP_PX_PER_MM = 40.0  # at 152x1280
STRIP_PLATE_ROWS = 30  # plate face rows below the contact line (at 152 rows)
BEZIER_POINTS = 24
SUBROWS = 4  # vertical supersampling of the silhouette (horizontal coverage is exact)


@dataclass(frozen=True)
class Look:
    """The random appearance of one video (lighting, plate, optics, sensor)."""

    backlight: float
    vignette: float
    gradient: float
    plate: float
    reflectance: float
    drop_dark: float
    spot: float
    glint: float
    blur_px: float
    exposure_s: float
    read_noise: float
    shot_gain: float
    flicker: float
    texture_freqs: np.ndarray  # cycles/mm of the plate streaks
    texture_amps: np.ndarray
    texture_phases: np.ndarray
    dust_x: np.ndarray  # mm, along the plate
    dust_y: np.ndarray  # mm, below the plate's top edge (negative)
    dust_size: np.ndarray  # mm
    dust_depth: np.ndarray  # darkening


def sample_look(rng: np.random.Generator) -> Look:
    """Appearance of one video."""
    return Look(
        backlight=rng.uniform(0.72, 0.92),
        vignette=rng.uniform(0.05, 0.3),
        gradient=rng.uniform(-0.08, 0.08),
        plate=rng.uniform(0.18, 0.38),
        reflectance=rng.uniform(0.2, 0.55),
        drop_dark=rng.uniform(0.06, 0.18),
        spot=rng.uniform(0.5, 1.1),
        glint=rng.uniform(0.2, 0.6),
        blur_px=rng.uniform(0.5, 1.3),
        exposure_s=rng.uniform(50e-6, 200e-6),
        read_noise=rng.uniform(0.004, 0.015),
        shot_gain=rng.uniform(1e-4, 6e-4),
        flicker=rng.uniform(0.0, 0.02),
        texture_freqs=rng.uniform(0.3, 4.0, 6),
        texture_amps=rng.uniform(0.01, 0.06, 6),
        texture_phases=rng.uniform(0, 2 * math.pi, 6),
        dust_x=rng.uniform(-40.0, 80.0, 160),
        dust_y=rng.uniform(-0.7, -0.05, 160),
        dust_size=rng.uniform(0.03, 0.15, 160),
        dust_depth=rng.uniform(0.1, 0.5, 160),
    )


def jitter(rng: np.random.Generator, frames: int, scale: float = 0.3) -> np.ndarray:
    """(frames, 2) camera shake in pixels (x, y): an AR(1) walk."""
    out = np.zeros((frames, 2))
    state = rng.normal(0, scale, 2)
    for k in range(frames):
        state = 0.8 * state + rng.normal(0, scale * 0.6, 2)
        out[k] = state
    return out


def outline(length: float, height: float, theta_adv: float, theta_rec: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed silhouette (x, y) in mm from the receding contact point (0, 0) to the advancing one (length, 0)."""
    apex_x = length * (0.5 + 0.25 * (theta_adv - theta_rec) / math.pi)
    handle = 0.55 * height
    rear = [(0.0, 0.0), (handle * math.cos(theta_rec), handle * math.sin(theta_rec)),
            (apex_x * 0.45, height), (apex_x, height)]
    front = [(apex_x, height), (apex_x + 0.45 * (length - apex_x), height),
             (length - handle * math.cos(theta_adv), handle * math.sin(theta_adv)), (length, 0.0)]
    t = np.linspace(0.0, 1.0, BEZIER_POINTS)[:, None]
    basis = np.hstack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2, t**3])
    points = np.vstack([basis @ np.array(rear), (basis @ np.array(front))[1:]])
    return points[:, 0], points[:, 1]


def coverage(cols: np.ndarray, rows: np.ndarray, height: int, c0: int, c1: int) -> np.ndarray:
    """Anti-aliased area coverage (height, c1 - c0) of a closed polygon given in pixel coordinates, over
    the columns [c0, c1) (even-odd rule; exact horizontally, SUBROWS samples per row)."""
    out = np.zeros((height, c1 - c0), dtype=np.float32)
    r0, r1 = max(int(np.floor(rows.min())), 0), min(int(np.ceil(rows.max())), height)
    if r1 <= r0 or c1 <= c0:
        return out
    y = (np.arange(r0 * SUBROWS, r1 * SUBROWS) + 0.5)[:, None] / SUBROWS
    xa, ya, xb, yb = cols, rows, np.roll(cols, -1), np.roll(rows, -1)
    crosses = (ya <= y) != (yb <= y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.sort(np.where(crosses, xa + (y - ya) / (yb - ya) * (xb - xa), np.inf), axis=1)
    left = np.arange(c0, c1, dtype=np.float64)
    sub = np.zeros((len(y), c1 - c0))
    for k in range(int(crosses.sum(axis=1).max()) // 2):
        start, end = x[:, 2 * k : 2 * k + 1], x[:, 2 * k + 1 : 2 * k + 2]
        sub += np.clip(np.minimum(end, left + 1) - np.maximum(start, left), 0.0, 1.0)
    out[r0:r1] = sub.reshape(r1 - r0, SUBROWS, c1 - c0).mean(axis=1)
    return out


def blur_rows(image: np.ndarray, length: float) -> np.ndarray:
    """Average each pixel over a horizontal window `length` pixels wide (motion blur of the exposure)."""
    rows = np.flatnonzero(image.any(axis=1))
    if length < 0.05 or not len(rows):
        return image
    if rows[0] > 0 or rows[-1] < image.shape[0] - 1:  # blur only the rows the drop touches
        out = image.copy()
        out[rows[0] : rows[-1] + 1] = blur_rows(image[rows[0] : rows[-1] + 1], length)
        return out
    pad = math.ceil(length / 2) + 1
    padded = np.pad(image, ((0, 0), (pad, pad)))
    integral = np.concatenate([np.zeros((image.shape[0], 1)), np.cumsum(padded, axis=1)], axis=1)
    centers = np.arange(image.shape[1]) + pad + 0.5

    def at(x: np.ndarray) -> np.ndarray:
        k = np.floor(x).astype(int)
        return integral[:, k] + (x - k) * (integral[:, k + 1] - integral[:, k])

    return ((at(centers + length / 2) - at(centers - length / 2)) / length).astype(np.float32)


def gaussian_blur(stack: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes (reflected edges)."""
    radius = max(math.ceil(3 * sigma), 1)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    height, width = stack.shape[-2:]
    padded = np.pad(stack, ((0, 0), (radius, radius), (0, 0)), mode="reflect")
    stack = sum(w * padded[:, i : i + height] for i, w in enumerate(taps))
    padded = np.pad(stack, ((0, 0), (0, 0), (radius, radius)), mode="reflect")
    return sum(w * padded[:, :, i : i + width] for i, w in enumerate(taps))


def shift(image: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """The image moved by (dx, dy) pixels (bilinear, edges replicated): the camera shake."""
    height, width = image.shape
    src = np.arange(height) - dy
    r0 = np.floor(src).astype(int)
    fy = (src - r0).astype(np.float32)[:, None]
    image = (1 - fy) * image[np.clip(r0, 0, height - 1)] + fy * image[np.clip(r0 + 1, 0, height - 1)]
    src = np.arange(width) - dx
    c0 = np.floor(src).astype(int)
    fx = (src - c0).astype(np.float32)
    return (1 - fx) * image[:, np.clip(c0, 0, width - 1)] + fx * image[:, np.clip(c0 + 1, 0, width - 1)]


def sensor(stack: np.ndarray, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Optical blur, shot + read noise, clipping and 8-bit quantisation of a (T, H, W) stack."""
    stack = gaussian_blur(stack.astype(np.float32), look.blur_px)
    sigma = np.sqrt(look.shot_gain * np.clip(stack, 0, None) + look.read_noise**2)
    stack = stack + sigma * rng.standard_normal(stack.shape, dtype=np.float32)
    return (np.round(np.clip(stack, 0.0, 1.0) * 255.0) / 255.0).astype(np.float32)


@dataclass(frozen=True)
class Camera:
    """One frame's pixel grid in world mm: column j spans x0 + [j, j+1)/sx, row i spans y_top - [i, i+1)/sy
    (y up; the plate's top is y = 0)."""

    x0: float
    y_top: float
    sx: float
    sy: float
    shape: tuple[int, int]

    def cols(self, x: np.ndarray | float) -> np.ndarray:
        return (np.asarray(x) - self.x0) * self.sx

    def rows(self, y: np.ndarray | float) -> np.ndarray:
        return (self.y_top - np.asarray(y)) * self.sy

    def grid(self) -> tuple[np.ndarray, np.ndarray]:
        """World x of every column centre, world y of every row centre."""
        height, width = self.shape
        return self.x0 + (np.arange(width) + 0.5) / self.sx, self.y_top - (np.arange(height) + 0.5) / self.sy


def _bump(values: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((values - center) / width) ** 2)


def _plate(look: Look, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """The plate face at rows `ys` (< 0): streaked texture and dust."""
    phase = 2 * math.pi * look.texture_freqs[:, None] * xs[None, :] + look.texture_phases[:, None]
    streaks = 1 + (look.texture_amps[:, None] * np.sin(phase)).sum(axis=0)
    edge = 1 - 0.35 * np.exp(ys / 0.06)  # the darker rim right under the contact line
    face = look.plate * np.outer(edge, streaks)
    seen = (look.dust_x > xs.min() - 1) & (look.dust_x < xs.max() + 1)
    if seen.any():
        size = look.dust_size[seen, None]
        across = _bump(xs[None, :], look.dust_x[seen, None], size)
        down = _bump(ys[None, :], look.dust_y[seen, None], size) * look.dust_depth[seen, None]
        face = face * np.clip(1 - down.T @ across, 0.2, 1)
    return face


@dataclass(frozen=True)
class Backdrop:
    """What one camera sees without the drop: the backlight above the plate; below it the plate face and,
    separately, the backlight mirrored in the plate's polished top (faded with depth)."""

    xs: np.ndarray
    ys: np.ndarray
    light: np.ndarray  # (H, W)
    below: np.ndarray  # (H,) rows of the plate face
    plate: np.ndarray  # (rows below, W)
    mirrored: np.ndarray  # (rows below, W)

    def image(self) -> np.ndarray:
        frame = self.light.copy()
        frame[self.below] = self.plate + self.mirrored
        return frame


def backdrop(look: Look, camera: Camera) -> Backdrop:
    xs, ys = camera.grid()
    fx = 1 - look.vignette * ((xs - 16) / 16) ** 2 + look.gradient * (xs - 16) / 16
    light = look.backlight * np.outer(1 - look.vignette * ((ys - 1.5) / 2.5) ** 2, fx)
    below = ys < 0
    yb = ys[below]
    mirrored = look.backlight * np.outer(1 - look.vignette * ((-yb - 1.5) / 2.5) ** 2, fx)
    mirrored *= look.reflectance * np.exp(yb / 0.6)[:, None]
    return Backdrop(xs, ys, light, below, _plate(look, xs, yb), mirrored)


def draw_drop(look: Look, camera: Camera, scene: Backdrop, motion: Motion, k: int, center: float) -> np.ndarray:
    """Frame k before the sensor: the drop (silhouette, refracted glow, glint, reflection, motion blur)
    over the backdrop, (H, W) float32."""
    frame = scene.image()
    length, height = float(motion.length_mm[k]), float(motion.height_mm[k])
    px, py = outline(length, height, float(motion.theta_adv[k]), float(motion.theta_rec[k]))
    cols = camera.cols(px + center - length / 2)
    streak = float(motion.speed[k]) * look.exposure_s * 1e3 * camera.sx
    pad = math.ceil(streak / 2) + 2
    c0, c1 = max(int(np.floor(cols.min())) - pad, 0), min(int(np.ceil(cols.max())) + pad, camera.shape[1])
    if c1 <= c0:
        return frame
    xs, ys, span = scene.xs[c0:c1], scene.ys, slice(c0, c1)
    mask = blur_rows(coverage(cols, camera.rows(py), len(ys), c0, c1), streak)
    glow = np.outer(_bump(ys, 0.42 * height, 0.2 * height), _bump(xs, center + 0.05 * length, 0.16 * length))
    glint = np.outer(_bump(ys, 0.8 * height, 0.05 * height), _bump(xs, center + 0.2 * length, 0.035 * length))
    light = scene.light[:, span]
    drop = light * (look.drop_dark + look.spot * glow) + look.glint * glint
    frame[:, span] = light * (1 - mask) + drop * mask
    if scene.below.any():
        mirror = blur_rows(coverage(cols, camera.rows(-py), len(ys), c0, c1), streak)[scene.below]
        seen = scene.mirrored[:, span] * (1 - mirror * (1 - look.drop_dark))
        frame[scene.below, span] = scene.plate[:, span] + seen
    return frame.astype(np.float32)


def strip_camera(size: tuple[int, int]) -> Camera:
    """The fixed side camera: 40 px/mm at 152x1280, the plate's top 30 rows above the bottom (scaled)."""
    height, width = size
    scale = STRIP_PX_PER_MM * width / 1280
    return Camera(0.0, (height - STRIP_PLATE_ROWS * height / 152) / scale, scale, scale, (height, width))


def crop_camera(size: tuple[int, int], motion: Motion, center_mm: float, shake: np.ndarray) -> Camera:
    """The tracked drop's box (1.3 x the longest footprint wide, -0.15..1.2 x the highest drop tall),
    resized to `size`; the tracker errs by the shake (in strip pixels)."""
    width_mm = 1.3 * float(motion.length_mm.max())
    top, bottom = 1.2 * float(motion.height_mm.max()), -0.15 * float(motion.height_mm.max())
    x0 = center_mm + shake[0] / STRIP_PX_PER_MM - width_mm / 2
    sy = size[0] / (top - bottom)
    return Camera(x0, top + shake[1] / sy, size[1] / width_mm, sy, size)


def render_video(
    view: str, size: tuple[int, int], motion: Motion, look: Look, rng: np.random.Generator,
    start_mm: float, indices: list[int],
) -> np.ndarray:
    """Frames `indices` of the video as float32 (len(indices), H, W) in [0, 1]. The strip camera is fixed
    (its backdrop drawn once; the shake moves the whole picture), the crop camera follows the drop."""
    shake = jitter(rng, len(motion.times))
    flicker = 1 + look.flicker * np.sin(2 * math.pi * 100 * motion.times + rng.uniform(0, 2 * math.pi))
    fixed = strip_camera(size) if view == "strip" else None
    scene = backdrop(look, fixed) if fixed is not None else None
    frames = []
    for k in indices:
        center = start_mm + float(motion.center_mm[k])
        if fixed is not None:
            frame = shift(draw_drop(look, fixed, scene, motion, k, center), *shake[k])
        else:
            camera = crop_camera(size, motion, center, shake[k])
            frame = draw_drop(look, camera, backdrop(look, camera), motion, k, center)
        frames.append(frame * flicker[k])
    return sensor(np.stack(frames), look, rng)
