"""Baselines that hold the same number of values as a model's latent.

* `bicubic_thumbnail`: shrink an image (anti-aliased bicubic) to a thumbnail of about `values` pixels
  with the image's aspect ratio, then enlarge it back (bicubic). For a square image the side is
  round(sqrt(values)) (a 512-value latent -> 23 x 23 = 529 pixels); `thumbnail_shape` gives the shape.
* `SubspaceBaseline`: PCA or NMF (scikit-learn) with as many components as the latent, fitted on training
  data; an item is stored as its component coefficients and rebuilt from them.
* `render_bound` and `rendered_subspace`: references for a decoder that renders a small square and resizes
  it (the V3 family): the best any such decoder can do (a perfect render), and the best linear code of a
  given size at that render (PCA fitted on training items). They explain a missed goal; they are not goals.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F


def thumbnail_shape(image_hw: tuple[int, int], values: int) -> tuple[int, int]:
    """(h, w) of a thumbnail with the aspect of `image_hw` holding about `values` pixels (each side
    rounded, at least 1, at most the image's)."""
    if values < 1:
        raise ValueError(f"values must be >= 1; got {values}")
    height, width = image_hw
    h = round(math.sqrt(values * height / width))
    w = round(math.sqrt(values * width / height))
    return min(height, max(1, h)), min(width, max(1, w))


def bicubic_thumbnail(images: torch.Tensor, values: int) -> tuple[torch.Tensor, int]:
    """(B, C, H, W) in [0, 1] -> (reconstruction from the thumbnail, values stored per image)."""
    h, w = thumbnail_shape(tuple(images.shape[-2:]), values)
    small = F.interpolate(images.float(), size=(h, w), mode="bicubic", align_corners=False, antialias=True)
    back = F.interpolate(small, size=tuple(images.shape[-2:]), mode="bicubic", align_corners=False)
    return back.clamp(0.0, 1.0), h * w * images.shape[1]


class SubspaceBaseline:
    """PCA or NMF with `components` components, fitted on (N, ...) training items."""

    def __init__(self, kind: Literal["pca", "nmf"], components: int, seed: int = 0, max_iter: int = 400) -> None:
        from sklearn.decomposition import NMF, PCA

        if kind not in ("pca", "nmf"):
            raise ValueError(f"kind must be 'pca' or 'nmf'; got {kind!r}")
        self.kind = kind
        self.components = int(components)
        self.model = (
            PCA(n_components=self.components, random_state=seed)
            if kind == "pca"
            else NMF(n_components=self.components, init="nndsvda", max_iter=max_iter, random_state=seed)
        )

    def fit(self, train: np.ndarray) -> SubspaceBaseline:
        """Fit on training items (N, ...) (NMF needs them non-negative). NMF stops at `max_iter` whether
        or not its tolerance is met (on the 4D-STEM patterns 200 and 400 iterations score alike)."""
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.model.fit(np.asarray(train, dtype=np.float64).reshape(len(train), -1))
        return self

    @property
    def n_components(self) -> int:
        """The number of fitted components (the values stored per item)."""
        return int(self.model.components_.shape[0])

    def encode(self, items: np.ndarray) -> np.ndarray:
        """(N, ...) -> (N, components) coefficients."""
        return self.model.transform(np.asarray(items, dtype=np.float64).reshape(len(items), -1))

    def reconstruct(self, items: np.ndarray) -> np.ndarray:
        """Items rebuilt from their coefficients, in their own shape and dtype float32."""
        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            codes = self.encode(items)
        flat = self.model.inverse_transform(codes) if self.kind == "pca" else codes @ self.model.components_
        return flat.reshape(np.shape(items)).astype(np.float32)


def _render(images: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, side, side), anti-aliased bilinear."""
    return F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _resize_back(rendered: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A side x side render enlarged to `size` the way the V3 decoder does (bilinear), clamped to [0, 1]."""
    return F.interpolate(rendered, size=size, mode="bilinear", align_corners=False).clamp(0.0, 1.0)


def render_bound(images: torch.Tensor, side: int) -> torch.Tensor:
    """The reconstruction of a decoder whose side x side render is perfect (the images shrunk to it)."""
    return _resize_back(_render(images, side), tuple(images.shape[-2:]))


def rendered_subspace(train: torch.Tensor, images: torch.Tensor, components: int, side: int) -> torch.Tensor:
    """PCA with `components` components fitted on the training items shrunk to side x side: the images
    coded, rebuilt at that render and enlarged back."""
    baseline = SubspaceBaseline("pca", components).fit(_render(train, side).numpy())
    rebuilt = torch.from_numpy(baseline.reconstruct(_render(images, side).numpy()))
    return _resize_back(rebuilt, tuple(images.shape[-2:]))
