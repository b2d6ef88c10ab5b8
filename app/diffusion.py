"""Step-level continuous batching for DDIM sampling.

One `ContinuousDdimSampler` per diffusion model version runs a single sampling loop. Every request
is split into rows (one per sample); each row keeps its own timestep position, step count, eta,
condition and noise stream. At every loop iteration the rows that are active (at most
`max_batch_size`) go through ONE denoiser call together, whatever timestep each is at; rows that
finish leave, and rows of requests that arrived meanwhile take the free slots at the next step.
The blocking denoiser (an ONNX Runtime session call) runs in one dedicated worker thread.

The DDIM math is diffusers' `DDIMScheduler` with its defaults (identical to the ai-design original
for every S that divides T): "leading" timestep spacing t_k = k·(T // S) visited in descending order
(T = 1000, S = 10 → 900, 800, …, 0; exactly S steps), `steps_offset=0`, `set_alpha_to_one=True`
(ᾱ_prev = 1 on the last step), x̂₀ clipped to [−1, 1] when `clip_denoised`, and the direction term
uses the raw ε. The schedule is rebuilt in numpy from the manifest's numbers bit-for-bit as torch
builds it (float32 `linspace`, `cumprod` accumulated in float64), so `app` needs no training code.

Noise: a request's x_T is `default_rng(seed).standard_normal((N, C, H, W), float32)`; for η > 0 row i
draws its per-step noise from child i of that generator (`Generator.spawn`). Row i of a request
therefore depends only on (seed, i, steps, eta, condition), never on what else shares the batch.

`deadline` is absolute, on the event loop's clock (`loop.time()`, as `app.batcher` uses); a request past
it fails with `app.errors.DeadlineExceeded` (504). Bad arguments raise `InvalidSampleRequest` (422),
a stopped sampler `SamplerStopped` (503), a failing denoiser `EngineError` (500) for its whole batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from app.errors import DeadlineExceeded, EngineError, InvalidInput, ServiceError, ShuttingDown
from app.metrics import COMPUTE_DURATION, DIFFUSION_ACTIVE, DIFFUSION_STEP_BATCH, QUEUE_DEPTH, QUEUE_WAIT
from app.schemas.manifest import SamplerSpec

__all__ = ["ContinuousDdimSampler", "DeadlineExceeded", "InvalidSampleRequest", "SamplerStopped",
           "ddim_step", "ddim_timesteps", "schedule_from_spec"]

log = logging.getLogger(__name__)

DenoiseFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

OP = "denoise"
COSINE_S = 0.008
COSINE_BETA_CLIP = (1e-4, 0.9999)


class SamplerStopped(ShuttingDown, RuntimeError):
    """The sampler is not running (never started, or stopped before the request finished): 503."""


class InvalidSampleRequest(InvalidInput, ValueError):
    """A sample() argument is out of range (422, naming the field)."""


# ------------------------------------------------------------------------------- pure DDIM math


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """float32 β = torch.linspace(beta_start, beta_end, T), reproduced bit for bit.

    torch computes step = (end − start) / (T − 1) in float32, then start + step·i for the first half
    and end − step·(T − 1 − i) for the second, each with one rounding (a fused multiply-add).
    """
    start, end = np.float32(beta_start), np.float32(beta_end)
    if num_train_timesteps == 1:
        return np.array([start], dtype=np.float32)
    step = np.float64((end - start) / np.float32(num_train_timesteps - 1))
    i = np.arange(num_train_timesteps, dtype=np.float64)
    first = np.float64(start) + step * i
    second = np.float64(end) - step * (num_train_timesteps - 1 - i)
    return np.where(i < num_train_timesteps // 2, first, second).astype(np.float32)


def cosine_betas(num_train_timesteps: int) -> np.ndarray:
    """Nichol & Dhariwal (2021), s = 0.008, computed in float64, β clipped to [1e-4, 0.9999], float32.

    This is the ai-design original's cosine schedule (the one the models are trained with); it differs
    from diffusers' "squaredcos_cap_v2" only in the clip bounds.
    """
    steps = np.linspace(0.0, num_train_timesteps, num_train_timesteps + 1, dtype=np.float64)
    f = np.cos(((steps / num_train_timesteps) + COSINE_S) / (1 + COSINE_S) * np.pi * 0.5) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, *COSINE_BETA_CLIP).astype(np.float32)


def schedule_from_spec(spec: SamplerSpec) -> tuple[np.ndarray, np.ndarray]:
    """(β, ᾱ) as float32 arrays of length T from a "ddim" `SamplerSpec`."""
    if spec.kind != "ddim":
        raise ValueError(f"sampler.kind must be 'ddim' for ContinuousDdimSampler; got {spec.kind!r}")
    num_t = spec.num_train_timesteps
    if num_t is None or num_t < 1:
        raise ValueError(f"sampler.num_train_timesteps must be an integer >= 1; got {num_t!r}")
    if spec.beta_schedule == "linear":
        if spec.beta_start is None or spec.beta_end is None:
            raise ValueError("sampler.beta_schedule 'linear' needs sampler.beta_start and sampler.beta_end")
        if not 0.0 < spec.beta_start <= spec.beta_end < 1.0:
            raise ValueError(f"sampler.beta_start/beta_end must satisfy 0 < start <= end < 1; "
                             f"got {spec.beta_start}, {spec.beta_end}")
        betas = linear_betas(spec.beta_start, spec.beta_end, num_t)
    elif spec.beta_schedule == "cosine":
        betas = cosine_betas(num_t)
    else:
        raise ValueError(f"sampler.beta_schedule must be one of ('linear', 'cosine'); "
                         f"got {spec.beta_schedule!r}")
    # torch.cumprod on CPU accumulates float32 products in double and rounds each prefix once.
    alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    return betas, alphas_cumprod


def ddim_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """Visited timesteps, descending: k·(T // S) for k = S−1 … 0 (diffusers "leading", offset 0)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be within [1, {num_train_timesteps}]; got {steps}")
    stride = num_train_timesteps // steps
    return np.arange(steps - 1, -1, -1, dtype=np.int64) * stride


def ddim_step(x_t: np.ndarray, eps: np.ndarray, alpha_bar: np.ndarray, alpha_bar_prev: np.ndarray,
              eta: np.ndarray, noise: np.ndarray | None, clip_denoised: bool) -> np.ndarray:
    """One DDIM step for B rows, each with its own ᾱ_t, ᾱ_prev and η (1-D float32 arrays of length B).

    x̂₀ = (x_t − sqrt(1−ᾱ_t)·ε)/sqrt(ᾱ_t) (clipped to [−1, 1] if `clip_denoised`);
    σ = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev));
    x_prev = sqrt(ᾱ_prev)·x̂₀ + sqrt(1−ᾱ_prev−σ²)·ε + σ·z. All arithmetic in float32, as torch does.
    `noise` (z, like x_t) is only read for rows with η > 0.
    """
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a = alpha_bar.astype(np.float32).reshape(shape)
    a_prev = alpha_bar_prev.astype(np.float32).reshape(shape)
    eta32 = eta.astype(np.float32).reshape(shape)
    one = np.float32(1.0)
    x0 = (x_t - np.sqrt(one - a) * eps) / np.sqrt(a)
    if clip_denoised:
        x0 = np.clip(x0, np.float32(-1.0), np.float32(1.0))
    sigma = eta32 * np.sqrt((one - a_prev) / (one - a) * (one - a / a_prev))
    x_prev = np.sqrt(a_prev) * x0 + np.sqrt(one - a_prev - sigma * sigma) * eps
    if noise is not None and bool((eta32 > 0).any()):
        x_prev = x_prev + np.where(eta32 > 0, sigma, np.float32(0.0)) * noise
    return x_prev.astype(np.float32, copy=False)


# ------------------------------------------------------------------------------ the batching loop


@dataclass(eq=False)
class _Request:
    x: np.ndarray                      # (N, C, H, W) float32, updated in place step by step
    condition: np.ndarray              # (N, M) float32
    timesteps: np.ndarray              # (S,) int64, descending
    eta: float
    deadline: float | None
    future: asyncio.Future[np.ndarray]
    arrived: float
    rows_left: int

    @property
    def over(self) -> bool:
        """Finished, failed, or abandoned by its caller: its rows leave the loop."""
        return self.future.done()


@dataclass(eq=False)
class _Row:
    request: _Request
    index: int
    rng: np.random.Generator | None    # per-row noise stream (η > 0 only)
    position: int = 0                  # index into request.timesteps


class ContinuousDdimSampler:
    """DDIM sampling with step-level continuous batching over one blocking denoiser.

    `run_denoise(x_t (B,C,H,W) float32, t (B,) int64, cond (B,M) float32) -> eps (B,C,H,W)` is called
    from one dedicated worker thread, once per loop step, with every active row (≤ max_batch_size).
    """

    def __init__(self, spec: SamplerSpec, run_denoise: DenoiseFn, *, max_batch_size: int,
                 model: str, version: str) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1; got {max_batch_size}")
        if spec.image_shape is None or len(spec.image_shape) != 3:
            raise ValueError(f"sampler.image_shape must be (C, H, W); got {spec.image_shape!r}")
        self.spec = spec
        self.betas, self.alphas_cumprod = schedule_from_spec(spec)
        self.image_shape = tuple(int(s) for s in spec.image_shape)
        self.max_steps = min(spec.max_steps, len(self.alphas_cumprod))
        self.max_batch_size = max_batch_size
        self.model, self.version = model, version
        self._run_denoise = run_denoise
        self._waiting: deque[_Row] = deque()
        self._active: list[_Row] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._m_active = DIFFUSION_ACTIVE.labels(model, version)
        self._m_step_batch = DIFFUSION_STEP_BATCH.labels(model, version)
        self._m_compute = COMPUTE_DURATION.labels(model, version, OP)
        self._m_queue_wait = QUEUE_WAIT.labels(model, version, OP)
        self._m_queue_depth = QUEUE_DEPTH.labels(model, version, OP)

    # -------------------------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done() and not self._closing

    async def start(self) -> None:
        """Start the worker thread and the sampling loop."""
        if self._task is not None:
            raise RuntimeError("ContinuousDdimSampler.start() called twice")
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"ddim-{self.model}")
        self._task = asyncio.create_task(self._loop(), name=f"ddim-sampler-{self.model}-{self.version}")

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_timeout` s, then cancel the rest."""
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), drain_timeout)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._fail_all(SamplerStopped(f"sampler for {self.model}/{self.version} stopped"))
        if self._executor is not None:
            executor, self._executor = self._executor, None
            # Wait for an in-flight denoiser call off the event loop, then release the thread.
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown, True)

    # ---------------------------------------------------------------------------------- requests

    async def sample(self, num_samples: int, steps: int, eta: float, condition: np.ndarray | None,
                     seed: int, deadline: float | None = None, *,
                     x_T: np.ndarray | None = None) -> np.ndarray:
        """Generate `num_samples` images (N, C, H, W) float32 with `steps` DDIM steps.

        `condition` is (N, M) with M = spec.condition_dim (None allowed when M = 0); `deadline` is an
        absolute `loop.time()` or None. Values lie in [−1, 1] when `spec.clip_denoised` (the last step
        returns the clipped x̂₀). `x_T` (optional, (N, C, H, W)) replaces the seeded initial noise (the
        seed still drives the η > 0 noise).
        """
        if not self.running:
            raise SamplerStopped(f"sampler for {self.model}/{self.version} is not running")
        loop = asyncio.get_running_loop()
        request = self._make_request(num_samples, steps, eta, condition, seed, deadline, x_T)
        if deadline is not None and deadline <= loop.time():
            raise DeadlineExceeded("deadline passed before sampling started", field="deadline")
        rng = np.random.default_rng(seed)
        if x_T is None:
            request.x[...] = rng.standard_normal(request.x.shape, dtype=np.float32)
        children = rng.spawn(num_samples) if eta > 0 else [None] * num_samples
        self._waiting.extend(_Row(request, i, children[i]) for i in range(num_samples))
        self._m_queue_depth.set(len(self._waiting))
        self._wake.set()
        try:
            if deadline is None:
                return await asyncio.shield(request.future)
            return await asyncio.wait_for(asyncio.shield(request.future), deadline - loop.time())
        except TimeoutError:
            request.future.cancel()
            self._wake.set()
            raise DeadlineExceeded(f"sampling {num_samples} × {steps} steps did not finish within the "
                                   f"request deadline", field="deadline") from None
        except asyncio.CancelledError:
            request.future.cancel()  # the client went away: its rows leave at the next step
            self._wake.set()
            raise

    def _make_request(self, num_samples: int, steps: int, eta: float, condition: np.ndarray | None,
                      seed: int, deadline: float | None, x_T: np.ndarray | None) -> _Request:
        def bad(field: str, message: str, limit: object) -> InvalidSampleRequest:
            return InvalidSampleRequest(f"{field}: {message}", field=field, limit=limit)

        if not isinstance(num_samples, int | np.integer) or num_samples < 1:
            raise bad("num_samples", f"must be an integer >= 1; got {num_samples!r}", ">= 1")
        if not isinstance(steps, int | np.integer) or not 1 <= steps <= self.max_steps:
            raise bad("steps", f"must be an integer within [1, {self.max_steps}]; got {steps!r}",
                      self.max_steps)
        if not 0.0 <= float(eta) <= 1.0:
            raise bad("eta", f"must be within [0, 1]; got {eta!r}", "[0, 1]")
        if not isinstance(seed, int | np.integer) or seed < 0:
            raise bad("seed", f"must be a non-negative integer; got {seed!r}", ">= 0")
        m = self.spec.condition_dim
        if condition is None:
            if m:
                raise bad("condition", f"an array of shape ({num_samples}, {m}) is required", m)
            condition = np.zeros((num_samples, 0), dtype=np.float32)
        condition = np.asarray(condition, dtype=np.float32)
        if condition.shape != (num_samples, m):
            raise bad("condition", f"must have shape ({num_samples}, {m}); got {condition.shape}", m)
        shape = (num_samples, *self.image_shape)
        if x_T is None:
            x = np.empty(shape, dtype=np.float32)
        else:
            x = np.array(x_T, dtype=np.float32, copy=True)
            if x.shape != shape:
                raise bad("x_T", f"must have shape {shape}; got {x.shape}", list(shape))
        loop = asyncio.get_running_loop()
        return _Request(x=x, condition=condition, timesteps=ddim_timesteps(len(self.alphas_cumprod), steps),
                        eta=float(eta), deadline=deadline, future=loop.create_future(),
                        arrived=loop.time(), rows_left=num_samples)

    # ------------------------------------------------------------------------------------ loop

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_finished_requests(loop.time())
            self._admit(loop.time())
            if not self._active:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._step(loop)

    def _drop_finished_requests(self, now: float) -> None:
        """Fail requests whose deadline has passed; remove the rows of every request that is over."""
        for row in [*self._active, *self._waiting]:
            request = row.request
            if not request.over and request.deadline is not None and request.deadline <= now:
                request.future.set_exception(DeadlineExceeded(
                    "sampling did not finish within the request deadline", field="deadline"))
        self._active = [r for r in self._active if not r.request.over]
        if any(r.request.over for r in self._waiting):
            self._waiting = deque(r for r in self._waiting if not r.request.over)
        self._publish_gauges()

    def _admit(self, now: float) -> None:
        while self._waiting and len(self._active) < self.max_batch_size:
            row = self._waiting.popleft()
            self._m_queue_wait.observe(now - row.request.arrived)
            self._active.append(row)
        self._publish_gauges()

    def _publish_gauges(self) -> None:
        self._m_active.set(len(self._active))
        self._m_queue_depth.set(len(self._waiting))

    async def _step(self, loop: asyncio.AbstractEventLoop) -> None:
        rows = list(self._active)
        x = np.stack([r.request.x[r.index] for r in rows])
        t = np.array([r.request.timesteps[r.position] for r in rows], dtype=np.int64)
        cond = np.stack([r.request.condition[r.index] for r in rows])
        started = time.perf_counter()
        try:
            eps = await loop.run_in_executor(self._executor, self._run_denoise, x, t, cond)
            eps = np.asarray(eps, dtype=np.float32)
            if eps.shape != x.shape:
                raise RuntimeError(f"denoise returned shape {eps.shape}; expected {x.shape}")
        except Exception as exc:  # the engine failed: every request in this batch fails with it
            log.exception("%s/%s denoise: step batch of %d failed", self.model, self.version, len(rows))
            error = exc if isinstance(exc, ServiceError) else EngineError(f"denoise failed: {exc}")
            self._fail_rows(rows, error, loop.time())
            return
        self._m_compute.observe(time.perf_counter() - started)
        self._m_step_batch.observe(len(rows))

        num_t = len(self.alphas_cumprod)
        alpha_bar = self.alphas_cumprod[t]
        t_prev = t - np.array([num_t // len(r.request.timesteps) for r in rows], dtype=np.int64)
        alpha_bar_prev = np.where(t_prev >= 0, self.alphas_cumprod[np.maximum(t_prev, 0)], np.float32(1.0))
        eta = np.array([r.request.eta for r in rows], dtype=np.float32)
        noise = None
        if bool((eta > 0).any()):
            noise = np.zeros_like(x)
            for i, row in enumerate(rows):
                if row.rng is not None:
                    noise[i] = row.rng.standard_normal(self.image_shape, dtype=np.float32)
        x_prev = ddim_step(x, eps, alpha_bar, alpha_bar_prev.astype(np.float32), eta, noise,
                           self.spec.clip_denoised)

        still_active: list[_Row] = []
        for i, row in enumerate(rows):
            request = row.request
            if request.over:
                continue
            request.x[row.index] = x_prev[i]
            row.position += 1
            if row.position < len(request.timesteps):
                still_active.append(row)
                continue
            request.rows_left -= 1
            if request.rows_left == 0:
                request.future.set_result(request.x)
        self._active = still_active
        self._publish_gauges()

    def _fail_rows(self, rows: list[_Row], exc: BaseException, now: float) -> None:
        for row in rows:
            if not row.request.over:
                row.request.future.set_exception(exc)
        self._drop_finished_requests(now)

    def _fail_all(self, exc: BaseException) -> None:
        for row in [*self._active, *self._waiting]:
            if not row.request.over:
                row.request.future.set_exception(exc)
        self._active, self._waiting = [], deque()
        self._publish_gauges()
