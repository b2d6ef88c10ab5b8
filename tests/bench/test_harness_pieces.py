"""The benchmark's pieces: peer codecs equal aeserve's, Triton's binary protocol, load generators counting
only 2xx answers, the engine's summary figures and the process-tree memory reading."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from app import codecs
from bench.engine import Ceiling, Measurement, time_calls
from bench.loadgen import load, wrk_script
from bench.peers.common import PeerSpec, decode_answer, decode_request, encode_answer
from bench.peers.triton_protocol import HEADER_LENGTH, OUTPUT, bytes_element, infer_answer, infer_request
from bench.servers import peak_rss_bytes, process_tree


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_requests_decode_as_aeserve_decodes_them(dtype: type) -> None:
    pixels = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, (37, 53), endpoint=True).astype(dtype)
    body = png(pixels)
    np.testing.assert_array_equal(decode_request("png", body), codecs.decode_image_bytes(body))
    with pytest.raises(ValueError, match="grayscale"):
        decode_request("png", png(np.zeros((4, 4, 3), np.uint8)))


def test_npy_requests_decode_as_aeserve_decodes_them() -> None:
    latents = np.random.default_rng(1).standard_normal((1, 32)).astype(np.float32)
    want = codecs.decode_latents_npy(npy(latents), 32, max_frames=8)
    np.testing.assert_array_equal(decode_request("npy", npy(latents)), want)
    np.testing.assert_array_equal(decode_request("npy", npy(latents[0])), want)
    with pytest.raises(ValueError, match="non-finite"):
        decode_request("npy", npy(np.full((1, 32), np.nan, np.float32)))


@pytest.mark.parametrize("output_range", [(0.0, 1.0), (-1.0, 1.0)])
def test_answers_encode_to_aeserve_s_pixels(output_range: tuple[float, float]) -> None:
    item = np.random.default_rng(2).uniform(-1.3, 1.3, (1, 1, 19, 23)).astype(np.float32)
    png_bytes, _, _ = codecs.encode_png_grid(codecs.to_unit_range(item, output_range))
    peer = decode_answer("png", encode_answer("png", item, output_range))  # Pillow's writer, aeserve's pixels
    np.testing.assert_array_equal(peer, decode_answer("png", png_bytes))
    latents = item.reshape(1, -1)[:, :32]
    assert encode_answer("npy", latents, output_range) == codecs.encode_npy(latents.astype(np.float32))


def test_triton_binary_request_and_answer() -> None:
    body, headers = infer_request(b"\x89PNG")
    length = int(headers[HEADER_LENGTH])
    header = json.loads(body[:length])
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 8 and body[length:] == b"\x04\x00\x00\x00\x89PNG"
    assert header["outputs"] == [{"name": OUTPUT, "parameters": {"binary_data": True}}]
    other, answer = bytes_element(b"skip me"), bytes_element(b"the answer")
    reply = json.dumps({"outputs": [
        {"name": "other", "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(other)}},
        {"name": OUTPUT, "datatype": "BYTES", "shape": [1, 1], "parameters": {"binary_data_size": len(answer)}},
    ]}).encode()
    assert infer_answer(reply + other + answer, str(len(reply))) == b"the answer"
    plain = json.dumps({"outputs": [{"name": OUTPUT, "datatype": "BYTES", "shape": [1, 1], "data": ["ok"]}]}).encode()
    assert infer_answer(plain, None) == b"ok"


def test_wrk_script_sets_every_header() -> None:
    script = wrk_script({"Content-Type": "image/png", "X-Quote": 'a"b'})
    assert 'wrk.headers["Content-Type"] = "image/png"' in script and 'wrk.headers["X-Quote"] = "a\\"b"' in script
    assert "2xx responses" in script and "AESERVE_BENCH_WINDOW" in script


class Alternating(BaseHTTPRequestHandler):
    """200 and 503, turn about."""

    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        with Alternating.lock:
            Alternating.count += 1
            status = 200 if Alternating.count % 2 else 503
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def alternating_server() -> Iterator[str]:
    Alternating.protocol_version = "HTTP/1.1"
    server = ThreadingHTTPServer(("127.0.0.1", 0), Alternating)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/x"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("client", ["aiohttp", "wrk"])
def test_load_counts_only_2xx(alternating_server: str, client: str) -> None:
    if client == "wrk" and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed")
    pytest.importorskip("aiohttp")
    result = load(client, alternating_server, b"body", {"Content-Type": "text/plain"}, 2, 1, lead_in=1, warmup=0)
    assert result.answered_2xx > 5 and abs(result.answered_2xx - result.errors) <= 3
    assert result.seconds == 1.0 and result.rate == result.answered_2xx and result.p50_ms > 0


def test_ceiling_summary_figures() -> None:
    found = Ceiling("light", [
        Measurement("onnx", 1, 1, 2, items_per_s=900.0, call_ms=1.1),
        Measurement("onnx", 1, 2, 1, items_per_s=1500.0, call_ms=1.3),  # two instances: not a batch-1 latency
        Measurement("onnx", 8, 1, 2, items_per_s=2000.0, call_ms=4.0),
        Measurement("onnx", 1, 1, 1, spinning=True, items_per_s=950.0, call_ms=1.05),
        Measurement("eager", 8, 1, 2, items_per_s=500.0, call_ms=16.0),
    ])
    summary = found.to_json()
    assert found.best.items_per_s == 2000.0 and summary["best"]["label"] == "onnx 1x2t b8"
    assert summary["batch1_ms"] == 1.05 and found.measurements[3].label == "onnx 1x1t+spin b1"
    assert (summary["exported_b8_items_per_s"], summary["eager_b8_items_per_s"]) == (2000.0, 500.0)
    assert found.at_batch(16, ("onnx",)) is None


def test_time_calls_runs_every_engine_side_by_side() -> None:
    calls = [0, 0]

    def run(i: int) -> None:
        calls[i] += 1

    rate, median_ms = time_calls([lambda: run(0), lambda: run(1)], 0.05)
    assert calls[0] > 3 and calls[1] > 3 and rate > 0 and median_ms >= 0


def test_peak_rss_covers_the_process_tree() -> None:
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert child.pid in process_tree(os.getpid())
        assert peak_rss_bytes(os.getpid()) > peak_rss_bytes(child.pid) > 0
    finally:
        child.kill()
        child.wait()


def identity_spec(tmp_path) -> PeerSpec:
    """A workload whose ONNX file passes an 8x8 image through: PNG in, the same pixels out."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1, 8, 8])],
    )
    path = tmp_path / "identity.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return PeerSpec("t", "/v1/models/t/op", str(path), "x", "y", "png", "png")


