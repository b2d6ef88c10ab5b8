"""Dynamic batching with one engine per model.

An `Engine` is an `app.scheduling.WorkerLoop`: `instances` worker threads (at most that many batches of
the model in flight, the event loop stays free) fed by one scheduler task. It keeps one queue per op
and per input signature (name, per-item shape and dtype of every input). Items are frames: a request
of N frames counts N, is split into chunks of at most the op's batch limit (the smaller of
`max_batch_size` and the op's own; never rejected for its size) and answered in order. A queue
flushes when it holds a full batch, when its first item has waited `max_delay_s`, or - with
`idle_start` - as soon as an instance is free and no more requests for the op are on their way (being
read or decoded: `expecting`), so a lone request never waits, the next batch collects during a run, and
under load a batch waits the few ms it takes the requests being decoded to join it. A batch that is the
engine's only work (nothing else running, queued or on its way) runs on the op's `run_alone` (every core)
or, for a light op, on the event loop. Batches are concatenated along axis 0 and split back
by offsets in the worker thread; results go to each request's own future. Items past their deadline
(504; absolute, on the loop clock) or whose client left (cancelled future) are dropped before running.
An op may need a one-off load (a program loaded at first use): it runs in a thread of its own when the
op is first submitted, so the model's other ops keep running.

Faults: a batch that raises is re-run in halves (`app.scheduling.isolate_failures`, at most 2n - 1
runs for n request chunks, re-runs counted in `aeserve_batch_retries_total`) until each failure is
one request chunk alone: healthy requests get their answers, one whose chunk fails alone gets
`EngineError` (500, no internals; the cause is logged). A crashed scheduler is restarted or reported
(`app.scheduling.WorkerLoop`): callers get 503, never a silent 504.

Bounds (each a 429 `QueueFull` with Retry-After, counted in `aeserve_rejections_total`): a request
that would overfill a non-empty queue beyond `max_queue_items` frames; one that does not fit the
`app.admission.ItemBudget` shared by every engine; one that would open a queue beyond `max_queues`
distinct (op, signature) queues (empty ones are pruned at the scheduler's next pass). An op without
inputs (a fixed render) runs once per request and is never batched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.admission import ItemBudget, shed
from app.batch_arrays import Arrays, run_batch, split_sizes
from app.errors import DeadlineExceeded, EngineError, ShuttingDown
from app.metrics import BATCH_RETRIES, BATCH_SIZE, COMPUTE_DURATION, QUEUE_DEPTH, QUEUE_WAIT
from app.runtime.base import RunFn
from app.scheduling import ErrorFactory, WorkerLoop, fail_unanswered, isolate_failures, settle_if_expired

log = logging.getLogger(__name__)



@dataclass(eq=False)
class _Item:
    inputs: Arrays
    size: int
    future: asyncio.Future
    enqueued_at: float
    deadline: float | None


@dataclass(frozen=True)
class _OpMetrics:
    """The metric children of one (model, version, op), looked up once instead of per item."""

    depth: Any
    wait: Any
    compute: Any
    size: Any

    @classmethod
    def of(cls, *labels: str) -> _OpMetrics:
        return cls(QUEUE_DEPTH.labels(*labels), QUEUE_WAIT.labels(*labels), COMPUTE_DURATION.labels(*labels),
                   BATCH_SIZE.labels(*labels))


@dataclass(eq=False)
class _Queue:
    op: str
    entry: _OpEntry  # how the op runs (shared by all its queues)
    items: deque[_Item] = field(default_factory=deque)
    queued: int = 0  # frames waiting (live or not yet purged)


@dataclass(frozen=True)
class _OpEntry:
    run: RunFn
    max_batch: int
    has_inputs: bool
    metrics: _OpMetrics
    load: Callable[[], None] | None = None  # run once, in a thread of its own, before the op's first item
    run_alone: RunFn | None = None  # for a batch that is the engine's only work (`Engine._run`)
    inline_items: int = 0  # such a batch of at most this many items runs on the event loop


EXPIRED_IN_QUEUE = "deadline passed while queued"


class Engine(WorkerLoop[tuple[_Queue, list[_Item]]]):
    """One model: `instances` batches in flight at most, one queue per (op, shape)."""

    def __init__(
        self,
        model: str,
        version: str,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_items: int,
        idle_start: bool = True,
        budget: ItemBudget | None = None,
        max_queues: int = 64,
        instances: int = 1,
    ) -> None:
        """`budget` is shared by every engine of the service (None: a private one that only the per-queue
        bounds limit: `max_queue_items` × `max_queues`); `instances`: batches run at once (the runtimes
        must take concurrent calls, as ONNX Runtime sessions do)."""
        super().__init__(f"engine-{model}", model, version, concurrency=instances)
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_items = max_queue_items
        self.idle_start = idle_start
        self.budget = budget if budget is not None else ItemBudget(max_queue_items * max_queues)
        self.max_queues = max_queues
        self._ops: dict[str, _OpEntry] = {}
        self._queues: dict[tuple, _Queue] = {}
        self._incoming: dict[str, int] = {}  # requests per op being read or decoded (`expecting`)
        self._loads: dict[str, asyncio.Future[None]] = {}  # one-off loads of ops (`register(load=...)`)
        self._last_compute_s = 0.01  # seconds of the last batch, for Retry-After
        self._dispatched = 0  # batches taken from their queue and not yet finished

    # ------------------------------------------------------------------ set-up
    def register(
        self, op: str, run: RunFn, *, max_batch_size: int | None = None, has_inputs: bool = True,
        load: Callable[[], None] | None = None, run_alone: RunFn | None = None, inline_items: int = 0,
    ) -> None:
        """Make `op` runnable through this engine; its batches hold at most `max_batch_size` items. `load`
        (e.g. a program loaded at first use) runs once, off the worker thread, when the op is first
        submitted: the model's other ops keep running meanwhile; what it raises, every request of the op gets.
        A batch that is the engine's only work runs on `run_alone` (same answers, more threads), or on the
        event loop itself when it holds at most `inline_items` items (an op so light that the worker
        thread's round trip costs more than the run)."""
        limit = min(self.max_batch_size, max_batch_size or self.max_batch_size)
        metrics = _OpMetrics.of(self.model, self.version, op)
        self._ops[op] = _OpEntry(run, max(1, limit), has_inputs, metrics, load, run_alone, inline_items)

    async def _loaded(self, op: str, load: Callable[[], None], deadline: float | None) -> None:
        """Wait (until `deadline`: 504) for `op`'s one-off `load`, started by its first caller."""
        task = self._loads.get(op)
        if task is None:
            task = self._loads[op] = asyncio.ensure_future(asyncio.to_thread(load))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved: quiet
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.shield(task)  # a caller that leaves does not cancel the others' load
        except TimeoutError:
            raise DeadlineExceeded(f"{op} did not load within the request deadline", field="deadline") from None

    async def stop(self, *, drain: bool = True) -> None:
        """Stop taking work; with `drain` finish what is queued, else fail it with 503."""
        await self._shut_down(lambda: ShuttingDown("the server is shutting down"), drain=drain)

    # ------------------------------------------------------------------ requests
    def queued_items(self, op: str | None = None) -> int:
        """Frames waiting in the queues of `op` (all ops when None)."""
        return sum(q.queued for q in self._queues.values() if op is None or q.op == op)

    def inline_items(self, op: str) -> int:
        """The largest lone batch of `op` that runs on the event loop (`register`)."""
        return self._ops[op].inline_items if op in self._ops else 0

    def queue_count(self) -> int:
        """Queues held now (empty ones are pruned at the scheduler's next pass)."""
        return len(self._queues)

    @contextlib.contextmanager
    def expecting(self, op: str) -> Iterator[None]:
        """Count a request for `op` while its body is read and decoded: an idle engine lets it join the batch
        (waiting up to `max_delay_s` from the batch's first item) instead of starting a smaller one without it.
        A request that fails wakes the scheduler; one that succeeds wakes it by submitting."""
        self._incoming[op] = self._incoming.get(op, 0) + 1
        failed = True
        try:
            yield
            failed = False
        finally:
            self._incoming[op] -= 1
            if failed:
                self._wake_up()

    async def submit(self, op: str, inputs: Arrays, *, deadline: float | None = None) -> Arrays:
        """Queue `inputs` (all with the same leading batch axis) for `op`; returns that op's outputs.

        `deadline` is absolute on the event loop's clock (`loop.time()`); past it the request fails
        with 504. A stopped engine raises `ShuttingDown` (503), a failed one `ModelUnavailable` (503); a
        full queue, a full shared budget or too many queues `QueueFull` (429).
        """
        self._check_running()
        entry = self._ops[op]
        if entry.load is not None:
            await self._loaded(op, entry.load, deadline)
            self._check_running()  # it may have stopped meanwhile
        total = next(iter(inputs.values())).shape[0] if entry.has_inputs and inputs else 1
        key = (op, tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(inputs.items())))
        queue = self._queues.get(key)
        if queue is None:
            self._check_queue_count(op)
        else:
            self._check_room(queue, total)
        if not self.budget.reserve(total):
            raise shed(
                f"the server holds {self.budget.held} queued items", reason="items_budget",
                field="queued_items", limit=self.budget.limit,
                retry_after_s=self._retry_after_s(self.queued_items(), entry.max_batch),
                labels=(self.model, self.version, op),
            )
        if queue is None:
            queue = self._queues[key] = _Queue(op, entry)
        items = self._enqueue(queue, inputs, total, deadline)
        results = await self._wait_for_results(
            [item.future for item in items], deadline, f"{op} did not finish within the request deadline"
        )
        if len(results) == 1:
            return results[0]
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    def _check_running(self) -> None:
        if not self.running:
            raise self.unavailable() if self.failure else ShuttingDown("the server is shutting down")

    def _retry_after_s(self, queued: int, max_batch: int) -> float:
        """Seconds until `queued` items have run, from the last batch's time."""
        return (queued / max_batch + 1) * self._last_compute_s / self.concurrency

    def _check_room(self, queue: _Queue, total: int) -> None:
        """429 when `total` more frames would overfill a non-empty queue (an empty one takes any size)."""
        if queue.queued and queue.queued + total > self.max_queue_items:
            raise shed(
                f"queue for {queue.op} holds {queue.queued} items", reason="queue_full", field="queue",
                limit=self.max_queue_items, retry_after_s=self._retry_after_s(queue.queued, queue.entry.max_batch),
                labels=(self.model, self.version, queue.op),
            )

    def _check_queue_count(self, op: str) -> None:
        """429 when a new queue would exceed `max_queues` (after pruning the empty ones)."""
        self._prune_empty_queues()
        if len(self._queues) >= self.max_queues:
            raise shed(
                f"{self.model} holds {len(self._queues)} distinct input queues", reason="queue_count",
                field="queues", limit=self.max_queues,
                retry_after_s=self._retry_after_s(self.queued_items(), self.max_batch_size),
                labels=(self.model, self.version, op),
            )

    def _prune_empty_queues(self) -> None:
        for key in [key for key, queue in self._queues.items() if not queue.items]:
            del self._queues[key]

    def _enqueue(self, queue: _Queue, inputs: Arrays, total: int, deadline: float | None) -> list[_Item]:
        """Split `inputs` into chunks of at most the queue's batch size, queue them, wake the scheduler."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        items, offset = [], 0
        for size in split_sizes(total, queue.entry.max_batch) if queue.entry.has_inputs else [1]:
            chunk = {n: a[offset : offset + size] for n, a in inputs.items()}
            offset += size
            items.append(_Item(chunk, size, loop.create_future(), now, deadline))
        queue.items.extend(items)
        queue.queued += total
        queue.entry.metrics.depth.inc(total)
        self._wake_up()
        return items

    # ------------------------------------------------------------------ scheduler
    def _forget(self, queue: _Queue, item: _Item) -> None:
        queue.queued -= item.size
        self.budget.release(item.size)
        queue.entry.metrics.depth.dec(item.size)

    def _is_over(self, item: _Item, now: float) -> bool:
        return settle_if_expired(item.future, item.deadline, now, EXPIRED_IN_QUEUE)

    def _purge_head(self, queue: _Queue, now: float) -> None:
        """Drop leading items that are over (answered elsewhere, cancelled, or expired: 504)."""
        while queue.items and self._is_over(queue.items[0], now):
            self._forget(queue, queue.items.popleft())

    def _is_ready(self, queue: _Queue, now: float, due: float) -> bool:
        """A full batch, a head that waited `max_delay_s`, stopping, or (idle start) nothing more on its way."""
        if self._stopping or queue.queued >= queue.entry.max_batch or now >= due:
            return True
        return self.idle_start and not self._incoming.get(queue.op)

    def _pick(self, now: float) -> tuple[_Queue | None, float | None]:
        """The ready queue with the oldest head, else how long until one becomes ready (called when idle)."""
        best: _Queue | None = None
        wait: float | None = None
        for queue in self._queues.values():
            self._purge_head(queue, now)
        self._prune_empty_queues()
        for queue in self._queues.values():
            head = queue.items[0]
            due = head.enqueued_at + self.max_delay_s
            if self._is_ready(queue, now, due):
                if best is None or head.enqueued_at < best.items[0].enqueued_at:
                    best = queue
            else:
                wait = due - now if wait is None else min(wait, due - now)
        return best, wait

    def _take(self, queue: _Queue, now: float) -> list[_Item]:
        """Pop live items from the head up to the queue's batch size, dropping those that are over."""
        batch: list[_Item] = []
        size = 0
        while queue.items:
            item = queue.items[0]
            over = self._is_over(item, now)
            if not over and batch and size + item.size > queue.entry.max_batch:
                break
            queue.items.popleft()
            self._forget(queue, item)
            if over:
                continue
            batch.append(item)
            size += item.size
            if not queue.entry.has_inputs:
                break
        return batch

    def _next_batch(self, now: float) -> tuple[tuple[_Queue, list[_Item]] | None, float | None]:
        queue, wait = self._pick(now)
        if queue is None:
            return None, wait
        self._dispatched += 1  # until its `_execute` ends
        return (queue, self._take(queue, now)), None  # `_pick` left a live head: never empty

    def _fail_waiting(self, error: ErrorFactory) -> None:
        for queue in self._queues.values():
            while queue.items:
                item = queue.items.popleft()
                self._forget(queue, item)
                fail_unanswered([item.future], error)

    async def _execute(self, batch: tuple[_Queue, list[_Item]]) -> None:
        """Run the batch; if it raises, re-run its halves until each failure is one request chunk alone."""
        queue, items = batch
        labels = (self.model, self.version, queue.op)
        loop = asyncio.get_running_loop()
        started = loop.time()
        for item in items:
            queue.entry.metrics.wait.observe(started - item.enqueued_at)
        try:
            failed, retries = await isolate_failures(
                items, lambda part: self._run(queue, part), lambda item: not self._is_over(item, loop.time())
            )
        finally:
            self._dispatched -= 1
        if retries:
            BATCH_RETRIES.labels(*labels).inc(retries)
            log.warning("%s/%s %s: a batch of %d requests failed; %d re-runs left %d failing alone",
                        self.model, self.version, queue.op, len(items), retries, len(failed))
        for item, exc in failed:
            log.error("%s/%s %s: a request chunk of %d frames failed alone", self.model, self.version,
                      queue.op, item.size, exc_info=exc)
            fail_unanswered([item.future], lambda: EngineError(f"{queue.op} failed in the engine on this input"))

    async def _run(self, queue: _Queue, items: list[_Item]) -> None:
        """Run `items` as one batch on the worker thread and answer them; raises what the run raised.
        A batch that is the engine's only work runs on the event loop or the op's `run_alone` (`register`)."""
        sizes = [item.size for item in items]
        # the engine's only batch taken, none queued or being read: it may take every core
        alone = self._dispatched == 1 and not self.queued_items() and not any(self._incoming.values())
        run = queue.entry.run_alone if alone and queue.entry.run_alone is not None else queue.entry.run
        t0 = time.perf_counter()
        try:
            inputs = [item.inputs for item in items]
            if alone and sum(sizes) <= queue.entry.inline_items:
                results = run_batch(run, inputs, sizes, queue.entry.has_inputs)  # no thread round trip
            else:
                results = await self._in_worker(run_batch, run, inputs, sizes, queue.entry.has_inputs)
        finally:
            elapsed = time.perf_counter() - t0
            self._last_compute_s = elapsed
            queue.entry.metrics.compute.observe(elapsed)
            queue.entry.metrics.size.observe(sum(sizes))
        for item, result in zip(items, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
