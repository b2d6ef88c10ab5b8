"""Dynamic batching with one engine per model instance.

An `Engine` owns one worker thread (so exactly one batch of that model is in flight and the event
loop stays free) and one bounded queue per (op, input shape). Items are frames: a request of N
frames counts N, is split into chunks of at most `max_batch_size` (never rejected for its size) and
answered in order. A queue flushes when it holds `max_batch_size` items, when its first item has
waited `max_delay`, or - with `idle_start` - as soon as the engine is idle, so a lone request never
waits while the next batch collects during a run. Batches are concatenated and split back by
offsets in the worker thread; results go to each request's own future. Requests past their deadline
(504) or whose client left (cancelled future) are skipped before running; a full queue is a 429 with
Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from app.errors import DeadlineExceeded, EngineError, QueueFull, ShuttingDown
from app.metrics import BATCH_SIZE, COMPUTE_DURATION, QUEUE_DEPTH, QUEUE_WAIT

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
RunFn = Callable[[Arrays], Arrays]


@dataclass(eq=False)
class _Item:
    inputs: Arrays
    size: int
    future: asyncio.Future
    enqueued_at: float
    deadline: float | None


@dataclass(eq=False)
class _Queue:
    op: str
    run: RunFn
    max_batch: int
    has_inputs: bool
    items: deque[_Item] = field(default_factory=deque)
    queued: int = 0  # frames waiting (live or not yet purged)


@dataclass(frozen=True)
class _OpEntry:
    run: RunFn
    max_batch: int
    has_inputs: bool


def split_sizes(total: int, max_batch: int) -> list[int]:
    """Chunk sizes of a request of `total` frames: full chunks of `max_batch`, then the rest."""
    sizes = [max_batch] * (total // max_batch)
    if total % max_batch:
        sizes.append(total % max_batch)
    return sizes or [0]


def run_batch(run: RunFn, inputs: list[Arrays], sizes: list[int], has_inputs: bool) -> list[Arrays]:
    """Concatenate items, run once, split outputs back by offsets (runs in the engine thread)."""
    if not has_inputs:
        outputs = run({})
        return [outputs for _ in inputs]
    names = list(inputs[0])
    batch = {n: inputs[0][n] if len(inputs) == 1 else np.concatenate([i[n] for i in inputs]) for n in names}
    outputs = run(batch)
    total = sum(sizes)
    for name, array in outputs.items():
        if array.shape[0] != total:
            raise RuntimeError(f"output {name!r} has batch {array.shape[0]}, expected {total}")
    results, offset = [], 0
    for size in sizes:
        results.append({name: array[offset : offset + size] for name, array in outputs.items()})
        offset += size
    return results


class Engine:
    """One model instance: one worker thread, exactly one batch in flight, one queue per (op, shape)."""

    def __init__(
        self,
        model: str,
        version: str,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue_items: int,
        idle_start: bool = True,
    ) -> None:
        self.model = model
        self.version = version
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.max_queue_items = max_queue_items
        self.idle_start = idle_start
        self._ops: dict[str, _OpEntry] = {}
        self._queues: dict[tuple, _Queue] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._last_compute_s = 0.01

    # ------------------------------------------------------------------ set-up
    def register(
        self, op: str, run: RunFn, *, max_batch_size: int | None = None, has_inputs: bool = True
    ) -> None:
        """Make `op` runnable through this engine; its batches hold at most `max_batch_size` items."""
        limit = min(self.max_batch_size, max_batch_size or self.max_batch_size)
        self._ops[op] = _OpEntry(run=run, max_batch=max(1, limit), has_inputs=has_inputs)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._stopping = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{self.model}")
        self._task = asyncio.create_task(self._loop(), name=f"engine-{self.model}")

    async def stop(self, *, drain: bool = True) -> None:
        """Stop taking work; with `drain` finish what is queued, else fail it with 503."""
        self._stopping = True
        if not drain:
            for queue in self._queues.values():
                while queue.items:
                    item = queue.items.popleft()
                    self._forget(queue, item)
                    if not item.future.done():
                        item.future.set_exception(ShuttingDown("the server is shutting down"))
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._executor is not None:
            await asyncio.to_thread(self._executor.shutdown, True)
            self._executor = None

    # ------------------------------------------------------------------ requests
    def queued_items(self, op: str | None = None) -> int:
        return sum(q.queued for q in self._queues.values() if op is None or q.op == op)

    async def submit(self, op: str, inputs: Arrays, *, deadline: float | None = None) -> Arrays:
        """Queue `inputs` (all with the same leading batch axis) for `op`; returns that op's outputs.

        `deadline` is on the event loop's clock (`loop.time()`); past it the request fails with 504.
        """
        if self._stopping or self._task is None:
            raise ShuttingDown("the server is shutting down", code="shutting_down")
        entry = self._ops[op]
        loop = asyncio.get_running_loop()
        total = next(iter(inputs.values())).shape[0] if entry.has_inputs and inputs else 1
        key = (op, tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(inputs.items())))
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(op, entry.run, entry.max_batch, entry.has_inputs)
        if queue.queued and queue.queued + total > self.max_queue_items:
            retry = max(1, math.ceil((queue.queued / queue.max_batch + 1) * self._last_compute_s))
            raise QueueFull(
                f"queue for {op} holds {queue.queued} items",
                field="queue",
                limit=self.max_queue_items,
                headers={"Retry-After": str(retry)},
            )
        now = loop.time()
        items, offset = [], 0
        for size in split_sizes(total, queue.max_batch) if entry.has_inputs else [1]:
            chunk = {n: a[offset : offset + size] for n, a in inputs.items()}
            offset += size
            items.append(_Item(chunk, size, loop.create_future(), now, deadline))
        queue.items.extend(items)
        queue.queued += total
        QUEUE_DEPTH.labels(self.model, self.version, op).inc(total)
        assert self._wake is not None
        self._wake.set()

        futures = [item.future for item in items]
        timeout = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            results = await asyncio.wait_for(asyncio.gather(*futures), timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"{op} did not finish within the request deadline", field="deadline", code="deadline_exceeded"
            ) from None
        finally:
            for future in futures:  # cancelled futures are skipped by the scheduler
                if not future.done():
                    future.cancel()
        if len(results) == 1:
            return results[0]
        return {name: np.concatenate([r[name] for r in results]) for name in results[0]}

    # ------------------------------------------------------------------ scheduler
    def _forget(self, queue: _Queue, item: _Item) -> None:
        queue.queued -= item.size
        QUEUE_DEPTH.labels(self.model, self.version, queue.op).dec(item.size)

    def _purge_head(self, queue: _Queue, now: float) -> None:
        while queue.items:
            head = queue.items[0]
            if head.future.done():
                queue.items.popleft()
                self._forget(queue, head)
            elif head.deadline is not None and now >= head.deadline:
                queue.items.popleft()
                self._forget(queue, head)
                head.future.set_exception(DeadlineExceeded("deadline passed while queued", field="deadline"))
            else:
                return

    def _pick(self, now: float) -> tuple[_Queue | None, float | None]:
        """The ready queue with the oldest head, else how long until one becomes ready."""
        best: _Queue | None = None
        wait: float | None = None
        for queue in self._queues.values():
            self._purge_head(queue, now)
            if not queue.items:
                continue
            head = queue.items[0]
            due = head.enqueued_at + self.max_delay_s
            if self.idle_start or self._stopping or queue.queued >= queue.max_batch or now >= due:
                if best is None or head.enqueued_at < best.items[0].enqueued_at:
                    best = queue
            else:
                wait = due - now if wait is None else min(wait, due - now)
        return best, wait

    def _take(self, queue: _Queue, now: float) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while queue.items:
            item = queue.items[0]
            if item.future.done():
                queue.items.popleft()
                self._forget(queue, item)
                continue
            if item.deadline is not None and now >= item.deadline:
                queue.items.popleft()
                self._forget(queue, item)
                item.future.set_exception(DeadlineExceeded("deadline passed while queued", field="deadline"))
                continue
            if batch and size + item.size > queue.max_batch:
                break
            queue.items.popleft()
            self._forget(queue, item)
            batch.append(item)
            size += item.size
            if not queue.has_inputs:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            now = loop.time()
            queue, wait = self._pick(now)
            if queue is None:
                if self._stopping and wait is None:
                    return
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            batch = self._take(queue, now)
            if batch:
                await self._execute(queue, batch, loop)

    async def _execute(self, queue: _Queue, batch: list[_Item], loop: asyncio.AbstractEventLoop) -> None:
        labels = (self.model, self.version, queue.op)
        started = loop.time()
        for item in batch:
            QUEUE_WAIT.labels(*labels).observe(started - item.enqueued_at)
        sizes = [item.size for item in batch]
        t0 = time.perf_counter()
        try:
            assert self._executor is not None
            results = await loop.run_in_executor(
                self._executor, run_batch, queue.run, [i.inputs for i in batch], sizes, queue.has_inputs
            )
        except Exception as exc:
            log.exception("%s/%s %s: batch of %d failed", self.model, self.version, queue.op, sum(sizes))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(EngineError(f"{queue.op} failed in the engine: {exc}"))
            return
        finally:
            elapsed = time.perf_counter() - t0
            self._last_compute_s = elapsed
            COMPUTE_DURATION.labels(*labels).observe(elapsed)
            BATCH_SIZE.labels(*labels).observe(sum(sizes))
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():
                item.future.set_result(result)
