"""Degraded service: no torch (saliency 501), deadline (504), full queue (429 + Retry-After), AOTI checks."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

import app.runtime.torch_export as torch_export
from app.errors import QueueFull
from app.main import create_app
from app.runtime.aoti import AotiRuntime, check_inputs
from app.runtime.base import RuntimeLoadError
from app.schemas.manifest import TensorSpec
from tests.app.conftest import make_settings, npy_bytes


@pytest.fixture
def ae_only(store: Path, tmp_path: Path) -> Path:
    shutil.copytree(store / "tiny-ae" / "10", tmp_path / "tiny-ae" / "10")
    return tmp_path


def test_without_torch_attention_map_is_501_for_saliency_and_200_without(ae_only, monkeypatch):
    def no_torch():
        raise RuntimeLoadError("torch is not installed (pip install 'aeserve[torch]')")

    monkeypatch.setattr(torch_export, "import_torch", no_torch)
    image = npy_bytes(np.random.default_rng(0).random((1, 16, 16)).astype(np.float32))
    with TestClient(create_app(make_settings(ae_only, warmup=False))) as client:
        response = client.post("/v1/models/tiny-ae/attention-map", content=image)
        assert response.status_code == 501
        error = response.json()["error"]
        assert error["code"] == "saliency_unavailable" and error["field"] == "saliency"
        assert "torch is not installed" in error["message"] and "saliency=false" in error["message"]
        alone = client.post("/v1/models/tiny-ae/attention-map?saliency=false", content=image)
        assert alone.status_code == 200 and alone.json()["saliency"] is None
        summary = client.get("/v1/models/tiny-ae").json()["saliency"]
        assert summary["available"] is False and "torch" in summary["reason"]
        assert client.post("/v1/models/tiny-ae/reconstruct", content=image).status_code == 200


def test_deadline_is_504(ae_only):
    image = npy_bytes(np.zeros((1, 16, 16), np.float32))
    with TestClient(create_app(make_settings(ae_only, warmup=False, request_timeout_s=1e-9))) as client:
        response = client.post("/v1/models/tiny-ae/reconstruct", content=image)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"


def test_queue_full_is_429_with_retry_after(ae_only, monkeypatch):
    image = npy_bytes(np.zeros((1, 16, 16), np.float32))
    with TestClient(create_app(make_settings(ae_only, warmup=False))) as client:
        engine = client.app.state.models.get("tiny-ae").engine

        async def full(*args, **kwargs):
            raise QueueFull(
                "queue for reconstruct holds 1024 items",
                field="queue",
                limit=1024,
                headers={"Retry-After": "2"},
            )

        monkeypatch.setattr(engine, "submit", full)
        response = client.post("/v1/models/tiny-ae/reconstruct", content=image)
    assert response.status_code == 429 and response.headers["retry-after"] == "2"
    assert response.json()["error"] == {
        "code": "queue_full",
        "message": "queue for reconstruct holds 1024 items",
        "field": "queue",
        "limit": 1024,
    }


def test_aoti_inputs_are_checked_and_fixed_batches_padded(tmp_path):
    pytest.importorskip("torch")
    specs = [TensorSpec(name="image", shape=[4, 1, 16, 16])]
    seen = []

    def fake_package(path):
        def program(x):
            seen.append(tuple(x.shape))
            return (x * 2,)

        return program

    runtime = AotiRuntime(
        tmp_path / "m.pt2",
        inputs=specs,
        outputs=[TensorSpec(name="out", shape=[4, 1, 16, 16])],
        device="cpu",
        loader=fake_package,
    )
    out = runtime.run({"image": np.ones((3, 1, 16, 16), np.float32)})
    assert out["out"].shape == (3, 1, 16, 16) and seen == [(4, 1, 16, 16)]
    with pytest.raises(ValueError, match="expected"):
        runtime.run({"image": np.ones((2, 1, 8, 8), np.float32)})
    with pytest.raises(ValueError, match="dtype"):
        check_inputs({"image": np.ones((4, 1, 16, 16), np.float64)}, specs)
    with pytest.raises(ValueError, match="missing"):
        check_inputs({}, specs)
