"""ddpm-jax: the article's DDPM in JAX/Flax NNX (NHWC), with weight conversion from and to its PyTorch code."""

from ddpm_jax.checkpoints import load_model, save_model
from ddpm_jax.config import ModelConfig, TrainConfig
from ddpm_jax.schedules import Schedule, make_schedule
from ddpm_jax.unets import UNETS, AttentionUNet, OneResUNet, TwoResUNet, build_model

__all__ = [
    "AttentionUNet",
    "ModelConfig",
    "OneResUNet",
    "Schedule",
    "TrainConfig",
    "TwoResUNet",
    "UNETS",
    "build_model",
    "load_model",
    "make_schedule",
    "save_model",
]
