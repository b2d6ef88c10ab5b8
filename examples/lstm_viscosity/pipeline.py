"""The LSTM viscosity workflow end to end against a running service.

1. Ask the service for the model's input size (its view: a 152×1280-like size is a side strip, others
   are drop crops) and wait until it is ready.
2. Simulate labelled droplet videos (training/data/droplets.py): training and held-out videos come from
   disjoint seed streams that the autoencoder's training frames never use.
3. Encode every video with `aeserve_client`'s `encode_sequence` (an NPY stack of T frames per request to
   POST /v1/models/{model}/encode) → T×D latents.
4. Fit three regressors of log viscosity on the training videos and score R² on the held-out ones:
   an LSTM on the latents, the same LSTM on the raw frames shrunk to about D values, and the physics
   baseline (drop speed from a thresholded centroid track in the side strip of the same video, plus tilt).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from examples.lstm_viscosity.client import ServiceClient
from examples.lstm_viscosity.regressors import (
    fit_lstm,
    fit_physics,
    physics_features,
    r2_score,
    raw_shape,
    shrink,
    track_speed,
)
from training.data.droplets import STRIP_SIZE, generate_sequence, stream_seed


@dataclass(frozen=True)
class PipelineConfig:
    url: str
    model: str
    train: int = 96
    heldout: int = 48
    frames: int = 20
    epochs: int = 120
    seed: int = 0
    physics_size: tuple[int, int] = STRIP_SIZE
    token: str | None = None


@dataclass
class Videos:
    """Per-video features and labels of one split."""

    latents: list[np.ndarray] = field(default_factory=list)  # (T, D) each
    raw: list[np.ndarray] = field(default_factory=list)  # (T, h*w) each
    speed_px: list[float] = field(default_factory=list)
    tilt: list[float] = field(default_factory=list)
    log_viscosity: list[float] = field(default_factory=list)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        return (np.stack(self.latents), np.stack(self.raw), np.array(self.speed_px), np.array(self.tilt),
                np.array(self.log_viscosity))


@dataclass
class Row:
    name: str
    values_per_frame: int | None
    r2: float
    note: str = ""


@dataclass
class PipelineResult:
    config: PipelineConfig
    view: str
    frame_hw: tuple[int, int]
    latent_shape: tuple[int, int]  # (T, D) of one encoded video
    raw_hw: tuple[int, int]
    rows: list[Row]
    timings_s: dict[str, float]
    retried: int


def model_view(info: dict) -> tuple[str, tuple[int, int]]:
    """("strip" | "crop", (H, W)) from the model description's preprocessing."""
    height, width = (int(v) for v in info["preprocessing"]["input_size"])
    return ("strip" if width > 4 * height else "crop"), (height, width)


def collect(
    client: ServiceClient, config: PipelineConfig, split: str, count: int, view: str, frame_hw: tuple[int, int],
    log: Callable[[str], None],
) -> Videos:
    """Simulate, encode (service) and shrink (raw baseline) `count` videos of a split; track the drop in
    the side strip of each for the physics baseline."""
    videos = Videos()
    raw_hw: tuple[int, int] | None = None
    for index in range(count):
        seed = stream_seed(split, index, config.seed)
        video = generate_sequence(seed, config.frames, view, frame_hw)
        latents = client.encode(config.model, video.frames)
        raw_hw = raw_hw or raw_shape(latents.shape[1], frame_hw)
        strip = video if view == "strip" and frame_hw == tuple(config.physics_size) else generate_sequence(
            seed, config.frames, "strip", config.physics_size
        )
        videos.latents.append(latents)
        videos.raw.append(shrink(video.frames, raw_hw))
        videos.speed_px.append(track_speed(strip.frames))
        videos.tilt.append(video.tilt)
        videos.log_viscosity.append(video.log_viscosity)
        if (index + 1) % 16 == 0 or index + 1 == count:
            log(f"  {split}: {index + 1}/{count} videos encoded")
    return videos


def run(config: PipelineConfig, log: Callable[[str], None] = print) -> PipelineResult:
    """The whole workflow; returns the R² table's rows (latents, raw frames, physics)."""
    timings: dict[str, float] = {}
    with ServiceClient(config.url, token=config.token) as client:
        info = client.wait_ready(config.model)
        view, frame_hw = model_view(info)
        log(f"model {config.model}: {view} frames {frame_hw[1]}x{frame_hw[0]}; {config.train} training and "
            f"{config.heldout} held-out videos of {config.frames} frames")
        begun = time.monotonic()
        train = collect(client, config, "lstm-train", config.train, view, frame_hw, log)
        test = collect(client, config, "lstm-heldout", config.heldout, view, frame_hw, log)
        timings["simulate_and_encode"] = round(time.monotonic() - begun, 1)
        retried = client.retried
    (lat_tr, raw_tr, speed_tr, tilt_tr, y_tr), (lat_te, raw_te, speed_te, tilt_te, y_te) = train.arrays(), test.arrays()
    rows = []
    begun = time.monotonic()
    for name, x_tr, x_te in (("LSTM on the service's latents", lat_tr, lat_te),
                             ("LSTM on raw frames, shrunk", raw_tr, raw_te)):
        fit = fit_lstm(x_tr, tilt_tr, y_tr, epochs=config.epochs, seed=config.seed)
        r2 = r2_score(y_te, fit.predict(x_te, tilt_te))
        rows.append(Row(name, int(x_tr.shape[-1]), r2, f"epoch {fit.best_epoch} kept"))
        log(f"  {name}: R² = {r2:.3f}")
    coefficients = fit_physics(speed_tr, tilt_tr, y_tr)
    r2 = r2_score(y_te, physics_features(speed_te, tilt_te) @ coefficients)
    fitted = f"ln η = {coefficients.round(2).tolist()}·[1, ln U, ln sin α]"
    rows.append(Row("physics: centroid speed + tilt", None, r2, fitted))
    timings["fit"] = round(time.monotonic() - begun, 1)
    return PipelineResult(config, view, frame_hw, tuple(lat_te[0].shape), raw_shape(lat_te.shape[-1], frame_hw),
                          rows, timings, retried)


def format_table(result: PipelineResult) -> str:
    """The R² table (held-out videos, log viscosity) as aligned text."""
    h, w = result.raw_hw
    names = {"LSTM on raw frames, shrunk": f"LSTM on raw frames, shrunk to {w}x{h}"}
    lines = [
        f"R² of log viscosity on {result.config.heldout} held-out videos ({result.config.train} training, "
        f"{result.config.frames} frames each; model {result.config.model}, {result.view} "
        f"{result.frame_hw[1]}x{result.frame_hw[0]}, latent T×D = {result.latent_shape[0]}×{result.latent_shape[1]})",
        f"{'regressor':<44}{'values/frame':>13}{'R²':>9}  note",
    ]
    for row in result.rows:
        values = "-" if row.values_per_frame is None else str(row.values_per_frame)
        lines.append(f"{names.get(row.name, row.name):<44}{values:>13}{row.r2:>9.3f}  {row.note}")
    return "\n".join(lines)
