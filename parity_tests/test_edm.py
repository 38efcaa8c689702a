"""The EDM family (Karras et al. 2022) against the paper and an implementation nobody here wrote.

- Table 1's preconditioning (c_skip, c_out, c_in, c_noise), the loss weight lambda(sigma), the training loss and
  eq. 5's noise levels against float64 formulas written here from the paper; the noise levels also against
  diffusers' EDMEulerScheduler.
- The samplers pathwise, with the same x_T and the same churn noise, in float32: Euler (with and without churn)
  against diffusers' EDMEulerScheduler (sigma_schedule="karras"), and Heun against Algorithm 2 written out here
  in float64.

The stand-in for the network makes the preconditioned denoiser exact for Gaussian data N(0, s^2), s = 0.3 (not
sigma_data, so that F is not zero): D(x; sigma) = s^2 / (s^2 + sigma^2) x, so F(c_in x; c_noise) = (D - c_skip x)
/ c_out is linear in its input, and the stand-in reads sigma back from c_noise.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddpm_jax import diffusion, schedules
from parity_tests.conftest import check, nchw, nhwc, replayed

SIGMA_DATA, DATA_STD = 0.5, 0.3
SHAPE = (2, 8, 8, 3)  # BHWC
PAPER_CHURN = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)  # Table 5, ImageNet-64


def _gain(sigma):
    """F = gain(sigma) * (c_in x) makes D(x; sigma) = c_skip x + c_out F exact for N(0, DATA_STD^2) data."""
    exact = DATA_STD**2 / (DATA_STD**2 + sigma**2)
    c_skip = SIGMA_DATA**2 / (sigma**2 + SIGMA_DATA**2)
    return (exact - c_skip) * (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA)


@partial(jax.jit, static_argnames="settings")
def _sample(key, *, settings):
    def network(x_in, c_noise_B):  # sigma from c_noise = c_noise_scale * ln(sigma) / 4
        sigma = jnp.exp(4 * c_noise_B / settings.edm.c_noise_scale)
        return _gain(sigma)[:, None, None, None] * x_in

    schedule = schedules.make_schedule("linear", 1000)  # EDM's samplers have no use for it
    return diffusion.sample_loop(network, schedule, key, SHAPE, settings)


def test_preconditioning_and_loss_weight_match_table_1():
    sigma = np.geomspace(0.002, 80.0, 101)
    total = sigma**2 + SIGMA_DATA**2
    c_skip, c_out, c_in = diffusion.edm_preconditioning(jnp.asarray(sigma, jnp.float32), SIGMA_DATA)
    check("edm c_skip vs Table 1 (float64)", c_skip, SIGMA_DATA**2 / total, 1e-6, "rel")
    check("edm c_out vs Table 1 (float64)", c_out, sigma * SIGMA_DATA / np.sqrt(total), 1e-6, "rel")
    check("edm c_in vs Table 1 (float64)", c_in, 1 / np.sqrt(total), 1e-6, "rel")
    for scale in (1.0, 250.0):
        c_noise = diffusion.edm_c_noise(jnp.asarray(sigma, jnp.float32), diffusion.EDM(c_noise_scale=scale))
        check("edm c_noise vs Table 1 (float64)", c_noise, scale * np.log(sigma) / 4, 1e-6, "rel")
    weight = diffusion.edm_loss_weight(jnp.asarray(sigma, jnp.float32), SIGMA_DATA)
    check("edm loss weight vs Table 1 (float64)", weight, total / (sigma * SIGMA_DATA) ** 2, 1e-6, "rel")


def test_training_loss_matches_the_paper_in_float64():
    """Eq. 2 with lambda(sigma): ln sigma ~ N(P_mean, P_std^2), n ~ N(0, sigma^2), lambda (D(y + n) - y)^2,
    the draws replayed from the key as the loss splits it (sigma first, then the noise)."""
    edm = diffusion.EDM(SIGMA_DATA, -1.2, 1.2, 1.0)
    x0 = np.asarray(jax.random.uniform(jax.random.key(3), SHAPE, jnp.float32, -1, 1))
    key = jax.random.key(4)

    def network(x_in, c_noise_B):
        return _gain(jnp.exp(4 * c_noise_B))[:, None, None, None] * x_in + 0.1  # not exact: a loss > 0

    ours = float(jax.jit(lambda x, k: diffusion.edm_training_loss(network, x, k, edm))(jnp.asarray(x0), key))
    sigma_key, noise_key = jax.random.split(key)
    sigma = np.exp(-1.2 + 1.2 * np.asarray(jax.random.normal(sigma_key, SHAPE[:1]), np.float64))
    noise = np.asarray(jax.random.normal(noise_key, SHAPE), np.float64)
    x = x0 + sigma[:, None, None, None] * noise
    s = sigma[:, None, None, None]
    total = s**2 + SIGMA_DATA**2
    denoised = SIGMA_DATA**2 / total * x + s * SIGMA_DATA / np.sqrt(total) * (_gain(s) * x / np.sqrt(total) + 0.1)
    weight = (sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2
    exact = np.mean(weight * np.mean((denoised - x0) ** 2, axis=(1, 2, 3)))
    check("edm training loss vs the paper (float64)", ours, exact, 1e-6, "rel")


@pytest.mark.parametrize("steps", [2, 10, 18, 40])
def test_noise_levels_match_eq_5_and_diffusers(steps):
    from diffusers import EDMEulerScheduler

    ours = diffusion.karras_sigmas(steps, 0.002, 80.0, 7.0)
    i = np.arange(steps)
    exact = np.append((80.0 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7, 0.0)
    check("karras sigmas vs eq. 5 (float64)", ours, exact, 1e-12, "rel")
    reference = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA, sigma_schedule="karras")
    reference.set_timesteps(steps)
    check("karras sigmas vs diffusers", np.float32(ours), reference.sigmas.numpy(), 1e-6, "rel")


def _gamma(sigma, steps, s_churn, s_tmin, s_tmax):
    """Algorithm 2's gamma_i."""
    return min(s_churn / steps, np.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0


@pytest.mark.parametrize("steps,churn", [(18, {}), (18, PAPER_CHURN), (10, dict(s_churn=5.0))])
def test_euler_matches_diffusers_edm_euler(steps, churn, monkeypatch):
    """diffusers' EDMEulerScheduler with the same x_T and churn noise. Its pipelines call the network before
    step() raises sigma to sigma_hat; Algorithm 2 calls it at (x_hat, sigma_hat), so here the network's output is
    computed there and handed to step(), which adds the same noise and takes the same Euler step."""
    from diffusers import EDMEulerScheduler
    from diffusers.schedulers import scheduling_edm_euler

    settings = diffusion.sampler_settings("euler", timesteps=1000, steps=steps, prediction="edm",
                                          edm=diffusion.EDM(sigma_data=SIGMA_DATA), **churn)
    key = jax.random.key(21)
    ours = np.asarray(_sample(key, settings=settings))

    reference = EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=SIGMA_DATA, sigma_schedule="karras",
                                  rho=7.0, prediction_type="epsilon")
    reference.set_timesteps(steps)
    reference.is_scale_input_called = True  # the network's input is scaled below, at sigma_hat
    x_T, noises = replayed(key, range(steps), SHAPE)
    x = torch.from_numpy(nchw(x_T * 80.0).copy())  # Algorithm 2's x_0 ~ N(0, sigma_max^2)
    options = {k: churn.get(k, v) for k, v in dict(s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0).items()}
    for i, t in enumerate(reference.timesteps):
        sigma = float(reference.sigmas[i])
        sigma_hat = sigma * (1 + _gamma(sigma, steps, options["s_churn"], options["s_tmin"], options["s_tmax"]))
        noise = torch.from_numpy(nchw(noises[i]).copy())
        monkeypatch.setattr(scheduling_edm_euler, "randn_tensor", lambda *a, noise=noise, **k: noise)
        x_hat = x + noise * options["s_noise"] * (sigma_hat**2 - sigma**2) ** 0.5
        output = float(_gain(sigma_hat)) * reference.precondition_inputs(x_hat, torch.tensor(sigma_hat))
        x = reference.step(output, t, x, **options).prev_sample
    theirs = nhwc((x + 1) * 0.5)
    assert 0.05 < np.abs(theirs - 0.5).max() < 5, "the chain left image range; the tolerance would not mean much"
    check(f"edm euler{' churn' if churn else ''} vs diffusers EDMEulerScheduler", ours, theirs, 1e-5)


