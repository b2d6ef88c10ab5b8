"""Every endpoint's happy path; the client mistakes (4xx naming the field and the limit) are in test_api_errors."""

from __future__ import annotations

import io
import json

import numpy as np
import onnxruntime as ort
import pytest
import tifffile
from PIL import Image

from app import codecs
from tests.app.conftest import assert_error, make_settings, npy_bytes

RNG = np.random.default_rng(1)


def images(n: int, h: int = 16, w: int = 16) -> np.ndarray:
    return RNG.random((n, 1, h, w)).astype(np.float32)


def png(array_hw: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array_hw).save(buffer, format="PNG")
    return buffer.getvalue()


def load_npy(content: bytes) -> np.ndarray:
    return np.load(io.BytesIO(content))


def session(store, model: str, version: str, file: str) -> ort.InferenceSession:
    return ort.InferenceSession(str(store / model / version / file), providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------- system
def test_models_list_states_and_reasons(client):
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["tiny-ae"]["version"] == "10"  # numeric order: 10 > 9 > 2
    assert models["tiny-ae"]["state"] == "ready"
    assert models["tiny-ae"]["providers"]["encode"] == "CPUExecutionProvider"
    assert models["tiny-broken"]["state"] == "unavailable"
    assert "sha256 mismatch" in models["tiny-broken"]["reason"]
    assert "README.md" not in models


def test_model_summary(client):
    body = client.get("/v1/models/tiny-ae").json()
    assert body["capabilities"] == ["encode", "decode", "reconstruct", "sample", "attention-map"]
    assert body["ops"]["encode"]["inputs"][0]["shape"] == [-1, 1, 16, 16]
    assert body["ops"]["reconstruct"]["serving_format"] == "onnx"
    assert body["ops"]["reconstruct"]["provider"] == "CPUExecutionProvider"
    assert body["preprocessing"]["input_size"] == [16, 16]
    assert {a["path"] for a in body["artifacts"]} >= {"encode.onnx", "reconstruct.pt2"}
    assert body["artifacts"][0]["parity_max_abs_err"] == {"2x1x16x16": 0.0}
    assert body["training"]["val_psnr"] == 12.5
    assert body["metrics"]["heldout"]["model"]["psnr"] == 11.0  # the quality report's held-out figures
    assert body["saliency"]["available"] is True
    assert "torch.export" in body["saliency"]["method"]


def test_health_ready_metrics(client, store):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    # the readiness gauges are process-wide and other tests' apps over this store set them as they start and
    # stop: read them from an app that has just started (one app per process in production)
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(make_settings(store, warmup=False))) as fresh:
        metrics = fresh.get("/metrics")
    assert metrics.status_code == 200
    assert 'aeserve_model_ready{model="tiny-ae",version="10"} 1.0' in metrics.text
    assert 'aeserve_model_ready{model="tiny-broken",version="1"} 0.0' in metrics.text


def test_unavailable_and_unknown_models(client):
    error = assert_error(
        client.post("/v1/models/tiny-broken/encode", content=npy_bytes(images(1))),
        503,
        field="name",
        code="model_unavailable",
    )
    assert "sha256" in error["message"]
    error = assert_error(
        client.post("/v1/models/nope/encode", content=b""), 404, field="name", code="model_not_found"
    )
    assert "tiny-ae" in error["limit"]
    assert_error(client.get("/v1/models/nope"), 404, field="name")
    assert client.get("/v1/models/tiny-broken").json()["state"] == "unavailable"


# ----------------------------------------------------------------------------------------- encode / decode
def test_encode_stack_gives_t_by_d_latents_matching_onnx(client, store):
    x = images(5)
    response = client.post("/v1/models/tiny-ae/encode", content=npy_bytes(x))
    assert response.status_code == 200
    body = response.json()
    assert body["shape"] == [5, 8]
    expected = session(store, "tiny-ae", "10", "encode.onnx").run(None, {"image": x})[0]
    np.testing.assert_allclose(np.array(body["latents"]), expected, atol=1e-5)
    npy = client.post(
        "/v1/models/tiny-ae/encode", content=npy_bytes(x), headers={"Accept": "application/x-npy"}
    )
    assert npy.headers["content-type"] == codecs.NPY_MEDIA_TYPE
    np.testing.assert_allclose(load_npy(npy.content), expected, atol=1e-5)


