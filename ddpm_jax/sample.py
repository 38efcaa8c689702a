"""Images from any checkpoint `checkpoints.load_model` reads: a workdir, a model directory, a torch file.

Settings not given come from the run the checkpoint belongs to (its config.json), else from TrainConfig's
defaults. The prediction target and an EDM model's constants come from the checkpoint (config.json, model.json);
a torch file records neither, so the target is `prediction`, else eps (the article's), and an edm one has the
default constants. The `ddpm-sample` command (cli.py) writes the result as a grid and
single PNGs.
"""

import sys
from pathlib import Path

import jax
import numpy as np

from ddpm_jax import diffusion, runtime
from ddpm_jax.checkpoints import load_model, recorded_config
from ddpm_jax.config import TrainConfig, check_image_size
from ddpm_jax.schedules import check_schedule
from ddpm_jax.workdirs import run_config

DEFAULTS = TrainConfig()  # the settings used where a checkpoint has no run config beside it


def sample_checkpoint(checkpoint, num: int, *, sampler: str | None = None, steps: int | None = None,
                      eta: float | None = None, seed: int = 0, image_size: int | None = None,
                      schedule: str | None = None, timesteps: int | None = None, ema: bool = True,
                      spacing: str = "linspace", prediction: str | None = None, progress: bool = False,
                      **edm_settings) -> np.ndarray:
    """`num` images as float32 (num, S, S, C) in [0, 1] (unclipped), split over the devices where they divide
    evenly (called before JAX has started, on a CPU, it first gives JAX one device per core:
    `runtime.use_cpu_cores_as_devices`). A bad value is a ValueError naming its flag, raised before the model
    is loaded; so is a `prediction` other than the one the checkpoint records. progress: a progress bar on stderr
    (`diffusion.sample`). edm_settings: EDM's sampler settings (diffusion.EDM_SETTINGS; None: the run's s_churn,
    else the defaults)."""
    for flag, value in (("num", num), ("steps", steps), ("image-size", image_size), ("timesteps", timesteps)):
        if value is not None and value <= 0:
            raise ValueError(f"--{flag} {value}: expected a positive integer")
    runtime.use_cpu_cores_as_devices(num)
    checkpoint = Path(checkpoint)
    is_file = not checkpoint.is_dir()
    run = None if is_file else run_config(checkpoint)
    recorded = recorded_config(checkpoint)
    if prediction is not None:
        diffusion.check_prediction(prediction)
        if recorded is not None and recorded.prediction != prediction:
            raise ValueError(f"--prediction {prediction}: {checkpoint} records a model trained to predict "
                             f"{recorded.prediction}; leave --prediction out")
    run = run or DEFAULTS
    image_size, timesteps = image_size or run.image_size, timesteps or run.timesteps
    if edm_settings.get("s_churn") is None:
        edm_settings["s_churn"] = run.s_churn
    settings = diffusion.sampler_settings(
        sampler or run.sampler, timesteps=timesteps, steps=steps or run.sampling_steps,
        eta=run.eta if eta is None else eta, spacing=spacing,
        prediction=recorded.prediction if recorded else prediction or "eps",
        edm=recorded.edm_constants if recorded else diffusion.EDM(), **edm_settings)
    noise_schedule = check_schedule(schedule or run.schedule, timesteps)
    model, _ = load_model(checkpoint, ema=ema)
    if is_file and prediction is None:  # said once the file has loaded: an unreadable one is its error alone
        print(f"{checkpoint} records no prediction target: sampling it as eps, the article's (--prediction x0|v|edm "
              f"for a model trained otherwise)", file=sys.stderr)
    check_image_size(image_size, len(model.downs))
    batch_sharding = runtime.replicate_for_sampling(model, num)
    images = diffusion.sample(model, noise_schedule, jax.random.key(seed), num, image_size, settings,
                              batch_sharding=batch_sharding, progress=progress)
    return np.asarray(images, np.float32)


if __name__ == "__main__":  # python -m ddpm_jax.sample
    from ddpm_jax.cli import sample_main

    sys.exit(sample_main())
