"""Pure diffusion math: the training objectives, DDPM, DDIM, DPM-Solver++ and EDM steps, and the samplers as one
registry, each run as one compiled scan.

Every function takes the Schedule pytree and explicit arrays or keys, so all of it jit-compiles. The model is any
callable `output_BHWC = model(x_BHWC, t_B)`. Two families:
- DDPM (the article's): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps at integer t, and the output predicts one
  target: the noise (eps, the article's), x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022).
  `predict` is the one place that turns an output into estimates of x_0 and of the noise.
- EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"): x = x_0 + sigma
  eps at continuous sigma, and the network is preconditioned into the denoiser D(x; sigma) = c_skip x + c_out
  F(c_in x; c_noise) (`edm_denoise`), with t_B = c_noise.
`family(prediction)` says which a model belongs to; the samplers use the estimates only.
"""

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The targets, losses and EDM's constants are plain data, in objectives.py, which config.py reads without jax.
from ddpm_jax.objectives import (DDPM_PREDICTIONS, DIFFUSERS_PREDICTION_TYPES, EDM, LOSS_WEIGHTS, LOSSES, PREDICTIONS,
                                 Objective, family)
from ddpm_jax.schedules import Schedule

SPACINGS = ("linspace", "leading", "trailing")  # diffusers' timestep_spacing, for DPM-Solver++


def _extract(a_T, t_B, ndim):
    """a[t] per batch element, shaped to broadcast against an array of rank `ndim`."""
    return a_T[t_B].reshape((-1,) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------------------
# Training: what the network learns.


def q_sample(schedule: Schedule, x0_BHWC, t_B, noise_BHWC):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (
        _extract(schedule.sqrt_alphas_cumprod, t_B, x0_BHWC.ndim) * x0_BHWC
        + _extract(schedule.sqrt_one_minus_alphas_cumprod, t_B, x0_BHWC.ndim) * noise_BHWC
    )


def velocity(schedule: Schedule, x0_BHWC, t_B, noise_BHWC):
    """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, as diffusers' `get_velocity`."""
    return (
        _extract(schedule.sqrt_alphas_cumprod, t_B, x0_BHWC.ndim) * noise_BHWC
        - _extract(schedule.sqrt_one_minus_alphas_cumprod, t_B, x0_BHWC.ndim) * x0_BHWC
    )


def target(schedule: Schedule, prediction: str, x0_BHWC, t_B, noise_BHWC):
    """What a network of `prediction` is trained to output for x_t = q_sample(x0, t, noise)."""
    if prediction == "eps":
        return noise_BHWC
    if prediction == "x0":
        return x0_BHWC
    if prediction == "v":
        return velocity(schedule, x0_BHWC, t_B, noise_BHWC)
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {DDPM_PREDICTIONS}")


def predict(prediction: str, output, x, alpha, sigma):
    """(x0, eps): the estimates of x_0 and of the noise in x = alpha x_0 + sigma eps that a network of
    `prediction` gives with `output`; alpha and sigma broadcast against x."""
    if prediction == "eps":
        return (x - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x - alpha * output) / sigma
    if prediction == "v":
        return alpha * x - sigma * output, sigma * x + alpha * output
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {DDPM_PREDICTIONS}")


def snr(schedule: Schedule, t_B):
    """The signal-to-noise ratio abar_t / (1 - abar_t), from the schedule's square roots (derived in float64, so
    1 - abar keeps its digits near t = 0)."""
    return (schedule.sqrt_alphas_cumprod[t_B] / schedule.sqrt_one_minus_alphas_cumprod[t_B]) ** 2


def loss_weights(schedule: Schedule, t_B, objective: Objective):
    """Per-sample weights of the loss: 1, or min-SNR-gamma's as lucidrains and diffusers apply them per target:
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v (each the same
    weight on the noise's squared error)."""
    if objective.loss_weight == "none":
        return jnp.ones(t_B.shape, jnp.float32)
    if objective.loss_weight != "min-snr":
        raise ValueError(f"unknown loss weight {objective.loss_weight!r}; expected one of {LOSS_WEIGHTS}")
    ratio = snr(schedule, t_B)
    clipped = jnp.minimum(ratio, objective.snr_gamma)
    divisor = {"eps": ratio, "x0": 1.0, "v": ratio + 1.0}.get(objective.prediction)
    if divisor is None:
        raise ValueError(f"unknown prediction {objective.prediction!r}; expected one of {DDPM_PREDICTIONS}")
    return clipped / divisor


def p_loss(model, schedule: Schedule, x0_BHWC, t_B, noise_BHWC, objective: Objective = Objective()):
    """The loss of `model` on x_t = q_sample(x0, t, noise): the mean l2 (or l1) between its output and the
    objective's target, each sample's mean weighted by `loss_weights` where the objective weights."""
    output = model(q_sample(schedule, x0_BHWC, t_B, noise_BHWC), t_B)
    diff = target(schedule, objective.prediction, x0_BHWC, t_B, noise_BHWC) - output.astype(noise_BHWC.dtype)
    if objective.loss == "l2":
        errors = diff**2
    elif objective.loss == "l1":
        errors = jnp.abs(diff)
    else:
        raise ValueError(f"unknown loss type {objective.loss!r}; expected one of {LOSSES}")
    if objective.loss_weight == "none":
        return jnp.mean(errors)
    return jnp.mean(loss_weights(schedule, t_B, objective) * jnp.mean(errors, axis=tuple(range(1, errors.ndim))))


def training_noise(key, shape, dtype, offset_noise: float = 0.0):
    """Gaussian noise of `shape` (BHWC) and, with offset_noise S > 0, S times one more Gaussian value per image
    and channel added to it (lucidrains' offset_noise_strength), drawn from fold_in(key, 1)."""
    noise = jax.random.normal(key, shape, dtype)
    if offset_noise:
        offset_shape = (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],)
        noise = noise + offset_noise * jax.random.normal(jax.random.fold_in(key, 1), offset_shape, dtype)
    return noise


