"""app.store and the lifespan: version order, verification, strict mode, warm-up sizes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.lifespan import StartupError, warmup_batch_sizes
from app.main import create_app
from app.store import ModelRecord, load_model, scan_store, version_key
from tests.app.conftest import make_settings


def test_version_key_is_numeric():
    assert sorted(["10", "9", "2", "1.10", "1.9"], key=version_key) == ["1.9", "1.10", "2", "9", "10"]
    assert max(["v2", "v10"], key=version_key) == "v10"


def test_scan_picks_newest_version_and_ignores_files(store: Path):
    records = {r.name: r for r in scan_store(store)}
    assert records["tiny-ae"].version == "10"
    assert set(records) == {"tiny-ae", "tiny-dyn", "tiny-render", "tiny-ddim", "tiny-broken"}
    assert scan_store(store / "missing") == []


def test_sha256_mismatch_makes_the_model_unavailable(store: Path, caplog):
    record = ModelRecord("tiny-broken", "1", store / "tiny-broken" / "1")
    load_model(record, make_settings(store))
    assert record.state == "unavailable" and "sha256 mismatch" in record.reason
    assert record.runtimes == {}
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "model tiny-broken/1 unavailable: artifact encode.onnx sha256 mismatch: " in "\n".join(logged)


def _copy(store: Path, tmp_path: Path, model: str) -> Path:
    shutil.copytree(store / model, tmp_path / model)
    return tmp_path / model / next(p.name for p in (tmp_path / model).iterdir())


def test_size_mismatch_missing_file_and_bad_manifest(store: Path, tmp_path: Path):
    version = _copy(store, tmp_path, "tiny-dyn")
    (version / "encode.onnx").write_bytes((version / "encode.onnx").read_bytes() + b"x")
    record = ModelRecord("tiny-dyn", "1", version)
    load_model(record, make_settings(tmp_path))
    assert "bytes, manifest says" in record.reason
    (version / "encode.onnx").unlink()
    record = ModelRecord("tiny-dyn", "1", version)
    load_model(record, make_settings(tmp_path))
    assert "missing" in record.reason
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["capabilities"] = ["teleport"]
    (version / "manifest.json").write_text(json.dumps(manifest))
    record = ModelRecord("tiny-dyn", "1", version)
    load_model(record, make_settings(tmp_path))
    assert record.reason.startswith("manifest invalid at capabilities")


def test_artifact_path_cannot_escape_the_version_dir(store: Path, tmp_path: Path):
    version = _copy(store, tmp_path, "tiny-render")
    manifest = json.loads((version / "manifest.json").read_text())
    manifest["artifacts"][0]["path"] = manifest["ops"]["decode"]["artifacts"]["onnx"] = "../../x.onnx"
    (version / "manifest.json").write_text(json.dumps(manifest))
    record = ModelRecord("tiny-render", "1", version)
    load_model(record, make_settings(tmp_path))
    assert "outside its version directory" in record.reason


def test_strict_startup_fails_on_a_broken_model(store: Path):
    with (
        pytest.raises(StartupError, match="tiny-broken"),
        TestClient(create_app(make_settings(store, strict=True))),
    ):
        pass


def test_lenient_startup_without_warmup_serves_the_rest(store: Path, tmp_path: Path):
    _copy(store, tmp_path, "tiny-render")
    _copy(store, tmp_path, "tiny-broken")
    with TestClient(create_app(make_settings(tmp_path, warmup=False, load_in_background=False))) as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/models/tiny-render/decode?format=npy").status_code == 200
        states = {m["name"]: m["state"] for m in client.get("/v1/models").json()["models"]}
        assert states == {"tiny-render": "ready", "tiny-broken": "unavailable"}
    assert client.app.state.ready is False  # drained and stopped


def test_warmup_batch_sizes():
    assert warmup_batch_sizes(1) == [1]
    assert warmup_batch_sizes(8) == [1, 2, 4, 8]
    assert warmup_batch_sizes(12) == [1, 2, 4, 8, 12]


def test_warm_up_stops_growing_batches_once_a_run_is_slow(store: Path):
    """A slow op (e.g. a 44 GMAC/image decoder on CPU) is warmed at batch 1 only, not up to the max."""
    import time

    from app.lifespan import warm_up

    record = next(r for r in scan_store(store) if r.name == "tiny-ae")
    load_model(record, make_settings(store))
    batches: list[int] = []

    class SlowRuntime:
        def __init__(self, inner):
            self.inner = inner

        def run(self, inputs):
            batches.append(next(iter(inputs.values())).shape[0] if inputs else 0)
            time.sleep(0.05)
            return self.inner.run(inputs)

    record.runtimes = {name: SlowRuntime(rt) for name, rt in record.runtimes.items()}
    record.saliency = None
    warm_up(record, make_settings(store, warmup_max_run_s=0.01))
    assert batches and set(batches) == {1}
    batches.clear()
    warm_up(record, make_settings(store, warmup_max_run_s=0))
    assert max(batches) == 8  # every power of two up to max_batch_size when the limit is off
