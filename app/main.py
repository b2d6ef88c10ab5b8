"""The FastAPI application: `uvicorn app.main:create_app --factory`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api import attention, codec, sample, system
from app.errors import ServiceError, status_and_reason
from app.lifespan import lifespan
from app.metrics import FAILURES
from app.settings import Settings
from app.store import ModelRegistry

log = logging.getLogger(__name__)


def _count_untracked(exc: BaseException, reason: str) -> None:
    """Failures raised before a route knew its model (unknown name, bad query) count without labels."""
    if not getattr(exc, "aeserve_counted", False):
        FAILURES.labels("", "", "", reason).inc()


def _error(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    limit: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "field": field, "limit": limit}}
    return JSONResponse(body, status_code=status, headers=headers)


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status, reason = status_and_reason(exc)
    _count_untracked(exc, reason)
    return JSONResponse(exc.to_body(), status_code=status, headers=exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    ctx = first.get("ctx") or {}
    limit = next((ctx[k] for k in ("le", "lt", "ge", "gt", "expected", "max_length") if k in ctx), None)
    _count_untracked(exc, "invalid_input")
    return _error(
        422,
        "invalid_request",
        first.get("msg", "invalid request"),
        ".".join(loc) or None,
        limit if isinstance(limit, (int, float, str, list)) else str(limit) if limit else None,
    )


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return _error(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    _count_untracked(exc, "internal")
    return _error(500, "internal", f"internal error: {type(exc).__name__}")


def configure_logging(level: str) -> None:
    """Give the `app` loggers a handler of their own (uvicorn configures only its own loggers)."""
    logger = logging.getLogger("app")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; `settings` default to the AESERVE_* environment."""
    settings = settings or Settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="aeserve",
        summary="Image autoencoders, decoders and diffusion samplers behind one batched HTTP API.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.models = ModelRegistry()
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
    app.include_router(system.router)
    app.include_router(codec.router)
    app.include_router(attention.router)
    app.include_router(sample.router)
    return app
