"""app.batcher.Engine: flush at size / at delay / when idle, splitting, order, 429, 504, cancellation, stop."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.batcher import Engine, run_batch, split_sizes
from app.errors import DeadlineExceeded, EngineError, QueueFull, ShuttingDown, status_and_reason


class Recorder:
    """A fake runtime: output = input * 2 + 1, recording every batch size; can block on a gate."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s
        self.gate = threading.Event()
        self.gate.set()
        self.running = threading.Event()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.running.set()
        self.gate.wait(5)
        if self.delay_s:
            time.sleep(self.delay_s)
        x = inputs["x"]
        self.batches.append(x.shape[0])
        return {"y": x * 2 + 1}


def make_engine(run, *, max_batch=4, delay_ms=20.0, queue=64, idle_start=True) -> Engine:
    engine = Engine(
        "unit",
        "1",
        max_batch_size=max_batch,
        max_delay_s=delay_ms / 1000,
        max_queue_items=queue,
        idle_start=idle_start,
    )
    engine.register("op", run)
    return engine


def frames(n: int, start: float = 0.0) -> dict[str, np.ndarray]:
    return {"x": (np.arange(n, dtype=np.float32) + start).reshape(n, 1)}


def test_split_sizes_and_run_batch_offsets():
    assert split_sizes(10, 4) == [4, 4, 2]
    assert split_sizes(4, 4) == [4]
    parts = run_batch(lambda i: {"y": i["x"] * 10}, [frames(2), frames(3, 100)], [2, 3], True)
    np.testing.assert_array_equal(parts[1]["y"][:, 0], [1000, 1010, 1020])


def test_flush_at_size_without_waiting_for_delay():
    async def scenario():
        run = Recorder()
        engine = make_engine(run, max_batch=4, delay_ms=5000, idle_start=False)
        await engine.start()
        started = time.perf_counter()
        results = await asyncio.gather(*(engine.submit("op", frames(1, i)) for i in range(4)))
        elapsed = time.perf_counter() - started
        await engine.stop()
        return run.batches, results, elapsed

    batches, results, elapsed = asyncio.run(scenario())
    assert batches == [4]
    assert elapsed < 2.0  # far below the 5 s delay
    assert [float(r["y"][0, 0]) for r in results] == [1, 3, 5, 7]


def test_flush_at_delay_counted_from_first_item():
    async def scenario():
        run = Recorder()
        engine = make_engine(run, max_batch=8, delay_ms=150, idle_start=False)
        await engine.start()
        started = time.perf_counter()
        first = asyncio.ensure_future(engine.submit("op", frames(1)))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(engine.submit("op", frames(2, 10)))
        await asyncio.gather(first, second)
        elapsed = time.perf_counter() - started
        await engine.stop()
        return run.batches, elapsed

    batches, elapsed = asyncio.run(scenario())
    assert batches == [3]  # both requests in one partial batch
    assert 0.14 <= elapsed < 1.0


def test_idle_engine_starts_at_once_and_next_batch_collects_while_running():
    async def scenario():
        run = Recorder()
        run.gate.clear()
        engine = make_engine(run, max_batch=8, delay_ms=5000, idle_start=True)
        await engine.start()
        started = time.perf_counter()
        first = asyncio.ensure_future(engine.submit("op", frames(1)))
        while not run.running.is_set():  # the lone request started without waiting for max_delay
            await asyncio.sleep(0.001)
        waited = time.perf_counter() - started
        rest = [asyncio.ensure_future(engine.submit("op", frames(1, i))) for i in range(5)]
        await asyncio.sleep(0.02)
        run.gate.set()
        await asyncio.gather(first, *rest)
        await engine.stop()
        return run.batches, waited

    batches, waited = asyncio.run(scenario())
    assert waited < 1.0
    assert batches == [1, 5]  # one batch in flight; the five collected meanwhile


def test_oversize_request_is_split_and_answered_in_order():
    async def scenario():
        run = Recorder()
        engine = make_engine(run, max_batch=4)
        await engine.start()
        result = await engine.submit("op", frames(10))
        await engine.stop()
        return run.batches, result

    batches, result = asyncio.run(scenario())
    assert sorted(batches) == [2, 4, 4] and sum(batches) == 10
    np.testing.assert_array_equal(result["y"][:, 0], np.arange(10) * 2 + 1)


def test_many_requests_each_get_their_own_rows():
    async def scenario():
        run = Recorder(delay_s=0.002)
        engine = make_engine(run, max_batch=8)
        await engine.start()
        sizes = [1, 3, 2, 5, 1, 4, 2, 7, 1, 1, 6, 2]
        starts = [1000 * i for i in range(len(sizes))]
        results = await asyncio.gather(
            *(engine.submit("op", frames(n, s)) for n, s in zip(sizes, starts, strict=True))
        )
        await engine.stop()
        return run.batches, sizes, starts, results

    batches, sizes, starts, results = asyncio.run(scenario())
    assert max(batches) > 1 and max(batches) <= 8
    for n, s, r in zip(sizes, starts, results, strict=True):
        np.testing.assert_array_equal(r["y"][:, 0], (np.arange(n) + s) * 2 + 1)


