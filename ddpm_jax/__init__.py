"""ddpm-jax: the article's DDPM in JAX/Flax NNX (NHWC), with weight conversion from and to its PyTorch code."""

import importlib

# Each name is imported from its module when first used, so that importing a light module (ddpm_jax.config, to
# read a config.json) does not start jax through this package's __init__.
_MODULES = {
    "AttentionUNet": "unets",
    "ModelConfig": "config",
    "OneResUNet": "unets",
    "Schedule": "schedules",
    "TrainConfig": "config",
    "TwoResUNet": "unets",
    "UNETS": "unets",
    "build_model": "unets",
    "load_model": "checkpoints",
    "make_schedule": "schedules",
    "save_model": "checkpoints",
}
__all__ = sorted(_MODULES)


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'ddpm_jax' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ddpm_jax.{_MODULES[name]}"), name)
