"""Pure diffusion math: forward noising, the training loss, DDPM, DDIM and DPM-Solver++ steps, whole samplers.

Every function takes the Schedule pytree and explicit arrays or keys, so all of it jit-compiles; the
model is any callable `eps_BHWC = model(x_BHWC, t_B)`. The samplers run every step inside one
compiled program (`lax.scan`).
"""

from functools import partial
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ddpm_jax.schedules import Schedule

LOSSES = ("l2", "l1")
SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "sde-dpmsolver++")
DPM_SOLVERS = ("dpmsolver++", "sde-dpmsolver++")  # diffusers' DPMSolverMultistepScheduler algorithm_type names
SPACINGS = ("linspace", "leading", "trailing")  # diffusers' timestep_spacing, for DPM-Solver++


def _extract(a_T, t_B, ndim):
    """a[t] per batch element, shaped to broadcast against an array of rank `ndim`."""
    return a_T[t_B].reshape((-1,) + (1,) * (ndim - 1))


def q_sample(schedule: Schedule, x0_BHWC, t_B, noise_BHWC):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
    return (
        _extract(schedule.sqrt_alphas_cumprod, t_B, x0_BHWC.ndim) * x0_BHWC
        + _extract(schedule.sqrt_one_minus_alphas_cumprod, t_B, x0_BHWC.ndim) * noise_BHWC
    )


def p_loss(model, schedule: Schedule, x0_BHWC, t_B, noise_BHWC, loss_type: str = "l2"):
    """Mean l2 (or l1) between the true noise and the model's prediction of it from x_t."""
    predicted_noise = model(q_sample(schedule, x0_BHWC, t_B, noise_BHWC), t_B)
    diff = noise_BHWC - predicted_noise.astype(noise_BHWC.dtype)
    if loss_type == "l2":
        return jnp.mean(diff**2)
    if loss_type == "l1":
        return jnp.mean(jnp.abs(diff))
    raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSSES}")


def training_loss(model, schedule: Schedule, x0_BHWC, key, loss_type: str = "l2"):
    """DDPM's Algorithm 1: one uniform t per sample and fresh Gaussian noise, both drawn from `key`."""
    t_key, noise_key = jax.random.split(key)
    t_B = jax.random.randint(t_key, x0_BHWC.shape[:1], 0, schedule.num_timesteps)
    noise = jax.random.normal(noise_key, x0_BHWC.shape, x0_BHWC.dtype)
    return p_loss(model, schedule, x0_BHWC, t_B, noise, loss_type)


def ddpm_step(schedule: Schedule, eps_BHWC, x_BHWC, t, noise_BHWC):
    """x_t -> x_{t-1} given the predicted noise; `t` is one (possibly traced) integer for the batch."""
    t_B = jnp.full(x_BHWC.shape[:1], t, dtype=jnp.int32)
    betas_t = _extract(schedule.betas, t_B, x_BHWC.ndim)
    sqrt_recip_alphas_t = _extract(schedule.sqrt_recip_alphas, t_B, x_BHWC.ndim)
    sqrt_one_minus_alphas_cumprod_t = _extract(schedule.sqrt_one_minus_alphas_cumprod, t_B, x_BHWC.ndim)
    predicted_mean = sqrt_recip_alphas_t * (x_BHWC - betas_t * eps_BHWC / sqrt_one_minus_alphas_cumprod_t)
    posterior_variance_t = _extract(schedule.posterior_variance, t_B, x_BHWC.ndim)
    return jnp.where(t == 0, predicted_mean, predicted_mean + jnp.sqrt(posterior_variance_t) * noise_BHWC)


def ddim_step(schedule: Schedule, eps_BHWC, x_BHWC, t, t_prev, eta, noise_BHWC, clip_denoised: bool = True):
    """DDIM (Song et al. 2021, eq. 12) from t to t_prev < t; t_prev = -1 returns the estimate of x_0."""
    alpha = schedule.alphas_cumprod[t]
    x_start = (x_BHWC - jnp.sqrt(1 - alpha) * eps_BHWC) / jnp.sqrt(alpha)
    if clip_denoised:
        x_start = jnp.clip(x_start, -1.0, 1.0)
        eps_BHWC = (x_BHWC - jnp.sqrt(alpha) * x_start) / jnp.sqrt(1 - alpha)
    alpha_next = schedule.alphas_cumprod[jnp.maximum(t_prev, 0)]
    sigma = eta * jnp.sqrt((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha))
    c = jnp.sqrt(1 - alpha_next - sigma**2)
    x_prev = x_start * jnp.sqrt(alpha_next) + c * eps_BHWC + sigma * noise_BHWC
    return jnp.where(t_prev < 0, x_start, x_prev)


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
        raise ValueError(f"unknown spacing {spacing!r}; expected one of {SPACINGS}")
    if len(np.unique(times)) < steps:  # leading with steps >= T: T // (steps + 1) = 0, and h = 0 divides
        raise ValueError(f"--steps {steps} with --spacing {spacing}: times repeat at T = {num_timesteps}; "
                         f"expected fewer steps or another spacing")
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


