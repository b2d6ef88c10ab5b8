"""The scheduling core shared by `app.batcher.Engine` and `app.diffusion.ContinuousDdimSampler`.

A `WorkerLoop` owns one asyncio task (its scheduler) and `concurrency` worker threads: the scheduler
picks the next batch whenever a worker is free and runs it there, so at most `concurrency` batches of
a model are in flight (instances, as Triton calls them) and the event loop stays free. Callers wait on
their own futures; the scheduler answers them. Shared here:

- lifecycle: `start()`; `_shut_down()` refuses new work, lets the scheduler drain what is queued
  (within an optional time limit, then cancels it), fails what still waits and releases the thread;
- wake-up signalling: callers `_wake_up()` the scheduler, which otherwise sleeps until the time its
  subclass says work becomes ready by itself;
- deadlines: absolute, on the event loop's clock (`loop.time()`, which on the default asyncio loop is
  `time.monotonic()`; `app.api.deps.request_deadline_of` makes them). `_wait_for_results` turns a
  passed deadline into `DeadlineExceeded` (504) for the caller, `settle_if_expired` for queued work;
- skipping abandoned work: a caller that stops waiting cancels its futures, and work whose future is
  done is never run;
- isolating faults: `isolate_failures` re-runs the halves of a failed batch until every failure is
  one group (request) alone, so healthy requests still get their answers (at most 2n - 1 runs);
- supervision: an exception escaping the scheduler is logged at ERROR, every waiting caller gets a 503
  `ModelUnavailable` at once (never a 504 later) and the scheduler restarts, at most `max_restarts`
  times per `restart_window_s`; past that it stays down: `healthy` is False, `failure` says why and
  `on_failure(loop)` is called once (readiness reports it). A scheduler task cancelled from outside
  counts as failed the same way.

A subclass says what a batch is: `_next_batch(now)` picks one (or how long to sleep), `_execute(batch)`
runs it through `_in_worker` and answers its futures, `_fail_waiting(error)` fails what is still queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from app.errors import DeadlineExceeded, ModelUnavailable
from app.metrics import SCHEDULER_CRASHES

log = logging.getLogger(__name__)

BatchT = TypeVar("BatchT")
GroupT = TypeVar("GroupT")
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


async def isolate_failures(
    groups: list[GroupT], run: Callable[[list[GroupT]], Awaitable[None]], live: Callable[[GroupT], bool]
) -> tuple[list[tuple[GroupT, Exception]], int]:
    """Run `groups` together with `run` (which answers them, or raises); when it raises, run each half
    apart, and so on, until every failure is one group alone. Groups no longer `live` are skipped.

    Returns (each group that failed alone, with its error; how many re-runs it took). A batch of n
    costs at most 2n - 1 runs (n - 1 re-runs with one bad group among n: 2·log2(n)).
    """
    failed: list[tuple[GroupT, Exception]] = []
    runs = 0
    pending = [groups]
    while pending:
        part = [group for group in pending.pop() if live(group)]
        if not part:
            continue
        runs += 1
        try:
            await run(part)
        except Exception as exc:
            if len(part) == 1:
                failed.append((part[0], exc))
            else:
                half = len(part) // 2
                pending += [part[half:], part[:half]]  # the first half runs next
    return failed, max(0, runs - 1)


class WorkerLoop(ABC, Generic[BatchT]):
    """One scheduler task feeding `concurrency` worker threads; subclasses define batches (see the module doc)."""

    def __init__(self, name: str, model: str, version: str, op: str = "", *, concurrency: int = 1) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        self.worker_name = name  # names the scheduler task and the worker threads
        self.concurrency = concurrency  # batches in flight at once, each on a worker thread of its own
        self.model, self.version = model, version
        self.max_restarts = 3  # scheduler restarts allowed within `restart_window_s` before it stays down
        self.restart_window_s = 60.0
        self.restarts = 0  # scheduler restarts so far
        self.failure: str | None = None  # why the scheduler stopped for good (None: it did not)
        self.on_failure: Callable[[WorkerLoop[Any]], None] | None = None  # called once when it does
        self._crashes: deque[float] = deque()  # monotonic times of recent crashes
        self._crash_counter = SCHEDULER_CRASHES.labels(model, version, op)
        self._waiting: set[asyncio.Future] = set()  # futures callers wait on now
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        """Started, not stopping, and the scheduler task is alive: new work is accepted."""
        return self.healthy and not self._stopping

    @property
    def healthy(self) -> bool:
        """Started and the scheduler task is alive (restarts included); False once it failed for good."""
        return self._task is not None and not self._task.done() and self.failure is None

    def unavailable(self, restarting: bool = False) -> ModelUnavailable:
        """The 503 a caller gets when the scheduler crashed (it restarted) or failed for good."""
        if restarting:
            return ModelUnavailable(
                f"{self.model} hit an internal error and restarted; retry", headers={"Retry-After": "1"}
            )
        return ModelUnavailable(f"{self.model} is unavailable: its scheduler failed")

    async def start(self) -> None:
        """Start the worker threads and the scheduler task."""
        if self._task is not None:
            raise RuntimeError(f"{type(self).__name__}.start() called twice")
        self._stopping = False
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=self.worker_name)
        self._task = asyncio.create_task(self._supervise(), name=self.worker_name)
        self._task.add_done_callback(self._on_task_done)

    async def _shut_down(self, error: ErrorFactory, *, drain: bool = True, drain_timeout: float | None = None) -> None:
        """Refuse new work, then finish queued work (`drain`, cancelling the scheduler after
        `drain_timeout` s when given) or fail it at once; whatever still waits fails with `error()`."""
        self._stopping = True
        if not drain:
            self._fail_waiting(error)
        self._wake_up()
        task, self._task = self._task, None
        if task is not None and not task.done():
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
        """Run the blocking `fn(*args)` on a free worker thread."""
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _wait_for_results(self, futures: list[asyncio.Future], deadline: float | None, late: str) -> list:
        """The results of `futures`, in order; past `deadline` (loop clock) `DeadlineExceeded(late)`.

        Futures still unanswered when the caller stops waiting (deadline, error, cancellation) are
        cancelled, so the scheduler skips their work.
        """
        self._waiting.update(futures)
        try:
            async with asyncio.timeout_at(deadline):  # no task and no gather for the usual single future
                return [await futures[0]] if len(futures) == 1 else list(await asyncio.gather(*futures))
        except TimeoutError:
            raise DeadlineExceeded(late, field="deadline") from None
        finally:
            self._waiting.difference_update(futures)
            for future in futures:
                if not future.done():
                    future.cancel()
            if any(future.cancelled() for future in futures):
                self._wake_up()  # the scheduler drops the abandoned work now

    async def _supervise(self) -> None:
        """Run the scheduler; after a crash fail every waiting caller (503) and restart it, within bounds."""
        while True:
            try:
                await self._loop()
                return
            except Exception as exc:
                restart = self._note_crash() and not self._stopping
                log.error(
                    "%s: the scheduler crashed (%s); %s",
                    self.worker_name,
                    type(exc).__name__,
                    "restarting it" if restart else "it stays down",
                    exc_info=exc,
                )
                self._fail_everyone(functools.partial(self.unavailable, restart))
                if not restart:
                    if not self._stopping:
                        self._give_up(
                            f"the scheduler crashed {len(self._crashes)} times within "
                            f"{self.restart_window_s:g} s; last: {type(exc).__name__}"
                        )
                    return
                self.restarts += 1

    def _note_crash(self) -> bool:
        """Count a crash; True while restarts are left in the window."""
        now = time.monotonic()
        self._crash_counter.inc()
        self._crashes.append(now)
        while now - self._crashes[0] > self.restart_window_s:
            self._crashes.popleft()
        return len(self._crashes) <= self.max_restarts

    def _fail_everyone(self, error: ErrorFactory) -> None:
        """Fail all queued work and every future a caller still waits on with `error()`."""
        self._fail_waiting(error)
        fail_unanswered(list(self._waiting), error)

    def _give_up(self, reason: str) -> None:
        """Stay down: record `reason`, refuse new work, tell `on_failure`."""
        self.failure = reason
        log.error("%s: %s; the model is unavailable", self.worker_name, reason)
        if self.on_failure is not None:
            try:
                self.on_failure(self)
            except Exception:
                log.exception("%s: on_failure callback failed", self.worker_name)

    def _on_task_done(self, task: asyncio.Task[None]) -> None:
        """A scheduler task that ends while not stopping (cancelled from outside) is a failure."""
        if self._stopping or self.failure is not None:
            return
        if task.cancelled():
            what = "was cancelled"
        else:  # retrieving the exception also keeps asyncio from warning about it
            error = task.exception()
            what = f"died ({type(error).__name__})" if error is not None else "ended"
        self._fail_everyone(self.unavailable)
        self._give_up(f"the scheduler task {what} unexpectedly")

    async def _loop(self) -> None:
        """Keep up to `concurrency` batches running; sleep until woken, due or a batch ends; return once
        stopping and idle. A batch whose `_execute` raises crashes the scheduler (see `_supervise`)."""
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        running: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._reap(running)
                wait: float | None = None
                if len(running) < self.concurrency:
                    batch, wait = self._next_batch(loop.time())
                    if batch is not None:
                        task = loop.create_task(self._execute(batch))
                        running.add(task)
                        task.add_done_callback(lambda _: self._wake_up())
                        continue
                    if self._stopping and not running:
                        return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):  # no task per sleep, unlike wait_for
                        await self._wake.wait()
        finally:
            for task in running:  # only when leaving on a crash or a cancellation: their callers are failed
                task.cancel()

    @staticmethod
    def _reap(running: set[asyncio.Task[None]]) -> None:
        """Forget finished batches; re-raise what one raised."""
        for task in [task for task in running if task.done()]:
            running.discard(task)
            task.result()

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
