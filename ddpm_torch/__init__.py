"""The reference: the article's PyTorch DDPM, faithful, device-agnostic.

Module attribute names follow the article so that ``state_dict`` keys match checkpoints trained with
the article's code. Deliberate fixes of the article's defects are listed in docs/parity.md, "Deviations from the article".
"""

from ddpm_torch.blocks import BlockAttention, ConvNextBlock, DownSample, SinusoidalPosEmb, Upsample
from ddpm_torch.diffusion import DiffusionModel
from ddpm_torch.schedules import cosine_beta_schedule, linear_beta_schedule, sigmoid_beta_schedule
from ddpm_torch.unets import AttentionUNet, OneResUNet, TwoResUNet

UNETS = {"OneResUNet": OneResUNet, "TwoResUNet": TwoResUNet, "AttentionUNet": AttentionUNet}

__all__ = [
    "AttentionUNet",
    "BlockAttention",
    "ConvNextBlock",
    "DiffusionModel",
    "DownSample",
    "OneResUNet",
    "SinusoidalPosEmb",
    "TwoResUNet",
    "UNETS",
    "Upsample",
    "cosine_beta_schedule",
    "linear_beta_schedule",
    "sigmoid_beta_schedule",
]