def test_encode_png_tiff_and_multipart(client):
    gray8 = RNG.integers(0, 256, (16, 16), dtype=np.uint8)
    gray16 = RNG.integers(0, 65536, (16, 16), dtype=np.uint16)
    a = client.post("/v1/models/tiny-ae/encode", content=png(gray8), headers={"Content-Type": "image/png"})
    b = client.post("/v1/models/tiny-ae/encode", content=npy_bytes(gray8 / 255.0))
    np.testing.assert_allclose(a.json()["latents"], b.json()["latents"], atol=1e-5)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.stack([gray16, gray16]), photometric="minisblack")
    t = client.post(
        "/v1/models/tiny-ae/encode", content=buffer.getvalue(), headers={"Content-Type": "image/tiff"}
    )
    assert t.json()["shape"] == [2, 8]
    files = [
        ("files", ("a.png", png(gray8), "image/png")),
        ("files", ("b.npy", npy_bytes(images(3)), "x")),
        ("file", ("c.png", png(gray8), "image/png")),
    ]
    m = client.post("/v1/models/tiny-ae/encode", files=files)
    assert m.status_code == 200 and m.json()["shape"] == [5, 8]
    np.testing.assert_allclose(m.json()["latents"][0], a.json()["latents"][0], atol=1e-5)


def test_encode_rgb_is_converted_and_other_sizes_resized(client):
    rgb = RNG.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    response = client.post("/v1/models/tiny-ae/encode", content=png(rgb))
    assert response.status_code == 200 and response.json()["shape"] == [1, 8]


def test_dynamic_encode_accepts_any_size_without_resizing(client, store):
    x = images(2, 24, 40)
    body = client.post("/v1/models/tiny-dyn/encode", content=npy_bytes(x)).json()
    expected = session(store, "tiny-dyn", "1", "encode.onnx").run(None, {"image": x})[0]
    np.testing.assert_allclose(np.array(body["latents"]), expected, atol=1e-5)
    assert_error(
        client.post("/v1/models/tiny-dyn/encode", content=npy_bytes(images(1, 4, 40))),
        422,
        field="file",
        limit=">= 8x8",
        code="image_too_small",
    )


def test_decode_json_and_npy(client, store):
    z = RNG.standard_normal((3, 8)).astype(np.float32)
    expected = session(store, "tiny-ae", "10", "decode.onnx").run(None, {"latent": z})[0]
    out = client.post("/v1/models/tiny-ae/decode?format=npy", json={"latents": z.tolist()})
    np.testing.assert_allclose(load_npy(out.content), expected, atol=1e-5)
    out = client.post(
        "/v1/models/tiny-ae/decode", content=npy_bytes(z), headers={"Accept": "application/json"}
    )
    assert out.json()["shape"] == [3, 1, 16, 16]
    grid = client.post("/v1/models/tiny-ae/decode", json={"latents": z.tolist()})
    assert grid.headers["content-type"] == "image/png"
    assert (grid.headers["x-grid-rows"], grid.headers["x-grid-cols"], grid.headers["x-image-count"]) == (
        "2",
        "2",
        "3",
    )


def test_fixed_render_decode_with_empty_body(client, store):
    expected = session(store, "tiny-render", "1", "decode.onnx").run(None, {})[0]
    out = client.post("/v1/models/tiny-render/decode?format=npy")
    np.testing.assert_allclose(load_npy(out.content), expected, atol=1e-6)
    picture = client.post("/v1/models/tiny-render/decode")
    decoded = codecs.decode_image_bytes(picture.content)
    assert decoded.shape == (1, 3, 8, 8)
    np.testing.assert_allclose(decoded[0], (expected[0] + 1) / 2, atol=1 / 255)
    assert_error(
        client.post("/v1/models/tiny-render/decode", json={"latents": [[1.0]]}), 422, field="latents", limit=0
    )


