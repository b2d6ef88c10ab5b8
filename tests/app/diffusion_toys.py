"""Toy specs, denoisers and request arguments shared by the app.ddim and app.diffusion tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from app.diffusion import ContinuousDdimSampler
from app.schemas.manifest import SamplerSpec

FAMILY = "diffusion-decoder"
CASE = "unet_img32_b32_m1-2_att1_ddim10"

LINEAR = {
    "kind": "ddim",
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 1e-4,
    "beta_end": 0.02,
}


def toy_spec(image_shape: tuple[int, int, int] = (1, 8, 8), condition_dim: int = 2, **kw: Any) -> SamplerSpec:
    """A linear-schedule ddim `SamplerSpec` (T = 1000) for small toy images."""
    return SamplerSpec(**{**LINEAR, "image_shape": list(image_shape), "condition_dim": condition_dim, **kw})


def toy_eps(x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
    """A row-wise deterministic ε with only correctly rounded ops (results independent of batching)."""
    scale = (t.astype(np.float32) / np.float32(1000.0) + np.float32(0.5))[:, None, None, None]
    shift = (cond.sum(axis=1) * np.float32(0.1))[:, None, None, None]
    return (x / (np.float32(1.0) + x * x) * scale + shift).astype(np.float32)


class RecordingDenoiser:
    """Wraps an ε function; records (t, batch size, thread) per call; optional fixed delay.

    `gate` (when given) is waited on (up to 5 s) before each call: clear it to hold the loop mid-step.
    """

    def __init__(self, fn: Callable[..., np.ndarray] = toy_eps, delay: float = 0.0,
                 gate: threading.Event | None = None) -> None:
        self.fn, self.delay, self.gate = fn, delay, gate
        self.calls: list[np.ndarray] = []
        self.threads: set[int] = set()
        self.entered = threading.Event()  # set once a call has started

    def __call__(self, x: np.ndarray, t: np.ndarray, cond: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and t.dtype == np.int64 and cond.dtype == np.float32
        assert x.shape[0] == t.shape[0] == cond.shape[0]
        self.threads.add(threading.get_ident())
        self.calls.append(t.copy())
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(5)
        if self.delay:
            time.sleep(self.delay)
        return self.fn(x, t, cond)


async def sample_alone(spec: SamplerSpec, **request: Any) -> np.ndarray:
    """One request on a fresh sampler of its own (the reference for batched results)."""
    sampler = ContinuousDdimSampler(spec, RecordingDenoiser(), max_batch_size=8, model="toy", version="1")
    await sampler.start()
    try:
        return await sampler.sample(**request)
    finally:
        await sampler.stop()


def request_args(n: int, steps: int, eta: float, seed: int, m: int = 2) -> dict[str, Any]:
    """`sample()` keyword arguments: n samples with a seed-dependent (n, m) condition, no deadline."""
    cond = np.linspace(-1, 1, n * m, dtype=np.float32).reshape(n, m) + seed
    return {"num_samples": n, "steps": steps, "eta": eta, "condition": cond, "seed": seed, "deadline": None}
