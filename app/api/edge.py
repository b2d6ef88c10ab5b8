"""The HTTP edge of every request: when it arrived, a body bounded in size and stall time, and a client
that leaves cancelling its work.

`BodyGuard` is a pure ASGI middleware (it buffers nothing). It stamps the request's arrival (the start
of its deadline, `arrival_of`) and wraps `receive` so that, on every route that reads a body:
- a body over the limit is a 413 as soon as its Content-Length says so or, while streaming (chunked,
  no Content-Length), as soon as the bytes received pass the limit;
- a client that stalls longer than the read timeout before its next chunk, or whose whole body takes
  longer than the request timeout (a slow drip), is a 408;
- a client that disconnects mid-body is a `ClientDisconnected` (499, counted as client_disconnected).
The errors are raised from `receive`, i.e. in whatever code reads the body, and rendered by
`app.api.error_handlers`; 408 and 413 close the connection, so a stalled client holds no worker and
delays shutdown by at most the read timeout.

`until_disconnected` races a request's work against its client: a client that leaves cancels it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ClientDisconnected, PayloadTooLarge, RequestTimeout
from app.settings import Settings

ARRIVAL_KEY = "aeserve.arrival"
CLOSE = {"Connection": "close"}  # an answer sent before the body ended: the connection cannot be reused
T = TypeVar("T")


@dataclass(frozen=True)
class Arrival:
    """When a request arrived: on the event loop's clock (deadlines) and the wall clock (epoch headers)."""

    loop_time: float
    wall_time: float


def now() -> Arrival:
    return Arrival(asyncio.get_running_loop().time(), time.time())


def arrival_of(request: Request) -> Arrival:
    """The arrival `BodyGuard` stamped (now, for an app built without it)."""
    return request.scope.get(ARRIVAL_KEY) or now()


@dataclass(frozen=True)
class BodyLimits:
    """What any request body may cost: bytes, the wait for each chunk, the time to send all of it."""

    max_bytes: int
    read_timeout_s: float  # the longest wait for the next chunk
    upload_timeout_s: float  # the longest the whole body may take, from the request's arrival


def body_limits(settings: Settings) -> BodyLimits:
    """The limits of the settings: the whole body must arrive within the request's own timeout."""
    return BodyLimits(settings.max_upload_bytes, settings.body_read_timeout_s, settings.request_timeout_s)


class GuardedReceive:
    """`receive` of one request: its body bounded in bytes, in the wait for each chunk and in total time."""

    def __init__(self, receive: Receive, limits: BodyLimits, declared: int | None, arrived: float) -> None:
        self.receive, self.limits, self.declared = receive, limits, declared
        self.upload_deadline = arrived + limits.upload_timeout_s
        self.received = 0
        self.body_complete = False

    def too_large(self, message: str) -> PayloadTooLarge:
        return PayloadTooLarge(message, field="body", limit=self.limits.max_bytes, headers=CLOSE)

    async def next_chunk(self) -> Message:
        """The next message, or `RequestTimeout` when the client stalls or the upload takes too long."""
        stall_s = self.limits.read_timeout_s
        left_s = self.upload_deadline - asyncio.get_running_loop().time()
        try:
            async with asyncio.timeout(min(stall_s, left_s)):
                return await self.receive()
        except TimeoutError:
            if stall_s <= left_s:
                raise RequestTimeout(f"no body bytes for {stall_s:g} s", field="body", limit=stall_s,
                                     headers=CLOSE) from None
            upload_s = self.limits.upload_timeout_s
            raise RequestTimeout(f"body not received within {upload_s:g} s", field="body", limit=upload_s,
                                 headers=CLOSE) from None

    async def __call__(self) -> Message:
        if self.body_complete:  # only http.disconnect is left: wait for it as long as it takes
            return await self.receive()
        if self.declared is not None and self.declared > self.limits.max_bytes:
            raise self.too_large(f"body of {self.declared} bytes")
        message = await self.next_chunk()
        if message["type"] == "http.disconnect":
            self.body_complete = True
            raise ClientDisconnected("the client disconnected while sending its body", field="body")
        self.received += len(message.get("body", b""))
        if self.received > self.limits.max_bytes:
            raise self.too_large(f"body exceeds {self.limits.max_bytes} bytes")
        self.body_complete = not message.get("more_body", False)
        return message


def declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyGuard:
    """ASGI middleware: stamp the arrival, bound every request body (see the module doc)."""

    def __init__(self, app: ASGIApp, limits: BodyLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        arrival = scope[ARRIVAL_KEY] = now()
        guarded = GuardedReceive(receive, self.limits, declared_length(scope), arrival.loop_time)
        await self.app(scope, guarded, send)


async def wait_for_disconnect(request: Request) -> None:
    """Return once the client has gone (its body must have been read: later messages are discarded)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result; when the client leaves first, `work` is cancelled and `ClientDisconnected` raised.

    `work` runs in the caller's task; one watcher task cancels that task if the client leaves (or its body
    read fails, e.g. a 408) while `work` runs: one task per request instead of two and an `asyncio.wait`."""
    caller = asyncio.current_task()
    assert caller is not None
    gone: list[BaseException] = []
    watching = True

    def on_watcher_done(watcher: asyncio.Future[None]) -> None:
        if watching and not watcher.cancelled():  # the callback may run after `work` finished: then nothing
            error = watcher.exception()
            gone.append(error or ClientDisconnected("the client disconnected; its request was cancelled",
                                                    field="connection"))
            caller.cancel()

    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    watcher.add_done_callback(on_watcher_done)
    try:
        return await work
    except asyncio.CancelledError:
        if gone and caller.uncancel() == 0:  # the watcher's cancellation alone, not the server's
            raise gone[0] from None
        raise
    finally:
        watching = False
        watcher.cancel()
