"""experiments/compare_trainers.py: its PyTorch loop must schedule the learning rate and EMA as the JAX trainer."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import pytest

from ddpm_jax import train_state
from ddpm_jax.config import PRESETS, TrainConfig

_spec = importlib.util.spec_from_file_location(
    "compare_trainers", Path(__file__).resolve().parents[1] / "experiments" / "compare_trainers.py"
)
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

CONFIGS = [PRESETS["default"], PRESETS["article"], TrainConfig(warmup_steps=0, ema_every=10, ema_start=0),
           TrainConfig(lr_decay="cosine", steps=3000), TrainConfig(lr_decay="cosine", warmup_steps=0, steps=150),
           TrainConfig(lr_decay="cosine", warmup_steps=100, steps=60)]
STEPS = [0, 1, 5, 9, 10, 11, 99, 100, 101, 110, 150, 2999, 100_000]


@pytest.mark.parametrize("config", CONFIGS, ids=["default", "article", "no-warmup", "cosine", "cosine-no-warmup", "cosine-ends-in-warmup"])
def test_torch_loop_schedules_match_the_jax_trainer(config):
    for step in STEPS:
        assert compare.torch_ema_decay(config, step) == pytest.approx(
            float(train_state.ema_decay(config, jnp.int32(step))), abs=1e-6)
        assert compare.torch_lr_factor(config, step) * config.lr == pytest.approx(
            float(train_state.learning_rate(config)(jnp.int32(step))), rel=1e-6, abs=1e-10)
