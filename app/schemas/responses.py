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
