"""Memory: one pool of input bytes for all requests in flight (`max_inflight_memory_bytes`).

Unit tests of the pool and of the readers' holds (released on success, error and cancellation; 413 past
the whole pool; 429 with Retry-After, before the body is read, when it is full), then many concurrent
near-maximal requests against a real uvicorn process with a small pool and slowed runs: every answer is
200 or 429, and the server's peak RSS grows by less than a stated bound. Run with `-s` for the figures.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from starlette.requests import Request

from app import codecs
from app.api import io as api_io
from app.budget import InputPool, InputReservation
from app.errors import InvalidInput, PayloadTooLarge, QueueFull
from app.schemas.manifest import Preprocessing
from app.settings import Settings
from tests.app import crafted_images as crafted
from tests.app.service_process import Service, running_service, slow_runs
from tests.app.test_memory_budget import measured, npy

MiB = 2**20
TINY = Preprocessing(channels=1, input_size=(16, 16), resize="bilinear")
TINY_OP = SimpleNamespace(inputs=[SimpleNamespace(shape=[-1, 1, 16, 16])])


# ----------------------------------------------------------------------------------------------- the pool
def test_a_reservation_grows_to_its_total_and_gives_everything_back_once():
    pool = InputPool(100)
    reservation = InputReservation(pool)
    reservation.hold(30, field="body", what="a")
    reservation.hold(20, field="file", what="b")  # never less than it holds
    assert (reservation.held, pool.held) == (30, 30)
    reservation.hold(60, field="file", what="c")
    assert (reservation.held, pool.held) == (60, 60)
    reservation.release()
    reservation.release()
    assert (reservation.held, pool.held) == (0, 0)
    assert pool.mean_hold_s is not None


def test_a_full_pool_is_a_429_at_once_taking_nothing():
    pool = InputPool(100)
    first, second = InputReservation(pool), InputReservation(pool)
    first.hold(70, field="body", what="a")
    second.hold(20, field="body", what="b")
    with pytest.raises(QueueFull) as info:
        second.hold(40, field="files", what="c")
    assert (info.value.field, info.value.limit, info.value.code) == ("files", 100, "queue_full")
    assert info.value.headers["Retry-After"] == "1"
    assert (second.held, pool.held) == (20, 90)
    first.release()
    second.hold(40, field="files", what="c")
    assert pool.held == 40


def test_a_request_larger_than_the_whole_pool_is_a_413_even_when_it_is_empty():
    pool = InputPool(100)
    with pytest.raises(PayloadTooLarge) as info:
        InputReservation(pool).hold(101, field="file", what="a")
    assert (info.value.field, info.value.limit, info.value.code) == ("file", 100, "memory_pool_exceeded")
    assert pool.held == 0


# ----------------------------------------------------------------------------------------------- the readers
def request_of(data: bytes, state: SimpleNamespace, content_type: str = "image/png") -> Request:
    """A POST with `data` as its body (counting the reads in `state.reads`) on an app whose state is `state`."""
    state.reads = 0

    async def receive() -> dict:
        state.reads += 1
        return {"type": "http.request", "body": data, "more_body": False}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(data)).encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "app": SimpleNamespace(state=state),
             "state": {}}
    return Request(scope, receive)


def pool_state(limit: int) -> SimpleNamespace:
    return SimpleNamespace(aeserve_input_pool=InputPool(limit))


IMAGE = crafted.png_of(np.zeros((64, 64), np.uint8))


def test_images_are_held_from_their_headers_before_decoding_until_the_request_ends(monkeypatch):
    state, settings = pool_state(64 * MiB), Settings()
    decode, seen = api_io.decode_upload, []
    pool = state.aeserve_input_pool
    monkeypatch.setattr(api_io, "decode_upload", lambda plan: seen.append(pool.held) or decode(plan))

    async def scenario() -> tuple[int, tuple[int, ...]]:
        request = request_of(IMAGE, state)
        async with api_io.input_memory(request, settings):
            images = await api_io.read_images(request, settings, TINY, TINY_OP)
            return state.aeserve_input_pool.held, images.shape

    held, shape = asyncio.run(scenario())
    expected = api_io.plan_upload([("file", IMAGE)], TINY, [-1, 1, 16, 16], settings).held_bytes
    assert shape == (1, 1, 16, 16) and seen == [held] and held == expected > len(IMAGE) + 4 * 16 * 16
    assert state.aeserve_input_pool.held == 0


def test_a_full_pool_refuses_before_the_body_is_read():
    state, settings = pool_state(MiB), Settings()
    other = InputReservation(state.aeserve_input_pool)
    other.hold(MiB - 10, field="body", what="another request")

    async def scenario() -> None:
        request = request_of(IMAGE, state)
        async with api_io.input_memory(request, settings):
            await api_io.read_images(request, settings, TINY, TINY_OP)

    with pytest.raises(QueueFull) as info:
        asyncio.run(scenario())
    assert (info.value.field, info.value.limit, state.reads) == ("body", MiB, 0)
    assert "Retry-After" in info.value.headers and state.aeserve_input_pool.held == MiB - 10


def test_an_upload_larger_than_the_pool_is_a_413_before_it_is_decoded(monkeypatch):
    monkeypatch.setattr(codecs, "iter_frames", lambda *args: pytest.fail("decoded"))
    state, settings = pool_state(2 * MiB), Settings()
    image = crafted.png(1024, 1024, colour=2)  # a few KB, 3 MiB of declared data

    async def scenario() -> None:
        request = request_of(image, state)
        async with api_io.input_memory(request, settings):
            await api_io.read_images(request, settings, TINY, TINY_OP)

    with pytest.raises(PayloadTooLarge) as info:
        asyncio.run(scenario())
    assert (info.value.field, info.value.limit, info.value.code) == ("file", 2 * MiB, "memory_pool_exceeded")
    assert state.aeserve_input_pool.held == 0


def test_a_failed_read_and_a_cancelled_request_give_their_bytes_back():
    state, settings = pool_state(64 * MiB), Settings()

    async def failing() -> None:
        request = request_of(b"\x89PNG\r\n\x1a\n broken", state)
        async with api_io.input_memory(request, settings):
            await api_io.read_images(request, settings, TINY, TINY_OP)

    with pytest.raises(InvalidInput):
        asyncio.run(failing())
    assert state.aeserve_input_pool.held == 0

    async def cancelled() -> int:
        request = request_of(IMAGE, state)
        waiting = asyncio.Event()

        async def serve() -> None:  # read, then wait for the batch as a route does
            async with api_io.input_memory(request, settings):
                await api_io.read_images(request, settings, TINY, TINY_OP)
                waiting.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(serve())
        await waiting.wait()
        held = state.aeserve_input_pool.held
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return held

    assert asyncio.run(cancelled()) > 0
    assert state.aeserve_input_pool.held == 0


def test_latents_hold_their_body_and_the_largest_array_they_can_become():
    state, settings = pool_state(64 * MiB), Settings(max_frames=16)
    body = npy(np.zeros((2, 8), np.float32))

    async def scenario() -> int:
        request = request_of(body, state, "application/x-npy")
        async with api_io.input_memory(request, settings):
            assert (await api_io.read_latents(request, settings, 8)).shape == (2, 8)
            return state.aeserve_input_pool.held

    assert asyncio.run(scenario()) == len(body) + 4 * 16 * 8
    assert state.aeserve_input_pool.held == 0


def test_a_read_outside_input_memory_holds_nothing():
    state = pool_state(MiB)
    images = asyncio.run(api_io.read_images(request_of(IMAGE, state), Settings(), TINY, TINY_OP))
    assert images.shape == (1, 1, 16, 16) and state.aeserve_input_pool.held == 0


# ----------------------------------------------------------------------------------------------- a real process
SLOW_RUNS = slow_runs(0.05)
FRAMES = np.random.default_rng(0).random((16, 1, 256, 256), dtype=np.float32)  # a 4 MiB NPY upload
POOL_BYTES = 48 * MiB  # ~4 of these requests (~12 MiB held each: body, declared data, model input)
# measured with one engine instance +129..135 MiB (5 x 200) since ONNX Runtime's arena is off by default (each
# run's buffers go back to glibc, whose per-thread arenas keep some); +15..65 MiB with the arena; without the pool
# (40 x 200): +266..295 MiB. Two instances (two batches in flight, two worker threads' malloc arenas): +151..200 MiB
RSS_BOUND_MIB = 240
FIGURES: list[str] = []


@pytest.fixture(scope="module")
def small_pool(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/<pid>/status")
    env = {"AESERVE_MODELS": "tiny-dyn", "AESERVE_LOG_LEVEL": "WARNING", "AESERVE_MAX_BATCH_SIZE": "16",
           "AESERVE_ENGINE_INSTANCES": "2",  # each instance holds one batch's working memory: fixed, not the cores
           "AESERVE_MAX_REQUEST_MEMORY_BYTES": str(32 * MiB), "AESERVE_MAX_INFLIGHT_MEMORY_BYTES": str(POOL_BYTES)}
    with running_service(store, tmp_path_factory.mktemp("pool"), env=env, prelude=SLOW_RUNS) as service:
        service.wait_until(lambda: httpx.get(f"{service.base_url}/readyz", timeout=2).status_code == 200,
                           what="/readyz")
        with service.client() as client:  # lazy imports and the runtime's arena for a full batch: not the pool's
            for _ in range(3):
                assert client.post("/v1/models/tiny-dyn/encode", content=npy(FRAMES)).status_code == 200
        yield service
    print("\n" + "\n".join(FIGURES))


def test_many_near_maximal_requests_at_once_are_answered_200_or_429_within_the_pool(small_pool: Service):
    payload = npy(FRAMES)

    def send() -> list[httpx.Response]:
        with small_pool.client() as client, ThreadPoolExecutor(40) as threads:
            post = lambda _: client.post("/v1/models/tiny-dyn/encode", content=payload)  # noqa: E731
            return list(threads.map(post, range(40)))

    responses, elapsed, growth = measured(small_pool, send)
    statuses = [r.status_code for r in responses]
    FIGURES.append(f"40 concurrent 4 MiB NPY uploads, {POOL_BYTES // MiB} MiB pool: {statuses.count(200)} x 200,"
                   f" {statuses.count(429)} x 429 in {elapsed:.2f} s, peak RSS +{growth:.1f} MiB")
    assert set(statuses) <= {200, 429}, [r.text[:300] for r in responses if r.status_code not in (200, 429)]
    assert 200 in statuses and 429 in statuses, "no 429: does the route run inside api.io.input_memory?"
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert (refused.json()["error"]["field"], refused.json()["error"]["limit"]) in {("body", POOL_BYTES),
                                                                                    ("file", POOL_BYTES)}
    assert growth < RSS_BOUND_MIB
