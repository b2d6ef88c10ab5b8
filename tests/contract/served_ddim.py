"""Checking the service's DDIM sampler step by step against `training.schedules` and the eager model.

The untrained U-Net of the end-to-end tests makes a DDIM trajectory chaotic: a 1e-6 perturbation of
ε (the size of the ONNX-vs-eager difference of one denoiser call, ~3e-6) grows to ~3e-3 after 10 steps
and ~1.9 after 50, and how far depends on the CPU's kernels (an AMD EPYC served a 10-step sample 7.4e-4
from the one `ddim_sample` computed with the same ONNX denoiser). So a served trajectory is checked from
the denoiser calls it made (`DenoiseRecorder`), one step at a time (`trajectory_errors`).

Bounds, 4-5x the largest error measured with every kernel set of tests/contract/conformance.py. Measured
on a recorded trajectory, a mistake moves a step far more: β_end 0.0201 instead of 0.02 by 4.5e-3, a
cosine schedule by 1.3, no clipping by 10, η off by 0.1 by 0.3; a wrong timestep, seed or condition fails
the exact checks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from training.schedules import ddim_sample, ddim_step, ddim_timesteps, make_schedule

EPS_TOL = 4e-5    # served (ONNX) ε vs the eager U-Net on the same inputs: measured <= 8.1e-6
STEP_TOL = 2e-6   # served DDIM step vs training.schedules.ddim_step: 0 natively, <= 4.8e-7 with SSE kernels
FREE_RUNNING_TOL = 1e-4  # 3 free-running steps, served vs eager: measured <= 1.5e-5

Feeds = dict[str, np.ndarray]


class DenoiseRecorder:
    """Stands in for the served `denoise` runtime's `run`: calls it and records every step batch's
    inputs and its ε."""

    def __init__(self, run: Callable[[Feeds], Feeds]) -> None:
        self.run = run
        self.calls: list[Feeds] = []

    def __call__(self, feeds: Feeds) -> Feeds:
        outputs = self.run(feeds)
        self.calls.append({**{k: np.array(v) for k, v in feeds.items()}, "eps": np.array(outputs["eps"])})
        return outputs


def _schedule(spec: dict):
    return make_schedule(spec["num_train_timesteps"], spec["beta_schedule"], spec["beta_start"], spec["beta_end"])


def reference_ddim(model, spec: dict, seed: int, n: int, steps: int, condition: np.ndarray) -> np.ndarray:
    """`training.schedules.ddim_sample` (eta 0) from the x_T the service draws for `seed`: app/diffusion.py
    takes x_T = default_rng(seed).standard_normal((N, C, H, W), float32)."""
    x_T = np.random.default_rng(seed).standard_normal((n, *spec["image_shape"]), dtype=np.float32)
    out = ddim_sample(model, torch.from_numpy(x_T), torch.from_numpy(condition), steps=steps, eta=0.0,
                      clip_denoised=spec["clip_denoised"], schedule=_schedule(spec))
    return out.numpy()


def trajectory_errors(model, spec: dict, calls: list[Feeds], sampled: np.ndarray, *, seed: int, steps: int,
                      condition: np.ndarray, eta: float = 0.0) -> dict[str, float]:
    """Check one served request's trajectory (its denoiser calls, no other request's) step by step.

    Exact: the step batches visit `training.schedules.ddim_timesteps` with the request's rows, start from
    x_T = default_rng(seed).standard_normal and carry the condition. Measured (returned as the largest
    absolute difference): "eps", the served ε against the eager model on the same x_t; "step", the next
    x_t (and finally the sample) against `training.schedules.ddim_step` from the same x_t and served ε,
    with the η > 0 noise of row i drawn from child i of default_rng(seed), as app/diffusion.py documents.
    """
    n, shape = len(sampled), tuple(spec["image_shape"])
    schedule = _schedule(spec)
    stride = spec["num_train_timesteps"] // steps
    visited = ddim_timesteps(spec["num_train_timesteps"], steps).tolist()
    assert [c["t"].tolist() for c in calls] == [[t] * n for t in visited]
    rng = np.random.default_rng(seed)
    np.testing.assert_array_equal(calls[0]["x_t"], rng.standard_normal((n, *shape), dtype=np.float32))
    children = rng.spawn(n) if eta > 0 else []
    errors = {"eps": 0.0, "step": 0.0}
    for k, call in enumerate(calls):
        np.testing.assert_array_equal(call["condition"], condition)
        x, t, eps = (torch.from_numpy(call[name]) for name in ("x_t", "t", "eps"))
        with torch.no_grad():
            eager_eps = model(x, t, torch.from_numpy(condition)).numpy()
        errors["eps"] = max(errors["eps"], float(np.abs(call["eps"] - eager_eps).max()))
        noise = None
        if eta > 0:
            noise = torch.from_numpy(np.stack([c.standard_normal(shape, dtype=np.float32) for c in children]))
        x_next = ddim_step(x, eps, t, t - stride, schedule.alphas_cumprod, eta, noise, spec["clip_denoised"])
        following = calls[k + 1]["x_t"] if k + 1 < len(calls) else sampled
        errors["step"] = max(errors["step"], float(np.abs(x_next.numpy() - following).max()))
    return errors
