"""System routes: model list and summaries (per served version), liveness, readiness, Prometheus metrics, and
`POST /v1/admin/reload` (`app.reload`).

Non-admins (see `app.api.security`) see model summaries without build-host details."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.deps import RecordDep, RegistryDep, SettingsDep
from app.api.documentation import error_responses
from app.api.security import is_admin, public_view, scrub_paths
from app.errors import Unauthorized
from app.metrics import REGISTRY
from app.runtime.torch_export import SALIENCY_METHOD
from app.schemas.responses import ErrorBody
from app.settings import Settings
from app.store import ModelRecord, ModelRegistry
from app.versions import VERSION_HEADER, find_version

router = APIRouter(tags=["system"])


def providers(record: ModelRecord) -> dict[str, str]:
    return {op: runtime.provider for op, runtime in record.runtimes.items()}


def runtime_config(runtime: Any) -> dict[str, Any]:
    """Format, provider and threads of one runtime (what it says of itself)."""
    describe = getattr(runtime, "describe", None)
    return describe() if describe is not None else {"format": runtime.format, "provider": runtime.provider}


def engine_config(record: ModelRecord, settings: Settings) -> dict[str, Any] | None:
    """How the model is served: engine instances, the batching policy and each op's runtime (None: not loaded)."""
    if record.manifest is None or not record.runtimes:
        return None
    limit = settings.max_batch_size
    engine = record.engine
    ops = {
        name: {
            **runtime_config(runtime),
            "max_batch_size": min(record.op(name).max_batch_size, limit),
            "item_ms": round(record.item_ms[name], 3) if name in record.item_ms else None,  # at warm-up
            "inline_items": engine.inline_items(name) if engine is not None else 0,  # lone batches on the loop
        }
        for name, runtime in record.runtimes.items()
    }
    return {
        "instances": record.plan.instances,  # batches in flight at once; each runtime call uses `threads` cores
        "max_delay_ms": settings.max_delay_ms,
        "idle_start": settings.idle_start,
        "ops": ops,
        "saliency": runtime_config(record.saliency) if record.saliency is not None else None,
    }


def list_item(record: ModelRecord, settings: Settings) -> dict[str, Any]:
    manifest = record.manifest
    return {
        "name": record.name,
        "version": record.version,
        "state": record.state,
        "reason": record.reason,
        "family": manifest.family if manifest else None,
        "capabilities": list(manifest.capabilities) if manifest and record.state != "unavailable" else [],
        "providers": providers(record),
        "engine": engine_config(record, settings),
    }


def summary(record: ModelRecord, settings: Settings) -> dict[str, Any]:
    """Everything a client needs to call the model, plus where it came from and how good it is."""
    settings_max_batch = settings.max_batch_size
    item = list_item(record, settings)
    manifest = record.manifest
    if manifest is None:
        return item
    ops = {}
    for name, op in manifest.ops.items():
        ops[name] = {
            "inputs": [s.model_dump() for s in op.inputs],
            "outputs": [s.model_dump() for s in op.outputs],
            "formats": sorted(op.artifacts),
            "serving_format": record.formats.get(name),
            "provider": record.runtimes[name].provider if name in record.runtimes else None,
            "max_batch_size": min(op.max_batch_size, settings_max_batch),
            "shape_buckets": op.shape_buckets,
        }
    saliency = None
    if manifest.saliency is not None:
        saliency = {
            **manifest.saliency.model_dump(),
            "available": record.saliency is not None,
            "reason": record.saliency_reason,
            "method": SALIENCY_METHOD,
        }
    return {
        **item,
        "description": manifest.description,
        "config": manifest.config,
        "preprocessing": manifest.preprocessing.model_dump(),
        "ops": ops,
        "artifacts": [a.model_dump() for a in manifest.artifacts],
        "saliency": saliency,
        "sampler": manifest.sampler.model_dump() if manifest.sampler else None,
        "training": manifest.training,
        "metrics": manifest.metrics,
        "provenance": manifest.provenance,
        "load_seconds": round(record.load_seconds, 4),
        "limits": {"max_frames": settings.max_frames, "max_upload_bytes": settings.max_upload_bytes,
                   "max_request_memory_bytes": settings.max_request_memory_bytes},
    }


