"""The article's U-Nets: TwoResUNet ("Final Integration"), OneResUNet and AttentionUNet.

All three share the article's constructor and its stem, time MLP, middle and head; they differ in how many
skips each level pushes and whether an attention gate filters a skip before it is concatenated.
"""

import torch
from torch import nn

from ddpm_torch.blocks import BlockAttention, ConvNextBlock, DownSample, SinusoidalPosEmb, Upsample, default


class _UNet(nn.Module):
    def __init__(
        self,
        dim,
        init_dim=None,
        out_dim=None,
        dim_mults=(1, 2, 4, 8),
        channels=3,
        sinusoidal_pos_emb_theta=10000,
    ):
        super().__init__()
        self.channels = channels
        self.init_dim = default(init_dim, dim)
        self.init_conv = nn.Conv2d(channels, self.init_dim, 7, padding=3)
        dims = [self.init_dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:]))
        time_dim = dim * 4
        self.time_mlp = nn.Sequential(
            SinusoidalPosEmb(dim, theta=sinusoidal_pos_emb_theta),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        def block(cin, cout):
            return ConvNextBlock(cin, cout, time_embedding_dim=time_dim)

        self.downs = nn.ModuleList([])
        self.ups = nn.ModuleList([])
        for ind, (dim_in, dim_out) in enumerate(in_out):
            is_last = ind >= len(in_out) - 1
            down = DownSample(dim_in, dim_out) if not is_last else nn.Conv2d(dim_in, dim_out, 3, padding=1)
            self.downs.append(nn.ModuleList([block(dim_in, dim_in), block(dim_in, dim_in), down]))

        mid_dim = dims[-1]
        self.mid_block1 = ConvNextBlock(mid_dim, mid_dim, time_embedding_dim=time_dim)
        self.mid_block2 = ConvNextBlock(mid_dim, mid_dim, time_embedding_dim=time_dim)

        for ind, (dim_in, dim_out) in enumerate(reversed(in_out)):
            is_last = ind == len(in_out) - 1
            up = Upsample(dim_out, dim_in) if not is_last else nn.Conv2d(dim_out, dim_in, 3, padding=1)
            self.ups.append(nn.ModuleList([*self._up_level(ind, dim_in, dim_out, block), up]))

        self.out_dim = default(out_dim, channels)
        self.final_res_block = ConvNextBlock(dim * 2, dim, time_embedding_dim=time_dim)
        self.final_conv = nn.Conv2d(dim, self.out_dim, 1)

    def _up_level(self, ind, dim_in, dim_out, block):
        """The modules of one up level before its upsample."""
        return [block(dim_out + dim_in, dim_out), block(dim_out + dim_in, dim_out)]

    def forward(self, x, time):
        x = self.init_conv(x)
        r = x.clone()
        t = self.time_mlp(time)
        x, unet_stack = self._down_path(x, t)
        x = self.mid_block1(x, t)
        x = self.mid_block2(x, t)
        x = self._up_path(x, t, unet_stack)
        x = torch.cat((x, r), dim=1)
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
            x = torch.cat((x, unet_stack.pop()), dim=1)
            x = up1(x, t)
            x = torch.cat((x, unet_stack.pop()), dim=1)
            x = up2(x, t)
            x = upsample(x)
        return x


class TwoResUNet(_UNet):
    """The article's "Final Integration": two skips per level."""


class OneResUNet(_UNet):
    """One skip per level, pushed after the second down block; the second up block takes no skip."""

    def _up_level(self, ind, dim_in, dim_out, block):
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
            x = torch.cat((x, unet_stack.pop()), dim=1)
            x = up2(up1(x, t), t)
            x = upsample(x)
        return x


class AttentionUNet(_UNet):
    """TwoResUNet whose skips are gated by BlockAttention (one per up level, shared by both of its skips)."""

    def _up_level(self, ind, dim_in, dim_out, block):
        attention = BlockAttention(dim_out, dim_in, 2 if ind > 0 else 1)
        return [attention, *super()._up_level(ind, dim_in, dim_out, block)]

    def _up_path(self, x, t, unet_stack):
        for attention, up1, up2, upsample in self.ups:
            x = torch.cat((x, attention(unet_stack.pop(), x)), dim=1)
            x = up1(x, t)
            x = torch.cat((x, attention(unet_stack.pop(), x)), dim=1)
            x = up2(x, t)
            x = upsample(x)
        return x