def training_loss(model, schedule: Schedule, x0_BHWC, key, objective: Objective = Objective()):
    """DDPM's Algorithm 1: one uniform t per sample and fresh training noise, both drawn from `key`; an EDM
    objective's loss (`edm_training_loss`, which has no use for the schedule) where the objective is edm."""
    if family(objective.prediction) == "edm":
        return edm_training_loss(model, x0_BHWC, key, objective.edm)
    t_key, noise_key = jax.random.split(key)
    t_B = jax.random.randint(t_key, x0_BHWC.shape[:1], 0, schedule.num_timesteps)
    noise = training_noise(noise_key, x0_BHWC.shape, x0_BHWC.dtype, objective.offset_noise)
    return p_loss(model, schedule, x0_BHWC, t_B, noise, objective)


# ----------------------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022): preconditioning, its training loss and its noise levels.


def edm_preconditioning(sigma, sigma_data: float):
    """(c_skip, c_out, c_in) of the paper's Table 1 at noise level sigma."""
    total = sigma**2 + sigma_data**2
    return sigma_data**2 / total, sigma * sigma_data / jnp.sqrt(total), 1.0 / jnp.sqrt(total)


def edm_c_noise(sigma, edm: EDM):
    """The U-Net's time input at sigma: c_noise_scale * ln(sigma) / 4 (the paper's c_noise times the scale)."""
    return edm.c_noise_scale * jnp.log(sigma) / 4


def edm_loss_weight(sigma, sigma_data: float):
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2, the paper's loss weight."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_denoise(model, x_BHWC, sigma_B, edm: EDM):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): the network as the EDM denoiser, one sigma per image."""
    sigma = sigma_B.reshape((-1,) + (1,) * (x_BHWC.ndim - 1))
    c_skip, c_out, c_in = edm_preconditioning(sigma, edm.sigma_data)
    output = model(c_in * x_BHWC, edm_c_noise(sigma_B, edm)).astype(x_BHWC.dtype)
    return c_skip * x_BHWC + c_out * output


