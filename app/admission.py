"""Admission control: shed load with a cheap 429 before a request costs anything, and its deadline.

- `Admission`: a global cap on requests in flight. A route takes a slot BEFORE it reads or decodes
  the body (`async with admission.try_acquire(model=..., op=...) as slot:`); over the cap the call
  raises `QueueFull` (429 with Retry-After) at once, without waiting. The slot is released when the
  `async with` block exits, however it exits (answer, error, client disconnect = cancellation).
- `ItemBudget`: items (frames) queued in every engine together; one instance is shared by every
  `app.batcher.Engine`, so a flood of distinct input shapes cannot create unbounded queues.
- `request_deadline`: the absolute deadline (event loop clock) of a request from its arrival time and
  an optional client header (`X-Request-Timeout-S` seconds, or `X-Request-Deadline` Unix epoch
  seconds), capped by `Settings.request_timeout_s`.
- `shed`: the one way a scheduler refuses work: counts `aeserve_rejections_total{reason}` and builds
  the `QueueFull` with its Retry-After.

Everything here runs on the event loop thread (no locks).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from types import TracebackType

from app.errors import DeadlineExceeded, InvalidInput, QueueFull
from app.metrics import INFLIGHT_REQUESTS, QUEUED_ITEMS_ALL, REJECTIONS

TIMEOUT_HEADER = "X-Request-Timeout-S"
DEADLINE_HEADER = "X-Request-Deadline"
MAX_RETRY_AFTER_S = 300
MAX_HEADER_CHARS = 32

# The `reason` label of aeserve_rejections_total (a closed set).
REJECTION_REASONS = (
    "inflight_limit",  # Admission: too many requests in flight
    "inflight_memory",  # app.budget.InputPool: the bytes of the requests in flight (inputs, answers)
    "queue_full",  # Engine: the (op, shape) queue is full
    "items_budget",  # Engine: the items of all queues of all engines together
    "queue_count",  # Engine: too many distinct (op, shape) queues
    "sampler_full",  # diffusion sampler: too many rows waiting or running
    "deadline_unreachable",  # diffusion sampler: the request cannot finish within its deadline
)


def retry_after(seconds: float) -> dict[str, str]:
    """A Retry-After header: whole seconds, at least 1, at most `MAX_RETRY_AFTER_S`."""
    wait = 1 if not math.isfinite(seconds) else math.ceil(seconds)
    return {"Retry-After": str(min(MAX_RETRY_AFTER_S, max(1, wait)))}


def count_rejection(reason: str, labels: tuple[str, str, str] = ("", "", "")) -> None:
    """Count work shed by `reason` (one of `REJECTION_REASONS`) for (model, version, op)."""
    assert reason in REJECTION_REASONS, reason
    REJECTIONS.labels(*labels, reason).inc()


def shed(message: str, *, reason: str, field: str, limit: object, retry_after_s: float,
         labels: tuple[str, str, str] = ("", "", "")) -> QueueFull:
    """Count a rejection by `reason` (one of `REJECTION_REASONS`) and return its 429 to raise."""
    count_rejection(reason, labels)
    return QueueFull(message, field=field, limit=limit, headers=retry_after(retry_after_s))


class ItemBudget:
    """Items queued in all engines together, at most `limit`; an empty budget takes any size.

    `reserve` when items are queued, `release` when they leave the queue (run, dropped or failed).
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        self.limit = limit
        self.held = 0

    def reserve(self, count: int) -> bool:
        """Take `count` items if they fit (or nothing is held); False, taking nothing, otherwise."""
        if self.held and self.held + count > self.limit:
            return False
        self.held += count
        QUEUED_ITEMS_ALL.set(self.held)
        return True

    def release(self, count: int) -> None:
        """Give back `count` items taken with `reserve`."""
        self.held = max(0, self.held - count)
        QUEUED_ITEMS_ALL.set(self.held)


