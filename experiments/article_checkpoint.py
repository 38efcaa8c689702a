"""An article-format trainer checkpoint to convert: the `article` preset's U-Net (TwoResUNet dim 64, dim_mults
1,2,4,8) built by the reference with seeded random weights, saved as the article's trainer saves it
({"step", "model", "opt", "ema", "version"}, EMA weights differing from the raw ones).

    python experiments/article_checkpoint.py model-37.pt
    ddpm-convert to-flax model-37.pt flax_model/          # prints the check's worst difference
    ddpm-convert to-torch flax_model/ unet.safetensors
"""

import argparse

import torch

import ddpm_torch
from ddpm_jax.config import PRESETS


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="the .pt file to write")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config = PRESETS["article"]
    unets = []
    for seed in (args.seed, args.seed + 1):  # raw, EMA
        torch.manual_seed(seed)
        unets.append(ddpm_torch.UNETS[config.model](config.dim, dim_mults=config.dim_mults))
    raw, ema = (ddpm_torch.DiffusionModel(u, config.image_size, timesteps=config.timesteps) for u in unets)
    ema_state = {f"ema_model.{k}": v for k, v in ema.state_dict().items()}
    ema_state.update(initted=torch.tensor(True), step=torch.tensor(37000))
    opt = torch.optim.Adam(raw.parameters(), lr=config.lr).state_dict()
    torch.save({"step": 37000, "model": raw.state_dict(), "opt": opt, "ema": ema_state, "version": "1.0"}, args.out)
    print(f"wrote {args.out}: {config.model} dim {config.dim} dim_mults {list(config.dim_mults)}, "
          f"{sum(p.numel() for p in unets[0].parameters()):,} parameters")


if __name__ == "__main__":
    main()
