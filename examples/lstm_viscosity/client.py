"""The pipeline's access to a running aeserve service, through `aeserve_client`: the model's description
once it is ready, and the latents of whole frame stacks (`encode_sequence`: NPY both ways, 429/503 waited
out after their Retry-After)."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np

from aeserve_client import Client, RetryPolicy


class ServiceClient:
    """The few calls the pipeline needs; up to `retries` answers of 429/503 per request are waited out."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0, retries: int = 30) -> None:
        self.client = Client(url, token=token, timeout_s=timeout_s, retry=RetryPolicy(retries=retries))

    @property
    def http(self) -> httpx.Client:
        """The httpx client the requests go through (a test may swap in one with a mock transport)."""
        return self.client.http

    @http.setter
    def http(self, value: httpx.Client) -> None:
        self.client.http = value

    @property
    def retried(self) -> int:
        """Requests sent again after a 429/503."""
        return self.client.retried

    @property
    def waited_s(self) -> float:
        """Seconds spent waiting out Retry-After."""
        return self.client.waited_s

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, model: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """The model's description once its state is "ready" (the service loads models in the background)."""
        return self.client.wait_ready(model, timeout_s)

    def encode(self, model: str, frames: np.ndarray) -> np.ndarray:
        """Latents (T, D) float32 of a (T, H, W) frame stack: one request per video, which a service
        allowing fewer frames refuses naming its limit, and the client then sends in pieces that fit."""
        return self.client.encode_sequence(model, frames, chunk=len(frames))
