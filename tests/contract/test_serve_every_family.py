"""End to end: a store written by `training` (one tiny model of every family) served by `app` over HTTP.

Once per module: build each model untrained (fixed seed), write it with the real store writer
(`training.store.write_version`, formats onnx + torch_export), start the service on that store with
`TestClient(create_app(Settings(...)))` and check real behaviour through HTTP against the eager models.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import wait_until_loaded
from tests.contract.served_ddim import (
    EPS_TOL,
    FREE_RUNNING_TOL,
    STEP_TOL,
    DenoiseRecorder,
    reference_ddim,
    trajectory_errors,
)
from training.registry import create_model
from training.store import write_version

pytestmark = pytest.mark.slow

V3, STEM, PROG, VAE, DIFF = "e2e-v3", "e2e-stem", "e2e-progressive", "e2e-vae", "e2e-diffusion"
MAX_NUM_SAMPLES = 8

# (store name, registry name, config overrides): tiny, untrained (weights from torch.manual_seed(0)).
MODELS: dict[str, tuple[str, dict]] = {
    V3: ("v3_tiny", {"input_size": [32, 32], "latent_strategy": "conv", "channel_config": [8, 16],
                     "latent_size": 128}),
    STEM: ("stem_ae", {"channels": 8, "out_shape": [32, 32], "latent_dim": 8}),
    PROG: ("progressive_decoder_tiny", {"input_size": 32, "output_size": 16}),
    VAE: ("conv_decoder_vae", {"encoder_channels": [8, 16],
                               "decoder": {"latent_dim": 8, "hidden_dims": [16, 8], "output_size": [16, 16]}}),
    DIFF: ("diffusion_unet_tiny", {"base_channels": 8, "image_size": 16, "time_emb_dim": 32,
                                   "meta_emb_dim": 32, "norm_groups": 4}),
}
CAPABILITIES = {
    V3: {"encode", "decode", "reconstruct", "attention-map"},
    STEM: {"encode", "decode", "reconstruct"},
    PROG: {"decode", "sample"},
    VAE: {"encode", "decode", "reconstruct", "sample"},
    DIFF: {"sample"},
}


@dataclass
class Served:
    client: TestClient
    store: Path
    models: dict[str, torch.nn.Module]  # the eager models, exactly as written to the store


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    store = tmp_path_factory.mktemp("e2e") / "store"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    models = {}
    try:
        for name, (registry_name, overrides) in MODELS.items():
            torch.manual_seed(0)
            model = create_model(registry_name, **overrides).eval()
            write_version(model, store, name, "1", formats=("onnx", "torch_export"), max_batch_size=8,
                          training={"model": registry_name}, description=f"e2e {registry_name}")
            models[name] = model
        settings = Settings(store=store, device="cpu", models="", max_batch_size=8,
                            max_num_samples=MAX_NUM_SAMPLES, intra_op_threads=1)
        with TestClient(create_app(settings)) as client:
            wait_until_loaded(client)
            yield Served(client, store, models)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------- helpers


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    return buf.getvalue()


def load_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def post_npy(client: TestClient, model: str, op: str, array: np.ndarray, **params) -> np.ndarray:
    response = client.post(f"/v1/models/{model}/{op}", content=npy(array), params={"format": "npy", **params},
                           headers={"content-type": "application/x-npy"})
    assert response.status_code == 200, response.text
    return load_npy(response.content)


def sample(client: TestClient, model: str, **body) -> tuple[np.ndarray, bytes, dict]:
    response = client.post(f"/v1/models/{model}/sample", json=body, params={"format": "npy"})
    assert response.status_code == 200, response.text
    return load_npy(response.content), response.content, dict(response.headers)


def images(n: int, size: tuple[int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *size), dtype=np.float32)


def eager(fn, *args: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return fn(*(torch.from_numpy(np.asarray(a)) for a in args)).numpy()


# --------------------------------------------------------------------------------------------- tests


def test_ready_and_models_listed_with_capabilities(served: Served) -> None:
    ready = served.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["ready"] is True
    listed = {m["name"]: m for m in served.client.get("/v1/models").json()["models"]}
    assert set(listed) == set(MODELS)
    for name, item in listed.items():
        assert item["state"] == "ready", (name, item["reason"])
        assert set(item["capabilities"]) == CAPABILITIES[name], name
    summary = served.client.get(f"/v1/models/{V3}").json()
    assert summary["saliency"]["available"] is True
    assert summary["config"] == served.models[V3].get_config()


def test_v3_encode_reconstruct_attention(served: Served) -> None:
    client, model = served.client, served.models[V3]
    x = images(3, (32, 32), seed=1)
    latents = post_npy(client, V3, "encode", x)
    assert latents.shape == (3, model.config.latent_dim)
    np.testing.assert_allclose(latents, eager(model.encode, x[:, None]), atol=1e-4, rtol=0)
    # a T-frame NPY stack gives T x D latents, equal to encoding the frames one by one
    one_by_one = np.concatenate([post_npy(client, V3, "encode", frame) for frame in x])
    np.testing.assert_allclose(latents, one_by_one, atol=1e-5, rtol=0)

    recon = post_npy(client, V3, "reconstruct", x)
    assert recon.shape == (3, 1, 32, 32)
    np.testing.assert_allclose(recon, eager(model, x[:, None]), atol=1e-4, rtol=0)

    response = client.post(f"/v1/models/{V3}/attention-map", content=npy(x[:2]),
                           headers={"content-type": "application/x-npy"}, params={"format": "json"})
    assert response.status_code == 200, response.text
    body = response.json()
    attention = np.asarray(body["attention"], dtype=np.float32)
    want = eager(model.encoder.attention_matrix, x[:2, None])
    n = want.shape[1]
    assert attention.shape == (2, n, n) and body["attention_shape"] == [2, n, n]
    np.testing.assert_allclose(attention, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(attention.sum(-1), 1.0, atol=1e-4)  # rows of softmax weights
    saliency = np.asarray(body["saliency"], dtype=np.float32)
    assert saliency.shape == (2, 1, 32, 32) and body["saliency_shape"] == [2, 1, 32, 32]
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0 and saliency.max() > 0.5
    assert "attention_matrix" in body["methods"]["attention"]
    assert "reconstruct" in body["methods"]["saliency"]
    assert response.headers["X-Attention-Method"] and response.headers["X-Saliency-Method"]


def test_stem_encode_reconstruct(served: Served) -> None:
    client, model = served.client, served.models[STEM]
    x = images(4, (32, 32), seed=2)
    latents = post_npy(client, STEM, "encode", x)
    assert latents.shape == (4, 8) and (latents >= 0).all()
    np.testing.assert_allclose(latents, eager(model.encode, x[:, None]), atol=1e-4, rtol=0)
    recon = post_npy(client, STEM, "reconstruct", x)
    assert recon.shape == (4, 1, 32, 32)
    np.testing.assert_allclose(recon, eager(model, x[:, None]), atol=1e-4, rtol=0)
    decoded = post_npy(client, STEM, "decode", latents)
    np.testing.assert_allclose(decoded, eager(model.decode, latents), atol=1e-4, rtol=0)


def test_progressive_decoder_renders_its_image(served: Served) -> None:
    client, model = served.client, served.models[PROG]
    with torch.no_grad():
        want = model.decoder(model.input_vec).numpy()
    renders = []
    for _ in range(2):
        response = client.post(f"/v1/models/{PROG}/decode", content=b"", params={"format": "npy"})
        assert response.status_code == 200, response.text
        renders.append(load_npy(response.content))
    assert renders[0].shape == want.shape
    np.testing.assert_array_equal(renders[0], renders[1])
    np.testing.assert_allclose(renders[0], want, atol=1e-5, rtol=0)
    sampled, _, headers = sample(client, PROG, num_samples=2)
    assert headers["x-sampler"] == "fixed_render" and sampled.shape == (2, *want.shape[1:])
    np.testing.assert_allclose(sampled, np.repeat(want, 2, axis=0), atol=1e-5, rtol=0)


def test_vae_decode_and_seeded_sample(served: Served) -> None:
    client, model = served.client, served.models[VAE]
    z = np.random.default_rng(3).standard_normal((3, 8), dtype=np.float32)
    response = client.post(f"/v1/models/{VAE}/decode", json={"latents": z.tolist()}, params={"format": "npy"})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(load_npy(response.content), eager(model.decode, z), atol=1e-5, rtol=0)

    a, a_bytes, headers = sample(client, VAE, num_samples=3, seed=11)
    _, b_bytes, _ = sample(client, VAE, num_samples=3, seed=11)
    c, _, _ = sample(client, VAE, num_samples=3, seed=12)
    assert headers["x-seed"] == "11" and headers["x-sampler"] == "prior_gaussian"
    assert a_bytes == b_bytes and a.shape == (3, 1, 16, 16)
    assert not np.allclose(a, c)
    prior = np.random.default_rng(11).standard_normal((3, 8), dtype=np.float32)  # as app/api/sample.py
    np.testing.assert_allclose(a, eager(model.decode, prior), atol=1e-5, rtol=0)
    png = client.post(f"/v1/models/{VAE}/sample", json={"num_samples": 2, "seed": 11})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"


@pytest.fixture
def denoise_calls(served: Served, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, np.ndarray]]:
    """The step batches of the diffusion model's sampler during one test (x_t, t, condition, eps)."""
    runtime = served.client.app.state.models.get(DIFF).runtimes["denoise"]
    recorder = DenoiseRecorder(runtime.run)
    monkeypatch.setattr(runtime, "run", recorder)
    return recorder.calls


