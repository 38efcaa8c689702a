"""The samplers against an implementation nobody here wrote: diffusers' DPMSolverMultistepScheduler, DDPMScheduler
and DDIMScheduler, for each prediction target (diffusers' prediction_type epsilon, sample, v_prediction).

Same x_T, same per-step noise, float32, and a stand-in for the network whose output is known in closed form and
keeps x bounded over a whole chain: the exact prediction for Gaussian data N(0, s^2), which is linear in x for
each target: eps(x, t) = sqrt(1 - abar_t) x / (abar_t s^2 + 1 - abar_t), x0(x, t) = sqrt(abar_t) s^2 x /
(abar_t s^2 + 1 - abar_t), and v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0. x_0 is clipped as diffusers'
defaults do: not by its DPM-Solver (ours runs with clip_denoised=False here), by its DDIM (as ours), not by DDPM
(the article's).

Linear schedule: within 1e-5 of diffusers. Cosine schedule: its last abar is ~1e-9,
and diffusers' float32 abar and sigma lose digits there: its result is up to 1.7e-4 from the same solver
evaluated in float64, where ours stays within 1e-5 of it. So on cosine, ours must be within 1e-5 of the
float64 solver (written out below from diffusers' update formulas; the three targets are the same function of x
there) and no further from diffusers than diffusers itself is from float64, plus 1e-5.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from ddpm_jax import diffusion, schedules
from parity_tests.conftest import check, nchw, nhwc, replayed

DATA_STD = 0.5
SHAPE = (2, 8, 8, 3)  # BHWC


@partial(jax.jit, static_argnames=("settings", "clip"))
def _sample(schedule, coefficient_T, key, *, settings, clip):
    """The JAX sampler with output(x, t) = coefficient[t] x; linear and cosine share one compiled program."""
    def network(x, t_B):
        return coefficient_T[t_B][:, None, None, None] * x

    return diffusion.sample_loop(network, schedule, key, SHAPE, settings, clip_denoised=clip)


def _coefficient(abar_T: np.ndarray, prediction: str = "eps") -> np.ndarray:
    """output(x, t) = coefficient[t] * x: the exact prediction of N(0, DATA_STD^2) data's noise, x_0 or v
    (float64)."""
    eps = np.sqrt(1 - abar_T) / (abar_T * DATA_STD**2 + 1 - abar_T)
    x0 = np.sqrt(abar_T) * DATA_STD**2 / (abar_T * DATA_STD**2 + 1 - abar_T)
    return {"eps": eps, "x0": x0, "v": np.sqrt(abar_T) * eps - np.sqrt(1 - abar_T) * x0}[prediction]


def _name(sampler: str, prediction: str) -> str:
    """The parity summary's name: the sampler, with diffusers' prediction_type where it is not epsilon."""
    return sampler if prediction == "eps" else f"{sampler} {diffusion.DIFFUSERS_PREDICTION_TYPES[prediction]}"


def _float64_solver(abar_T, times, x_T, noises, stochastic):
    """diffusers' multistep DPM-Solver++ (midpoint, lower order first and last, sigma 0 at the end) in float64."""
    coefficient, x, previous = _coefficient(abar_T), x_T.astype(np.float64), None
    alphas = np.sqrt(np.append(abar_T[times], 1.0))
    sigmas = np.sqrt(np.append(1.0 - abar_T[times], 0.0))
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas)
    for i, t in enumerate(times):
        m0 = (x - sigmas[i] * coefficient[t] * x) / alphas[i]
        h = lambdas[i + 1] - lambdas[i]
        first_order = i == 0 or i == len(times) - 1
        d = m0 if first_order else m0 + 0.5 * (m0 - previous) / ((lambdas[i] - lambdas[i - 1]) / h)
        if stochastic:
            x = (sigmas[i + 1] / sigmas[i] * np.exp(-h)) * x + alphas[i + 1] * (1 - np.exp(-2 * h)) * d + (
                sigmas[i + 1] * np.sqrt(1 - np.exp(-2 * h)) * noises[i])
        else:
            x = (sigmas[i + 1] / sigmas[i]) * x - alphas[i + 1] * (np.exp(-h) - 1) * d
        previous = m0
    return (x + 1) * 0.5


