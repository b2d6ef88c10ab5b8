"""`Annotated` dependencies: settings, the model registry and one model record, from `app.state`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Annotated, get_args

from fastapi import Depends, Request

from app.admission import DEADLINE_HEADER, TIMEOUT_HEADER, Admission, request_deadline
from app.api.edge import arrival_of
from app.errors import CapabilityNotOffered, ModelNotFound, ModelUnavailable, status_and_reason
from app.metrics import FAILURES, REQUEST_DURATION, REQUESTS, RequestMetrics, request_metrics
from app.schemas.manifest import Capability
from app.settings import Settings
from app.store import ModelRecord, ModelRegistry


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.models


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]


def get_record(name: str, registry: RegistryDep) -> ModelRecord:
    """Any model of the store by name (ready or not); 404 for names the store does not hold."""
    record = registry.get(name)
    if record is None:
        raise ModelNotFound(f"no model named {name!r}", field="name", limit=sorted(r.name for r in registry))
    return record


RecordDep = Annotated[ModelRecord, Depends(get_record)]


ROUTE_OPS = frozenset(get_args(Capability))  # the `op` label of a route's metrics: its last path segment


def get_ready_record(record: RecordDep, request: Request) -> ModelRecord:
    """A model that can serve now; 503 (with the reason) for unavailable or still-loading models."""
    error = None
    if record.state == "unavailable":
        error = ModelUnavailable(f"model {record.name!r} is unavailable: {record.reason}", field="name")
    elif record.state != "ready" or record.engine is None:
        error = ModelUnavailable(
            f"model {record.name!r} is not ready yet", field="name", code="model_not_ready"
        )
    if error is None:
        return record
    op = request.url.path.rsplit("/", 1)[-1]
    labels = (record.name, record.label_version, op if op in ROUTE_OPS else "")
    FAILURES.labels(*labels, "model_unavailable").inc()
    REQUESTS.labels(*labels, "503").inc()
    error.aeserve_counted = True  # type: ignore[attr-defined]
    raise error


ReadyRecordDep = Annotated[ModelRecord, Depends(get_ready_record)]


def require_capability(record: ModelRecord, capability: str) -> None:
    """404 naming what the model offers when its manifest does not list `capability`."""
    assert record.manifest is not None
    if capability not in record.manifest.capabilities:
        raise CapabilityNotOffered(
            f"model {record.name!r} does not offer {capability!r}",
            field="capability",
            limit=list(record.manifest.capabilities),
        )


def request_deadline_of(request: Request, settings: Settings) -> float:
    """Absolute deadline on the event loop's clock (the engine's and sampler's): `request_timeout_s` from
    the request's arrival, or less when the client asks (`X-Request-Timeout-S` / `X-Request-Deadline`)."""
    arrival = arrival_of(request)
    return request_deadline(
        arrival.loop_time,
        settings.request_timeout_s,
        timeout=request.headers.get(TIMEOUT_HEADER),
        deadline_epoch=request.headers.get(DEADLINE_HEADER),
        wall_now=arrival.wall_time,
    )


def admission_slot(request: Request, record: ModelRecord, op: str) -> AbstractAsyncContextManager[object]:
    """An in-flight slot (429 at once when the service is full), taken before the body is read."""
    admission: Admission | None = getattr(request.app.state, "admission", None)
    if admission is None:  # an app whose lifespan has not run
        return nullcontext()
    return admission.try_acquire(model=record.name, version=record.label_version, op=op)


@asynccontextmanager
async def track(record: ModelRecord, op: str) -> AsyncIterator[RequestMetrics]:
    """Count the request by status, time it, and count failures by their bounded reason; while it runs it
    is in `aeserve_requests_in_progress`, and its codec calls report their time and items under its labels
    (a successful request's items go to `aeserve_request_items`)."""
    labels = (record.name, record.label_version, op)
    started = time.perf_counter()
    status = 200
    with request_metrics(*labels) as context:
        try:
            yield context
        except asyncio.CancelledError:
            status = 499
            FAILURES.labels(*labels, "client_disconnected").inc()
            raise
        except Exception as exc:
            status, reason = status_and_reason(exc)
            FAILURES.labels(*labels, reason).inc()
            exc.aeserve_counted = True  # type: ignore[attr-defined]
            raise
        finally:
            REQUESTS.labels(*labels, str(status)).inc()
            REQUEST_DURATION.labels(*labels).observe(time.perf_counter() - started)
            if status == 200:
                context.observe_items()
