"""Small grayscale image patches (e.g. 28×28 or 32×32) cut from the images bundled with scikit-image.

Sources (all shipped inside the scikit-image wheel, nothing is downloaded):
  * 17 photographs and micrographs (`SCENES`), converted to grayscale, brought to a longer side of at
    most `MAX_SIDE` pixels, shrunk by each of `scales` (anti-aliased) and cut on a regular grid with
    a stride of half a patch;
  * the 200 faces of `skimage.data.lfw_subset()` (25×25 crops of Labeled Faces in the Wild), each
    resized (bilinear, anti-aliased) to one patch.

Values are float32 in [0, 1]. The train/validation split is by source image and deterministic:
within each group (scenes sorted by name, faces in their stored order) every `val_every`-th source
(1-based) goes to validation, so no image contributes patches to both splits.
Items are `{"image": (1, P, P) float32}`. With `augment=True` the train split (never validation) returns
each patch under a random symmetry of the square (rotation by k·90°, optional mirror), inverted with
probability 1/2 and with its contrast about its mean scaled by exp(N(0, CONTRAST_LOG_STD²)), clipped to
[0, 1] (clipping yields the saturated flat regions that drawings and phantoms have and photos rarely do).

Held-out test patches (`heldout_patches`, read only by the quality report): cut the same way from the
pictures of `training.data.images.HELDOUT_IMAGES`, which no split reads.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np
import skimage.data
import torch
from skimage.color import rgb2gray
from skimage.transform import rescale, resize
from torch.utils.data import Dataset

SCENES: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "grass", "gravel",
    "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
)
SPLITS = ("train", "val")
CONTRAST_LOG_STD = 0.3
MAX_SIDE = 512  # larger scenes (retina, hubble_deep_field) are shrunk first so no image dominates a split


def _to_gray_unit(image: np.ndarray) -> np.ndarray:
    """Any skimage image (uint8/bool/float, gray/RGB) -> float64 grayscale in [0, 1]."""
    if image.ndim == 3:
        image = rgb2gray(image[..., :3])
    elif image.dtype == np.uint8:
        image = image / 255.0
    image = np.clip(image.astype(np.float64), 0.0, 1.0)
    longer = max(image.shape)
    if longer > MAX_SIDE:
        image = rescale(image, MAX_SIDE / longer, anti_aliasing=True)
    return image


@lru_cache(maxsize=1)
def _scene_images() -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((name, _to_gray_unit(getattr(skimage.data, name)())) for name in sorted(SCENES))


@lru_cache(maxsize=1)
def _faces() -> np.ndarray:
    return np.asarray(skimage.data.lfw_subset(), dtype=np.float64)   # (200, 25, 25) in [0, 1]


def _in_split(index: int, split: str, val_every: int) -> bool:
    is_val = index % val_every == val_every - 1
    return is_val if split == "val" else not is_val


def _grid_patches(image: np.ndarray, size: int, stride: int) -> np.ndarray:
    height, width = image.shape
    if height < size or width < size:
        return np.empty((0, size, size))
    return np.stack([image[top:top + size, left:left + size]
                     for top in range(0, height - size + 1, stride)
                     for left in range(0, width - size + 1, stride)])


FLAT_RANGE = 1.0 / 255  # a patch whose values span less than one 8-bit step has no content to reconstruct


def heldout_patches(patch_size: int = 28, scales: tuple[float, ...] = (0.25, 0.5)) -> torch.Tensor:
    """Patches of the held-out test pictures as (N, 1, P, P) float32 in [0, 1], in a fixed order, without the
    flat ones (value range < `FLAT_RANGE`: saturated regions of the logo and phantom): a flat patch that a
    baseline copies exactly scores PSNR 100 dB (the MSE floor) and would decide a mean of per-patch PSNRs."""
    from training.data.images import HELDOUT_IMAGES, load_heldout_image

    stride = max(1, patch_size // 2)
    chunks = []
    for name in HELDOUT_IMAGES:
        image = _to_gray_unit(load_heldout_image(name))
        for scale in scales:
            shrunk = rescale(image, scale, anti_aliasing=True) if scale != 1 else image
            chunks.append(_grid_patches(shrunk, patch_size, stride))
    patches = np.concatenate(chunks).clip(0.0, 1.0)
    patches = patches[np.ptp(patches, axis=(1, 2)) >= FLAT_RANGE]
    return torch.from_numpy(patches.astype(np.float32)).unsqueeze(1)


def source_names(split: str = "train", val_every: int = 5) -> list[str]:
    """The source images of a split ('lfw_007' = the face at index 7)."""
    _check(split, val_every)
    scenes = [name for i, name in enumerate(sorted(SCENES)) if _in_split(i, split, val_every)]
    faces = [f"lfw_{i:03d}" for i in range(len(_faces())) if _in_split(i, split, val_every)]
    return scenes + faces


def _check(split: str, val_every: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not supported; allowed values: {', '.join(SPLITS)}")
    if isinstance(val_every, bool) or not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"val_every must be an integer >= 2; got {val_every!r}")


def build_patches(split: Literal["train", "val"] = "train", patch_size: int = 28,
                  scales: tuple[float, ...] = (0.25, 0.5), include_faces: bool = True,
                  val_every: int = 5) -> torch.Tensor:
    """All patches of one split as a (N, 1, P, P) float32 tensor in [0, 1], in a fixed order."""
    _check(split, val_every)
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 4:
        raise ValueError(f"patch_size must be an integer >= 4; got {patch_size!r}")
    if not scales or any(not 0 < s <= 1 for s in scales):
        raise ValueError(f"scales must be a non-empty list of factors in (0, 1]; got {scales!r}")
    stride = max(1, patch_size // 2)
    chunks: list[np.ndarray] = []
    for i, (_, image) in enumerate(_scene_images()):
        if not _in_split(i, split, val_every):
            continue
        for scale in scales:
            shrunk = rescale(image, scale, anti_aliasing=True) if scale != 1 else image
            chunks.append(_grid_patches(shrunk, patch_size, stride))
    if include_faces:
        faces = _faces()
        chosen = [i for i in range(len(faces)) if _in_split(i, split, val_every)]
        chunks.append(np.stack([resize(faces[i], (patch_size, patch_size), order=1, anti_aliasing=True)
                                for i in chosen]))
    patches = np.concatenate(chunks).clip(0.0, 1.0)
    return torch.from_numpy(patches.astype(np.float32)).unsqueeze(1)


def augment_patch(image: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(C, P, P) in [0, 1] -> random dihedral symmetry, inversion (p = 1/2), contrast jitter, clipped."""
    draws = torch.rand(3, generator=generator)
    image = torch.rot90(image, int(draws[0] * 4), (-2, -1))
    if draws[1] < 0.5:
        image = image.flip(-1)
    if draws[2] < 0.5:
        image = 1.0 - image
    gain = torch.exp(torch.randn((), generator=generator) * CONTRAST_LOG_STD)
    mean = image.mean()
    return ((image - mean) * gain + mean).clamp(0.0, 1.0)


class ImagePatches(Dataset):
    """Grayscale patches of the scikit-image images and LFW faces; items `{"image": (1, P, P)}`.

    `augment=True` applies `augment_patch` to every train item (draws from torch's global generator,
    which the training loop seeds); the validation split is never augmented.
    """

    def __init__(self, split: Literal["train", "val"] = "train", patch_size: int = 28,
                 scales: tuple[float, ...] = (0.25, 0.5), include_faces: bool = True,
                 val_every: int = 5, augment: bool = False) -> None:
        if not isinstance(augment, bool):
            raise ValueError(f"augment must be true or false; got {augment!r}")
        self.split = split
        self.patch_size = patch_size
        self.augment = augment and split == "train"
        self.images = build_patches(split, patch_size, tuple(scales), include_faces, val_every)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = self.images[index]
        return {"image": augment_patch(image) if self.augment else image}
