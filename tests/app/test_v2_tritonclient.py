"""The official v2 client, `tritonclient.http`, against a real uvicorn process over the tiny store:
encode -> decode -> reconstruct with binary tensors, each answer equal to v1's for the same input."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.app.conftest import npy_bytes
from tests.app.service_process import running_service

httpclient = pytest.importorskip("tritonclient.http", reason="the v2 client test needs tritonclient[http] (dev extra)")
from tritonclient.utils import InferenceServerException  # noqa: E402 - after the importorskip

pytestmark = pytest.mark.slow
SAME_BATCH_ATOL = 1e-6  # v2 and v1 run the same engine on the same batch
# one 4-frame batch against four 1-frame batches: measured 0 for tiny-ae on onnxruntime CPU (bound kept loose,
# as onnxruntime may pick other kernels for other batch sizes on other machines)
CROSS_BATCH_ATOL = 1e-5


def v1_npy(base_url: str, path: str, array: np.ndarray) -> np.ndarray:
    answer = httpx.post(f"{base_url}{path}", content=npy_bytes(array), timeout=30,
                        headers={"Content-Type": "application/x-npy", "Accept": "application/x-npy"})
    assert answer.status_code == 200, answer.text
    return np.load(io.BytesIO(answer.content))


def infer(client, model: str, name: str, array: np.ndarray, output: str) -> np.ndarray:
    """One binary-in, binary-out call; checks the answer really came as binary data."""
    tensor = httpclient.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=True)
    requested = httpclient.InferRequestedOutput(output, binary_data=True)
    result = client.infer(model, [tensor], outputs=[requested], model_version="10", request_id="r1")
    described = result.get_output(output)
    values = result.as_numpy(output)
    assert described["parameters"]["binary_data_size"] == values.nbytes
    assert result.get_response()["model_name"] == model and result.get_response()["id"] == "r1"
    return values


def test_tritonclient_round_trip_equals_v1(store: Path, tmp_path: Path) -> None:
    with running_service(store, tmp_path) as service:
        service.wait_until(lambda: httpx.get(f"{service.base_url}/readyz").status_code == 200, what="/readyz")
        client = httpclient.InferenceServerClient(url=service.base_url.removeprefix("http://"))
        try:
            assert client.is_server_live() and client.is_server_ready()
            assert client.get_server_metadata()["extensions"] == ["binary_tensor_data"]
            assert client.is_model_ready("tiny-ae.encode", model_version="10")
            metadata = client.get_model_metadata("tiny-ae.decode")
            assert (metadata["inputs"][0]["name"], metadata["outputs"][0]["shape"]) == ("latent", [-1, 1, 16, 16])

            x = np.random.default_rng(3).random((4, 1, 16, 16), dtype=np.float32)
            latents = infer(client, "tiny-ae.encode", "image", x, "latent")
            images = infer(client, "tiny-ae.decode", "latent", latents, "image")
            recon = infer(client, "tiny-ae.reconstruct", "image", x, "reconstruction")
            base = service.base_url
            np.testing.assert_allclose(latents, v1_npy(base, "/v1/models/tiny-ae/encode", x), rtol=0,
                                       atol=SAME_BATCH_ATOL)
            np.testing.assert_allclose(images, v1_npy(base, "/v1/models/tiny-ae/decode", latents), rtol=0,
                                       atol=SAME_BATCH_ATOL)
            np.testing.assert_allclose(recon, v1_npy(base, "/v1/models/tiny-ae/reconstruct", x), rtol=0,
                                       atol=SAME_BATCH_ATOL)
            one_by_one = np.concatenate([v1_npy(base, "/v1/models/tiny-ae/encode", x[i : i + 1]) for i in range(4)])
            np.testing.assert_allclose(latents, one_by_one, rtol=0, atol=CROSS_BATCH_ATOL)

            with pytest.raises(InferenceServerException) as wrong_version:
                infer_version(client, "tiny-ae.encode", "2", x)
            assert wrong_version.value.status() == "404" and "version" in wrong_version.value.message()
            with pytest.raises(InferenceServerException) as wrong_op:
                client.get_model_metadata("tiny-ae.sample")
            assert wrong_op.value.status() == "404" and "tiny-ae.encode" in wrong_op.value.message()
        finally:
            client.close()


def infer_version(client, model: str, version: str, array: np.ndarray) -> None:
    tensor = httpclient.InferInput("image", list(array.shape), "FP32")
    tensor.set_data_from_numpy(array, binary_data=True)
    client.infer(model, [tensor], model_version=version)
