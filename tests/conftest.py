"""Shared set-up of the non-parity tests: one persistent XLA cache per session, shared with subprocesses."""

import os

import jax
import pytest


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Tests reuse a handful of tiny configs; caching their compiled programs keeps the suite fast."""
    path = str(tmp_path_factory.mktemp("xla_cache"))
    os.environ["DDPM_JAX_COMPILATION_CACHE"] = path
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield path
