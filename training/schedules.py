"""Diffusion noise schedules and samplers as pure functions (no model inside).

A `NoiseSchedule` holds the float32 β / ᾱ tensors of a discrete-time DDPM (T training steps).
`q_sample` draws x_t from x_0; `ddpm_step` / `ddim_step` take one reverse step for a batch in which
every row may sit at its own timestep (so a service can batch requests that are at different points
of their trajectories); `ddpm_sample` / `ddim_sample` run whole trajectories with any callable
`model(x_t, t, condition) -> eps`.

DDIM follows diffusers' `DDIMScheduler` defaults exactly (and the ai-design original, whose
equations are the same): timestep spacing "leading" (t_k = k·(T // S), visited in descending order,
so S = 10 visits 900, 800, …, 0 and S = 50 starts at 980), `set_alpha_to_one=True` (ᾱ_prev = 1 on
the last step), `steps_offset=0`, `clip_sample=True` with range 1, and the direction term uses the
raw predicted ε (`use_clipped_model_output=False`). The one difference from the original: when S
does not divide T the original visits `range(0, T, T // S)` (S = 3 → 999, 666, 333, 0: four steps);
here, as in diffusers, exactly S steps are visited (666, 333, 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

BETA_SCHEDULES = ("linear", "cosine")
COSINE_S = 0.008
COSINE_BETA_CLIP = (1e-4, 0.9999)

EpsModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """β_t and ᾱ_t = Π(1 − β) for t = 0 … T−1, float32 (1-D tensors of length T)."""

    num_train_timesteps: int
    beta_schedule: str
    beta_start: float
    beta_end: float
    betas: torch.Tensor
    alphas_cumprod: torch.Tensor

    @property
    def alphas(self) -> torch.Tensor:
        return 1.0 - self.betas

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        """ᾱ_{t−1}, with ᾱ_{−1} = 1."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The same schedule with its tensors on `device`."""
        return NoiseSchedule(self.num_train_timesteps, self.beta_schedule, self.beta_start, self.beta_end,
                             self.betas.to(device), self.alphas_cumprod.to(device))

    def spec(self) -> dict[str, object]:
        """The numbers that rebuild this schedule (what a manifest's SamplerSpec carries)."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "beta_start": self.beta_start, "beta_end": self.beta_end}


def make_schedule(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                  beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
    """Build a schedule.

    linear: β = linspace(beta_start, beta_end, T) in float32 (as the original and diffusers).
    cosine: Nichol & Dhariwal (2021), s = 0.008, β clipped to [1e-4, 0.9999] (as the original);
    beta_start / beta_end are recorded but unused.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1; got {num_train_timesteps}")
    if beta_schedule == "linear":
        if not 0.0 < beta_start <= beta_end < 1.0:
            raise ValueError(f"linear schedule needs 0 < beta_start <= beta_end < 1; "
                             f"got beta_start={beta_start}, beta_end={beta_end}")
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    elif beta_schedule == "cosine":
        betas = _cosine_betas(num_train_timesteps)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}; got {beta_schedule!r}")
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return NoiseSchedule(num_train_timesteps, beta_schedule, float(beta_start), float(beta_end),
                         betas, alphas_cumprod)


