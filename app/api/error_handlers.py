"""Exception handlers: every error answer, whatever raised it, is one `ErrorBody` built by `error_response`."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.errors import ServiceError, status_and_reason
from app.metrics import FAILURES
from app.schemas.responses import ErrorBody, ErrorDetail

log = logging.getLogger(__name__)

VALIDATION_LIMIT_KEYS = ("le", "lt", "ge", "gt", "expected", "max_length")


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    field: str | None = None,
    limit: Any = None,
    headers: dict[str, str] | None = None,
    path: str = "",
) -> JSONResponse:
    """The one place an error body `{"error": {"code", "message", "field", "limit"}}` is built; on an Open
    Inference Protocol `path` (/v2/...) the same detail as that protocol's `{"error": "<one line>"}`."""
    body = ErrorBody(error=ErrorDetail(code=code, message=message, field=field, limit=limit)).model_dump()
    if is_v2_path(path):
        body = {"error": v2_message(body["error"])}
    return JSONResponse(body, status_code=status, headers=headers)


def is_v2_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def v2_message(detail: dict[str, Any]) -> str:
    """One line from the service's error detail: code, message, and the field and limit it names."""
    text = f"{detail['code']}: {detail['message']}"
    if detail.get("field") is not None:
        limit = detail.get("limit")
        text += f" (field: {detail['field']}; limit: {limit if isinstance(limit, str) else json.dumps(limit)})"
    return text


def _count_untracked(exc: BaseException, reason: str) -> None:
    """Failures raised before a route knew its model (unknown name, bad query) count without labels."""
    if not getattr(exc, "aeserve_counted", False):
        FAILURES.labels("", "", "", reason).inc()


async def service_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    status, reason = status_and_reason(exc)
    _count_untracked(exc, reason)
    return error_response(
        status, exc.code, exc.message, field=exc.field, limit=exc.limit, headers=exc.headers
    )


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's request validation: the first error, its location as the field, its bound as the limit."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    ctx = first.get("ctx") or {}
    limit = next((ctx[k] for k in VALIDATION_LIMIT_KEYS if k in ctx), None)
    _count_untracked(exc, "invalid_input")
    return error_response(
        422,
        "invalid_request",
        first.get("msg", "invalid request"),
        field=".".join(loc) or None,
        limit=limit if isinstance(limit, (int, float, str, list)) else str(limit) if limit else None,
    )


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Routing errors; and FastAPI's 400 for a body it could not read, which answers for its cause
    when that is one of ours (a 413, 408 or client disconnect raised by `app.api.edge.BodyGuard`)."""
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.__cause__, ServiceError):
        return await service_error_handler(request, exc.__cause__)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    field = "body" if exc.status_code == 400 and exc.__cause__ is not None else None
    return error_response(exc.status_code, code, str(exc.detail), field=field, headers=getattr(exc, "headers", None))


async def unhandled_error_handler(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    _count_untracked(exc, "internal")
    return error_response(500, "internal", f"internal error: {type(exc).__name__}")


def install_error_handlers(app: FastAPI) -> None:
    """Route every exception through the handlers above."""
    app.add_exception_handler(ServiceError, service_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(Exception, unhandled_error_handler)