def edm_training_loss(model, x0_BHWC, key, edm: EDM):
    """The paper's loss: ln(sigma) ~ N(p_mean, p_std^2) per sample, n ~ N(0, sigma^2), and the mean over the
    batch of lambda(sigma) times the mean over each image of (D(x_0 + n; sigma) - x_0)^2."""
    sigma_key, noise_key = jax.random.split(key)
    sigma_B = jnp.exp(edm.p_mean + edm.p_std * jax.random.normal(sigma_key, x0_BHWC.shape[:1], x0_BHWC.dtype))
    noise = jax.random.normal(noise_key, x0_BHWC.shape, x0_BHWC.dtype)
    denoised = edm_denoise(model, x0_BHWC + sigma_B[:, None, None, None] * noise, sigma_B, edm)
    errors = jnp.mean((denoised - x0_BHWC) ** 2, axis=tuple(range(1, x0_BHWC.ndim)))
    return jnp.mean(edm_loss_weight(sigma_B, edm.sigma_data) * errors)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> np.ndarray:
    """The paper's eq. 5: `steps` noise levels (sigma_max^(1/rho) + i / (steps - 1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho from sigma_max down to sigma_min, then 0 (float64; one level is sigma_max)."""
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return np.append((top + ramp * (bottom - top)) ** rho, 0.0)


# ----------------------------------------------------------------------------------------------------------
# Sampler steps, each checked against the article's code (DDPM, DDIM) or diffusers (DPM-Solver++).


def ddpm_step(schedule: Schedule, eps_BHWC, x_BHWC, t, noise_BHWC):
    """x_t -> x_{t-1} given the estimate of the noise; `t` is one (possibly traced) integer for the batch."""
    t_B = jnp.full(x_BHWC.shape[:1], t, dtype=jnp.int32)
    betas_t = _extract(schedule.betas, t_B, x_BHWC.ndim)
    sqrt_recip_alphas_t = _extract(schedule.sqrt_recip_alphas, t_B, x_BHWC.ndim)
    sqrt_one_minus_alphas_cumprod_t = _extract(schedule.sqrt_one_minus_alphas_cumprod, t_B, x_BHWC.ndim)
    predicted_mean = sqrt_recip_alphas_t * (x_BHWC - betas_t * eps_BHWC / sqrt_one_minus_alphas_cumprod_t)
    posterior_variance_t = _extract(schedule.posterior_variance, t_B, x_BHWC.ndim)
    return jnp.where(t == 0, predicted_mean, predicted_mean + jnp.sqrt(posterior_variance_t) * noise_BHWC)


def ddim_alpha_sigma(schedule: Schedule, t):
    """sqrt(abar_t) and sqrt(1 - abar_t) as the article's DDIM step computes them (in float32, from abar)."""
    alpha = schedule.alphas_cumprod[t]
    return jnp.sqrt(alpha), jnp.sqrt(1 - alpha)


def ddim_step(schedule: Schedule, x0_BHWC, eps_BHWC, x_BHWC, t, t_prev, eta, noise_BHWC, clip_denoised: bool = True):
    """DDIM (Song et al. 2021, eq. 12) from t to t_prev < t given the estimates of x_0 and of the noise at t
    (`predict`, with `ddim_alpha_sigma`); t_prev = -1 returns the estimate of x_0. clip_denoised clips it to
    [-1, 1] and takes the noise that the clipped estimate implies."""
    alpha = schedule.alphas_cumprod[t]
    if clip_denoised:
        x0_BHWC = jnp.clip(x0_BHWC, -1.0, 1.0)
        eps_BHWC = (x_BHWC - jnp.sqrt(alpha) * x0_BHWC) / jnp.sqrt(1 - alpha)
    alpha_next = schedule.alphas_cumprod[jnp.maximum(t_prev, 0)]
    sigma = eta * jnp.sqrt((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha))
    c = jnp.sqrt(1 - alpha_next - sigma**2)
    x_prev = x0_BHWC * jnp.sqrt(alpha_next) + c * eps_BHWC + sigma * noise_BHWC
    return jnp.where(t_prev < 0, x0_BHWC, x_prev)