def test_shapes_get_separate_queues():
    async def scenario():
        engine = make_engine(lambda i: {"y": i["x"].sum(axis=1, keepdims=True)}, max_batch=8)
        await engine.start()
        a, b = await asyncio.gather(
            engine.submit("op", {"x": np.ones((2, 3), np.float32)}),
            engine.submit("op", {"x": np.ones((1, 5), np.float32)}),
        )
        await engine.stop()
        return a, b

    a, b = asyncio.run(scenario())
    assert a["y"][:, 0].tolist() == [3, 3] and b["y"][:, 0].tolist() == [5]


def test_full_queue_is_429_with_retry_after():
    async def scenario():
        run = Recorder()
        run.gate.clear()
        engine = make_engine(run, max_batch=2, queue=4)
        await engine.start()
        running = asyncio.ensure_future(engine.submit("op", frames(1)))
        while not run.running.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(engine.submit("op", frames(4)))
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull) as info:
            await engine.submit("op", frames(1))
        run.gate.set()
        await asyncio.gather(running, queued)
        await engine.stop()
        return info.value

    error = asyncio.run(scenario())
    assert error.limit == 4 and int(error.headers["Retry-After"]) >= 1


def test_deadline_is_504_and_expired_items_never_run():
    async def scenario():
        run = Recorder()
        run.gate.clear()
        engine = make_engine(run, max_batch=4)
        await engine.start()
        loop = asyncio.get_running_loop()
        blocker = asyncio.ensure_future(engine.submit("op", frames(1)))
        while not run.running.is_set():
            await asyncio.sleep(0.001)
        with pytest.raises(DeadlineExceeded):
            await engine.submit("op", frames(3, 50), deadline=loop.time() + 0.05)
        run.gate.set()
        await blocker
        await engine.stop()
        return run.batches

    assert asyncio.run(scenario()) == [1]


def test_cancelled_requests_are_skipped():
    async def scenario():
        run = Recorder()
        run.gate.clear()
        engine = make_engine(run, max_batch=8)
        await engine.start()
        blocker = asyncio.ensure_future(engine.submit("op", frames(1)))
        while not run.running.is_set():
            await asyncio.sleep(0.001)
        gone = asyncio.ensure_future(engine.submit("op", frames(3, 10)))
        stays = asyncio.ensure_future(engine.submit("op", frames(2, 20)))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client left
        await asyncio.sleep(0.01)
        run.gate.set()
        await blocker
        result = await stays
        await engine.stop()
        return run.batches, result, engine.queued_items()

    batches, result, left = asyncio.run(scenario())
    assert batches == [1, 2] and left == 0
    np.testing.assert_array_equal(result["y"][:, 0], [41, 43])


def test_engine_failure_is_engine_error_for_that_batch_only():
    calls = []

    def flaky(inputs):
        calls.append(inputs["x"].shape[0])
        if len(calls) == 1:
            raise RuntimeError("boom")
        return {"y": inputs["x"]}

    async def scenario():
        engine = make_engine(flaky, max_batch=4)
        await engine.start()
        with pytest.raises(EngineError):
            await engine.submit("op", frames(1))
        ok = await engine.submit("op", frames(2))
        await engine.stop()
        return ok

    assert asyncio.run(scenario())["y"].shape == (2, 1)


def test_no_input_op_runs_once_per_item():
    async def scenario():
        engine = make_engine(lambda i: {"y": np.ones((1, 3), np.float32)})
        engine.register("render", lambda i: {"y": np.full((1, 3), 7.0, np.float32)}, has_inputs=False)
        await engine.start()
        out = await engine.submit("render", {})
        await engine.stop()
        return out

    assert asyncio.run(scenario())["y"].tolist() == [[7.0, 7.0, 7.0]]


def test_stop_drains_queued_work():
    async def scenario():
        run = Recorder(delay_s=0.01)
        engine = make_engine(run, max_batch=2)
        await engine.start()
        pending = [asyncio.ensure_future(engine.submit("op", frames(2, i))) for i in range(3)]
        await asyncio.sleep(0)
        await engine.stop(drain=True)
        return [p.result()["y"].shape[0] for p in pending]

    assert asyncio.run(scenario()) == [2, 2, 2]


def test_stop_without_drain_fails_queued_work_and_refuses_new_work():
    async def scenario():
        run = Recorder()
        run.gate.clear()
        engine = make_engine(run, max_batch=2)
        await engine.start()
        running = asyncio.ensure_future(engine.submit("op", frames(1)))
        while not run.running.is_set():
            await asyncio.sleep(0.001)
        queued = asyncio.ensure_future(engine.submit("op", frames(2, 10)))
        await asyncio.sleep(0.01)
        stopping = asyncio.ensure_future(engine.stop(drain=False))
        await asyncio.sleep(0.01)
        run.gate.set()  # the batch in flight still finishes
        await stopping
        with pytest.raises(ShuttingDown):
            await engine.submit("op", frames(1))
        results = await asyncio.gather(running, queued, return_exceptions=True)
        return run.batches, results, engine.queued_items()

    batches, (done, failed), left = asyncio.run(scenario())
    assert batches == [1] and left == 0
    assert done["y"].shape == (1, 1)
    assert isinstance(failed, ShuttingDown) and status_and_reason(failed) == (503, "shutting_down")
