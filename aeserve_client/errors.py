"""The exceptions of the client: every answer of the service that is not a success becomes one of these."""

from __future__ import annotations

import json
from email.utils import parsedate_to_datetime
from time import time
from typing import Any

import httpx


class ServiceError(Exception):
    """An error answer of the service: its HTTP status and the fields of its `{"error": {...}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str = "error",
        field: str | None = None,
        limit: Any = None,
        retry_after_s: float | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        super().__init__(f"HTTP {status} {code}: {message}" + (f" (field {field}, limit {limit})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.limit = limit
        self.retry_after_s = retry_after_s
        self.method = method
        self.url = url


class ClientError(ServiceError):
    """A 4xx answer: the request was wrong (bad input, a limit passed, unknown model or capability)."""


class Overloaded(ServiceError):
    """A 429 or 503 still answered after the client's retries ran out."""


class ServerError(ServiceError):
    """A 5xx answer other than 503 (e.g. 504: the request's deadline passed)."""


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header: delta seconds or an HTTP date (None: absent or bad)."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(text).timestamp() - time())
    except (TypeError, ValueError, IndexError):
        return None


def error_from(response: httpx.Response) -> ServiceError:
    """The typed exception of an error answer; a body that is not the service's error JSON keeps its text."""
    try:
        payload = json.loads(response.content)
    except ValueError:
        payload = None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        error = {"message": response.text[:500] or response.reason_phrase}
    status = response.status_code
    kind = Overloaded if status in (429, 503) else ClientError if status < 500 else ServerError
    return kind(
        status,
        str(error.get("message", "")),
        code=str(error.get("code") or "error"),
        field=error.get("field"),
        limit=error.get("limit"),
        retry_after_s=parse_retry_after(response.headers.get("retry-after")),
        **request_of(response),
    )


def request_of(response: httpx.Response) -> dict[str, str]:
    """The method and URL of the request that got `response` (empty for a response built by hand)."""
    try:
        request = response.request
    except RuntimeError:
        return {"method": "", "url": ""}
    return {"method": request.method, "url": str(request.url)}
