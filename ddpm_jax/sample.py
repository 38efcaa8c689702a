"""Images from any checkpoint `checkpoints.load_model` reads: a workdir, a model directory, a torch file.

Settings not given come from the run the checkpoint belongs to (its config.json), else from TrainConfig's
defaults. The prediction target comes from the checkpoint (config.json, model.json); a torch file records none,
so it is `prediction`, else eps (the article's). The `ddpm-sample` command (cli.py) writes the result as a grid and
single PNGs.
"""

import sys
from pathlib import Path

import jax
import numpy as np

from ddpm_jax import diffusion, runtime
from ddpm_jax.checkpoints import load_model, recorded_prediction
from ddpm_jax.config import TrainConfig, check_image_size, check_schedule
from ddpm_jax.workdirs import run_config

DEFAULTS = TrainConfig()  # the settings used where a checkpoint has no run config beside it


def sample_checkpoint(checkpoint, num: int, *, sampler: str | None = None, steps: int | None = None,
                      eta: float | None = None, seed: int = 0, image_size: int | None = None,
                      schedule: str | None = None, timesteps: int | None = None, ema: bool = True,
                      spacing: str = "linspace", prediction: str | None = None, progress: bool = False) -> np.ndarray:
    """`num` images as float32 (num, S, S, C) in [0, 1] (unclipped), split over the devices where they divide
    evenly (called before JAX has started, on a CPU, it first gives JAX one device per core:
    `runtime.use_cpu_cores_as_devices`). A bad value is a ValueError naming its flag, raised before the model
    is loaded; so is a `prediction` other than the one the checkpoint records. progress: a progress bar on stderr
    (`diffusion.sample`)."""
    for flag, value in (("num", num), ("steps", steps), ("image-size", image_size), ("timesteps", timesteps)):
        if value is not None and value <= 0:
            raise ValueError(f"--{flag} {value}: expected a positive integer")
    runtime.use_cpu_cores_as_devices(num)
    checkpoint = Path(checkpoint)
    is_file = not checkpoint.is_dir()
    run = None if is_file else run_config(checkpoint)
    recorded = recorded_prediction(checkpoint)
    if prediction is not None:
        diffusion.check_prediction(prediction)
        if recorded not in (None, prediction):
            raise ValueError(f"--prediction {prediction}: {checkpoint} records a model trained to predict {recorded}; "
                             f"leave --prediction out")
    run = run or DEFAULTS
    image_size, timesteps = image_size or run.image_size, timesteps or run.timesteps
    settings = diffusion.sampler_settings(sampler or run.sampler, timesteps=timesteps, steps=steps or run.sampling_steps,
                                          eta=run.eta if eta is None else eta, spacing=spacing,
                                          prediction=recorded or prediction or "eps")
    noise_schedule = check_schedule(schedule or run.schedule, timesteps)
    if is_file and prediction is None:
        print(f"{checkpoint} records no prediction target: sampling it as eps, the article's (--prediction x0|v for "
              f"a model trained otherwise)", file=sys.stderr)
    model, _ = load_model(checkpoint, ema=ema)
    check_image_size(image_size, len(model.downs))
    batch_sharding = runtime.replicate_for_sampling(model, num)
    images = diffusion.sample(model, noise_schedule, jax.random.key(seed), num, image_size, settings,
                              batch_sharding=batch_sharding, progress=progress)
    return np.asarray(images, np.float32)


if __name__ == "__main__":  # python -m ddpm_jax.sample
    from ddpm_jax.cli import sample_main

    sys.exit(sample_main())
