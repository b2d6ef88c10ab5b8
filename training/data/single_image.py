"""One real image, measured once through a forward operator: the data set of a decoder-only model.

The true object is a scikit-image sample image (grayscale, centre square crop, resized to
``object_size``, scaled to ``value_range``). The measurement is ``A(object placed in the grid) +
noise`` for an operator of `training.forward_operators`, drawn once with a fixed seed. Every item is
the same dict::

    {"measurement": A(x) + noise, "target": x (1, S, S), "operator": code (int64, 0-d), "mask": mask}

``operator`` and ``mask`` let ``training_losses(model, batch)`` rebuild the operator from the batch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from training.forward_operators import ForwardOperator, build_operator

# Grayscale-convertible images bundled with scikit-image (no download needed).
IMAGES = ("camera", "astronaut", "coins", "moon", "text", "page", "brick", "grass", "gravel",
          "chelsea", "coffee", "rocket", "horse", "clock", "checkerboard")


def load_image(name: str, size: int, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """A bundled scikit-image image as a (1, size, size) float32 tensor scaled to `value_range`."""
    from skimage import color, data, transform, util

    if name not in IMAGES:
        raise ValueError(f"unknown image {name!r}; allowed: {', '.join(IMAGES)}")
    if size < 1:
        raise ValueError(f"size must be >= 1; got {size}")
    image = getattr(data, name)()
    if image.ndim == 3:
        image = color.rgb2gray(image[..., :3])
    image = util.img_as_float(image)
    height, width = image.shape
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top:top + side, left:left + side]
    image = transform.resize(image, (size, size), anti_aliasing=side > size, preserve_range=True)
    low, high = value_range
    if not high > low:
        raise ValueError(f"value_range must be increasing; got {value_range}")
    image = np.clip(image, 0.0, 1.0) * (high - low) + low
    return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).unsqueeze(0)


class SingleImageDataset(Dataset[dict[str, torch.Tensor]]):
    """`length` copies of one (measurement, target) pair; the noise is drawn once from `seed`."""

    def __init__(self, operator: ForwardOperator, image: str = "camera", grid_size: int | None = None,
                 noise_std: float = 0.0, value_range: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                 length: int = 1) -> None:
        if noise_std < 0:
            raise ValueError(f"noise_std must be >= 0; got {noise_std}")
        if length < 1:
            raise ValueError(f"length must be >= 1; got {length}")
        object_size = operator.object_size
        grid_size = grid_size if grid_size is not None else getattr(operator, "grid_size", object_size)
        self.operator = operator
        self.grid_size = grid_size
        self.length = length
        self.target = load_image(image, object_size, value_range)
        with torch.no_grad():
            clean = operator.measure_object(self.target.unsqueeze(0), grid_size)[0]
        generator = torch.Generator().manual_seed(seed)
        noise = noise_std * torch.randn(clean.shape, generator=generator)
        # Unobserved entries stay exactly zero: noise only where the mask looks.
        mask = operator.mask.unsqueeze(-1) if clean.dim() == operator.mask.dim() + 1 else operator.mask
        noise = noise * mask
        self.measurement = clean + noise
        self._item = {"measurement": self.measurement, "target": self.target, **operator.to_batch()}

    @classmethod
    def from_options(cls, object_size: int, operator: str = "identity", image: str = "camera",
                     grid_size: int | None = None, noise_std: float = 0.0, observed_fraction: float = 1.0,
                     aperture_radius: float | None = None, value_range: tuple[float, float] = (0.0, 1.0),
                     seed: int = 0, length: int = 1) -> SingleImageDataset:
        """Build operator and data set from plain options (what a recipe / CLI passes)."""
        op = build_operator(operator, object_size, grid_size, aperture_radius=aperture_radius,
                            observed_fraction=observed_fraction, seed=seed + 1)
        return cls(op, image=image, grid_size=grid_size, noise_std=noise_std, value_range=value_range,
                   seed=seed, length=length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        return {key: value.clone() for key, value in self._item.items()}