def _float64_algorithm_2(x_T, noises, steps, s_churn=0.0, s_tmin=0.0, s_tmax=float("inf"), s_noise=1.0):
    """Algorithm 2 of the paper (Heun, churn), in float64, with the exact denoiser."""
    i = np.arange(steps)
    t = np.append((80.0 ** (1 / 7) + i / (steps - 1) * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7, 0.0)

    def denoise(x, sigma):
        return DATA_STD**2 / (DATA_STD**2 + sigma**2) * x

    x = x_T.astype(np.float64) * t[0]
    for i in range(steps):
        gamma = _gamma(t[i], steps, s_churn, s_tmin, s_tmax)
        t_hat = t[i] + gamma * t[i]
        x_hat = x + np.sqrt(t_hat**2 - t[i] ** 2) * s_noise * noises[i]
        d = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x = x_hat + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_next = (x - denoise(x, t[i + 1])) / t[i + 1]
            x = x_hat + (t[i + 1] - t_hat) * (0.5 * d + 0.5 * d_next)
    return (x + 1) * 0.5


@pytest.mark.parametrize("steps,churn,scale", [(18, {}, 1.0), (18, PAPER_CHURN, 1.0), (10, {}, 250.0),
                                               (5, dict(s_churn=2.0), 250.0)])
def test_heun_matches_algorithm_2_in_float64(steps, churn, scale):
    settings = diffusion.sampler_settings("heun", timesteps=1000, steps=steps, prediction="edm",
                                          edm=diffusion.EDM(sigma_data=SIGMA_DATA, c_noise_scale=scale), **churn)
    assert diffusion.SAMPLERS["heun"].network_calls(steps) == 2 * steps - 1
    key = jax.random.key(22)
    ours = np.asarray(_sample(key, settings=settings))
    x_T, noises = replayed(key, range(steps), SHAPE)
    exact = _float64_algorithm_2(x_T, noises.astype(np.float64), steps, **churn)
    assert 0.05 < np.abs(exact - 0.5).max() < 5, "the chain left image range; the tolerance would not mean much"
    check(f"edm heun{' churn' if churn else ''} vs Algorithm 2 (float64)", ours, exact, 1e-5)
