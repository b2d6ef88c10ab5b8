"""The simulated SrTiO3 4D-STEM data set: committed file, split, quantisation, simulator, latent maps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from training.data.stem_4d import (
    ASSET_PATH,
    PATTERN_SIZE,
    SimulationParams,
    Stem4DDataset,
    build_srtio3,
    log_quantise,
    save_npz,
    split_mask,
)
from training.models.stem_autoencoder import StemAutoencoder, StemAutoencoderConfig
from training.visualize_stem import embed_scan, render_embedding_maps


@pytest.fixture(scope="module")
def committed() -> dict[str, np.ndarray]:
    assert ASSET_PATH.is_file(), f"{ASSET_PATH} is missing; run python -m training.data.stem_4d"
    with np.load(ASSET_PATH, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_committed_file_layout_and_metadata(committed: dict[str, np.ndarray]) -> None:
    patterns = committed["patterns"]
    assert patterns.dtype == np.uint16 and patterns.ndim == 5
    n_configs, sy, sx, h, w = patterns.shape
    assert (h, w) == (PATTERN_SIZE, PATTERN_SIZE) and (sy, sx) == tuple(committed["scan_shape"])
    assert 200 <= n_configs * sy * sx <= 5000
    meta = json.loads(str(committed["metadata"]))
    assert meta["params"]["quant_max"] == int(patterns.max()) == 4095
    assert len(meta["configs"]) == n_configs == len(committed["thickness_A"]) == len(committed["defocus_A"])
    assert {"abtem", "ase"} <= set(meta["software"]) and "command" in meta and "normalisation" in meta
    assert meta["angular_sampling_mrad"][0] == pytest.approx(1.6056, abs=1e-3)
    assert ASSET_PATH.stat().st_size < 6e6
    # the patterns vary over the scan (not one repeated pattern) and between configurations
    assert patterns[0].reshape(sy * sx, -1).std(axis=0).max() > 100
    assert np.abs(patterns[0].astype(int) - patterns[-1].astype(int)).max() > 100


def test_dataset_items_and_split(committed: dict[str, np.ndarray]) -> None:
    train, val = Stem4DDataset("train"), Stem4DDataset("val")
    n_configs = committed["patterns"].shape[0]
    n_positions = int(np.prod(committed["scan_shape"]))
    assert len(train) + len(val) == n_configs * n_positions
    assert 0.1 < len(val) / (len(train) + len(val)) < 0.3
    item = train[0]
    assert set(item) == {"image"}
    image = item["image"]
    assert image.shape == (1, 64, 64) and image.dtype == torch.float32
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    assert train.scan_shape == tuple(committed["scan_shape"])
    # no scan position is in both splits
    train_positions = {tuple(p) for p in train.positions}
    assert train_positions.isdisjoint({tuple(p) for p in val.positions})
    expected = committed["patterns"][train.configs[5], train.positions[5][0], train.positions[5][1]]
    torch.testing.assert_close(train[5]["image"][0], torch.from_numpy(expected / 4095.0).float())
    batch = next(iter(DataLoader(train, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 1, 64, 64)


def test_split_mask_tiles() -> None:
    val = split_mask((16, 16), "val", block=4)
    train = split_mask((16, 16), "train", block=4)
    assert not (val & train).any() and (val | train).all()
    assert val.sum() == 3 * 16                     # tiles (0,0), (1,2), (3,1)
    assert val[:4, :4].all() and val[4:8, 8:12].all() and val[12:16, 4:8].all()
    with pytest.raises(ValueError, match="split must be"):
        split_mask((4, 4), "test")


def test_all_split_and_config_selection(committed: dict[str, np.ndarray]) -> None:
    full = Stem4DDataset("all", configs=[1])
    sy, sx = full.scan_shape
    images = full.config_images(1)
    assert images.shape == (sy * sx, 1, 64, 64)
    expected = torch.from_numpy(committed["patterns"][1, 1, 2] / 4095.0).float()
    torch.testing.assert_close(images[sx + 2, 0], expected)
    with pytest.raises(ValueError, match="split='all'"):
        Stem4DDataset("val").config_images(0)
    with pytest.raises(ValueError, match="configs index"):
        Stem4DDataset("train", configs=[99])
    with pytest.raises(FileNotFoundError, match=r"training\.data\.stem_4d"):
        Stem4DDataset("train", path="/nonexistent/stem.npz")


def test_log_quantise() -> None:
    intensity = np.array([0.0, 1e-6, 1e-3, 2e-3])
    stored, i_max = log_quantise(intensity, dynamic_range=1e4, quant_max=4095)
    assert i_max == 2e-3 and stored.dtype == np.uint16
    assert stored[0] == 0 and stored[-1] == 4095
    eps = 2e-3 / 1e4
    expected = np.round(np.log1p(intensity / eps) / np.log1p(1e4) * 4095)
    np.testing.assert_array_equal(stored, expected)


def test_srtio3_structure_and_defects() -> None:
    pytest.importorskip("ase")
    atoms = build_srtio3(SimulationParams(thickness_cells=(2,), configs=None))
    symbols = atoms.get_chemical_symbols()
    assert symbols.count("La") == 2 and symbols.count("Sr") == 4 * 4 * 2 - 2
    assert symbols.count("O") == 3 * 32 - 1 and symbols.count("Ti") == 32
    clean = build_srtio3(SimulationParams(thickness_cells=(2,), configs=None, defects=False))
    assert len(clean) == 5 * 32


def test_simulation_and_npz_round_trip(tmp_path) -> None:
    pytest.importorskip("abtem")
    from training.data.stem_4d import simulate_4dstem

    params = SimulationParams(thickness_cells=(1, 2), defocus_A=(0.0,), configs=None, scan_gpts=2)
    result = simulate_4dstem(params)
    assert result["patterns"].shape == (2, 2, 2, 64, 64)
    np.testing.assert_allclose(result["thickness_A"], [3.905, 7.81])
    path = tmp_path / "tiny.npz"
    save_npz(result, path, command="test")
    data = Stem4DDataset("all", path=path)
    assert len(data) == 8 and data.scan_shape == (2, 2)
    assert data.metadata["command"] == "test"
    # the central (unscattered) disc is brighter than the corners
    image = data[0]["image"][0]
    assert image[28:36, 28:36].mean() > image[:8, :8].mean()


def test_render_embedding_maps(tmp_path) -> None:
    torch.manual_seed(0)
    model = StemAutoencoder(StemAutoencoderConfig(latent_dim=5, channels=8))
    patterns = torch.rand(12, 1, 64, 64)
    path = tmp_path / "maps.png"
    maps = render_embedding_maps(model, patterns, (3, 4), path, columns=3)
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert maps.shape == (5, 3, 4)
    model.eval()
    with torch.no_grad():
        expected = model.embed(patterns)
    np.testing.assert_allclose(maps[:, 1, 2], expected[1 * 4 + 2].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embed_scan(model, patterns[:, 0].numpy(), (3, 4)), maps, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="scan grid"):
        render_embedding_maps(model, patterns, (4, 4), path)
