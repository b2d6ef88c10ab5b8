"""Faults in the engine and sampler: a failing batch fails only the requests that fail alone (bisection,
bounded re-runs, counted), and a crashed scheduler answers its waiting callers with 503 at once, then
restarts (bounded) or stays down and says so (`healthy`, `failure`, `on_failure`)."""

from __future__ import annotations

import asyncio
import io
import logging
import time

import httpx
import numpy as np
import pytest

from app.batcher import Engine
from app.diffusion import ContinuousDdimSampler
from app.errors import EngineError, ModelUnavailable, status_and_reason
from app.metrics import REGISTRY
from app.scheduling import WorkerLoop
from tests.app.conftest import make_settings, npy_bytes
from tests.app.diffusion_toys import RecordingDenoiser, request_args, sample_alone, toy_eps, toy_spec
from tests.app.test_batcher import Recorder, frames, make_engine
from tests.app.test_overload import until

POISON = 13.0
LEAKS = ("RuntimeError", "secret", "poison")  # what the runtime's error says; clients must not see it


class Poisoned:
    """A fake runtime: y = 2x + 1, raising on any batch that holds a poisoned value; records each batch."""

    def __init__(self, poison: set[float], fail_first: bool = False) -> None:
        self.poison = poison
        self.fail_first = fail_first  # the first call fails whatever it holds (a transient fault)
        self.batches: list[list[float]] = []

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        self.batches.append(x[:, 0].tolist())
        if (self.fail_first and len(self.batches) == 1) or np.isin(x, list(self.poison)).any():
            raise RuntimeError("poison in /secret/model/path")
        return {"y": x * 2 + 1}


def retries(model: str, op: str, version: str = "1") -> float:
    labels = {"model": model, "version": version, "op": op}
    return REGISTRY.get_sample_value("aeserve_batch_retries_total", labels) or 0.0


async def submit_all(engine: Engine, values: list[float]) -> list:
    return await asyncio.gather(*(engine.submit("op", frames(1, v)) for v in values), return_exceptions=True)


def assert_engine_error_without_internals(error: BaseException) -> None:
    assert isinstance(error, EngineError) and status_and_reason(error) == (500, "engine_error")
    assert not any(leak in str(error) for leak in LEAKS), str(error)


# ------------------------------------------------------------------------------ isolation


def test_poisoned_request_fails_alone_and_the_rest_of_its_batch_is_answered() -> None:
    values = [10.0, 11.0, 12.0, POISON, 14.0, 15.0, 16.0, 17.0]

    async def scenario() -> tuple[list, list, float]:
        run = Poisoned({POISON})
        engine = make_engine(run, max_batch=8, delay_ms=5000, idle_start=False)  # one batch of 8
        await engine.start()
        before = retries("unit", "op")
        results = await submit_all(engine, values)
        await engine.stop()
        return run.batches, results, retries("unit", "op") - before

    batches, results, retried = asyncio.run(scenario())
    assert [len(b) for b in batches] == [8, 4, 2, 2, 1, 1, 4]  # 1 + 2·log2(8) runs, not 8 or more
    assert batches[5] == [POISON]  # identified by running it alone
    assert retried == 6
    assert_engine_error_without_internals(results[3])
    for value, result in zip(values, results, strict=True):
        if value != POISON:
            assert float(result["y"][0, 0]) == value * 2 + 1


def test_a_batch_where_every_request_fails_costs_at_most_2n_minus_1_runs() -> None:
    values = [1.0, 2.0, 3.0, 4.0]

    async def scenario() -> tuple[list, list, float]:
        run = Poisoned(set(values))
        engine = make_engine(run, max_batch=4, delay_ms=5000, idle_start=False)
        await engine.start()
        before = retries("unit", "op")
        results = await submit_all(engine, values)
        await engine.stop()
        return run.batches, results, retries("unit", "op") - before

    batches, results, retried = asyncio.run(scenario())
    assert len(batches) == 2 * len(values) - 1 and retried == len(batches) - 1
    assert sorted(b[0] for b in batches if len(b) == 1) == values  # each one failed alone
    for error in results:
        assert_engine_error_without_internals(error)


