"""Model and run configurations: what a U-Net can be built with."""

import pytest

from ddpm_jax.config import ModelConfig


def test_init_dim_other_than_dim_is_rejected_with_the_reason():
    assert ModelConfig(dim=8, init_dim=8).init_dim == 8 and ModelConfig(dim=8).init_dim is None
    with pytest.raises(ValueError, match=r"init_dim 16 with dim 8: expected init_dim = dim .*final_res_block"):
        ModelConfig(dim=8, init_dim=16)
