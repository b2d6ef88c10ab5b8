"""Timestep and condition embeddings of the diffusion U-Net (module paths as the original's)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class SinusoidalPositionEmbeddings(nn.Module):
    """[sin(t·f_0 … t·f_{h−1}), cos(t·f_0 … t·f_{h−1})], f_k = exp(−k·ln(10000)/(h−1)), h = dim/2."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, time: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        scale = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=time.device) * -scale)
        args = time.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal -> Linear -> SiLU -> Linear."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.time_embedding = SinusoidalPositionEmbeddings(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.time_embedding(t))


class MetaEmbedding(nn.Module):
    """v_meta (B, 3) = (goal id, format id, tone) -> (B, dim): goal ‖ format ‖ tone-MLP -> MLP."""

    def __init__(self, n_goal_classes: int, n_format_classes: int, dim: int) -> None:
        super().__init__()
        quarter = dim // 4
        self.goal_embedding = nn.Embedding(n_goal_classes, quarter)
        self.format_embedding = nn.Embedding(n_format_classes, quarter)
        self.tone_mlp = nn.Sequential(nn.Linear(1, quarter), nn.SiLU(), nn.Linear(quarter, quarter))
        self.projection = nn.Sequential(nn.Linear(3 * quarter, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, v_meta: torch.Tensor) -> torch.Tensor:
        goal = self.goal_embedding(v_meta[:, 0].long())
        fmt = self.format_embedding(v_meta[:, 1].long())
        tone = self.tone_mlp(v_meta[:, 2:3])
        return self.projection(torch.cat([goal, fmt, tone], dim=-1))
