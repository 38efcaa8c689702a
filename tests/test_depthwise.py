"""ddpm_jax.depthwise: every depthwise formulation, forced on the CPU, against lax.conv_general_dilated(feature_group_count=C).

Tolerances are the project's: forward and input gradient max-abs <= 1e-5 on unit-scale inputs; the kernel
gradient, a sum over B*H*W products and so O(sqrt(B*H*W)) in size, is held to 1e-5 of its largest entry
(10x tighter than the parity suite's 1e-4 relative for gradients), against lax and against float64.

Inputs are made and errors measured in numpy, so that each test compiles only the programs under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from ddpm_jax import depthwise

TOL = 1e-5

# (x shape BHWC, kernel size, padding)
CASES = [
    ((2, 8, 8, 4), 7, 3),
    ((1, 9, 13, 16), 7, "SAME"),  # odd sizes: odd row-block split, uneven width chunks
    ((3, 12, 10, 8), 3, ((0, 2), (1, 1))),  # asymmetric padding
]


def inputs(shape, k, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    kernel = (rng.uniform(-1.0, 1.0, (k, k, 1, shape[3])) / k).astype(np.float32)  # torch's init scale
    return x, kernel


def output_and_grads(conv):
    """jit(x, kernel, cotangent -> (y, dx, dkernel)): one compile for the forward and both gradients."""

    def f(x, kernel, cotangent):
        y, vjp = jax.vjp(conv, x, kernel)
        return (y, *vjp(cotangent))

    return jax.jit(f)


def kernel_grad_f64(x, cotangent, k, pads):
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), pads[0], pads[1], (0, 0)))
    g = np.asarray(cotangent, np.float64)
    _, h, w, _ = g.shape
    return np.stack([[np.einsum("bhwc,bhwc->c", xp[:, i : i + h, j : j + w], g) for j in range(k)] for i in range(k)])


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rel(a, b):
    return max_abs(a, b) / float(np.max(np.abs(np.asarray(b, np.float64))))


def finite(*arrays):
    return all(np.isfinite(np.asarray(a, np.float32)).all() for a in arrays)


@pytest.mark.parametrize("impl", ["shift", "swap", "taps"])
@pytest.mark.parametrize("shape,k,padding", CASES)
def test_forward_and_gradients_match_lax(shape, k, padding, impl):
    x, kernel = inputs(shape, k)
    pads = depthwise._pads(padding, x.shape, kernel.shape)

    def ref(x, kernel):
        return lax.conv_general_dilated(
            x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=shape[3],
            precision=lax.Precision.HIGHEST,
        )

    out_shape = jax.eval_shape(ref, x, kernel).shape
    cotangent = np.random.default_rng(1).standard_normal(out_shape, dtype=np.float32)
    y, dx, dk = output_and_grads(lambda x, kernel: depthwise.depthwise_conv2d(x, kernel, padding, impl=impl))(
        x, kernel, cotangent
    )
    y_ref, dx_ref, dk_ref = output_and_grads(ref)(x, kernel, cotangent)
    assert (y.shape, y.dtype, dx.shape, dk.shape) == (y_ref.shape, y_ref.dtype, x.shape, kernel.shape)
    assert max_abs(y, y_ref) <= TOL
    assert max_abs(dx, dx_ref) <= TOL
    assert rel(dk, dk_ref) <= TOL
    assert rel(np.asarray(dk)[:, :, 0, :], kernel_grad_f64(x, cotangent, k, pads)) <= TOL


def test_pads():
    assert depthwise._pads(3, (2, 8, 8, 4), (7, 7, 1, 4)) == ((3, 3), (3, 3))
    assert depthwise._pads("SAME", (2, 8, 8, 4), (7, 7, 1, 4)) == ((3, 3), (3, 3))
    assert depthwise._pads("VALID", (2, 8, 8, 4), (3, 3, 1, 4)) == ((0, 0), (0, 0))
    assert depthwise._pads([(0, 2), (1, 1)], (2, 8, 8, 4), (3, 3, 1, 4)) == ((0, 2), (1, 1))


def test_a_forced_impl_replaces_the_per_platform_choice(monkeypatch):
    """What DDPM_JAX_DEPTHWISE sets at import (an unknown name is refused: the next test)."""
    x, kernel = inputs((2, 8, 8, 4), 7)

    def jaxpr(impl):
        monkeypatch.setattr(depthwise, "_forced", impl)
        return str(jax.make_jaxpr(jax.grad(lambda k: jnp.sum(depthwise.depthwise_conv2d(x, k, 3))))(kernel))

    auto, forced = jaxpr(None), jaxpr("taps")
    assert "platform_index" in auto and "platform_index" not in forced
    assert "dot_general" in forced and "dot_general" not in auto


def test_an_unknown_impl_in_the_environment_is_a_clear_error():
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", "import ddpm_jax.depthwise"], capture_output=True, text=True,
                         env={**__import__("os").environ, "DDPM_JAX_DEPTHWISE": "cudnn"})
    assert run.returncode != 0 and "DDPM_JAX_DEPTHWISE='cudnn': expected one of" in run.stderr


def test_auto_uses_the_shift_op_on_cpu():
    x, kernel = inputs((2, 8, 8, 4), 7)
    grads = jax.jit(jax.grad(lambda x, kernel: jnp.sum(depthwise.depthwise_conv2d(x, kernel, 3) ** 2), argnums=(0, 1)))
    compiled = grads.lower(x, kernel).compile()
    assert compiled(x, kernel)[1].shape == kernel.shape
    if jax.default_backend() == "cpu":
        assert "convolution" not in compiled.as_text()


def test_bfloat16_runs_and_is_close():
    x, kernel = inputs((2, 8, 8, 8), 7)
    xb, kb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    y, dx, dk = output_and_grads(lambda x, kernel: depthwise.depthwise_conv2d(x, kernel, 3))(xb, kb, xb)
    assert (y.dtype, dx.dtype, dk.dtype) == (jnp.bfloat16,) * 3
    assert finite(y, dx, dk)
    y_ref, _, _ = output_and_grads(lambda x, kernel: depthwise.depthwise_conv2d(x, kernel, 3, impl="lax"))(
        np.asarray(xb, np.float32), np.asarray(kb, np.float32), x
    )
    assert rel(y, y_ref) <= 1e-2
    # bf16 activations with float32 parameters promote; a float32 result on request.
    out = jax.eval_shape(
        lambda xb, kernel, kb: (
            depthwise.depthwise_conv2d(xb, kernel, 3),
            depthwise.depthwise_conv2d(xb, kb, 3, preferred_element_type=jnp.float32),
        ),
        xb, kernel, kb,
    )
    assert [o.dtype for o in out] == [jnp.float32, jnp.float32]


def conv_pair(c, k, padding, groups, dtype=None, **kw):
    """Two nnx.Conv with the same (numpy-made) parameters, the second given depthwise.conv_general_dilated."""

    def make(**extra):
        return nnx.eval_shape(
            lambda: nnx.Conv(
                c, c, (k, k), padding=padding, feature_group_count=groups, dtype=dtype, rngs=nnx.Rngs(0), **kw, **extra
            )
        )

    plain, fast = make(), make(conv_general_dilated=depthwise.conv_general_dilated)
    rng = np.random.default_rng(2)
    kernel = (rng.uniform(-1.0, 1.0, (k, k, c // groups, c)) / k).astype(np.float32)
    bias = (rng.uniform(-1.0, 1.0, (c,)) / k).astype(np.float32)
    for m in (plain, fast):
        m.kernel.value, m.bias.value = jnp.asarray(kernel), jnp.asarray(bias)
    return plain, fast


def test_nnx_conv_adapter_matches_plain_conv():
    c = 8
    plain, fast = conv_pair(c, 7, 3, c)
    x = np.random.default_rng(3).standard_normal((2, 12, 12, c), dtype=np.float32)

    @nnx.jit
    def output_and_grads(m, x):
        def loss(m, x):
            y = m(x)
            return jnp.sum(jnp.sin(y)), y

        (_, y), (g_m, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
        return y, g_x, g_m["kernel"][...], g_m["bias"][...]

    y, dx, dk, db = output_and_grads(fast, x)
    y_ref, dx_ref, dk_ref, db_ref = output_and_grads(plain, x)
    assert max_abs(y, y_ref) <= TOL
    assert max_abs(dx, dx_ref) <= TOL
    assert rel(dk, dk_ref) <= TOL
    assert rel(db, db_ref) <= TOL

    # bf16 compute with float32 parameters, as nnx.Conv(dtype=bfloat16) promotes them.
    plain16, fast16 = conv_pair(c, 7, 3, c, dtype=jnp.bfloat16)
    y16 = nnx.jit(lambda m, x: m(x))(fast16, x)
    assert y16.dtype == jnp.bfloat16 and finite(y16)
    assert rel(y16, y_ref) <= 1e-2


@pytest.mark.parametrize("groups,kw", [(8, {}), (1, {}), (8, {"strides": 2}), (8, {"kernel_dilation": 2}), (4, {})])
def test_nnx_conv_adapter_routes_only_depthwise_stride_1(groups, kw):
    """Depthwise stride-1 convs become the custom-VJP op (lax kept for non-CPU platforms); others are unchanged."""
    plain, fast = conv_pair(8, 3, 1, groups, **kw)
    x = jax.ShapeDtypeStruct((2, 8, 8, 8), jnp.float32)
    jaxpr, jaxpr_ref = (str(jax.make_jaxpr(lambda x, m=m: m(x))(x)) for m in (fast, plain))
    if groups == 8 and not kw:
        assert "custom_vjp_call" in jaxpr and "platform_index" in jaxpr
    else:
        assert jaxpr == jaxpr_ref
