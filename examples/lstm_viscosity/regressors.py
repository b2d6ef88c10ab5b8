"""The three viscosity regressors of the pipeline: an LSTM over per-frame features (the service's latents,
or raw frames shrunk to as many values), and the physicist's baseline (drop speed from a thresholded
centroid track, with the tilt, fitted by least squares). All regress log η; scored by R² on held-out videos."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def r2_score(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination 1 − SS_res / SS_tot (−inf..1; 0 = predicting the mean)."""
    truth, predicted = np.asarray(truth, np.float64), np.asarray(predicted, np.float64)
    total = float(((truth - truth.mean()) ** 2).sum())
    return 1.0 - float(((truth - predicted) ** 2).sum()) / max(total, 1e-12)


def raw_shape(latent_dim: int, frame_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of the raw-frame baseline: about `latent_dim` values with the frame's aspect
    (square frames: side = round(sqrt(D)))."""
    height, width = frame_hw
    return max(1, round(math.sqrt(latent_dim * height / width))), max(1, round(math.sqrt(latent_dim * width / height)))


def shrink(frames: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(T, H, W) frames area-averaged to `shape`, flattened: (T, h * w)."""
    pooled = F.adaptive_avg_pool2d(torch.from_numpy(np.ascontiguousarray(frames))[:, None], shape)
    return pooled.flatten(1).numpy()


class SequenceRegressor(nn.Module):
    """Per-frame features → dropout → linear projection → LSTM (the tilt appended to every step) → the last
    hidden state → one value."""

    def __init__(self, features: int, project: int = 32, hidden: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, project), nn.Tanh())
        self.lstm = nn.LSTM(project + 1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, sequences: torch.Tensor, tilt: torch.Tensor) -> torch.Tensor:
        steps = self.project(sequences)
        tilt_steps = tilt[:, None, None].expand(-1, steps.shape[1], 1)
        out, _ = self.lstm(torch.cat([steps, tilt_steps], dim=-1))
        return self.head(out[:, -1]).squeeze(-1)


@dataclass
class LstmFit:
    """A trained LSTM regressor with the standardisation of its training set."""

    model: SequenceRegressor
    mean: np.ndarray
    std: np.ndarray
    target_mean: float
    target_std: float
    best_epoch: int

    @torch.no_grad()
    def predict(self, sequences: np.ndarray, tilt: np.ndarray) -> np.ndarray:
        self.model.eval()
        x = torch.from_numpy(((sequences - self.mean) / self.std).astype(np.float32))
        out = self.model(x, torch.from_numpy(tilt.astype(np.float32))).numpy()
        return out * self.target_std + self.target_mean


def fit_lstm(
    sequences: np.ndarray, tilt: np.ndarray, target: np.ndarray, epochs: int = 120, seed: int = 0,
    lr: float = 3e-3, batch_size: int = 16,
) -> LstmFit:
    """Train on (N, T, F) features; a fifth of the training videos picks the epoch kept (the held-out
    videos never do)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    order = rng.permutation(len(sequences))
    n_val = max(1, len(sequences) // 5)
    val, train = order[:n_val], order[n_val:]
    mean = sequences[train].mean(axis=(0, 1))
    std = sequences[train].std(axis=(0, 1)) + 1e-3 * (sequences[train].std() + 1e-6)
    t_mean, t_std = float(target[train].mean()), float(target[train].std() + 1e-6)
    x = torch.from_numpy(((sequences - mean) / std).astype(np.float32))
    a, y = torch.from_numpy(tilt.astype(np.float32)), torch.from_numpy(((target - t_mean) / t_std).astype(np.float32))
    model = SequenceRegressor(sequences.shape[-1])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-3)
    best = (math.inf, 0, {k: v.clone() for k, v in model.state_dict().items()})
    for epoch in range(1, epochs + 1):
        model.train()
        for batch in np.array_split(rng.permutation(train), max(1, len(train) // batch_size)):
            loss = F.mse_loss(model(x[batch], a[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(F.mse_loss(model(x[val], a[val]), y[val]))
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.clone() for k, v in model.state_dict().items()})
    model.load_state_dict(best[2])
    return LstmFit(model, mean, std, t_mean, t_std, best[1])


def centroid_track(frames: np.ndarray) -> np.ndarray:
    """Column of the drop's centroid in each (T, H, W) strip frame: rows above the plate (the sharpest
    bright-to-dark step of the mean row profile), thresholded halfway between backlight and silhouette."""
    profile = frames.mean(axis=(0, 2))
    plate_row = int(np.argmin(np.diff(profile[len(profile) // 3 :]))) + len(profile) // 3
    region = frames[:, : max(plate_row - 1, 1)]
    threshold = 0.5 * (np.percentile(region, 90) + np.percentile(region, 1))
    weights = (region < threshold).sum(axis=1).astype(np.float64)  # (T, W) dark pixels per column
    cols = np.arange(frames.shape[-1]) + 0.5
    return (weights * cols).sum(axis=1) / np.maximum(weights.sum(axis=1), 1.0)


def track_speed(frames: np.ndarray) -> float:
    """Drop speed in pixels per frame: slope of the centroid track."""
    track = centroid_track(frames)
    if len(track) < 2:
        return 0.0
    return float(np.polyfit(np.arange(len(track)), track, 1)[0])


def physics_features(speed_px: np.ndarray, tilt: np.ndarray) -> np.ndarray:
    """[1, log speed, log sin α]: U ∝ sin α / η at steady state, so log η is near-linear in these."""
    return np.stack([np.ones_like(speed_px), np.log(np.maximum(speed_px, 1e-2)), np.log(tilt)], axis=1)


def fit_physics(speed_px: np.ndarray, tilt: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares coefficients of log η on the physics features."""
    coefficients, *_ = np.linalg.lstsq(physics_features(speed_px, tilt), target, rcond=None)
    return coefficients
