"""aeserve_client without a service: retries (Retry-After, bounds, jitter), typed errors, chunk planning
and the refusal-driven split of `encode_sequence`, against an httpx MockTransport that plays the service."""

from __future__ import annotations

import asyncio
import io
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import numpy as np
import pytest

from aeserve_client import AsyncClient, Client, ClientError, EncodeLimits, Overloaded, RetryPolicy
from aeserve_client.errors import parse_retry_after

D = 3


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def error(status: int, code: str, field: str, limit, **headers: str) -> httpx.Response:
    body = {"error": {"code": code, "message": f"{code} here", "field": field, "limit": limit}}
    return httpx.Response(status, json=body, headers=headers)


class FakeEncoder:
    """Encodes frame t as [t, t, t] (its first pixel), refusing more than `max_frames` frames (422) or
    bodies over `max_body` bytes (413), after first answering the `overload` responses in turn."""

    def __init__(self, max_frames: int = 1000, max_body: int = 10**9, overload: list[httpx.Response] | None = None):
        self.max_frames, self.max_body, self.overload = max_frames, max_body, list(overload or [])
        self.sizes: list[int] = []  # frames per encode request that was answered 200
        self.queries: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"ops": {"encode": {"max_batch_size": 4, "inputs": [
                {"name": "image", "dtype": "float32", "shape": [-1, 1, 8, 8]}]}}})
        self.queries.append(request.url.query.decode())
        if self.overload:
            return self.overload.pop(0)
        assert request.headers["content-type"] == "application/x-npy" == request.headers["accept"]
        if len(request.content) > self.max_body:
            return error(413, "payload_too_large", "body", self.max_body)
        frames = np.load(io.BytesIO(request.content))
        if len(frames) > self.max_frames:
            return error(422, "too_many_frames", "file", self.max_frames)
        self.sizes.append(len(frames))
        dtype = np.float16 if "dtype=float16" in self.queries[-1] else np.float32
        return httpx.Response(200, content=npy(np.repeat(frames[:, 0, 0, :1], D, axis=1).astype(dtype)))


def frames_numbered(count: int) -> np.ndarray:
    return np.arange(count, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 8, 8), np.float32)


def sync_client(handler, **kwargs) -> Client:
    return Client("http://service", transport=httpx.MockTransport(handler), **kwargs)


def test_429_and_503_are_retried_after_retry_after_with_bounded_jitter(monkeypatch):
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    fake = FakeEncoder(overload=[error(429, "queue_full", "queue", 8, **{"Retry-After": "2"}),
                                 error(503, "draining", "name", None, **{"Retry-After": when})])
    waits: list[float] = []
    monkeypatch.setattr("aeserve_client.client.time.sleep", waits.append)
    with sync_client(fake, retry=RetryPolicy(jitter=0.2, max_wait_s=20)) as client:
        latents = client.encode("m", frames_numbered(2))
        assert client.retried == 2 and client.waited_s == pytest.approx(sum(waits))
    assert latents.tolist() == [[0.0] * D, [1.0] * D] and latents.dtype == np.float32
    assert 2.0 <= waits[0] <= 2.4  # Retry-After honoured, at most 20% later
    assert 20.0 <= waits[1] <= 24.0  # an HTTP date 30 s away, capped at max_wait_s


def test_retries_are_bounded_and_the_last_answer_is_raised_typed(monkeypatch):
    answers = [error(429, "queue_full", "queue", 1024, **{"Retry-After": "1"}) for _ in range(10)]
    fake = FakeEncoder(overload=answers)
    monkeypatch.setattr("aeserve_client.client.time.sleep", lambda _: None)
    with sync_client(fake, retry=RetryPolicy(retries=3)) as client, pytest.raises(Overloaded) as info:
        client.encode("m", frames_numbered(1))
    assert len(fake.queries) == 4 and len(fake.overload) == 6
    raised = info.value
    assert (raised.status, raised.code, raised.field, raised.limit) == (429, "queue_full", "queue", 1024)
    assert info.value.retry_after_s == 1.0 and info.value.url.endswith("/v1/models/m/encode")


def test_a_client_error_is_raised_at_once_with_the_error_fields():
    fake = FakeEncoder(overload=[error(422, "non_finite", "latents", "finite values")])
    with sync_client(fake) as client, pytest.raises(ClientError) as info:
        client.encode("m", frames_numbered(1))
    assert (info.value.status, info.value.code, info.value.field, info.value.limit) == (
        422, "non_finite", "latents", "finite values")
    assert client.retried == 0 and "HTTP 422 non_finite" in str(info.value)


def test_the_backoff_without_retry_after_doubles_and_the_date_form_parses():
    policy = RetryPolicy(backoff_s=0.5, jitter=0.0, max_wait_s=3.0)
    assert [policy.delay_s(attempt, None) for attempt in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay_s(0, 0.0) == 0.0
    assert parse_retry_after("7") == 7.0 and parse_retry_after("soon") is None and parse_retry_after(None) is None
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=5), usegmt=True)
    assert parse_retry_after(past) == 0.0


