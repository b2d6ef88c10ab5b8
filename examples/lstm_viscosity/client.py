"""Plain-HTTP access to a running aeserve service (httpx): model description, and encode of whole frame
stacks as NPY, honouring 429/503 Retry-After."""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np

NPY = "application/x-npy"
RETRY_STATUSES = (429, 503)


class ServiceClient:
    """The few calls the pipeline needs; `retries` answers of 429/503 are waited out (Retry-After)."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = 120.0, retries: int = 30) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)
        self.retries = retries
        self.waited_s = 0.0  # total time spent waiting out Retry-After
        self.retried = 0

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        for _ in range(self.retries + 1):
            response = self.http.request(method, path, **kwargs)
            if response.status_code not in RETRY_STATUSES:
                break
            wait = float(response.headers.get("Retry-After", "1"))
            self.retried += 1
            self.waited_s += wait
            time.sleep(wait)
        if response.is_error:
            raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: {response.text[:500]}")
        return response

    def wait_ready(self, model: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """The model's description once its state is "ready" (the service loads models in the background)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                response = self.http.get(f"/v1/models/{model}")
            except httpx.TransportError as exc:  # not listening yet
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no service at {self.http.base_url} after {timeout_s} s: {exc}") from exc
                time.sleep(0.5)
                continue
            if response.status_code == 404:
                raise RuntimeError(f"the service at {self.http.base_url} has no model {model!r}")
            info = response.json() if response.status_code == 200 else {}
            if info.get("state") == "ready":
                return info
            if info.get("state") == "unavailable":
                raise RuntimeError(f"model {model!r} is unavailable: {info.get('reason')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model!r} not ready after {timeout_s} s: {info or response.text}")
            time.sleep(0.5)

    def encode(self, model: str, frames: np.ndarray) -> np.ndarray:
        """Latents (T, D) float32 of a (T, H, W) frame stack, in one request."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(frames, dtype=np.float32))
        response = self._send(
            "POST",
            f"/v1/models/{model}/encode",
            content=buffer.getvalue(),
            headers={"Content-Type": NPY, "Accept": NPY},
        )
        latents = np.load(io.BytesIO(response.content), allow_pickle=False)
        if latents.ndim != 2 or latents.shape[0] != len(frames):
            raise RuntimeError(f"encode answered shape {latents.shape} for {len(frames)} frames")
        return latents.astype(np.float32)
