"""q_sample and both training losses with shared x0, t and noise against the reference (<= 1e-6 relative); the
x0 and v targets, min-SNR weights and weighted losses, which the article does not have, against diffusers and
float64 formulas."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ddpm_jax import diffusion, schedules
from ddpm_torch import DiffusionModel
from parity_tests.conftest import check, nhwc


@pytest.fixture(scope="module")
def reference_and_schedule(tiny_pair):
    torch_model, flax_model = tiny_pair
    reference = DiffusionModel(torch_model, 16, beta_scheduler="cosine", timesteps=1000)
    return reference, flax_model, schedules.make_schedule("cosine", 1000)


def _shared_inputs(seed=0):
    """Batch 3 at 16 px, the shapes of the gradient and forward tests: their eager ops are compiled already."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0, 1, 999])
    return x0, t, noise


def test_q_sample(reference_and_schedule):
    reference, _, schedule = reference_and_schedule
    x0, t, noise = _shared_inputs()
    expected = nhwc(reference.q_sample(x0, t, noise))
    ours = diffusion.q_sample(schedule, jnp.asarray(nhwc(x0)), jnp.asarray(t.numpy()), jnp.asarray(nhwc(noise)))
    check("q_sample", ours, expected, 1e-6, "rel")


@pytest.mark.parametrize("loss_type", ["l2", "l1"])
def test_loss(reference_and_schedule, loss_type):
    reference, flax_model, schedule = reference_and_schedule
    x0, t, noise = _shared_inputs(seed=1)
    with torch.no_grad():
        expected = reference.p_loss(x0, t, noise, loss_type=loss_type).item()
    ours = diffusion.p_loss(
        flax_model, schedule, jnp.asarray(nhwc(x0)), jnp.asarray(t.numpy()), jnp.asarray(nhwc(noise)),
        diffusion.Objective(loss=loss_type),
    )
    check(f"loss {loss_type}", float(ours), expected, 1e-6, "rel")


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_v_target_matches_diffusers_get_velocity(schedule_name):
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0 against DDPMScheduler.get_velocity on the same schedule."""
    from diffusers import DDPMScheduler

    schedule = schedules.make_schedule(schedule_name, 1000)
    x0, _, noise = _shared_inputs(seed=2)
    t = torch.tensor([0, 500, 999])
    theirs = DDPMScheduler(num_train_timesteps=1000, trained_betas=np.asarray(schedule.betas)).get_velocity(
        x0, noise, t)
    ours = diffusion.target(schedule, "v", jnp.asarray(nhwc(x0)), jnp.asarray(t.numpy()), jnp.asarray(nhwc(noise)))
    check("v target vs diffusers get_velocity", ours, nhwc(theirs), 1e-6, "rel")


def _float64_abar(schedule_name: str, timesteps: int = 1000) -> np.ndarray:
    return np.cumprod(1.0 - schedules.SCHEDULES[schedule_name](timesteps))


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("prediction", diffusion.DDPM_PREDICTIONS)
def test_min_snr_weights_match_the_formula_in_float64(schedule_name, prediction):
    """Hang et al. 2023 at gamma 5 for every t: min(SNR, 5) / SNR (eps), min(SNR, 5) (x0), min(SNR, 5) / (SNR + 1)
    (v), with SNR = abar / (1 - abar) from the betas in float64."""
    schedule = schedules.make_schedule(schedule_name, 1000)
    abar = _float64_abar(schedule_name)
    snr = abar / (1 - abar)
    expected = np.minimum(snr, 5.0) / {"eps": snr, "x0": 1.0, "v": snr + 1}[prediction]
    objective = diffusion.Objective(prediction=prediction, loss_weight="min-snr", snr_gamma=5.0)
    ours = diffusion.loss_weights(schedule, jnp.arange(1000), objective)
    check("min-SNR-5 weights vs float64 (each weight's ratio)", np.asarray(ours) / expected, np.ones(1000), 1e-6)


@pytest.mark.parametrize("prediction,loss_weight", [("x0", "none"), ("v", "none"), ("eps", "min-snr"),
                                                    ("x0", "min-snr"), ("v", "min-snr")])
def test_loss_of_each_objective_matches_float64(reference_and_schedule, prediction, loss_weight):
    """The U-Net's output against each target, per-sample weighted, recomputed in float64 from x_0, the noise, the
    betas and the U-Net's own output (the part already checked against the reference)."""
    _, flax_model, schedule = reference_and_schedule
    x0, t, noise = (np.asarray(nhwc(a) if a.ndim == 4 else a, np.float64) for a in _shared_inputs(seed=3))
    abar = _float64_abar("cosine")[t.astype(int)][:, None, None, None]
    x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    output = np.asarray(flax_model(jnp.asarray(x_t, jnp.float32), jnp.asarray(t, jnp.int32)), np.float64)
    target = {"eps": noise, "x0": x0, "v": np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0}[prediction]
    snr = (abar / (1 - abar)).ravel()
    weights = (np.ones(3) if loss_weight == "none" else
               np.minimum(snr, 5.0) / {"eps": snr, "x0": 1.0, "v": snr + 1}[prediction])
    expected = np.mean(weights * np.mean((target - output) ** 2, axis=(1, 2, 3)))
    objective = diffusion.Objective(prediction=prediction, loss_weight=loss_weight)
    ours = diffusion.p_loss(flax_model, schedule, jnp.asarray(x0, jnp.float32), jnp.asarray(t, jnp.int32),
                            jnp.asarray(noise, jnp.float32), objective)
    check(f"loss {prediction}{', min-SNR-5' if loss_weight != 'none' else ''} vs float64", float(ours), expected,
          1e-6, "rel")