def _cosine_betas(num_train_timesteps: int) -> torch.Tensor:
    steps = torch.linspace(0, num_train_timesteps, num_train_timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / num_train_timesteps) + COSINE_S) / (1 + COSINE_S) * math.pi * 0.5) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(*COSINE_BETA_CLIP).to(torch.float32)


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like x, drawn on the generator's device (CPU generators work for
    CUDA tensors too), then moved to x's device."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] per row, shaped (B, 1, 1, …) to broadcast over a tensor of `ndim` dims."""
    out = values.to(t.device)[t.long()]
    return out.reshape(-1, *([1] * (ndim - 1)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x_0 + sqrt(1 − ᾱ_t)·ε, t an int64 vector with one entry per row."""
    alpha_bar = _gather(schedule.alphas_cumprod, t, x0.dim()).to(x0.dtype)
    return alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """x̂_0 = (x_t − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t) (ᾱ_t broadcastable to x_t)."""
    return (x_t - (1.0 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5


# ---------------------------------------------------------------------------------------- DDPM


def ddpm_step(schedule: NoiseSchedule, x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
              noise: torch.Tensor | None = None, clip_denoised: bool = True) -> torch.Tensor:
    """One ancestral DDPM step x_t -> x_{t−1} with the "fixed small" posterior variance.

    Rows may be at different t. `noise` (like x_t) is required unless every t is 0; rows at t = 0
    get no noise (they return the posterior mean, i.e. x̂_0).
    """
    ndim = x_t.dim()
    alpha_bar = _gather(schedule.alphas_cumprod, t, ndim).to(x_t.dtype)
    alpha_bar_prev = _gather(schedule.alphas_cumprod_prev, t, ndim).to(x_t.dtype)
    # β_t re-derived from ᾱ (as diffusers' DDPMScheduler) so that the t = 0 step returns x̂_0 exactly
    beta = 1.0 - alpha_bar / alpha_bar_prev
    x0 = predict_x0(x_t, eps, alpha_bar)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    coef_x0 = beta * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
    coef_xt = (1.0 - alpha_bar_prev) * (1.0 - beta).sqrt() / (1.0 - alpha_bar)
    mean = coef_x0 * x0 + coef_xt * x_t
    variance = beta * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
    nonzero = (t.reshape(-1, *([1] * (ndim - 1))) > 0).to(x_t.dtype)
    if noise is None:
        if bool((t > 0).any()):
            raise ValueError("ddpm_step needs `noise` for rows with t > 0")
        return mean
    return mean + nonzero * variance.sqrt() * noise


@torch.no_grad()
def ddpm_sample(model: EpsModel, x_T: torch.Tensor, condition: torch.Tensor | None,
                schedule: NoiseSchedule, clip_denoised: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The full T-step ancestral sampler from x_T."""
    x = x_T
    for step in reversed(range(schedule.num_train_timesteps)):
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        eps = model(x, t, condition)
        noise = None
        if step > 0:
            noise = _randn_like(x, generator)
        x = ddpm_step(schedule, x, eps, t, noise, clip_denoised)
    return x


# ---------------------------------------------------------------------------------------- DDIM


def ddim_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The visited timesteps, descending (diffusers' "leading" spacing, steps_offset 0).

    t_k = k · (T // S) for k = S−1 … 0; e.g. (1000, 10) -> 900, 800, …, 0.
    """
    _check_steps(num_train_timesteps, steps)
    stride = num_train_timesteps // steps
    return torch.arange(steps - 1, -1, -1, dtype=torch.long) * stride


def ddim_prev_timesteps(t: torch.Tensor, steps: torch.Tensor | int, num_train_timesteps: int) -> torch.Tensor:
    """t_prev = t − T // S per row (negative on a trajectory's last step, meaning ᾱ_prev = 1)."""
    steps_t = torch.as_tensor(steps, dtype=torch.long, device=t.device)
    if bool((steps_t < 1).any()) or bool((steps_t > num_train_timesteps).any()):
        raise ValueError(f"steps must be within [1, {num_train_timesteps}]; got {steps_t.tolist()}")
    return t.long() - num_train_timesteps // steps_t


def _check_steps(num_train_timesteps: int, steps: int) -> None:
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be within [1, num_train_timesteps={num_train_timesteps}]; got {steps}")


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              alphas_cumprod: torch.Tensor, eta: float | torch.Tensor = 0.0,
              noise: torch.Tensor | None = None, clip_denoised: bool = True) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev}, vectorised over rows with their own t / t_prev / eta.

    x̂_0 = (x_t − sqrt(1−ᾱ_t)·ε)/sqrt(ᾱ_t), clamped to [−1, 1] if `clip_denoised`;
    σ = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev));
    x_prev = sqrt(ᾱ_prev)·x̂_0 + sqrt(1−ᾱ_prev−σ²)·ε + σ·z, with ᾱ_prev = 1 where t_prev < 0.
    `noise` (z, like x_t) is needed only where η > 0.
    """
    ndim = x_t.dim()
    device = x_t.device
    t = torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1)
    t_prev = torch.as_tensor(t_prev, dtype=torch.long, device=device).reshape(-1)
    alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
    shape = (-1, *([1] * (ndim - 1)))
    alpha_bar = alphas_cumprod[t].reshape(shape)
    alpha_bar_prev = torch.where(t_prev >= 0, alphas_cumprod[t_prev.clamp(min=0)],
                                 torch.ones_like(t_prev, dtype=torch.float32)).reshape(shape)
    x0 = predict_x0(x_t, eps, alpha_bar)
    if clip_denoised:
        x0 = x0.clamp(-1.0, 1.0)
    eta_t = torch.as_tensor(eta, dtype=torch.float32, device=device).reshape(-1)
    if bool((eta_t < 0).any()):
        raise ValueError(f"eta must be >= 0; got {eta_t.tolist()}")
    eta_t = eta_t.reshape(shape) if eta_t.numel() > 1 else eta_t.reshape(())
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    sigma = eta_t * variance**0.5
    direction = (1.0 - alpha_bar_prev - sigma**2) ** 0.5 * eps
    x_prev = alpha_bar_prev**0.5 * x0 + direction
    if bool((eta_t > 0).any()):
        if noise is None:
            raise ValueError("ddim_step needs `noise` when eta > 0")
        x_prev = x_prev + sigma * noise
    return x_prev


@torch.no_grad()
def ddim_sample(model: EpsModel, x_T: torch.Tensor, condition: torch.Tensor | None, steps: int = 50,
                eta: float = 0.0, clip_denoised: bool = True, *, schedule: NoiseSchedule | None = None,
                generator: torch.Generator | None = None,
                callback: Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
                ) -> torch.Tensor:
    """Run S DDIM steps from x_T (default schedule: linear, T = 1000, β 1e-4 … 0.02).

    `callback(k, t, x, eps)` is called after the model at step k with its input x and output eps.
    Noise for η > 0 is drawn from `generator` (or the global one).
    """
    schedule = schedule or make_schedule()
    timesteps = ddim_timesteps(schedule.num_train_timesteps, steps).to(x_T.device)
    alphas_cumprod = schedule.alphas_cumprod.to(x_T.device)
    stride = schedule.num_train_timesteps // steps
    x = x_T
    batch = x.shape[0]
    for k, step in enumerate(timesteps.tolist()):
        t = torch.full((batch,), step, dtype=torch.long, device=x.device)
        eps = model(x, t, condition)
        if callback is not None:
            callback(k, t, x, eps)
        noise = None
        if eta > 0:
            noise = _randn_like(x, generator)
        x = ddim_step(x, eps, t, t - stride, alphas_cumprod, eta, noise, clip_denoised)
    return x
