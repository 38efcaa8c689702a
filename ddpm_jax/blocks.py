"""Flax NNX mirror of the reference's blocks (ddpm_torch/blocks.py), in NHWC.

Attribute names follow the reference so that a parameter's path, with NNX's `layers` level of
Sequential dropped, is its torch `state_dict` key. Three framework defaults are overridden to match
torch: exact (erf) GELU, GroupNorm epsilon 1e-5 with two-pass variance, and PyTorch's default
initialisation (uniform in +-1/sqrt(fan_in) for weights and biases).
"""

import math
from functools import partial

import jax
import jax.numpy as jnp
from einops import rearrange, repeat
from flax import nnx
from jax import lax

from ddpm_jax import depthwise

gelu = partial(jax.nn.gelu, approximate=False)


def _identity(x):
    return x


def _torch_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# kaiming_uniform(a=sqrt(5)) as torch uses: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def Conv(cin, cout, kernel_size, *, padding=0, groups=1, rngs, dtype=None):
    fan_in = cin // groups * kernel_size * kernel_size
    return nnx.Conv(
        cin,
        cout,
        (kernel_size, kernel_size),
        padding=padding,
        feature_group_count=groups,
        kernel_init=_torch_kernel_init,
        bias_init=_torch_bias_init(fan_in),
        dtype=dtype,
        rngs=rngs,
        # XLA:CPU's depthwise conv is many times slower than depthwise.py's shift-and-accumulate (forward and
        # backward; docs/perf/decisions.md); off CPU it resolves to lax. A static attribute: parameter paths and
        # checkpoints are unchanged.
        conv_general_dilated=depthwise.conv_general_dilated if groups > 1 else lax.conv_general_dilated,
    )


def Linear(cin, cout, *, rngs, dtype=None):
    return nnx.Linear(
        cin, cout, kernel_init=_torch_kernel_init, bias_init=_torch_bias_init(cin), dtype=dtype, rngs=rngs
    )


def GroupNorm1(num_features, *, rngs, dtype=None):
    """torch.nn.GroupNorm(1, C): one group, eps 1e-5, exact two-pass variance."""
    return nnx.GroupNorm(
        num_features, num_groups=1, epsilon=1e-5, use_fast_variance=False, dtype=dtype, rngs=rngs
    )


class ConvNextBlock(nnx.Module):
    def __init__(
        self, in_channels, out_channels, mult=2, time_embedding_dim=None, norm=True, *, rngs, dtype=None
    ):
        self.mlp = (
            nnx.Sequential(gelu, Linear(time_embedding_dim, in_channels, rngs=rngs, dtype=dtype))
            if time_embedding_dim
            else None
        )
        self.in_conv = Conv(in_channels, in_channels, 7, padding=3, groups=in_channels, rngs=rngs, dtype=dtype)
        self.block = nnx.Sequential(
            GroupNorm1(in_channels, rngs=rngs, dtype=dtype) if norm else _identity,
            Conv(in_channels, out_channels * mult, 3, padding=1, rngs=rngs, dtype=dtype),
            gelu,
            GroupNorm1(out_channels * mult, rngs=rngs, dtype=dtype),
            Conv(out_channels * mult, out_channels, 3, padding=1, rngs=rngs, dtype=dtype),
        )
        self.residual_conv = (
            Conv(in_channels, out_channels, 1, rngs=rngs, dtype=dtype) if in_channels != out_channels else None
        )

    def __call__(self, x_BHWC, time_embedding_BD=None):
        h = self.in_conv(x_BHWC)
        if self.mlp is not None and time_embedding_BD is not None:
            h = h + self.mlp(time_embedding_BD)[:, None, None, :]
        h = self.block(h)
        return h + (x_BHWC if self.residual_conv is None else self.residual_conv(x_BHWC))


class SinusoidalPosEmb(nnx.Module):
    def __init__(self, dim, theta=10000):
        self.dim = dim
        self.theta = theta

    def __call__(self, t_B):
        half_dim = self.dim // 2
        emb = math.log(self.theta) / (half_dim - 1)
        emb = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -emb)
        emb = t_B.astype(jnp.float32)[:, None] * emb[None, :]
        return jnp.concatenate((jnp.sin(emb), jnp.cos(emb)), axis=-1)


def space_to_depth(x_BHWC):
    """The reference's `b c (h p1) (w p2) -> b (c p1 p2) h w`, in NHWC: channel order stays (c, p1, p2)."""
    return rearrange(x_BHWC, "b (h p1) (w p2) c -> b h w (c p1 p2)", p1=2, p2=2)


def upsample_nearest(x_BHWC):
    return repeat(x_BHWC, "b h w c -> b (h p1) (w p2) c", p1=2, p2=2)


class DownSample(nnx.Module):
    def __init__(self, dim, dim_out=None, *, rngs, dtype=None):
        self.net = nnx.Sequential(
            space_to_depth, Conv(dim * 4, dim if dim_out is None else dim_out, 1, rngs=rngs, dtype=dtype)
        )

    def __call__(self, x_BHWC):
        return self.net(x_BHWC)


class Upsample(nnx.Module):
    def __init__(self, dim, dim_out=None, *, rngs, dtype=None):
        self.net = nnx.Sequential(
            upsample_nearest, Conv(dim, dim_out or dim, 3, padding=1, rngs=rngs, dtype=dtype)
        )

    def __call__(self, x_BHWC):
        return self.net(x_BHWC)


class BlockAttention(nnx.Module):
    """Attention gate of ACC-UNet: the skip `x` is scaled by a sigmoid map computed from `x` and the gate `g`."""

    def __init__(self, gate_in_channel, residual_in_channel, scale_factor, *, rngs, dtype=None):
        self.gate_conv = Conv(gate_in_channel, gate_in_channel, 1, rngs=rngs, dtype=dtype)
        self.residual_conv = Conv(residual_in_channel, gate_in_channel, 1, rngs=rngs, dtype=dtype)
        self.in_conv = Conv(gate_in_channel, 1, 1, rngs=rngs, dtype=dtype)
        self.scale_factor = scale_factor  # kept from the reference; unused in forward there too

    def __call__(self, x_BHWC, g_BHWC):
        in_attention = jax.nn.relu(self.gate_conv(g_BHWC) + self.residual_conv(x_BHWC))
        in_attention = jax.nn.sigmoid(self.in_conv(in_attention))
        return in_attention * x_BHWC
