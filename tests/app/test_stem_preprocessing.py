"""Raw 4D-STEM detector frames: `Preprocessing.intensity`/`.pattern`, `app.preprocess.RawDetector` and the
HTTP path (uint16/uint32 counts or float intensities of any size, `?angular_sampling_mrad=`)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from pydantic import ValidationError

from app import codecs
from app.errors import InvalidInput
from app.image_headers import read_header
from app.preprocess import RawDetector, log_scale, raw_detector, rebin_matrix
from app.schemas.manifest import IntensityScaling, PatternGeometry, Preprocessing
from tests.app.conftest import assert_error, make_settings, npy_bytes

SAMPLING = 1.6
SCALING = IntensityScaling(i_max=0.01, dynamic_range=1e4)
PATTERN = PatternGeometry(size=(16, 16), angular_sampling_mrad=(SAMPLING, SAMPLING))
RAW = Preprocessing(input_size=(16, 16), intensity=SCALING, pattern=PATTERN)


def test_rebinning_is_a_crop_at_the_models_sampling_and_conserves_counts() -> None:
    crop = rebin_matrix(16, SAMPLING, 24, SAMPLING)
    np.testing.assert_array_equal(crop, np.eye(24)[4:20])       # zero angle at pixel 12 -> model pixel 8
    finer = rebin_matrix(16, SAMPLING, 64, SAMPLING / 2)
    assert np.allclose(finer.sum(axis=1), 2.0)                  # two detector pixels per model pixel
    counted = finer.sum(axis=0)                                 # model field -13.6..12 mrad = detector -17..15
    np.testing.assert_allclose(counted[16:47], 1.0)             # each detector pixel inside is counted once,
    np.testing.assert_allclose(counted[[15, 47]], 0.5)          # those on the edges by half,
    assert counted[:15].sum() == counted[48:].sum() == 0        # those outside not at all
    coarser = rebin_matrix(16, SAMPLING, 10, 3 * SAMPLING)
    np.testing.assert_allclose(coarser.sum(axis=1), 1 / 3)      # a third of a detector pixel each


def test_log_scale_matches_its_formula() -> None:
    intensity = np.array([-1.0, 0.0, 1e-6, 1e-3, 0.01, 0.5], dtype=np.float32)
    eps = 0.01 / 1e4
    want = np.minimum(np.log1p(np.clip(intensity.astype(np.float64), 0, None) / eps) / np.log1p(1e4), 1)
    np.testing.assert_allclose(log_scale(intensity, SCALING), want, atol=1e-6)


def test_schema_needs_a_pattern_of_the_input_size_for_an_intensity_scaling() -> None:
    with pytest.raises(ValidationError):
        Preprocessing(input_size=(16, 16), intensity=SCALING)
    with pytest.raises(ValidationError):
        Preprocessing(input_size=(32, 32), intensity=SCALING, pattern=PATTERN)
    with pytest.raises(ValidationError):
        IntensityScaling(i_max=0.0, dynamic_range=10)
    assert Preprocessing().intensity is None and Preprocessing().pattern is None   # older manifests


def test_query_parameters() -> None:
    assert raw_detector(Preprocessing(input_size=(16, 16)), {"angular_sampling_mrad": "x"}) is None
    assert raw_detector(RAW, {"intensity": "scaled"}) is None
    detector = raw_detector(RAW, {"angular_sampling_mrad": "1.2,1.3", "counts_per_probe": "5e6"})
    assert detector.sampling_mrad == (1.2, 1.3) and detector.counts_per_probe == 5e6
    assert raw_detector(RAW, {"angular_sampling_mrad": "1.2"}).sampling_mrad == (1.2, 1.2)
    for query, field in [({"angular_sampling_mrad": "abc"}, "angular_sampling_mrad"),
                         ({"angular_sampling_mrad": "-1"}, "angular_sampling_mrad"),
                         ({"angular_sampling_mrad": "1,2,3"}, "angular_sampling_mrad"),
                         ({"angular_sampling_mrad": "nan"}, "angular_sampling_mrad"),
                         ({"counts_per_probe": "0"}, "counts_per_probe"),
                         ({"intensity": "log"}, "intensity")]:
        with pytest.raises(InvalidInput) as info:
            raw_detector(RAW, query)
        assert info.value.field == field


def test_frame_sampling_is_needed_when_the_size_differs_and_must_cover_the_models_field() -> None:
    assert RawDetector(SCALING, PATTERN).model_size((16, 16), 1) == (16, 16)
    with pytest.raises(InvalidInput) as info:
        RawDetector(SCALING, PATTERN).model_size((20, 20), 1)
    assert (info.value.field, info.value.code) == ("angular_sampling_mrad", "angular_sampling_required")
    for sampling, have in [((1.0, 1.0), (20, 20)),          # covers +-10 mrad, the model +-13.6
                           ((SAMPLING, 0.5), (16, 40)),     # kx too narrow
                           ((7.0, 7.0), (8, 8))]:           # coarser than 4 model pixels
        with pytest.raises(InvalidInput) as info:
            RawDetector(SCALING, PATTERN, sampling).model_size(have, 1)
        assert (info.value.field, info.value.code) == ("angular_sampling_mrad", "angular_sampling_out_of_range")
    assert RawDetector(SCALING, PATTERN, (1.0, 1.0)).model_size((28, 28), 1) == (16, 16)
    with pytest.raises(InvalidInput):
        RawDetector(SCALING, PATTERN).model_size((16, 16), 3)   # RGB is no detector frame


def test_counts_default_to_the_frames_total_and_floats_to_probe_fractions() -> None:
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 5000, (1, 16, 16)).astype(np.uint16)
    by_total = RawDetector(SCALING, PATTERN).prepare(counts)
    given = RawDetector(SCALING, PATTERN, counts_per_probe=float(counts.sum())).prepare(counts)
    np.testing.assert_allclose(by_total, given, atol=1e-7)
    floats = counts.astype(np.float32) / counts.sum()
    np.testing.assert_allclose(RawDetector(SCALING, PATTERN).prepare(floats), given, atol=1e-6)
    with pytest.raises(InvalidInput):
        RawDetector(SCALING, PATTERN).prepare(np.zeros((1, 16, 16), np.uint16))


def test_codecs_keep_integer_counts_for_raw_frames() -> None:
    counts = np.arange(2 * 5 * 6, dtype=np.uint32).reshape(2, 5, 6) * 1000
    data = npy_bytes(counts)
    frames = list(codecs.iter_frames(data, read_header(data, "file", 16), "file", False))
    assert [f.dtype for f in frames] == [np.uint32] * 2 and np.array_equal(frames[1][0], counts[1])
    scaled = list(codecs.iter_frames(data, read_header(data, "file", 16)))
    assert scaled[0].dtype == np.float32 and scaled[1].max() <= 1.0


# ------------------------------------------------------------------------------------------------ HTTP
@pytest.fixture(scope="module")
def stem_service(tmp_path_factory):
    """A service over a store holding a tiny STEM autoencoder written by `training` (its preprocessing
    carries the SrTiO3 data's raw-detector normalisation), the eager model and the data's metadata."""
    torch = pytest.importorskip("torch")
    from fastapi.testclient import TestClient

    from app.main import create_app
    from training.data.stem_4d import ASSET_PATH
    from training.registry import create_model
    from training.store import write_version

    store = tmp_path_factory.mktemp("stem_store")
    torch.manual_seed(0)
    model = create_model("stem_ae", channels=2, latent_dim=4).eval()
    write_version(model, store, "stem-tiny", "1", formats=["onnx"], max_batch_size=8)
    with np.load(ASSET_PATH, allow_pickle=False) as data:
        metadata = json.loads(str(data["metadata"]))
        stored = data["patterns"][0, 0, :3]
    with TestClient(create_app(make_settings(store))) as client:
        yield client, model, stored, metadata


def _post(client, array: np.ndarray, **params):
    return client.post("/v1/models/stem-tiny/encode", content=npy_bytes(array),
                       params={"format": "npy", **params}, headers={"content-type": "application/x-npy"})


def test_uint16_counts_of_another_size_give_the_training_pipelines_latents(stem_service) -> None:
    import torch

    from training.data.stem_4d import _central_crop, log_scale, stored_intensities

    client, model, stored, metadata = stem_service
    sampling = float(metadata["angular_sampling_mrad"][0])
    frames = np.zeros((3, 80, 80))
    frames[:, 8:72, 8:72] = stored_intensities(stored, metadata)            # zero angle at pixel 40
    counts_per_probe = float(60000 / frames.max())
    counts = np.round(frames * counts_per_probe).astype(np.uint16)
    coords = (np.arange(80) - 40) * sampling
    model_input = log_scale(_central_crop(counts / counts_per_probe, [coords, coords]),
                            metadata["params"]["dynamic_range"], metadata["intensity_max"])[:, None]
    response = _post(client, counts, angular_sampling_mrad=repr(sampling), counts_per_probe=repr(counts_per_probe))
    assert response.status_code == 200, response.text
    latents = np.load(io.BytesIO(response.content))
    scaled = np.load(io.BytesIO(_post(client, model_input.astype(np.float32), intensity="scaled").content))
    np.testing.assert_allclose(latents, scaled, atol=1e-5, rtol=0)
    with torch.no_grad():
        eager = model.embed(torch.from_numpy(model_input.astype(np.float32))).numpy()
    np.testing.assert_allclose(latents, eager, atol=1e-4, rtol=0)


def test_other_sizes_need_an_angular_sampling_in_range(stem_service) -> None:
    client = stem_service[0]
    counts = np.ones((1, 80, 80), np.uint16)
    assert_error(_post(client, counts), 422, field="angular_sampling_mrad", code="angular_sampling_required")
    assert_error(_post(client, counts, angular_sampling_mrad="0.5"), 422, field="angular_sampling_mrad",
                 code="angular_sampling_out_of_range")
    assert_error(_post(client, counts, angular_sampling_mrad="abc"), 422, field="angular_sampling_mrad")
    assert_error(_post(client, counts, angular_sampling_mrad="1.6", intensity="log"), 422, field="intensity")
    assert _post(client, counts, angular_sampling_mrad="1.6").status_code == 200
    assert _post(client, np.ones((1, 64, 64), np.float32)).status_code == 200      # the model's own grid
