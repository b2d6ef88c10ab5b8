"""Centre crop-or-pad of the last two axes, exactly as PRISM's `crop_pad` / `CropPad` do it.

Faithful to the original (`prism/utils/image.py`), quirks included:

* the branch is **pad** when ``target >= max(tensor.shape)`` — the maximum over *all* axes, batch and
  channel included — and **crop** otherwise;
* pad: ``before = max(0, target - s) // 2`` and ``after = max(0, target - s - before)`` zeros per axis
  (the odd pixel goes after);
* crop: ``start = int((s - target) / 2) + 1`` (true division truncated toward zero, **plus one**) and the
  slice ``[start:start + target]``, which Python clips — so a crop can come back shorter than ``target``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def crop_pad(tensor: torch.Tensor, target_size: int | None) -> torch.Tensor:
    """Crop or zero-pad the last two axes of `tensor` towards `target_size` (see module docstring)."""
    if target_size is None:
        return tensor
    if tensor.dim() < 2:
        raise ValueError(f"crop_pad needs a tensor with at least 2 axes; got shape {tuple(tensor.shape)}")
    target = int(target_size)
    if target >= max(tensor.shape):
        return _pad(tensor, target)
    return _crop(tensor, target)


def _pad(tensor: torch.Tensor, target: int) -> torch.Tensor:
    height, width = tensor.shape[-2], tensor.shape[-1]
    top = max(0, target - height) // 2
    bottom = max(0, target - height - top)
    left = max(0, target - width) // 2
    right = max(0, target - width - left)
    if top == bottom == left == right == 0:
        return tensor
    return F.pad(tensor, (left, right, top, bottom), mode="constant", value=0.0)


def _crop(tensor: torch.Tensor, target: int) -> torch.Tensor:
    height, width = tensor.shape[-2], tensor.shape[-1]
    row = int((height - target) / 2) + 1
    col = int((width - target) / 2) + 1
    # Python slicing semantics (negative starts count from the end, stops clip), as the original.
    rows = slice(row, row + target)
    cols = slice(col, col + target)
    return tensor[..., rows, cols]


class CropPad(nn.Module):
    """`crop_pad` as a parameter-free module: ``CropPad(size)(x) == crop_pad(x, size)``."""

    def __init__(self, size: int | None) -> None:
        super().__init__()
        self.size = size

    def forward(self, tensor: torch.Tensor) -> torch.Tensor:
        return crop_pad(tensor, self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"