class _Plan(NamedTuple):
    """A sampler as one lax.scan: `carry = body(carry, xs[i])` for each step i; the carry starts as
    `initial_carry(sampler, x_T)` and holds x first."""

    body: Callable
    xs: tuple


def num_steps(sampler: str, steps: int | None, num_timesteps: int) -> int:
    """How many network calls `sampler` makes: T for ddpm, `steps` (default T) for ddim, `steps` (default 20)
    for DPM-Solver++."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLERS}")
    return num_timesteps if sampler == "ddpm" else steps or (20 if sampler in DPM_SOLVERS else num_timesteps)


def initial_carry(sampler: str, x_T):
    """x, and for DPM-Solver++ the previous step's estimate of x_0 (none yet)."""
    return (x_T, jnp.zeros_like(x_T)) if sampler in DPM_SOLVERS else (x_T,)


def _plan(model, schedule: Schedule, step_key, *, sampler: str, steps: int | None, eta: float, clip_denoised: bool,
          spacing: str) -> _Plan:
    """`sampler`'s scan over `model` (eps_BHWC = model(x_BHWC, t_B)); the noise of step t is drawn from
    fold_in(step_key, t), so any split of the steps into chunks draws the same noise."""
    T = schedule.num_timesteps
    n = num_steps(sampler, steps, T)

    def eps(x, t):
        return model(x, jnp.full(x.shape[:1], t, dtype=jnp.int32)).astype(x.dtype)

    def noise_at(x, t):
        return jax.random.normal(jax.random.fold_in(step_key, t), x.shape, x.dtype)

    if sampler in DPM_SOLVERS:
        stochastic = sampler == "sde-dpmsolver++"

        def dpm_body(carry, coefficients):
            x, x0_prev = carry
            t, alpha_s, sigma_s, alpha_t, sigma_t, h, h_prev, second_order = coefficients
            x0 = (x - sigma_s * eps(x, t)) / alpha_s
            if clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
            noise = noise_at(x, t) if stochastic else None
            return dpm_solver_step(x, x0, x0_prev, alpha_t, sigma_t, sigma_s, h, h_prev, second_order, noise,
                                   stochastic), x0

        return _Plan(dpm_body, _dpm_solver_coefficients(schedule, n, spacing))

    if sampler == "ddpm":
        times = jnp.arange(T - 1, -2, -1, dtype=jnp.int32)  # T-1, ..., 0, then -1 as the last successor

        def step(x, t, t_next):
            return ddpm_step(schedule, eps(x, t), x, t, noise_at(x, t))

    else:
        times = ddim_timesteps(T, n)

        def step(x, t, t_next):
            return ddim_step(schedule, eps(x, t), x, t, t_next, eta, noise_at(x, t), clip_denoised)

    return _Plan(lambda carry, t_pair: (step(carry[0], *t_pair),), (times[:-1], times[1:]))


def _noise(key, shape, batch_sharding):
    """x_T, and the key of the per-step noise."""
    init_key, step_key = jax.random.split(key)
    x_T = jax.random.normal(init_key, shape, jnp.float32)
    if batch_sharding is not None:
        x_T = jax.lax.with_sharding_constraint(x_T, batch_sharding)
    return x_T, step_key


