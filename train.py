"""Train the DDPM with JAX: `python train.py --help`. The command is in ddpm_jax/cli.py, the loop in training.py."""

import sys

from ddpm_jax.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
