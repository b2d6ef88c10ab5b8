"""Conditional diffusion U-Net decoder ("Module 7" of ai-design): (x_t, t, v_meta) -> predicted noise ε.

Architecture (faithful to the original `ConditionalUNet`, see reference/diffusion-decoder.md):
sinusoidal time embedding -> MLP; metadata (goal id, format id, tone) -> embeddings + MLP; the two are
mixed by one linear layer (no activation) into the conditioning vector that every ResidualBlock adds
after its first GroupNorm. Post-norm residual blocks, self-attention only at the configured levels
(mirrored in the decoder), stride-2 conv downsampling, nearest+conv upsampling, skip connections that
hold conv_in, every ResidualBlock and every downsample output (never attention outputs).

Module paths equal the original's, so its state_dict loads without a key map. The noise schedule
travels in the config (the training objective and `sampler_spec()` use it); the samplers themselves
live in `training.schedules`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from training.layers.embeddings import MetaEmbedding, TimeEmbedding
from training.models.base import ExportOp, OpModule, config_to_dict
from training.registry import register_model
from training.schedules import BETA_SCHEDULES, NoiseSchedule, ddim_sample, make_schedule

# Slots of the condition vector v_meta, in order (ids are floats truncated to integers).
CONDITION_KEYS = ("goal", "format", "tone")


@dataclass(frozen=True)
class DiffusionUNetConfig:
    """Everything that defines a model. The first twelve fields are the original constructor's."""

    in_channels: int = 3
    out_channels: int = 3
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 8)
    n_goal_classes: int = 10
    n_format_classes: int = 4
    time_emb_dim: int = 256
    meta_emb_dim: int = 256
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (1, 2)
    dropout: float = 0.1
    gradient_checkpointing: bool = False
    # fixed in the original, configurable here
    attention_heads: int = 4
    norm_groups: int = 8
    # what the model is trained on / samples
    image_size: int = 32
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_multipliers", tuple(int(m) for m in self.channel_multipliers))
        object.__setattr__(self, "attention_levels", tuple(int(a) for a in self.attention_levels))
        levels = len(self.channel_multipliers)
        if levels < 1 or any(m < 1 for m in self.channel_multipliers):
            raise ValueError(f"channel_multipliers must be positive integers; got {self.channel_multipliers}")
        bad = [a for a in self.attention_levels if not 0 <= a < levels]
        if bad:
            raise ValueError(f"attention_levels must be level indices within [0, {levels - 1}]; got {bad}")
        for m in self.channel_multipliers:
            width = self.base_channels * m
            if width % self.norm_groups:
                raise ValueError(f"base_channels*mult = {width} must be divisible by norm_groups "
                                 f"= {self.norm_groups}")
            if width % self.attention_heads:
                raise ValueError(f"base_channels*mult = {width} must be divisible by attention_heads "
                                 f"= {self.attention_heads}")
        if self.time_emb_dim % 2:
            raise ValueError(f"time_emb_dim must be even; got {self.time_emb_dim}")
        if self.meta_emb_dim % 4:
            raise ValueError(f"meta_emb_dim must be divisible by 4; got {self.meta_emb_dim}")
        if self.num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1; got {self.num_res_blocks}")
        factor = 2 ** (levels - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size must be divisible by 2**(levels-1) = {factor}; "
                             f"got {self.image_size}")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}; got {self.beta_schedule!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be within [0, 1); got {self.dropout}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DiffusionUNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DiffusionUNetConfig fields {unknown}; allowed: {sorted(known)}")
        return cls(**values)


# ----------------------------------------------------------------------------------------- blocks


class ResidualBlock(nn.Module):
    """Post-norm block: conv-GN(+cond)-SiLU-drop-conv-GN, then SiLU(h + skip)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, dropout: float,
                 groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.time_mlp = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, out_channels))
        self.norm1 = nn.GroupNorm(groups, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.residual_conv = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.conv1(x))
        h = h + self.time_mlp(cond)[:, :, None, None]
        h = self.dropout(F.silu(h))
        h = self.norm2(self.conv2(h))
        skip = x if self.residual_conv is None else self.residual_conv(x)
        return F.silu(h + skip)


class AttentionBlock(nn.Module):
    """Multi-head self-attention over H·W positions with a residual: x + proj(attn(GN(x)))."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        head_dim = c // self.heads
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, head_dim, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, N, d)
        weights = torch.softmax(q @ k.transpose(-1, -2) * head_dim**-0.5, dim=-1)
        out = (weights @ v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


def _upsample(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                         nn.Conv2d(channels, channels, 3, padding=1))


# ------------------------------------------------------------------------------------------ model


class DiffusionUNet(nn.Module):
    """ε-prediction U-Net conditioned on the timestep and the (goal, format, tone) meta vector."""

    family: ClassVar[str] = "diffusion-decoder"

    def __init__(self, config: DiffusionUNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        groups, cond_dim = c.norm_groups, c.time_emb_dim
        self.time_embedding = TimeEmbedding(c.time_emb_dim)
        self.meta_embedding = MetaEmbedding(c.n_goal_classes, c.n_format_classes, c.meta_emb_dim)
        self.cond_projection = nn.Linear(c.time_emb_dim + c.meta_emb_dim, c.time_emb_dim)
        self.conv_in = nn.Conv2d(c.in_channels, c.base_channels, 3, padding=1)

        levels = len(c.channel_multipliers)
        chans = [c.base_channels]
        running = c.base_channels
        self.down_blocks = nn.ModuleList()
        for level, mult in enumerate(c.channel_multipliers):
            width = c.base_channels * mult
            for _ in range(c.num_res_blocks):
                self.down_blocks.append(ResidualBlock(running, width, cond_dim, c.dropout, groups))
                running = width
                chans.append(running)
                if level in c.attention_levels:
                    self.down_blocks.append(AttentionBlock(running, c.attention_heads, groups))
            if level < levels - 1:
                self.down_blocks.append(nn.Conv2d(running, running, 3, stride=2, padding=1))
                chans.append(running)

        self.mid_block1 = ResidualBlock(running, running, cond_dim, c.dropout, groups)
        self.mid_attn = AttentionBlock(running, c.attention_heads, groups)
        self.mid_block2 = ResidualBlock(running, running, cond_dim, c.dropout, groups)

        self.up_blocks = nn.ModuleList()
        for level, mult in enumerate(reversed(c.channel_multipliers)):
            width = c.base_channels * mult
            encoder_level = levels - 1 - level
            for _ in range(c.num_res_blocks + 1):
                skip_width = chans.pop()
                self.up_blocks.append(ResidualBlock(running + skip_width, width, cond_dim, c.dropout, groups))
                running = width
                if encoder_level in c.attention_levels:
                    self.up_blocks.append(AttentionBlock(running, c.attention_heads, groups))
            if level < levels - 1:
                self.up_blocks.append(_upsample(running))

        self.conv_out = nn.Sequential(nn.GroupNorm(groups, running), nn.SiLU(),
                                      nn.Conv2d(running, c.out_channels, 3, padding=1))
        self.register_buffer("alphas_cumprod", self.noise_schedule().alphas_cumprod, persistent=False)

    # ---------------------------------------------------------------------------------- forward

    def conditioning(self, t: torch.Tensor, v_meta: torch.Tensor | None) -> torch.Tensor:
        """The vector every ResidualBlock receives: cond_projection(time ‖ meta), or time alone."""
        time_emb = self.time_embedding(t)
        if v_meta is None:
            return time_emb
        return self.cond_projection(torch.cat([time_emb, self.meta_embedding(v_meta)], dim=-1))

    def _run_block(self, block: nn.Module, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if isinstance(block, ResidualBlock):
                return checkpoint(block, h, cond, use_reentrant=False)
            return checkpoint(block, h, use_reentrant=False)
        return block(h, cond) if isinstance(block, ResidualBlock) else block(h)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, v_meta: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted noise ε (B, out_channels, H, W); t int64 (B,), v_meta (B, 3) or None."""
        cond = self.conditioning(t, v_meta)
        h = self.conv_in(x_t)
        skips = [h]
        for block in self.down_blocks:
            h = self._run_block(block, h, cond)
            if not isinstance(block, AttentionBlock):
                skips.append(h)
        h = self._run_block(self.mid_block1, h, cond)
        h = self._run_block(self.mid_attn, h, cond)
        h = self._run_block(self.mid_block2, h, cond)
        for block in self.up_blocks:
            if isinstance(block, ResidualBlock):
                h = torch.cat([h, skips.pop()], dim=1)
            h = self._run_block(block, h, cond)
        return self.conv_out(h)

    denoise = forward

    def denoise_clamped(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """The served `denoise` op: ids are truncated and clamped into range, t into [0, T−1].

        Clamping makes arbitrary inputs (e.g. random parity-check tensors) safe for the embedding
        gathers; for valid inputs it is the identity, so eager parity with the model holds.
        """
        c = self.config
        goal = condition[:, 0:1].long().clamp(0, c.n_goal_classes - 1).to(condition.dtype)
        fmt = condition[:, 1:2].long().clamp(0, c.n_format_classes - 1).to(condition.dtype)
        v_meta = torch.cat([goal, fmt, condition[:, 2:3]], dim=1)
        return self(x_t, t.long().clamp(0, c.num_train_timesteps - 1), v_meta)

    # ------------------------------------------------------------------------------ capabilities

    def noise_schedule(self) -> NoiseSchedule:
        c = self.config
        return make_schedule(c.num_train_timesteps, c.beta_schedule, c.beta_start, c.beta_end)

    @torch.no_grad()
    def sample(self, condition: torch.Tensor, steps: int = 50, eta: float = 0.0, clip_denoised: bool = True,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """DDIM samples in [−1, 1] for a (B, 3) condition; x_T is drawn from `generator`."""
        c = self.config
        device = self.alphas_cumprod.device
        shape = (condition.shape[0], c.in_channels, c.image_size, c.image_size)
        x_T = torch.randn(shape, generator=generator,
                          device=generator.device if generator is not None else device).to(device)
        return ddim_sample(self, x_T, condition.to(device), steps, eta, clip_denoised,
                           schedule=self.noise_schedule().to(device), generator=generator)

    def get_config(self) -> dict[str, Any]:
        return config_to_dict(self.config)

    def capabilities(self) -> list[str]:
        return ["sample"]

    def preprocessing(self) -> dict[str, Any]:
        c = self.config
        return {"channels": c.out_channels, "input_size": [c.image_size, c.image_size], "resize": "none",
                "output_range": [-1.0, 1.0]}

    def sampler_spec(self) -> dict[str, Any]:
        """The manifest's SamplerSpec (kind "ddim")."""
        from training.data.layouts import condition_vocabulary

        c = self.config
        return {"kind": "ddim", **self.noise_schedule().spec(), "default_steps": 50,
                "max_steps": c.num_train_timesteps, "default_eta": 0.0, "clip_denoised": True,
                "condition_dim": len(CONDITION_KEYS), "condition_keys": list(CONDITION_KEYS),
                "condition_values": condition_vocabulary(),
                "image_shape": [c.out_channels, c.image_size, c.image_size]}

    def export_ops(self, batch_size: int = 2) -> list[ExportOp]:
        c = self.config
        generator = torch.Generator().manual_seed(0)
        size = c.image_size
        x_t = torch.randn(batch_size, c.in_channels, size, size, generator=generator)
        t = torch.linspace(0, c.num_train_timesteps - 1, batch_size).long()
        goal = torch.arange(batch_size) % c.n_goal_classes
        fmt = torch.arange(batch_size) % c.n_format_classes
        tone = torch.rand(batch_size, generator=generator)
        condition = torch.stack([goal.float(), fmt.float(), tone], dim=1)
        other = batch_size + 1
        return [ExportOp(
            name="denoise", module=OpModule(self, "denoise_clamped").eval(), example_inputs=(x_t, t, condition),
            input_names=["x_t", "t", "condition"], output_names=["eps"],
            check_shapes=[((other, c.in_channels, size, size), (other,), (other, len(CONDITION_KEYS))),
                          ((1, c.in_channels, size, size), (1,), (1, len(CONDITION_KEYS)))],
        )]


# ---------------------------------------------------------------------------------------- variants


def _build(base: DiffusionUNetConfig, overrides: dict[str, Any]) -> DiffusionUNet:
    return DiffusionUNet(replace(base, **overrides))


@register_model("diffusion_unet_tiny")
def diffusion_unet_tiny(**overrides: Any) -> DiffusionUNet:
    """Test-size model (32×32, ~0.2M parameters)."""
    base = DiffusionUNetConfig(base_channels=16, channel_multipliers=(1, 2), attention_levels=(1,),
                               time_emb_dim=64, meta_emb_dim=64, num_res_blocks=1, dropout=0.0, image_size=32)
    return _build(base, overrides)


@register_model("diffusion_unet_32")
def diffusion_unet_32(**overrides: Any) -> DiffusionUNet:
    """32×32 layouts: the public fixture's shape (base 32, mults (1, 2), attention at 16×16)."""
    base = DiffusionUNetConfig(base_channels=32, channel_multipliers=(1, 2), attention_levels=(1,),
                               image_size=32)
    return _build(base, overrides)


@register_model("diffusion_unet_64")
def diffusion_unet_64(**overrides: Any) -> DiffusionUNet:
    """64×64 layouts: three levels (64, 32, 16), attention only at 16×16."""
    base = DiffusionUNetConfig(base_channels=32, channel_multipliers=(1, 2, 2), attention_levels=(2,),
                               image_size=64)
    return _build(base, overrides)


@register_model("diffusion_unet_256")
def diffusion_unet_256(**overrides: Any) -> DiffusionUNet:
    """The original training script's model (256×256, base 64, mults (1, 2, 4, 8), attention at 32×32)."""
    base = DiffusionUNetConfig(base_channels=64, channel_multipliers=(1, 2, 4, 8), attention_levels=(3,),
                               image_size=256)
    return _build(base, overrides)