def ddim_timesteps(num_timesteps: int, steps: int) -> jnp.ndarray:
    """Descending DDIM times ending at -1: floor(linspace(-1, T-1, steps+1)) reversed, in integer arithmetic."""
    return jnp.asarray([i * num_timesteps // steps - 1 for i in range(steps, -1, -1)], dtype=jnp.int32)


def dpm_solver_timesteps(num_timesteps: int, steps: int, spacing: str = "linspace") -> np.ndarray:
    """The `steps` descending times DPM-Solver++ visits, by diffusers' `timestep_spacing` (the solver then steps
    to sigma = 0): "linspace" round(linspace(0, T-1, steps+1)) reversed without its last (0); "leading"
    multiples of T // (steps+1) from the top one down, without 0; "trailing" round(arange(T, 0, -T/steps)) - 1."""
    if spacing == "linspace":
        times = np.linspace(0, num_timesteps - 1, steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        times = (np.arange(steps + 1) * (num_timesteps // (steps + 1)))[::-1][:-1]
    elif spacing == "trailing":
        times = np.arange(num_timesteps, 0, -num_timesteps / steps).round() - 1
    else:
        raise ValueError(f"--spacing {spacing}: expected one of {list(SPACINGS)}")
    return times.astype(np.int32)


def dpm_solver_step(x_BHWC, x0_BHWC, x0_prev_BHWC, alpha_t, sigma_t, sigma_s, h, h_prev, second_order, noise_BHWC,
                    stochastic: bool):
    """One multistep DPM-Solver++ step (Lu et al. 2022, "DPM-Solver++"; diffusers' midpoint form) from time s to
    time t in the data-prediction form: x0 is the model's estimate of x_0 at s, x0_prev the one at the step
    before. alpha, sigma are sqrt(abar), sqrt(1 - abar); h = lambda_t - lambda_s with lambda = log(alpha / sigma),
    h_prev the previous step's. First order (DDIM-like) where `second_order` is false. The stochastic form
    (SDE-DPM-Solver++) adds `noise_BHWC`; at sigma_t = 0 both return x0."""
    d1 = jnp.where(second_order, (x0_BHWC - x0_prev_BHWC) * (h / h_prev), 0.0)
    if stochastic:
        decay = jnp.exp(-2.0 * h)
        return ((sigma_t / sigma_s) * jnp.exp(-h) * x_BHWC + alpha_t * (1.0 - decay) * (x0_BHWC + 0.5 * d1)
                + sigma_t * jnp.sqrt(1.0 - decay) * noise_BHWC)
    return (sigma_t / sigma_s) * x_BHWC - alpha_t * jnp.expm1(-h) * (x0_BHWC + 0.5 * d1)


def _dpm_solver_coefficients(schedule: Schedule, steps: int, spacing: str):
    """Per step of DPM-Solver++ (as arrays over the steps): the time, alpha and sigma at it and at the next time
    (sigma 0 after the last), h and the previous step's h, and whether the step is second order: all but the
    first (no history yet) and the last (diffusers' lower_order_final, which also keeps the final step to
    sigma = 0 finite). alpha and sigma are the schedule's sqrt(abar) and sqrt(1 - abar), derived in float64."""
    times = dpm_solver_timesteps(schedule.num_timesteps, steps, spacing)
    alpha_s, sigma_s = schedule.sqrt_alphas_cumprod[times], schedule.sqrt_one_minus_alphas_cumprod[times]
    alpha_t = jnp.append(alpha_s[1:], 1.0)
    sigma_t = jnp.append(sigma_s[1:], 0.0)
    lam_s = jnp.log(alpha_s) - jnp.log(sigma_s)
    h = jnp.log(alpha_t) - jnp.log(sigma_t) - lam_s  # +inf on the last step: exp(-h) = 0 there
    h_prev = jnp.append(1.0, h[:-1])  # unused on the first step
    second_order = (np.arange(steps) > 0) & (np.arange(steps) < steps - 1)
    return jnp.asarray(times), alpha_s, sigma_s, alpha_t, sigma_t, h, h_prev, jnp.asarray(second_order)


# ----------------------------------------------------------------------------------------------------------
# The samplers: one registry entry each, run by one scan.


class SamplerSettings(NamedTuple):
    """A sampler and its settings as `sampler_settings` checked them; hashable (a static argument of jit). The
    settings a sampler does not take hold their defaults."""

    sampler: str
    steps: int  # the scan's length (ddpm: T; EDM's: the noise levels before 0)
    eta: float
    spacing: str
    prediction: str
    sigma_min: float = 0.002  # EDM's: the noise levels of eq. 5, from sigma_max down to sigma_min, then 0
    sigma_max: float = 80.0
    rho: float = 7.0
    s_churn: float = 0.0  # EDM's churn (Algorithm 2): gamma = min(s_churn / steps, sqrt 2 - 1) where
    s_tmin: float = 0.0  # s_tmin <= sigma <= s_tmax, and fresh noise of std s_noise scaled to raise sigma to
    s_tmax: float = float("inf")  # (1 + gamma) sigma
    s_noise: float = 1.0
    edm: EDM = EDM()  # the model's EDM constants (its family's samplers read sigma_data and c_noise_scale)


EDM_SETTINGS = ("sigma_min", "sigma_max", "rho", "s_churn", "s_tmin", "s_tmax", "s_noise")  # their flags: --s-churn


class StepContext(NamedTuple):
    """What a sampler's step sees besides its carry and its inputs."""

    denoise: Callable  # DDPM family: (x, t, alpha, sigma) -> (x0, eps), through `predict`; EDM: (x, sigma) -> D
    noise_at: Callable  # (x, t) -> the fresh noise of step t (EDM: of step index t), the same in any chunking
    schedule: Schedule
    settings: SamplerSettings
    clip_denoised: bool  # clip the estimate of x_0 to [-1, 1] (DDIM, DPM-Solver++)


class Sampler(NamedTuple):
    """One entry of SAMPLERS: the scan `carry = step(context, carry, inputs[i])` from `carry(x_T)`."""

    help: str
    family: str  # the models it samples: "ddpm" (eps, x0, v) or "edm"
    takes: tuple[str, ...]  # the settings it reads, of "steps", "eta", "spacing" and EDM_SETTINGS
    default_steps: int | None  # steps when none are given (None: T; ignored when it does not take steps)
    network_calls: Callable[[int], int]  # network calls of a run of n steps
    inputs: Callable[[Schedule, SamplerSettings], tuple]  # the scan's per-step inputs (arrays over the steps)
    carry: Callable  # (x_T, settings), x_T ~ N(0, 1) -> the scan's first carry, x first
    step: Callable  # (StepContext, carry, inputs of one step) -> carry


def _ddpm_inputs(schedule: Schedule, settings: SamplerSettings):
    return (jnp.arange(schedule.num_timesteps - 1, -1, -1, dtype=jnp.int32),)


def _ddpm(context: StepContext, carry, inputs):
    (x,), (t,), s = carry, inputs, context.schedule
    _, eps = context.denoise(x, t, s.sqrt_alphas_cumprod[t], s.sqrt_one_minus_alphas_cumprod[t])
    return (ddpm_step(s, eps, x, t, context.noise_at(x, t)),)


def _ddim_inputs(schedule: Schedule, settings: SamplerSettings):
    times = ddim_timesteps(schedule.num_timesteps, settings.steps)
    return times[:-1], times[1:]


def _ddim(context: StepContext, carry, inputs):
    (x,), (t, t_next) = carry, inputs
    x0, eps = context.denoise(x, t, *ddim_alpha_sigma(context.schedule, t))
    return (ddim_step(context.schedule, x0, eps, x, t, t_next, context.settings.eta, context.noise_at(x, t),
                      context.clip_denoised),)


def _dpm_solver_inputs(schedule: Schedule, settings: SamplerSettings):
    return _dpm_solver_coefficients(schedule, settings.steps, settings.spacing)


def _dpm_solver(stochastic: bool):
    def step(context: StepContext, carry, inputs):
        x, x0_prev = carry
        t, alpha_s, sigma_s, alpha_t, sigma_t, h, h_prev, second_order = inputs
        x0, _ = context.denoise(x, t, alpha_s, sigma_s)
        if context.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        noise = context.noise_at(x, t) if stochastic else None
        return dpm_solver_step(x, x0, x0_prev, alpha_t, sigma_t, sigma_s, h, h_prev, second_order, noise,
                               stochastic), x0

    return step


def _edm_inputs(schedule: Schedule, settings: SamplerSettings):
    """Per step i of Algorithm 2: i, sigma_hat_i = (1 + gamma_i) sigma_i, sigma_{i+1} (0 after the last), and the
    std of the churn's noise, sqrt(sigma_hat_i^2 - sigma_i^2) s_noise (in float64, then float32)."""
    sigmas = karras_sigmas(settings.steps, settings.sigma_min, settings.sigma_max, settings.rho)
    churn = (settings.s_tmin <= sigmas[:-1]) & (sigmas[:-1] <= settings.s_tmax)
    gamma = np.where(churn, min(settings.s_churn / settings.steps, np.sqrt(2) - 1), 0.0)
    noise_std = sigmas[:-1] * np.sqrt(gamma * (2 + gamma)) * settings.s_noise
    return (jnp.arange(settings.steps, dtype=jnp.int32),
            *(jnp.asarray(a, jnp.float32) for a in (sigmas[:-1] * (1 + gamma), sigmas[1:], noise_std)))


def _edm(second_order: bool):
    """Algorithm 2 of the paper, one noise level per step: churn (fresh noise raising sigma to sigma_hat), an
    Euler step to the next sigma, and with second_order Heun's correction, except on the last step (to 0)."""
    def step(context: StepContext, carry, inputs):
        (x,), (i, sigma_hat, sigma_next, noise_std) = carry, inputs
        x_hat = x + noise_std * context.noise_at(x, i)
        d = (x_hat - context.denoise(x_hat, sigma_hat)) / sigma_hat
        x_next = x_hat + (sigma_next - sigma_hat) * d
        if not second_order:
            return (x_next,)

        def heun(x_next):
            d_next = (x_next - context.denoise(x_next, sigma_next)) / sigma_next
            return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)

        return (jax.lax.cond(sigma_next > 0, heun, lambda x_next: x_next, x_next),)

    return step


def _with_history(x_T, settings):
    """x, and the previous step's estimate of x_0 (none yet)."""
    return x_T, jnp.zeros_like(x_T)


def _x_T(x_T, settings):
    return (x_T,)


def _edm_x_T(x_T, settings):
    """x_0 of Algorithm 2: N(0, sigma_max^2)."""
    return (x_T * settings.sigma_max,)


def _one_call_per_step(steps: int) -> int:
    return steps


def _heun_calls(steps: int) -> int:
    return 2 * steps - 1  # the last step, to sigma = 0, is Euler's


_EDM_TAKES = ("steps", *EDM_SETTINGS)
SAMPLERS = {
    "ddpm": Sampler("all T steps of DDPM's ancestral sampling (the article's)", "ddpm", (), None,
                    _one_call_per_step, _ddpm_inputs, _x_T, _ddpm),
    "ddim": Sampler("DDIM, --eta 0 deterministic to 1 with fresh noise at every step", "ddpm", ("steps", "eta"),
                    None, _one_call_per_step, _ddim_inputs, _x_T, _ddim),
    "dpmsolver++": Sampler("multistep second-order DPM-Solver++, deterministic", "ddpm", ("steps", "spacing"), 20,
                           _one_call_per_step, _dpm_solver_inputs, _with_history, _dpm_solver(stochastic=False)),
    "sde-dpmsolver++": Sampler("SDE-DPM-Solver++, second order, fresh noise at every step", "ddpm",
                               ("steps", "spacing"), 20, _one_call_per_step, _dpm_solver_inputs, _with_history,
                               _dpm_solver(stochastic=True)),
    "euler": Sampler("EDM models: Euler over Karras noise levels, with --s-churn fresh noise per step", "edm",
                     _EDM_TAKES, 18, _one_call_per_step, _edm_inputs, _edm_x_T, _edm(second_order=False)),
    "heun": Sampler("EDM models: Heun over Karras noise levels (the paper's Algorithm 2), 2 steps - 1 network "
                    "calls, with --s-churn fresh noise per step", "edm", _EDM_TAKES, 18, _heun_calls, _edm_inputs,
                    _edm_x_T, _edm(second_order=True)),
}
DEFAULT_SAMPLERS = {"ddpm": "sde-dpmsolver++", "edm": "heun"}  # per family, where none is given


def sampler_entry(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"--sampler {name}: expected one of {list(SAMPLERS)}")
    return SAMPLERS[name]


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"--prediction {prediction}: expected one of {list(PREDICTIONS)} (diffusers' "
                         f"{', '.join(DIFFUSERS_PREDICTION_TYPES.values())}, and EDM's denoiser)")


def sampler_settings(sampler: str | None, *, timesteps: int, steps: int | None = None, eta: float = 0.0,
                     spacing: str = "linspace", prediction: str = "eps", steps_flag: str = "--steps",
                     edm: EDM = EDM(), **edm_settings) -> SamplerSettings:
    """The one check of sampler settings, before anything compiles: a ValueError names the flag (the steps' is
    `steps_flag`) and says what is allowed. sampler None: the prediction's family's default (DEFAULT_SAMPLERS);
    steps None: the sampler's default. edm_settings: those of EDM_SETTINGS given (None: the default); edm: the
    model's EDM constants."""
    def need(ok, flag, value, expected):
        if not ok:
            raise ValueError(f"{flag} {value}: expected {expected}")

    check_prediction(prediction)
    model_family = family(prediction)
    name = sampler or DEFAULT_SAMPLERS[model_family]
    entry = sampler_entry(name)
    if entry.family != model_family:
        names = [other for other, e in SAMPLERS.items() if e.family == model_family]
        raise ValueError(f"--sampler {name}: samples {entry.family.upper()} models, and this model was trained as "
                         f"{prediction} (the {model_family.upper()} family); expected one of {names}")
    unknown = sorted(set(edm_settings) - set(EDM_SETTINGS))
    if unknown:
        raise TypeError(f"sampler_settings: unknown settings {unknown}")
    values = {setting: float(SamplerSettings._field_defaults[setting] if edm_settings.get(setting) is None
                             else edm_settings[setting]) for setting in EDM_SETTINGS}
    for setting in ("s_churn", "s_noise", "s_tmin"):
        need(values[setting] >= 0, f"--{setting.replace('_', '-')}", values[setting], "a non-negative number")
    need(values["sigma_min"] > 0, "--sigma-min", values["sigma_min"], "a positive number")
    need(values["sigma_min"] < values["sigma_max"], "--sigma-min", values["sigma_min"],
         f"less than --sigma-max ({values['sigma_max']:g})")
    need(values["rho"] > 0, "--rho", values["rho"], "a positive number")
    need(values["s_tmin"] <= values["s_tmax"], "--s-tmin", values["s_tmin"], f"at most --s-tmax ({values['s_tmax']:g})")
    need(spacing in SPACINGS, "--spacing", spacing, f"one of {list(SPACINGS)}")
    need(0 <= eta <= 1, "--eta", eta, "a number in [0, 1]")
    need(steps is None or steps > 0, steps_flag, steps, "a positive integer")
    if steps is not None and "steps" in entry.takes and entry.family == "ddpm":  # ddpm runs all T steps
        need(steps <= timesteps, steps_flag, steps, f"at most the {timesteps} diffusion steps (--timesteps)")
    n = (steps or entry.default_steps or timesteps) if "steps" in entry.takes else timesteps
    settings = SamplerSettings(
        name, n, float(eta) if "eta" in entry.takes else 0.0, spacing if "spacing" in entry.takes else "linspace",
        prediction, **{setting: value for setting, value in values.items() if setting in entry.takes},
        edm=EDM(*map(float, edm)) if model_family == "edm" else EDM())
    if "spacing" in entry.takes:  # leading with steps >= T: T // (steps + 1) = 0, and h = 0 divides
        times = dpm_solver_timesteps(timesteps, n, spacing)
        need(len(np.unique(times)) == n, steps_flag, f"{n} with --spacing {spacing}",
             f"fewer steps or another spacing (the times repeat at T = {timesteps})")
    return settings


def _scan(model, schedule: Schedule, step_key, settings: SamplerSettings, clip_denoised: bool):
    """(body, inputs) of the sampler's scan over `model`; the noise of step t is drawn from fold_in(step_key, t),
    so any split of the steps into chunks draws the same noise."""
    entry = sampler_entry(settings.sampler)

    if entry.family == "edm":
        def denoise(x, sigma):
            return edm_denoise(model, x, jnp.full(x.shape[:1], sigma, x.dtype), settings.edm)
    else:
        def denoise(x, t, alpha, sigma):
            output = model(x, jnp.full(x.shape[:1], t, dtype=jnp.int32)).astype(x.dtype)
            return predict(settings.prediction, output, x, alpha, sigma)

    def noise_at(x, t):
        return jax.random.normal(jax.random.fold_in(step_key, t), x.shape, x.dtype)

    context = StepContext(denoise, noise_at, schedule, settings, clip_denoised)
    # The barrier keeps the compiler from folding inputs known at compile time into a short scan that it unrolls,
    # in float arithmetic of its own: the whole program and its chunks compute the same values.
    return partial(entry.step, context), jax.lax.optimization_barrier(entry.inputs(schedule, settings))


def _start(key, shape, settings: SamplerSettings, batch_sharding):
    """The scan's first carry (from x_T) and the key of the per-step noise."""
    init_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape, jnp.float32)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    return sampler_entry(settings.sampler).carry(x_T, settings), step_key


def sample_loop(model, schedule: Schedule, key, shape, settings: SamplerSettings, *, clip_denoised: bool = True,
                batch_sharding=None):
    """Images in [0, 1] space (unclipped, as the reference's `unnormalize`) of shape `shape` (BHWC), by the
    sampler and settings of `settings` (`sampler_settings`). clip_denoised clips each step's estimate of x_0 to
    [-1, 1] (DDIM, DPM-Solver++). Call it under jit (see `sample`). With `batch_sharding` the images are
    generated data parallel, split over its devices on the batch axis."""
    carry, step_key = _start(key, shape, settings, batch_sharding)
    body, inputs = _scan(model, schedule, step_key, settings, clip_denoised)
    (x_0, *_), _ = jax.lax.scan(lambda c, inputs_i: (body(c, inputs_i), None), carry, inputs)
    return (x_0 + 1) * 0.5


_STATIC = ("graphdef", "shape", "settings", "batch_sharding")


@partial(jax.jit, static_argnames=_STATIC)
def _sample_jit(graphdef, state, schedule, key, shape, settings, batch_sharding):
    return sample_loop(nnx.merge(graphdef, state), schedule, key, shape, settings, batch_sharding=batch_sharding)


_start_jit = jax.jit(_start, static_argnames=("shape", "settings", "batch_sharding"))


@partial(jax.jit, static_argnames=(*_STATIC, "length"), donate_argnames="carry")
def _chunk_jit(graphdef, state, schedule, step_key, carry, first, shape, settings, batch_sharding, length):
    """Steps first, ..., first + length - 1 of the sampler's scan."""
    body, inputs = _scan(nnx.merge(graphdef, state), schedule, step_key, settings, clip_denoised=True)
    inputs = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, first, length), inputs)
    carry = jax.lax.scan(lambda c, inputs_i: (body(c, inputs_i), None), carry, inputs)[0]
    if batch_sharding is not None:  # the next chunk's input keeps the batch split over the devices
        carry = jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, batch_sharding), carry)
    return carry