@pytest.mark.parametrize("schedule_name,steps,spacing,prediction", [
    *((name, steps, "linspace", "eps") for name in ("linear", "cosine") for steps in (10, 20, 50)),
    ("linear", 20, "leading", "eps"), ("linear", 20, "trailing", "eps"),
    *((name, 20, "linspace", prediction) for name in ("linear", "cosine") for prediction in ("x0", "v"))])
@pytest.mark.parametrize("algorithm", ["dpmsolver++", "sde-dpmsolver++"])
def test_dpm_solver_matches_diffusers(schedule_name, algorithm, steps, spacing, prediction):
    """Every step count on both schedules with diffusers' default spacing; the other spacings and the other
    targets at 20 steps."""
    schedule = schedules.make_schedule(schedule_name, 1000)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    coefficient = _coefficient(abar, prediction)
    key = jax.random.key(11)
    settings = diffusion.sampler_settings(algorithm, timesteps=1000, steps=steps, spacing=spacing,
                                          prediction=prediction)
    ours = np.asarray(_sample(schedule, jnp.asarray(coefficient, jnp.float32), key, settings=settings, clip=False))

    reference = DPMSolverMultistepScheduler(num_train_timesteps=1000, trained_betas=np.asarray(schedule.betas),
                                            algorithm_type=algorithm, timestep_spacing=spacing,
                                            prediction_type=diffusion.DIFFUSERS_PREDICTION_TYPES[prediction])
    reference.set_timesteps(steps)
    times = diffusion.dpm_solver_timesteps(1000, steps, spacing)
    np.testing.assert_array_equal(reference.timesteps.numpy(), times)
    x_T, noises = replayed(key, times, SHAPE)
    x = torch.from_numpy(nchw(x_T).copy())
    for t, noise in zip(times.tolist(), noises):
        output = float(np.float32(coefficient[t])) * x
        x = reference.step(output, t, x, variance_noise=torch.from_numpy(nchw(noise).copy())).prev_sample
    theirs = nhwc((x + 1) * 0.5)
    assert 0.05 < np.abs(theirs - 0.5).max() < 5, "the chain left image range; the tolerance would not mean much"
    name = _name(algorithm, prediction)
    if schedule_name == "linear":
        check(f"{name} vs diffusers (linear)", ours, theirs, 1e-5)
    else:
        exact = _float64_solver(abar, times, x_T, noises, algorithm.startswith("sde"))
        check(f"{name} vs float64 (cosine)", ours, exact, 1e-5)
        # How much further ours is from diffusers than diffusers is from the float64 answer (0 if not further).
        beyond = max(0.0, float(np.abs(ours - theirs).max()) - float(np.abs(theirs - exact).max()))
        check(f"{name} vs diffusers (cosine), beyond diffusers' float32 error", beyond, 0.0, 1e-5)


