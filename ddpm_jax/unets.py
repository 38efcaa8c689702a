"""Flax NNX mirror of the reference's U-Nets (ddpm_torch/unets.py); NHWC, called as `model(x_BHWC, t_B)`."""

import dataclasses
import functools

import jax.numpy as jnp
from flax import nnx

from ddpm_jax.blocks import BlockAttention, Conv, ConvNextBlock, DownSample, Linear, SinusoidalPosEmb, Upsample, gelu
from ddpm_jax.config import ModelConfig


class _UNet(nnx.Module):
    def __init__(
        self,
        dim,
        init_dim=None,
        out_dim=None,
        dim_mults=(1, 2, 4, 8),
        channels=3,
        sinusoidal_pos_emb_theta=10000,
        *,
        rngs: nnx.Rngs,
        dtype=None,
    ):
        self.channels = channels
        self.init_dim = dim if init_dim is None else init_dim
        self.init_conv = Conv(channels, self.init_dim, 7, padding=3, rngs=rngs, dtype=dtype)
        dims = [self.init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4
        self.time_mlp = nnx.Sequential(
            SinusoidalPosEmb(dim, theta=sinusoidal_pos_emb_theta),
            Linear(dim, time_dim, rngs=rngs, dtype=dtype),
            gelu,
            Linear(time_dim, time_dim, rngs=rngs, dtype=dtype),
        )

        def block(cin, cout):
            return ConvNextBlock(cin, cout, time_embedding_dim=time_dim, rngs=rngs, dtype=dtype)

        downs = []
        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind >= len(in_out) - 1
            down = (
                DownSample(dim_in, dim_out, rngs=rngs, dtype=dtype)
                if not is_last
                else Conv(dim_in, dim_out, 3, padding=1, rngs=rngs, dtype=dtype)
            )
            downs.append(nnx.List([block(dim_in, dim_in), block(dim_in, dim_in), down]))
        self.downs = nnx.List(downs)

        mid_dim = dims[-1]
        self.mid_block1 = ConvNextBlock(mid_dim, mid_dim, time_embedding_dim=time_dim, rngs=rngs, dtype=dtype)
        self.mid_block2 = ConvNextBlock(mid_dim, mid_dim, time_embedding_dim=time_dim, rngs=rngs, dtype=dtype)

        ups = []
        for ind, (dim_in, dim_out) in enumerate(reversed(in_out)):
            is_last = ind == len(in_out) - 1
            up = (
                Upsample(dim_out, dim_in, rngs=rngs, dtype=dtype)
                if not is_last
                else Conv(dim_out, dim_in, 3, padding=1, rngs=rngs, dtype=dtype)
            )
            ups.append(nnx.List([*self._up_level(ind, dim_in, dim_out, block, rngs, dtype), up]))
        self.ups = nnx.List(ups)

        self.out_dim = channels if out_dim is None else out_dim
        self.final_res_block = ConvNextBlock(dim * 2, dim, time_embedding_dim=time_dim, rngs=rngs, dtype=dtype)
        self.final_conv = Conv(dim, self.out_dim, 1, rngs=rngs, dtype=dtype)

    def _up_level(self, ind, dim_in, dim_out, block, rngs, dtype):
        """The modules of one up level before its upsample."""
        return [block(dim_out + dim_in, dim_out), block(dim_out + dim_in, dim_out)]

    def __call__(self, x_BHWC, t_B):
        assert x_BHWC.ndim == 4 and x_BHWC.shape[-1] == self.channels, (
            f"expected NHWC input with {self.channels} channels, got shape {x_BHWC.shape}"
        )
        assert t_B.shape == x_BHWC.shape[:1], f"expected one timestep per image, got t of shape {t_B.shape}"
        x = self.init_conv(x_BHWC)
        r = x
        t = self.time_mlp(t_B)
        x, unet_stack = self._down_path(x, t)
        x = self.mid_block1(x, t)
        x = self.mid_block2(x, t)
        x = self._up_path(x, t, unet_stack)
        x = jnp.concatenate((x, r), axis=-1)
        x = self.final_res_block(x, t)
        return self.final_conv(x)

    def _down_path(self, x, t):
        unet_stack = []
        for down1, down2, downsample in self.downs:
            x = down1(x, t)
            unet_stack.append(x)
            x = down2(x, t)
            unet_stack.append(x)
            x = downsample(x)
        return x, unet_stack

    def _up_path(self, x, t, unet_stack):
        for up1, up2, upsample in self.ups:
            x = jnp.concatenate((x, unet_stack.pop()), axis=-1)
            x = up1(x, t)
            x = jnp.concatenate((x, unet_stack.pop()), axis=-1)
            x = up2(x, t)
            x = upsample(x)
        return x


class TwoResUNet(_UNet):
    """The article's "Final Integration": two skips per level."""


class OneResUNet(_UNet):
    """One skip per level, pushed after the second down block; the second up block takes no skip."""

    def _up_level(self, ind, dim_in, dim_out, block, rngs, dtype):
        return [block(dim_out + dim_in, dim_out), block(dim_out, dim_out)]

    def _down_path(self, x, t):
        unet_stack = []
        for down1, down2, downsample in self.downs:
            x = down2(down1(x, t), t)
            unet_stack.append(x)
            x = downsample(x)
        return x, unet_stack

    def _up_path(self, x, t, unet_stack):
        for up1, up2, upsample in self.ups:
            x = jnp.concatenate((x, unet_stack.pop()), axis=-1)
            x = up2(up1(x, t), t)
            x = upsample(x)
        return x


class AttentionUNet(_UNet):
    """TwoResUNet whose skips are gated by BlockAttention (one per up level, shared by both of its skips)."""

    def _up_level(self, ind, dim_in, dim_out, block, rngs, dtype):
        attention = BlockAttention(dim_out, dim_in, 2 if ind > 0 else 1, rngs=rngs, dtype=dtype)
        return [attention, *super()._up_level(ind, dim_in, dim_out, block, rngs, dtype)]

    def _up_path(self, x, t, unet_stack):
        for attention, up1, up2, upsample in self.ups:
            x = jnp.concatenate((x, attention(unet_stack.pop(), x)), axis=-1)
            x = up1(x, t)
            x = jnp.concatenate((x, attention(unet_stack.pop(), x)), axis=-1)
            x = up2(x, t)
            x = upsample(x)
        return x


UNETS = {"OneResUNet": OneResUNet, "TwoResUNet": TwoResUNet, "AttentionUNet": AttentionUNet}


def build_model(config: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype=None) -> nnx.Module:
    """A U-Net for `config`: initialised from `rngs`, or abstract (shapes only) when rngs is None."""
    # Every field but the variant, which picks the class, and the prediction and EDM constants, which say how its
    # input and output are read.
    kwargs = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("variant", "prediction", "edm")}
    if rngs is None:
        return nnx.merge(*_abstract(config.variant, tuple(kwargs.items()), dtype), copy=True)  # its own Variables
    return UNETS[config.variant](**kwargs, rngs=rngs, dtype=dtype)


@functools.cache
def _abstract(variant: str, kwargs: tuple, dtype) -> tuple[nnx.GraphDef, nnx.State]:
    """The graph and the shapes of a U-Net, traced once per architecture and process: the trace costs seconds, as
    every parameter's initialiser is traced (flax's RNG counter asks each traced count for its sharding, and JAX
    builds an error message for each, from the whole trace so far)."""
    return nnx.split(nnx.eval_shape(lambda: UNETS[variant](**dict(kwargs), rngs=nnx.Rngs(0), dtype=dtype)))
