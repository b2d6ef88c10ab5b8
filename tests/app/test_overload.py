"""Overload: global bounds across engine queues, queue pruning, and the diffusion sampler's bounded
admission, fair share between requests, and deadlines (refused up front or cut off, never left to run)."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.admission import ItemBudget
from app.batcher import Engine
from app.diffusion import ContinuousDdimSampler
from app.errors import DeadlineExceeded, QueueFull, status_and_reason
from app.metrics import REGISTRY
from tests.app.diffusion_toys import RecordingDenoiser, request_args, toy_spec
from tests.app.test_batcher import Recorder, frames


def rejections(model: str, op: str, reason: str) -> float:
    labels = {"model": model, "version": "1", "op": op, "reason": reason}
    return REGISTRY.get_sample_value("aeserve_rejections_total", labels) or 0.0


def engine_of(model: str, run, budget: ItemBudget | None = None, max_queues: int = 64) -> Engine:
    engine = Engine(model, "1", max_batch_size=4, max_delay_s=0.02, max_queue_items=64,
                    budget=budget, max_queues=max_queues)
    engine.register("op", run)
    return engine


async def until(predicate, timeout: float = 5.0) -> None:
    deadline = time.perf_counter() + timeout
    while not predicate():
        assert time.perf_counter() < deadline, "timed out"
        await asyncio.sleep(0.001)


# ------------------------------------------------------------------------------ engine bounds


def test_items_budget_is_shared_by_every_engine() -> None:
    async def scenario() -> tuple[QueueFull, int, float]:
        budget = ItemBudget(4)
        run_a, run_b = Recorder(), Recorder()
        run_a.gate.clear()
        run_b.gate.clear()
        a, b = engine_of("over-a", run_a, budget), engine_of("over-b", run_b, budget)
        await a.start()
        await b.start()
        before = rejections("over-b", "op", "items_budget")
        running = [asyncio.ensure_future(a.submit("op", frames(1))), asyncio.ensure_future(b.submit("op", frames(1)))]
        await until(lambda: run_a.running.is_set() and run_b.running.is_set())
        queued = [asyncio.ensure_future(a.submit("op", frames(3)))]
        await until(lambda: budget.held == 3)
        with pytest.raises(QueueFull) as info:  # B's own queue is empty: only the shared budget refuses
            await b.submit("op", frames(2))
        queued.append(asyncio.ensure_future(b.submit("op", frames(1))))  # still fits
        await until(lambda: budget.held == 4)
        run_a.gate.set()
        run_b.gate.set()
        await asyncio.gather(*running, *queued)
        await a.stop()
        await b.stop()
        return info.value, budget.held, rejections("over-b", "op", "items_budget") - before

    error, held, counted = asyncio.run(scenario())
    assert status_and_reason(error) == (429, "queue_full")
    assert error.field == "queued_items" and error.limit == 4 and int(error.headers["Retry-After"]) >= 1
    assert held == 0 and counted == 1


def test_budget_is_given_back_for_expired_and_cancelled_items() -> None:
    async def scenario() -> tuple[list[int], int]:
        budget = ItemBudget(100)
        run = Recorder()
        run.gate.clear()
        engine = engine_of("over-expiry", run, budget)
        await engine.start()
        blocker = asyncio.ensure_future(engine.submit("op", frames(1)))
        await until(run.running.is_set)
        loop = asyncio.get_running_loop()
        expired = asyncio.ensure_future(engine.submit("op", frames(3), deadline=loop.time() + 0.02))
        gone = asyncio.ensure_future(engine.submit("op", frames(2)))
        await asyncio.sleep(0.05)
        gone.cancel()
        run.gate.set()
        await blocker
        await asyncio.gather(expired, gone, return_exceptions=True)
        await until(lambda: budget.held == 0)
        await engine.stop()
        return run.batches, engine.queue_count()

    batches, queues = asyncio.run(scenario())
    assert batches == [1] and queues == 0  # expired and cancelled items never ran


def test_too_many_distinct_queues_is_429_and_idle_queues_are_pruned() -> None:
    def width_sum(inputs):
        return {"y": inputs["x"].sum(axis=1, keepdims=True)}

    async def scenario() -> tuple[QueueFull, list[int]]:
        gate, running = threading.Event(), threading.Event()

        def gated(inputs):
            running.set()
            gate.wait(5)
            return width_sum(inputs)

        engine = engine_of("over-queues", gated, max_queues=2)
        await engine.start()
        def width(w: int, n: int = 1) -> asyncio.Future:
            return asyncio.ensure_future(engine.submit("op", {"x": np.ones((n, w), np.float32)}))

        shapes = [width(1)]
        await until(running.is_set)  # width 1 runs: its emptied queue no longer counts
        shapes += [width(2), width(3)]
        await until(lambda: engine.queue_count() == 2)
        with pytest.raises(QueueFull) as info:
            await engine.submit("op", {"x": np.ones((1, 4), np.float32)})
        same_shape = width(2, n=2)  # an existing queue still takes work
        gate.set()
        await asyncio.gather(*shapes, same_shape)
        counts = []
        for width in range(5, 45):  # a flood of distinct sizes, one after another: queues do not pile up
            out = await engine.submit("op", {"x": np.ones((1, width), np.float32)})
            assert out["y"][0, 0] == width
            counts.append(engine.queue_count())
        await until(lambda: engine.queue_count() == 0)
        await engine.stop()
        return info.value, counts

    error, counts = asyncio.run(scenario())
    assert error.field == "queues" and error.limit == 2 and "Retry-After" in error.headers
    assert max(counts) <= 2


# ------------------------------------------------------------------------------ diffusion sampler


def test_sampler_over_max_rows_is_429_at_once() -> None:
    spec = toy_spec()

    async def scenario() -> tuple[QueueFull, float]:
        gate = threading.Event()
        denoiser = RecordingDenoiser(gate=gate)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=2, model="over-rows", version="1", max_rows=4)
        await sampler.start()
        try:
            first = asyncio.create_task(sampler.sample(**request_args(3, 5, 0.0, seed=1)))
            await until(denoiser.entered.is_set)
            started = time.perf_counter()
            with pytest.raises(QueueFull) as info:
                await sampler.sample(**request_args(2, 5, 0.0, seed=2))
            refused_in = time.perf_counter() - started
            fits = asyncio.create_task(sampler.sample(**request_args(1, 5, 0.0, seed=3)))
            await asyncio.sleep(0.01)
            assert sampler.rows_held() == 4
            gate.set()
            assert (await first).shape == (3, 1, 8, 8) and (await fits).shape == (1, 1, 8, 8)
            # an idle sampler takes a request larger than max_rows
            assert (await sampler.sample(**request_args(6, 3, 0.0, seed=4))).shape == (6, 1, 8, 8)
            return info.value, refused_in
        finally:
            gate.set()
            await sampler.stop()

    error, refused_in = asyncio.run(scenario())
    assert status_and_reason(error) == (429, "queue_full") and refused_in < 0.1
    assert error.field == "num_samples" and error.limit == 4 and int(error.headers["Retry-After"]) >= 1


def test_small_request_is_not_starved_by_a_big_one() -> None:
    """The issue: a 64-sample × 1000-step request must not starve a 1-sample × 10-step one."""
    spec = toy_spec()

    async def scenario() -> tuple[int, list[int], bool]:
        denoiser = RecordingDenoiser()
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=32, model="over-fair", version="1")
        await sampler.start()
        try:
            big = asyncio.create_task(sampler.sample(**request_args(64, 1000, 0.0, seed=1)))
            await until(lambda: len(denoiser.calls) >= 5)
            submitted = len(denoiser.calls)
            small = await sampler.sample(**request_args(1, 10, 0.0, seed=2))
            during = [len(t) for t in denoiser.calls[submitted:]]
            big_running = not big.done()
            big.cancel()
            await asyncio.gather(big, return_exceptions=True)
            assert small.shape == (1, 1, 8, 8)
            return len(during), during, big_running
        finally:
            await sampler.stop()

    steps, sizes, big_running = asyncio.run(scenario())
    assert steps <= 10 + 2  # its 10 steps, plus the step in flight when it arrived
    assert big_running and all(size == 32 for size in sizes)  # full batches: the big one advanced too


def test_every_request_advances_when_requests_outnumber_slots() -> None:
    spec = toy_spec()
    step_counts = [10, 20, 8, 40, 25]  # distinct first timesteps: 900, 950, 875, 975, 960

    async def scenario() -> list[set[int]]:
        gate = threading.Event()
        denoiser = RecordingDenoiser(gate=gate)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=2, model="over-rr", version="1")
        await sampler.start()
        try:
            blocker = asyncio.create_task(sampler.sample(**request_args(1, 1, 0.0, seed=0)))
            await until(denoiser.entered.is_set)
            tasks = [asyncio.create_task(sampler.sample(**request_args(1, s, 0.0, seed=s))) for s in step_counts]
            await asyncio.sleep(0.01)
            gate.set()
            await asyncio.gather(blocker, *tasks)
            return [set(t.tolist()) for t in denoiser.calls[1:4]]
        finally:
            gate.set()
            await sampler.stop()

    first_three = asyncio.run(scenario())
    assert set().union(*first_three) >= {900, 950, 875, 975, 960}  # all five moved within 3 steps of 2


def test_deadline_too_short_even_alone_is_refused_up_front_with_504() -> None:
    spec = toy_spec()

    async def scenario() -> tuple[DeadlineExceeded, int, float]:
        denoiser = RecordingDenoiser(delay=0.01)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=4, model="over-dl", version="1")
        await sampler.start()
        try:
            await sampler.sample(**request_args(1, 5, 0.0, seed=1))  # measures the step time
            assert sampler.mean_step_s is not None and sampler.mean_step_s >= 0.01
            calls = len(denoiser.calls)
            now = asyncio.get_running_loop().time()
            started = time.perf_counter()
            with pytest.raises(DeadlineExceeded) as info:
                await sampler.sample(**{**request_args(1, 100, 0.0, seed=2), "deadline": now + 0.3})
            return info.value, len(denoiser.calls) - calls, time.perf_counter() - started
        finally:
            await sampler.stop()

    before = rejections("over-dl", "denoise", "deadline_unreachable")
    error, extra_calls, took = asyncio.run(scenario())
    assert status_and_reason(error) == (504, "deadline_exceeded") and error.code == "deadline_unreachable"
    assert extra_calls == 0 and took < 0.1
    assert rejections("over-dl", "denoise", "deadline_unreachable") == before + 1


def test_deadline_unreachable_under_load_is_429_with_retry_after() -> None:
    spec = toy_spec()

    async def scenario() -> QueueFull:
        denoiser = RecordingDenoiser(delay=0.01)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=1, model="over-load", version="1")
        await sampler.start()
        try:
            busy = asyncio.create_task(sampler.sample(**request_args(1, 300, 0.0, seed=1)))
            await until(lambda: len(denoiser.calls) >= 3)
            now = asyncio.get_running_loop().time()
            # alone: 10 steps ≈ 0.1 s would fit 0.15 s; sharing the one slot it needs about twice that
            with pytest.raises(QueueFull) as info:
                await sampler.sample(**{**request_args(1, 10, 0.0, seed=2), "deadline": now + 0.15})
            with pytest.raises(DeadlineExceeded):  # 100 steps would not fit even alone: 504, not 429
                await sampler.sample(**{**request_args(1, 100, 0.0, seed=3), "deadline": now + 0.15})
            busy.cancel()
            await asyncio.gather(busy, return_exceptions=True)
            return info.value
        finally:
            await sampler.stop()

    error = asyncio.run(scenario())
    assert error.field == "deadline" and int(error.headers["Retry-After"]) >= 1


def test_admitted_request_is_cut_off_at_its_deadline() -> None:
    spec = toy_spec()

    async def scenario() -> tuple[DeadlineExceeded, float, int, int]:
        denoiser = RecordingDenoiser(delay=0.005)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=4, model="over-cut", version="1")
        await sampler.start()  # cold: no step time known, so the request is admitted
        try:
            now = asyncio.get_running_loop().time()
            started = time.perf_counter()
            with pytest.raises(DeadlineExceeded) as info:
                await sampler.sample(**{**request_args(2, 200, 0.0, seed=1), "deadline": now + 0.1})
            took = time.perf_counter() - started
            calls = len(denoiser.calls)
            await asyncio.sleep(0.1)
            return info.value, took, len(denoiser.calls) - calls, sampler.rows_held()
        finally:
            await sampler.stop()

    error, took, calls_after, rows_left = asyncio.run(scenario())
    assert status_and_reason(error) == (504, "deadline_exceeded") and 0.09 <= took < 0.5
    assert calls_after <= 1 and rows_left == 0  # at most the step in flight; then it left the loop


def test_expired_request_is_dropped_before_its_first_step() -> None:
    spec = toy_spec()

    async def scenario() -> list[int]:
        gate = threading.Event()
        denoiser = RecordingDenoiser(gate=gate)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=4, model="over-exp", version="1")
        await sampler.start()
        try:
            running = asyncio.create_task(sampler.sample(**request_args(1, 10, 0.0, seed=1)))
            await until(denoiser.entered.is_set)
            now = asyncio.get_running_loop().time()
            late = asyncio.create_task(sampler.sample(**{**request_args(2, 10, 0.0, seed=2), "deadline": now + 0.02}))
            await asyncio.sleep(0.05)  # it expires while the step in flight holds the loop
            gate.set()
            with pytest.raises(DeadlineExceeded):
                await late
            await running
            return [len(t) for t in denoiser.calls]
        finally:
            gate.set()
            await sampler.stop()

    assert asyncio.run(scenario()) == [1] * 10  # only the first request's row ever ran
