"""ddpm_torch.training.train_step: the benchmark's PyTorch step, in float32 and under autocast bf16."""

import copy

import torch

from ddpm_torch import DiffusionModel, TwoResUNet
from ddpm_torch.training import make_optimizer, train_step


def _setup():
    torch.manual_seed(0)
    diffusion = DiffusionModel(TwoResUNet(8, dim_mults=(1, 2)), 16, timesteps=100)
    g = torch.Generator().manual_seed(1)
    batch = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.tensor([3, 50]), torch.randn(2, 3, 16, 16, generator=g))
    return diffusion, batch


def test_autocast_bf16_computes_in_bf16_and_keeps_float32_parameters():
    diffusion, batch = _setup()
    twin = copy.deepcopy(diffusion)
    dtypes = {}
    for name, model in (("bf16", diffusion), ("fp32", twin)):
        model.model.init_conv.register_forward_hook(lambda m, i, o, name=name: dtypes.update({name: o.dtype}))
    before = [p.detach().clone() for p in diffusion.model.parameters()]
    loss16 = train_step(diffusion, make_optimizer(diffusion), *batch, autocast_dtype=torch.bfloat16)
    loss32 = train_step(twin, make_optimizer(twin), *batch)
    assert dtypes == {"bf16": torch.bfloat16, "fp32": torch.float32}
    assert all(p.dtype == torch.float32 for p in diffusion.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, diffusion.model.parameters()))
    assert loss16.dtype == torch.float32 and torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) <= 0.05 * loss32.item()  # the same step, at bf16's precision
