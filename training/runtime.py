"""Where and how a run executes: seeding, the device, mixed precision and stopping on a signal."""

from __future__ import annotations

import contextlib
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from training.config import TrainConfig


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or `auto`; with `local_rank` (one process of several) CUDA means cuda:LOCAL_RANK."""
    if name == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device={name!r} but CUDA is not available; use device=cpu")
    if local_rank is not None and device.type == "cuda":
        return torch.device("cuda", local_rank)
    return device


def amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """None (fp32), bfloat16 (CPU autocast) or float16 (CUDA autocast + GradScaler)."""
    mode = config.amp
    if mode == "off":
        return None
    if mode == "auto":
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("amp=fp16 needs a CUDA device; use amp=bf16 (or auto) on CPU")
    return torch.float16 if mode == "fp16" else torch.bfloat16


class StopFlag:
    """SIGINT/SIGTERM -> stop at the next step boundary with a checkpoint (main thread only)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        previous = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, Ctrl-C behaves as usual
            pass
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.reason is not None:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self.reason = "interrupted"