DIFF_COND = {"goal": 3, "format": 1, "tone": 0.25}
DIFF_BODY = {"num_samples": 2, "seed": 5, "steps": 10, "condition": DIFF_COND}
DIFF_VECTOR = np.tile(np.array([[3, 1, 0.25]], dtype=np.float32), (2, 1))


def test_diffusion_trajectories(served: Served, denoise_calls: list[dict[str, np.ndarray]]) -> None:
    """Seeded DDIM through HTTP, checked step by step (tests/contract/served_ddim.py says why and how)
    for several step counts, seeds and η; free-running, only 3 steps are compared with the eager model."""
    client, model = served.client, served.models[DIFF]
    spec = model.sampler_spec()
    errors, outputs = {}, {}
    for changes in ({}, {"steps": 3}, {"steps": 5}, {"seed": 6}, {"eta": 0.7}):
        body = {**DIFF_BODY, **changes}
        denoise_calls.clear()
        out, _, headers = sample(client, DIFF, **body)
        assert headers["x-steps"] == str(body["steps"]) and headers["x-seed"] == str(body["seed"])
        outputs[str(changes)] = out
        errors[str(changes)] = trajectory_errors(model, spec, denoise_calls, out, seed=body["seed"],
                                                 steps=body["steps"], condition=DIFF_VECTOR, eta=body.get("eta", 0.0))
    a = outputs["{}"]
    assert all(not np.allclose(a, other) for key, other in outputs.items() if key != "{}")
    free_running = float(np.abs(outputs["{'steps': 3}"] - reference_ddim(model, spec, 5, 2, 3, DIFF_VECTOR)).max())
    print(f"\ndiffusion: free-running 3 steps {free_running:.2e}; "
          + ", ".join(f"{name}: eps {e['eps']:.2e} step {e['step']:.2e}" for name, e in errors.items()))
    assert max(e["eps"] for e in errors.values()) <= EPS_TOL, errors
    assert max(e["step"] for e in errors.values()) <= STEP_TOL, errors
    assert free_running <= FREE_RUNNING_TOL


