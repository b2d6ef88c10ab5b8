"""Noise schedules, q_sample and the DDPM / DDIM samplers (pure functions, no network)."""

from __future__ import annotations

import pytest
import torch

from training.schedules import (
    NoiseSchedule,
    ddim_prev_timesteps,
    ddim_sample,
    ddim_step,
    ddim_timesteps,
    ddpm_sample,
    ddpm_step,
    make_schedule,
    predict_x0,
    q_sample,
)

# float32 ᾱ_t and β_t of the linear schedule (T = 1000), from the reference fact sheet.
KNOWN_ALPHAS_CUMPROD = {0: 0.999899983, 1: 0.999780059, 99: 0.897017956, 249: 0.524085343,
                        499: 0.078587234, 980: 5.90375203e-05, 999: 4.03583035e-05}
KNOWN_BETAS = {0: 9.99999975e-05, 1: 0.000119919918, 99: 0.00207207212, 249: 0.00506005995,
               499: 0.0100400401, 980: 0.0196215212, 999: 0.0199999996}


def oracle(x0: torch.Tensor, schedule: NoiseSchedule):
    """The exact ε-model for a data distribution that is a point mass at x0."""

    def eps(x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        alpha_bar = schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()

    return eps


def test_linear_schedule_known_values():
    schedule = make_schedule(1000, "linear", 1e-4, 0.02)
    assert schedule.betas.dtype == torch.float32 and schedule.betas.shape == (1000,)
    for t, value in KNOWN_ALPHAS_CUMPROD.items():
        assert schedule.alphas_cumprod[t].item() == pytest.approx(value, rel=1e-6)
    for t, value in KNOWN_BETAS.items():
        assert schedule.betas[t].item() == pytest.approx(value, rel=1e-6)
    assert schedule.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(schedule.alphas_cumprod_prev[1:], schedule.alphas_cumprod[:-1])
    assert schedule.spec() == {"num_train_timesteps": 1000, "beta_schedule": "linear",
                               "beta_start": 1e-4, "beta_end": 0.02}


def test_cosine_schedule_shape_and_clipping():
    schedule = make_schedule(1000, "cosine")
    betas = schedule.betas
    assert betas.shape == (1000,) and betas.dtype == torch.float32
    assert betas.min().item() >= 1e-4 - 1e-9 and betas.max().item() <= 0.9999 + 1e-6
    assert bool((schedule.alphas_cumprod[1:] < schedule.alphas_cumprod[:-1]).all())
    # cosine keeps more signal than linear in the middle of the schedule
    assert schedule.alphas_cumprod[500] > make_schedule(1000, "linear").alphas_cumprod[500]
    assert schedule.alphas_cumprod[-1].item() < 1e-3


@pytest.mark.parametrize("kwargs, match", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule must be one of"),
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"beta_start": 0.1, "beta_end": 0.01}, "beta_start"),
])
def test_make_schedule_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_schedule(**kwargs)


def test_q_sample_per_row_timesteps():
    schedule = make_schedule()
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    x_t = q_sample(schedule, x0, t, noise)
    for i, step in enumerate(t.tolist()):
        a = schedule.alphas_cumprod[step]
        torch.testing.assert_close(x_t[i], a.sqrt() * x0[i] + (1 - a).sqrt() * noise[i])
    torch.testing.assert_close(predict_x0(x_t, noise, schedule.alphas_cumprod[t].reshape(-1, 1, 1, 1)), x0,
                               atol=2e-3, rtol=0)


def test_ddim_timesteps_follow_diffusers_leading_spacing():
    assert ddim_timesteps(1000, 10).tolist() == list(range(900, -1, -100))
    assert ddim_timesteps(1000, 20).tolist()[:2] == [950, 900]
    fifty = ddim_timesteps(1000, 50)
    assert fifty[0].item() == 980 and fifty[-1].item() == 0 and len(fifty) == 50
    assert ddim_timesteps(1000, 3).tolist() == [666, 333, 0]      # exactly S steps (diffusers)
    assert ddim_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="steps must be within"):
            ddim_timesteps(1000, steps)


def test_ddim_prev_timesteps_per_row():
    t = torch.tensor([900, 0, 980, 500])
    steps = torch.tensor([10, 10, 50, 2])
    assert ddim_prev_timesteps(t, steps, 1000).tolist() == [800, -100, 960, 0]
    with pytest.raises(ValueError, match="steps must be within"):
        ddim_prev_timesteps(t, 0, 1000)


