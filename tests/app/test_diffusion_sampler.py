"""ContinuousDdimSampler: the original's DDIM trajectory, seed determinism under batching, joins
mid-loop, deadlines, shutdown, metrics, and the continuous-batching speed-up."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from app.ddim import ddim_timesteps, schedule_from_spec
from app.diffusion import ContinuousDdimSampler, InvalidSampleRequest, SamplerStopped
from app.errors import DeadlineExceeded, EngineError, status_and_reason
from app.metrics import REGISTRY
from tests.app.diffusion_toys import CASE, FAMILY, RecordingDenoiser, request_args, sample_alone, toy_eps, toy_spec
from tests.conftest import fixture_dir

# ------------------------------------------------------------------------- fixture trajectory


@pytest.mark.parametrize("max_batch_size", [1, 2, 8])
def test_fixture_trajectory_replay(max_batch_size: int) -> None:
    """Replaying the original's recorded ε, every step input and the final sample are reproduced."""
    io = load_file(fixture_dir(FAMILY) / f"{CASE}.io.safetensors")
    timesteps = io["ddim.timesteps"].tolist()
    steps = len(timesteps)
    recorded_x = [io[f"ddim.step{k:02d}.x"] for k in range(steps)]
    recorded_eps = [io[f"ddim.step{k:02d}.eps"] for k in range(steps)]
    errors: list[float] = []

    def replay(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        out = np.empty_like(x)
        for i in range(len(t)):
            k = timesteps.index(int(t[i]))
            row = int(np.argmin(np.abs(recorded_x[k] - x[i]).reshape(len(recorded_x[k]), -1).max(axis=1)))
            np.testing.assert_array_equal(cond[i], io["ddim.condition"][row])
            errors.append(float(np.abs(recorded_x[k][row] - x[i]).max()))
            out[i] = recorded_eps[k][row]
        return out

    spec = toy_spec(image_shape=(3, 32, 32), condition_dim=3, default_steps=10)

    async def main() -> np.ndarray:
        sampler = ContinuousDdimSampler(spec, replay, max_batch_size=max_batch_size, model="fx", version="1")
        await sampler.start()
        try:
            return await sampler.sample(
                2, steps, 0.0, io["ddim.condition"], seed=0, deadline=None, x_T=io["ddim.x_T"]
            )
        finally:
            await sampler.stop()

    sample = asyncio.run(main())
    assert ddim_timesteps(1000, steps).tolist() == timesteps
    assert len(errors) == 2 * steps
    err = float(np.abs(sample - io["output.ddim_sample"]).max())
    print(f"max_batch_size={max_batch_size}: step-input max err {max(errors):.2e}, sample max err {err:.2e}")
    assert max(errors) <= 1e-4
    assert err <= 1e-4
    assert sample.dtype == np.float32 and sample.min() >= -1.0 and sample.max() <= 1.0


# ------------------------------------------------------------------ determinism and batching


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_same_seed_same_images_alone_or_mixed(eta: float) -> None:
    spec = toy_spec()
    target = request_args(3, 12, eta, seed=11)

    async def mixed() -> tuple[np.ndarray, RecordingDenoiser]:
        denoiser = RecordingDenoiser()
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=4, model="toy", version="1")
        await sampler.start()
        try:
            results = await asyncio.gather(
                sampler.sample(**request_args(2, 7, 0.3, seed=1)),
                sampler.sample(**target),
                sampler.sample(**request_args(4, 20, eta, seed=2)),
            )
        finally:
            await sampler.stop()
        return results[1], denoiser

    alone = asyncio.run(sample_alone(spec, **target))
    together, denoiser = asyncio.run(mixed())
    np.testing.assert_array_equal(together, alone)
    assert max(len(t) for t in denoiser.calls) == 4  # the batch was full
    assert any(len(set(t.tolist())) > 1 for t in denoiser.calls)  # rows at different timesteps
    assert len(denoiser.threads) == 1  # one dedicated worker thread
    other_seed = asyncio.run(sample_alone(spec, **{**target, "seed": 12}))
    assert not np.allclose(other_seed, alone)


