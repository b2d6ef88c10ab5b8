"""Every Prometheus metric of the service, declared once (one prefix, bounded labels).

Labels: model, version, op, status, reason only. `op` is a manifest op name (engine queues; the
diffusion sampler uses `denoise`), the engine's `saliency` queue, a route's capability, or empty;
`reason` comes from `app.errors` (a closed set), never from free text; the `reason` of
`aeserve_rejections_total` from `app.admission.REJECTION_REASONS` (also closed). For the diffusion
sampler an "item" of the queue metrics is one sample row and a "batch" one denoiser step; its `op`
is `denoise`, an engine's scheduler crashes carry an empty `op`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

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