def _diffusers_ddim_step(sample, eps, t, prev_t, alphas_cumprod, eta, noise):
    """diffusers' DDIMScheduler.step (clip_sample=True, set_alpha_to_one=True), one scalar t."""
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** 0.5 * eps) / alpha_prod_t ** 0.5
    pred_original_sample = pred_original_sample.clamp(-1, 1)
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5
    direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * eps
    prev = alpha_prod_t_prev ** 0.5 * pred_original_sample + direction
    return prev + std_dev_t * noise if eta > 0 else prev


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers_equations(eta):
    schedule = make_schedule()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 8, 8, generator=generator)
    eps = torch.randn(4, 3, 8, 8, generator=generator)
    noise = torch.randn(4, 3, 8, 8, generator=generator)
    t = torch.tensor([980, 500, 20, 0])
    t_prev = torch.tensor([960, 400, 0, -20])
    out = ddim_step(x, eps, t, t_prev, schedule.alphas_cumprod, eta, noise, clip_denoised=True)
    for i in range(4):
        ref = _diffusers_ddim_step(x[i], eps[i], t[i].item(), t_prev[i].item(), schedule.alphas_cumprod,
                                   eta, noise[i])
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=1e-5)
    # the last step (t_prev < 0 -> ᾱ_prev = 1) returns the clipped x̂_0
    x0 = predict_x0(x[3], eps[3], schedule.alphas_cumprod[0]).clamp(-1, 1)
    torch.testing.assert_close(out[3], x0)


def test_ddim_step_rows_are_independent_and_eta_per_row():
    schedule = make_schedule()
    x = torch.randn(3, 1, 4, 4)
    eps = torch.randn(3, 1, 4, 4)
    noise = torch.randn(3, 1, 4, 4)
    t, t_prev = torch.tensor([700, 300, 40]), torch.tensor([600, 200, 20])
    eta = torch.tensor([0.0, 1.0, 0.3])
    batched = ddim_step(x, eps, t, t_prev, schedule.alphas_cumprod, eta, noise)
    for i in range(3):
        single = ddim_step(x[i:i + 1], eps[i:i + 1], t[i:i + 1], t_prev[i:i + 1], schedule.alphas_cumprod,
                           float(eta[i]), noise[i:i + 1])
        torch.testing.assert_close(batched[i:i + 1], single)


def test_ddim_step_validates_eta_and_noise():
    schedule = make_schedule()
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="needs `noise`"):
        ddim_step(x, x, torch.tensor([10]), torch.tensor([0]), schedule.alphas_cumprod, eta=0.5)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_step(x, x, torch.tensor([10]), torch.tensor([0]), schedule.alphas_cumprod, eta=-1.0)


def test_no_clip_keeps_unclipped_prediction():
    schedule = make_schedule()
    x = torch.full((1, 1, 2, 2), 3.0)
    eps = torch.zeros_like(x)
    out = ddim_step(x, eps, torch.tensor([0]), torch.tensor([-1]), schedule.alphas_cumprod,
                    clip_denoised=False)
    torch.testing.assert_close(out, x / schedule.alphas_cumprod[0].sqrt())
    assert ddim_step(x, eps, torch.tensor([0]), torch.tensor([-1]), schedule.alphas_cumprod).max() == 1.0


@pytest.mark.parametrize("steps, eta", [(10, 0.0), (7, 1.0), (50, 0.5)])
def test_ddim_sample_recovers_point_mass_with_oracle(steps, eta):
    schedule = make_schedule()
    x0 = torch.rand(2, 3, 4, 4) * 1.6 - 0.8
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    seen = []
    out = ddim_sample(oracle(x0, schedule), x_T, None, steps, eta, True, schedule=schedule,
                      generator=torch.Generator().manual_seed(2),
                      callback=lambda k, t, x, e: seen.append((k, t.tolist())))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    assert [k for k, _ in seen] == list(range(steps))
    assert seen[0][1] == [ddim_timesteps(1000, steps)[0].item()] * 2 and seen[-1][1] == [0, 0]


def test_ddim_sample_passes_condition_and_int64_t():
    calls = []

    def model(x, t, condition):
        calls.append((t.dtype, t.shape, condition))
        return torch.zeros_like(x)

    condition = torch.tensor([[1.0, 2.0, 0.5]])
    ddim_sample(model, torch.zeros(1, 1, 2, 2), condition, steps=4)
    assert len(calls) == 4 and all(d == torch.int64 and s == (1,) and c is condition for d, s, c in calls)


def test_ddpm_step_and_sampler_with_oracle():
    schedule = make_schedule(50, "linear", 1e-4, 0.2)
    x0 = torch.rand(2, 1, 4, 4) - 0.5
    torch.manual_seed(0)
    out = ddpm_sample(oracle(x0, schedule), torch.randn(2, 1, 4, 4), None, schedule,
                      generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    # posterior mean at one step (no noise) equals the closed form
    t = torch.tensor([10, 30])
    x_t = torch.randn(2, 1, 4, 4)
    eps = torch.randn(2, 1, 4, 4)
    mean = ddpm_step(schedule, x_t, eps, t, torch.zeros_like(x_t), clip_denoised=False)
    for i, step in enumerate(t.tolist()):
        a, ab = schedule.alphas[step], schedule.alphas_cumprod[step]
        expected = (x_t[i] - (1 - a) / (1 - ab).sqrt() * eps[i]) / a.sqrt()   # the DDPM paper's form
        torch.testing.assert_close(mean[i], expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs `noise`"):
        ddpm_step(schedule, x_t, eps, t)
