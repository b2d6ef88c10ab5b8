"""`AsyncClient`: the asyncio client (httpx.AsyncClient); the same calls and answers as `Client`, and an
`encode_sequence` that keeps a few chunks in flight so the service's batcher stays busy."""

from __future__ import annotations

import asyncio
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


class AsyncClient(ClientBase):
    """`Client` for asyncio: `await client.encode(...)`; use it as `async with AsyncClient(url) as client`."""

    def __init__(self, url: str = DEFAULT_URL, *, token: str | None = None, timeout_s: float = 120.0,
                 retry: RetryPolicy | None = None, transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(url, token=token, timeout_s=timeout_s, retry=retry)
        self.http = httpx.AsyncClient(transport=transport, **self.http_options())

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, call: Call) -> httpx.Response:
        """Send `call`, again after each 429/503 (or refused connection) while the retry policy allows."""
        for attempt in itertools.count():
            try:
                response = await self.http.request(call.method, call.path, **call.send_kwargs())
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
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------------------------------- models
    async def models(self) -> list[dict[str, Any]]:
        return parse_models(await self.send(Call("GET", "/v1/models")))

    async def model(self, model: str) -> dict[str, Any]:
        info = (await self.send(Call("GET", model_path(model)))).json()
        self._descriptions[model] = info
        return info

    async def wait_ready(self, model: str, timeout_s: float = 300.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                info = readiness(model, await self.http.get(model_path(model)))
            except httpx.TransportError:
                info = None
            if info is not None:
                self._descriptions[model] = info
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"model {model!r} not ready at {self.base_url} after {timeout_s} s")
            await asyncio.sleep(0.25)

    # ------------------------------------------------------------------------------------------- ops
    async def encode(self, model: str, images: ImageLike, *, dtype: LatentDtype = "float32",
                     params: Mapping[str, Any] | None = None) -> np.ndarray:
        return parse_latents(await self.send(encode_call(model, images, dtype, params)), dtype)

    async def decode(self, model: str, latents: np.ndarray | None = None) -> np.ndarray:
        return parse_array(await self.send(decode_call(model, latents)))

    async def reconstruct(self, model: str, images: ImageLike, *,
                          params: Mapping[str, Any] | None = None) -> np.ndarray:
        return parse_array(await self.send(image_call(model, "reconstruct", images, NPY, params)))

    async def sample(self, model: str, num_samples: int = 1, *, seed: int | None = None, steps: int | None = None,
                     eta: float | None = None, condition: Any = None) -> np.ndarray:
        return parse_array(await self.send(sample_call(model, num_samples, seed, steps, eta, condition)))

    async def attention_map(self, model: str, image: ImageLike, *, saliency: bool = True) -> AttentionMap:
        return parse_attention(await self.send(attention_call(model, image, saliency)))

    # ------------------------------------------------------------------------------------------- sequences
    async def encode_limits(self, model: str) -> EncodeLimits:
        info = self._descriptions.get(model) or await self.model(model)
        return EncodeLimits.from_description(info)

    async def encode_sequence(self, model: str, frames: np.ndarray | Iterable[np.ndarray], chunk: int | None = None,
                              dtype: LatentDtype = "float32", *, params: Mapping[str, Any] | None = None,
                              concurrency: int = 2) -> np.ndarray:
        """`Client.encode_sequence` with up to `concurrency` chunks in flight (and in memory) at once;
        the first error cancels the chunks still running and is raised."""
        head, frames = first_frame(frames)
        if head is None:
            return assemble([], LATENT_DTYPES[dtype])
        planned = (await self.encode_limits(model)).chunk_for(head) if chunk is None else chunk
        size = self.first_chunk(model, planned, lambda: planned)
        started = size[0]
        slots = asyncio.Semaphore(max(1, concurrency))
        tasks: list[asyncio.Task[list[np.ndarray]]] = []
        try:
            for piece in frame_chunks(frames, size):
                await slots.acquire()
                if any(task.done() and task.exception() is not None for task in tasks):
                    slots.release()
                    break
                tasks.append(asyncio.create_task(self._encode_chunk(model, piece, size, dtype, params, slots)))
            results = await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            self.learn_chunk(model, size, started)
        return assemble([part for parts in results for part in parts], LATENT_DTYPES[dtype])

    async def _encode_chunk(self, model: str, piece: np.ndarray, size: list[int], dtype: LatentDtype,
                            params: Mapping[str, Any] | None, slots: asyncio.Semaphore) -> list[np.ndarray]:
        """The latents of one chunk (several requests after a refusal naming a size limit); frees its slot."""
        try:
            queue = PieceQueue(piece, size)
            while (current := queue.next()) is not None:
                try:
                    response = await self.send(encode_call(model, current, dtype, params))
                    queue.done(parse_latents(response, dtype, len(current)))
                except ServiceError as error:
                    queue.refused(error)
            return queue.parts
        finally:
            slots.release()
