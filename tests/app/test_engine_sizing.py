"""Issue 8 (speed): engines sized from the machine and shown in /v1/models, no CPU arena, quiet access log,
small payloads coded on the event loop, saliency programs loaded at first use, models loaded concurrently."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app import lifespan
from app.api import io as api_io
from app.main import create_app
from app.runtime import torch_export
from app.runtime.base import RuntimeLoadError
from app.runtime.onnx import OnnxRuntime, session_options
from app.runtime.threads import cgroup_cpu_limit, machine_cores, resolve_threads
from app.settings import Settings
from tests.app.conftest import make_settings, npy_bytes


@pytest.fixture
def own_store(store: Path, tmp_path: Path) -> Path:
    """Copies of tiny-ae, tiny-render, tiny-dyn and tiny-broken under version 77: the apps these tests start
    and stop set the readiness gauges of (model, "77"), not those of the session's shared client."""
    for name in ("tiny-ae", "tiny-render", "tiny-dyn", "tiny-broken"):
        source = max((store / name).iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)
        shutil.copytree(source, tmp_path / name / "77")
    return tmp_path


@pytest.fixture
def ae_only(own_store: Path) -> Path:
    for name in ("tiny-render", "tiny-dyn", "tiny-broken"):
        shutil.rmtree(own_store / name)
    return own_store


# ----------------------------------------------------------------------------------------------- threads
def test_cgroup_quota_caps_the_cores(tmp_path: Path):
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")
    assert cgroup_cpu_limit(quota) == 2  # 1.5 CPUs: two threads
    quota.write_text("max 100000\n")
    assert cgroup_cpu_limit(quota) is None
    assert cgroup_cpu_limit(tmp_path / "missing") is None


def test_threads_default_to_the_machine():
    assert Settings().intra_op_threads == 0
    assert resolve_threads(0) == machine_cores() >= 1
    assert resolve_threads(3) == 3


def test_onnx_sessions_are_sized_from_the_machine_without_an_arena(store: Path):
    path = store / "tiny-ae" / "10" / "encode.onnx"
    auto = OnnxRuntime(path, device="cpu")
    assert auto.threads == machine_cores() and auto.cpu_mem_arena is False
    assert auto.describe() == {"format": "onnx", "provider": "CPUExecutionProvider", "threads": machine_cores(),
                               "lone_batch_threads": None, "cpu_mem_arena": False}
    one = OnnxRuntime(path, device="cpu", intra_op_threads=1, cpu_mem_arena=True)
    assert one.threads == 1 and one.describe()["cpu_mem_arena"] is True
    np.testing.assert_allclose(auto.run({"image": np.ones((2, 1, 16, 16), np.float32)})["latent"],
                               one.run({"image": np.ones((2, 1, 16, 16), np.float32)})["latent"], atol=1e-6)
    import onnxruntime as ort

    assert session_options(ort, 2).enable_cpu_mem_arena is False
    assert session_options(ort, 2, cpu_mem_arena=True).enable_cpu_mem_arena is True


def test_models_list_says_how_each_engine_runs(client: TestClient):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    engine = models["tiny-ae"]["engine"]
    assert engine["instances"] == machine_cores() and engine["max_delay_ms"] == 5.0 and engine["idle_start"] is True
    encode = engine["ops"]["encode"]
    assert encode["threads"] == 1 and encode["max_batch_size"] == 8  # one core per instance
    assert encode["provider"] in ("CPUExecutionProvider", "CUDAExecutionProvider") and encode["format"] == "onnx"
    assert engine["saliency"]["format"] == "torch_export"
    assert models["tiny-broken"]["engine"] is None  # nothing loaded
    summary = client.get("/v1/models/tiny-ae").json()
    assert summary["engine"] == engine


# ----------------------------------------------------------------------------------------------- access log
def test_access_log_is_off_unless_asked_for(tmp_path: Path):
    access = logging.getLogger("uvicorn.access")
    handler = logging.NullHandler()
    access.addHandler(handler)
    try:
        create_app(make_settings(tmp_path, access_log=True))
        assert handler in access.handlers
        create_app(make_settings(tmp_path))
        assert not access.handlers  # uvicorn writes no line per request
    finally:
        access.removeHandler(handler)


# ----------------------------------------------------------------------------------------------- codecs
def test_small_bodies_and_answers_never_visit_a_thread(ae_only: Path, monkeypatch):
    calls: list[str] = []

    async def no_threads(fn, *args, **kwargs):
        calls.append(fn.__name__)
        return fn(*args)

    monkeypatch.setattr(api_io.anyio.to_thread, "run_sync", no_threads)
    monkeypatch.setattr(api_io, "run_in_threadpool", no_threads)
    settings = make_settings(ae_only, warmup=False, inline_codec_bytes=8192)
    latents, image = npy_bytes(np.zeros((1, 8), np.float32)), npy_bytes(np.zeros((1, 16, 16), np.float32))
    with TestClient(create_app(settings)) as client:
        assert client.post("/v1/models/tiny-ae/decode?format=npy", content=latents).status_code == 200
        assert client.post("/v1/models/tiny-ae/reconstruct?format=png", content=image).status_code == 200
        assert calls == []
        many = npy_bytes(np.zeros((16, 8), np.float32))  # 640 bytes, counted 16 times: past 8192
        assert client.post("/v1/models/tiny-ae/decode?format=npy", content=many).status_code == 200
        assert calls == ["decode_latents"]  # its answer, 4096 values as NPY (a copy), is encoded here
        assert client.post("/v1/models/tiny-ae/decode?format=png", content=many).status_code == 200
        assert calls == ["decode_latents", "decode_latents", "_png_response"]  # 4096 x 24 > 8192
    calls.clear()
    with TestClient(create_app(make_settings(ae_only, warmup=False, inline_codec_bytes=0))) as client:
        assert client.post("/v1/models/tiny-ae/decode?format=npy", content=latents).status_code == 200
        assert calls == ["decode_latents", "encode_npy"]  # 0: always a thread


