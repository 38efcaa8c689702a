"""Sample images from any checkpoint `load_model` reads: a workdir, a model directory, a torch .pt.

    python -m ddpm_jax.sample --checkpoint runs/default --num 16 --sampler ddim --steps 50 --out grid.png
"""

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from ddpm_jax import cli, diffusion
from ddpm_jax.config import TrainConfig, read_json
from ddpm_jax.convert import ConversionError, load_model
from ddpm_jax.schedules import SCHEDULES


def _run_config(checkpoint: Path) -> TrainConfig | None:
    """The training config next to a workdir or one of its checkpoints, for defaults; None elsewhere."""
    for folder in (checkpoint, checkpoint.parent.parent):
        if (folder / "config.json").is_file():
            return TrainConfig.from_dict(read_json(folder / "config.json"), str(folder / "config.json"))
    return None


_DEFAULTS = TrainConfig()  # sampler settings when the checkpoint has no run config beside it


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m ddpm_jax.sample", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a training workdir, a checkpoints/<step> folder, "
                        "a model directory (convert to-flax) or a torch .pt/.pth")
    parser.add_argument("--num", type=int, default=16, help="number of images (default 16)")
    parser.add_argument("--sampler", choices=diffusion.SAMPLERS,
                        help=f"default: the run's, else {_DEFAULTS.sampler}")
    parser.add_argument("--steps", type=int, help=f"DDIM steps (default: the run's, else "
                        f"{_DEFAULTS.sampling_steps}; ddpm always runs T)")
    parser.add_argument("--eta", type=float, help="DDIM eta in [0, 1]: 0 deterministic, 1 fresh noise at every step "
                        f"(default: the run's, else {_DEFAULTS.eta:g})")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images")
    parser.add_argument("--image-size", type=int, help=f"default: the run's, else {_DEFAULTS.image_size}")
    parser.add_argument("--schedule", choices=sorted(SCHEDULES), help=f"default: the run's, else {_DEFAULTS.schedule}")
    parser.add_argument("--timesteps", type=int, help=f"default: the run's, else {_DEFAULTS.timesteps}")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights, not the EMA")
    parser.add_argument("--out", default="samples.png", help="grid PNG to write (default samples.png)")
    parser.add_argument("--out-dir", help="also write each image as <out-dir>/000000.png, ...")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    cli.one_line_warnings()
    from PIL import Image

    from ddpm_jax.training import (check_image_size, check_schedule, enable_compilation_cache,
                                   replicate_for_sampling, save_grid, use_cpu_cores_as_devices)

    args = parse_args(argv)
    try:
        for flag in ("num", "steps", "image_size", "timesteps"):
            value = getattr(args, flag)
            if value is not None and value <= 0:
                raise ValueError(f"--{flag.replace('_', '-')} {value}: expected a positive integer")
        # Where the images go is checked before the minutes of sampling, not after.
        out, out_dir = Path(args.out), args.out_dir and Path(args.out_dir)
        if out.suffix.lower() not in Image.registered_extensions() or out.is_dir():
            raise ValueError(f"--out {out}: expected an image file name, e.g. samples.png")
        if out_dir and out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"--out-dir {out_dir}: expected a folder, not a file")
        checkpoint = Path(args.checkpoint)
        run = (_run_config(checkpoint) if checkpoint.is_dir() else None) or _DEFAULTS
        sampler = args.sampler or run.sampler
        steps = args.steps or run.sampling_steps
        eta = run.eta if args.eta is None else args.eta
        if not 0 <= eta <= 1:
            raise ValueError(f"--eta {eta}: expected a number in [0, 1]")
        use_cpu_cores_as_devices(args.num)
        enable_compilation_cache()
        image_size = args.image_size or run.image_size
        timesteps = args.timesteps or run.timesteps
        if sampler == "ddim" and steps > timesteps:
            raise ValueError(f"--steps {steps}: expected at most the {timesteps} diffusion steps (--timesteps)")
        schedule = check_schedule(args.schedule or run.schedule, timesteps)
        model = load_model(checkpoint, ema=args.ema)
        check_image_size(image_size, len(model.downs))
        batch_sharding = replicate_for_sampling(model, args.num)
        images = diffusion.sample(model, schedule, jax.random.key(args.seed), args.num, image_size,
                                  sampler=sampler, steps=steps, eta=eta, batch_sharding=batch_sharding)
        images = np.asarray(images, np.float32)
        save_grid(images, out)
        if out_dir:
            out_dir.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate((np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)):
                Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(out_dir / f"{i:06d}.png")
    except (ConversionError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}" + (f" and {args.num} images in {args.out_dir}" if args.out_dir else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
