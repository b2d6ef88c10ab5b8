"""Multi-head self-attention over the pixels of a feature map.

`SelfAttentionBlock` (AutoEncoder CNN V3) can return its attention weights; `SelfAttention2d`
(ConvDecoder) follows the ImageDGD layout and uses a fused attention kernel.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttentionBlock(nn.Module):
    """Self-attention over the N = H·W positions of a (B, C, H, W) map, with a plain residual.

    `qkv` = conv1×1(C → 3·heads·d), `proj` = conv1×1(heads·d → C), both bias-free, with
    d = max(C // (heads·reduction), 8). The qkv channels are read as (3, heads, d); the attention
    output goes back to channels `head·d + j`, then `proj`, then `+ x`.

    `forward` keeps the head-averaged softmax weights of its last call, detached, in
    `attention_weights` (B, N, N) unless `record=False`; `attend` returns them instead.
    """

    def __init__(self, in_channels: int, num_heads: int = 4, reduction: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = max(in_channels // (num_heads * reduction), 8)
        self.scale = self.head_dim ** -0.5
        inner = num_heads * self.head_dim
        self.qkv = nn.Conv2d(in_channels, 3 * inner, kernel_size=1, bias=False)
        self.proj = nn.Conv2d(inner, in_channels, kernel_size=1, bias=False)
        self.attention_weights: torch.Tensor | None = None

    def attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (output (B, C, H, W), head-averaged attention (B, N, N))."""
        qkv = self.qkv(x).flatten(2).unflatten(1, (3, self.num_heads, self.head_dim))  # (B, 3, h, d, N)
        q, k, v = qkv.transpose(-2, -1).unbind(dim=1)                                   # (B, h, N, d)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)             # (B, h, N, N)
        out = (attn @ v).transpose(-2, -1).flatten(1, 2)                                 # (B, h·d, N)
        out = out.reshape(x.shape[0], -1, x.shape[2], x.shape[3])
        return self.proj(out) + x, attn.mean(dim=1)

    def forward(self, x: torch.Tensor, record: bool = True) -> torch.Tensor:
        out, weights = self.attend(x)
        if record:
            self.attention_weights = weights.detach()
        return out

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H·W positions with a plain residual (original layout).

    `query`/`key`/`value`/`proj_out` are conv1×1 C->C with bias; channel `head·d + j` belongs to head
    `head` (d = C / heads); softmax(qᵀk · d^-0.5) over the keys; output = x + proj_out(attention).
    Uses `scaled_dot_product_attention`, so eager runs never hold the (N, N) matrix where a fused
    kernel exists.
    """

    def __init__(self, channels: int, heads: int = 8) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"SelfAttention2d needs channels ({channels}) divisible by heads ({heads})")
        self.heads = heads
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        # (B, C, H, W) -> (B, heads, N, d)
        return t.flatten(2).unflatten(1, (self.heads, -1)).transpose(-2, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v)                  # (B, heads, N, d)
        out = out.transpose(-2, -1).flatten(1, 2).unflatten(2, x.shape[-2:])
        return x + self.proj_out(out)