def test_a_transient_batch_fault_answers_everyone_after_one_split() -> None:
    async def scenario() -> tuple[list, list]:
        run = Poisoned(set(), fail_first=True)
        engine = make_engine(run, max_batch=4, delay_ms=5000, idle_start=False)
        await engine.start()
        results = await submit_all(engine, [1.0, 2.0, 3.0, 4.0])
        await engine.stop()
        return run.batches, results

    batches, results = asyncio.run(scenario())
    assert [len(b) for b in batches] == [4, 2, 2]
    assert [float(r["y"][0, 0]) for r in results] == [3.0, 5.0, 7.0, 9.0]


def test_a_lone_failing_request_is_not_retried() -> None:
    async def scenario() -> tuple[list, BaseException]:
        run = Poisoned({POISON})
        engine = make_engine(run, max_batch=4)
        await engine.start()
        (error,) = await submit_all(engine, [POISON])
        await engine.stop()
        return run.batches, error

    batches, error = asyncio.run(scenario())
    assert batches == [[POISON]]
    assert_engine_error_without_internals(error)


def test_requests_abandoned_during_a_failed_batch_are_not_re_run() -> None:
    async def scenario() -> tuple[list, list]:
        run = Poisoned({POISON})
        gate = Recorder()  # blocks the first run until the client of 4.0 has left
        gate.gate.clear()

        def gated(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            gate.running.set()
            gate.gate.wait(5)
            return run(inputs)

        engine = make_engine(gated, max_batch=4, delay_ms=5000, idle_start=False)
        await engine.start()
        tasks = [asyncio.ensure_future(engine.submit("op", frames(1, v))) for v in (POISON, 2.0, 3.0, 4.0)]
        await until(gate.running.is_set)
        tasks[3].cancel()  # the client left while its batch ran
        await asyncio.sleep(0.01)
        gate.gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await engine.stop()
        return run.batches, results

    batches, results = asyncio.run(scenario())
    assert batches == [[POISON, 2.0, 3.0, 4.0], [POISON, 2.0], [POISON], [2.0], [3.0]]
    assert_engine_error_without_internals(results[0])
    assert isinstance(results[3], asyncio.CancelledError)


def test_sampler_step_failure_fails_only_the_poisoned_request() -> None:
    spec = toy_spec()
    healthy = request_args(2, 10, 0.0, seed=1)
    poisoned = {**request_args(2, 10, 0.0, seed=2), "condition": np.full((2, 2), 99.0, np.float32)}

    def fragile(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        if (cond == 99.0).any():
            raise RuntimeError("denoiser exploded")
        return toy_eps(x, t, cond)

    async def scenario() -> tuple[list, float]:
        sampler = ContinuousDdimSampler(spec, RecordingDenoiser(fragile), max_batch_size=8, model="iso", version="1")
        await sampler.start()
        before = retries("iso", "denoise")
        try:
            results = await asyncio.gather(
                sampler.sample(**healthy), sampler.sample(**poisoned), return_exceptions=True
            )
        finally:
            await sampler.stop()
        return results, retries("iso", "denoise") - before

    (ok, error), retried = asyncio.run(scenario())
    assert isinstance(error, EngineError) and status_and_reason(error) == (500, "engine_error")
    assert retried >= 2
    np.testing.assert_array_equal(ok, asyncio.run(sample_alone(spec, **healthy)))


# ------------------------------------------------------------------------------ a crashed scheduler


def crash_when(loop: WorkerLoop, method: str, times: int | None = 1, when=lambda: True) -> list[int]:
    """Make `loop.<method>` raise (`times` times, None: always) while `when()`; returns the crash count."""
    original = getattr(loop, method)
    crashes = [0]

    def crashing(*args):
        if when() and (times is None or crashes[0] < times):
            crashes[0] += 1
            raise RuntimeError("scheduler bug")
        return original(*args)

    setattr(loop, method, crashing)
    return crashes


def test_scheduler_crash_answers_waiting_callers_with_503_at_once_and_restarts(caplog) -> None:
    async def scenario() -> tuple:
        run = Recorder()
        run.gate.clear()
        engine = make_engine(run, max_batch=2)
        await engine.start()
        deadline = asyncio.get_running_loop().time() + 30
        running = asyncio.ensure_future(engine.submit("op", frames(1), deadline=deadline))
        await until(run.running.is_set)
        queued = asyncio.ensure_future(engine.submit("op", frames(2, 10), deadline=deadline))
        await asyncio.sleep(0.01)
        crash_when(engine, "_next_batch")
        started = time.perf_counter()
        run.gate.set()
        results = await asyncio.gather(running, queued, return_exceptions=True)
        waited = time.perf_counter() - started
        after = await engine.submit("op", frames(1, 5))
        state = (engine.restarts, engine.healthy, engine.failure, engine.queued_items(), engine.budget.held)
        await engine.stop()
        return results, waited, after, state

    with caplog.at_level(logging.ERROR, logger="app.scheduling"):
        (done, failed), waited, after, state = asyncio.run(scenario())
    assert done["y"].shape == (1, 1)  # answered before the crash
    assert isinstance(failed, ModelUnavailable) and status_and_reason(failed) == (503, "model_unavailable")
    assert failed.headers["Retry-After"] == "1"
    assert waited < 2.0  # at once, not at its 30 s deadline
    assert float(after["y"][0, 0]) == 11.0  # the restarted scheduler serves again
    assert state == (1, True, None, 0, 0)
    crash_logs = [r for r in caplog.records if "scheduler crashed" in r.getMessage()]
    assert crash_logs and crash_logs[0].levelno == logging.ERROR and crash_logs[0].exc_info


def test_a_crash_with_a_batch_in_hand_fails_that_batch_with_503() -> None:
    async def scenario() -> tuple:
        engine = make_engine(Recorder(), max_batch=4)
        crash_when(engine, "_execute")  # the items were taken from the queue, not yet run
        await engine.start()
        started = time.perf_counter()
        with pytest.raises(ModelUnavailable):
            await engine.submit("op", frames(3), deadline=asyncio.get_running_loop().time() + 30)
        waited = time.perf_counter() - started
        after = await engine.submit("op", frames(1))
        held = engine.budget.held
        await engine.stop()
        return waited, after, held

    waited, after, held = asyncio.run(scenario())
    assert waited < 2.0 and after["y"].shape == (1, 1) and held == 0


def test_scheduler_that_keeps_crashing_stays_down_and_reports_it() -> None:
    async def scenario() -> tuple:
        engine = make_engine(Recorder(), max_batch=4)
        engine.max_restarts = 1
        failures: list[WorkerLoop] = []
        engine.on_failure = failures.append
        crash_when(engine, "_next_batch", times=None, when=lambda: engine.queued_items() > 0)
        await engine.start()
        first, second = (await submit_all(engine, [1.0]))[0], (await submit_all(engine, [2.0]))[0]
        with pytest.raises(ModelUnavailable) as refused:
            await engine.submit("op", frames(1))
        state = (engine.healthy, engine.running, engine.failure, failures == [engine])
        await engine.stop()
        return first, second, refused.value, state

    first, second, refused, (healthy, running, failure, told) = asyncio.run(scenario())
    assert isinstance(first, ModelUnavailable) and first.headers == {"Retry-After": "1"}  # restarted
    assert isinstance(second, ModelUnavailable) and not second.headers  # gave up
    assert status_and_reason(refused) == (503, "model_unavailable")  # not "shutting down"
    assert not healthy and not running and told
    assert failure is not None and "crashed 2 times" in failure and "RuntimeError" in failure


def test_restarts_are_counted_per_window() -> None:
    async def scenario() -> tuple[int, bool]:
        engine = make_engine(Recorder(), max_batch=4)
        engine.max_restarts, engine.restart_window_s = 1, 0.05
        crash_when(engine, "_next_batch", times=None, when=lambda: engine.queued_items() > 0)
        await engine.start()
        for _ in range(3):
            await submit_all(engine, [1.0])
            await asyncio.sleep(0.1)  # the previous crash leaves the window
        state = engine.restarts, engine.healthy
        await engine.stop()
        return state

    assert asyncio.run(scenario()) == (3, True)


def test_a_scheduler_task_cancelled_from_outside_is_detected() -> None:
    async def scenario() -> tuple:
        run = Recorder()
        run.gate.clear()
        engine = make_engine(run, max_batch=2)
        failures: list[WorkerLoop] = []
        engine.on_failure = failures.append
        await engine.start()
        deadline = asyncio.get_running_loop().time() + 30
        tasks = [asyncio.ensure_future(engine.submit("op", frames(n), deadline=deadline)) for n in (1, 2)]
        await until(run.running.is_set)
        engine._task.cancel()  # what a stray cancel or a bug would do
        started = time.perf_counter()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        waited = time.perf_counter() - started
        state = engine.healthy, engine.failure, failures == [engine]
        run.gate.set()
        await engine.stop()
        return results, waited, state

    results, waited, (healthy, failure, told) = asyncio.run(scenario())
    assert all(isinstance(r, ModelUnavailable) for r in results) and waited < 2.0
    assert not healthy and told and failure is not None and "cancelled" in failure


def test_sampler_crash_answers_its_waiting_request_with_503_and_restarts() -> None:
    spec = toy_spec()

    async def scenario() -> tuple:
        sampler = ContinuousDdimSampler(spec, RecordingDenoiser(), max_batch_size=8, model="iso", version="1")
        crash_when(sampler, "_next_batch", when=lambda: sampler.rows_held() > 0)
        await sampler.start()
        try:
            with pytest.raises(ModelUnavailable):
                await sampler.sample(**request_args(2, 10, 0.0, seed=1))
            return sampler.restarts, await sampler.sample(**request_args(2, 10, 0.0, seed=1))
        finally:
            await sampler.stop()

    restarts, out = asyncio.run(scenario())
    assert restarts == 1
    np.testing.assert_array_equal(out, asyncio.run(sample_alone(spec, **request_args(2, 10, 0.0, seed=1))))


# ------------------------------------------------------------------------------ what an HTTP client sees


def test_http_poisoned_request_is_500_alone_and_a_dead_engine_is_503(store) -> None:
    from app.main import create_app

    poison = np.full((1, 16, 16), 0.125, np.float32)
    bodies = [npy_bytes(np.full((1, 16, 16), v, np.float32)) for v in (0.1, 0.2, 0.3)] + [npy_bytes(poison)]
    app = create_app(make_settings(store, idle_start=False, max_delay_ms=1000.0))

    async def scenario() -> tuple[list[httpx.Response], float, httpx.Response]:
        async with app.router.lifespan_context(app):
            record = app.state.models.get("tiny-ae")
            engine, original = record.engine, record.runtimes["reconstruct"].run

            def fragile(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
                if (inputs["image"] == 0.125).all(axis=(1, 2, 3)).any():
                    raise RuntimeError("poison in /secret/model/path")
                return original(inputs)

            engine.register("reconstruct", fragile)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://aeserve") as client:
                url, headers = "/v1/models/tiny-ae/reconstruct", {"Accept": "application/x-npy"}
                before = retries("tiny-ae", "reconstruct", "10")
                answers = await asyncio.gather(*(client.post(url, content=b, headers=headers) for b in bodies))
                retried = retries("tiny-ae", "reconstruct", "10") - before
                engine._task.cancel()  # the engine dies
                await until(lambda: not engine.healthy)
                dead = await client.post(url, content=bodies[0], headers=headers)
        return answers, retried, dead

    answers, retried, dead = asyncio.run(scenario())
    assert [a.status_code for a in answers] == [200, 200, 200, 500]
    assert all(np.load(io.BytesIO(a.content)).shape == (1, 1, 16, 16) for a in answers[:3])
    error = answers[3].json()["error"]
    assert error["code"] == "engine_error" and not any(leak in error["message"] for leak in LEAKS)
    assert retried >= 1  # the four shared one batch, which was split
    assert dead.status_code == 503 and dead.json()["error"]["code"] == "model_unavailable"
