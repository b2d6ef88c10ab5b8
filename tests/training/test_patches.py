"""Patches of the scikit-image images and LFW faces: shapes, value range, determinism, split by source."""

from __future__ import annotations

import pytest
import torch

from training.data.patches import SCENES, ImagePatches, build_patches, source_names


@pytest.fixture(scope="module")
def small_sets() -> dict[str, torch.Tensor]:
    return {split: build_patches(split, 28, scales=(0.25,)) for split in ("train", "val")}


def test_items_are_grayscale_unit_range_patches() -> None:
    for size in (28, 32):
        data = ImagePatches("val", patch_size=size, scales=(0.25,))
        item = data[0]
        assert set(item) == {"image"}
        assert item["image"].shape == (1, size, size) and item["image"].dtype == torch.float32
        assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
        assert float(data.images.std()) > 0.1  # real image content, not a constant


def test_build_is_deterministic(small_sets: dict[str, torch.Tensor]) -> None:
    assert torch.equal(build_patches("val", 28, scales=(0.25,)), small_sets["val"])


def test_split_is_by_source_image(small_sets: dict[str, torch.Tensor]) -> None:
    train, val = set(source_names("train")), set(source_names("val"))
    assert not train & val
    assert len(train | val) == len(SCENES) + 200  # every scene and every LFW face is used once
    assert {"chelsea", "gravel", "retina"} <= val and "camera" in train
    assert sum(name.startswith("lfw_") for name in val) == 40
    # No validation patch appears verbatim in the training split.
    flat_train = small_sets["train"].flatten(1)
    flat_val = small_sets["val"].flatten(1)
    assert torch.cdist(flat_val, flat_train).min() > 1e-3
    assert len(small_sets["train"]) > 3 * len(small_sets["val"]) > 0


def test_faces_and_scales_contribute(small_sets: dict[str, torch.Tensor]) -> None:
    without_faces = build_patches("val", 28, scales=(0.25,), include_faces=False)
    assert len(small_sets["val"]) - len(without_faces) == 40  # one patch per validation face
    two_scales = build_patches("val", 28, scales=(0.25, 0.5), include_faces=False)
    assert len(two_scales) > 3 * len(without_faces)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(split="test"), "split='test' is not supported; allowed values: train, val"),
    (dict(patch_size=2), "patch_size must be an integer >= 4"),
    (dict(scales=(1.5,)), "scales must be"),
    (dict(val_every=1), "val_every must be an integer >= 2"),
])
def test_invalid_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_patches(**kwargs)
