"""Configs as data: the model's shape and the training run, one comment per field.

A training workdir holds `config.json` (TrainConfig); a model directory holds `model.json`
(ModelConfig). Either alone says how to rebuild its model. This module is data: it imports neither jax nor the
image loaders, so reading a config is cheap; validation.py checks a TrainConfig against the registries.
"""

import dataclasses
import json
from pathlib import Path

from ddpm_jax import objectives

VARIANTS = ("OneResUNet", "TwoResUNet", "AttentionUNet")
LR_DECAYS = ("constant", "cosine")


def _from_dict(cls, d: dict, source: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown keys {unknown}; expected a subset of {sorted(names)}")
    return cls(**d)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a U-Net and to read its output."""

    variant: str = "TwoResUNet"  # OneResUNet | TwoResUNet | AttentionUNet
    dim: int = 64  # channels of the first level; the time embedding has 4 * dim
    init_dim: int | None = None  # channels after the stem conv: None or dim (the U-Nets need dim)
    out_dim: int | None = None  # output channels (None: channels)
    dim_mults: tuple[int, ...] = (1, 2, 4, 8)  # channels of level i are dim * dim_mults[i]
    channels: int = 3  # image channels
    sinusoidal_pos_emb_theta: int = 10000  # base of the sinusoidal time embedding
    prediction: str = "eps"  # what the output predicts: eps | x0 | v (diffusion.predict reads it), or edm
    edm: dict | None = None  # an edm model's constants (objectives.EDM's fields; unset: the defaults); else None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown model {self.variant!r}; expected one of {list(VARIANTS)}")
        if self.prediction not in objectives.PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r}; expected one of "
                             f"{list(objectives.PREDICTIONS)}")
        if objectives.family(self.prediction) != "edm":
            if self.edm is not None:
                raise ValueError(f"edm {self.edm}: a model of prediction {self.prediction} has no EDM constants")
        else:
            fields, given = objectives.EDM._fields, dict(self.edm or {})
            if set(given) - set(fields):
                raise ValueError(f"edm: unknown keys {sorted(set(given) - set(fields))}; expected {list(fields)}")
            object.__setattr__(self, "edm", objectives.EDM(**given)._asdict())
        if self.init_dim not in (None, self.dim):  # as in the article's code, whose forward fails the same way
            raise ValueError(
                f"init_dim {self.init_dim} with dim {self.dim}: expected init_dim = dim (or None). The U-Nets join "
                f"the stem's output to the last level's, and final_res_block takes 2 * dim channels."
            )
        object.__setattr__(self, "dim_mults", tuple(self.dim_mults))

    @property
    def edm_constants(self) -> objectives.EDM:
        """The EDM constants of an edm model (the defaults for any other, which does not read them)."""
        return objectives.EDM(**(self.edm or {}))

    @classmethod
    def from_dict(cls, d: dict, source: str = "model config") -> "ModelConfig":
        return _from_dict(cls, d, source)


def _field(default, help: str):
    """A config field whose help text is also the CLI's --help."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Saved as workdir/config.json; resuming checks it against the saved one."""

    data: str = _field("embedded", 'an image folder, a .npy file of uint8 images (N, S, S, C), memory-mapped, or '
                       '"embedded" for the built-in synthetic forest tiles')
    embedded_size: int = _field(2048, 'tiles generated when data is "embedded"')
    model: str = _field("TwoResUNet", 'U-Net variant')
    image_size: int = _field(32, 'training resolution (square)')
    channels: int | None = _field(None, 'image channels, 1 (grayscale) or 3 (RGB); unset: 1 when every image in '
                                  '--data is grayscale, else 3 (the embedded tiles are RGB)')
    dim: int = _field(16, 'U-Net base width')
    dim_mults: tuple[int, ...] = _field((1, 2, 2, 2), 'width multiplier per level')
    schedule: str = _field("linear", 'beta schedule: linear | cosine | sigmoid')
    timesteps: int = _field(1000, 'diffusion steps T')
    loss: str = _field("l2", 'l2 | l1 between the target and the network\'s output')
    prediction: str = _field("eps", 'what the network learns to output: eps (the noise, the article\'s) | x0 | v '
                             '(diffusers\' epsilon | sample | v_prediction), or edm: Karras et al. 2022\'s '
                             'preconditioned denoiser, trained at log-normal noise levels and sampled by heun or euler')
    loss_weight: str = _field("none", 'none | min-snr: each sample\'s loss weighted by min(SNR, gamma) / SNR for eps, '
                              'min(SNR, gamma) for x0, min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023)')
    snr_gamma: float = _field(5.0, 'the gamma of --loss-weight min-snr')
    offset_noise: float = _field(0.0, 'offset noise: S times one Gaussian value per image and channel added to the '
                                 'training noise (lucidrains\' offset_noise_strength); 0 disables')
    sigma_data: float = _field(0.5, 'edm: the data\'s standard deviation in the preconditioning')
    p_mean: float = _field(-1.2, 'edm: the mean of ln(sigma) in training')
    p_std: float = _field(1.2, 'edm: the standard deviation of ln(sigma) in training')
    c_noise_scale: float = _field(1.0, 'edm: the U-Net\'s time input is c_noise_scale * ln(sigma) / 4 (the paper: 1)')
    batch_size: int = _field(16, 'global batch, split over all devices')
    steps: int = _field(4500, 'optimizer steps in total')
    lr: float = _field(2e-3, 'AdamW learning rate (after warm-up); the article uses 1e-4')
    adam_b1: float = _field(0.9, "AdamW beta1 (the article's trainer)")
    adam_b2: float = _field(0.99, "AdamW beta2 (the article's trainer)")
    weight_decay: float = _field(0.01, 'AdamW decoupled weight decay')
    warmup_steps: int = _field(100, 'linear learning-rate warm-up')
    lr_decay: str = _field("cosine", 'learning rate after warm-up: constant | cosine (decays to 0 at --steps)')
    grad_clip: float = _field(1.0, 'global-norm gradient clipping; 0 disables')
    ema_decay: float = _field(0.995, 'EMA decay (upper bound of the warm-up below)')
    ema_every: int = _field(1, 'update the EMA every this many steps')
    ema_start: int = _field(100, 'copy the weights into the EMA until this step, then average (ema_pytorch)')
    save_every: int = _field(500, 'checkpoint every this many steps (and at the end)')
    keep_checkpoints: int = _field(3, 'newest checkpoints kept')
    sample_every: int = _field(500, 'sample a grid from the EMA weights every this many steps (and at the end)')
    num_samples: int = _field(16, 'images per sample grid')
    # The names and the default per family are diffusion.SAMPLERS' and DEFAULT_SAMPLERS', which --help lists.
    sampler: str | None = _field(None, "the sample grids' sampler")
    sampling_steps: int = _field(20, 'steps of ddim, the DPM-Solvers and EDM\'s samplers (ignored by ddpm)')
    eta: float = _field(1.0, 'DDIM eta in [0, 1]: 0 deterministic, 1 fresh noise at every step (DDPM-like)')
    s_churn: float = _field(0.0, 'EDM\'s samplers: churn, the fresh noise put back per step (Algorithm 2; 0: none)')
    precision: str = _field("fp32", 'fp32 | bf16 (bf16 compute, float32 parameters and optimizer state)')
    log_every: int = _field(25, 'metrics line (and non-finite check) every this many steps')
    seed: int = _field(0, 'seeds initialisation, data order, noise and timesteps')

    def __post_init__(self):
        object.__setattr__(self, "dim_mults", tuple(self.dim_mults))

    @property
    def model_config(self) -> ModelConfig:
        edm = objectives.family(self.prediction) == "edm"
        return ModelConfig(variant=self.model, dim=self.dim, dim_mults=self.dim_mults, channels=self.channels or 3,
                           prediction=self.prediction, edm=self.edm._asdict() if edm else None)

    @property
    def edm(self) -> objectives.EDM:
        return objectives.EDM(self.sigma_data, self.p_mean, self.p_std, self.c_noise_scale)

    @property
    def objective(self) -> objectives.Objective:
        return objectives.Objective(self.prediction, self.loss, self.loss_weight, self.snr_gamma, self.offset_noise,
                                    self.edm)

    @classmethod
    def from_dict(cls, d: dict, source: str = "train config") -> "TrainConfig":
        return _from_dict(cls, d, source)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"


# A resumed run must keep the fields that shape the model and those that define what it learns.
SHAPE_FIELDS = ("model", "image_size", "channels", "dim", "dim_mults")
OBJECTIVE_FIELDS = ("schedule", "timesteps", "prediction", "loss_weight", "snr_gamma", "offset_noise", "sigma_data",
                    "p_mean", "p_std", "c_noise_scale")
# Resuming with another value of these is allowed, with a warning: the run is no longer the one it began as.
RECIPE_FIELDS = ("loss", "batch_size", "seed")

PRESETS = {
    # About 15 minutes on a 2-core CPU (docs/training.md says what it reaches). A run this short needs the
    # higher learning rate (with warm-up, clipping and a cosine decay) and an EMA updated every step; its
    # samples are best with a sampler that draws fresh noise at every step: SDE-DPM-Solver++ at 20 steps scores
    # as DDIM-100 at eta 1 in a fifth of the time (docs/sampling.md, "Which sampler"). It learns v with Min-SNR-5
    # weights: over three seeds it beat eps, unweighted (the default before), beyond the spread with both
    # DPM-Solver++ forms, and unweighted v on every seed (docs/training.md, "Objectives: what was measured").
    # TrainConfig's own default stays eps, unweighted, the article's, which is also what a config.json written
    # before the objectives means.
    "default": TrainConfig(prediction="v", loss_weight="min-snr"),
    # The article's run: TwoResUNet dim 64 at 128 px, batch 16, T = 1000 linear, AdamW 1e-4 without warm-up,
    # decay or clipping, EMA every 10 steps, 37k steps, DDPM samples.
    "article": TrainConfig(
        image_size=128,
        dim=64,
        dim_mults=(1, 2, 4, 8),
        batch_size=16,
        lr=1e-4,
        warmup_steps=0,
        lr_decay="constant",
        grad_clip=0.0,
        ema_every=10,
        steps=37000,
        save_every=1000,
        sample_every=1000,
        sampler="ddpm",
    ),
}


def check_image_size(image_size: int, levels: int) -> None:
    """A U-Net of `levels` levels halves the image `levels - 1` times: the size must divide evenly."""
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size}: expected a multiple of {factor} "
                         f"(2^(levels-1) for {levels} levels)")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read a JSON config ({e})") from None
