"""Raw detector frames and the second specimen: the STEM family records its input normalisation in the
manifest, the service's `RawDetector` reproduces the training pipeline from raw intensities or counts of
any size, and the held-out Au [110] scan is evaluated through it (`training.quality.cross_material`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from app.preprocess import RawDetector
from app.schemas.manifest import Preprocessing
from training.data.stem_4d import (
    ASSET_PATH,
    PATTERN_SIZE,
    Stem4DDataset,
    _central_crop,
    log_scale,
    raw_preprocessing,
    stored_intensities,
)
from training.data.stem_au110 import AU110_PATH, raw_intensities
from training.quality.artifacts import StoreVersion
from training.quality.baselines import SubspaceBaseline
from training.quality.cross_material import DROP_TARGET_DB, au110_model_input, evaluate_cross_material
from training.quality.evaluation import Evaluation
from training.quality.report import format_table
from training.registry import create_model
from training.store import write_version


@pytest.fixture(scope="module")
def srtio3() -> tuple[np.ndarray, dict]:
    """The first 24 committed SrTiO3 patterns as raw intensities, and the file's metadata."""
    with np.load(ASSET_PATH, allow_pickle=False) as data:
        stored = data["patterns"].reshape(-1, PATTERN_SIZE, PATTERN_SIZE)[:24]
        metadata = json.loads(str(data["metadata"]))
    return stored_intensities(stored, metadata), metadata


