"""Every Prometheus metric of the service, declared once (one prefix, bounded labels).

Labels: model, version, op, status, reason only. `op` is a manifest op name (engine queues; the
diffusion sampler uses `denoise`), the engine's `saliency` queue, a route's capability, or empty;
`reason` comes from `app.errors` (a closed set), never from free text; the `reason` of
`aeserve_rejections_total` from `app.admission.REJECTION_REASONS` (also closed). For the diffusion
sampler an "item" of the queue metrics is one sample row and a "batch" one denoiser step; its `op`
is `denoise`, an engine's scheduler crashes carry an empty `op`.

Also bounded: `route` of `aeserve_route_op_info` (a capability), `format` of the codec timings (png, tiff,
npy, json), `provider` of `aeserve_model_execution_provider` (`EXECUTION_PROVIDERS` or "other") and `gpu`
(an NVML device index).
The codec timings and the per-request items carry the route's labels through `request_metrics` (a context
variable set by `app.api.deps.track`); outside a request they carry empty labels. The process collectors
(`process_*`, `python_*`) and, where NVML starts, the GPU collector are registered on `REGISTRY` here.
"""

from __future__ import annotations

import functools
import importlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, ParamSpec, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_CODEC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "aeserve_requests", "HTTP requests to model endpoints.",
    ["model", "version", "op", "status"], registry=REGISTRY,
)
REQUEST_DURATION = Histogram(
    "aeserve_request_duration_seconds", "Wall time of a model request, decode to encode.",
    ["model", "version", "op"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "aeserve_queue_wait_seconds", "Time an item waited in the batcher queue before its batch ran.",
    ["model", "version", "op"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
COMPUTE_DURATION = Histogram(
    "aeserve_compute_duration_seconds", "Engine time of one batch.",
    ["model", "version", "op"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
BATCH_SIZE = Histogram(
    "aeserve_batch_size", "Items per executed batch.",
    ["model", "version", "op"], buckets=_BATCH_BUCKETS, registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "aeserve_queue_depth", "Items waiting in the batcher queue.",
    ["model", "version", "op"], registry=REGISTRY,
)
FAILURES = Counter(
    "aeserve_failures", "Failed requests by reason (closed set from app.errors).",
    ["model", "version", "op", "reason"], registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Gauge(
    "aeserve_model_load_seconds", "Time to verify, load and warm up a model version.",
    ["model", "version"], registry=REGISTRY,
)
MODEL_READY = Gauge(
    "aeserve_model_ready", "1 when the model version is loaded and warm.",
    ["model", "version"], registry=REGISTRY,
)
DIFFUSION_ACTIVE = Gauge(
    "aeserve_diffusion_active_samples", "Samples currently inside a running diffusion loop.",
    ["model", "version"], registry=REGISTRY,
)
DIFFUSION_STEP_BATCH = Histogram(
    "aeserve_diffusion_step_batch_size", "Samples denoised together in one sampler step.",
    ["model", "version"], buckets=_BATCH_BUCKETS, registry=REGISTRY,
)
REJECTIONS = Counter(
    "aeserve_rejections", "Work shed before it ran, by reason (closed set: app.admission.REJECTION_REASONS).",
    ["model", "version", "op", "reason"], registry=REGISTRY,
)
INFLIGHT_REQUESTS = Gauge(
    "aeserve_inflight_requests", "Requests holding an admission slot (app.admission.Admission).",
    registry=REGISTRY,
)
INFLIGHT_MEMORY = Gauge(
    "aeserve_inflight_memory_bytes", "Bytes held in the pool of the requests in flight, inputs and answers"
    " (app.budget.InputPool, max_inflight_memory_bytes).",
    registry=REGISTRY,
)
QUEUED_ITEMS_ALL = Gauge(
    "aeserve_queued_items_all", "Items waiting in every engine queue together (the shared budget).",
    registry=REGISTRY,
)
BATCH_RETRIES = Counter(
    "aeserve_batch_retries", "Re-runs of parts of a failed batch to find the requests that fail alone.",
    ["model", "version", "op"], registry=REGISTRY,
)
SCHEDULER_CRASHES = Counter(
    "aeserve_scheduler_crashes", "Exceptions that escaped an engine's or sampler's scheduler loop.",
    ["model", "version", "op"], registry=REGISTRY,
)
REQUESTS_IN_PROGRESS = Gauge(
    "aeserve_requests_in_progress", "Model requests being served now (admission to answer), by route.",
    ["model", "version", "op"], registry=REGISTRY,
)
REQUEST_ITEMS = Histogram(
    "aeserve_request_items", "Items of one successful model request: frames or latent rows decoded from it,"
    " else the frames or rows encoded into its answer (samples).",
    ["model", "version", "op"], buckets=_BATCH_BUCKETS, registry=REGISTRY,
)
CODEC_DECODE = Histogram(
    "aeserve_codec_decode_seconds", "Time decoding one upload (image frames or latents) from its format.",
    ["model", "version", "op", "format"], buckets=_CODEC_BUCKETS, registry=REGISTRY,
)
CODEC_ENCODE = Histogram(
    "aeserve_codec_encode_seconds", "Time encoding one answer (PNG grid, NPY, latents JSON).",
    ["model", "version", "op", "format"], buckets=_CODEC_BUCKETS, registry=REGISTRY,
)

CODEC_FORMATS: tuple[str, ...] = ("png", "tiff", "npy", "json")

# The engine queues (manifest ops; `saliency`; the sampler's `denoise`) each route submits to: request
# metrics carry the route as `op` (a v1 capability, or a v2 model's op, `infer` while a plain v2 name's op is
# unknown), engine metrics the queue. Dashboards join on it to select both.
_MANIFEST_OPS = ("encode", "decode", "reconstruct", "attention_matrix", "denoise")
ROUTE_ENGINE_OPS: dict[str, tuple[str, ...]] = {
    **{op: (op,) for op in _MANIFEST_OPS},
    "attention-map": ("attention_matrix", "saliency"),
    "sample": ("decode", "denoise"),  # prior and fixed-render samplers decode; DDIM denoises
    "infer": _MANIFEST_OPS,
}
ROUTE_OP_INFO = Gauge(
    "aeserve_route_op_info", "1 for each engine op (queue) a route (`route`, the request metrics' op) submits"
    " to: `... and on (op) aeserve_route_op_info{route=~\"$op\"}` selects a route's engine series.",
    ["route", "op"], registry=REGISTRY,
)
for _route, _ops in ROUTE_ENGINE_OPS.items():
    for _op in _ops:
        ROUTE_OP_INFO.labels(_route, _op).set(1)


# ------------------------------------------------------------------------------ per-request context
@dataclass
class RequestMetrics:
    """What one request's codec calls report (`items_in`, `items_out`) under its labels."""

    model: str
    version: str
    op: str
    items_in: int = 0
    items_out: int = 0

    @property
    def labels(self) -> tuple[str, str, str]:
        return self.model, self.version, self.op

    @property
    def items(self) -> int:
        """Frames or rows decoded from the request, else those encoded into its answer (0: unknown)."""
        return self.items_in or self.items_out

    def observe_items(self) -> None:
        if self.items > 0:
            REQUEST_ITEMS.labels(*self.labels).observe(self.items)


_CURRENT: ContextVar[RequestMetrics | None] = ContextVar("aeserve_request_metrics", default=None)


@contextmanager
def request_metrics(model: str, version: str, op: str) -> Iterator[RequestMetrics]:
    """The request's metric context for its codec calls (threads started with anyio copy it), counted in
    `aeserve_requests_in_progress` while open."""
    context = RequestMetrics(model, version, op)
    token = _CURRENT.set(context)
    try:
        with REQUESTS_IN_PROGRESS.labels(model, version, op).track_inprogress():
            yield context
    finally:
        _CURRENT.reset(token)


def current_request() -> RequestMetrics | None:
    return _CURRENT.get()


@functools.lru_cache(maxsize=4096)
def _codec_histogram(direction: str, model: str, version: str, op: str, fmt: str) -> Histogram:
    """The labelled child (cached: `labels()` costs more than the observation)."""
    label = fmt if fmt in CODEC_FORMATS else "other"
    return (CODEC_DECODE if direction == "decode" else CODEC_ENCODE).labels(model, version, op, label)


def observe_codec(direction: Literal["decode", "encode"], fmt: str, seconds: float, items: int) -> None:
    """Time one codec call under the current request's labels; add its items to the request's count."""
    context = _CURRENT.get()
    labels = context.labels if context is not None else ("", "", "")
    _codec_histogram(direction, *labels, fmt).observe(seconds)
    if context is not None:
        if direction == "decode":
            context.items_in += items
        else:
            context.items_out += items


P = ParamSpec("P")
R = TypeVar("R")


def _rows(value: Any) -> int:
    shape = getattr(value, "shape", ())
    return int(shape[0]) if shape else 1


def timed_codec(
    direction: Literal["decode", "encode"], fmt: str
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a codec function: its time (successful calls) goes to `aeserve_codec_<direction>_seconds`,
    the rows of its result (decode) or of its first argument (encode) to the request's items."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def timed(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            result = function(*args, **kwargs)
            counted = result if direction == "decode" else (args[0] if args else None)
            observe_codec(direction, fmt, time.perf_counter() - started, _rows(counted))
            return result

        return timed

    return decorate


def timed_frames(frames: Iterator[R], fmt: str) -> Iterator[R]:
    """`frames` as they come, the time spent producing them observed once (when exhausted or closed)."""
    elapsed, count = 0.0, 0
    try:
        while True:
            started = time.perf_counter()
            try:
                frame = next(frames)
            except StopIteration:
                return
            finally:
                elapsed += time.perf_counter() - started
            count += 1
            yield frame
    finally:
        observe_codec("decode", fmt, elapsed, count)


# ------------------------------------------------------------------------------ execution providers
EXECUTION_PROVIDERS = (
    "CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider", "MIGraphXExecutionProvider",
    "DmlExecutionProvider", "CoreMLExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider",
    "torch:cpu", "torch:cuda", "aoti:cpu", "aoti:cuda",
)


def provider_label(provider: str) -> str:
    """A runtime's provider as a bounded label: a known ONNX Runtime provider, `torch:<device type>`,
    `aoti:<device type>` (device index dropped), else "other"."""
    kind, _, device = provider.partition(":")
    name = f"{kind}:{device.split(':')[0]}" if device else provider
    return name if name in EXECUTION_PROVIDERS else "other"


class ExecutionProviderCollector(Collector):
    """`aeserve_model_execution_provider{model,version,provider}` = 1 for each provider a live runtime of
    the model version runs on (read at scrape time; a runtime that is gone is no longer shown)."""

    def __init__(self) -> None:
        self._runtimes: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def add(self, runtime: Any, model: str, version: str) -> None:
        """Show `runtime.provider` (read at each scrape) for (model, version) while `runtime` lives."""
        with self._lock:
            self._runtimes[runtime] = (model, version)

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily("aeserve_model_execution_provider", "", labels=["model", "version", "provider"])]

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            "aeserve_model_execution_provider",
            "1 for each execution provider a loaded runtime of the model version runs on (CPU where a GPU"
            " was expected: a silent fallback).",
            labels=["model", "version", "provider"],
        )
        with self._lock:
            runtimes = list(self._runtimes.items())
        for labels in sorted({(m, v, provider_label(str(r.provider))) for r, (m, v) in runtimes}):
            family.add_metric(list(labels), 1)
        yield family


EXECUTION_PROVIDER = ExecutionProviderCollector()
REGISTRY.register(EXECUTION_PROVIDER)


def track_execution_provider(runtime: Any, model: str, version: str) -> None:
    """Show the provider of `runtime` (anything with a `provider` attribute) for the model version."""
    EXECUTION_PROVIDER.add(runtime, model, version)


# ------------------------------------------------------------------------------ GPUs (NVML)
class GpuCollector(Collector):
    """Utilisation and memory of every GPU from NVML (`pynvml`, package nvidia-ml-py); yields nothing when
    NVML cannot start (no driver, no GPU), so the GPU metrics are absent rather than zero."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        self._nvml = nvml
        self._started: bool | None = None  # None: not tried yet
        self._lock = threading.Lock()

    def _start(self) -> ModuleType | None:
        with self._lock:
            if self._started is None:
                try:
                    self._nvml = self._nvml or importlib.import_module("pynvml")
                    self._nvml.nvmlInit()
                    self._started = True
                except Exception as exc:  # ImportError, NVMLError_LibraryNotFound, _DriverNotLoaded, ...
                    log.info("no GPU metrics: NVML did not start (%s)", exc)
                    self._started = False
        return self._nvml if self._started else None

    def describe(self) -> Iterable[Metric]:
        return []  # registration must not start NVML

    def collect(self) -> Iterable[Metric]:
        nvml = self._start()
        if nvml is None:
            return
        utilisation = GaugeMetricFamily(
            "aeserve_gpu_utilization_ratio", "Fraction of the last sample period a kernel ran on the GPU (NVML).",
            labels=["gpu"],
        )
        used = GaugeMetricFamily("aeserve_gpu_memory_used_bytes", "GPU memory in use, all processes (NVML).",
                                 labels=["gpu"])
        total = GaugeMetricFamily("aeserve_gpu_memory_total_bytes", "GPU memory installed (NVML).", labels=["gpu"])
        try:
            count = nvml.nvmlDeviceGetCount()
        except Exception as exc:
            log.warning("NVML device count failed: %s", exc)
            return
        for index in range(count):
            gpu = [str(index)]
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                used.add_metric(gpu, float(memory.used))
                total.add_metric(gpu, float(memory.total))
                utilisation.add_metric(gpu, nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
            except Exception as exc:  # e.g. NVMLError_NotSupported for one device (MIG)
                log.debug("NVML reading of GPU %d failed: %s", index, exc)
        yield from (family for family in (utilisation, used, total) if family.samples)


GPU_COLLECTOR = GpuCollector()
REGISTRY.register(GPU_COLLECTOR)

# the default process metrics (process_*, python_info, python_gc_*) on the service's own registry
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)
