"""Pure diffusion math: the training objectives, DDPM, DDIM and DPM-Solver++ steps, and the samplers as one
registry, each run as one compiled scan.

Every function takes the Schedule pytree and explicit arrays or keys, so all of it jit-compiles. The model is any
callable `output_BHWC = model(x_BHWC, t_B)` whose output predicts one target: the noise (eps, the article's),
x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho 2022). `predict` is the one place that turns an
output into estimates of x_0 and of the noise; the samplers use those estimates only.
"""

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddpm_jax.schedules import Schedule

LOSSES = ("l2", "l1")
PREDICTIONS = ("eps", "x0", "v")
DIFFUSERS_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}  # their prediction_type
LOSS_WEIGHTS = ("none", "min-snr")
SPACINGS = ("linspace", "leading", "trailing")  # diffusers' timestep_spacing, for DPM-Solver++


def _extract(a_T, t_B, ndim):
    """a[t] per batch element, shaped to broadcast against an array of rank `ndim`."""
    return a_T[t_B].reshape((-1,) + (1,) * (ndim - 1))


# ----------------------------------------------------------------------------------------------------------
# Training: what the network learns.


class Objective(NamedTuple):
    """What the network is trained to output and how its error is weighted; hashable (a static argument of jit)."""

    prediction: str = "eps"  # the target: eps | x0 | v
    loss: str = "l2"  # l2 | l1 between the target and the output
    loss_weight: str = "none"  # none | min-snr (Hang et al. 2023)
    snr_gamma: float = 5.0  # min-snr's gamma
    offset_noise: float = 0.0  # std of one Gaussian value per image and channel added to the training noise


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
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


def predict(prediction: str, output, x, alpha, sigma):
    """(x0, eps): the estimates of x_0 and of the noise in x = alpha x_0 + sigma eps that a network of
    `prediction` gives with `output`; alpha and sigma broadcast against x."""
    if prediction == "eps":
        return (x - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x - alpha * output) / sigma
    if prediction == "v":
        return alpha * x - sigma * output, sigma * x + alpha * output
    raise ValueError(f"unknown prediction {prediction!r}; expected one of {PREDICTIONS}")


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
        raise ValueError(f"unknown prediction {objective.prediction!r}; expected one of {PREDICTIONS}")
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
    """DDPM's Algorithm 1: one uniform t per sample and fresh training noise, both drawn from `key`."""
    t_key, noise_key = jax.random.split(key)
    t_B = jax.random.randint(t_key, x0_BHWC.shape[:1], 0, schedule.num_timesteps)
    noise = training_noise(noise_key, x0_BHWC.shape, x0_BHWC.dtype, objective.offset_noise)
    return p_loss(model, schedule, x0_BHWC, t_B, noise, objective)


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
    steps: int  # the scan's length (ddpm: T)
    eta: float
    spacing: str
    prediction: str


class StepContext(NamedTuple):
    """What a sampler's step sees besides its carry and its inputs."""

    denoise: Callable  # (x, t, alpha, sigma) -> (x0, eps): the network at t, through `predict`
    noise_at: Callable  # (x, t) -> the fresh noise of step t (the same in any chunking of the steps)
    schedule: Schedule
    settings: SamplerSettings
    clip_denoised: bool  # clip the estimate of x_0 to [-1, 1] (DDIM, DPM-Solver++)


class Sampler(NamedTuple):
    """One entry of SAMPLERS: the scan `carry = step(context, carry, inputs[i])` from `carry(x_T)`."""

    help: str
    takes: tuple[str, ...]  # the settings it reads, of "steps", "eta", "spacing" (every sampler takes a prediction)
    default_steps: int | None  # steps when none are given (None: T; ignored when it does not take steps)
    network_calls: Callable[[int], int]  # network calls of a run of n steps
    inputs: Callable[[Schedule, SamplerSettings], tuple]  # the scan's per-step inputs (arrays over the steps)
    carry: Callable  # x_T -> the scan's first carry, x first
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


def _with_history(x_T):
    """x, and the previous step's estimate of x_0 (none yet)."""
    return x_T, jnp.zeros_like(x_T)


def _one_call_per_step(steps: int) -> int:
    return steps