def chunk_length(n: int, chunks: int = 20) -> int:
    """The largest divisor of n that makes at least `chunks` chunks: steps of one when n < 2 * chunks (or n is
    prime)."""
    return max(d for d in range(1, max(1, n // chunks) + 1) if n % d == 0)


def sample(model: nnx.Module, schedule: Schedule, key, num_images: int, image_size: int, settings: SamplerSettings,
           *, batch_sharding=None, progress: bool = False):
    """Compile and run the whole sampler as one program; returns images in [0, 1] space, BHWC.

    batch_sharding (a NamedSharding of the batch axis, with the model replicated over the same devices):
    split the images over several devices. progress: run the scan in about 20 equal chunks (one program for
    all of them) and show a progress bar on stderr between them; the images are bit-identical to the one
    program's."""
    graphdef, state = nnx.split(model)
    shape = (num_images, image_size, image_size, model.channels)
    static = dict(shape=shape, settings=settings, batch_sharding=batch_sharding)
    if not progress:
        return _sample_jit(graphdef, state, schedule, key, **static)
    from tqdm import tqdm

    n, length = settings.steps, chunk_length(settings.steps)
    carry, step_key = _start_jit(key, **static)
    with tqdm(total=n, desc=f"{settings.sampler}, {n} steps", unit="step", dynamic_ncols=True) as bar:
        for first in range(0, n, length):
            carry = _chunk_jit(graphdef, state, schedule, step_key, carry, first, **static, length=length)
            jax.block_until_ready(carry)
            bar.update(length)
    return (carry[0] + 1) * 0.5