def _embed(patterns: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """Patterns (N, 64, 64) inside larger (N, size, size) frames, zero angle at pixel size // 2 as abTEM puts
    it; the ring outside holds other (random) intensities."""
    rng = np.random.default_rng(seed)
    frames = rng.uniform(0, patterns.max(), (len(patterns), size, size))
    start = size // 2 - PATTERN_SIZE // 2
    frames[:, start : start + PATTERN_SIZE, start : start + PATTERN_SIZE] = patterns
    return frames


def _training_pipeline(frames: np.ndarray, metadata: dict) -> np.ndarray:
    """What `training.data.stem_4d` does to simulated intensities: central crop, global log scaling."""
    coords = (np.arange(frames.shape[-1]) - frames.shape[-1] // 2) * metadata["angular_sampling_mrad"][0]
    cropped = _central_crop(frames, [coords, coords])
    return log_scale(cropped, metadata["params"]["dynamic_range"], metadata["intensity_max"])


def test_the_family_records_its_training_normalisation(srtio3) -> None:
    _, metadata = srtio3
    prep = Preprocessing(**create_model("stem_ae", channels=2).preprocessing())
    assert prep.intensity.kind == "log_global" and prep.intensity.i_max == metadata["intensity_max"]
    assert prep.intensity.dynamic_range == metadata["params"]["dynamic_range"] and prep.intensity.floor == 0
    assert prep.pattern.size == prep.input_size == (PATTERN_SIZE, PATTERN_SIZE)
    assert prep.pattern.angular_sampling_mrad == tuple(metadata["angular_sampling_mrad"])
    recorded = Preprocessing(input_size=(PATTERN_SIZE, PATTERN_SIZE), **raw_preprocessing())
    assert (recorded.intensity, recorded.pattern) == (prep.intensity, prep.pattern)
    # another input size than the data's: no raw-detector fields (the service keeps [0, 1] images)
    other = Preprocessing(**create_model("stem_ae", channels=2, out_shape=[32, 32]).preprocessing())
    assert other.intensity is None and other.pattern is None


def test_raw_frames_give_the_training_pipelines_model_input(srtio3) -> None:
    intensities, metadata = srtio3
    prep = Preprocessing(**create_model("stem_ae", channels=2).preprocessing())
    stored = Stem4DDataset("all").images[:24, 0].numpy()
    expected = _training_pipeline(intensities, metadata)
    assert np.abs(expected - stored).max() <= 0.5 / 4095 + 1e-6   # the stored file is this, quantised
    sampling = tuple(metadata["angular_sampling_mrad"])
    for size in (64, 96, 131):
        frames = _embed(intensities, size).astype(np.float32)
        want = _training_pipeline(frames.astype(np.float64), metadata)
        detector = RawDetector(prep.intensity, prep.pattern, None if size == 64 else sampling)
        got = np.stack([detector.prepare(frame[None])[0] for frame in frames])
        assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-5, size
    # uint32 counts with the probe's counts given, and by default each frame's own total
    counts = np.round(_embed(intensities, 96) * 1e9).astype(np.uint32)
    want = _training_pipeline(counts / 1e9, metadata)
    detector = RawDetector(prep.intensity, prep.pattern, sampling, counts_per_probe=1e9)
    got = np.stack([detector.prepare(frame[None])[0] for frame in counts])
    assert np.abs(got - want).max() <= 1e-5
    totals = counts.sum(axis=(1, 2), dtype=np.float64)
    want = _training_pipeline(counts / totals[:, None, None], metadata)
    got = np.stack([RawDetector(prep.intensity, prep.pattern, sampling).prepare(f[None])[0] for f in counts])
    assert np.abs(got - want).max() <= 1e-5


def test_the_au110_scan_is_another_specimen_held_out_and_small(srtio3) -> None:
    assert AU110_PATH.stat().st_size <= 2_000_000
    intensities, metadata = raw_intensities()
    srtio3_metadata = srtio3[1]
    assert "[110]" in metadata["material"] and "Au" in metadata["material"] and metadata["heldout"]
    assert intensities.shape == (2 * 8 * 8, 96, 96) and intensities.shape[-1] != PATTERN_SIZE
    model_sampling = srtio3_metadata["angular_sampling_mrad"][0]
    assert all(abs(s - model_sampling) > 0.2 for s in metadata["angular_sampling_mrad"])
    assert metadata["params"]["energy_eV"] == srtio3_metadata["params"]["energy_eV"]   # the same microscope
    for split in ("train", "val"):
        with pytest.raises(ValueError, match="held-out test set"):
            Stem4DDataset(split, AU110_PATH)
    assert "python -m training.data.stem_au110" in metadata["command"]


@pytest.fixture(scope="module")
def tiny_stem(tmp_path_factory) -> StoreVersion:
    store = tmp_path_factory.mktemp("stem") / "store"
    torch.manual_seed(0)
    model = create_model("stem_ae", channels=2, latent_dim=4)
    path = write_version(model.eval(), store, "stem-tiny", "1", formats=["onnx"], max_batch_size=64)
    return StoreVersion.open(path)


def test_cross_material_evaluation_reports_the_drop(tiny_stem, tmp_path) -> None:
    images, sources, _ = au110_model_input(tiny_stem.manifest.preprocessing)
    assert images.shape == (128, 1, PATTERN_SIZE, PATTERN_SIZE) and images.min() >= 0 and images.max() <= 1
    assert len(set(sources)) == 2
    train = Stem4DDataset("train").images[::8].numpy()
    baselines = {"PCA-4": SubspaceBaseline("pca", 4).fit(train)}
    methods = {"model": {"values": 4, "psnr": 20.0, "ssim": 0.5}, "PCA-4": {"values": 4, "psnr": 25.0, "ssim": 0.7}}
    reference = Evaluation({"items": 1, "name": "scan positions"}, methods)
    cross = evaluate_cross_material(tiny_stem, baselines, reference, tmp_path)
    assert cross["data"]["items"] == 128 and "Au (fcc" in cross["data"]["what"] and "[110]" in cross["data"]["what"]
    assert cross["data"]["raw_preprocessing_from"].startswith("manifest")
    model_psnr = cross["methods"]["model"]["psnr"]
    pca_psnr = cross["methods"]["PCA-4"]["psnr"]
    assert cross["psnr_drop_db"] == {"model": round(20.0 - model_psnr, 2), "PCA-4": round(25.0 - pca_psnr, 2)}
    goal = cross["goal"]
    assert goal["target_db"] == DROP_TARGET_DB and goal["status"] == ("PASS" if goal["drop_db"] < 3 else "MISS")
    assert (tmp_path / "stem-tiny-au110.png").is_file()
    record = {**reference.to_json(), "goal": None, "cross_material": cross}
    table = format_table({"stem-tiny": record})
    assert "128 Au [110] patterns" in table and f"drop {goal['drop_db']:.2f} dB from 20.00" in table
