"""The quality report's equal-size baselines (bicubic thumbnail, PCA, NMF) and the V3 render references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.quality.baselines import (
    SubspaceBaseline,
    bicubic_thumbnail,
    render_bound,
    rendered_subspace,
    thumbnail_shape,
)


@pytest.mark.parametrize("latent", [16, 64, 256, 1024])
def test_square_thumbnail_holds_exactly_the_latent_size(latent: int) -> None:
    images = torch.rand(2, 1, 64, 64)
    reconstruction, values = bicubic_thumbnail(images, latent)
    assert values == latent and thumbnail_shape((64, 64), latent) == (int(latent**0.5),) * 2
    assert reconstruction.shape == images.shape
    assert float(reconstruction.min()) >= 0.0 and float(reconstruction.max()) <= 1.0


def test_thumbnail_keeps_the_aspect_and_about_the_latent_size() -> None:
    assert thumbnail_shape((201, 201), 512) == (23, 23)            # the 23x23 = 529 values
    h, w = thumbnail_shape((152, 1280), 512)
    assert (h, w) == (8, 66) and abs(h * w - 512) <= h + w       # each side rounded on its own
    assert thumbnail_shape((8, 8), 4096) == (8, 8)                # never larger than the image
    _, values = bicubic_thumbnail(torch.rand(1, 3, 40, 40), 100)
    assert values == 3 * 100                                      # one thumbnail per channel
    with pytest.raises(ValueError, match="values must be >= 1"):
        thumbnail_shape((8, 8), 0)


def test_thumbnail_of_a_smooth_image_is_near_perfect() -> None:
    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 64), indexing="ij")
    smooth = (0.5 + 0.3 * torch.sin(2 * x + y))[None, None]
    reconstruction, _ = bicubic_thumbnail(smooth, 256)
    assert float((reconstruction - smooth).abs().max()) < 0.02


def _low_rank(rank: int = 4, n: int = 60, d: int = 50) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.random((n, rank)) @ rng.random((rank, d))        # non-negative, exactly rank 4


@pytest.mark.parametrize(("kind", "tolerance"), [("pca", 1e-6), ("nmf", 1e-2)])
def test_subspace_baselines_rebuild_a_low_rank_matrix(kind: str, tolerance: float) -> None:
    matrix = _low_rank().reshape(60, 5, 10)                        # items keep their own shape
    baseline = SubspaceBaseline(kind, 4, max_iter=2000).fit(matrix)
    assert baseline.n_components == 4 and baseline.encode(matrix).shape == (60, 4)
    rebuilt = baseline.reconstruct(matrix)
    assert rebuilt.shape == matrix.shape and rebuilt.dtype == np.float32
    assert np.abs(rebuilt - matrix).max() / np.abs(matrix).max() < tolerance


def test_subspace_baseline_names_its_kind() -> None:
    with pytest.raises(ValueError, match="kind must be 'pca' or 'nmf'"):
        SubspaceBaseline("ica", 2)  # type: ignore[arg-type]


def test_render_bound_is_exact_for_a_constant_and_improves_with_the_render_side() -> None:
    flat = torch.full((2, 1, 50, 70), 0.3)
    assert torch.allclose(render_bound(flat, 8), flat, atol=1e-6)
    images = torch.rand(3, 1, 50, 70)
    errors = [float((render_bound(images, side) - images).pow(2).mean()) for side in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert render_bound(images, 16).shape == images.shape


def test_render_bound_reproduces_a_bilinear_enlargement_and_beats_a_shrunk_render() -> None:
    """An image that is a bilinearly enlarged render comes back exactly; for others the least-squares render
    is at least as close as the anti-aliased shrink enlarged again."""
    render = torch.rand(2, 1, 8, 8) * 0.5 + 0.25
    enlarged = torch.nn.functional.interpolate(render, size=(37, 53), mode="bilinear", align_corners=False)
    assert torch.allclose(render_bound(enlarged, 8), enlarged, atol=1e-5)
    images = torch.rand(3, 1, 37, 53)
    shrunk = torch.nn.functional.interpolate(images, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    naive = torch.nn.functional.interpolate(shrunk, size=(37, 53), mode="bilinear", align_corners=False)
    assert float((render_bound(images, 8) - images).pow(2).mean()) < float((naive - images).pow(2).mean())


def test_rendered_subspace_with_enough_components_equals_the_render_bound() -> None:
    """Items inside the span of the fitted components are rebuilt exactly at the render: the linear reference
    then meets the architecture's bound; with fewer components it falls below it."""
    images = torch.rand(6, 1, 30, 40)
    bound = render_bound(images, 8)
    assert torch.allclose(rendered_subspace(images, images, 6, 8), bound, atol=1e-4)
    fewer = rendered_subspace(images, images, 2, 8)
    assert float((fewer - images).pow(2).mean()) > float((bound - images).pow(2).mean()) + 1e-4
