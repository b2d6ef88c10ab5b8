"""Open Inference Protocol (v2) on the in-process app over the tiny store: health, metadata, JSON and binary
tensors, the op mapping, errors in the v2 shape, and the v1 machinery (engine, metrics, admission, memory
pool) under every v2 request. The tritonclient round trip on a real process is in test_v2_tritonclient."""

from __future__ import annotations

import io
import json
import re
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from app.api.v2 import reserve_answer
from app.budget import input_pool
from app.errors import NotAcceptable, PayloadTooLarge
from app.schemas.manifest import TensorSpec
from tests.app.conftest import make_settings, npy_bytes

RNG = np.random.default_rng(7)
HEADER = "Inference-Header-Content-Length"


def images(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    return RNG.random((n, 1, h, w)).astype(np.float32)


def tensor(name: str, array: np.ndarray, datatype: str = "FP32", binary: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
    if binary:
        entry["parameters"] = {"binary_data_size": array.nbytes}
    else:
        entry["data"] = array.ravel().tolist()
    return entry


def binary_body(request: dict[str, Any], blobs: list[bytes]) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(request).encode()
    return header + b"".join(blobs), {HEADER: str(len(header))}


def outputs_of(response) -> dict[str, np.ndarray]:
    """Every output of a 200 answer, JSON or binary, as arrays of their datatype."""
    assert response.status_code == 200, response.text
    length = response.headers.get(HEADER)
    content = response.content
    header = json.loads(content[: int(length)] if length else content)
    offset = int(length) if length else 0
    dtypes = {"FP32": "<f4", "FP16": "<f2", "INT64": "<i8"}
    arrays = {}
    for out in header["outputs"]:
        size = (out.get("parameters") or {}).get("binary_data_size")
        if size is None:
            arrays[out["name"]] = np.asarray(out["data"], dtype=dtypes[out["datatype"]]).reshape(out["shape"])
        else:
            raw = content[offset : offset + size]
            arrays[out["name"]] = np.frombuffer(raw, dtypes[out["datatype"]]).reshape(out["shape"])
            offset += size
    assert offset == (len(content) if length else 0)
    return arrays


def v1_npy(client, path: str, body: bytes, content_type: str = "application/x-npy") -> np.ndarray:
    response = client.post(path, content=body, headers={"Content-Type": content_type, "Accept": "application/x-npy"})
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def assert_v2_error(response, status: int, field: str, limit: str | None = None) -> str:
    """`status` with exactly `{"error": str}`, the message naming `field` (and `limit`)."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str)
    assert f"(field: {field};" in body["error"], body["error"]
    if limit is not None:
        assert f"limit: {limit})" in body["error"], body["error"]
    return body["error"]


# ----------------------------------------------------------------------------------------- health, metadata
def test_server_metadata_and_health(client):
    assert client.get("/v2").json() == {"name": "aeserve", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/tiny-ae.encode/ready",
                 "/v2/models/tiny-ae/versions/10/ready"):
        answer = client.get(path)
        assert (answer.status_code, answer.content) == (200, b""), path
    assert client.get("/v2/models/tiny-broken/ready").status_code == 503  # unavailable: false, no body
    assert_v2_error(client.get("/v2/models/tiny-ae/versions/2/ready"), 404, "version", '["10"]')


def test_model_metadata_per_op_and_plain_name(client):
    encode = client.get("/v2/models/tiny-ae.encode").json()
    assert encode == {
        "name": "tiny-ae.encode", "versions": ["10"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 16, 16],
                    "parameters": {"accepted_datatypes": "FP32,FP16,UINT8"}}],
        "outputs": [{"name": "latent", "datatype": "FP32", "shape": [-1, 8]}],
    }
    assert client.get("/v2/models/tiny-ae.encode/versions/10").json() == encode
    decode = client.get("/v2/models/tiny-ae.decode").json()
    assert [t["name"] for t in decode["inputs"] + decode["outputs"]] == ["latent", "image"]
    assert decode["inputs"][0]["parameters"] == {"accepted_datatypes": "FP32,FP16"}  # no UINT8 latents
    plain = client.get("/v2/models/tiny-ae").json()
    assert plain["parameters"] == {"op": "encode"} and plain["inputs"] == encode["inputs"]
    assert plain["ops"] == {op: f"tiny-ae.{op}" for op in ("encode", "decode", "reconstruct", "attention_matrix")}
    denoise = client.get("/v2/models/tiny-ddim.denoise").json()
    assert [(t["name"], t["datatype"], t["shape"]) for t in denoise["inputs"]] == [
        ("x_t", "FP32", [-1, 1, 8, 8]), ("t", "INT64", [-1]), ("condition", "FP32", [-1, 2])]
    assert client.get("/v2/models/tiny-dyn.encode").json()["inputs"][0]["shape"] == [-1, 1, -1, -1]
    assert_v2_error(client.get("/v2/models/tiny-ae/versions/9"), 404, "version", '["10"]')
    assert_v2_error(client.get("/v2/models/nope"), 404, "model_name")
    message = assert_v2_error(client.get("/v2/models/tiny-ae.sample"), 404, "model_name")
    assert "tiny-ae.reconstruct" in message


# ----------------------------------------------------------------------------------------- infer
def test_json_and_binary_infer_equal_v1(client):
    x = images(3)
    v1_latents = v1_npy(client, "/v1/models/tiny-ae/encode", npy_bytes(x))
    request = {"id": "a", "inputs": [tensor("image", x)]}
    as_json = outputs_of(client.post("/v2/models/tiny-ae.encode/infer", json=request))
    body, headers = binary_body({"inputs": [tensor("image", x, binary=True)],
                                 "parameters": {"binary_data_output": True}}, [x.tobytes()])
    answer = client.post("/v2/models/tiny-ae.encode/infer", content=body, headers=headers)
    assert answer.headers["content-type"] == "application/octet-stream"
    head = json.loads(answer.content[: int(answer.headers[HEADER])])
    assert head["model_name"] == "tiny-ae.encode" and head["model_version"] == "10"
    assert answer.headers["X-Model-Version"] == "10"  # as v1 names the version served
    as_binary = outputs_of(answer)
    assert as_json["latent"].shape == (3, 8)
    np.testing.assert_allclose(as_json["latent"], v1_latents, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(as_binary["latent"], as_json["latent"])  # float32 round-trips through JSON
    v1_images = v1_npy(client, "/v1/models/tiny-ae/decode", npy_bytes(v1_latents))
    body, headers = binary_body({"inputs": [tensor("latent", as_binary["latent"], binary=True)],
                                 "outputs": [{"name": "image", "parameters": {"binary_data": True}}]},
                                [as_binary["latent"].tobytes()])
    decoded = outputs_of(client.post("/v2/models/tiny-ae.decode/infer", content=body, headers=headers))["image"]
    np.testing.assert_allclose(decoded, v1_images, rtol=0, atol=1e-6)
    v1_recon = v1_npy(client, "/v1/models/tiny-ae/reconstruct", npy_bytes(x))
    recon = outputs_of(client.post("/v2/models/tiny-ae.reconstruct/infer", json={"inputs": [tensor("image", x)]}))
    np.testing.assert_allclose(recon["reconstruction"], v1_recon, rtol=0, atol=1e-6)


def test_output_binary_flag_overrides_the_request_default(client):
    x = images(1)
    request = {"inputs": [tensor("image", x)], "parameters": {"binary_data_output": True},
               "outputs": [{"name": "latent", "parameters": {"binary_data": False}}]}
    answer = client.post("/v2/models/tiny-ae.encode/infer", json=request)
    assert HEADER not in answer.headers and answer.headers["content-type"] == "application/json"
    assert len(answer.json()["outputs"][0]["data"]) == 8


def test_plain_name_takes_the_op_parameter(client):
    z = RNG.standard_normal((2, 8)).astype(np.float32)
    by_name = outputs_of(client.post("/v2/models/tiny-ae.decode/infer", json={"inputs": [tensor("latent", z)]}))
    by_parameter = outputs_of(client.post("/v2/models/tiny-ae/infer", json={
        "parameters": {"op": "decode"}, "inputs": [tensor("latent", z)]}))
    np.testing.assert_array_equal(by_name["image"], by_parameter["image"])
    x = images(1)  # no parameter: the default op (encode)
    assert outputs_of(client.post("/v2/models/tiny-ae/infer", json={"inputs": [tensor("image", x)]}))["latent"].shape \
        == (1, 8)


def test_fp16_uint8_and_int64_inputs(client):
    x8 = RNG.integers(0, 256, (2, 1, 16, 16), dtype=np.uint8)
    as_float = outputs_of(client.post("/v2/models/tiny-ae.encode/infer", json={
        "inputs": [tensor("image", x8.astype(np.float32) / np.float32(255))]}))["latent"]
    body, headers = binary_body({"inputs": [tensor("image", x8, "UINT8", binary=True)]}, [x8.tobytes()])
    as_uint8 = outputs_of(client.post("/v2/models/tiny-ae.encode/infer", content=body, headers=headers))["latent"]
    np.testing.assert_allclose(as_uint8, as_float, rtol=0, atol=1e-6)  # scaled by 1/255, as v1 scales 8-bit
    x16 = images(2).astype(np.float16)
    body, headers = binary_body({"inputs": [tensor("image", x16, "FP16", binary=True)]}, [x16.tobytes()])
    as_fp16 = outputs_of(client.post("/v2/models/tiny-ae.encode/infer", content=body, headers=headers))["latent"]
    exact = outputs_of(client.post("/v2/models/tiny-ae.encode/infer", json={
        "inputs": [tensor("image", x16.astype(np.float32))]}))["latent"]
    np.testing.assert_allclose(as_fp16, exact, rtol=0, atol=1e-6)
    x_t, cond = RNG.standard_normal((2, 1, 8, 8)).astype(np.float32), np.zeros((2, 2), np.float32)
    eps = {}
    for datatype, t in (("INT64", np.array([3, 7], np.int64)), ("INT32", np.array([3, 7], np.int32))):
        eps[datatype] = outputs_of(client.post("/v2/models/tiny-ddim.denoise/infer", json={"inputs": [
            tensor("x_t", x_t), tensor("t", t, datatype), tensor("condition", cond)]}))["eps"]
    assert eps["INT64"].shape == (2, 1, 8, 8)
    np.testing.assert_array_equal(eps["INT64"], eps["INT32"])


def test_fixed_render_and_dynamic_sizes(client):
    render = outputs_of(client.post("/v2/models/tiny-render.decode/infer", json={"inputs": []}))["image"]
    assert render.shape == (1, 3, 8, 8) and -1 < render.min() < render.max() < 1
    x = images(2, 8, 12)
    latents = outputs_of(client.post("/v2/models/tiny-dyn.encode/infer", json={"inputs": [tensor("image", x)]}))
    np.testing.assert_allclose(latents["latent"], v1_npy(client, "/v1/models/tiny-dyn/encode", npy_bytes(x)),
                               rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------- errors
def image_request(shape=(1, 1, 16, 16), datatype="FP32", **extra) -> dict[str, Any]:
    return {"inputs": [{"name": "image", "shape": list(shape), "datatype": datatype,
                        "data": [0.5] * int(np.prod(shape)), **extra}]}


X = images(1)
GOOD_BINARY = {"inputs": [tensor("image", X, binary=True)]}
ERRORS = [  # (path, request JSON or (header JSON, blob) or raw bytes, extra headers, status, field, limit)
    ("/v2/models/nope/infer", image_request(), {}, 404, "model_name", None),
    ("/v2/models/tiny-ae.sample/infer", image_request(), {}, 404, "model_name", None),
    ("/v2/models/tiny-ae/versions/2/infer", image_request(), {}, 404, "version", '["10"]'),
    ("/v2/models/tiny-broken.encode/infer", image_request(), {}, 503, "name", None),  # failed verification
    ("/v2/models/tiny-ae.encode/infer", image_request(datatype="BYTES"), {}, 422, "inputs[0].datatype",
     '["FP32", "FP16", "UINT8"]'),
    ("/v2/models/tiny-ae.encode/infer", image_request(datatype="FP8"), {}, 422, "inputs[0].datatype", None),
    ("/v2/models/tiny-ae.encode/infer", image_request((1, 1, 15, 16)), {}, 422, "inputs[0].shape",
     "[-1, 1, 16, 16]"),
    ("/v2/models/tiny-ae.encode/infer", image_request((1, 16, 16)), {}, 422, "inputs[0].shape", None),
    ("/v2/models/tiny-ae.encode/infer", image_request((17, 1, 16, 16)), {}, 422, "inputs[0].shape", "1..16"),
    ("/v2/models/tiny-dyn.encode/infer", image_request((1, 1, 4, 4)), {}, 422, "inputs[0].shape", ">= 8x8"),
    ("/v2/models/tiny-ae.encode/infer", {"inputs": [{**image_request()["inputs"][0], "name": "img"}]}, {}, 422,
     "inputs[0].name", '["image"]'),
    ("/v2/models/tiny-ae.encode/infer", {"inputs": [{**image_request()["inputs"][0], "data": [0.5]}]}, {}, 422,
     "inputs[0].data", "256"),
    ("/v2/models/tiny-ae.encode/infer", {"inputs": [{**image_request()["inputs"][0], "data": ["a"] * 256}]}, {},
     422, "inputs[0].data", "FP32"),
    ("/v2/models/tiny-ae.encode/infer", {"inputs": [{"name": "image", "shape": [1, 1, 16, 16], "datatype": "FP32"}]},
     {}, 422, "inputs[0].data", None),
    ("/v2/models/tiny-ae.encode/infer", {"inputs": "image"}, {}, 422, "inputs", None),
    ("/v2/models/tiny-ddim.denoise/infer", {"inputs": [tensor("x_t", np.zeros((1, 1, 8, 8), np.float32))]}, {},
     422, "inputs", '["x_t", "t", "condition"]'),
    ("/v2/models/tiny-ae.encode/infer", {**image_request(), "outputs": [{"name": "z"}]}, {}, 422, "outputs[0].name",
     '["latent"]'),
    ("/v2/models/tiny-ae/infer", {**image_request(), "parameters": {"op": "sample"}}, {}, 422, "parameters.op",
     None),
    ("/v2/models/tiny-ae.encode/infer", {**image_request(), "parameters": {"op": "decode"}}, {}, 422,
     "parameters.op", '["encode"]'),
    ("/v2/models/tiny-ae.encode/infer", {**image_request(), "parameters": {"timeout": -5}}, {}, 422,
     "parameters.timeout", None),
    ("/v2/models/tiny-ae.encode/infer", ({"inputs": [{**GOOD_BINARY["inputs"][0], "parameters": {
        "binary_data_size": 1000}}]}, X.tobytes()), {}, 422, "inputs[0].parameters.binary_data_size", "1024"),
    ("/v2/models/tiny-ae.encode/infer", (GOOD_BINARY, X.tobytes()[:-4]), {}, 422,
     "inputs[0].parameters.binary_data_size", "1020"),
    ("/v2/models/tiny-ae.encode/infer", (GOOD_BINARY, X.tobytes() + b"tail"), {}, 422, HEADER, "1024"),
    ("/v2/models/tiny-ae.encode/infer", (GOOD_BINARY, np.full_like(X, np.nan).tobytes()), {}, 422, "inputs[0].data",
     "finite"),
    ("/v2/models/tiny-ae.encode/infer", b'{"inputs": [', {}, 422, "body", None),
    ("/v2/models/tiny-ae.encode/infer", json.dumps(image_request()).encode(), {HEADER: "999999"}, 422, HEADER, None),
    ("/v2/models/tiny-ae.encode/infer", json.dumps(image_request()).encode(), {HEADER: "-3"}, 422, HEADER, None),
    ("/v2/models/tiny-ae.encode/infer", b" " * 200_001, {}, 413, "body", "200000"),  # max_upload_bytes
    ("/v2/models/tiny-ae.encode/infer", b"\x1f\x8b", {"Content-Encoding": "gzip"}, 415, "Content-Encoding", None),
]


@pytest.mark.parametrize(("path", "payload", "headers", "status", "field", "limit"), ERRORS)
def test_client_mistakes_are_v2_errors_naming_field_and_limit(client, path, payload, headers, status, field, limit):
    if isinstance(payload, tuple):
        body, headers = binary_body(payload[0], [payload[1]])
    else:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    assert_v2_error(client.post(path, content=body, headers=headers), status, field, limit)


def test_answer_size_is_refused_before_the_work_runs():
    latent = TensorSpec(name="latent", shape=[-1, 8])  # 16 x 8 = 128 values: JSON ~12 KB, binary ~2 KB to encode
    with pytest.raises(NotAcceptable) as as_json:
        reserve_answer([(latent, False)], 16, SimpleNamespace(max_request_memory_bytes=10_000))
    assert (as_json.value.field, as_json.value.limit) == ("outputs.parameters.binary_data", 10_000)
    reserve_answer([(latent, True)], 16, SimpleNamespace(max_request_memory_bytes=10_000))  # binary fits
    with pytest.raises(PayloadTooLarge):
        reserve_answer([(latent, True)], 16, SimpleNamespace(max_request_memory_bytes=1_000))


def test_version_routes_reach_each_served_version(store):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(store, version_policy="latest:2", warmup=False))) as client:
        assert client.get("/v2/models/tiny-ae.encode").json()["versions"] == ["2", "10"]  # 9 does not load
        x = images(2)
        latents = {}
        for version in ("2", "10"):
            answer = client.post(f"/v2/models/tiny-ae.encode/versions/{version}/infer", json={"inputs": [
                tensor("image", x)]})
            assert answer.headers["X-Model-Version"] == answer.json()["model_version"] == version
            latents[version] = outputs_of(answer)["latent"]
        np.testing.assert_array_equal(latents["2"], latents["10"])  # version 2 is a copy of 10
        assert client.post("/v2/models/tiny-ae.encode/infer", json={"inputs": [tensor("image", x)]}).headers[
            "X-Model-Version"] == "10"  # the plain route: the default version
        assert_v2_error(client.post("/v2/models/tiny-ae.encode/versions/9/infer", json={"inputs": []}), 404,
                        "version", '["2", "10"]')


def test_timeout_parameter_is_a_deadline(client):
    answer = client.post("/v2/models/tiny-ae.encode/infer", json={**image_request(), "parameters": {"timeout": 1}})
    assert answer.status_code == 504 and answer.json()["error"].startswith("deadline_exceeded:")


# ----------------------------------------------------------------------------------------- one path with v1
def sample_value(text: str, metric: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(rf"{metric}\{{(.*)\}} (\S+)", line)
        if match and ",".join(sorted(match.group(1).split(","))) == wanted:
            return float(match.group(2))
    return 0.0


def test_v2_requests_run_on_the_engine_and_are_counted(client):
    labels = {"model": "tiny-ae", "version": "10", "op": "reconstruct"}
    before = client.get("/metrics").text
    client.post("/v2/models/tiny-ae.reconstruct/infer", json={"inputs": [tensor("image", images(2))]})
    client.post("/v2/models/tiny-ae.reconstruct/infer", json=image_request((1, 1, 15, 16)))
    after = client.get("/metrics").text
    for metric, extra, grew in (("aeserve_requests_total", {"status": "200"}, 1),
                                ("aeserve_requests_total", {"status": "422"}, 1),
                                ("aeserve_failures_total", {"reason": "invalid_input"}, 1),
                                ("aeserve_batch_size_sum", {}, 2),  # the engine ran the 2 frames
                                ("aeserve_request_items_sum", {}, 2),
                                ("aeserve_codec_decode_seconds_count", {"format": "json"}, 1),
                                ("aeserve_codec_encode_seconds_count", {"format": "json"}, 1)):
        assert sample_value(after, metric, **labels, **extra) - sample_value(before, metric, **labels, **extra) \
            == grew, metric


def test_v2_shares_admission_and_the_memory_pool(client):
    state = client.app.state
    admission = state.admission
    admission.in_flight += admission.limit  # as if the service were full
    try:
        answer = client.post("/v2/models/tiny-ae.encode/infer", json=image_request())
    finally:
        admission.in_flight -= admission.limit
    assert_v2_error(answer, 429, "requests", str(admission.limit))
    assert "Retry-After" in answer.headers
    pool = input_pool(state, state.settings)
    pool.held += pool.limit  # as if the requests in flight held the whole pool
    try:
        answer = client.post("/v2/models/tiny-ae.encode/infer", json=image_request())
    finally:
        pool.held -= pool.limit
    assert_v2_error(answer, 429, "body", str(pool.limit))


def test_openapi_documents_the_v2_bodies(client):
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer"):
        operation = paths[route]["post"]
        assert set(operation["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
        assert operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/V2Error")
    assert "/v2/models/{model_name}/ready" in paths and "/v2/health/ready" in paths


def test_middleware_refusals_on_v2_paths_have_the_v2_shape(store):
    """A missing token (401) and a draining server (503) answer v2 clients as v2 errors, v1 clients as v1's."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    token = "test-token-0123456789abcdef"
    with TestClient(create_app(make_settings(store, api_token=token, warmup=False))) as client:
        refused = client.get("/v2/models/tiny-ae.encode")
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert refused.json()["error"].startswith("unauthorized: missing bearer token")
        assert client.get("/v1/models/tiny-ae").json()["error"]["code"] == "unauthorized"
        assert client.get("/v2/health/live").status_code == 200  # probes need no token
        client.app.state.drain.draining = True
        try:
            draining = client.post("/v2/models/tiny-ae.encode/infer", json={"inputs": []},
                                   headers={"Authorization": f"Bearer {token}"})
        finally:
            client.app.state.drain.draining = False
        assert draining.status_code == 503 and draining.json() == {
            "error": "shutting_down: the server is shutting down"}
