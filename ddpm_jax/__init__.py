"""ddpm-jax: the article's DDPM in JAX/Flax NNX (NHWC), with weight conversion from and to its PyTorch code."""

import importlib

from ddpm_jax.config import ModelConfig, TrainConfig
from ddpm_jax.schedules import Schedule, make_schedule
from ddpm_jax.unets import UNETS, AttentionUNet, OneResUNet, TwoResUNet, build_model

# Imported on first use (PEP 562): importing ddpm_jax.convert here would put it in sys.modules before
# `python -m ddpm_jax.convert` runs it, which runpy warns about.
_FROM_CONVERT = ("load_model", "save_model")

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


def __getattr__(name: str):
    if name in _FROM_CONVERT:
        return getattr(importlib.import_module("ddpm_jax.convert"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
