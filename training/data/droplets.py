"""Procedural videos of a drop sliding down an inclined plate: the droplet-viscosity data of the V3 family.

The original project predicts a liquid's viscosity from high-speed side views of one drop sliding down
a tilted plate (`/work/shared/reference/autoencoder-cnn-v3.md`, "The original project's data"). This
module simulates those videos offline, deterministically from a seed. SI units inside; the view is
rotated so that the plate is horizontal and the drop runs towards +x.

Physics of one drop (volume V, tilt α, static advancing/receding angles θ_a0 > θ_r0, viscosity η):

* Liquid: a water–glycerol mixture. Its glycerol fraction φ follows the log-linear (Arrhenius) mixing
  rule ln η = (1 − φ) ln η_water + φ ln η_glycerol; density ρ = 998 + 263 φ kg/m³ and surface tension
  γ = 72.8 − 9.4 φ mN/m are taken linear in φ.
* Rest shape: a spherical cap of volume V at the mean angle θ_s = (θ_a0 + θ_r0)/2, flattened by gravity
  towards the puddle height 2 ℓ_c sin(θ_s/2), ℓ_c = √(γ/ρg) (de Gennes, Brochard-Wyart & Quéré,
  *Capillarity and Wetting Phenomena*, 2004, ch. 2); the footprint spreads to keep the volume.
* Steady sliding: gravity against the hysteresis (retention) force of Furmidge (J. Colloid Sci. 17, 309,
  1962) and the viscous wedge dissipation near the contact lines (de Gennes, Rev. Mod. Phys. 57, 827,
  1985), the balance of Kim, Lee & Kang (J. Colloid Interface Sci. 247, 372, 2002):
      ρ V g sin α − w γ (cos θ_r0 − cos θ_a0) = 6 η U w Λ / θ_s,      Λ = ln(ℓ_macro/ℓ_micro) ≈ 13.8,
  so U∞ = θ_s (ρ g V sin α − w γ Δcos θ) / (6 η w Λ) ∝ ρ g V^{2/3} sin α / (η f(θ)), f = 6Λ/θ_s: the
  law Ca ∝ Bo sin α − Bo_c measured by Podgorski, Flesselles & Limat (PRL 87, 036102, 2001).
* Start-up: m dU/dt = F − cU gives U(t) = U∞ (1 − e^{−t/τ}), τ = m/c = ρ V θ_s / (6 η w Λ): a water-like
  drop still accelerates in view (as in the original recordings), a viscous one is steady at once.
* Dynamic contact angles, Cox–Voinov (Voinov, Fluid Dyn. 11, 714, 1976; Cox, JFM 168, 169, 1986):
  θ_a³ = θ_a0³ + 9 Ca Λ and θ_r³ = max(θ_r0³ − 9 Ca Λ, θ_min³) with Ca = η U(t) / γ.
* Elongation: the footprint stretches along the motion with Ca (Podgorski et al. 2001; Le Grand, Daerr &
  Limat, JFM 541, 293, 2005) and with inertia, We = ρ U² L / γ. Phenomenological closure (area kept):
  L/w = 1 + 25 Ca + 0.01 We.
* Ringing: the n = 2 capillary mode, excited when the drop was released, at Rayleigh's frequency
  ω² = 8 γ / (ρ R³) with Lamb's viscous damping rate β = 5 ν / R² (Lamb, *Hydrodynamics*, §355), R the
  equal-volume sphere radius: height × (1 + a), length × (1 − a/2), a(t) = a0 e^{−βt} cos(ωt + φ).
  Thin liquids keep ringing through a sequence, viscous ones are still.

Camera: 4,000 frames/s keeping every 5th frame (Δt = 1.25 ms), like the original's 0.25 ms recordings
with frame skips. Views: "strip" (152×1280, fixed camera at 40 px/mm, plate line 30 px above the bottom)
and "crop" (201×201, the tracked drop's box resized, as the original's crops). Rendering (backlit
silhouette with the refracted light spot, specular glint, plate reflection, motion and optical blur,
flicker, shot and read noise, 8-bit quantisation, camera jitter): `training/data/droplet_render.py`.
Frames are float32 in [0, 1]. Ranges: η log-uniform in 1–100 mPa·s, tilt 25–60°, V 20–40 µL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data.droplet_render import STRIP_PX_PER_MM, render_video, sample_look

G = 9.81
ETA_WATER, ETA_GLYCEROL = 1.002e-3, 1.412  # Pa·s at 20 °C
LAMBDA = math.log(1e-3 / 1e-9)  # ln(macroscopic / molecular length) of the contact-line wedge
THETA_MIN = math.radians(25.0)
FRAME_DT = 1.25e-3  # s between kept frames
VISCOSITY_RANGE = (1e-3, 0.1)  # Pa·s
TILT_RANGE = (25.0, 60.0)  # degrees
VOLUME_RANGE = (20.0, 40.0)  # µL
VIEWS = ("crop", "strip")
View = Literal["crop", "strip"]
STRIP_SIZE = (152, 1280)
CROP_SIZE = (201, 201)


@dataclass(frozen=True)
class DropletParams:
    """Everything that defines one video's physics (the labels are `viscosity` and `tilt_deg`)."""

    viscosity: float  # Pa·s
    tilt_deg: float
    volume_ul: float
    theta_adv0_deg: float
    theta_rec0_deg: float
    release_ms: float  # time since release at the first frame
    ring_amplitude: float
    ring_phase: float


