"""Degraded service: no torch (saliency 501), deadline (504), full queue (429 + Retry-After), AOTI checks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import app.runtime.torch_export as torch_export
from app.main import create_app
from app.runtime.aoti import AotiRuntime, check_inputs
from app.runtime.base import RuntimeLoadError
from app.runtime.onnx import OnnxRuntime
from app.schemas.manifest import TensorSpec
from tests.app.conftest import make_settings, npy_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ae_only(store: Path, tmp_path: Path) -> Path:
    shutil.copytree(store / "tiny-ae" / "10", tmp_path / "tiny-ae" / "10")
    return tmp_path


def test_without_torch_attention_map_is_501_for_saliency_and_200_without(ae_only, monkeypatch):
    def no_torch():
        raise RuntimeLoadError("torch is not installed (pip install 'aeserve[torch]')")

    monkeypatch.setattr(torch_export, "import_torch", no_torch)
    image = npy_bytes(np.random.default_rng(0).random((1, 16, 16)).astype(np.float32))
    with TestClient(create_app(make_settings(ae_only, warmup=False, load_in_background=False))) as client:
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
    settings = make_settings(ae_only, warmup=False, load_in_background=False, request_timeout_s=1e-9)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/models/tiny-ae/reconstruct", content=image)
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "deadline_exceeded"


async def _fill_the_queue(app, image: bytes, running: threading.Event, release: threading.Event):
    """One request runs (blocked in the engine), one waits in the queue, a third finds it full."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://aeserve") as client:

            def post() -> Awaitable[httpx.Response]:
                return client.post("/v1/models/tiny-ae/reconstruct", content=image)

            engine = app.state.models.get("tiny-ae").engine
            try:
                first = asyncio.create_task(post())
                await _until(running.is_set)
                second = asyncio.create_task(post())
                await _until(lambda: engine.queued_items("reconstruct") == 1)
                refused = await post()
            finally:
                release.set()
            return refused, await first, await second


async def _until(condition, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_queue_full_is_429_with_retry_after(ae_only, monkeypatch):
    running, release = threading.Event(), threading.Event()
    run = OnnxRuntime.run

    def blocking_run(self, inputs):
        if self.path.name == "reconstruct.onnx":
            running.set()
            release.wait(timeout=30)
        return run(self, inputs)

    monkeypatch.setattr(OnnxRuntime, "run", blocking_run)
    image = npy_bytes(np.zeros((1, 16, 16), np.float32))
    app = create_app(make_settings(ae_only, warmup=False, load_in_background=False, max_queue_items=1,
                                   engine_instances=1))  # one batch in flight: the next one queues
    response, first, second = asyncio.run(_fill_the_queue(app, image, running, release))
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"] == {
        "code": "queue_full",
        "message": "queue for reconstruct holds 1 items",
        "field": "queue",
        "limit": 1,
    }
    assert first.status_code == 200 and second.status_code == 200


def test_aoti_inputs_are_checked():
    specs = [TensorSpec(name="image", shape=[-1, 1, 16, 16])]
    check_inputs({"image": np.ones((3, 1, 16, 16), np.float32)}, specs)
    with pytest.raises(ValueError, match="expected"):
        check_inputs({"image": np.ones((2, 1, 8, 8), np.float32)}, specs)
    with pytest.raises(ValueError, match="dtype"):
        check_inputs({"image": np.ones((4, 1, 16, 16), np.float64)}, specs)
    with pytest.raises(ValueError, match="missing"):
        check_inputs({}, specs)
    fixed = [TensorSpec(name="image", shape=[4, 1, 16, 16])]
    with pytest.raises(ValueError, match="expected"):  # a fixed batch is checked like every other axis
        check_inputs({"image": np.ones((3, 1, 16, 16), np.float32)}, fixed)


def test_aoti_runtime_checks_then_runs_the_package(tmp_path):
    pytest.importorskip("torch")
    specs = [TensorSpec(name="image", shape=[-1, 1, 16, 16])]
    seen = []

    def fake_package(path):
        def program(x):
            seen.append(tuple(x.shape))
            return (x * 2,)

        return program

    runtime = AotiRuntime(
        tmp_path / "m.pt2",
        inputs=specs,
        outputs=[TensorSpec(name="out", shape=[-1, 1, 16, 16])],
        device="cpu",
        loader=fake_package,
    )
    out = runtime.run({"image": np.ones((3, 1, 16, 16), np.float32)})
    assert seen == [(3, 1, 16, 16)]
    np.testing.assert_array_equal(out["out"], np.full((3, 1, 16, 16), 2.0, np.float32))
    with pytest.raises(ValueError, match="expected"):
        runtime.run({"image": np.ones((2, 1, 8, 8), np.float32)})
    assert seen == [(3, 1, 16, 16)]  # refused before the package ran


# A service process where every `import torch` fails, as where torch is not installed.
SERVE_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
import uvicorn
uvicorn.run("app.main:create_app", factory=True, uds=sys.argv[1], log_level="warning")
"""


@contextlib.contextmanager
def service_without_torch(store: Path) -> Iterator[httpx.Client]:
    """uvicorn in a subprocess (torch blocked) on a Unix socket; a client once it is ready."""
    with tempfile.TemporaryDirectory(prefix="aeserve") as folder:
        socket, log = Path(folder) / "s.sock", Path(folder) / "service.log"
        env = {**os.environ, "AESERVE_STORE": str(store), "AESERVE_WARMUP": "false", "PYTHONPATH": str(ROOT)}
        with log.open("wb") as output:
            process = subprocess.Popen(
                [sys.executable, "-c", SERVE_WITHOUT_TORCH, str(socket)],
                cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT,
            )
        transport = httpx.HTTPTransport(uds=str(socket))
        try:
            with httpx.Client(transport=transport, base_url="http://aeserve", timeout=30) as client:
                deadline = time.monotonic() + 60
                while not _ready(client, socket):
                    assert process.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.1)
                yield client
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ready(client: httpx.Client, socket: Path) -> bool:
    if not socket.exists():
        return False
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:  # bound but not yet listening
        return False


def test_service_without_torch_serves_onnx_and_refuses_saliency_with_501(ae_only):
    image = npy_bytes(np.random.default_rng(0).random((2, 16, 16)).astype(np.float32))
    with service_without_torch(ae_only) as client:
        summary = client.get("/v1/models/tiny-ae").json()
        assert summary["state"] == "ready" and summary["saliency"]["available"] is False
        assert "torch is not installed" in summary["saliency"]["reason"]
        assert set(summary["providers"].values()) == {"CPUExecutionProvider"}
        assert client.post("/v1/models/tiny-ae/encode", content=image).json()["shape"] == [2, 8]
        latents = {"latents": np.zeros((1, 8)).tolist()}
        assert client.post("/v1/models/tiny-ae/decode", json=latents).status_code == 200
        assert client.post("/v1/models/tiny-ae/reconstruct", content=image).status_code == 200
        assert client.post("/v1/models/tiny-ae/sample", json={"seed": 1}).status_code == 200
        refused = client.post("/v1/models/tiny-ae/attention-map", content=image)
        assert refused.status_code == 501
        error = refused.json()["error"]
        assert error["code"] == "saliency_unavailable" and error["field"] == "saliency"
        assert "torch is not installed" in error["message"] and "saliency=false" in error["message"]
        alone = client.post("/v1/models/tiny-ae/attention-map?saliency=false", content=image)
        assert alone.status_code == 200 and alone.json()["attention_shape"] == [2, 16, 16]
        assert alone.json()["saliency"] is None
