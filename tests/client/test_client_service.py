"""aeserve_client against a real uvicorn process over the tiny store: every call equals the v1 answer sent by
hand, `encode_sequence` keeps order over hundreds of frames within the service's limits, float16 works,
and a service that sheds load with 429 + Retry-After is waited out."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from aeserve_client import AsyncClient, Client, ClientError
from tests.app.service_process import Service, slow_runs
from tests.client.conftest import ready_service

pytestmark = pytest.mark.slow
NPY = "application/x-npy"
RNG = np.random.default_rng(7)
FRAMES = RNG.random((300, 1, 16, 16), dtype=np.float32)
SEQUENCE_CHUNK = 24
# Measured on this CPU: frames encoded in batches of 1 and of 24 give identical latents (0.0); other CPUs may
# take other ONNX Runtime kernels per batch size, so 1e-6 is allowed, far below a latent's scale (~0.1).
BATCH_TOLERANCE = 1e-6


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def v1(service: Service, path: str, body: bytes, content_type: str = NPY, **params: str) -> np.ndarray:
    """The answer of a hand-written v1 request, as NPY."""
    headers = {"Content-Type": content_type, "Accept": NPY}
    response = httpx.post(f"{service.base_url}{path}", content=body, headers=headers, params=params, timeout=30)
    assert response.status_code == 200, response.text
    return np.load(io.BytesIO(response.content))


def test_models_and_the_codec_calls_equal_v1(service: Service):
    images = FRAMES[:5]
    with Client(service.base_url) as client:
        names = {m["name"]: m["state"] for m in client.models()}
        latents = client.encode("tiny-ae", images)
        decoded = client.decode("tiny-ae", latents)
        reconstructed = client.reconstruct("tiny-ae", images)
        rendered = client.decode("tiny-render")
        described = client.model("tiny-ae")
    assert names == {"tiny-ae": "ready", "tiny-render": "ready", "tiny-dyn": "ready"}
    assert described["ops"]["encode"]["max_batch_size"] == 8
    np.testing.assert_array_equal(latents, v1(service, "/v1/models/tiny-ae/encode", npy(images)))
    np.testing.assert_array_equal(decoded, v1(service, "/v1/models/tiny-ae/decode", npy(latents)))
    np.testing.assert_array_equal(reconstructed, v1(service, "/v1/models/tiny-ae/reconstruct", npy(images)))
    np.testing.assert_array_equal(rendered, v1(service, "/v1/models/tiny-render/decode", b""))
    assert latents.shape == (5, 8) and decoded.shape == reconstructed.shape == (5, 1, 16, 16)


def test_sample_attention_and_pil_uploads_equal_v1(service: Service):
    from PIL import Image

    gray = (FRAMES[0, 0] * 255).astype(np.uint8)
    with Client(service.base_url) as client:
        samples = client.sample("tiny-ae", 3, seed=11)
        attention = client.attention_map("tiny-ae", FRAMES[:2])
        from_pil = client.encode("tiny-ae", Image.fromarray(gray))
        several = client.encode("tiny-ae", [Image.fromarray(gray), Image.fromarray(gray)])
    body = b'{"num_samples": 3, "seed": 11}'
    np.testing.assert_array_equal(samples, v1(service, "/v1/models/tiny-ae/sample", body, "application/json"))
    answer = httpx.post(f"{service.base_url}/v1/models/tiny-ae/attention-map", content=npy(FRAMES[:2]),
                        headers={"Content-Type": NPY}, timeout=30).json()
    np.testing.assert_array_equal(attention.attention, np.asarray(answer["attention"], np.float32))
    np.testing.assert_array_equal(attention.saliency, np.asarray(answer["saliency"], np.float32))
    assert attention.attention.shape == (2, 16, 16) and attention.methods == answer["methods"]
    np.testing.assert_array_equal(from_pil, v1(service, "/v1/models/tiny-ae/encode", npy(gray)))
    np.testing.assert_array_equal(several, np.concatenate([from_pil, from_pil]))


def per_chunk_encodes(service: Service, chunk: int, frames: np.ndarray = FRAMES) -> np.ndarray:
    """The latents of `frames` encoded by hand, `chunk` frames a request."""
    return np.concatenate([v1(service, "/v1/models/tiny-ae/encode", npy(frames[i:i + chunk]))
                           for i in range(0, len(frames), chunk)])


def test_encode_sequence_of_300_frames_keeps_order(service: Service):
    expected = per_chunk_encodes(service, SEQUENCE_CHUNK)
    with Client(service.base_url) as client:
        latents = client.encode_sequence("tiny-ae", FRAMES, chunk=SEQUENCE_CHUNK)
        frames_one_by_one = client.encode_sequence("tiny-ae", iter(FRAMES[:40]), chunk=1)
    assert latents.shape == (300, 8) and latents.dtype == np.float32
    np.testing.assert_array_equal(latents, expected)  # the same requests: the same numbers
    difference = float(np.abs(frames_one_by_one - expected[:40]).max())  # other batches: float noise only
    print(f"\nbatch of 1 vs batch of {SEQUENCE_CHUNK}: max |difference| = {difference:.2e}")
    assert difference <= BATCH_TOLERANCE
    shuffled = np.abs(latents[1:] - latents[:-1]).max(axis=1)
    assert shuffled.min() > 100 * BATCH_TOLERANCE  # neighbours differ: order is checked, not just values


def test_encode_sequence_plans_chunks_from_the_published_limits_and_answers_float16(service: Service):
    sizes: list[int] = []

    def record(response: httpx.Response) -> None:
        if response.request.url.path.endswith("/encode"):
            response.read()
            sizes.append(response.status_code)

    with Client(service.base_url) as client:
        client.http.event_hooks["response"].append(record)
        latents = client.encode_sequence("tiny-ae", FRAMES)  # /v1/models/tiny-ae publishes max_frames=32
        half = client.encode_sequence("tiny-ae", FRAMES, dtype="float16")
    expected = per_chunk_encodes(service, 32)
    np.testing.assert_array_equal(latents, expected)
    assert sizes == [200] * (2 * 10)  # no refusal: 10 requests of <= 32 frames, twice
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, expected.astype(np.float16))


def test_errors_carry_the_error_fields(service: Service):
    with Client(service.base_url) as client, pytest.raises(ClientError) as info:
        client.decode("tiny-ae", np.ones((2, 5), np.float32))
    assert info.value.status == 422 and info.value.field == "latents" and info.value.code == "wrong_latent_shape"
    assert info.value.limit is not None


def test_async_client_equals_the_sync_one(service: Service):
    async def scenario() -> np.ndarray:
        async with AsyncClient(service.base_url) as client:
            return await client.encode_sequence("tiny-ae", FRAMES, chunk=SEQUENCE_CHUNK, concurrency=3)

    latents = asyncio.run(scenario())
    difference = float(np.abs(latents - per_chunk_encodes(service, SEQUENCE_CHUNK)).max())
    assert latents.shape == (300, 8) and difference <= BATCH_TOLERANCE  # concurrent chunks may share batches


# ----------------------------------------------------------------------------------------------- 429s
SLOW_RUNS = slow_runs(0.05)


@pytest.fixture(scope="module")
def one_at_a_time(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A service that admits one model request at a time (429 + Retry-After for the others), 50 ms runs."""
    env = {"AESERVE_MODELS": "tiny-ae", "AESERVE_MAX_INFLIGHT_REQUESTS": "1"}
    yield from ready_service(store, tmp_path_factory.mktemp("one_at_a_time"), env, SLOW_RUNS)


def test_429s_with_retry_after_are_waited_out(one_at_a_time: Service):
    async def scenario() -> tuple[np.ndarray, int, float]:
        async with AsyncClient(one_at_a_time.base_url) as client:
            latents = await client.encode_sequence("tiny-ae", FRAMES[:48], chunk=8, concurrency=4)
            return latents, client.retried, client.waited_s

    latents, retried, waited_s = asyncio.run(scenario())
    print(f"\n48 frames, 6 chunks 4 at a time, one admitted at a time: {retried} retries, {waited_s:.1f} s waited")
    assert retried >= 1 and waited_s >= retried * 1.0  # each 429 said Retry-After >= 1 s, and it was honoured
    assert float(np.abs(latents - per_chunk_encodes(one_at_a_time, 8, FRAMES[:48])).max()) <= BATCH_TOLERANCE
