"""Forward operators: how a measurement is taken of the image a decoder-only model renders.

A ProgressiveDecoder renders a full ``grid_size`` × ``grid_size`` grid with the ``object_size`` ×
``object_size`` object zero-padded into its centre (the placement of PRISM's `CropPad`: ``before =
(grid - object) // 2``). An operator ``A`` maps that grid (B, 1, N, N) to a measurement, and training
minimises ``||A(model()) - measurement||²``:

* ``identity`` — ``A(x) = mask ⊙ object(x)``: the object region itself, optionally observed through a
  pixel mask (denoising / inpainting, deep-image-prior style). Mask shape (1, S, S).
* ``fourier`` — ``A(x) = mask ⊙ F(x)`` with the unitary 2-D DFT of the whole grid, returned as
  ``view_as_real`` (B, 1, N, N, 2): Fourier samples through an aperture / sampling mask.
* ``fourier_amplitude`` — ``mask ⊙ |F(x)|``; ``fourier_intensity`` — ``mask ⊙ |F(x)|²`` (phase
  retrieval: only magnitudes are observed). Fourier masks have shape (1, N, N) in FFT (unshifted)
  order.

An operator travels through a data loader as two tensors (`to_batch`: ``operator`` code and ``mask``),
so `operator_from_batch` can rebuild it inside ``training_losses(model, batch)``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn as nn

OPERATOR_NAMES = ("identity", "fourier", "fourier_amplitude", "fourier_intensity")


def object_offset(grid_size: int, object_size: int) -> int:
    """Top-left index of the object inside the grid (the zero-padding split of CropPad)."""
    if object_size > grid_size:
        raise ValueError(f"object_size ({object_size}) must not exceed grid_size ({grid_size})")
    return (grid_size - object_size) // 2


def place_object(obj: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Zero-pad a square object (..., S, S) into the centre of a (..., N, N) grid."""
    size = obj.shape[-1]
    before = object_offset(grid_size, size)
    after = grid_size - size - before
    return nn.functional.pad(obj, (before, after, before, after))


def extract_object(grid: torch.Tensor, object_size: int) -> torch.Tensor:
    """The centre (..., S, S) window of a (..., N, N) grid, where `place_object` put the object."""
    start = object_offset(grid.shape[-1], object_size)
    return grid[..., start:start + object_size, start:start + object_size]


class ForwardOperator(nn.Module):
    """Base class: ``forward(grid) -> measurement``; knows where the object lies in the grid."""

    name: ClassVar[str]
    # True when the measurement cannot tell the object from its 180° rotation (magnitude-only data).
    twin_ambiguous: ClassVar[bool] = False

    def __init__(self, object_size: int, mask: torch.Tensor) -> None:
        super().__init__()
        if object_size < 1:
            raise ValueError(f"object_size must be >= 1; got {object_size}")
        self.object_size = int(object_size)
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        self.register_buffer("mask", mask.to(torch.float32))

    def object_of(self, grid: torch.Tensor) -> torch.Tensor:
        """The object region (B, 1, S, S) of a rendered grid."""
        return extract_object(grid, self.object_size)

    def measure_object(self, obj: torch.Tensor, grid_size: int) -> torch.Tensor:
        """Measurement of a true object (B, 1, S, S) placed into a ``grid_size`` grid."""
        return self(place_object(obj, grid_size))

    def to_batch(self) -> dict[str, torch.Tensor]:
        """The tensors that describe this operator inside a data-set item."""
        return {"operator": torch.tensor(OPERATOR_NAMES.index(self.name)), "mask": self.mask.clone()}

    def extra_repr(self) -> str:
        return f"object_size={self.object_size}, mask={tuple(self.mask.shape)}"


class IdentityOperator(ForwardOperator):
    """``mask ⊙ object(x)``: noisy or partially observed pixels of the object itself."""

    name = "identity"

    def __init__(self, object_size: int, mask: torch.Tensor | None = None) -> None:
        if mask is None:
            mask = torch.ones(1, object_size, object_size)
        if tuple(mask.shape[-2:]) != (object_size, object_size):
            raise ValueError(f"identity mask must be {object_size}x{object_size} (the object); "
                             f"got {tuple(mask.shape)}")
        super().__init__(object_size, mask)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.mask * self.object_of(grid)


