"""A minimal training step over the reference DiffusionModel, as the article's trainer configures it.

AdamW (lr 1e-4, betas (0.9, 0.99), weight decay 0.01); one timestep per sample (DDPM Algorithm 1).
Used by the benchmark and the JAX-vs-PyTorch training comparison; the article's own trainer adds
data loading, EMA and checkpoints around the same step.
"""

import contextlib

import torch

from ddpm_torch.diffusion import DiffusionModel


def make_optimizer(diffusion: DiffusionModel, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.01):
    return torch.optim.AdamW(diffusion.model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)


def train_step(diffusion: DiffusionModel, optimizer, x0_BCHW, t_B, noise_BCHW, loss_type="l2",
               autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """One optimizer step on images already in [-1, 1]; returns the loss (detached).

    autocast_dtype (e.g. torch.bfloat16): the forward pass and the loss under `torch.autocast` on the
    images' device, as PyTorch recommends for mixed precision (the backward follows the forward's dtypes;
    parameters and optimizer state stay float32). bfloat16 needs no loss scaling."""
    optimizer.zero_grad(set_to_none=True)
    autocast = (torch.autocast(x0_BCHW.device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        loss = diffusion.p_loss(x0_BCHW, t_B, noise_BCHW, loss_type=loss_type)
    loss.backward()
    optimizer.step()
    return loss.detach()