# ----------------------------------------------------------------------------------------- reconstruct
def test_reconstruct_png_npy_json_and_16_bit(client, store):
    x = images(1)
    expected = session(store, "tiny-ae", "10", "reconstruct.onnx").run(None, {"image": x})[0]
    npy = client.post(
        "/v1/models/tiny-ae/reconstruct", content=npy_bytes(x), headers={"Accept": "application/x-npy"}
    )
    np.testing.assert_allclose(load_npy(npy.content), expected, atol=1e-5)
    png8 = client.post("/v1/models/tiny-ae/reconstruct", content=npy_bytes(x))
    assert png8.headers["content-type"] == "image/png" and png8.headers["x-image-count"] == "1"
    np.testing.assert_allclose(codecs.decode_image_bytes(png8.content)[0], expected[0], atol=0.5 / 255 + 1e-5)
    png16 = client.post("/v1/models/tiny-ae/reconstruct?bit_depth=16", content=npy_bytes(x))
    np.testing.assert_allclose(codecs.decode_image_bytes(png16.content)[0], expected[0], atol=1e-4)
    js = client.post("/v1/models/tiny-ae/reconstruct?format=json", content=npy_bytes(x)).json()
    assert js["shape"] == [1, 1, 16, 16] and js["output_range"] == [0.0, 1.0]


# ----------------------------------------------------------------------------------------- attention
def test_attention_map_json_and_png(client, store, tiny_ae_modules):
    torch = pytest.importorskip("torch")
    x = images(2)
    body = client.post("/v1/models/tiny-ae/attention-map", content=npy_bytes(x)).json()
    expected = session(store, "tiny-ae", "10", "attention.onnx").run(None, {"image": x})[0]
    np.testing.assert_allclose(np.array(body["attention"]), expected, atol=1e-5)
    assert body["attention_shape"] == [2, 16, 16] and body["saliency_shape"] == [2, 1, 16, 16]
    xt = torch.from_numpy(x).requires_grad_(True)
    loss = ((tiny_ae_modules["reconstruct"](xt) - xt) ** 2).sum()
    (grad,) = torch.autograd.grad(loss, xt)
    grad = grad.abs().numpy()
    reference = (grad - grad.min()) / (grad.max() - grad.min() + 1e-8)
    np.testing.assert_allclose(np.array(body["saliency"]), reference, atol=1e-4)
    assert "input-gradient via torch.export program" in body["methods"]["saliency"]
    picture = client.post("/v1/models/tiny-ae/attention-map?format=png", content=npy_bytes(x))
    assert picture.headers["content-type"] == "image/png"
    assert picture.headers["x-saliency-method"] == "input-gradient via torch.export program"
    assert codecs.decode_image_bytes(picture.content).shape[1] == 3
    alone = client.post("/v1/models/tiny-ae/attention-map?saliency=false", content=npy_bytes(x)).json()
    assert alone["saliency"] is None and alone["attention_shape"] == [2, 16, 16]


# ----------------------------------------------------------------------------------------- sample
def test_sample_prior_gaussian_is_seeded(client, store):
    a = client.post("/v1/models/tiny-ae/sample?format=npy", json={"num_samples": 3, "seed": 7})
    b = client.post("/v1/models/tiny-ae/sample?format=npy", json={"num_samples": 3, "seed": 7})
    c = client.post("/v1/models/tiny-ae/sample?format=npy", json={"num_samples": 3, "seed": 8})
    assert a.headers["x-seed"] == "7" and a.headers["x-sampler"] == "prior_gaussian"
    np.testing.assert_array_equal(load_npy(a.content), load_npy(b.content))
    assert not np.allclose(load_npy(a.content), load_npy(c.content))
    z = np.random.default_rng(7).standard_normal((3, 8), dtype=np.float32)
    expected = session(store, "tiny-ae", "10", "decode.onnx").run(None, {"latent": z})[0]
    np.testing.assert_allclose(load_npy(a.content), expected, atol=1e-5)
    unseeded = client.post("/v1/models/tiny-ae/sample")
    assert unseeded.status_code == 200 and unseeded.headers["x-seed"].isdigit()