def versions_of(registry: ModelRegistry, name: str) -> list[dict[str, Any]]:
    """The served versions of a model, oldest first: version, state and why it is not ready."""
    return [{"version": r.version, "state": r.state, "reason": r.reason} for r in registry.versions(name)]


def with_versions(item: dict[str, Any], registry: ModelRegistry, name: str) -> dict[str, Any]:
    """A model's item (its default version's) plus its policy and every served version."""
    return {**item, "policy": registry.policies.get(name), "versions": versions_of(registry, name)}


@router.get(
    "/v1/models",
    summary="Every model of the store with its default version's state (ready / unavailable + reason), its"
    " version policy and its served versions",
)
async def list_models(request: Request, registry: RegistryDep, settings: SettingsDep) -> dict[str, Any]:
    models = [with_versions(list_item(r, settings), registry, r.name) for r in registry]
    return {"models": models if is_admin(request) else scrub_paths(models)}


@router.get(
    "/v1/models/{name}",
    responses=error_responses([401, 404]),
    summary="Manifest summary of the default version: capabilities, I/O, preprocessing, artifacts, metrics"
    " (build-host details for admins only), and the served versions",
)
async def describe_model(
    request: Request, response: Response, record: RecordDep, registry: RegistryDep, settings: SettingsDep
) -> dict[str, Any]:
    response.headers[VERSION_HEADER] = record.label_version
    full = with_versions(summary(record, settings), registry, record.name)
    return full if is_admin(request) else public_view(full)


@router.get(
    "/v1/models/{name}/versions", responses=error_responses([401, 404]),
    summary="The served versions of a model, oldest first, and its policy",
)
async def list_versions(record: RecordDep, registry: RegistryDep) -> dict[str, Any]:
    return {
        "name": record.name, "policy": registry.policies.get(record.name), "default_version": record.version,
        "versions": versions_of(registry, record.name),
    }


@router.get(
    "/v1/models/{name}/versions/{version}", responses=error_responses([401, 404]),
    summary="Manifest summary of one served version",
)
async def describe_version(
    request: Request, response: Response, record: RecordDep, version: str, registry: RegistryDep,
    settings: SettingsDep,
) -> dict[str, Any]:
    served = find_version(registry, record, version)
    response.headers[VERSION_HEADER] = served.label_version
    full = summary(served, settings)
    return full if is_admin(request) else public_view(full)


@router.post(
    "/v1/admin/reload",
    summary="Rescan the store and swap model versions without a restart: new versions are verified, loaded and"
    " warmed before they take traffic, old ones drain and are freed; a failed load leaves the old serving."
    " Needs the bearer token when AESERVE_API_TOKEN is set",
    responses={
        401: {"model": ErrorBody, "description": "AESERVE_API_TOKEN is set and the bearer token is missing or wrong"},
    },
)
async def reload_store(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    if settings.api_token and not is_admin(request):  # BearerAuth refuses it first; this keeps it so
        raise Unauthorized("this route needs Authorization: Bearer <token>", field="Authorization")
    return await request.app.state.reloader.reload()


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def not_ready_because(state: Any, registry: ModelRegistry) -> str:
    """Why the service is not ready ('' when it is): draining, loading, no model, a model that broke."""
    drain = getattr(state, "drain", None)
    if drain is not None and drain.draining:
        return "shutting down"
    loading = [r.name for r in registry if r.state == "loading"]
    if loading or not getattr(state, "ready", False):
        return f"loading: {', '.join(loading)}" if loading else "starting"
    if not len(registry):
        return "the model store holds no models"
    broken = [f"{r.name} ({r.fault})" for r in registry if r.fault]
    if broken:
        return "stopped serving: " + ", ".join(broken)
    if not any(r.state == "ready" for r in registry):
        return "no model could be loaded (see /v1/models for each reason)"
    return ""


@router.get(
    "/readyz",
    summary="Readiness: 200 once every model is warm or failed to load (at least one ready); 503 with each"
    " model's state while loading, when no model is ready, when a model's engine died, and while draining",
)
async def readyz(request: Request, registry: RegistryDep) -> Response:
    reason = not_ready_because(request.app.state, registry)
    body = {"ready": not reason, "reason": reason or None, "models": {r.name: r.state for r in registry}}
    return JSONResponse(body, status_code=503 if reason else 200)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition format"}},
)
async def metrics() -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
