"""Baselines that hold the same number of values as a model's latent.

* `bicubic_thumbnail`: shrink an image (anti-aliased bicubic) to a thumbnail of about `values` pixels
  with the image's aspect ratio, then enlarge it back (bicubic). For a square image the side is
  round(sqrt(values)) (a 512-value latent -> 23 x 23 = 529 pixels); `thumbnail_shape` gives the shape.
* `SubspaceBaseline`: PCA or NMF (scikit-learn) with as many components as the latent, fitted on training
  data; an item is stored as its component coefficients and rebuilt from them.
* `render_bound` and `rendered_subspace`: references for a decoder that renders a small square and enlarges it
  bilinearly (the V3 family): the best any such decoder can do (the least-squares render), and the best linear
  code of a given size at that render (PCA fitted on training items). They explain a missed goal, not goals.
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


def _upsampling(side: int, length: int) -> torch.Tensor:
    """(length, side): 1-D linear interpolation from `side` samples to `length` (align_corners=False), the
    factor of the decoder's separable bilinear resize along one axis."""
    basis = torch.eye(side, dtype=torch.float64)[:, None, :]
    return F.interpolate(basis, size=length, mode="linear", align_corners=False)[:, 0, :].T


def _render_coordinates(images: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image a side x side render can become through the bilinear enlargement (image = U_h @ render @
    U_w.T) lies in the span of Q_h ⊗ Q_w, the orthonormal factors of U_h and U_w: the images' coordinates
    Q_h.T @ image @ Q_w there (side x side, distances as in the image) and the two factors."""
    q_h = torch.linalg.qr(_upsampling(side, images.shape[-2]))[0]
    q_w = torch.linalg.qr(_upsampling(side, images.shape[-1]))[0]
    return q_h.T @ images.double() @ q_w, q_h, q_w


def _enlarge(coordinates: torch.Tensor, q_h: torch.Tensor, q_w: torch.Tensor) -> torch.Tensor:
    return (q_h @ coordinates.double() @ q_w.T).float().clamp(0.0, 1.0)


def render_bound(images: torch.Tensor, side: int) -> torch.Tensor:
    """The best reconstruction any decoder that renders side x side and enlarges it bilinearly can give: each
    image's least-squares projection onto what such enlargements can show (clamped to [0, 1], which only
    brings it closer)."""
    return _enlarge(*_render_coordinates(images, side))


def rendered_subspace(train: torch.Tensor, images: torch.Tensor, components: int, side: int) -> torch.Tensor:
    """The best linear code of `components` values for such a decoder: PCA fitted on the training items'
    coordinates in the enlargements' span (image-space distances), the images coded, rebuilt and enlarged."""
    baseline = SubspaceBaseline("pca", components).fit(_render_coordinates(train, side)[0].numpy())
    coordinates, q_h, q_w = _render_coordinates(images, side)
    return _enlarge(torch.from_numpy(baseline.reconstruct(coordinates.numpy())), q_h, q_w)