def test_sample_fixed_render(client):
    out = client.post("/v1/models/tiny-render/sample?format=npy", json={"num_samples": 2})
    array = load_npy(out.content)
    assert array.shape == (2, 3, 8, 8)
    np.testing.assert_array_equal(array[0], array[1])


def test_sample_ddim(client):
    body = {"num_samples": 2, "seed": 3, "steps": 5, "condition": {"a": 0.5, "b": -0.5}}
    a = client.post("/v1/models/tiny-ddim/sample?format=npy", json=body)
    assert a.status_code == 200, a.text
    b = client.post("/v1/models/tiny-ddim/sample?format=npy", json={**body, "condition": [0.5, -0.5]})
    array = load_npy(a.content)
    assert array.shape == (2, 1, 8, 8) and a.headers["x-steps"] == "5"
    np.testing.assert_array_equal(array, load_npy(b.content))
    assert np.abs(array).max() <= 1.0 + 1e-6
    png_out = client.post("/v1/models/tiny-ddim/sample", json=body)
    assert png_out.headers["content-type"] == "image/png"


def test_sample_ddim_named_condition_values(client):
    """Names from the manifest's vocabulary: a list maps to the index, a dict to its number."""
    body = {"num_samples": 1, "seed": 4, "steps": 3}
    named = client.post("/v1/models/tiny-ddim/sample?format=npy",
                        json={**body, "condition": {"a": "high", "b": "calm"}})
    numeric = client.post("/v1/models/tiny-ddim/sample?format=npy", json={**body, "condition": [1.0, -0.5]})
    assert named.status_code == 200, named.text
    np.testing.assert_array_equal(load_npy(named.content), load_npy(numeric.content))
    other = client.post("/v1/models/tiny-ddim/sample?format=npy", json={**body, "condition": [0.0, -0.5]})
    assert not np.array_equal(load_npy(named.content), load_npy(other.content))

    bad = client.post("/v1/models/tiny-ddim/sample", json={**body, "condition": {"a": "medium", "b": 0}})
    assert bad.status_code == 422
    error = bad.json()["error"]
    assert error["field"] == "condition.a" and error["limit"] == ["low", "high", "a number"]


def test_openapi_lists_every_route(bare_client):
    paths = json.loads(bare_client.get("/openapi.json").text)["paths"]
    for route in ("encode", "decode", "reconstruct", "attention-map", "sample"):
        assert f"/v1/models/{{name}}/{route}" in paths
    raw = ["intensity", "angular_sampling_mrad", "counts_per_probe"]  # raw 4D-STEM frames (app.preprocess)
    queries = {"encode": ["format", *raw, "dtype"], "reconstruct": ["format", "bit_depth", *raw],
               "attention-map": ["format", "saliency", *raw]}
    bodies = {"decode": ["application/json", "application/x-npy", "application/octet-stream"],
              "sample": ["application/json"]}
    for route in ("encode", "decode", "reconstruct", "attention-map", "sample"):
        operation = paths[f"/v1/models/{{name}}/{route}"]["post"]
        params = [p["name"] for p in operation["parameters"] if p["in"] == "query"]
        assert params == queries.get(route, ["format", "bit_depth"])
        assert operation["operationId"].startswith(route.replace("-", "_") + "_v1_models")
        # every route documents its body (the raw image and latent bodies too: schemathesis fuzzes them)
        media = list(operation["requestBody"]["content"])
        assert media == bodies.get(route, ["image/png", "image/tiff", "application/x-npy", "application/octet-stream",
                                           "multipart/form-data"])
