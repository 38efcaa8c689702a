"""Train the DDPM with JAX: `python train.py --help`. The logic lives in ddpm_jax/training.py."""

import sys

from ddpm_jax.training import main

if __name__ == "__main__":
    sys.exit(main())