class FourierOperator(ForwardOperator):
    """Unitary 2-D DFT of the whole grid, observed through `mask` (complex samples)."""

    name = "fourier"

    def __init__(self, object_size: int, mask: torch.Tensor) -> None:
        grid_size = mask.shape[-1]
        if mask.shape[-2] != grid_size:
            raise ValueError(f"Fourier mask must be square (the grid); got {tuple(mask.shape)}")
        object_offset(grid_size, object_size)  # validates object_size <= grid_size
        super().__init__(object_size, mask)

    @property
    def grid_size(self) -> int:
        return self.mask.shape[-1]

    def spectrum(self, grid: torch.Tensor) -> torch.Tensor:
        if grid.shape[-1] != self.grid_size or grid.shape[-2] != self.grid_size:
            raise ValueError(f"{self.name} operator expects a {self.grid_size}x{self.grid_size} grid; "
                             f"got {tuple(grid.shape)}")
        return torch.fft.fft2(grid.float(), norm="ortho")

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return torch.view_as_real(self.mask * self.spectrum(grid))


class FourierAmplitudeOperator(FourierOperator):
    """``mask ⊙ |F(x)|``: Fourier magnitudes only."""

    name = "fourier_amplitude"
    twin_ambiguous = True

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.mask * self.spectrum(grid).abs()


class FourierIntensityOperator(FourierOperator):
    """``mask ⊙ |F(x)|²``: diffraction intensities (the phase is lost)."""

    name = "fourier_intensity"
    twin_ambiguous = True

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        spectrum = self.spectrum(grid)
        return self.mask * (spectrum.real**2 + spectrum.imag**2)


_CLASSES: dict[str, type[ForwardOperator]] = {
    cls.name: cls
    for cls in (IdentityOperator, FourierOperator, FourierAmplitudeOperator, FourierIntensityOperator)
}


def pixel_mask(size: int, observed_fraction: float = 1.0, seed: int = 0) -> torch.Tensor:
    """(1, size, size) mask with a random `observed_fraction` of ones (all ones at 1.0)."""
    if not 0.0 < observed_fraction <= 1.0:
        raise ValueError(f"observed_fraction must be in (0, 1]; got {observed_fraction}")
    if observed_fraction == 1.0:
        return torch.ones(1, size, size)
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(1, size, size, generator=generator) < observed_fraction).float()


def fourier_mask(grid_size: int, aperture_radius: float | None = None, observed_fraction: float = 1.0,
                 seed: int = 0) -> torch.Tensor:
    """(1, N, N) Fourier-plane mask in FFT order.

    `aperture_radius` (fraction of the Nyquist frequency, (0, sqrt(2)]) keeps a centred circular
    pupil (None: all frequencies); `observed_fraction` < 1 additionally keeps a random subset (the DC
    term is always kept).
    """
    freqs = torch.fft.fftfreq(grid_size) * 2.0  # in units of Nyquist
    radius = torch.sqrt(freqs[:, None] ** 2 + freqs[None, :] ** 2)
    mask = torch.ones(grid_size, grid_size)
    if aperture_radius is not None:
        if not 0.0 < aperture_radius <= math.sqrt(2.0):
            raise ValueError("aperture_radius must be in (0, sqrt(2)] (fraction of Nyquist); "
                             f"got {aperture_radius}")
        mask = (radius <= aperture_radius).float()
    mask = mask * pixel_mask(grid_size, observed_fraction, seed)[0]
    mask[0, 0] = 1.0
    return mask.unsqueeze(0)


def build_operator(name: str, object_size: int, grid_size: int | None = None, *,
                   aperture_radius: float | None = None, observed_fraction: float = 1.0,
                   seed: int = 0) -> ForwardOperator:
    """Operator by name: ``identity`` (pixel mask on the object) or a ``fourier*`` one (grid mask)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown forward operator {name!r}; allowed: {', '.join(OPERATOR_NAMES)}")
    if name == "identity":
        if aperture_radius is not None:
            raise ValueError("aperture_radius applies to Fourier operators only, not 'identity'")
        return IdentityOperator(object_size, pixel_mask(object_size, observed_fraction, seed))
    if grid_size is None:
        raise ValueError(f"operator {name!r} needs grid_size (the model's input_size)")
    return _CLASSES[name](object_size, fourier_mask(grid_size, aperture_radius, observed_fraction, seed))


def operator_from_batch(batch: dict[str, torch.Tensor]) -> ForwardOperator:
    """Rebuild the operator of a (collated) batch from its ``operator``, ``mask`` and ``target``."""
    for key in ("operator", "mask", "target"):
        if key not in batch:
            raise KeyError(f"batch has no {key!r}; expected the keys of a SingleImageDataset item")
    codes = batch["operator"].reshape(-1)
    if not bool((codes == codes[0]).all()):
        raise ValueError("a batch must use one forward operator")
    code = int(codes[0])
    if not 0 <= code < len(OPERATOR_NAMES):
        raise ValueError(f"unknown operator code {code}; codes index {OPERATOR_NAMES}")
    mask = batch["mask"]
    if mask.dim() == 4:  # collated: (B, 1, H, W), the same mask for every item
        mask = mask[0]
    cls = _CLASSES[OPERATOR_NAMES[code]]
    return cls(batch["target"].shape[-1], mask).to(mask.device)
