"""Pure numpy DDIM math for `app.diffusion`: the noise schedule, the visited timesteps, one step.

The math is diffusers' `DDIMScheduler` with its defaults (identical to the ai-design original for every
S that divides T): "leading" timestep spacing t_k = k·(T // S) visited in descending order (T = 1000,
S = 10 → 900, 800, …, 0; exactly S steps), `steps_offset=0`, `set_alpha_to_one=True` (ᾱ_prev = 1 on
the last step), x̂₀ clipped to [−1, 1] when `clip_denoised`, and the direction term uses the raw ε.
The schedule is rebuilt from the manifest's numbers bit-for-bit as torch builds it (float32
`linspace`, `cumprod` accumulated in float64), so `app` needs no training code.
"""

from __future__ import annotations

import numpy as np

from app.schemas.manifest import SamplerSpec

COSINE_S = 0.008
COSINE_BETA_CLIP = (1e-4, 0.9999)


def linear_betas(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """float32 β = torch.linspace(beta_start, beta_end, T), reproduced bit for bit.

    torch computes step = (end − start) / (T − 1) in float32, then start + step·i for the first half
    and end − step·(T − 1 − i) for the second, each with one rounding (a fused multiply-add).
    """
    start, end = np.float32(beta_start), np.float32(beta_end)
    if num_train_timesteps == 1:
        return np.array([start], dtype=np.float32)
    step = np.float64((end - start) / np.float32(num_train_timesteps - 1))
    i = np.arange(num_train_timesteps, dtype=np.float64)
    first = np.float64(start) + step * i
    second = np.float64(end) - step * (num_train_timesteps - 1 - i)
    return np.where(i < num_train_timesteps // 2, first, second).astype(np.float32)


def cosine_betas(num_train_timesteps: int) -> np.ndarray:
    """Nichol & Dhariwal (2021), s = 0.008, computed in float64, β clipped to [1e-4, 0.9999], float32.

    This is the ai-design original's cosine schedule (the one the models are trained with); it differs
    from diffusers' "squaredcos_cap_v2" only in the clip bounds.
    """
    steps = np.linspace(0.0, num_train_timesteps, num_train_timesteps + 1, dtype=np.float64)
    f = np.cos(((steps / num_train_timesteps) + COSINE_S) / (1 + COSINE_S) * np.pi * 0.5) ** 2
    alphas_cumprod = f / f[0]
    betas = 1.0 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return np.clip(betas, *COSINE_BETA_CLIP).astype(np.float32)


def schedule_from_spec(spec: SamplerSpec) -> tuple[np.ndarray, np.ndarray]:
    """(β, ᾱ) as float32 arrays of length T from a "ddim" `SamplerSpec`."""
    if spec.kind != "ddim":
        raise ValueError(f"sampler.kind must be 'ddim' for ContinuousDdimSampler; got {spec.kind!r}")
    num_t = spec.num_train_timesteps
    if num_t is None or num_t < 1:
        raise ValueError(f"sampler.num_train_timesteps must be an integer >= 1; got {num_t!r}")
    if spec.beta_schedule == "linear":
        if spec.beta_start is None or spec.beta_end is None:
            raise ValueError("sampler.beta_schedule 'linear' needs sampler.beta_start and sampler.beta_end")
        if not 0.0 < spec.beta_start <= spec.beta_end < 1.0:
            raise ValueError(f"sampler.beta_start/beta_end must satisfy 0 < start <= end < 1; "
                             f"got {spec.beta_start}, {spec.beta_end}")
        betas = linear_betas(spec.beta_start, spec.beta_end, num_t)
    elif spec.beta_schedule == "cosine":
        betas = cosine_betas(num_t)
    else:
        raise ValueError(f"sampler.beta_schedule must be one of ('linear', 'cosine'); "
                         f"got {spec.beta_schedule!r}")
    # torch.cumprod on CPU accumulates float32 products in double and rounds each prefix once.
    alphas_cumprod = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    return betas, alphas_cumprod


def ddim_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """Visited timesteps, descending: k·(T // S) for k = S−1 … 0 (diffusers "leading", offset 0)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be within [1, {num_train_timesteps}]; got {steps}")
    stride = num_train_timesteps // steps
    return np.arange(steps - 1, -1, -1, dtype=np.int64) * stride


def ddim_step(x_t: np.ndarray, eps: np.ndarray, alpha_bar: np.ndarray, alpha_bar_prev: np.ndarray,
              eta: np.ndarray, noise: np.ndarray | None, clip_denoised: bool) -> np.ndarray:
    """One DDIM step for B rows, each with its own ᾱ_t, ᾱ_prev and η (1-D float32 arrays of length B).

    `x_t`, `eps` and `noise` are float32 with the row axis first, (B, C, H, W) in the sampler.

    x̂₀ = (x_t − sqrt(1−ᾱ_t)·ε)/sqrt(ᾱ_t) (clipped to [−1, 1] if `clip_denoised`);
    σ = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev));
    x_prev = sqrt(ᾱ_prev)·x̂₀ + sqrt(1−ᾱ_prev−σ²)·ε + σ·z. All arithmetic in float32, as torch does.
    `noise` (z, like x_t) is only read for rows with η > 0.
    """
    shape = (-1,) + (1,) * (x_t.ndim - 1)
    a = alpha_bar.astype(np.float32).reshape(shape)
    a_prev = alpha_bar_prev.astype(np.float32).reshape(shape)
    eta32 = eta.astype(np.float32).reshape(shape)
    one = np.float32(1.0)
    x0 = (x_t - np.sqrt(one - a) * eps) / np.sqrt(a)
    if clip_denoised:
        x0 = np.clip(x0, np.float32(-1.0), np.float32(1.0))
    sigma = eta32 * np.sqrt((one - a_prev) / (one - a) * (one - a / a_prev))
    x_prev = np.sqrt(a_prev) * x0 + np.sqrt(one - a_prev - sigma * sigma) * eps
    if noise is not None and bool((eta32 > 0).any()):
        x_prev = x_prev + np.where(eta32 > 0, sigma, np.float32(0.0)) * noise
    return x_prev.astype(np.float32, copy=False)
