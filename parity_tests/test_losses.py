"""q_sample and both training losses with shared x0, t and noise: <= 1e-6 relative."""

import jax.numpy as jnp
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
        flax_model, schedule, jnp.asarray(nhwc(x0)), jnp.asarray(t.numpy()), jnp.asarray(nhwc(noise)), loss_type
    )
    check(f"loss {loss_type}", float(ours), expected, 1e-6, "rel")