def liquid(viscosity: float) -> tuple[float, float]:
    """(density kg/m³, surface tension N/m) of the water–glycerol mixture of this viscosity."""
    phi = min(max(math.log(viscosity / ETA_WATER) / math.log(ETA_GLYCEROL / ETA_WATER), 0.0), 1.0)
    return 998.0 + 263.0 * phi, 0.0728 - 0.0094 * phi


def sample_params(rng: np.random.Generator) -> DropletParams:
    """One drop: viscosity log-uniform, tilt and volume uniform, a random surface and release."""
    lo, hi = np.log(VISCOSITY_RANGE)
    theta_rec = rng.uniform(86.0, 96.0)
    return DropletParams(
        viscosity=float(np.exp(rng.uniform(lo, hi))),
        tilt_deg=float(rng.uniform(*TILT_RANGE)),
        volume_ul=float(rng.uniform(*VOLUME_RANGE)),
        theta_adv0_deg=float(theta_rec + rng.uniform(8.0, 16.0)),
        theta_rec0_deg=float(theta_rec),
        release_ms=float(rng.uniform(5.0, 60.0)),
        ring_amplitude=float(rng.uniform(0.04, 0.12)),
        ring_phase=float(rng.uniform(0.0, 2 * math.pi)),
    )


@dataclass(frozen=True)
class Motion:
    """The drop at each time (mm, m/s, radians): what the renderer draws."""

    times: np.ndarray  # s since the first frame
    center_mm: np.ndarray  # footprint centre along the plate (relative to its position at t = 0)
    speed: np.ndarray  # m/s
    length_mm: np.ndarray  # footprint length along the motion
    height_mm: np.ndarray
    theta_adv: np.ndarray
    theta_rec: np.ndarray
    rest_length_mm: float
    rest_height_mm: float
    summary: dict[str, float] = field(default_factory=dict)


def rest_shape(volume: float, theta: float, rho: float, gamma: float) -> tuple[float, float]:
    """(footprint length, height) in m of a resting drop: a spherical cap flattened towards a puddle."""
    cap_radius = (3 * volume / (math.pi * (2 - 3 * math.cos(theta) + math.cos(theta) ** 3))) ** (1 / 3)
    cap_height = cap_radius * (1 - math.cos(theta))
    cap_base = 2 * cap_radius * min(math.sin(theta), 1.0)
    puddle = 2 * math.sqrt(gamma / (rho * G)) * math.sin(theta / 2)
    height = 1 / math.sqrt(cap_height**-2 + puddle**-2)
    return cap_base * math.sqrt(cap_height / height), height


