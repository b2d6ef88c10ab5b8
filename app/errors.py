"""Domain errors of the service and the ONE table mapping them to HTTP status and a failure reason.

Routes and helpers raise these; `app.api.error_handlers` renders every one of them (and FastAPI's own
validation and routing errors) as `{"error": {"code", "message", "field", "limit"}}`. The `reason` label
of `aeserve_failures_total` comes only from `STATUS_TABLE`, a closed set.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: a message for the client, the offending field and the limit it broke."""

    code = "error"

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        limit: Any = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidInput(ServiceError):
    """The request is well-formed HTTP but its content is wrong (bad image, wrong shape, NaN...)."""

    code = "invalid_input"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class NotAcceptable(ServiceError):
    code = "not_acceptable"


class ModelNotFound(ServiceError):
    code = "model_not_found"


class CapabilityNotOffered(ServiceError):
    code = "capability_not_offered"


class ModelUnavailable(ServiceError):
    """The model exists in the store but failed verification/loading, or is not warm yet."""

    code = "model_unavailable"


class QueueFull(ServiceError):
    code = "queue_full"


class DeadlineExceeded(ServiceError):
    code = "deadline_exceeded"


class FeatureUnavailable(ServiceError):
    """An optional part of the service is not installed here (e.g. torch for saliency)."""

    code = "feature_unavailable"


class EngineError(ServiceError):
    """The runtime failed on valid input: a server fault, never the client's."""

    code = "engine_error"


class ShuttingDown(ServiceError):
    code = "shutting_down"


class RequestTimeout(ServiceError):
    """The client did not send its body in time: a stall past the read timeout, or a slow drip past the
    request timeout."""

    code = "request_timeout"


class ClientDisconnected(ServiceError):
    """The client went away before its answer was ready; its work was cancelled (nobody reads the 499)."""

    code = "client_disconnected"


class Unauthorized(ServiceError):
    """No valid bearer token on a protected route."""

    code = "unauthorized"


class Forbidden(ServiceError):
    """An admin route while the service has no token configured (admin routes are then off)."""

    code = "forbidden"


# The one table: exception class -> (HTTP status, failure reason label).
STATUS_TABLE: dict[type[ServiceError], tuple[int, str]] = {
    InvalidInput: (422, "invalid_input"),
    PayloadTooLarge: (413, "payload_too_large"),
    UnsupportedMediaType: (415, "unsupported_media_type"),
    NotAcceptable: (406, "not_acceptable"),
    ModelNotFound: (404, "model_not_found"),
    CapabilityNotOffered: (404, "capability_not_offered"),
    ModelUnavailable: (503, "model_unavailable"),
    QueueFull: (429, "queue_full"),
    DeadlineExceeded: (504, "deadline_exceeded"),
    FeatureUnavailable: (501, "feature_unavailable"),
    ShuttingDown: (503, "shutting_down"),
    RequestTimeout: (408, "request_timeout"),
    ClientDisconnected: (499, "client_disconnected"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    EngineError: (500, "engine_error"),
    ServiceError: (500, "internal"),
}


def status_and_reason(exc: BaseException) -> tuple[int, str]:
    """HTTP status and failure reason of any exception (unknown ones are 500 / internal)."""
    for cls in type(exc).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return 500, "internal"
