"""The check of a TrainConfig before anything compiles: allowed values, ranges, and each concept's own check where
it lives (the data source's in ddpm_jax.data, the sampler's in diffusion, the schedule's in schedules). config.py
stays data; this module may import what the checks need.
"""

from ddpm_jax import data, diffusion
from ddpm_jax.config import LR_DECAYS, VARIANTS, TrainConfig, check_image_size
from ddpm_jax.objectives import LOSS_WEIGHTS, LOSSES, family
from ddpm_jax.schedules import SCHEDULES, Schedule, check_schedule

# The allowed values of TrainConfig's fields, read by the command line (argparse's choices) and by `validate`; the
# sampler settings (sampler, sampling_steps, eta, prediction) are checked by diffusion.sampler_settings alone.
CHOICES = {
    "model": VARIANTS,
    "schedule": tuple(sorted(SCHEDULES)),
    "loss": LOSSES,
    "loss_weight": LOSS_WEIGHTS,
    "precision": ("fp32", "bf16"),
    "lr_decay": LR_DECAYS,
    "channels": (1, 3),  # or None: from the data
}
POSITIVE = ("steps", "timesteps", "batch_size", "dim", "image_size", "save_every", "sample_every", "num_samples",
            "log_every", "ema_every", "keep_checkpoints", "embedded_size", "lr", "snr_gamma", "sigma_data", "p_std",
            "c_noise_scale")
NON_NEGATIVE = ("warmup_steps", "ema_start", "seed", "weight_decay", "grad_clip", "offset_noise")
UNIT_INTERVAL = ("adam_b1", "adam_b2", "ema_decay")  # [0, 1)


def validate(config: TrainConfig, num_devices: int) -> Schedule:
    """Every value checked before anything compiles; a ValueError names the flag and what is allowed. Returns the
    run's noise schedule (checking it means building it)."""
    def need(ok, field, expected):
        if not ok:
            raise ValueError(f"--{field.replace('_', '-')} {getattr(config, field)}: expected {expected}")

    for field, allowed in CHOICES.items():
        value = getattr(config, field)
        need(value in allowed or (field == "channels" and value is None), field, f"one of {list(allowed)}")
    data.check_trainable(config.data, config.channels)

    def kind(field):  # of the field's declared type, not of the value given
        return "integer" if isinstance(getattr(TrainConfig, field), int) else "number"

    for field in POSITIVE:
        need(getattr(config, field) > 0, field, f"a positive {kind(field)}")
    for field in NON_NEGATIVE:
        note = " (0 disables clipping)" if field == "grad_clip" else ""
        need(getattr(config, field) >= 0, field, f"a non-negative {kind(field)}{note}")
    for field in UNIT_INTERVAL:
        need(0 <= getattr(config, field) < 1, field, "a number in [0, 1)")
    need(config.dim_mults and all(m > 0 for m in config.dim_mults), "dim_mults", "positive integers, e.g. 1,2,4,8")
    need(config.dim % 2 == 0 and config.dim >= 4, "dim", "an even integer >= 4 (the time embedding halves it)")
    check_image_size(config.image_size, len(config.dim_mults))
    need(config.batch_size % num_devices == 0, "batch_size", f"a multiple of the device count ({num_devices})")
    if family(config.prediction) == "edm":  # EDM's loss is its own: l2, weighted by lambda(sigma)
        for field, default in (("loss", "l2"), ("loss_weight", "none"), ("offset_noise", 0.0)):
            need(getattr(config, field) == default, field, f"{default} with --prediction edm, whose loss is the "
                 f"paper's (l2, weighted by (sigma^2 + sigma_data^2) / (sigma sigma_data)^2)")
    sampler_settings(config)
    return check_schedule(config.schedule, config.timesteps)


def sampler_settings(config: TrainConfig) -> diffusion.SamplerSettings:
    """The run's sample grids' sampler, checked (a ValueError names the flag)."""
    return diffusion.sampler_settings(config.sampler, timesteps=config.timesteps, steps=config.sampling_steps,
                                      eta=config.eta, prediction=config.prediction, steps_flag="--sampling-steps",
                                      edm=config.edm, s_churn=config.s_churn)
