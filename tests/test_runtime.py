"""ddpm_jax.runtime: the XLA:CPU compile options of training and of run-once programs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from ddpm_jax import runtime


def _conv_grad_hlo(**jit_kwargs):
    x, w = np.ones((2, 8, 8, 16), np.float32), np.ones((3, 3, 16, 32), np.float32)

    def loss(x, w):
        return jnp.sum(lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

    return jax.jit(jax.grad(loss, argnums=(0, 1)), **jit_kwargs).lower(x, w).compile().as_text()


@pytest.fixture
def fresh_options():
    """training_compiler_options is cached per process: recompute it here, and forget what the test saw."""
    runtime.training_compiler_options.cache_clear()
    yield
    runtime.training_compiler_options.cache_clear()


def test_training_options_take_dense_convolutions_off_ynnpack(monkeypatch, fresh_options):
    options = runtime.training_compiler_options()
    assert "xla_cpu_experimental_ynn_fusion_type" in options
    assert "__ynn" in _conv_grad_hlo() and "__ynn" not in _conv_grad_hlo(compiler_options=options)

    # One JAX device per core: Eigen single-threaded as well.
    monkeypatch.setattr(jax, "local_device_count", lambda: 2)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    runtime.training_compiler_options.cache_clear()
    assert runtime.training_compiler_options()["xla_cpu_multi_thread_eigen"] is False

    # A jaxlib that does not know an option gets none rather than a failed compile.
    monkeypatch.setattr(runtime, "_CPU_OPTIONS", {"xla_cpu_no_such_option": "1"})
    runtime.training_compiler_options.cache_clear()
    assert runtime.training_compiler_options() == {}


def test_run_once_options_keep_the_initialisation_up_to_float32_rounding():
    """Initialisers compiled without LLVM's optimisations: the same weights up to float32 rounding (a few ulps)."""
    def init():
        rngs = nnx.Rngs(3)
        layers = [nnx.Conv(16, 32, (3, 3), rngs=rngs), nnx.Linear(32, 64, rngs=rngs), nnx.Conv(4, 4, (7, 7), rngs=rngs)]
        return [p for p in jax.tree.leaves(nnx.state(layers, nnx.Param)) if p.ndim > 1]  # the random ones

    assert runtime.run_once_compiler_options() == {"xla_backend_optimization_level": 0}  # on this CPU
    quick = jax.jit(init, compiler_options=runtime.run_once_compiler_options())()
    optimised = jax.jit(init)()
    for q, o in zip(quick, optimised, strict=True):
        assert q.dtype == o.dtype == jnp.float32 and np.abs(np.asarray(o)).max() > 0
        np.testing.assert_allclose(q, o, rtol=1e-6, atol=0)
