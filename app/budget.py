"""One memory budget per request, checked before the bytes become arrays, and one for its answer.

`MemoryBudget` keeps a running total of what a request's decoding will hold (uploaded bytes, model
input) plus, one part at a time, what a part's decoding needs on top (`transient`); it is charged from
the headers, before anything is decoded, and refuses (413) the part that would pass the limit.
`check_answer` sizes an answer in the format asked for before it is encoded (406 naming the formats
that fit, 413 when none does). `decode_limiter` bounds how many requests decode at once.
`InputPool` bounds the bytes all requests in flight hold together (`max_inflight_memory_bytes`): each
request's `InputReservation` grows as its size becomes known (body, then the headers' declared cost,
before decoding, then its answer's encoding estimate, before encoding: `hold_answer`) and is given back
whole when the request ends; it never waits (429 when full, counted as `inflight_memory` in
`aeserve_rejections_total`; the bytes held are the gauge `aeserve_inflight_memory_bytes`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

import anyio

from app.admission import shed
from app.errors import NotAcceptable, PayloadTooLarge
from app.metrics import INFLIGHT_MEMORY
from app.settings import Settings

# Working bytes per value of an answer while it is encoded, peak RSS measured on 4M float32 values and
# rounded up: JSON 81 (a Python float and its list slot, the text and its bytes), NPY 12 (a float32 copy and
# the file bytes), PNG 16 (the float32 grid, rounding, 8/16-bit copies, Pillow's buffer, the file).
ANSWER_BYTES_PER_VALUE = {"json": 96, "npy": 16, "png": 24}
_DEFAULT_LIMIT = int(Settings.model_fields["max_request_memory_bytes"].default)
_answer_limit: ContextVar[int] = ContextVar("aeserve_answer_limit", default=_DEFAULT_LIMIT)
_answer_pool: ContextVar[InputReservation | None] = ContextVar("aeserve_answer_pool", default=None)


def mib(nbytes: int) -> str:
    """Bytes as MiB, for messages."""
    return f"{nbytes / 2**20:.1f} MiB"


class MemoryBudget:
    """The running total of one request's working memory, refused past `limit` before it is allocated."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def charge(self, nbytes: int, *, field: str, what: str) -> None:
        """Hold `nbytes` more for the rest of the request; 413 naming `field` if that passes the limit."""
        if self.used + nbytes > self.limit:
            raise PayloadTooLarge(
                f"{what} needs {mib(nbytes)}; with the {mib(self.used)} this request already holds that"
                f" passes its memory budget of {mib(self.limit)}",
                field=field,
                limit=self.limit,
                code="memory_budget_exceeded",
            )
        self.used += nbytes

    def transient(self, nbytes: int, *, field: str, what: str) -> None:
        """`nbytes` needed for a while on top of what is held (one part's decoding): checked, not kept."""
        self.charge(nbytes, field=field, what=what)
        self.used -= nbytes


# ----------------------------------------------------------------------------------------------- answers
def use_answer_limit(settings: Settings) -> None:
    """The answer budget of the current request (its context); the settings' default otherwise."""
    _answer_limit.set(settings.max_request_memory_bytes)


def check_answer(values: int, fmt: str, formats: Sequence[str]) -> None:
    """Refuse, before encoding, an answer of `values` numbers that would not fit the budget as `fmt`."""
    limit = _answer_limit.get()
    needed = values * ANSWER_BYTES_PER_VALUE[fmt]
    if needed <= limit:
        return
    fits = [f for f in formats if values * ANSWER_BYTES_PER_VALUE[f] <= limit]
    message = f"an answer of {values} values as {fmt} needs ~{mib(needed)} to encode, over {mib(limit)}"
    if fits:
        raise NotAcceptable(
            f"{message}; ask for format={fits[0]}", field="format", limit=limit, code="answer_too_large"
        )
    raise PayloadTooLarge(
        f"{message}; ask for fewer images", field="format", limit=limit, code="answer_too_large"
    )


def answers_held_by(reservation: InputReservation | None) -> None:
    """Where `hold_answer` holds the current request's answer (its context): its pool share, or nowhere."""
    _answer_pool.set(reservation)