SAMPLERS = {
    "ddpm": Sampler("all T steps of DDPM's ancestral sampling (the article's)", (), None, _one_call_per_step,
                    _ddpm_inputs, lambda x_T: (x_T,), _ddpm),
    "ddim": Sampler("DDIM, --eta 0 deterministic to 1 with fresh noise at every step", ("steps", "eta"), None,
                    _one_call_per_step, _ddim_inputs, lambda x_T: (x_T,), _ddim),
    "dpmsolver++": Sampler("multistep second-order DPM-Solver++, deterministic", ("steps", "spacing"), 20,
                           _one_call_per_step, _dpm_solver_inputs, _with_history, _dpm_solver(stochastic=False)),
    "sde-dpmsolver++": Sampler("SDE-DPM-Solver++, second order, fresh noise at every step", ("steps", "spacing"),
                               20, _one_call_per_step, _dpm_solver_inputs, _with_history,
                               _dpm_solver(stochastic=True)),
}


def sampler_entry(name: str) -> Sampler:
    if name not in SAMPLERS:
        raise ValueError(f"--sampler {name}: expected one of {list(SAMPLERS)}")
    return SAMPLERS[name]


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"--prediction {prediction}: expected one of {list(PREDICTIONS)} (diffusers' "
                         f"{', '.join(DIFFUSERS_PREDICTION_TYPES.values())})")


def sampler_settings(sampler: str, *, timesteps: int, steps: int | None = None, eta: float = 0.0,
                     spacing: str = "linspace", prediction: str = "eps", steps_flag: str = "--steps") -> SamplerSettings:
    """The one check of sampler settings, before anything compiles: a ValueError names the flag (the steps' is
    `steps_flag`) and says what is allowed. steps None: the sampler's default."""
    def need(ok, flag, value, expected):
        if not ok:
            raise ValueError(f"{flag} {value}: expected {expected}")

    entry = sampler_entry(sampler)
    check_prediction(prediction)
    need(spacing in SPACINGS, "--spacing", spacing, f"one of {list(SPACINGS)}")
    need(0 <= eta <= 1, "--eta", eta, "a number in [0, 1]")
    need(steps is None or steps > 0, steps_flag, steps, "a positive integer")
    if steps is not None and "steps" in entry.takes:  # ddpm runs all T steps whatever it is given
        need(steps <= timesteps, steps_flag, steps, f"at most the {timesteps} diffusion steps (--timesteps)")
    n = (steps or entry.default_steps or timesteps) if "steps" in entry.takes else timesteps
    settings = SamplerSettings(sampler, n, float(eta) if "eta" in entry.takes else 0.0,
                               spacing if "spacing" in entry.takes else "linspace", prediction)
    if "spacing" in entry.takes:  # leading with steps >= T: T // (steps + 1) = 0, and h = 0 divides
        times = dpm_solver_timesteps(timesteps, n, spacing)
        need(len(np.unique(times)) == n, steps_flag, f"{n} with --spacing {spacing}",
             f"fewer steps or another spacing (the times repeat at T = {timesteps})")
    return settings


def _scan(model, schedule: Schedule, step_key, settings: SamplerSettings, clip_denoised: bool):
    """(body, inputs) of the sampler's scan over `model`; the noise of step t is drawn from fold_in(step_key, t),
    so any split of the steps into chunks draws the same noise."""
    entry = sampler_entry(settings.sampler)

    def denoise(x, t, alpha, sigma):
        output = model(x, jnp.full(x.shape[:1], t, dtype=jnp.int32)).astype(x.dtype)
        return predict(settings.prediction, output, x, alpha, sigma)

    def noise_at(x, t):
        return jax.random.normal(jax.random.fold_in(step_key, t), x.shape, x.dtype)

    context = StepContext(denoise, noise_at, schedule, settings, clip_denoised)
    return partial(entry.step, context), entry.inputs(schedule, settings)


def _start(key, shape, settings: SamplerSettings, batch_sharding):
    """The scan's first carry (from x_T) and the key of the per-step noise."""
    init_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape, jnp.float32)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    return sampler_entry(settings.sampler).carry(x_T), step_key


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
