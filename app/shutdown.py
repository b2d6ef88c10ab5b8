"""Graceful shutdown: on SIGTERM stop being ready at once, refuse new work, let what is in flight finish.

uvicorn (0.30 to 0.54 at least) handles SIGTERM by closing its listening socket on its next tick and
waiting for the responses in flight; meanwhile /readyz still said 200, and it exits by re-raising the
signal (status 143). `install_sigterm_hook`, called by the lifespan on the main thread (where uvicorn
runs it), puts a handler in front of uvicorn's:
1. `Drain.draining` turns on at once: /readyz answers 503, and every route but /healthz, /readyz and
   /metrics answers 503 `shutting_down` (with `Connection: close`), while the port stays open;
2. the requests in flight, counted by `DrainMiddleware`, get `shutdown_grace_s` to finish (each is
   bounded by its own deadline too);
3. then the server is told to exit. For uvicorn that is `Server.should_exit`, its normal graceful path
   (the lifespan then stops the engines) without the re-raised signal, so the process exits 0; past
   the grace, `force_exit` too (uvicorn stops waiting for connections). Any other server gets the
   handler it had installed called. A second SIGTERM during the drain hands over at once.
Off the main thread (the test client runs the lifespan in a worker thread) no hook is installed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.error_handlers import error_response

log = logging.getLogger(__name__)

# answered while draining too
ALWAYS_SERVED = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})
POLL_S = 0.05


class Drain:
    """Whether the service is shutting down, and how many requests are in flight."""

    def __init__(self) -> None:
        self.draining = False
        self.in_flight = 0

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight, for up to `timeout_s`; True when none is."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.in_flight and loop.time() < deadline:
            await asyncio.sleep(POLL_S)
        return not self.in_flight


class DrainMiddleware:
    """ASGI middleware: count requests in flight; while draining, 503 for all but `ALWAYS_SERVED`."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_SERVED:
            await self.app(scope, receive, send)
            return
        if self.drain.draining:
            response = error_response(
                503, "shutting_down", "the server is shutting down", headers={"Connection": "close"},
                path=scope["path"],
            )
            await response(scope, receive, send)
            return
        self.drain.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.in_flight -= 1


Handler = Callable[[int, FrameType | None], Any] | int | None


def hand_over(previous: Handler, signum: int, frame: FrameType | None, *, force: bool = False) -> None:
    """Tell the server to exit: uvicorn through `should_exit` (exit status 0), others through `previous`."""
    server = getattr(previous, "__self__", None)
    if server is not None and hasattr(server, "should_exit"):
        server.should_exit = True
        if force:
            server.force_exit = True
    elif callable(previous):
        previous(signum, frame)
    else:  # the default action: restore it and let the signal do what it would have done
        signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        signal.raise_signal(signum)


def install_sigterm_hook(drain: Drain, grace_s: float) -> Callable[[], None] | None:
    """Drain on SIGTERM before the server's own handler runs; returns the undo (None off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)
    finishing: set[asyncio.Task[None]] = set()

    async def finish(signum: int, frame: FrameType | None) -> None:
        idle = await drain.wait_idle(grace_s)
        if not idle:
            log.warning("shutdown grace of %g s is over with %d requests in flight", grace_s, drain.in_flight)
        log.info("drained; exiting")
        hand_over(previous, signum, frame, force=not idle)

    def start_finishing(signum: int, frame: FrameType | None) -> None:
        task = loop.create_task(finish(signum, frame))
        finishing.add(task)
        task.add_done_callback(finishing.discard)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if drain.draining:  # a second SIGTERM: no more waiting
            hand_over(previous, signum, frame)
            return
        drain.draining = True
        log.warning("SIGTERM: not ready, refusing new requests, %d in flight get %g s", drain.in_flight, grace_s)
        loop.call_soon_threadsafe(start_finishing, signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)

    def undo() -> None:
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    return undo
