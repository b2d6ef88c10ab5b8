"""The scheduling core shared by `app.batcher.Engine` and `app.diffusion.ContinuousDdimSampler`.

A `WorkerLoop` owns one asyncio task (its scheduler) and ONE worker thread: the scheduler picks the
next batch and runs it on that thread, so exactly one batch of a model is in flight and the event
loop stays free. Callers wait on their own futures; the scheduler answers them. Shared here:

- lifecycle: `start()`; `_shut_down()` refuses new work, lets the scheduler drain what is queued
  (within an optional time limit, then cancels it), fails what still waits and releases the thread;
- wake-up signalling: callers `_wake_up()` the scheduler, which otherwise sleeps until the time its
  subclass says work becomes ready by itself;
- deadlines: absolute, on the event loop's clock (`loop.time()`, which on the default asyncio loop is
  `time.monotonic()`; `app.api.deps.deadline_from_now` makes them). `_wait_for_results` turns a
  passed deadline into `DeadlineExceeded` (504) for the caller, `settle_if_expired` for queued work;
- skipping abandoned work: a caller that stops waiting cancels its futures, and work whose future is
  done is never run.

A subclass says what a batch is: `_next_batch(now)` picks one (or how long to sleep), `_execute(batch)`
runs it through `_in_worker` and answers its futures, `_fail_waiting(error)` fails what is still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from app.errors import DeadlineExceeded

BatchT = TypeVar("BatchT")
ResultT = TypeVar("ResultT")
ErrorFactory = Callable[[], BaseException]


def settle_if_expired(future: asyncio.Future, deadline: float | None, now: float, message: str) -> bool:
    """Fail `future` with `DeadlineExceeded` once `now` (loop clock) reaches `deadline`.

    Returns True when the future is over - answered, failed, cancelled by its caller, or expired just
    now - so the work behind it must be dropped instead of run.
    """
    if not future.done() and deadline is not None and now >= deadline:
        future.set_exception(DeadlineExceeded(message, field="deadline"))
    return future.done()


def fail_unanswered(futures: Iterable[asyncio.Future], error: ErrorFactory) -> None:
    """Fail every future that is not done yet with a fresh `error()`."""
    for future in futures:
        if not future.done():
            future.set_exception(error())


def fair_shares(wants: list[int], slots: int) -> list[int]:
    """A max-min fair split of `slots` among demands `wants` (water-filling), in their order.

    Each demand gets min(want, an equal share), what one leaves is split among the others; when
    there are more demands than slots the first `slots` get one each. Sum ≤ `slots`, share ≤ want.
    """
    shares = [0] * len(wants)
    left = slots
    open_ = [i for i, want in enumerate(wants) if want > 0]
    while left > 0 and open_:
        each = max(1, left // len(open_))
        for i in open_:
            give = min(each, wants[i] - shares[i], left)
            shares[i] += give
            left -= give
            if not left:
                break
        open_ = [i for i in open_ if shares[i] < wants[i]]
    return shares


class WorkerLoop(ABC, Generic[BatchT]):
    """One scheduler task feeding one worker thread; subclasses define batches (see the module doc)."""

    def __init__(self, name: str) -> None:
        self.worker_name = name  # names the scheduler task and the worker thread
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        """Started, not stopping, and the scheduler task is alive: new work is accepted."""
        return self._task is not None and not self._task.done() and not self._stopping

    async def start(self) -> None:
        """Start the worker thread and the scheduler task."""
        if self._task is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._stopping = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=self.worker_name)
        self._task = asyncio.create_task(self._loop(), name=self.worker_name)

    async def _shut_down(self, error: ErrorFactory, *, drain: bool = True, drain_timeout: float | None = None) -> None:
        """Refuse new work, then finish queued work (`drain`, cancelling the scheduler after
        `drain_timeout` s when given) or fail it at once; whatever still waits fails with `error()`."""
        self._stopping = True
        if not drain:
            self._fail_waiting(error)
        self._wake_up()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(task if drain_timeout is None else asyncio.shield(task), drain_timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_waiting(error)
        executor, self._executor = self._executor, None
        if executor is not None:  # waits, off the event loop, for an in-flight call to return
            await asyncio.to_thread(executor.shutdown, True)

    def _wake_up(self) -> None:
        """Make the scheduler look at its queues now."""
        if self._wake is not None:
            self._wake.set()

    async def _in_worker(self, fn: Callable[..., ResultT], *args: Any) -> ResultT:
        """Run the blocking `fn(*args)` on the worker thread."""
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _wait_for_results(self, futures: list[asyncio.Future], deadline: float | None, late: str) -> list:
        """The results of `futures`, in order; past `deadline` (loop clock) `DeadlineExceeded(late)`.

        Futures still unanswered when the caller stops waiting (deadline, error, cancellation) are
        cancelled, so the scheduler skips their work.
        """
        timeout = None if deadline is None else max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except TimeoutError:
            raise DeadlineExceeded(late, field="deadline") from None
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()
            if any(future.cancelled() for future in futures):
                self._wake_up()  # the scheduler drops the abandoned work now

    async def _loop(self) -> None:
        """Run batches while there are any; sleep until woken or due; return once stopping and idle."""
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            batch, wait = self._next_batch(loop.time())
            if batch is not None:
                await self._execute(batch)
                continue
            if self._stopping:
                return
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    @abstractmethod
    def _next_batch(self, now: float) -> tuple[BatchT | None, float | None]:
        """The batch to run now, else (None, seconds until one is due by itself, or None: on wake-up only).

        While stopping, everything queued must count as ready (the scheduler returns once this is None).
        """

    @abstractmethod
    async def _execute(self, batch: BatchT) -> None:
        """Run `batch` through `_in_worker` and answer (or fail) its futures."""

    @abstractmethod
    def _fail_waiting(self, error: ErrorFactory) -> None:
        """Remove everything still queued or in the loop and fail its futures with `error()`."""