# ----------------------------------------------------------------------------------------------- saliency


def test_saliency_program_loads_at_first_use(ae_only: Path, monkeypatch):
    monkeypatch.setattr(torch_export, "torch_imported", lambda: False)  # as in a fresh service process
    image = npy_bytes(np.random.default_rng(0).random((1, 16, 16)).astype(np.float32))
    with TestClient(create_app(make_settings(ae_only, load_in_background=False))) as client:
        saliency = client.get("/v1/models/tiny-ae").json()["engine"]["saliency"]
        assert saliency["loaded"] is False and saliency["provider"] == "torch (loads at first use)"
        assert client.get("/v1/models/tiny-ae").json()["saliency"]["available"] is True
        answer = client.post("/v1/models/tiny-ae/attention-map", content=image)
        assert answer.status_code == 200 and answer.json()["saliency_shape"] == [1, 1, 16, 16]
        saliency = client.get("/v1/models/tiny-ae").json()["engine"]["saliency"]
        assert saliency["loaded"] is True and saliency["provider"].startswith("torch:")


def test_a_saliency_program_that_fails_at_first_use_is_then_unavailable(ae_only: Path, monkeypatch):
    monkeypatch.setattr(torch_export, "torch_imported", lambda: False)

    def no_torch():
        raise RuntimeLoadError("torch is not installed (pip install 'aeserve[torch]')")

    monkeypatch.setattr(torch_export, "import_torch", no_torch)
    image = npy_bytes(np.zeros((1, 16, 16), np.float32))
    with TestClient(create_app(make_settings(ae_only, load_in_background=False))) as client:
        for _ in range(2):  # the first use finds out, and says so, as every later one
            answer = client.post("/v1/models/tiny-ae/attention-map", content=image)
            error = answer.json()["error"]
            assert answer.status_code == 501 and error["code"] == "saliency_unavailable"
            assert "torch is not installed" in error["message"] and "saliency=false" in error["message"]
        assert client.get("/v1/models/tiny-ae").json()["saliency"]["available"] is False
        assert client.post("/v1/models/tiny-ae/reconstruct", content=image).status_code == 200


def test_without_torch_installed_the_program_is_refused_at_load(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(torch_export, "torch_imported", lambda: False)
    monkeypatch.setattr(torch_export.importlib.util, "find_spec", lambda name: None)
    program = tmp_path / "p.pt2"
    program.write_bytes(b"not read")
    with pytest.raises(RuntimeLoadError, match="torch is not installed"):
        torch_export.TorchExportRuntime(program, input_names=["x"], output_names=["y"])


# ----------------------------------------------------------------------------------------------- start-up
def test_models_load_concurrently(own_store: Path, monkeypatch):
    active, most = 0, 0
    real = lifespan.load_model

    def slow_load(record, settings):
        nonlocal active, most
        active += 1
        most = max(most, active)
        time.sleep(0.2)
        active -= 1
        real(record, settings)

    monkeypatch.setattr(lifespan, "load_model", slow_load)
    monkeypatch.setattr(lifespan, "machine_cores", lambda: 2)
    settings = make_settings(own_store, warmup=False, models="tiny-ae,tiny-render,tiny-dyn")
    started = time.perf_counter()
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
    assert most == 2 and time.perf_counter() - started < 10


def test_strict_start_still_fails_on_a_broken_model_among_concurrent_loads(own_store: Path):
    from app.lifespan import StartupError

    settings = make_settings(own_store, warmup=False, strict=True, models="tiny-ae,tiny-broken,tiny-render")
    with pytest.raises(StartupError, match="tiny-broken"), TestClient(create_app(settings)):
        pass


def test_warm_up_runs_each_shape_once_when_runs_are_slow_and_skips_an_unloaded_saliency(store: Path):
    from app.store import load_model, scan_store

    record = next(r for r in scan_store(store) if r.name == "tiny-ae")
    load_model(record, make_settings(store))
    batches: list[int] = []

    class Slow:
        loaded = False

        def __init__(self, inner=None):
            self.inner = inner

        def run(self, inputs):
            batches.append(next(iter(inputs.values())).shape[0] if inputs else 0)
            time.sleep(0.02)  # slower than the default warmup_max_run_s
            return self.inner.run(inputs)

        def input_gradient(self, *args):  # pragma: no cover - must not run
            raise AssertionError("an unloaded saliency program is not warmed")

    record.runtimes = {name: Slow(rt) for name, rt in record.runtimes.items()}
    record.saliency = Slow()
    runs = lifespan.warm_up(record, Settings(store=store, lone_batch_min_ms=0))  # no per-item timing runs
    assert batches == [1] * len(record.runtimes) and runs == len(record.runtimes)


@pytest.mark.parametrize("arena", [False, True])
def test_the_arena_setting_reaches_every_onnx_session_the_store_loads(ae_only: Path, arena: bool):
    from app.store import ModelRecord, load_model

    record = ModelRecord("tiny-ae", "77", ae_only / "tiny-ae" / "77")
    load_model(record, make_settings(ae_only, cpu_mem_arena=arena))
    onnx = [r for r in record.runtimes.values() if r.format == "onnx"]
    assert onnx and all(r.describe()["cpu_mem_arena"] is arena for r in onnx)
