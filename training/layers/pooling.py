"""ONNX-safe adaptive average pooling.

`nn.AdaptiveAvgPool2d` exports to ONNX with its windows frozen at the example input size, so a
model exported with dynamic H/W silently pools wrongly at other sizes. `AdaptiveAvgPool2dExportable`
computes the same result as two matrix products, `P_h @ x @ P_w^T`, where the averaging matrices are
built from the *runtime* H and W with ordinary tensor ops (arange, integer division, comparisons).
The exporter therefore records the window arithmetic itself and the graph is right at every size.

Window rule (identical to PyTorch): output cell i of an axis of length s pooled to n cells averages
input indices floor(i·s/n) … ceil((i+1)·s/n) − 1. Windows overlap when s is not a multiple of n and
repeat input cells when s < n.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def averaging_matrix(length: int | torch.Tensor, out_size: int, *, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """(out_size, length) matrix whose row i averages the adaptive-pooling window i of an axis."""
    cells = torch.arange(out_size, device=device)
    start = torch.div(cells * length, out_size, rounding_mode="floor")
    end = torch.div((cells + 1) * length + (out_size - 1), out_size, rounding_mode="floor")
    positions = torch.arange(length, device=device)
    inside = (positions.unsqueeze(0) >= start.unsqueeze(1)) & (positions.unsqueeze(0) < end.unsqueeze(1))
    counts = (end - start).to(dtype).unsqueeze(1)
    return inside.to(dtype) / counts


def adaptive_avg_pool2d(x: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """`F.adaptive_avg_pool2d` for (..., H, W) tensors, written so it exports with dynamic H/W."""
    out_h, out_w = output_size
    rows = averaging_matrix(x.shape[-2], out_h, dtype=x.dtype, device=x.device)
    cols = averaging_matrix(x.shape[-1], out_w, dtype=x.dtype, device=x.device)
    return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


class AdaptiveAvgPool2dExportable(nn.Module):
    """Drop-in replacement for `nn.AdaptiveAvgPool2d(output_size)` (int or (h, w); no None entries)."""

    def __init__(self, output_size: int | tuple[int, int]) -> None:
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if len(output_size) != 2 or any(not isinstance(s, int) or s < 1 for s in output_size):
            raise ValueError(f"output_size must be a positive int or a pair of them, got {output_size!r}")
        self.output_size = (int(output_size[0]), int(output_size[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return adaptive_avg_pool2d(x, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
