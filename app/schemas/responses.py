"""Response bodies shared by the routes (documented in the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    limit: Any = None


# The docstring below is the schema's OpenAPI description; `app.api.error_handlers.error_response`
# builds every error answer from these two models, so the documented shape is the one sent.
class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of the service: `{"error": {"code", "message", "field", "limit"}}`."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in {
        404: "unknown model, or capability not offered",
        406: "no acceptable response format",
        413: "upload too large",
        415: "unsupported content type",
        422: "invalid input: names the field and the limit",
        429: "queue full (see Retry-After)",
        501: "optional feature not installed (saliency without torch)",
        503: "model unavailable / not ready / shutting down",
        504: "request deadline exceeded",
    }.items()
}