def simulate(params: DropletParams, times: np.ndarray) -> Motion:
    """The drop's motion and shape at `times` (s since the first frame); see the module docstring."""
    eta, volume = params.viscosity, params.volume_ul * 1e-9
    rho, gamma = liquid(eta)
    theta_a0, theta_r0 = math.radians(params.theta_adv0_deg), math.radians(params.theta_rec0_deg)
    theta_s = (theta_a0 + theta_r0) / 2
    length, height = rest_shape(volume, theta_s, rho, gamma)
    width = length  # round footprint at rest
    drive = rho * volume * G * math.sin(math.radians(params.tilt_deg))
    retention = width * gamma * (math.cos(theta_r0) - math.cos(theta_a0))
    friction = 6 * eta * width * LAMBDA / theta_s  # N per (m/s)
    u_inf = max(drive - retention, 0.0) / friction
    tau = rho * volume / friction
    t = np.asarray(times, dtype=np.float64) + params.release_ms * 1e-3
    speed = u_inf * (1 - np.exp(-t / tau))
    travelled = u_inf * (t - tau * (1 - np.exp(-t / tau)))
    ca = eta * speed / gamma
    theta_adv = np.cbrt(theta_a0**3 + 9 * ca * LAMBDA)
    theta_rec = np.cbrt(np.maximum(theta_r0**3 - 9 * ca * LAMBDA, THETA_MIN**3))
    weber = rho * speed**2 * length / gamma
    aspect = 1 + 25 * ca + 0.01 * weber
    radius = (3 * volume / (4 * math.pi)) ** (1 / 3)
    omega = math.sqrt(8 * gamma / (rho * radius**3))
    beta = 5 * (eta / rho) / radius**2
    ring = params.ring_amplitude * np.exp(-beta * t) * np.cos(omega * t + params.ring_phase)
    return Motion(
        times=np.asarray(times, dtype=np.float64),
        center_mm=(travelled - travelled[0]) * 1e3,
        speed=speed,
        length_mm=length * 1e3 * np.sqrt(aspect) * (1 - ring / 2),
        height_mm=height * 1e3 * (1 + ring),
        theta_adv=theta_adv,
        theta_rec=theta_rec,
        rest_length_mm=length * 1e3,
        rest_height_mm=height * 1e3,
        summary={"u_inf": u_inf, "tau": tau, "ca_inf": eta * u_inf / gamma, "omega": omega, "beta": beta},
    )


@dataclass(frozen=True)
class DropletSequence:
    """T frames of one video with its labels and the true track."""

    frames: np.ndarray  # (T, H, W) float32 in [0, 1]
    params: DropletParams
    motion: Motion
    view: str
    start_mm: float  # footprint centre at the first frame, mm from the strip's left edge

    @property
    def log_viscosity(self) -> float:
        return math.log(self.params.viscosity)

    @property
    def tilt(self) -> float:
        """sin α, the tilt as the LSTMs and the physics baseline use it."""
        return math.sin(math.radians(self.params.tilt_deg))


def view_size(view: str, size: tuple[int, int] | None) -> tuple[int, int]:
    if view not in VIEWS:
        raise ValueError(f"view={view!r}; allowed: {', '.join(VIEWS)}")
    size = tuple(size) if size is not None else (CROP_SIZE if view == "crop" else STRIP_SIZE)
    if len(size) != 2 or min(size) < 8:
        raise ValueError(f"size must be (H, W) with sides >= 8; got {size!r}")
    return int(size[0]), int(size[1])


