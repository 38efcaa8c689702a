"""Shared set-up of the non-parity tests: one persistent XLA cache per session, shared with subprocesses."""

import os

import pytest

from ddpm_jax.runtime import enable_compilation_cache


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Tests reuse a handful of tiny configs; caching their compiled programs keeps the suite fast. The
    environment variable carries the folder to the train.py processes the tests start."""
    path = str(tmp_path_factory.mktemp("xla_cache"))
    os.environ["DDPM_JAX_COMPILATION_CACHE"] = path
    enable_compilation_cache()
    yield path
