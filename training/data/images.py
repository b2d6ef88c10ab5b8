"""Real grayscale images bundled with scikit-image, as random crops for the V3 autoencoder.

Only images that ship inside the scikit-image wheel are used (no download): the grayscale ones as
they are, the colour photographs converted with `rgb2gray`. The split is by image, so validation
crops come from pictures the model never trains on. An image smaller than the crop is first
upscaled (bilinear, aspect kept) just enough to cover it.

Training crops are a pure function of (seed, epoch, index): `set_epoch(epoch)` picks the epoch, so a
resumed run sees exactly the crops an uninterrupted run would. Validation crops are fixed (seed
only). Every item is `{"image": (1, H, W) float32 in [0, 1]}`.

Held-out test pictures (`HELDOUT_IMAGES`): the bundled pictures that neither split may read
(`SkimageCrops` and `load_image` refuse them); only the quality report (`training.evaluate`) crops them,
with `heldout_crops`.
"""

from __future__ import annotations

import warnings
from functools import cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from training.data.augment import AugmentRanges, augment_crop, random_scaled_crop

AUGMENT = AugmentRanges()

# Grayscale pictures of the scikit-image distribution (checked to load offline) ...
GRAY_IMAGES: tuple[str, ...] = (
    "camera",
    "moon",
    "coins",
    "text",
    "page",
    "brick",
    "grass",
    "gravel",
    "cell",
    "clock",
    "microaneurysms",
)
# ... and colour photographs, used in grayscale.
COLOR_IMAGES: tuple[str, ...] = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
ALL_IMAGES: tuple[str, ...] = GRAY_IMAGES + COLOR_IMAGES
# Held out for validation: one texture, one object on background, one photograph, one document.
DEFAULT_VAL_IMAGES: tuple[str, ...] = ("coins", "gravel", "chelsea", "page")
# Held out for the quality report only (the test split): never in a training or validation split. Two
# photographs, a silhouette, a logo and a phantom (`colorwheel` is left out: a smooth gradient that a
# 23x23 thumbnail keeps at ~48 dB would dominate a mean PSNR).
HELDOUT_IMAGES: tuple[str, ...] = ("motorcycle_left", "motorcycle_right", "horse", "logo", "shepp_logan_phantom")
if set(HELDOUT_IMAGES) & set(ALL_IMAGES):
    raise RuntimeError(f"held-out pictures {sorted(set(HELDOUT_IMAGES) & set(ALL_IMAGES))} are in ALL_IMAGES")


def _to_unit_gray(image: np.ndarray) -> np.ndarray:
    """Any scikit-image picture -> 2-D float32 in [0, 1]."""
    from skimage.color import rgb2gray, rgba2rgb

    if image.ndim == 3:
        if image.shape[-1] == 4:
            image = rgba2rgb(image)
        image = rgb2gray(image)
    if image.dtype == np.bool_:
        image = image.astype(np.float32)
    elif np.issubdtype(image.dtype, np.integer):
        image = image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    return np.clip(image.astype(np.float32), 0.0, 1.0)