def _float64_ddpm_ddim(abar_T, times, x_T, noises, eta, clip):
    """DDPM (times T-1..0, eta None) or DDIM (eq. 12, x_0 clipped and eps recomputed) in float64."""
    coefficient, x = _coefficient(abar_T), x_T.astype(np.float64)
    betas = 1 - abar_T / np.append(1.0, abar_T[:-1])
    for i, t in enumerate(times):
        eps = coefficient[t] * x
        if eta is None:  # DDPM, fixed_small variance, no clipping (the article's p_sample)
            mean = (x - betas[t] * eps / np.sqrt(1 - abar_T[t])) / np.sqrt(1 - betas[t])
            variance = betas[t] * (1 - (abar_T[t - 1] if t else 1.0)) / (1 - abar_T[t])
            x = mean + (np.sqrt(variance) * noises[i] if t else 0.0)
            continue
        x0 = (x - np.sqrt(1 - abar_T[t]) * eps) / np.sqrt(abar_T[t])
        if clip:
            x0 = np.clip(x0, -1, 1)
            eps = (x - np.sqrt(abar_T[t]) * x0) / np.sqrt(1 - abar_T[t])
        prev = abar_T[times[i + 1]] if i + 1 < len(times) else 1.0
        sigma = eta * np.sqrt((1 - abar_T[t] / prev) * (1 - prev) / (1 - abar_T[t]))
        x = np.sqrt(prev) * x0 + np.sqrt(1 - prev - sigma**2) * eps + sigma * noises[i]
    return (x + 1) * 0.5


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("sampler,eta,steps", [("ddpm", None, 100), ("ddim", 0.0, 50), ("ddim", 1.0, 50)])
@pytest.mark.parametrize("prediction", diffusion.DDPM_PREDICTIONS)
def test_ddpm_and_ddim_match_diffusers(schedule_name, sampler, eta, steps, prediction, monkeypatch):
    """DDPMScheduler (fixed_small, no clipping, as the article's p_sample) and DDIMScheduler ("trailing" times,
    which are ours; x_0 clipped and eps recomputed from it, as ours). DDPM runs every step of a T = 100 schedule
    (the linear one scaled as the article scales it; the cosine one also ends at beta 0.999), DDIM 50 of T = 1000."""
    from diffusers import DDIMScheduler, DDPMScheduler
    from diffusers.schedulers import scheduling_ddpm

    T = steps if sampler == "ddpm" else 1000
    schedule = schedules.make_schedule(schedule_name, T)
    abar = np.asarray(schedule.alphas_cumprod, np.float64)
    coefficient = _coefficient(abar, prediction)
    key = jax.random.key(12)
    settings = diffusion.sampler_settings(sampler, timesteps=T, steps=steps, eta=eta or 0.0, prediction=prediction)
    ours = np.asarray(_sample(schedule, jnp.asarray(coefficient, jnp.float32), key, settings=settings, clip=True))

    betas, prediction_type = np.asarray(schedule.betas), diffusion.DIFFUSERS_PREDICTION_TYPES[prediction]
    if sampler == "ddpm":
        reference = DDPMScheduler(num_train_timesteps=T, trained_betas=betas, clip_sample=False,
                                  prediction_type=prediction_type)
    else:
        reference = DDIMScheduler(num_train_timesteps=T, trained_betas=betas, timestep_spacing="trailing",
                                  prediction_type=prediction_type)
    reference.set_timesteps(steps)
    times = reference.timesteps.numpy()
    expected_times = np.arange(T - 1, -1, -1) if sampler == "ddpm" else np.asarray(diffusion.ddim_timesteps(T, steps))
    np.testing.assert_array_equal(times, expected_times[:steps])
    x_T, noises = replayed(key, times, SHAPE)
    x = torch.from_numpy(nchw(x_T).copy())
    for t, noise in zip(times.tolist(), noises):
        output = float(np.float32(coefficient[t])) * x
        noise_NCHW = torch.from_numpy(nchw(noise).copy())
        if sampler == "ddpm":  # DDPMScheduler draws its own noise: hand it ours
            monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, noise=noise_NCHW, **k: noise)
            x = reference.step(output, t, x).prev_sample
        else:
            x = reference.step(output, t, x, eta=eta, use_clipped_model_output=True,
                               variance_noise=noise_NCHW).prev_sample
    theirs = nhwc((x + 1) * 0.5)
    assert 0.05 < np.abs(theirs - 0.5).max() < 5, "the chain left image range; the tolerance would not mean much"
    name = _name(f"{sampler}{'' if eta is None else f' eta={eta:g}'}", prediction)
    tolerance = 1e-5
    if schedule_name == "linear":
        check(f"{name} vs diffusers (linear)", ours, theirs, tolerance)
    else:
        exact = _float64_ddpm_ddim(abar, times, x_T, noises, eta, clip=True)
        check(f"{name} vs float64 (cosine)", ours, exact, tolerance)
        beyond = max(0.0, float(np.abs(ours - theirs).max()) - float(np.abs(theirs - exact).max()))
        check(f"{name} vs diffusers (cosine), beyond diffusers' float32 error", beyond, 0.0, 1e-5)
