"""The HTTP edge in process: the body limit on every route (with and without a Content-Length),
query parameters and headers refused before any model runs, the deadline from the client's header,
a client that leaves cancelling its work, and no client mistake counted as a 500.

The same edge against a real uvicorn process (disconnect, stalled body, shutdown) is in
tests/app/test_edge_server.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import numpy as np
import pytest

from app.api.edge import BodyLimits, GuardedReceive, until_disconnected
from app.errors import ClientDisconnected, DeadlineExceeded, PayloadTooLarge, RequestTimeout
from tests.app.conftest import assert_error, npy_bytes

LIMIT = 200_000  # max_upload_bytes of tests.app.conftest.make_settings


def chunks(total: int, size: int = 40_000) -> Iterator[bytes]:
    """A streamed body: httpx sends it chunked, without a Content-Length."""
    for start in range(0, total, size):
        yield b" " * min(size, total - start)


@pytest.mark.parametrize("path", ["tiny-ae/sample", "tiny-ae/encode", "tiny-ae/decode", "tiny-render/decode"])
def test_body_limit_applies_to_every_route_with_or_without_content_length(client, path):
    headers = {"Content-Type": "application/x-npy" if path.endswith("encode") else "application/json"}
    declared = client.post(f"/v1/models/{path}", content=b" " * (LIMIT + 1), headers=headers)
    assert_error(declared, 413, field="body", limit=LIMIT, code="payload_too_large")
    streamed = client.post(f"/v1/models/{path}", content=chunks(LIMIT + 1), headers=headers)
    assert "content-length" not in streamed.request.headers
    assert_error(streamed, 413, field="body", limit=LIMIT, code="payload_too_large")


@pytest.fixture
def submissions(client, monkeypatch) -> list[tuple[str, float]]:
    """Every engine submit of the tiny models as (op, seconds left to its deadline); nothing runs."""
    calls: list[tuple[str, float]] = []
    for name in ("tiny-ae", "tiny-render"):
        engine = client.app.state.models.get(name).engine

        async def record(op, inputs, *, deadline=None):
            calls.append((op, deadline - asyncio.get_running_loop().time()))
            raise DeadlineExceeded("recorded, not run")  # any outcome: the tests look at the call only

        monkeypatch.setattr(engine, "submit", record)
    return calls


@pytest.mark.parametrize(
    ("path", "headers", "status", "field"),
    [
        ("tiny-render/sample?bit_depth=16", {}, 422, "bit_depth"),
        ("tiny-render/decode?bit_depth=16", {}, 422, "bit_depth"),
        ("tiny-ae/reconstruct?bit_depth=7", {}, 422, "bit_depth"),
        ("tiny-ae/reconstruct?format=gif", {}, 406, "format"),
        ("tiny-ae/attention-map?format=png&saliency=false", {}, 422, "saliency"),
        ("tiny-ae/encode", {"X-Request-Timeout-S": "soon"}, 422, "X-Request-Timeout-S"),
        ("tiny-ae/encode", {"X-Request-Timeout-S": "-1"}, 422, "X-Request-Timeout-S"),
        ("tiny-ae/encode", {"X-Request-Deadline": "1000"}, 504, "X-Request-Deadline"),
        ("tiny-ae/attention-map?saliency=maybe", {}, 422, "saliency"),
    ],
)
def test_query_and_headers_are_checked_before_any_model_runs(client, submissions, path, headers, status, field):
    image = npy_bytes(np.zeros((1, 16, 16), np.float32)) if "render" not in path and "sample" not in path else b""
    response = client.post(f"/v1/models/{path}", content=image, headers=headers)
    assert_error(response, status, field=field)
    assert submissions == []


def test_deadline_comes_from_the_client_header_capped_by_the_setting(client, submissions):
    image = npy_bytes(np.zeros((1, 16, 16), np.float32))
    for headers in ({"X-Request-Timeout-S": "2"}, {"X-Request-Timeout-S": "1e9"}, {}):
        client.post("/v1/models/tiny-ae/encode", content=image, headers=headers)
    left = [seconds for _, seconds in submissions]
    assert 1.0 < left[0] <= 2.0
    assert 19.0 < left[1] <= 20.0 and 19.0 < left[2] <= 20.0  # request_timeout_s of make_settings


def test_client_mistakes_and_edge_errors_are_never_counted_as_internal(client):
    def internal() -> float:
        text = client.get("/metrics").text
        rows = [r for r in text.splitlines() if 'status="500"' in r or 'reason="internal"' in r]
        return sum(float(r.split()[-1]) for r in rows if not r.startswith("#"))

    before = internal()
    for path, kwargs in [
        ("tiny-ae/sample", {"content": b"[" * 100_000, "headers": {"Content-Type": "application/json"}}),
        ("tiny-ae/sample", {"content": b'{"num_samples": 1e999}', "headers": {"Content-Type": "application/json"}}),
        ("tiny-ae/sample", {"content": b'{"seed": 99999999999999999999999999}',
                            "headers": {"Content-Type": "application/json"}}),
        ("tiny-ae/sample", {"content": chunks(LIMIT + 1), "headers": {"Content-Type": "application/json"}}),
        ("tiny-ae/encode", {"content": chunks(LIMIT + 1)}),
        ("tiny-ae/encode", {"content": b"--x\r\n", "headers": {"Content-Type": "multipart/form-data"}}),
        ("tiny-ae/decode", {"content": b'{"latents": [[1, [2]]]}', "headers": {"Content-Type": "application/json"}}),
        ("tiny-ae/encode", {"content": b"", "headers": {"X-Request-Timeout-S": "nan"}}),
    ]:
        response = client.post(f"/v1/models/{path}", **kwargs)
        assert 400 <= response.status_code < 500, (path, response.text)
        assert set(response.json()["error"]) == {"code", "message", "field", "limit"}
    assert internal() == before


class GoneClient:
    """A request whose client disconnects after `after` seconds."""

    def __init__(self, after: float) -> None:
        self.after = after

    async def receive(self) -> dict:
        await asyncio.sleep(self.after)
        return {"type": "http.disconnect"}


def test_until_disconnected_cancels_the_work_when_the_client_leaves():
    async def scenario() -> tuple[bool, float]:
        work = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        with pytest.raises(ClientDisconnected):
            await until_disconnected(GoneClient(0.05), work)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        return work.cancelled(), time.perf_counter() - started

    cancelled, took = asyncio.run(scenario())
    assert cancelled and took < 1.0


def test_until_disconnected_returns_the_work_result_when_the_client_stays():
    async def scenario() -> int:
        async def work() -> int:
            await asyncio.sleep(0.01)
            return 7

        return await until_disconnected(GoneClient(10.0), work())  # type: ignore[arg-type]

    assert asyncio.run(scenario()) == 7


def guarded(messages: list[tuple[float, dict]], limits: BodyLimits, declared: int | None = None) -> GuardedReceive:
    """A guarded `receive` over a client that sends each message after its delay (then stalls)."""
    pending = list(messages)

    async def receive() -> dict:
        if not pending:
            await asyncio.sleep(3600)
        delay, message = pending.pop(0)
        await asyncio.sleep(delay)
        return message

    return GuardedReceive(receive, limits, declared, asyncio.get_running_loop().time())


def chunk(body: bytes, more: bool = True) -> dict:
    return {"type": "http.request", "body": body, "more_body": more}


@pytest.mark.parametrize(
    ("messages", "declared", "error", "limit"),
    [
        ([(0, chunk(b"x" * 10))], 11, PayloadTooLarge, 10),  # declared: refused before reading
        ([(0, chunk(b"x" * 6)), (0, chunk(b"x" * 6))], None, PayloadTooLarge, 10),  # streamed past the limit
        ([(0, chunk(b"x"))], None, RequestTimeout, 0.2),  # a stall
        ([(0.1, chunk(b"x"))] * 8, None, RequestTimeout, 0.5),  # a drip: each chunk in time, the body not
        ([(0, chunk(b"x")), (0, {"type": "http.disconnect"})], None, ClientDisconnected, None),
    ],
    ids=["declared", "streamed", "stall", "drip", "disconnect"],
)
def test_guarded_receive_bounds_the_body(messages, declared, error, limit):
    limits = BodyLimits(max_bytes=10, read_timeout_s=0.2, upload_timeout_s=0.5)

    async def scenario() -> float:
        receive = guarded(messages, limits, declared)
        started = time.perf_counter()
        with pytest.raises(error) as info:
            while True:
                await receive()
        assert info.value.field == "body" and info.value.limit == limit
        return time.perf_counter() - started

    assert asyncio.run(scenario()) < 1.0


def test_guarded_receive_passes_a_whole_body_then_waits_for_the_disconnect_without_a_timeout():
    limits = BodyLimits(max_bytes=10, read_timeout_s=0.05, upload_timeout_s=0.05)

    async def scenario() -> list[dict]:
        receive = guarded([(0, chunk(b"12345")), (0, chunk(b"", more=False)), (0.2, {"type": "http.disconnect"})],
                          limits)
        return [await receive() for _ in range(3)]

    assert [m["type"] for m in asyncio.run(scenario())] == ["http.request", "http.request", "http.disconnect"]
