"""Beta schedules in float64 numpy, and the frozen pytree of float32 coefficients the diffusion math reads."""

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


def linear_beta_schedule(timesteps: int) -> np.ndarray:
    """DDPM (Ho et al. 2020): linear from 1e-4 to 0.02, rescaled so that any T matches T = 1000."""
    scale = 1000 / timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, timesteps, dtype=np.float64)


def cosine_beta_schedule(timesteps: int, s: float = 0.008) -> np.ndarray:
    """Nichol & Dhariwal 2021, https://arxiv.org/abs/2102.09672."""
    t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
    alphas_cumprod = np.cos((t + s) / (1 + s) * np.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def sigmoid_beta_schedule(timesteps: int, start: float = -3, end: float = 3, tau: float = 1) -> np.ndarray:
    """As in lucidrains/denoising-diffusion-pytorch (https://arxiv.org/abs/2212.11972); start=-3, not the
    article code base's start=3, which makes every beta NaN."""
    t = np.linspace(0, timesteps, timesteps + 1, dtype=np.float64) / timesteps
    v_start, v_end = _sigmoid(start / tau), _sigmoid(end / tau)
    alphas_cumprod = (-_sigmoid((t * (end - start) + start) / tau) + v_end) / (v_end - v_start)
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return np.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)


SCHEDULES = {"linear": linear_beta_schedule, "cosine": cosine_beta_schedule, "sigmoid": sigmoid_beta_schedule}


class Schedule(NamedTuple):
    """Per-timestep coefficients, float32, each of shape (T,). Immutable; a pytree, so it passes through jit."""

    betas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_recip_alphas: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    posterior_variance: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        return self.betas.shape[0]


def make_schedule(name: str = "linear", timesteps: int = 1000, **schedule_kwargs) -> Schedule:
    """All coefficients derived in float64 from the named beta schedule, then stored as float32."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown beta schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    betas = SCHEDULES[name](timesteps, **schedule_kwargs)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    with np.errstate(divide="ignore", invalid="ignore"):
        coefficients = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_recip_alphas=np.sqrt(1.0 / alphas),
            sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
            posterior_variance=betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in coefficients.items()})


def check_schedule(name: str, timesteps: int) -> Schedule:
    """The named beta schedule at T = `timesteps`, once every beta is checked to lie in (0, 1); else a ValueError
    naming the flags."""
    schedule = make_schedule(name, timesteps)
    betas = np.asarray(schedule.betas)
    if not (np.all(np.isfinite(betas)) and np.all(betas > 0) and np.all(betas < 1)):
        raise ValueError(
            f"--schedule {name} with --timesteps {timesteps} gives betas outside (0, 1) "
            f"(range {np.nanmin(betas):.3g}..{np.nanmax(betas):.3g}); the linear schedule needs --timesteps > 20"
        )
    return schedule
