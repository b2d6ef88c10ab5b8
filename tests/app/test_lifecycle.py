"""Health, shutdown and faults: the port answers while models load, readiness says why not, SIGTERM drains
in-flight work and exits 0, a dead engine task is reported at once (not left to time out)."""

from __future__ import annotations

import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.batcher import Engine
from app.lifespan import StartupError
from app.main import create_app
from tests.app.conftest import make_settings, npy_bytes
from tests.app.service_process import Service, running_service, slow_runs

IMAGE = npy_bytes(np.random.default_rng(0).random((1, 16, 16)).astype(np.float32))
RECONSTRUCT = "/v1/models/tiny-dyn/reconstruct"

# run in the service process: every model load waits until the file named by $LOAD_GATE exists
GATED_LOADING = """
import os, time
import app.lifespan
load_model = app.lifespan.load_model
def gated_load_model(record, settings):
    while not os.path.exists(os.environ["LOAD_GATE"]):
        time.sleep(0.05)
    load_model(record, settings)
app.lifespan.load_model = gated_load_model
"""

# run in the service process: every ONNX batch takes 0.4 s longer, so requests stay in flight
SLOW_RUNS = slow_runs(0.4)


@pytest.fixture
def dyn_only(store: Path, tmp_path: Path) -> Path:
    """A store of one ONNX-only model (no torch needed to serve it)."""
    root = tmp_path / "store"
    shutil.copytree(store / "tiny-dyn", root / "tiny-dyn")
    return root


def test_the_port_answers_while_models_load(dyn_only: Path, tmp_path: Path):
    gate = tmp_path / "gate"
    env = {"AESERVE_LOAD_IN_BACKGROUND": "true", "LOAD_GATE": str(gate)}
    with running_service(dyn_only, tmp_path, env, GATED_LOADING) as service, service.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        waiting = client.get("/readyz")
        assert waiting.status_code == 503
        assert waiting.json() == {"ready": False, "reason": "loading: tiny-dyn", "models": {"tiny-dyn": "loading"}}
        early = client.post(RECONSTRUCT, content=IMAGE)
        assert early.status_code == 503 and early.json()["error"]["code"] == "model_not_ready"
        gate.touch()
        service.wait_until(lambda: client.get("/readyz").status_code == 200, what="/readyz 200")
        assert client.get("/readyz").json() == {"ready": True, "reason": None, "models": {"tiny-dyn": "ready"}}
        assert client.post(RECONSTRUCT, content=IMAGE).status_code == 200


def test_strict_loads_before_serving_even_with_background_loading(store: Path):
    with (
        pytest.raises(StartupError, match="tiny-broken"),
        TestClient(create_app(make_settings(store, strict=True, load_in_background=True))),
    ):
        pass


def test_an_empty_store_is_not_ready(tmp_path: Path):
    with TestClient(create_app(make_settings(tmp_path, load_in_background=True))) as client:
        assert client.get("/healthz").status_code == 200
        answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"ready": False, "reason": "the model store holds no models", "models": {}}


def test_a_store_whose_models_all_failed_is_not_ready(store: Path, tmp_path: Path):
    shutil.copytree(store / "tiny-broken", tmp_path / "tiny-broken")
    with TestClient(create_app(make_settings(tmp_path, load_in_background=False))) as client:
        answer = client.get("/readyz")
    assert answer.status_code == 503
    assert answer.json()["models"] == {"tiny-broken": "unavailable"}
    assert answer.json()["reason"].startswith("no model could be loaded")


def _inflight(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("aeserve_inflight_requests "):
            return float(line.split()[1])
    return 0.0


def _post(service: Service) -> httpx.Response:
    return httpx.post(f"{service.base_url}{RECONSTRUCT}", content=IMAGE, timeout=30)


def test_sigterm_drains_in_flight_requests_then_exits_0(dyn_only: Path, tmp_path: Path):
    env = {"AESERVE_MAX_BATCH_SIZE": "2", "AESERVE_SHUTDOWN_GRACE_S": "20"}
    with running_service(dyn_only, tmp_path, env, SLOW_RUNS) as service, service.client() as client:
        service.wait_until(lambda: client.get("/readyz").status_code == 200, what="/readyz 200")
        with ThreadPoolExecutor(6) as pool:
            admitted = [pool.submit(_post, service) for _ in range(6)]  # ~1.6 s of batches of 2 at 0.4 s
            service.wait_until(lambda: _inflight(client) == 6, what="6 requests in flight")
            signalled = time.monotonic()
            service.process.send_signal(signal.SIGTERM)
            service.wait_until(lambda: client.get("/readyz").status_code == 503, timeout_s=1, what="/readyz 503")
            assert client.get("/readyz").json()["reason"] == "shutting down"
            late = _post(service)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
            assert client.get("/healthz").status_code == 200  # alive while it drains
            answers = [future.result() for future in admitted]
        assert [a.status_code for a in answers] == [200] * 6, [a.text for a in answers]
        assert all(a.headers["content-type"].startswith("image/png") for a in answers)
        assert service.process.wait(timeout=30) == 0, service.log_text()
        assert time.monotonic() - signalled < 20
        with pytest.raises(httpx.ConnectError):
            _post(service)
        assert "SIGTERM: not ready, refusing new requests, 6 in flight" in service.log_text()


def test_a_dead_engine_task_is_reported_at_once(dyn_only: Path, monkeypatch, caplog):
    """The scheduler supervision (app.scheduling) fails waiting callers and gives up; the lifespan's
    `on_failure` makes the model unavailable, logs it and keeps /readyz at 503."""
    settings = make_settings(dyn_only, warmup=False, load_in_background=False)  # request deadline: 20 s
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200

        def broken_scheduler(self, now):
            raise RuntimeError("scheduler bug")

        monkeypatch.setattr(Engine, "_next_batch", broken_scheduler)
        started = time.monotonic()
        stranded = client.post(RECONSTRUCT, content=IMAGE)  # queued, then its engine task dies
        assert stranded.status_code == 503, stranded.text
        assert time.monotonic() - started < 5  # answered at once, not a 504 at the deadline
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["models"] == {"tiny-dyn": "unavailable"}
        assert ready.json()["reason"].startswith("stopped serving: tiny-dyn (its engine stopped: ")
        reason = client.get("/v1/models").json()["models"][0]["reason"]
        assert reason.startswith("its engine stopped: ") and "RuntimeError" in reason
        refused = client.post(RECONSTRUCT, content=IMAGE)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_unavailable"
    logged = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and r.name == "app.store"]
    assert any("model tiny-dyn/1 unavailable: its engine stopped: " in m for m in logged), logged
