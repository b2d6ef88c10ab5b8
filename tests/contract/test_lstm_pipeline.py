"""The LSTM viscosity workflow (examples/lstm_viscosity) end to end against a real service process over a
store that `training` built: a tiny V3 trained for two steps on droplet frames."""

from __future__ import annotations

import math
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from examples.lstm_viscosity.client import ServiceClient
from examples.lstm_viscosity.pipeline import PipelineConfig, format_table, run
from examples.lstm_viscosity.regressors import r2_score, raw_shape, track_speed
from tests.app.service_process import running_service
from training.__main__ import main
from training.data.droplets import generate_sequence

RECIPE = """
name: v3-droplet-tiny
version: "1"
model: v3_tiny
description: contract test of the LSTM pipeline
overrides: {input_size: [64, 64], latent_strategy: conv, use_attention: false}
data: {source: droplets, samples_per_epoch: 8, val_samples: 2}
train: {epochs: 1, batch_size: 4, val_batch_size: 2, lr: 0.001, time_budget_s: 60}
formats: [onnx]
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lstm")
    (root / "store" / "recipes").mkdir(parents=True)
    (root / "store" / "recipes" / "droplets.yaml").write_text(RECIPE)
    torch.set_num_threads(1)
    assert main(["build-store", "--store", str(root / "store"), "--runs", str(root / "runs"), "--no-progress",
                 "--jobs", "1"]) == 0
    return root / "store"


@pytest.mark.slow
def test_the_pipeline_runs_end_to_end_against_a_real_service(store, tmp_path) -> None:
    with running_service(store, tmp_path) as service:
        config = PipelineConfig(service.base_url, "v3-droplet-tiny", train=8, heldout=4, frames=6, epochs=4,
                                physics_size=(38, 320))
        with ServiceClient(service.base_url) as client:
            client.wait_ready(config.model, timeout_s=60)
            latents = client.encode(config.model, generate_sequence(5, 6, "crop", (64, 64)).frames)
        result = run(config, log=lambda _: None)
    assert latents.shape == (6, 128) and np.isfinite(latents).all()
    assert result.view == "crop" and result.frame_hw == (64, 64) and result.latent_shape == (6, 128)
    assert result.raw_hw == (11, 11)
    assert [row.name for row in result.rows] == [
        "LSTM on the service's latents", "LSTM on raw frames, shrunk", "physics: centroid speed + tilt"]
    assert all(math.isfinite(row.r2) for row in result.rows)
    table = format_table(result).splitlines()
    assert len(table) == 5 and "11x11" in table[3] and "physics" in table[4]


def test_encode_waits_out_429_retry_after() -> None:
    answers = [httpx.Response(429, headers={"Retry-After": "0"}), httpx.Response(503, headers={"Retry-After": "0"})]

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["content-type"] == "application/x-npy" == request.headers["accept"]
        if answers:
            return answers.pop(0)
        frames = np.load(__import__("io").BytesIO(request.content))
        body = __import__("io").BytesIO()
        np.save(body, np.zeros((len(frames), 3), np.float32))
        return httpx.Response(200, content=body.getvalue())

    client = ServiceClient("http://service")
    client.http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(handler))
    assert client.encode("m", np.zeros((4, 8, 8), np.float32)).shape == (4, 3)
    assert client.retried == 2


def test_the_physics_baseline_tracks_the_drop_and_r2_is_the_usual_one() -> None:
    video = generate_sequence(11, 12, "strip")
    true_speed = np.polyfit(np.arange(12), video.motion.center_mm * 40.0, 1)[0]  # 40 px/mm at 152x1280
    assert abs(track_speed(video.frames) - true_speed) < 0.05 * abs(true_speed) + 0.2
    assert r2_score(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0])) == 1.0
    assert r2_score(np.array([1.0, 2.0, 3.0]), np.full(3, 2.0)) == 0.0
    assert raw_shape(512, (201, 201)) == (23, 23) and raw_shape(512, (152, 1280)) == (8, 66)
