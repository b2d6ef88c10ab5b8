"""The benchmark speaks the service's documented contract, and its plain FastAPI peer answers as aeserve does.

`make bench` (`bench.suite`) sends each workload's body (NPY latents as application/x-npy, grayscale PNG
images as image/png, one item per request) to aeserve and to its peers, and compares a sample answer of
each with its own in-process answer. Here a tiny untrained store is served in-process: every workload's
body must be answered 200 by aeserve with exactly the in-process answer (PNG to the last pixel), the
plain FastAPI peer must answer the same bytes' worth of pixels, and the wrk report parser must count
only 2xx answers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from bench.loadgen import parse_wrk
from bench.peers import plain_fastapi
from bench.peers.common import answer_batch, decode_answer, make_session
from bench.workloads import Prepared, Workload, compare, prepare
from tests.conftest import wait_until_loaded
from training.registry import create_model
from training.store import write_version

pytestmark = pytest.mark.slow

MODELS = {
    "bench-v3": ("v3_tiny", {"input_size": [32, 32], "latent_strategy": "conv", "channel_config": [8, 16],
                             "latent_size": 128}),
    "bench-vae": ("conv_decoder_vae", {"encoder_channels": [8, 16],
                                       "decoder": {"latent_dim": 8, "hidden_dims": [16, 8], "output_size": [16, 16]}}),
}
# Served one item per request vs the in-process batch of 3: measured 0 here; where ONNX Runtime rounds
# batches of different sizes differently, expect ~1e-7 (the ONNX-vs-eager differences of these models
# in test_serve_every_family), 100 times below TOL.
TOL = 1e-5


def sixteen_bit_picture(path: Path) -> Path:
    """A 16-bit grayscale 32x32 PNG (the heavy workload sends 16-bit STEM patterns)."""
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32)
    Image.fromarray(np.round(ramp).astype(np.uint16)).save(path)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, list[Prepared]]]:
    root = tmp_path_factory.mktemp("bench")
    store = root / "store"
    for name, (registry_name, overrides) in MODELS.items():
        torch.manual_seed(0)
        model = create_model(registry_name, **overrides).eval()
        write_version(model, store, name, "1", formats=("onnx", "torch_export"), max_batch_size=8,
                      training={"model": registry_name})
    workloads = [
        Workload("light", "bench-vae", "decode", "npy", "png"),
        Workload("middle", "bench-v3", "reconstruct", "png", "png", "camera_201.png"),
        Workload("heavy", "bench-v3", "encode", "png", "npy", str(sixteen_bit_picture(root / "pattern16.png"))),
    ]
    prepared = [prepare(store, w) for w in workloads]
    settings = Settings(store=store, device="cpu", models="", max_batch_size=8, intra_op_threads=1)
    with TestClient(create_app(settings)) as client:
        wait_until_loaded(client)
        yield client, prepared


def post(client: TestClient, item: Prepared) -> bytes:
    spec = item.spec
    response = client.post(spec.route, content=item.body, headers={"content-type": spec.content_type,
                                                                   "accept": spec.accept})
    assert response.status_code == 200, response.text
    return response.content


@pytest.mark.parametrize("index", [0, 1, 2], ids=["light", "middle", "heavy"])
def test_bench_bodies_are_answered_as_in_process(served: tuple[TestClient, list[Prepared]], index: int) -> None:
    client, prepared = served
    item = prepared[index]
    assert item.spec.content_type == ("application/x-npy" if item.workload.op == "decode" else "image/png")
    got = post(client, item)
    assert compare(item.spec.answer, got, item.expected)["identical"], compare(item.spec.answer, got, item.expected)
    # the in-process answer at batch 3 (the engine sweep batches the same item) agrees within TOL
    session = make_session(item.spec.onnx, 1)
    batched = answer_batch(item.spec, session, [item.body] * 3)
    for answer in batched:
        want = decode_answer(item.spec.answer, answer).astype(np.float64)
        have = decode_answer(item.spec.answer, got).astype(np.float64)
        np.testing.assert_allclose(have, want, atol=TOL if item.spec.answer == "npy" else 0, rtol=0)


def test_plain_fastapi_peer_answers_as_aeserve(served: tuple[TestClient, list[Prepared]]) -> None:
    client, prepared = served
    with TestClient(plain_fastapi.create_app([p.spec for p in prepared])) as peer:
        assert peer.get("/healthz").status_code == 200
        for item in prepared:
            ours = post(client, item)
            theirs = post(peer, item)
            assert compare(item.spec.answer, theirs, ours)["identical"], item.workload.name
        refused = peer.post(prepared[0].spec.route, content=b"no npy", headers={"content-type": "application/x-npy"})
        assert refused.status_code == 422


WRK_REPORT = """Running 8s test @ http://127.0.0.1:8000/v1/models/v3-small-201/reconstruct
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   197.70ms   50.12ms 389.60ms   70.00%
    Req/Sec   160.00     20.00   200.00     70.00%
  Latency Distribution
     50%  197.70ms
     75%  230.00ms
     90%  300.00ms
     99%     1.20s
  1240 requests in 8.00s, 1.23MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 40
Requests/sec:    155.00
Transfer/sec:    157.00KB
2xx responses: 1200
"""


def test_wrk_report_counts_only_2xx() -> None:
    result = parse_wrk(WRK_REPORT)
    assert (result.answered_2xx, result.seconds, result.errors) == (1200, 8.0, 40 + 5)
    assert result.rate == 150.0  # not wrk's Requests/sec, which counts the 40 failed answers too
    assert (result.p50_ms, result.p99_ms) == (197.7, 1200.0)
    clean = WRK_REPORT.replace("  Socket errors: connect 0, read 2, write 0, timeout 3\n", "")
    clean = clean.replace("  Non-2xx or 3xx responses: 40\n", "").replace("2xx responses: 1200", "2xx responses: 1240")
    assert parse_wrk(clean).errors == 0 and parse_wrk(clean).rate == 155.0
    with pytest.raises(ValueError, match="unexpected wrk output"):
        parse_wrk(WRK_REPORT.replace("2xx responses: 1200\n", ""))  # the Lua script's line is required


def test_wrk_report_counts_only_the_window() -> None:
    """A run of lead-in + window: the script's window counts, not wrk's whole-run totals."""
    windowed = WRK_REPORT + "other responses in window: 7\nwindow: 6.000 s\n"
    result = parse_wrk(windowed)
    assert (result.answered_2xx, result.seconds, result.errors) == (1200, 6.0, 7 + 5)
    assert result.rate == 200.0
