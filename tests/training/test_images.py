"""scikit-image crops for the V3 autoencoder: offline images, split by image, deterministic crops."""

from __future__ import annotations

import pytest
import torch

from training.data.images import ALL_IMAGES, DEFAULT_VAL_IMAGES, SkimageCrops, cover, load_image


def test_every_listed_image_loads_offline_as_unit_gray() -> None:
    for name in ALL_IMAGES:
        image = load_image(name)
        assert image.ndim == 2 and image.dtype.name == "float32", name
        assert image.min() >= 0.0 and image.max() <= 1.0 and image.std() > 0.01, name


def test_split_is_by_image_and_items_have_the_contract_shape() -> None:
    train = SkimageCrops("train", (201, 201), samples_per_epoch=4)
    val = SkimageCrops("val", (201, 201), samples_per_epoch=4)
    assert set(val.names) == set(DEFAULT_VAL_IMAGES) and not set(train.names) & set(val.names)
    item = train[0]["image"]
    assert item.shape == (1, 201, 201) and item.dtype == torch.float32
    assert float(item.min()) >= 0.0 and float(item.max()) <= 1.0


def test_crops_depend_on_seed_epoch_and_index_only() -> None:
    a = SkimageCrops("train", (152, 1280), samples_per_epoch=3, seed=1)
    b = SkimageCrops("train", (152, 1280), samples_per_epoch=3, seed=1)
    first = a[2]["image"]
    a[0], a[1]  # access order does not matter
    assert torch.equal(first, b[2]["image"]) and first.shape == (1, 152, 1280)
    b.set_epoch(1)
    assert not torch.equal(first, b[2]["image"])
    val = SkimageCrops("val", (64, 64), samples_per_epoch=3, seed=1)
    before = val[1]["image"]
    val.set_epoch(5)
    assert torch.equal(before, val[1]["image"]), "validation crops are fixed"


def test_small_images_are_upscaled_to_cover_the_crop() -> None:
    covered = cover(torch.rand(1, 102, 102), (152, 1280))
    assert covered.shape[-2] >= 152 and covered.shape[-1] >= 1280
    assert SkimageCrops(
        "train", (300, 300), images=("microaneurysms", "coins"), val_images=("coins",), samples_per_epoch=1
    )[0]["image"].shape == (1, 300, 300)


def test_bad_options_are_named() -> None:
    with pytest.raises(ValueError, match="unknown image"):
        SkimageCrops("train", (8, 8), images=("camera", "lena"))
    with pytest.raises(ValueError, match="split='test'"):
        SkimageCrops("test", (8, 8))
    with pytest.raises(ValueError, match="split is empty"):
        SkimageCrops("val", (8, 8), val_images=())
