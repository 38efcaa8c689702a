"""Forward pass of all three U-Nets with weights converted from a torch init: <= 1e-5 max-abs."""

import jax.numpy as jnp
import pytest
import torch

from parity_tests.conftest import check, nchw, nhwc, torch_and_flax

CASES = [
    # (dim, dim_mults, image size, extra constructor kwargs)
    (8, (1, 2), 16, {}),
    (8, (1, 2, 2, 4), 16, {}),
]


def test_forward_other_channels():
    """Grayscale in, two channels out: the converter infers both. The levels are the second case's, whose eager
    ops then need compiling once for both tests."""
    _check_forward("TwoResUNet", 8, (1, 2, 2, 4), 16, {"channels": 1, "out_dim": 2})


@pytest.mark.parametrize("variant", ["OneResUNet", "TwoResUNet", "AttentionUNet"])
@pytest.mark.parametrize("dim,dim_mults,size,kwargs", CASES)
def test_forward(variant, dim, dim_mults, size, kwargs):
    _check_forward(variant, dim, dim_mults, size, kwargs)


def _check_forward(variant, dim, dim_mults, size, kwargs):
    """The converted Flax U-Net's output on 3 images against torch's, t at both ends of the schedule and between."""
    torch_model, flax_model = torch_and_flax(variant, dim=dim, dim_mults=dim_mults, **kwargs)
    channels = kwargs.get("channels", 3)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, channels, size, size, generator=g)
    t = torch.tensor([0, 421, 999])
    with torch.no_grad():
        expected = torch_model(x, t).numpy()
    ours = nchw(flax_model(jnp.asarray(nhwc(x)), jnp.asarray(t.numpy())))
    assert ours.shape == expected.shape == (3, kwargs.get("out_dim", channels), size, size)
    check("forward", ours, expected, 1e-5)