def test_diffusion_sample_options(served: Served) -> None:
    """Same request, same bytes; headers, clipping, condition forms, η, default steps, row independence."""
    client, model = served.client, served.models[DIFF]
    spec = model.sampler_spec()
    a, a_bytes, headers = sample(client, DIFF, **DIFF_BODY)
    _, b_bytes, _ = sample(client, DIFF, **DIFF_BODY)
    assert a.shape == (2, *spec["image_shape"]) and a_bytes == b_bytes
    assert headers["x-steps"] == "10" and headers["x-eta"] == "0" and headers["x-sampler"] == "ddim"
    assert np.abs(a).max() <= 1.0 + 1e-6  # clip_denoised
    other_cond, _, _ = sample(client, DIFF, **{**DIFF_BODY, "condition": {**DIFF_COND, "goal": 7}})
    assert not np.allclose(a, other_cond)
    as_list, _, _ = sample(client, DIFF, **{**DIFF_BODY, "condition": [3, 1, 0.25]})  # same condition, list form
    np.testing.assert_array_equal(a, as_list)
    noisy, _, headers = sample(client, DIFF, **{**DIFF_BODY, "eta": 0.7})
    again, _, _ = sample(client, DIFF, **{**DIFF_BODY, "eta": 0.7})
    assert headers["x-eta"] == "0.7" and not np.allclose(a, noisy)
    np.testing.assert_array_equal(noisy, again)
    default_steps = client.post(f"/v1/models/{DIFF}/sample", json={"seed": 5, "condition": DIFF_COND},
                                params={"format": "npy"})
    assert default_steps.status_code == 200 and default_steps.headers["x-steps"] == str(spec["default_steps"])
    # row i depends only on (seed, i, ...): the first row of a 2-sample request equals a 1-sample one
    # (3 steps: batch 1 and batch 2 kernels may round differently, and 3 steps amplify that little)
    three, _, _ = sample(client, DIFF, **{**DIFF_BODY, "steps": 3})
    first, _, _ = sample(client, DIFF, **{**DIFF_BODY, "steps": 3, "num_samples": 1})
    np.testing.assert_allclose(first[0], three[0], atol=1e-4, rtol=0)


