"""Gradients of the training loss for every parameter: <= 1e-4 relative (max-abs error / max-abs gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from ddpm_jax import depthwise, diffusion, schedules
from ddpm_jax.convert import torch_key
from ddpm_torch import DiffusionModel
from parity_tests.conftest import check, nhwc, torch_and_flax


def _to_torch_layout(a):
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


# Every U-Net with the depthwise convolution this platform uses, and every other formulation of it forced on
# this CPU on the default U-Net, so that the GPU's choices are checked here too.
@pytest.mark.parametrize(
    "variant,loss_type,impl",
    [("OneResUNet", "l2", None), ("TwoResUNet", "l2", None), ("AttentionUNet", "l2", None), ("TwoResUNet", "l1", None)]
    + [("TwoResUNet", "l2", impl) for impl in depthwise.IMPLS],
)
def test_loss_gradients(variant, loss_type, impl, monkeypatch):
    torch_model, flax_model = torch_and_flax(variant, dim=8, dim_mults=(1, 2))
    reference = DiffusionModel(torch_model, 16, timesteps=1000)
    g = torch.Generator().manual_seed(7)
    x0 = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([5, 250, 990])
    reference.p_loss(x0, t, noise, loss_type=loss_type).backward()
    expected = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}

    schedule = schedules.make_schedule("linear", 1000)
    graphdef, params = nnx.split(flax_model, nnx.Param)

    def loss(params):
        model = nnx.merge(graphdef, params)
        return diffusion.p_loss(
            model, schedule, jnp.asarray(nhwc(x0)), jnp.asarray(t.numpy()), jnp.asarray(nhwc(noise)),
            diffusion.Objective(loss=loss_type),
        )

    monkeypatch.setattr(depthwise, "_forced", impl)  # as DDPM_JAX_DEPTHWISE=impl; None: the platform's choice
    grads = nnx.to_flat_state(jax.grad(loss)(params))
    ours = {torch_key(path): _to_torch_layout(np.asarray(v.get_value())) for path, v in grads}
    assert ours.keys() == expected.keys()
    for key, grad in expected.items():
        check("gradients (per parameter)", ours[key], grad, 1e-4, "rel")