def test_the_codec_ceiling_decodes_runs_and_encodes_every_item(tmp_path, monkeypatch) -> None:
    from bench import engine

    spec = identity_spec(tmp_path)
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    body = png(pixels)
    seen: list[int] = []
    real = engine.answer_batch

    def counting(spec_, session, bodies):
        seen.append(len(bodies))
        answers = real(spec_, session, bodies)
        for answer in answers:  # PNG in, the same pixels out: each item really decoded and encoded
            np.testing.assert_array_equal(decode_answer("png", answer).reshape(8, 8), pixels)
        return answers

    monkeypatch.setattr(engine, "answer_batch", counting)
    prepared = type("P", (), {"spec": spec, "body": body})()
    layout = Measurement("onnx", 4, 2, 1, spinning=True, items_per_s=1e6, call_ms=0.1)
    found = engine.codec_measure(prepared, layout, seconds=0.05)
    assert (found.format, found.batch, found.instances, found.threads, found.spinning) == ("onnx+codecs", 4, 2, 1,
                                                                                           False)
    assert set(seen) == {4} and found.items_per_s > 0 and found.items_per_s != layout.items_per_s
    assert found.label == "onnx+codecs 2x1t b4"


def test_the_harness_floor_answers_the_first_answer_again_without_work(tmp_path, monkeypatch) -> None:
    """The floor server runs the workload once (the answer a client expects), then only reads bodies and
    returns those bytes: its latency is the client's and HTTP's alone. The plain peer works every time."""
    from fastapi.testclient import TestClient

    from bench.peers import plain_fastapi

    spec = identity_spec(tmp_path)
    calls: list[int] = []
    real = plain_fastapi.answer_batch

    def counting(spec_, session, bodies):
        calls.append(len(bodies))
        return real(spec_, session, bodies)

    monkeypatch.setattr(plain_fastapi, "answer_batch", counting)
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    headers = {"Content-Type": spec.content_type, "Accept": spec.accept}
    with TestClient(plain_fastapi.create_app([spec], floor=True)) as floor:
        answers = [floor.post(spec.route, content=png(pixels), headers=headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 3 and calls == [1]
    assert answers[0].headers["content-type"] == "image/png" and len({a.content for a in answers}) == 1
    np.testing.assert_array_equal(decode_answer("png", answers[2].content), pixels)
    with TestClient(plain_fastapi.create_app([spec])) as plain:
        assert all(plain.post(spec.route, content=png(pixels), headers=headers).status_code == 200 for _ in range(2))
    assert calls == [1, 1, 1]