BAD_LATENTS = np.ones((2, 8), dtype=np.float32)
BAD_LATENTS[1, 3] = np.nan
COND = {"goal": 1, "format": 0, "tone": 0.5}

# (method path, request kwargs, expected status, field named in the error)
ERROR_CASES = {
    "num_samples_zero": (f"{VAE}/sample", {"json": {"num_samples": 0}}, 422, "num_samples"),
    "num_samples_negative": (f"{DIFF}/sample", {"json": {"num_samples": -2, "condition": COND}}, 422,
                             "num_samples"),
    "num_samples_over_limit": (f"{VAE}/sample", {"json": {"num_samples": MAX_NUM_SAMPLES + 1}}, 422,
                               "num_samples"),
    "steps_zero": (f"{DIFF}/sample", {"json": {"steps": 0, "condition": COND}}, 422, "steps"),
    "steps_over_max": (f"{DIFF}/sample", {"json": {"steps": 1001, "condition": COND}}, 422, "steps"),
    "steps_on_non_ddim": (f"{VAE}/sample", {"json": {"steps": 5}}, 422, "steps"),
    "eta_negative": (f"{DIFF}/sample", {"json": {"eta": -0.1, "condition": COND}}, 422, "eta"),
    "eta_over_one": (f"{DIFF}/sample", {"json": {"eta": 1.5, "condition": COND}}, 422, "eta"),
    "unknown_condition_key": (f"{DIFF}/sample", {"json": {"condition": {**COND, "colour": 1.0}}}, 422,
                              "condition"),
    "missing_condition": (f"{DIFF}/sample", {"json": {"num_samples": 1}}, 422, "condition"),
    "wrong_condition_length": (f"{DIFF}/sample", {"json": {"condition": [1, 2]}}, 422, "condition"),
    "wrong_latent_length_json": (f"{VAE}/decode", {"json": {"latents": [[0.0] * 7]}}, 422, "latents"),
    "wrong_latent_length_npy": (f"{STEM}/decode", {"content": npy(np.zeros((2, 9), np.float32)),
                                                   "headers": {"content-type": "application/x-npy"}},
                                422, "latents"),
    "nan_in_latents": (f"{VAE}/decode", {"content": npy(BAD_LATENTS),
                                         "headers": {"content-type": "application/x-npy"}}, 422, "latents"),
    "nan_in_image": (f"{STEM}/encode", {"content": npy(np.full((32, 32), np.nan, np.float32)),
                                        "headers": {"content-type": "application/x-npy"}}, 422, "file"),
    "image_five_dims": (f"{V3}/encode", {"content": npy(np.zeros((1, 1, 1, 32, 32), np.float32)),
                                         "headers": {"content-type": "application/x-npy"}}, 422, "file"),
    "image_too_small": (f"{V3}/encode", {"content": npy(np.zeros((2, 2), np.float32)),
                                         "headers": {"content-type": "application/x-npy"}}, 422, "file"),
    "latents_to_fixed_render": (f"{PROG}/decode", {"json": {"latents": [[1.0]]}}, 422, "latents"),
    "unknown_model": ("no-such-model/encode", {"content": npy(np.zeros((32, 32), np.float32))}, 404, "name"),
    "capability_encode_on_diffusion": (f"{DIFF}/encode", {"content": npy(np.zeros((16, 16), np.float32))}, 404,
                                       "capability"),
    "capability_sample_on_v3": (f"{V3}/sample", {"json": {}}, 404, "capability"),
    "capability_attention_on_stem": (f"{STEM}/attention-map", {"content": npy(np.zeros((32, 32), np.float32))},
                                     404, "capability"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_error_table(served: Served, case: str) -> None:
    path, kwargs, status, field = ERROR_CASES[case]
    response = served.client.post(f"/v1/models/{path}", **kwargs)
    assert response.status_code == status, (case, response.text)
    error = response.json()["error"]
    assert error["field"] == field, (case, error)
    assert error["code"] and error["message"], (case, error)


def _samples(metrics: str, family: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample line of a metric family in Prometheus text format."""
    out = []
    for match in re.finditer(rf"^{family}\{{(.*?)\}} (\S+)$", metrics, flags=re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        out.append((labels, float(match.group(2))))
    return out


def test_metrics(served: Served) -> None:
    client = served.client
    # at least one request per model, whatever order the tests ran in
    for name, op, content in ((V3, "encode", npy(images(1, (32, 32)))), (STEM, "encode", npy(images(1, (32, 32)))),
                              (PROG, "decode", b""), (VAE, "sample", None), (DIFF, "sample", None)):
        if content is None:
            body = {"seed": 1, "steps": 2, "condition": COND} if name == DIFF else {"seed": 1}
            response = client.post(f"/v1/models/{name}/{op}", json=body)
        else:
            response = client.post(f"/v1/models/{name}/{op}", content=content)
        assert response.status_code == 200, (name, response.text)
    for case in ("unknown_condition_key", "capability_sample_on_v3"):  # a counted 4xx at least once
        path, kwargs, _, _ = ERROR_CASES[case]
        client.post(f"/v1/models/{path}", **kwargs)

    text = client.get("/metrics").text
    requests = _samples(text, "aeserve_requests_total")
    for name in MODELS:
        ok = [v for labels, v in requests if labels["model"] == name and labels["status"] == "200"]
        assert ok and sum(ok) >= 1, name
    ours = [(labels, v) for labels, v in requests if labels["model"] in MODELS]
    assert not [labels for labels, _ in ours if labels["status"].startswith("5")], "a request answered 5xx"
    assert any(labels["status"] == "422" and labels["model"] == DIFF for labels, _ in ours)
    assert any(labels["status"] == "404" and labels["model"] == V3 for labels, _ in ours)
    failures = _samples(text, "aeserve_failures_total")
    assert not [lb for lb, v in failures if lb["model"] in MODELS and lb["reason"] in ("internal", "engine_error")
                and v > 0]
    batches = [(lb, v) for lb, v in _samples(text, "aeserve_batch_size_count") if lb["model"] in MODELS]
    assert {lb["model"] for lb, v in batches if v > 0} >= {V3, STEM, PROG, VAE}
    steps = [v for lb, v in _samples(text, "aeserve_diffusion_step_batch_size_count") if lb["model"] == DIFF]
    assert steps and steps[0] > 0
    assert json.loads(client.get("/readyz").text)["ready"] is True