@cache
def load_image(name: str) -> np.ndarray:
    """One bundled scikit-image picture as float32 (H, W) in [0, 1]."""
    import skimage.data

    if name in HELDOUT_IMAGES:
        raise ValueError(f"{name!r} is held out for the quality report (load_heldout_image), not for training")
    if name not in ALL_IMAGES:
        raise ValueError(f"unknown image {name!r}; available: {', '.join(ALL_IMAGES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _to_unit_gray(getattr(skimage.data, name)())


@cache
def load_heldout_image(name: str) -> np.ndarray:
    """One held-out test picture as float32 (H, W) in [0, 1] (the quality report's data)."""
    import skimage.data

    if name not in HELDOUT_IMAGES:
        raise ValueError(f"{name!r} is not a held-out picture; they are: {', '.join(HELDOUT_IMAGES)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name.startswith("motorcycle_"):
            left, right, _ = skimage.data.stereo_motorcycle()
            return _to_unit_gray(left if name == "motorcycle_left" else right)
        return _to_unit_gray(getattr(skimage.data, name)())


def heldout_crops(crop_size: tuple[int, int], per_image: int = 8, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Fixed crops of every held-out picture (covered to `crop_size` first): (N, 1, H, W) and their sources."""
    size = (int(crop_size[0]), int(crop_size[1]))
    crops, names = [], []
    for number, name in enumerate(HELDOUT_IMAGES):
        source = cover(torch.from_numpy(load_heldout_image(name))[None], size)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + number)
        for _ in range(per_image):
            top = int(torch.randint(source.shape[-2] - size[0] + 1, (1,), generator=gen))
            left = int(torch.randint(source.shape[-1] - size[1] + 1, (1,), generator=gen))
            crops.append(source[:, top : top + size[0], left : left + size[1]])
            names.append(name)
    return torch.stack(crops).contiguous().float(), names


def cover(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upscale (1, H, W) bilinearly, aspect kept, until it covers `size`; unchanged when it already does."""
    h, w = image.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    if scale <= 1.0:
        return image
    new_hw = (max(size[0], int(np.ceil(h * scale))), max(size[1], int(np.ceil(w * scale))))
    return F.interpolate(image[None], size=new_hw, mode="bilinear", align_corners=False)[0]


class SkimageCrops(Dataset):
    """Random (training) or fixed (validation) crops of size (H, W) from scikit-image pictures."""

    def __init__(
        self,
        split: Literal["train", "val"] = "train",
        crop_size: tuple[int, int] | list[int] = (201, 201),
        samples_per_epoch: int = 256,
        val_images: tuple[str, ...] | list[str] = DEFAULT_VAL_IMAGES,
        images: tuple[str, ...] | list[str] = ALL_IMAGES,
        seed: int = 0,
        flips: bool = True,
        augment: bool = False,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; allowed: train, val")
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"crop_size must be (H, W) with positive sides; got {crop_size!r}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1; got {samples_per_epoch}")
        held_out_for_test = sorted((set(images) | set(val_images)) & set(HELDOUT_IMAGES))
        if held_out_for_test:
            raise ValueError(f"{held_out_for_test} are held out for the quality report; no split may read them")
        unknown = sorted((set(images) | set(val_images)) - set(ALL_IMAGES))
        if unknown:
            raise ValueError(f"unknown image(s) {unknown}; available: {', '.join(ALL_IMAGES)}")
        held_out = set(val_images)
        names = [n for n in images if (n in held_out) == (split == "val")]
        if not names:
            raise ValueError(f"the {split} split is empty (images={list(images)}, val_images={list(val_images)})")
        self.split = split
        self.names = names
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))
        self.samples_per_epoch = int(samples_per_epoch)
        self.seed = int(seed)
        self.flips = flips and split == "train"
        self.augment = augment and split == "train"
        self.epoch = 0
        self._sources = [cover(torch.from_numpy(load_image(n))[None], self.crop_size) for n in names]

    def set_epoch(self, epoch: int) -> None:
        """Training crops depend on the epoch (validation crops never do)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def _generator(self, index: int) -> torch.Generator:
        epoch = self.epoch if self.split == "train" else -1
        seed = (self.seed * 1_000_003 + (epoch + 2) * 7_919 + index * 104_729) % (2**63 - 1)
        return torch.Generator().manual_seed(seed)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.samples_per_epoch:
            raise IndexError(index)
        gen = self._generator(index)
        source = (
            self._sources[index % len(self._sources)]
            if self.split == "val"
            else self._sources[int(torch.randint(len(self._sources), (1,), generator=gen))]
        )
        if self.augment:
            crop = random_scaled_crop(source, self.crop_size, gen, AUGMENT.scale)
            return {"image": augment_crop(crop, gen, AUGMENT).contiguous().float()}
        h, w = self.crop_size
        top = int(torch.randint(source.shape[-2] - h + 1, (1,), generator=gen))
        left = int(torch.randint(source.shape[-1] - w + 1, (1,), generator=gen))
        crop = source[:, top : top + h, left : left + w]
        if self.flips:
            if bool(torch.randint(2, (1,), generator=gen)):
                crop = crop.flip(-1)
            if bool(torch.randint(2, (1,), generator=gen)):
                crop = crop.flip(-2)
        return {"image": crop.contiguous().float()}