def test_encode_sequence_splits_a_refused_chunk_to_the_named_limit_and_keeps_order():
    fake = FakeEncoder(max_frames=7)
    with sync_client(fake) as client:
        latents = client.encode_sequence("m", frames_numbered(50), chunk=16)
    np.testing.assert_array_equal(latents, np.repeat(np.arange(50, dtype=np.float32)[:, None], D, axis=1))
    assert fake.sizes == [7, 7, 2, 7, 7, 7, 7, 6]  # 16 refused (limit 7): 7+7+2, then chunks of 7


def test_encode_sequence_fits_the_body_limit_the_service_names_and_reads_iterables_lazily():
    frame_bytes = 8 * 8 * 4
    fake = FakeEncoder(max_body=10 * frame_bytes + 128)
    pulled: list[int] = []

    def frames():
        for t in range(40):
            pulled.append(t)
            yield np.full((1, 8, 8), t, np.float32)

    with sync_client(fake) as client:
        latents = client.encode_sequence("m", frames(), chunk=32)
    assert latents[:, 0].tolist() == list(range(40)) and max(fake.sizes) <= 10
    assert len(pulled) == 40


def test_encode_sequence_plans_its_chunk_from_the_description_and_asks_for_float16():
    fake = FakeEncoder()
    with sync_client(fake) as client:
        latents = client.encode_sequence("m", frames_numbered(300), dtype="float16")
    assert latents.dtype == np.float16 and latents[:, 0].tolist() == list(range(256)) + list(range(256, 300))
    assert fake.sizes == [256, 44] and all(query == "dtype=float16" for query in fake.queries)


def test_chunk_plan_stays_within_every_published_limit():
    info = {"ops": {"encode": {"max_batch_size": 8, "inputs": [{"shape": [-1, 1, 152, 1280]}]}},
            "limits": {"max_frames": 256, "max_upload_bytes": 32 * 2**20, "max_request_memory_bytes": 64 * 2**20}}
    limits = EncodeLimits.from_description(info)
    frame = np.zeros((152, 1280), np.float32)  # 778,240 bytes
    chunk = limits.chunk_for(frame)
    assert chunk % 8 == 0 and chunk * frame.nbytes <= 0.9 * 32 * 2**20
    assert chunk * 3 * frame.nbytes <= 0.9 * 64 * 2**20  # body + declared data + model input
    assert EncodeLimits.from_description({}).chunk_for(np.zeros((8, 8), np.uint8)) == 256


def test_async_client_keeps_order_with_chunks_in_flight_and_retries(monkeypatch):
    fake = FakeEncoder(max_frames=5, overload=[error(429, "queue_full", "queue", 8, **{"Retry-After": "0"})])

    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0.001 * (hash(request.content) % 5))  # answers come back out of order
        return fake(request)

    async def scenario() -> tuple[np.ndarray, int]:
        async with AsyncClient("http://service", transport=httpx.MockTransport(handler)) as client:
            return await client.encode_sequence("m", frames_numbered(103), chunk=8, concurrency=4), client.retried

    latents, retried = asyncio.run(scenario())
    assert latents[:, 0].tolist() == list(range(103)) and retried == 1 and max(fake.sizes) <= 5


def test_async_client_raises_the_first_error_and_decodes_and_describes():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/decode"):
            latents = np.load(io.BytesIO(request.content))
            assert latents.dtype == np.float32 and latents.shape == (2, 4)
            return httpx.Response(200, content=npy(np.zeros((2, 1, 4, 4), np.float32)))
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"models": [{"name": "m", "state": "ready"}]})
        return error(404, "model_not_found", "name", None)

    async def scenario() -> None:
        async with AsyncClient("http://service", transport=httpx.MockTransport(handler)) as client:
            assert (await client.decode("m", np.ones((2, 4)))).shape == (2, 1, 4, 4)
            assert [m["name"] for m in await client.models()] == ["m"]
            with pytest.raises(ClientError) as info:
                await client.encode_sequence("nope", frames_numbered(10), chunk=2)
            assert info.value.status == 404 and info.value.field == "name"

    asyncio.run(scenario())


def test_the_client_imports_only_httpx_numpy_pillow_and_the_standard_library() -> None:
    """A notebook installs the client without the service: importing it pulls in nothing of the server side."""
    import subprocess
    import sys

    probe = ("import sys, aeserve_client; print(sorted({m.split('.')[0] for m in sys.modules} & "
             "{'fastapi', 'starlette', 'uvicorn', 'pydantic', 'onnxruntime', 'torch', 'app', 'training'}))")
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60)
    assert found.stdout.strip() == "[]"
