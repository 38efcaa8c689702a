"""Shared set-up of the non-parity tests: one persistent XLA cache per session, shared with subprocesses, and
one tiny training run that the trainer's tests start from."""

import dataclasses
import os

import pytest

from ddpm_jax import training
from ddpm_jax.config import PRESETS
from ddpm_jax.runtime import enable_compilation_cache

# One small U-Net level: compiling dominates these tests, and TINY and TINY_FLAGS describe the same run so
# that every test and subprocess reuses the programs in the session's compilation cache (TINY_FLAGS start from
# the default preset, so TINY does).
TINY = dataclasses.replace(
    PRESETS["default"], model="OneResUNet", dim=8, dim_mults=(1,), image_size=16, batch_size=4, steps=8,
    warmup_steps=2, save_every=4, sample_every=1000, sampling_steps=2, num_samples=4, log_every=2,
    embedded_size=32, timesteps=100,
)
TINY_FLAGS = [
    "--model", "OneResUNet", "--dim", "8", "--dim-mults", "1", "--image-size", "16", "--batch-size", "4",
    "--warmup-steps", "2", "--save-every", "4", "--sample-every", "1000", "--sampling-steps", "2",
    "--num-samples", "4", "--log-every", "2", "--embedded-size", "32", "--timesteps", "100", "--no-progress",
]
# TINY with a constant learning rate, so that its train step does not depend on --steps, with another loss than the
# default preset's (v unweighted, plus offset noise) and DDIM grids: the tests that extend, interrupt, prolong or
# poison a run, and the one that follows an objective through to ddpm-sample, share its programs.
CONSTANT = dataclasses.replace(TINY, lr_decay="constant", loss_weight="none", offset_noise=0.1, sampler="ddim")
CONSTANT_FLAGS = [*TINY_FLAGS, "--lr-decay", "constant", "--loss-weight", "none", "--offset-noise", "0.1",
                  "--sampler", "ddim"]


# The train.py and ddpm-sample processes the tests start run on one device, as this process does, so that they
# find its compiled programs in the cache (a 2-device program is another program). Tests of the device count
# set or clear the variable themselves.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "1")


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Tests reuse a handful of tiny configs; caching their compiled programs keeps the suite fast. The
    environment variable carries the folder to the train.py processes the tests start."""
    path = str(tmp_path_factory.mktemp("xla_cache"))
    os.environ["DDPM_JAX_COMPILATION_CACHE"] = path
    enable_compilation_cache()
    yield path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """TINY trained in one go on one device, in this process: (workdir, final state), with the checkpoints of
    steps 4 and 8. Tests copy the workdir."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    return workdir, training.train(TINY, workdir, progress=False)