def test_rows_of_a_request_do_not_depend_on_its_size() -> None:
    spec = toy_spec()
    three = asyncio.run(sample_alone(spec, **request_args(3, 10, 0.5, seed=5)))
    req = request_args(3, 10, 0.5, seed=5)
    one = asyncio.run(sample_alone(spec, **{**req, "num_samples": 1, "condition": req["condition"][:1]}))
    np.testing.assert_array_equal(one[0], three[0])


def test_eta_noise_matches_an_independent_float64_loop() -> None:
    """η > 0: x_T and per-row noise come from default_rng(seed) and its spawned children."""
    spec = toy_spec()
    req = request_args(2, 8, 0.8, seed=3)
    got = asyncio.run(sample_alone(spec, **req))

    _, alphas_cumprod = schedule_from_spec(spec)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 8, 8), dtype=np.float32)
    children = rng.spawn(2)
    a_all = alphas_cumprod.astype(np.float64)
    timesteps = list(range(875, -1, -125))
    for k, t in enumerate(timesteps):
        eps = toy_eps(x, np.full(2, t, np.int64), req["condition"]).astype(np.float64)
        a = a_all[t]
        a_prev = a_all[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0
        x0 = np.clip((x - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
        sigma = 0.8 * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        z = np.stack([c.standard_normal((1, 8, 8), dtype=np.float32) for c in children])
        x = (np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z).astype(np.float32)
    np.testing.assert_allclose(got, x, rtol=0, atol=1e-4)
    assert got.min() >= -1 and got.max() <= 1


def test_request_joining_mid_loop_finishes_correctly() -> None:
    spec = toy_spec()
    first, late = request_args(1, 50, 0.0, seed=1), request_args(2, 20, 0.0, seed=2)

    async def main() -> tuple[np.ndarray, np.ndarray, RecordingDenoiser]:
        denoiser = RecordingDenoiser(delay=0.002)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=8, model="toy", version="1")
        await sampler.start()
        try:
            running = asyncio.create_task(sampler.sample(**first))
            while len(denoiser.calls) < 10:
                await asyncio.sleep(0.001)
            joined = await sampler.sample(**late)
            assert not running.done()
            return await running, joined, denoiser
        finally:
            await sampler.stop()

    a, b, denoiser = asyncio.run(main())
    np.testing.assert_array_equal(a, asyncio.run(sample_alone(spec, **first)))
    np.testing.assert_array_equal(b, asyncio.run(sample_alone(spec, **late)))
    assert len(denoiser.calls) == 50  # the late request rode along: no extra denoiser calls
    shared = [t for t in denoiser.calls if len(t) == 3]
    assert len(shared) == 20
    assert shared[0].tolist()[1:] == [950, 950] and shared[0][0] < 950  # own positions per request
    assert shared[-1].tolist()[1:] == [0, 0]


def test_overflow_rows_wait_for_a_slot() -> None:
    spec = toy_spec()
    req = request_args(5, 6, 0.0, seed=9)

    async def main() -> tuple[np.ndarray, RecordingDenoiser]:
        denoiser = RecordingDenoiser()
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=2, model="toy", version="1")
        await sampler.start()
        try:
            return await sampler.sample(**req), denoiser
        finally:
            await sampler.stop()

    out, denoiser = asyncio.run(main())
    assert max(len(t) for t in denoiser.calls) == 2
    assert sum(len(t) for t in denoiser.calls) == 5 * 6
    np.testing.assert_array_equal(out, asyncio.run(sample_alone(spec, **req)))


def test_concurrent_requests_share_denoiser_calls() -> None:
    """The issue: 8 concurrent 50-step requests must not cost 8× one request."""
    spec = toy_spec(image_shape=(1, 16, 16))
    kernel = np.full((3, 3), 1 / 9, dtype=np.float32)

    def conv_eps(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
        time.sleep(0.005)  # fixed per-call engine overhead dominates, as on a GPU
        return (np.einsum("bchwij,ij->bchw", windows, kernel) * np.float32(0.1)).astype(np.float32)

    async def timed(n_requests: int) -> tuple[float, int]:
        denoiser = RecordingDenoiser(conv_eps)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=8, model="toy", version="1")
        await sampler.start()
        try:
            started = time.perf_counter()
            await asyncio.gather(*(sampler.sample(**request_args(1, 50, 0.0, seed=s)) for s in range(n_requests)))
            return time.perf_counter() - started, len(denoiser.calls)
        finally:
            await sampler.stop()

    one, calls_one = asyncio.run(timed(1))
    eight, calls_eight = asyncio.run(timed(8))
    ratio = eight / one
    print(
        f"1 request: {one * 1e3:.0f} ms ({calls_one} calls); 8 concurrent: {eight * 1e3:.0f} ms "
        f"({calls_eight} calls); ratio {ratio:.2f}x (serial would be 8x)"
    )
    assert calls_one == calls_eight == 50
    assert ratio < 3.0


# ------------------------------------------------------------------ deadlines, errors, shutdown


def test_deadline_fails_only_that_request() -> None:
    spec = toy_spec()
    slow, patient = request_args(1, 50, 0.0, seed=1), request_args(1, 30, 0.0, seed=2)

    async def main() -> tuple[BaseException | np.ndarray, ...]:
        sampler = ContinuousDdimSampler(
            spec, RecordingDenoiser(delay=0.004), max_batch_size=8, model="toy", version="1"
        )
        await sampler.start()
        now = asyncio.get_running_loop().time()  # deadlines are on the event loop's clock
        try:
            return tuple(
                await asyncio.gather(
                    sampler.sample(**{**slow, "deadline": now + 0.05}),
                    sampler.sample(**patient),
                    sampler.sample(**{**slow, "deadline": now - 1}),
                    return_exceptions=True,
                )
            )
        finally:
            await sampler.stop()

    late, ok, expired = asyncio.run(main())
    assert isinstance(late, DeadlineExceeded) and isinstance(expired, DeadlineExceeded)
    assert status_and_reason(late) == (504, "deadline_exceeded")
    np.testing.assert_array_equal(ok, asyncio.run(sample_alone(spec, **patient)))


def test_denoiser_error_fails_its_batch_and_the_loop_survives() -> None:
    spec = toy_spec()
    broken = {"on": True}

    def flaky(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        if broken["on"] and (t < 500).any():
            raise RuntimeError("engine exploded")
        return toy_eps(x, t, cond)

    async def main() -> tuple[BaseException | None, np.ndarray]:
        sampler = ContinuousDdimSampler(spec, flaky, max_batch_size=8, model="toy", version="1")
        await sampler.start()
        try:
            try:
                await sampler.sample(**request_args(2, 10, 0.0, seed=1))
                error = None
            except EngineError as exc:
                error = exc
            broken["on"] = False
            return error, await sampler.sample(**request_args(2, 10, 0.0, seed=1))
        finally:
            await sampler.stop()

    error, out = asyncio.run(main())
    assert error is not None and "engine exploded" in str(error)
    assert status_and_reason(error) == (500, "engine_error")
    np.testing.assert_array_equal(out, asyncio.run(sample_alone(spec, **request_args(2, 10, 0.0, seed=1))))


def test_stop_drains_running_requests_then_refuses_new_ones() -> None:
    spec = toy_spec()

    async def main() -> None:
        sampler = ContinuousDdimSampler(
            spec, RecordingDenoiser(delay=0.002), max_batch_size=8, model="toy", version="1"
        )
        with pytest.raises(SamplerStopped):
            await sampler.sample(**request_args(1, 5, 0.0, seed=1))
        await sampler.start()
        running = asyncio.create_task(sampler.sample(**request_args(2, 20, 0.0, seed=1)))
        await asyncio.sleep(0.01)
        await sampler.stop()
        assert running.done() and (await running).shape == (2, 1, 8, 8)
        with pytest.raises(SamplerStopped):
            await sampler.sample(**request_args(1, 5, 0.0, seed=1))

        sampler = ContinuousDdimSampler(
            spec, RecordingDenoiser(delay=0.005), max_batch_size=8, model="toy", version="1"
        )
        await sampler.start()
        running = asyncio.create_task(sampler.sample(**request_args(1, 200, 0.0, seed=1)))
        await asyncio.sleep(0.02)
        await sampler.stop(drain_timeout=0.02)
        with pytest.raises(SamplerStopped) as stopped:
            await running
        assert status_and_reason(stopped.value) == (503, "shutting_down")
        assert isinstance(stopped.value, RuntimeError)  # what app.api.sample also catches

    asyncio.run(main())


def test_cancelled_request_leaves_the_loop() -> None:
    spec = toy_spec()

    async def main() -> RecordingDenoiser:
        denoiser = RecordingDenoiser(delay=0.002)
        sampler = ContinuousDdimSampler(spec, denoiser, max_batch_size=8, model="toy", version="1")
        await sampler.start()
        try:
            doomed = asyncio.create_task(sampler.sample(**request_args(3, 100, 0.0, seed=1)))
            while len(denoiser.calls) < 5:
                await asyncio.sleep(0.001)
            doomed.cancel()
            await asyncio.gather(doomed, return_exceptions=True)
            out = await sampler.sample(**request_args(1, 10, 0.0, seed=2))
            assert out.shape == (1, 1, 8, 8)
        finally:
            await sampler.stop()
        return denoiser

    denoiser = asyncio.run(main())
    assert len(denoiser.calls) < 40
    assert all(len(t) == 1 for t in denoiser.calls[-9:])


def test_invalid_requests_name_the_argument() -> None:
    spec = toy_spec(max_steps=100)

    async def main() -> None:
        sampler = ContinuousDdimSampler(spec, toy_eps, max_batch_size=4, model="toy", version="1")
        await sampler.start()
        try:
            good = request_args(2, 10, 0.0, seed=1)
            for bad, word in [
                ({"steps": 0}, "steps"),
                ({"steps": 101}, "steps"),
                ({"eta": -0.1}, "eta"),
                ({"eta": 1.5}, "eta"),
                ({"num_samples": 0}, "num_samples"),
                ({"seed": -1}, "seed"),
                ({"condition": None}, "condition"),
                ({"condition": np.zeros((2, 3), np.float32)}, "condition"),
            ]:
                with pytest.raises(InvalidSampleRequest, match=word) as err:
                    await sampler.sample(**{**good, **bad})
                assert err.value.field == word and isinstance(err.value, ValueError)
                assert status_and_reason(err.value) == (422, "invalid_input")
        finally:
            await sampler.stop()

    asyncio.run(main())


def test_metrics_are_recorded() -> None:
    spec = toy_spec()
    labels = {"model": "metrics-toy", "version": "7"}
    op_labels = {**labels, "op": "denoise"}

    def value(name: str, lab: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, lab) or 0.0

    async def main() -> None:
        sampler = ContinuousDdimSampler(spec, toy_eps, max_batch_size=4, model="metrics-toy", version="7")
        await sampler.start()
        try:
            await asyncio.gather(
                sampler.sample(**request_args(3, 10, 0.0, seed=1)), sampler.sample(**request_args(2, 10, 0.0, seed=2))
            )
        finally:
            await sampler.stop()

    asyncio.run(main())
    assert value("aeserve_compute_duration_seconds_count", op_labels) >= 10
    steps = value("aeserve_diffusion_step_batch_size_count", labels)
    rows = value("aeserve_diffusion_step_batch_size_sum", labels)
    assert steps >= 10 and rows == 5 * 10
    assert value("aeserve_diffusion_active_samples", labels) == 0
    assert value("aeserve_queue_wait_seconds_count", op_labels) == 5
    assert value("aeserve_queue_depth", op_labels) == 0
