"""What `Client` and `AsyncClient` share besides the protocol: settings, counters and the retry decision."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from aeserve_client.errors import ClientError, ServiceError, parse_retry_after
from aeserve_client.protocol import RETRY_STATUSES, RetryPolicy

DEFAULT_URL = "http://127.0.0.1:8000"


class ClientBase:
    """The service's URL, the bearer token, the retry policy, and what the retries cost so far."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout_s: float = 120.0,
                 retry: RetryPolicy | None = None) -> None:
        self.base_url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self.retried = 0  # requests sent again after a 429/503 or a refused connection
        self.waited_s = 0.0  # seconds spent waiting before those
        self._descriptions: dict[str, dict[str, Any]] = {}
        self._learned_chunks: dict[str, int] = {}  # per model: the chunk a refusal taught `encode_sequence`

    def http_options(self) -> dict[str, Any]:
        """Keyword arguments of the httpx client both transports make."""
        return {"base_url": self.base_url, "headers": self.headers, "timeout": self.timeout_s}

    def first_chunk(self, model: str, chunk: int | None, planned: Callable[[], int]) -> list[int]:
        """The chunk size `encode_sequence` starts with (a one-item list its pieces may lower): `chunk`,
        else the plan, never more than a refusal of this model taught before."""
        size = chunk or planned()
        return [min(size, self._learned_chunks.get(model, size))]

    def learn_chunk(self, model: str, size: list[int], started: int) -> None:
        """Remember a chunk size that refusals lowered, for the next sequences of `model`."""
        if size[0] < started:
            self._learned_chunks[model] = min(size[0], self._learned_chunks.get(model, size[0]))

    def wait_before_retry(self, attempt: int, response: httpx.Response | None = None,
                          error: Exception | None = None) -> float | None:
        """Seconds to wait before sending again (counted), or None: do not retry (retries spent, or an
        answer or error that a retry would not change)."""
        if attempt >= self.retry.retries:
            return None
        if error is not None:
            if not isinstance(error, httpx.ConnectError):  # the request may have been sent: not retried
                return None
            wait = self.retry.delay_s(attempt, None)
        elif response is not None and response.status_code in RETRY_STATUSES:
            wait = self.retry.delay_s(attempt, parse_retry_after(response.headers.get("retry-after")))
        else:
            return None
        self.retried += 1
        self.waited_s += wait
        return wait


def readiness(model: str, response: httpx.Response) -> dict[str, Any] | None:
    """The model's description once it is ready, None while it loads (or the service starts); raises for
    an unknown model and for one that failed to load."""
    if response.status_code == 404:
        raise ClientError(404, f"the service has no model {model!r}", code="model_not_found", field="name")
    info = response.json() if response.status_code == 200 else {}
    if info.get("state") == "ready":
        return info
    if info.get("state") == "unavailable":
        raise ServiceError(503, f"model {model!r} is unavailable: {info.get('reason')}", code="model_unavailable")
    return None