def sample_loop(
    model,
    schedule: Schedule,
    key,
    shape,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    return_all_timesteps: bool = False,
    clip_denoised: bool = True,
    spacing: str = "linspace",
    batch_sharding=None,
):
    """Images in [0, 1] space (unclipped, as the reference's `unnormalize`) of shape `shape` (BHWC).

    ddpm runs all T steps; ddim runs `steps` (default T); dpmsolver++ and sde-dpmsolver++ (multistep, second
    order) run `steps` (default 20) at times spaced as `spacing` says. clip_denoised clips each step's estimate of
    x_0 to [-1, 1] (ddim, dpm). With return_all_timesteps the result has a time axis after the batch holding x_T,
    ..., x_0. Call it under jit (see `sample`). With `batch_sharding` the images are generated data parallel,
    split over its devices on the batch axis.
    """
    x_T, step_key = _noise(key, shape, batch_sharding)
    plan = _plan(model, schedule, step_key, sampler=sampler, steps=steps, eta=eta, clip_denoised=clip_denoised,
                 spacing=spacing)

    def body(carry, xs_i):
        carry = plan.body(carry, xs_i)
        return carry, (carry[0] if return_all_timesteps else None)

    (x_0, *_), xs = jax.lax.scan(body, initial_carry(sampler, x_T), plan.xs)
    if return_all_timesteps:
        return (jnp.concatenate([x_T[:, None], jnp.moveaxis(xs, 0, 1)], axis=1) + 1) * 0.5
    return (x_0 + 1) * 0.5


_STATIC = ("graphdef", "shape", "sampler", "steps", "spacing", "batch_sharding")


@partial(jax.jit, static_argnames=(*_STATIC, "return_all_timesteps"))
def _sample_jit(graphdef, state, schedule, key, eta, shape, sampler, steps, spacing, batch_sharding,
                return_all_timesteps):
    return sample_loop(nnx.merge(graphdef, state), schedule, key, shape, sampler=sampler, steps=steps, eta=eta,
                       spacing=spacing, return_all_timesteps=return_all_timesteps, batch_sharding=batch_sharding)


@partial(jax.jit, static_argnames=("shape", "sampler", "batch_sharding"))
def _start_jit(key, shape, sampler, batch_sharding):
    x_T, step_key = _noise(key, shape, batch_sharding)
    return initial_carry(sampler, x_T), step_key


@partial(jax.jit, static_argnames=(*_STATIC, "length"), donate_argnames="carry")
def _chunk_jit(graphdef, state, schedule, step_key, eta, carry, first, shape, sampler, steps, spacing, batch_sharding,
               length):
    """Steps first, ..., first + length - 1 of the sampler's scan."""
    plan = _plan(nnx.merge(graphdef, state), schedule, step_key, sampler=sampler, steps=steps, eta=eta,
                 clip_denoised=True, spacing=spacing)
    xs = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, first, length), plan.xs)
    carry = jax.lax.scan(lambda c, xs_i: (plan.body(c, xs_i), None), carry, xs)[0]
    if batch_sharding is not None:  # the next chunk's input keeps the batch split over the devices
        carry = jax.tree.map(lambda c: jax.lax.with_sharding_constraint(c, batch_sharding), carry)
    return carry


def chunk_length(n: int, chunks: int = 20) -> int:
    """The largest divisor of n that makes at least `chunks` chunks: steps of one when n < 2 * chunks (or n is
    prime)."""
    return max(d for d in range(1, max(1, n // chunks) + 1) if n % d == 0)


def sample(
    model: nnx.Module,
    schedule: Schedule,
    key,
    num_images: int,
    image_size: int,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    spacing: str = "linspace",
    return_all_timesteps: bool = False,
    batch_sharding=None,
    progress: bool = False,
):
    """Compile and run the whole sampler as one program; returns images in [0, 1] space, BHWC.

    batch_sharding (a NamedSharding of the batch axis, with the model replicated over the same devices):
    split the images over several devices. progress: run the scan in about 20 equal chunks (one program for
    all of them) and show a progress bar on stderr between them; the images are bit-identical to the one
    program's. Not with return_all_timesteps."""
    graphdef, state = nnx.split(model)
    shape = (num_images, image_size, image_size, model.channels)
    static = dict(shape=shape, sampler=sampler, steps=steps, spacing=spacing, batch_sharding=batch_sharding)
    if not progress or return_all_timesteps:
        return _sample_jit(graphdef, state, schedule, key, eta, **static, return_all_timesteps=return_all_timesteps)
    from tqdm import tqdm

    n = num_steps(sampler, steps, schedule.num_timesteps)
    length = chunk_length(n)
    carry, step_key = _start_jit(key, shape, sampler, batch_sharding)
    with tqdm(total=n, desc=f"{sampler}, {n} steps", unit="step", dynamic_ncols=True) as bar:
        for first in range(0, n, length):
            carry = _chunk_jit(graphdef, state, schedule, step_key, eta, carry, first, **static, length=length)
            jax.block_until_ready(carry)
            bar.update(length)
    return (carry[0] + 1) * 0.5
