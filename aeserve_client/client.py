"""`Client`: the synchronous client (httpx.Client); the requests and answers are `aeserve_client.protocol`'s."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
import numpy as np

from aeserve_client.base import DEFAULT_URL, ClientBase, readiness
from aeserve_client.errors import ServiceError, error_from
from aeserve_client.protocol import (
    LATENT_DTYPES,
    NPY,
    AttentionMap,
    Call,
    ImageLike,
    LatentDtype,
    RetryPolicy,
    attention_call,
    decode_call,
    encode_call,
    image_call,
    model_path,
    parse_array,
    parse_attention,
    parse_latents,
    parse_models,
    sample_call,
)
from aeserve_client.sequence import EncodeLimits, PieceQueue, assemble, first_frame, frame_chunks


class Client(ClientBase):
    """A running aeserve service. 429/503 answers are retried after their `Retry-After` (`retry`); any
    other error answer raises `ServiceError` (`ClientError` 4xx, `Overloaded`, `ServerError`)."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout_s: float = 120.0,
                 retry: RetryPolicy | None = None, transport: httpx.BaseTransport | None = None) -> None:
        super().__init__(url, token=token, timeout_s=timeout_s, retry=retry)
        self.http = httpx.Client(transport=transport, **self.http_options())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, call: Call) -> httpx.Response:
        """Send `call`, again after each 429/503 (or refused connection) while the retry policy allows."""
        for attempt in itertools.count():
            try:
                response = self.http.request(call.method, call.path, **call.send_kwargs())
            except httpx.TransportError as exc:
                wait = self.wait_before_retry(attempt, error=exc)
                if wait is None:
                    raise
            else:
                if response.is_success:
                    return response
                wait = self.wait_before_retry(attempt, response=response)
                if wait is None:
                    raise error_from(response)
            time.sleep(wait)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------- models
    def models(self) -> list[dict[str, Any]]:
        """Every model of the store: name, version, state, capabilities, providers, engine."""
        return parse_models(self.send(Call("GET", "/v1/models")))

    def model(self, model: str) -> dict[str, Any]:
        """The model's description (`GET /v1/models/{model}`): I/O, preprocessing, ops, metrics."""
        info = self.send(Call("GET", model_path(model))).json()
        self._descriptions[model] = info
        return info

    def wait_ready(self, model: str, timeout_s: float = 300.0) -> dict[str, Any]:
        """The model's description once it is ready (the service loads models in the background)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                info = readiness(model, self.http.get(model_path(model)))
            except httpx.TransportError:
                info = None
            if info is not None:
                self._descriptions[model] = info
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model!r} not ready at {self.base_url} after {timeout_s} s")
            time.sleep(0.25)

    # ------------------------------------------------------------------------------------------- ops
    def encode(self, model: str, images: ImageLike, *, dtype: LatentDtype = "float32",
               params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Latents (N, D) of images in one request: an array (H,W) | (N,H,W) | (N,C,H,W), a list of
        arrays, PIL images, file bytes or paths; `params`: the route's query (e.g. intensity="scaled")."""
        return parse_latents(self.send(encode_call(model, images, dtype, params)), dtype)

    def decode(self, model: str, latents: np.ndarray | None = None) -> np.ndarray:
        """Images (N, C, H, W) in the model's output range from latents (N, D); None for a fixed render."""
        return parse_array(self.send(decode_call(model, latents)))

    def reconstruct(self, model: str, images: ImageLike, *, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """Reconstructed images (N, C, H, W) of the uploaded images."""
        return parse_array(self.send(image_call(model, "reconstruct", images, NPY, params)))

    def sample(self, model: str, num_samples: int = 1, *, seed: int | None = None, steps: int | None = None,
               eta: float | None = None, condition: Any = None) -> np.ndarray:
        """Generated images (N, C, H, W): prior samples, a fixed render or DDIM (steps, eta, condition)."""
        return parse_array(self.send(sample_call(model, num_samples, seed, steps, eta, condition)))

    def attention_map(self, model: str, image: ImageLike, *, saliency: bool = True) -> AttentionMap:
        """The attention matrix and (with `saliency`) the input-gradient saliency of the image(s)."""
        return parse_attention(self.send(attention_call(model, image, saliency)))

    # ------------------------------------------------------------------------------------------- sequences
    def encode_limits(self, model: str) -> EncodeLimits:
        """What bounds one encode request of `model` (its description, fetched once per client)."""
        info = self._descriptions.get(model) or self.model(model)
        return EncodeLimits.from_description(info)

    def encode_sequence(self, model: str, frames: np.ndarray | Iterable[np.ndarray], chunk: int | None = None,
                        dtype: LatentDtype = "float32", *, params: Mapping[str, Any] | None = None) -> np.ndarray:
        """T x D latents of a frame sequence of any length (an array (T, H, W) | (T, C, H, W) or an iterable
        of frames, read lazily), sent in chunks of `chunk` frames (None: planned from the model's limits),
        in order; a chunk the service refuses as too large is split to the limit it names."""
        head, frames = first_frame(frames)
        if head is None:
            return assemble([], LATENT_DTYPES[dtype])
        size = self.first_chunk(model, chunk, lambda: self.encode_limits(model).chunk_for(head))
        started, parts = size[0], list[np.ndarray]()
        for piece in frame_chunks(frames, size):
            queue = PieceQueue(piece, size)
            while (current := queue.next()) is not None:
                try:
                    queue.done(parse_latents(self.send(encode_call(model, current, dtype, params)), dtype,
                                             len(current)))
                except ServiceError as error:
                    queue.refused(error)
            parts.extend(queue.parts)
        self.learn_chunk(model, size, started)
        return assemble(parts, LATENT_DTYPES[dtype])