class AdmissionSlot:
    """One admitted request: `arrived` (loop clock) starts its deadline; released exactly once."""

    def __init__(self, release: Callable[[float], None], arrived: float) -> None:
        self.arrived = arrived
        self._release: Callable[[float], None] | None = release

    @property
    def held(self) -> bool:
        return self._release is not None

    def release(self) -> None:
        """Free the slot (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release(self.arrived)

    async def __aenter__(self) -> AdmissionSlot:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.release()


class Admission:
    """A global cap on requests in flight, checked without waiting (see the module doc).

    Retry-After is the mean time a slot was held lately (an exponential moving average): by then
    about as many slots have freed up as are held now.
    """

    def __init__(self, limit: int, *, clock: Callable[[], float] | None = None) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        self.limit = limit
        self.in_flight = 0
        self.mean_hold_s: float | None = None
        self._clock = clock

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def try_acquire(self, *, model: str = "", version: str = "", op: str = "") -> AdmissionSlot:
        """A slot now, or `QueueFull` (429 with Retry-After) at once when `limit` are in flight.

        The labels only go to `aeserve_rejections_total`.
        """
        if self.in_flight >= self.limit:
            raise shed(
                f"{self.in_flight} requests in flight; the server takes at most {self.limit}",
                reason="inflight_limit", field="requests", limit=self.limit,
                retry_after_s=self.mean_hold_s or 1.0, labels=(model, version, op),
            )
        self.in_flight += 1
        INFLIGHT_REQUESTS.set(self.in_flight)
        return AdmissionSlot(self._release, self._now())

    def _release(self, arrived: float) -> None:
        self.in_flight -= 1
        INFLIGHT_REQUESTS.set(self.in_flight)
        held = max(0.0, self._now() - arrived)
        self.mean_hold_s = held if self.mean_hold_s is None else 0.8 * self.mean_hold_s + 0.2 * held


def _header_seconds(value: str, header: str, limit: str) -> float:
    """A header's finite number, else `InvalidInput` naming the header and its limit."""
    try:
        if len(value) > MAX_HEADER_CHARS:
            raise ValueError("too long")
        seconds = float(value.strip())
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):
        raise InvalidInput(f"{header}: {value[:MAX_HEADER_CHARS]!r} is not a number", field=header, limit=limit)
    return seconds


def request_deadline(arrived: float, limit_s: float, *, timeout: str | None = None,
                     deadline_epoch: str | None = None, wall_now: float | None = None) -> float:
    """The absolute deadline (event loop clock) of a request that `arrived` at that loop time.

    `limit_s` (`Settings.request_timeout_s`) is the longest a request may take; the client may ask for
    less: `timeout` (the `X-Request-Timeout-S` value, seconds > 0) and/or `deadline_epoch` (the
    `X-Request-Deadline` value, Unix epoch seconds; `wall_now` is `time.time()` at arrival). Longer
    values are capped at `limit_s`. A malformed value is `InvalidInput` (422) naming the header and
    limit; an epoch deadline already past is `DeadlineExceeded` (504) before any work starts.
    """
    budget = limit_s
    if timeout is not None:
        limit = f"seconds > 0 (at most {limit_s:g} are used)"
        seconds = _header_seconds(timeout, TIMEOUT_HEADER, limit)
        if seconds <= 0:
            raise InvalidInput(f"{TIMEOUT_HEADER} must be > 0; got {timeout!r}", field=TIMEOUT_HEADER, limit=limit)
        budget = min(budget, seconds)
    if deadline_epoch is not None:
        limit = f"Unix epoch seconds, in the future (at most {limit_s:g} s away are used)"
        epoch = _header_seconds(deadline_epoch, DEADLINE_HEADER, limit)
        remaining = epoch - (time.time() if wall_now is None else wall_now)
        if remaining <= 0:
            raise DeadlineExceeded(f"{DEADLINE_HEADER} {deadline_epoch!r} has passed", field=DEADLINE_HEADER,
                                   limit=limit)
        budget = min(budget, remaining)
    return arrived + budget
