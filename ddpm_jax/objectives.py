"""What a network is trained to output, as plain data: the prediction targets and their two families, the losses
and their weights, and EDM's constants. diffusion.py does the math with them; config.py reads them without
importing jax.
"""

from typing import NamedTuple

LOSSES = ("l2", "l1")
DDPM_PREDICTIONS = ("eps", "x0", "v")  # the DDPM family's targets
EDM_PREDICTION = "edm"  # the EDM family's preconditioned denoiser
PREDICTIONS = (*DDPM_PREDICTIONS, EDM_PREDICTION)  # what --prediction takes
DIFFUSERS_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}  # their prediction_type
LOSS_WEIGHTS = ("none", "min-snr")


def family(prediction: str) -> str:
    """The family a model of `prediction` belongs to: "edm" or "ddpm"; the one place that decides."""
    return "edm" if prediction == EDM_PREDICTION else "ddpm"


class EDM(NamedTuple):
    """The EDM family's constants (Karras et al. 2022, Table 1), recorded with the model."""

    sigma_data: float = 0.5  # the data's standard deviation the preconditioning assumes
    p_mean: float = -1.2  # training: ln(sigma) ~ N(p_mean, p_std^2)
    p_std: float = 1.2
    c_noise_scale: float = 1.0  # the U-Net's time input is c_noise = c_noise_scale * ln(sigma) / 4 (paper: 1)


class Objective(NamedTuple):
    """What the network is trained to output and how its error is weighted; hashable (a static argument of jit)."""

    prediction: str = "eps"  # the target: eps | x0 | v, or edm (the EDM family)
    loss: str = "l2"  # l2 | l1 between the target and the output
    loss_weight: str = "none"  # none | min-snr (Hang et al. 2023)
    snr_gamma: float = 5.0  # min-snr's gamma
    offset_noise: float = 0.0  # std of one Gaussian value per image and channel added to the training noise
    edm: EDM = EDM()  # the EDM family's constants (read by edm only)
