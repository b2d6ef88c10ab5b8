"""app.batcher.Engine under load: requests being decoded join the next batch; one-off loads of an op
(a program loaded at first use) run off the worker thread."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from app.errors import EngineError
from tests.app.test_batcher import Recorder, frames, make_engine


def test_idle_engine_waits_for_requests_being_decoded_then_runs_them_together():
    """Under load the requests still being read or decoded join the batch (up to max_delay) instead of the
    idle engine starting a smaller one without them; none on their way: it starts at once."""

    async def scenario():
        run = Recorder()
        engine = make_engine(run, max_batch=8, delay_ms=5000, idle_start=True)
        await engine.start()
        decoding = [engine.expecting("op") for _ in range(3)]
        for counted in decoding:
            counted.__enter__()
        first = asyncio.ensure_future(engine.submit("op", frames(1)))
        await asyncio.sleep(0.05)
        assert run.batches == []  # three more are on their way: the batch waits for them
        rest = []
        for i, counted in enumerate(decoding):
            counted.__exit__(None, None, None)
            rest.append(asyncio.ensure_future(engine.submit("op", frames(1, i))))
        await asyncio.gather(first, *rest)
        started = time.perf_counter()
        await engine.submit("op", frames(1))  # nothing on its way: at once
        alone_s = time.perf_counter() - started
        await engine.stop()
        return run.batches, alone_s

    batches, alone_s = asyncio.run(scenario())
    assert batches == [4, 1] and alone_s < 1.0


def test_a_request_that_fails_while_decoding_releases_the_waiting_batch():
    async def scenario():
        run = Recorder()
        engine = make_engine(run, max_batch=8, delay_ms=5000, idle_start=True)
        await engine.start()

        async def bad_body() -> None:
            with engine.expecting("op"):
                await asyncio.sleep(0.05)
                raise ValueError("bad body")

        failing = asyncio.ensure_future(bad_body())
        await asyncio.sleep(0)  # it is being decoded
        started = time.perf_counter()
        result = await engine.submit("op", frames(1))  # waits for it, then runs as soon as it fails
        waited = time.perf_counter() - started
        with pytest.raises(ValueError):
            await failing
        await engine.stop()
        return result, run.batches, waited

    result, batches, waited = asyncio.run(scenario())
    np.testing.assert_array_equal(result["y"][:, 0], [1.0])
    assert batches == [1] and 0.04 <= waited < 2.0


def test_a_batch_waiting_for_requests_on_their_way_still_starts_at_max_delay():
    async def scenario():
        run = Recorder()
        engine = make_engine(run, max_batch=8, delay_ms=30, idle_start=True)
        await engine.start()
        with engine.expecting("op"):  # never submits
            started = time.perf_counter()
            await engine.submit("op", frames(2))
            waited = time.perf_counter() - started
        await engine.stop()
        return waited, run.batches

    waited, batches = asyncio.run(scenario())
    assert 0.025 <= waited < 2.0 and batches == [2]


def test_a_one_off_load_runs_off_the_worker_thread_once_and_its_failure_reaches_every_caller():
    async def scenario():
        run, loads = Recorder(), []

        def slow_load() -> None:
            loads.append(threading.current_thread().name)
            time.sleep(0.3)

        def broken_load() -> None:
            raise EngineError("the program cannot load")

        engine = make_engine(run)
        engine.register("lazy", run, load=slow_load)
        engine.register("broken", run, load=broken_load)
        await engine.start()
        lazy = [asyncio.ensure_future(engine.submit("lazy", frames(1, i))) for i in range(2)]
        started = time.perf_counter()
        await engine.submit("op", frames(1))  # the model's other ops run while it loads
        other_s = time.perf_counter() - started
        await asyncio.gather(*lazy)
        await engine.submit("lazy", frames(1))  # loaded once
        failures = await asyncio.gather(*(engine.submit("broken", frames(1)) for _ in range(2)),
                                        return_exceptions=True)
        await engine.stop()
        return loads, other_s, failures

    loads, other_s, failures = asyncio.run(scenario())
    assert len(loads) == 1 and not loads[0].startswith("engine-") and other_s < 0.25
    assert all(isinstance(f, EngineError) for f in failures)