def hold_answer(values: int, fmt: str) -> None:
    """Hold an answer's encoding bytes (`check_answer`'s estimate) in the request's pool share before it is
    encoded: 429 when the requests in flight leave no room. On the event loop only; idempotent."""
    reservation = _answer_pool.get()
    if reservation is not None:
        nbytes = values * ANSWER_BYTES_PER_VALUE[fmt]
        reservation.hold_answer(nbytes, field="format", what=f"an answer of {values} values as {fmt}")


# ----------------------------------------------------------------------------------------------- concurrency
def decode_limiter(state: Any, settings: Settings) -> anyio.CapacityLimiter:
    """The app's pool of decoding slots (`max_concurrent_decodes`), made on first use in its event loop."""
    limiter = getattr(state, "aeserve_decode_limiter", None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(settings.max_concurrent_decodes)
        state.aeserve_decode_limiter = limiter
    return limiter


def input_pool(state: Any, settings: Settings) -> InputPool:
    """The app's pool of input bytes (`max_inflight_memory_bytes`), made on first use."""
    pool = getattr(state, "aeserve_input_pool", None)
    if pool is None:
        pool = state.aeserve_input_pool = InputPool(settings.max_inflight_memory_bytes)
    return pool


class InputPool:
    """The bytes (inputs, answers) of all requests in flight together, at most `limit`; taken without waiting.

    Used on the event loop thread only (no locks). Retry-After is the mean time a reservation was
    held lately (an exponential moving average), as for `app.admission.Admission`.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1; got {limit}")
        self.limit = limit
        self.held = 0
        self.mean_hold_s: float | None = None

    def take(self, nbytes: int, total: int, *, field: str, what: str,
             labels: tuple[str, str, str] = ("", "", "")) -> None:
        """Take `nbytes` more for a request that then holds `total`: 413 when `total` alone passes the
        pool, 429 (QueueFull, Retry-After; counted for `labels` = model, version, op) when the others
        leave no room now; nothing taken on refusal."""
        if total > self.limit:
            raise PayloadTooLarge(
                f"{what} holds {mib(total)}, more than all requests in flight may hold together ({mib(self.limit)})",
                field=field,
                limit=self.limit,
                code="memory_pool_exceeded",
            )
        if self.held + nbytes > self.limit:
            raise shed(
                f"{what} needs {mib(nbytes)} more; requests in flight hold {mib(self.held)} of the"
                f" {mib(self.limit)} they may hold together",
                reason="inflight_memory", field=field, limit=self.limit,
                retry_after_s=self.mean_hold_s or 1.0, labels=labels,
            )
        self.held += nbytes
        INFLIGHT_MEMORY.set(self.held)

    def give_back(self, nbytes: int, held_s: float) -> None:
        """Return `nbytes` taken with `take` by a request that held them for `held_s` seconds."""
        self.held = max(0, self.held - nbytes)
        INFLIGHT_MEMORY.set(self.held)
        self.mean_hold_s = held_s if self.mean_hold_s is None else 0.8 * self.mean_hold_s + 0.2 * held_s


class InputReservation:
    """One request's share of an `InputPool`: raised by `hold` (inputs) and `hold_answer`, given back whole
    by `release`. `labels` (model, version, op) go to `aeserve_rejections_total` with its 429s."""

    def __init__(self, pool: InputPool, labels: tuple[str, str, str] = ("", "", "")) -> None:
        self.pool = pool
        self.labels = labels
        self.held = 0
        self.answer = 0  # the part of `held` that is the answer's
        self._since = 0.0

    def hold(self, total: int, *, field: str, what: str) -> None:
        """Hold `total` bytes for this request (never less than it holds already); 413 or 429 from
        `InputPool.take`, holding what it held before."""
        if total <= self.held:
            return
        self.pool.take(total - self.held, total, field=field, what=what, labels=self.labels)
        if not self.held:
            self._since = time.monotonic()
        self.held = total

    def hold_answer(self, nbytes: int, *, field: str, what: str) -> None:
        """Hold `nbytes` for the answer on top of the inputs (the larger of repeated calls): 429 when the
        pool has no room now. Capped at the whole pool, so an answer within the request's own budget
        (`check_answer`) is never a 413 here."""
        more = nbytes - self.answer
        if more <= 0:
            return
        self.hold(min(self.held + more, self.pool.limit), field=field, what=what)
        self.answer = nbytes

    def release(self) -> None:
        """Give everything back (idempotent)."""
        if self.held:
            self.pool.give_back(self.held, time.monotonic() - self._since)
            self.held = self.answer = 0