def generate_sequence(
    seed: int,
    frames: int = 32,
    view: View = "crop",
    size: tuple[int, int] | None = None,
    indices: list[int] | None = None,
) -> DropletSequence:
    """Video `seed`: the same drop (physics, look, placement) in either view; the camera shake, tracking
    error and sensor noise are drawn per view. `indices` renders only those frames (others stay unrendered)."""
    if frames < 1:
        raise ValueError(f"frames must be >= 1; got {frames}")
    size = view_size(view, size)
    params = sample_params(np.random.default_rng([seed, 0]))
    motion = simulate(params, np.arange(frames) * FRAME_DT)
    look_rng = np.random.default_rng([seed, 1])
    look = sample_look(look_rng)
    field_mm, margin = STRIP_SIZE[1] / STRIP_PX_PER_MM, 1.0
    longest = float(motion.length_mm.max())
    free = field_mm - 2 * margin - longest - float(motion.center_mm[-1])
    start = margin + longest / 2 + look_rng.uniform() * max(free, 0.0)
    indices = list(range(frames)) if indices is None else [int(i) for i in indices]
    if any(not 0 <= i < frames for i in indices):
        raise ValueError(f"indices must lie in [0, {frames}); got {indices}")
    rng = np.random.default_rng([seed, 2, VIEWS.index(view)])
    video = render_video(view, size, motion, look, rng, start, indices)
    return DropletSequence(video, params, motion, view, start)


SPLITS = {"ae-train": 1, "ae-val": 2, "lstm-train": 3, "lstm-heldout": 4}


def stream_seed(split: str, index: int, seed: int = 0, epoch: int = 0) -> int:
    """The video seed of item `index` of a split: the splits are disjoint random streams, so no held-out
    LSTM video is ever an autoencoder training frame."""
    entropy = np.random.SeedSequence([seed, SPLITS[split], epoch, index])
    return int(entropy.generate_state(1, np.uint64)[0] >> 1)


class DropletFrames(Dataset):
    """Single frames of random droplet videos, for the V3 autoencoder: {"image": (1, H, W) float32}.

    Training frames are a pure function of (seed, epoch, index); validation frames are fixed."""

    def __init__(
        self,
        split: Literal["train", "val"] = "train",
        view: View = "crop",
        size: tuple[int, int] | list[int] | None = None,
        samples_per_epoch: int = 256,
        seed: int = 0,
        video_frames: int = 64,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; allowed: train, val")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1; got {samples_per_epoch}")
        self.split, self.view, self.size = split, view, view_size(view, size)
        self.samples_per_epoch, self.seed, self.video_frames = int(samples_per_epoch), int(seed), int(video_frames)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(index)
        epoch = self.epoch if self.split == "train" else 0
        video = stream_seed(f"ae-{self.split}", index, self.seed, epoch)
        frame = int(np.random.default_rng([video, 3]).integers(self.video_frames))
        sequence = generate_sequence(video, self.video_frames, self.view, self.size, indices=[frame])
        return {"image": torch.from_numpy(sequence.frames[0][None].copy())}


def droplet_datasets(input_size: tuple[int, int] | list[int], config: Any) -> tuple[Dataset, Dataset]:
    """The V3 task's data sets for `data: {source: droplets, ...}`: the view follows the data option `view`
    (default: "strip" for inputs wider than 4:1, else "crop"); frames are rendered at the model's input size."""
    allowed = ("source", "view", "samples_per_epoch", "val_samples", "video_frames")
    unknown = sorted(set(config.data) - set(allowed))
    if unknown:
        raise ValueError(f"unknown droplet data option(s) {unknown}; allowed: {', '.join(allowed)}")
    options = dict(config.data)
    size = (int(input_size[0]), int(input_size[1]))
    view = options.get("view", "strip" if size[1] > 4 * size[0] else "crop")
    common = {"view": view, "size": size, "seed": config.seed, "video_frames": int(options.get("video_frames", 64))}
    return (
        DropletFrames("train", samples_per_epoch=int(options.get("samples_per_epoch", 256)), **common),
        DropletFrames("val", samples_per_epoch=int(options.get("val_samples", 16)), **common),
    )
