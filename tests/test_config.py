"""Model and run configurations: what a U-Net can be built with, and what reading one imports."""

import subprocess
import sys
from pathlib import Path

import pytest

from ddpm_jax.config import ModelConfig


def test_reading_a_config_imports_neither_jax_nor_flax_nor_pil():
    """config.py is data: a fresh interpreter that imports it and builds both configs has not loaded jax, flax or
    PIL (the diffusion math and the image loaders are below other modules)."""
    code = ("import sys; from ddpm_jax.config import PRESETS, ModelConfig, TrainConfig; "
            "ModelConfig(prediction='edm').edm_constants; PRESETS['default'].model_config; TrainConfig().objective; "
            "print(sorted(m for m in ('jax', 'flax', 'PIL') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_init_dim_other_than_dim_is_rejected_with_the_reason():
    assert ModelConfig(dim=8, init_dim=8).init_dim == 8 and ModelConfig(dim=8).init_dim is None
    with pytest.raises(ValueError, match=r"init_dim 16 with dim 8: expected init_dim = dim .*final_res_block"):
        ModelConfig(dim=8, init_dim=16)
