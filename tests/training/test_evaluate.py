"""The held-out quality report: data no training run reads, and `python -m training evaluate` on a tiny store."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.schemas.manifest import Manifest
from app.schemas.store_format import verify_version
from training.__main__ import main
from training.config import TrainConfig
from training.data.images import ALL_IMAGES, HELDOUT_IMAGES, SkimageCrops, heldout_crops, load_image
from training.data.layouts import HELDOUT_SEED, DesignLayouts
from training.data.patches import heldout_patches, source_names
from training.data.stem_4d import ASSET_PATH, HELDOUT_PATH, Stem4DDataset
from training.registry import create_model
from training.store import write_version
from training.tasks import task_for_model


def test_heldout_pictures_never_reach_the_training_data() -> None:
    assert not set(HELDOUT_IMAGES) & set(ALL_IMAGES)
    train = SkimageCrops("train", (64, 64), samples_per_epoch=4)
    val = SkimageCrops("val", (64, 64), samples_per_epoch=4)
    assert not set(HELDOUT_IMAGES) & (set(train.names) | set(val.names))
    with pytest.raises(ValueError, match="held out for the quality report"):
        SkimageCrops("train", (64, 64), images=(*ALL_IMAGES, HELDOUT_IMAGES[0]))
    with pytest.raises(ValueError, match="held out for the quality report"):
        load_image(HELDOUT_IMAGES[0])
    # the V3 task's data sets, even when a run names a held-out picture for validation
    model = create_model("v3_tiny", input_size=[32, 32], use_attention=False)
    config = TrainConfig(model="v3_tiny", data={"samples_per_epoch": 2, "val_images": [HELDOUT_IMAGES[-1]]})
    with pytest.raises(ValueError, match="held out"):
        task_for_model(model).datasets(model, config)
    train_set, _ = task_for_model(model).datasets(model, TrainConfig(model="v3_tiny", data={"samples_per_epoch": 2}))
    assert not set(HELDOUT_IMAGES) & set(train_set.names)
    crops, sources = heldout_crops((32, 32), per_image=2)
    assert crops.shape == (2 * len(HELDOUT_IMAGES), 1, 32, 32) and sources[::2] == list(HELDOUT_IMAGES)
    assert torch.equal(crops, heldout_crops((32, 32), per_image=2)[0]), "held-out crops are fixed"


def test_heldout_patches_layouts_and_scans_are_apart_from_training() -> None:
    names = set(source_names("train")) | set(source_names("val"))
    assert not set(HELDOUT_IMAGES) & names
    patches = heldout_patches(28, scales=(0.25,))
    assert patches.shape[1:] == (1, 28, 28) and len(patches) > 50
    with pytest.raises(ValueError, match="reserved for the held-out"):
        DesignLayouts(seed=HELDOUT_SEED)
    held = DesignLayouts.heldout(size=16, length=2)
    assert held.seed == HELDOUT_SEED and held[0]["image"].shape == (3, 16, 16)
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="held-out test set"):
            Stem4DDataset(split, HELDOUT_PATH)
    heldout, full = Stem4DDataset("all", HELDOUT_PATH), Stem4DDataset("all", ASSET_PATH)
    step, origin = full.metadata["scan_step_A"], heldout.metadata["scan_origin_A"]
    held_positions = origin + heldout.positions * heldout.metadata["scan_step_A"]
    offsets = np.abs(held_positions / step - np.round(held_positions / step))
    assert offsets.min() > 0.4, "no held-out position is on the training/validation grid"
    assert heldout.metadata["intensity_max"] == full.metadata["intensity_max"]   # scaled like training
    assert len(heldout) == 3 * 8 * 8


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("quality") / "store"
    torch.manual_seed(0)
    v3 = create_model("v3_tiny", input_size=[32, 32], latent_strategy="conv", use_attention=False)
    write_version(v3.eval(), store, "v3-tiny", "1", formats=["onnx"], training={"steps": 0})
    droplets = {"train_config": {"seed": 0, "data": {"source": "droplets", "video_frames": 8}}}
    write_version(v3.eval(), store, "v3-droplet-tiny", "1", formats=["onnx"], training=droplets)
    vae = create_model("conv_decoder_vae")
    write_version(vae.eval(), store, "vae", "1", formats=["onnx"])
    return store


@pytest.mark.slow
def test_evaluate_writes_heldout_metrics_and_the_manifest_still_verifies(tiny_store, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    assert main(["evaluate", "--store", str(tiny_store), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| v3-tiny |" in printed and "bicubic" in printed and "goals:" in printed
    report = json.loads((out / "quality.json").read_text())["models"]
    assert set(report) == {"v3-tiny", "v3-droplet-tiny", "vae"}
    for name in report:
        manifest = verify_version(tiny_store / name / "1")       # checksums still hold
        heldout = manifest.metrics["heldout"]
        assert heldout["data"]["items"] > 0 and manifest.training["heldout_data"] == heldout["data"]
        assert heldout["goal"]["status"] in ("PASS", "MISS")
        model, baseline = heldout["methods"]["model"], heldout["methods"][heldout["goal"]["baseline"]]
        assert model["values"] == manifest.ops["encode"].outputs[0].shape[-1] and baseline["values"] > 0
        assert 0 < model["psnr"] < 100 and -1 <= model["ssim"] <= 1
        assert all((out / p.split("/")[-1]).is_file() for p in heldout["figures"])
    assert report["v3-tiny"]["data"]["pictures"] == list(HELDOUT_IMAGES)
    for name in ("v3-tiny", "v3-droplet-tiny"):  # the render bound and the linear reference explain a miss
        bound, linear = report[name]["references"].values()
        assert bound["values"] == 32 * 32 and linear["values"] == 128
        assert bound["psnr"] >= linear["psnr"] > 0
    assert "reference: PCA-128 at 32x32" in printed and "not a goal" in printed
    (vae_linear,) = report["vae"]["references"].values()  # the best linear code of the VAE's 32 values
    assert vae_linear["values"] == 32 and 10 < vae_linear["psnr"] < 40
    assert "lstm-heldout" in report["v3-droplet-tiny"]["data"]["split"]
    assert report["vae"]["methods"]["model"]["kl_nats"] >= 0 and (out / "vae-samples.png").is_file()
    assert main(["evaluate", "--store", str(tiny_store), "--out", str(out), "--only", "nope"]) == 2


def test_manifests_without_metrics_stay_valid() -> None:
    fields = Manifest.model_fields
    assert "metrics" in fields and not fields["metrics"].is_required()
