"""Reverse steps with shared noise: single DDPM/DDIM steps <= 1e-5, chains and whole samplers <= 1e-4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ddpm_jax import diffusion, schedules
from ddpm_torch import DiffusionModel
from parity_tests.conftest import check, nchw, nhwc

T = 1000


@pytest.fixture(scope="module")
def setup(tiny_pair):
    torch_model, flax_model = tiny_pair
    reference = DiffusionModel(torch_model, 16, timesteps=T)
    return reference, flax_model, schedules.make_schedule("linear", T)


def _x_and_noise(seed):
    """Batch 3 at 16 px, the shapes of the gradient and forward tests: their eager ops are compiled already."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 3, 16, 16, generator=g), torch.randn(3, 3, 16, 16, generator=g)


def _eps(flax_model, x, t):
    return flax_model(x, jnp.full(x.shape[:1], t, dtype=jnp.int32))


@pytest.mark.parametrize("t", [0, 500, T - 1])
def test_ddpm_step(setup, t):
    reference, flax_model, schedule = setup
    x, noise = _x_and_noise(t)
    expected = reference.p_sample(x, t, noise=noise).numpy()
    xj = jnp.asarray(nhwc(x))
    ours = diffusion.ddpm_step(schedule, _eps(flax_model, xj, t), xj, t, jnp.asarray(nhwc(noise)))
    check("DDPM step", nchw(ours), expected, 1e-5)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("t,t_prev", [(999, 979), (500, 250), (20, -1)])
def test_ddim_step(setup, eta, t, t_prev):
    reference, flax_model, schedule = setup
    x, noise = _x_and_noise(t + 1)
    expected = reference.ddim_step(x, t, t_prev, eta, noise=noise).numpy()
    xj = jnp.asarray(nhwc(x))
    x0, eps = diffusion.predict("eps", _eps(flax_model, xj, t), xj, *diffusion.ddim_alpha_sigma(schedule, t))
    ours = diffusion.ddim_step(schedule, x0, eps, xj, t, t_prev, eta, jnp.asarray(nhwc(noise)))
    check(f"DDIM step eta={eta:g}", nchw(ours), expected, 1e-5)


def test_chained_ddpm_steps(setup):
    """25 consecutive steps from t = 24 down to 0 with the same noise fed to both."""
    reference, flax_model, schedule = setup
    x, _ = _x_and_noise(11)
    g = torch.Generator().manual_seed(12)
    noises = [torch.randn(3, 3, 16, 16, generator=g) for _ in range(25)]
    xt, xj = x, jnp.asarray(nhwc(x))
    step = jax.jit(lambda x, t, n: diffusion.ddpm_step(schedule, _eps(flax_model, x, t), x, t, n))
    for t, noise in zip(range(24, -1, -1), noises):
        xt = reference.p_sample(xt, t, noise=noise)
        xj = step(xj, t, jnp.asarray(nhwc(noise)))
    assert np.abs(xt.numpy()).max() > 0.1
    check("25 chained DDPM steps", nchw(xj), xt.numpy(), 1e-4)


def _replay_noise(key, shape_nhwc, times):
    """The noise the Flax sampler draws: x_T from the first half of split(key), step t from fold_in(second, t)."""
    init_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape_nhwc, jnp.float32)
    steps = {int(t): jax.random.normal(jax.random.fold_in(step_key, int(t)), shape_nhwc, jnp.float32) for t in times}
    return torch.from_numpy(nchw(x_T).copy()), {t: torch.from_numpy(nchw(n).copy()) for t, n in steps.items()}


class _TorchNearOracle(torch.nn.Module):
    """eps = x / sqrt(1 - abar_t) + 0.1 * unet(x, t): the exact noise for data concentrated at 0, plus the
    network. An untrained U-Net alone drives x to |x| ~ 1e3 over a whole chain, where float32 spacing
    alone is ~1e-4; this keeps the chain in image range so that 1e-4 absolute means what it says."""

    def __init__(self, unet, sqrt_one_minus_alphas_cumprod):
        super().__init__()
        self.unet, self.channels, self.s = unet, unet.channels, sqrt_one_minus_alphas_cumprod

    def forward(self, x, t):
        return x / self.s[t][:, None, None, None] + 0.1 * self.unet(x, t)


class _FlaxNearOracle(nnx.Module):
    def __init__(self, unet, sqrt_one_minus_alphas_cumprod):
        self.unet, self.channels, self.s = unet, unet.channels, sqrt_one_minus_alphas_cumprod

    def __call__(self, x, t):
        return x / self.s[t][:, None, None, None] + 0.1 * self.unet(x, t)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_whole_sampler_matches_reference_loop(tiny_pair, sampler):
    """The one-program lax.scan sampler equals the reference's step-by-step loop fed the same noise."""
    torch_model, flax_model = tiny_pair
    timesteps, steps, eta = 100, 10, 0.5
    schedule = schedules.make_schedule("linear", timesteps)
    reference = DiffusionModel(torch_model, 16, beta_scheduler="linear", timesteps=timesteps)
    reference.model = _TorchNearOracle(torch_model, reference.sqrt_one_minus_alphas_cumprod)
    key = jax.random.key(5)
    flax_oracle = _FlaxNearOracle(flax_model, schedule.sqrt_one_minus_alphas_cumprod)
    settings = diffusion.sampler_settings(sampler, timesteps=timesteps, steps=steps, eta=eta)
    ours = diffusion.sample(flax_oracle, schedule, key, 2, 16, settings)
    if sampler == "ddpm":
        pairs = [(t, t - 1) for t in range(timesteps - 1, -1, -1)]
    else:
        times = [int(t) for t in diffusion.ddim_timesteps(timesteps, steps)]
        pairs = list(zip(times[:-1], times[1:]))
    x, noises = _replay_noise(key, (2, 16, 16, 3), [t for t, _ in pairs])
    for t, t_prev in pairs:
        if sampler == "ddpm":
            x = reference.p_sample(x, t, noise=noises[t])
        else:
            x = reference.ddim_step(x, t, t_prev, eta, noise=noises[t])
    expected = reference.unnormalize(x).numpy()
    assert 0.1 < np.abs(expected).max() < 10, "the chain left image range; the tolerance would not mean much"
    check(f"whole {sampler} sampler (scan)", nchw(ours), expected, 1e-4)
