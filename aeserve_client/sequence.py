"""How `encode_sequence` cuts a long frame sequence into requests the service accepts (no I/O here).

The chunk is planned from what the service publishes in `GET /v1/models/{m}`: the encode op's engine
batch (`ops.encode.max_batch_size`, a chunk is a multiple of it so batches run full), its input shape and,
when the service lists them, its request limits (`limits.max_frames`, `limits.max_upload_bytes`,
`limits.max_request_memory_bytes`); a service that does not list them starts from its documented
defaults. Whatever the plan, a refusal corrects it: a 422 `too_many_frames` or a 413 names the limit it
hit (`error.limit`), and the refused chunk is split to fit it and sent again (`smaller_chunk`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from aeserve_client.errors import ServiceError
from aeserve_client.protocol import upload_array

# The service's defaults (README, "Limits"), used only when its model description lists no `limits`
DEFAULT_MAX_FRAMES = 256
DEFAULT_MAX_UPLOAD_BYTES = 32 * 2**20
DEFAULT_MAX_REQUEST_MEMORY_BYTES = 256 * 2**20
NPY_HEADER_BYTES = 256  # an NPY header is 128 bytes, rarely more
HEADROOM = 0.9  # plan requests at 90% of a limit: estimates are estimates


@dataclass(frozen=True)
class EncodeLimits:
    """What bounds one encode request of a model, as the service describes it."""

    batch: int  # the engine's largest batch of the encode op
    max_frames: int
    max_upload_bytes: int
    max_request_memory_bytes: int
    input_shape: tuple[int, ...]  # the encode op's input (N, C, H, W); -1: any size

    @classmethod
    def from_description(cls, info: dict[str, Any]) -> EncodeLimits:
        """The limits of `GET /v1/models/{m}`'s answer."""
        op = (info.get("ops") or {}).get("encode") or {}
        limits = info.get("limits") or {}
        shape = tuple(int(v) for v in ((op.get("inputs") or [{}])[0].get("shape") or ()))
        return cls(
            batch=max(1, int(op.get("max_batch_size") or 1)),
            max_frames=int(limits.get("max_frames") or DEFAULT_MAX_FRAMES),
            max_upload_bytes=int(limits.get("max_upload_bytes") or DEFAULT_MAX_UPLOAD_BYTES),
            max_request_memory_bytes=int(limits.get("max_request_memory_bytes") or DEFAULT_MAX_REQUEST_MEMORY_BYTES),
            input_shape=shape,
        )

    def model_values(self, frame: np.ndarray) -> int:
        """Values of one frame as the model takes it (its fixed input size, else the frame's own)."""
        fixed = [v for v in self.input_shape[1:] if v > 0]
        if len(fixed) == len(self.input_shape[1:]) and fixed:
            return math.prod(fixed)
        channels = self.input_shape[1] if len(self.input_shape) > 1 and self.input_shape[1] > 0 else 1
        return channels * frame.shape[-2] * frame.shape[-1]

    def chunk_for(self, frame: np.ndarray) -> int:
        """Frames per request: within the frame, body and memory limits (at `HEADROOM`), rounded down to a
        multiple of the engine batch when larger than one."""
        sent = upload_array(frame).nbytes
        # the service holds the body, the frame's declared data and the float32 model input per frame
        memory = 2 * sent + 4 * self.model_values(frame)
        by_body = (HEADROOM * self.max_upload_bytes - NPY_HEADER_BYTES) // max(sent, 1)
        by_memory = HEADROOM * self.max_request_memory_bytes // max(memory, 1)
        chunk = int(max(1, min(self.max_frames, by_body, by_memory)))
        return chunk if chunk <= self.batch else chunk // self.batch * self.batch


def smaller_chunk(error: ServiceError, chunk: int, frame_bytes: int) -> int | None:
    """The chunk that fits the limit a refusal names (None: the refusal is not about the request's size,
    or the chunk cannot shrink): too many frames -> the limit; a body too large -> what fits in it; a
    memory budget passed or a deadline missed -> half."""
    if chunk <= 1:
        return None
    limit = error.limit if isinstance(error.limit, int | float) and not isinstance(error.limit, bool) else None
    if error.status == 422 and error.code == "too_many_frames" and limit:
        return max(1, min(chunk - 1, int(limit)))
    if error.status == 413 and error.field == "body" and limit:
        return max(1, min(chunk - 1, int((HEADROOM * limit - NPY_HEADER_BYTES) // max(frame_bytes, 1))))
    if error.status == 413 or (error.status == 504 and error.code != "deadline_unreachable"):
        return max(1, chunk // 2)
    return None


def frame_chunks(frames: np.ndarray | Iterable[np.ndarray], size: list[int]) -> Iterator[np.ndarray]:
    """Consecutive chunks of `frames` (an array (T, ...) or any iterable of equal-size frames, read
    lazily), each of the current `size[0]` frames (the caller may lower it between chunks)."""
    if isinstance(frames, np.ndarray):
        start = 0
        while start < len(frames):
            chunk = frames[start:start + size[0]]
            start += len(chunk)  # the size may be lowered while the chunk is out
            yield chunk
        return
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(np.asarray(frame))
        if len(batch) >= size[0]:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def first_frame(frames: np.ndarray | Iterable[np.ndarray]) -> tuple[np.ndarray | None, Any]:
    """(the first frame or None when there is none, the frames to iterate from the start again)."""
    if isinstance(frames, np.ndarray):
        return (frames[0] if len(frames) else None), frames
    iterator = iter(frames)
    try:
        head = np.asarray(next(iterator))
    except StopIteration:
        return None, ()

    def again() -> Iterator[np.ndarray]:
        yield head
        yield from iterator

    return head, again()


def split(chunk: np.ndarray, size: int) -> list[np.ndarray]:
    """`chunk` cut into pieces of at most `size` frames, in order."""
    return [chunk[i:i + size] for i in range(0, len(chunk), size)]


def assemble(parts: list[np.ndarray], dtype: type[np.floating]) -> np.ndarray:
    """The T x D latents of the parts, in order (an empty sequence: 0 x 0)."""
    if not parts:
        return np.zeros((0, 0), dtype)
    return np.concatenate(parts).astype(dtype, copy=False)


class PieceQueue:
    """The requests one chunk becomes: the chunk itself, or, after a refusal that names a size limit, the
    pieces that fit it (the shared `size` is lowered for the chunks still to come). The transports loop
    `next()` -> send -> `done(latents)` or `refused(error)` until `next()` is None; `parts` stay in order."""

    def __init__(self, chunk: np.ndarray, size: list[int]) -> None:
        self.pending = [chunk]
        self.size = size
        self.parts: list[np.ndarray] = []
        self.requests = 0

    def next(self) -> np.ndarray | None:
        return self.pending[0] if self.pending else None

    def done(self, latents: np.ndarray) -> None:
        self.pending.pop(0)
        self.parts.append(latents)
        self.requests += 1

    def refused(self, error: ServiceError) -> None:
        """Split the refused piece to the size its error names; re-raise an error that names none."""
        piece = self.pending[0]
        self.requests += 1
        smaller = smaller_chunk(error, len(piece), upload_array(piece[0]).nbytes)
        if smaller is None:
            raise error
        self.size[0] = min(self.size[0], smaller)
        self.pending[:1] = split(piece, smaller)
