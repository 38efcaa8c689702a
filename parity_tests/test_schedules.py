"""Beta schedules and every derived coefficient: reference buffers vs the Flax Schedule, <= 1e-7 absolute."""

import math

import numpy as np
import pytest

import ddpm_torch
from ddpm_jax import schedules
from ddpm_torch import DiffusionModel
from parity_tests.conftest import check

COEFFICIENTS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_recip_alphas",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "posterior_variance",
)
TIMESTEPS = (1, 2, 10, 50, 100, 1000)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_betas_float64(name, timesteps):
    reference = getattr(ddpm_torch, f"{name}_beta_schedule")(timesteps).numpy()
    ours = schedules.SCHEDULES[name](timesteps)
    assert ours.dtype == np.float64 and ours.shape == (timesteps,)
    check("schedule betas (float64)", ours, reference, 1e-7)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("timesteps", TIMESTEPS)
def test_coefficients_match_reference_buffers(name, timesteps):
    reference = DiffusionModel(ddpm_torch.TwoResUNet(8, dim_mults=(1,)), 8, beta_scheduler=name, timesteps=timesteps)
    ours = schedules.make_schedule(name, timesteps)
    assert ours.num_timesteps == timesteps
    for field in COEFFICIENTS:
        value = np.asarray(getattr(ours, field))
        assert value.dtype == np.float32, field
        # Linear schedules with T <= 20 have betas >= 1: both sides must produce the same NaNs there.
        check("schedule coefficients", value, getattr(reference, field).numpy(), 1e-7)


def test_linear_endpoints_are_the_papers():
    betas = schedules.linear_beta_schedule(1000)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15) and betas[-1] == pytest.approx(0.02, abs=1e-15)


def test_cosine_follows_closed_form():
    """Nichol & Dhariwal's alpha_bar(t) = f(t)/f(0), f(t) = cos((t/T + s)/(1 + s) * pi/2)^2, where unclipped."""
    T, s = 1000, 0.008
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = np.array([f[t + 1] / f[0] for t in range(T)])
    betas = schedules.cosine_beta_schedule(T, s)
    unclipped = betas < 0.999
    np.testing.assert_allclose(np.cumprod(1 - betas)[unclipped], expected[unclipped], rtol=1e-10)


def test_unknown_schedule_names_the_choices():
    with pytest.raises(ValueError, match="cosine"):
        schedules.make_schedule("quadratic", 10)
