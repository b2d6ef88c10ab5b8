"""Step-level continuous batching for DDIM sampling.

One `ContinuousDdimSampler` per diffusion model version runs a single sampling loop (an
`app.scheduling.WorkerLoop`: one scheduler task, one worker thread for the blocking denoiser, an
ONNX Runtime session call). Every request is split into rows (one per sample); each row keeps its
own timestep position, step count, eta, condition and noise stream. At every loop iteration up to
`max_batch_size` rows go through ONE denoiser call together, whatever timestep each is at; rows that
finish leave and free their slots for the next step. The DDIM math (diffusers' `DDIMScheduler`
defaults, rebuilt in numpy) lives in `app.ddim`.

Fair share: when more rows want a step than there are slots, the slots are split max-min fairly
between the admitted requests (`app.scheduling.fair_shares`), starting each step where the last one
stopped (round-robin), so every request advances at every step (or, with more requests than
slots, at least every ceil(requests / slots) steps): a 64-sample × 1000-step request cannot starve a
1-sample × 10-step one. Within a request the most advanced rows go first, so its rows finish early.
A row that waits a step keeps its state, so the results never depend on the schedule.

Bounded admission, at `sample()` before anything is queued (each a 429 `QueueFull` with
Retry-After, counted in `aeserve_rejections_total`): more than `max_rows` rows waiting or running
(an idle sampler takes any size), or a deadline the request cannot meet at the present load, from
the measured mean step time (unknown before the first step: then nothing is refused, and the
deadline cut-off below still bounds the work). A request that could not meet its deadline even
alone is a 504 `DeadlineExceeded` (code `deadline_unreachable`) at once.

Noise: a request's x_T is `default_rng(seed).standard_normal((N, C, H, W), float32)`; for η > 0 row i
draws its per-step noise from child i of that generator (`Generator.spawn`). Row i of a request
therefore depends only on (seed, i, steps, eta, condition), never on what else shares the batch.

`deadline` is absolute, on the event loop's clock (`loop.time()`, `time.monotonic()` on the default
loop; the same clock as `app.batcher`); a request past it fails with `app.errors.DeadlineExceeded`
(504) and its rows leave the loop before the next step (cut off, never left to run). Bad arguments
raise `InvalidSampleRequest` (422), a stopped sampler `SamplerStopped` (503), a failed one
`ModelUnavailable` (503, see `app.scheduling.WorkerLoop`), a failing denoiser `EngineError` (500) for
the requests that fail alone: a failed step batch is re-run in halves, by request
(`app.scheduling.isolate_failures`), so the others still advance.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from app.admission import count_rejection, shed
from app.ddim import ddim_step, ddim_timesteps, schedule_from_spec
from app.errors import DeadlineExceeded, EngineError, InvalidInput, ServiceError, ShuttingDown
from app.metrics import (
    BATCH_RETRIES,
    COMPUTE_DURATION,
    DIFFUSION_ACTIVE,
    DIFFUSION_STEP_BATCH,
    QUEUE_DEPTH,
    QUEUE_WAIT,
)
from app.scheduling import (
    ErrorFactory,
    WorkerLoop,
    fail_unanswered,
    fair_shares,
    isolate_failures,
    settle_if_expired,
)
from app.schemas.manifest import SamplerSpec

__all__ = ["ContinuousDdimSampler", "InvalidSampleRequest", "SamplerStopped"]

log = logging.getLogger(__name__)

DenoiseFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

OP = "denoise"
DEFAULT_MAX_ROWS = 128
STEP_TIME_SMOOTHING = 0.2  # weight of the newest step in the moving mean step time


class SamplerStopped(ShuttingDown, RuntimeError):
    """The sampler is not running (never started, or stopped before the request finished): 503."""


class InvalidSampleRequest(InvalidInput, ValueError):
    """A sample() argument is out of range (422, naming the field)."""


@dataclass(eq=False)
class _Request:
    x: np.ndarray                      # (N, C, H, W) float32, updated in place step by step
    condition: np.ndarray              # (N, M) float32
    timesteps: np.ndarray              # (S,) int64, descending
    eta: float
    deadline: float | None             # absolute, on the loop clock
    future: asyncio.Future[np.ndarray]
    arrived: float                     # loop clock
    rows: list[_Row] = field(default_factory=list)  # unfinished rows, the most advanced first

    @property
    def over(self) -> bool:
        """Finished, failed, or abandoned by its caller: its rows leave the loop."""
        return self.future.done()

    def steps_left(self) -> int:
        """Row-steps this request still needs."""
        return sum(len(self.timesteps) - row.position for row in self.rows)


@dataclass(eq=False)
class _Row:
    request: _Request
    index: int
    rng: np.random.Generator | None    # per-row noise stream (η > 0 only)
    position: int = 0                  # index into request.timesteps
    started: bool = False              # has had a step (its queue wait is recorded)


class ContinuousDdimSampler(WorkerLoop[list[_Row]]):
    """DDIM sampling with step-level continuous batching over one blocking denoiser.

    `run_denoise(x_t (B,C,H,W) float32, t (B,) int64, cond (B,M) float32) -> eps (B,C,H,W)` is called
    from one dedicated worker thread, once per loop step, with the rows picked for it (B ≤
    max_batch_size). At most `max_rows` rows wait or run at once (an idle sampler takes any size).
    """

    def __init__(self, spec: SamplerSpec, run_denoise: DenoiseFn, *, max_batch_size: int,
                 model: str, version: str, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_batch_size < 1 or max_rows < 1:
            raise ValueError(f"max_batch_size and max_rows must be >= 1; got {max_batch_size}, {max_rows}")
        if spec.image_shape is None or len(spec.image_shape) != 3:
            raise ValueError(f"sampler.image_shape must be (C, H, W); got {spec.image_shape!r}")
        super().__init__(f"ddim-{model}-{version}", model, version, OP)
        self.spec = spec
        self.betas, self.alphas_cumprod = schedule_from_spec(spec)
        self.image_shape = tuple(int(s) for s in spec.image_shape)
        self.max_steps = min(spec.max_steps, len(self.alphas_cumprod))
        self.max_batch_size = max_batch_size
        self._run_denoise = run_denoise
        self.max_rows = max_rows
        self.mean_step_s: float | None = None  # moving mean of a loop step's time, once measured
        self._requests: list[_Request] = []  # admitted and not over, in arrival order
        self._cursor = 0  # round-robin: where the next step starts handing out slots
        self._m_active = DIFFUSION_ACTIVE.labels(model, version)
        self._m_step_batch = DIFFUSION_STEP_BATCH.labels(model, version)
        self._m_compute = COMPUTE_DURATION.labels(model, version, OP)
        self._m_queue_wait = QUEUE_WAIT.labels(model, version, OP)
        self._m_queue_depth = QUEUE_DEPTH.labels(model, version, OP)
        self._m_retries = BATCH_RETRIES.labels(model, version, OP)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let running ones finish for up to `drain_timeout` s, then cancel the rest."""
        stopped = f"sampler for {self.model}/{self.version} stopped"
        await self._shut_down(lambda: SamplerStopped(stopped), drain_timeout=drain_timeout)

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
            if self.failure:
                raise self.unavailable()
            raise SamplerStopped(f"sampler for {self.model}/{self.version} is not running")
        request = self._make_request(num_samples, steps, eta, condition, seed, deadline, x_T)
        if deadline is not None and deadline <= request.arrived:
            raise DeadlineExceeded("deadline passed before sampling started", field="deadline")
        self._check_admission(num_samples, steps, deadline, request.arrived)
        rng = np.random.default_rng(seed)
        if x_T is None:
            request.x[...] = rng.standard_normal(request.x.shape, dtype=np.float32)
        children = rng.spawn(num_samples) if eta > 0 else [None] * num_samples
        request.rows = [_Row(request, i, children[i]) for i in range(num_samples)]
        self._requests.append(request)
        self._publish_gauges()
        self._wake_up()
        late = f"sampling {num_samples} × {steps} steps did not finish within the request deadline"
        (images,) = await self._wait_for_results([request.future], deadline, late)
        return images

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
                        eta=float(eta), deadline=deadline, future=loop.create_future(), arrived=loop.time())

    # ------------------------------------------------------------------------------- admission

    def rows_held(self) -> int:
        """Sample rows waiting or running now."""
        return sum(len(request.rows) for request in self._requests if not request.over)

    def drain_estimate_s(self) -> float:
        """Seconds until the work admitted now is done, at full batches (1 s before a step is measured)."""
        if self.mean_step_s is None:
            return 1.0
        steps_left = sum(request.steps_left() for request in self._requests if not request.over)
        return math.ceil(steps_left / self.max_batch_size) * self.mean_step_s

    def estimated_steps(self, num_samples: int, steps: int) -> int:
        """Loop steps a new request would need at its fair share of the present load (a new request
        comes last, so it gets the smallest share); with more requests than slots one slot every
        ceil(requests / slots) steps."""
        wants = [len(request.rows) for request in self._requests if not request.over] + [num_samples]
        share = fair_shares(wants, self.max_batch_size)[-1]
        if share == 0:
            return steps * num_samples * math.ceil(len(wants) / self.max_batch_size)
        return steps * math.ceil(num_samples / share)

    def _check_admission(self, num_samples: int, steps: int, deadline: float | None, now: float) -> None:
        """429 over `max_rows` or when the deadline cannot be met at this load; 504 when not even alone."""
        labels = (self.model, self.version, OP)
        held = self.rows_held()
        if held and held + num_samples > self.max_rows:
            raise shed(f"the sampler holds {held} sample rows; {num_samples} more do not fit",
                       reason="sampler_full", field="num_samples", limit=self.max_rows,
                       retry_after_s=self.drain_estimate_s(), labels=labels)
        if deadline is None or self.mean_step_s is None:
            return  # no evidence yet: admit; the deadline cut-off bounds the work
        remaining = deadline - now
        alone_s = steps * math.ceil(num_samples / self.max_batch_size) * self.mean_step_s
        shared_s = self.estimated_steps(num_samples, steps) * self.mean_step_s
        if shared_s <= remaining:
            return
        message = (f"{num_samples} samples × {steps} steps need about {max(alone_s, shared_s):.2f} s "
                   f"({alone_s:.2f} s alone); the deadline is {remaining:.2f} s away")
        if alone_s > remaining:
            count_rejection("deadline_unreachable", labels)
            raise DeadlineExceeded(message, field="deadline", limit=round(remaining, 3), code="deadline_unreachable")
        raise shed(message, reason="deadline_unreachable", field="deadline", limit=round(remaining, 3),
                   retry_after_s=self.drain_estimate_s(), labels=labels)

    # ------------------------------------------------------------------------------------ loop

    def _next_batch(self, now: float) -> tuple[list[_Row] | None, float | None]:
        """The rows of the next step, after dropping the requests that are over."""
        self._drop_finished_requests(now)
        rows = self._pick_rows()
        for row in rows:
            if not row.started:
                row.started = True
                self._m_queue_wait.observe(now - row.request.arrived)
        self._publish_gauges()
        return (rows or None), None

    def _drop_finished_requests(self, now: float) -> None:
        """Fail requests whose deadline has passed; forget every request that is over."""
        for request in self._requests:
            settle_if_expired(request.future, request.deadline, now,
                              "sampling did not finish within the request deadline")
        if any(request.over for request in self._requests):
            self._requests = [request for request in self._requests if not request.over]

    def _pick_rows(self) -> list[_Row]:
        """Up to `max_batch_size` rows, fair shares per request handed out round-robin from the cursor,
        returned in arrival order (the most advanced rows of each request first)."""
        count = len(self._requests)
        if not count:
            return []
        start = self._cursor % count
        order = self._requests[start:] + self._requests[:start]
        shares = fair_shares([len(request.rows) for request in order], self.max_batch_size)
        served = sum(1 for share in shares if share)
        self._cursor = start + (served if served < count else 1)  # the unserved (or the next) go first
        share_of = dict(zip(order, shares, strict=True))
        return [row for request in self._requests for row in request.rows[: share_of[request]]]

    def _publish_gauges(self) -> None:
        rows = [row for request in self._requests if not request.over for row in request.rows]
        started = sum(1 for row in rows if row.started)
        self._m_active.set(started)
        self._m_queue_depth.set(len(rows) - started)

    async def _execute(self, batch: list[_Row]) -> None:
        """One denoiser call for every row in `batch`, then one DDIM step per row at its own timestep; if
        the call raises, the requests are re-run in halves until each failure is one request alone."""
        started = time.perf_counter()
        requests = list(dict.fromkeys(row.request for row in batch))

        def step_of(part: list[_Request]) -> Awaitable[None]:
            members = set(part)
            return self._step([row for row in batch if row.request in members])

        failed, retries = await isolate_failures(requests, step_of, lambda request: not request.over)
        if retries:
            self._m_retries.inc(retries)
            log.warning("%s/%s denoise: a step of %d requests failed; %d re-runs left %d failing alone",
                        self.model, self.version, len(requests), retries, len(failed))
        for request, exc in failed:  # the engine failed on this request alone
            log.error("%s/%s denoise: a request of %d rows failed", self.model, self.version,
                      len(request.rows), exc_info=exc)
            error = exc if isinstance(exc, ServiceError) else EngineError(f"denoise failed: {exc}")
            if not request.future.done():
                request.future.set_exception(error)
        if failed:
            self._drop_finished_requests(asyncio.get_running_loop().time())
            return
        elapsed = time.perf_counter() - started  # the whole step: the moving mean for admission
        mean = self.mean_step_s
        self.mean_step_s = elapsed if mean is None else mean + STEP_TIME_SMOOTHING * (elapsed - mean)

    async def _step(self, rows: list[_Row]) -> None:
        """Denoise `rows` in one call and advance each by one DDIM step; raises what the call raised."""
        x = np.stack([r.request.x[r.index] for r in rows])
        t = np.array([r.request.timesteps[r.position] for r in rows], dtype=np.int64)
        cond = np.stack([r.request.condition[r.index] for r in rows])
        started = time.perf_counter()
        eps = np.asarray(await self._in_worker(self._run_denoise, x, t, cond), dtype=np.float32)
        if eps.shape != x.shape:
            raise RuntimeError(f"denoise returned shape {eps.shape}; expected {x.shape}")
        self._m_compute.observe(time.perf_counter() - started)
        self._m_step_batch.observe(len(rows))
        self._advance(rows, self._ddim_step(rows, x, t, eps))

    def _ddim_step(self, rows: list[_Row], x: np.ndarray, t: np.ndarray, eps: np.ndarray) -> np.ndarray:
        """x at each row's next timestep (ᾱ_prev = 1 past the last), with its own η and noise stream."""
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
        return ddim_step(x, eps, alpha_bar, alpha_bar_prev.astype(np.float32), eta, noise,
                         self.spec.clip_denoised)

    def _advance(self, rows: list[_Row], x_prev: np.ndarray) -> None:
        """Store each row's new x; rows past their last step leave, the last one completing its request."""
        stepped: dict[_Request, None] = {}  # requests with a row in this step, in order
        for i, row in enumerate(rows):
            request = row.request
            if request.over:
                continue
            request.x[row.index] = x_prev[i]
            row.position += 1
            stepped[request] = None
        for request in stepped:
            request.rows = [row for row in request.rows if row.position < len(request.timesteps)]
            if not request.rows:
                request.future.set_result(request.x)
        self._publish_gauges()

    def _fail_waiting(self, error: ErrorFactory) -> None:
        fail_unanswered((request.future for request in self._requests), error)
        self._requests = []
        self._publish_gauges()
