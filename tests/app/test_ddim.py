"""app.ddim: the noise schedule bit for bit as the original builds it, and the visited timesteps."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from app.ddim import ddim_timesteps, schedule_from_spec
from app.diffusion import ContinuousDdimSampler
from app.schemas.manifest import SamplerSpec
from tests.app.diffusion_toys import CASE, FAMILY, LINEAR, toy_eps, toy_spec
from tests.conftest import fixture_dir


def test_schedule_matches_the_original_bit_for_bit() -> None:
    io = load_file(fixture_dir(FAMILY) / f"{CASE}.io.safetensors")
    betas, alphas_cumprod = schedule_from_spec(toy_spec())
    np.testing.assert_array_equal(betas, io["schedule.betas"])
    np.testing.assert_array_equal(alphas_cumprod, io["schedule.alphas_cumprod"])


def test_schedule_known_answers() -> None:
    betas, alphas_cumprod = schedule_from_spec(toy_spec())
    known = {
        0: (0.999899983, 9.99999975e-05),
        1: (0.999780059, 0.000119919918),
        99: (0.897017956, 0.00207207212),
        249: (0.524085343, 0.00506005995),
        499: (0.078587234, 0.0100400401),
        980: (5.90375203e-05, 0.0196215212),
        999: (4.03583035e-05, 0.0199999996),
    }
    for t, (alpha_bar, beta) in known.items():
        assert alphas_cumprod[t] == pytest.approx(alpha_bar, rel=1e-7)
        assert betas[t] == pytest.approx(beta, rel=1e-7)


def test_cosine_schedule_matches_training_schedules() -> None:
    pytest.importorskip("torch")
    schedules = pytest.importorskip("training.schedules")
    ref = schedules.make_schedule(1000, "cosine")
    betas, alphas_cumprod = schedule_from_spec(toy_spec(beta_schedule="cosine"))
    np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=0, atol=1e-7)
    np.testing.assert_allclose(alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=0)
    assert betas.min() >= np.float32(1e-4) and betas.max() <= np.float32(0.9999)


def test_leading_timesteps() -> None:
    assert ddim_timesteps(1000, 10).tolist() == list(range(900, -1, -100))
    assert ddim_timesteps(1000, 20).tolist()[:3] == [950, 900, 850]
    fifty = ddim_timesteps(1000, 50)
    assert len(fifty) == 50 and fifty[0] == 980 and fifty[-1] == 0
    assert ddim_timesteps(1000, 3).tolist() == [666, 333, 0]  # diffusers: exactly S steps
    assert ddim_timesteps(1000, 1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0)


def test_bad_specs_are_rejected_with_the_option_named() -> None:
    with pytest.raises(ValueError, match="kind"):
        schedule_from_spec(SamplerSpec(kind="prior_gaussian", latent_dim=4))
    with pytest.raises(ValueError, match="beta_start"):
        schedule_from_spec(toy_spec(beta_start=None))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        schedule_from_spec(toy_spec(num_train_timesteps=None))
    with pytest.raises(ValueError, match="image_shape"):
        ContinuousDdimSampler(SamplerSpec(**LINEAR), toy_eps, max_batch_size=4, model="m", version="1")
