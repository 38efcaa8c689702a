"""The depthwise 2-D convolution of every ConvNeXt block, in four formulations chosen per backend.

XLA compiles `lax.conv_general_dilated(..., feature_group_count=C)` well on no backend it was measured on:

* on CPU it is many times slower than elementwise code doing the same arithmetic, forward and backward
  (jax#23713, flax#4207);
* on GPU its kernel gradient is cuDNN's grouped backward-filter kernel, as slow as a dense one
  (jax#13800), which dominated the article config's fp32 train step in a profile on an H200.

So the op has four implementations (`impl`); the measurements behind the choices are in docs/perf/decisions.md:

* "shift": shift-and-accumulate with a `jax.custom_vjp`. The forward sums, per tap, the padded input's
  slice times that tap's per-channel weights, in one elementwise fusion that vectorises over the (minor)
  channel axis; the input gradient is the same on the cotangent with the flipped kernel; the kernel
  gradient swaps the roles of image and kernel (each output pixel's window of the input, times the
  cotangent there, accumulated into a (B, kh, kw, C) buffer by a `fori_loop` over pixels). The default on CPU.
* "lax": XLA's grouped convolution and its own autodiff. The default elsewhere (on the GPU measured, the
  train step was slower with "shift").
* "swap": XLA's grouped convolution forward and input gradient, with the kernel gradient as one grouped
  convolution of the input by the cotangent with batch and channel swapped, so that each channel is
  its own group and the batch is what is summed (the rewrite of tracel-ai/burn#5422).
* "taps": the same forward and input gradient, with the kernel gradient as one batched matmul over the
  kh * kw taps (batch: channels; contraction: batch and pixels).

`depthwise_conv2d(..., impl="auto")` picks per lowering platform (`lax.platform_dependent`): `DEFAULT_IMPL`,
or on every platform the one named by the environment variable DDPM_JAX_DEPTHWISE when the module is
imported. All four agree within float32 rounding; tests force each on the CPU against lax and against float64.

Two entry points:

* `depthwise_conv2d(x_BHWC, kernel_HW1C, padding)`: NHWC input, flax-style HWIO kernel `(kh, kw, 1, C)`,
  stride 1, no dilation; bias is the caller's.
* `conv_general_dilated(...)`: the signature of `jax.lax.conv_general_dilated`; depthwise NHWC/HWIO
  calls with stride 1 and no dilation take `depthwise_conv2d` and everything else is passed to lax
  unchanged, so it can be given to any `nnx.Conv(..., conv_general_dilated=conv_general_dilated)`.

Not supported through the custom VJPs: forward-mode differentiation (`jax.jvp`, `jax.jacfwd`); use
`impl="lax"` for that.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["IMPLS", "conv_general_dilated", "depthwise_conv2d"]

IMPLS = ("shift", "lax", "swap", "taps")
# Measured fastest per lowering platform ("cpu", "cuda", "rocm", "tpu"); a platform not listed uses "lax".
# "swap" and "taps" have not yet been timed on a GPU (benchmarks/gpu_check.sh does).
DEFAULT_IMPL = {"cpu": "shift"}
_forced: str | None = None  # DDPM_JAX_DEPTHWISE: one impl on every platform

_NHWC_SPEC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))
_NHWC = ("NHWC", "HWIO", "NHWC")

Padding = int | str | Sequence[tuple[int, int]]


def _pads(padding: Padding, x_shape, kernel_shape) -> tuple[tuple[int, int], tuple[int, int]]:
    """((lo_h, hi_h), (lo_w, hi_w)) from an int, 'SAME'/'VALID', or explicit pairs."""
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x_shape[1:3], kernel_shape[:2], (1, 1), padding)
    elif isinstance(padding, (int, np.integer)):
        pads = [(int(padding), int(padding))] * 2
    else:
        pads = [(int(lo), int(hi)) for lo, hi in padding]
    if len(pads) != 2:
        raise ValueError(f"expected 2 spatial padding pairs, got {padding!r}")
    return (tuple(pads[0]), tuple(pads[1]))


def _compute_dtype(*dtypes):
    """Accumulate in float32 at least (bfloat16/float16 in, float32 math, cast back at the end)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _shift_accumulate(xp_BHWC, k_hwC, out_h, out_w, out_dtype):
    """y[b, h, w, c] = sum_ij xp[b, h + i, w + j, c] * k[i, j, c], one elementwise fusion per row block.

    The row blocks (two if out_h is even) are a `fori_loop` only so that XLA cannot fuse the sum into
    its consumers. Fused into a reduction (a GroupNorm's mean, `jnp.sum(y * ct)`), the tap sum is either recomputed
    inside XLA:CPU's scalar reduce loop or handed, with its 49 input slices materialised, to a YNNPACK
    reduce fusion; both are several times slower than writing `y` once from a vectorised loop. A while
    loop's result is a fusion boundary (an optimization_barrier is not: XLA:CPU drops it before fusion).
    """
    b, _, _, c = xp_BHWC.shape
    kh, kw, _ = k_hwC.shape
    n = next((d for d in range(2, out_h + 1) if out_h % d == 0), 1)  # smallest divisor > 1: 2 blocks if even
    rows = out_h // n

    def body(blk, y):
        acc = None
        for i in range(kh):
            for j in range(kw):
                # One dynamic slice per tap (not one block slice sliced 49 times) fuses into the loop.
                xs = lax.dynamic_slice(xp_BHWC, (0, blk * rows + i, j, 0), (b, rows, out_w, c))
                acc = xs * k_hwC[i, j] if acc is None else acc + xs * k_hwC[i, j]
        return lax.dynamic_update_slice_in_dim(y, acc.astype(out_dtype), blk * rows, axis=1)

    return lax.fori_loop(0, n, body, jnp.zeros((b, out_h, out_w, c), out_dtype))


def _pad_hw(x_BHWC, pads):
    """lax.pad on the two spatial axes; negative pads crop (needed by the input gradient)."""
    zero = jnp.zeros((), x_BHWC.dtype)
    return lax.pad(x_BHWC, zero, ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


def largest_divisor_at_most(n, cap):
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


@partial(jax.jit, static_argnums=(2, 3, 4))
def _kernel_grad(xp_BHWC, g_BHWC, kh, kw, max_terms=32):
    """dk[i, j, c] = sum_bhw xp[b, h + i, w + j, c] * g[b, h, w, c].

    Computed with the roles of image and kernel swapped: every output pixel (h, w) is a "tap" whose
    (kh, kw) window of xp, times g[:, h, w, :], is accumulated elementwise into acc[b, i, j, c]; the
    batch is summed at the end. A `fori_loop` walks the pixels `max_terms` at a time (a row or a
    chunk of one), each step one elementwise fusion that vectorises over channels and stays in cache.
    (Summing `x_shifted * g` per tap instead is a reduction over the whole activation per tap, which
    XLA:CPU runs as scalar code or as one memory-bound pass per tap: 2-4x slower.)
    """
    b, out_h, out_w, c = g_BHWC.shape
    chunk = largest_divisor_at_most(out_w, max_terms)
    n_chunks = out_w // chunk

    def body(n, acc):
        h, w0 = n // n_chunks, (n % n_chunks) * chunk
        for w in range(chunk):
            window = lax.dynamic_slice(xp_BHWC, (0, h, w0 + w, 0), (b, kh, kw, c))
            pixel = lax.dynamic_slice(g_BHWC, (0, h, w0 + w, 0), (b, 1, 1, c))
            acc = acc + window * pixel
        return acc

    acc = lax.fori_loop(0, out_h * n_chunks, body, jnp.zeros((b, kh, kw, c), xp_BHWC.dtype))
    return acc.sum(0)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dw_shift(x_BHWC, k_hwC, pads, out_dtype):
    ct = _compute_dtype(x_BHWC.dtype, k_hwC.dtype)
    xp = _pad_hw(x_BHWC.astype(ct), pads)
    out_h = xp.shape[1] - k_hwC.shape[0] + 1
    out_w = xp.shape[2] - k_hwC.shape[1] + 1
    return _shift_accumulate(xp, k_hwC.astype(ct), out_h, out_w, out_dtype)


def _dw_shift_fwd(x_BHWC, k_hwC, pads, out_dtype):
    return _dw_shift(x_BHWC, k_hwC, pads, out_dtype), (x_BHWC, k_hwC)


def _dw_shift_bwd(pads, out_dtype, res, g_BHWC):
    x_BHWC, k_hwC = res
    kh, kw, _ = k_hwC.shape
    _, h, w, _ = x_BHWC.shape
    ct = _compute_dtype(x_BHWC.dtype, k_hwC.dtype, g_BHWC.dtype)
    g = g_BHWC.astype(ct)
    # Input gradient: correlate g with the flipped kernel, g padded by (k - 1 - lo, k - 1 - hi).
    (lo_h, hi_h), (lo_w, hi_w) = pads
    gp = _pad_hw(g, ((kh - 1 - lo_h, kh - 1 - hi_h), (kw - 1 - lo_w, kw - 1 - hi_w)))
    dx = _shift_accumulate(gp, k_hwC.astype(ct)[::-1, ::-1], h, w, x_BHWC.dtype)
    dk = _kernel_grad(_pad_hw(x_BHWC.astype(ct), pads), g, kh, kw)
    return dx, dk.astype(k_hwC.dtype)


_dw_shift.defvjp(_dw_shift_fwd, _dw_shift_bwd)


def _check(x_BHWC, kernel_HW1C):
    if x_BHWC.ndim != 4 or kernel_HW1C.ndim != 4 or kernel_HW1C.shape[2] != 1:
        raise ValueError(f"expected x (B, H, W, C) and kernel (kh, kw, 1, C); got {x_BHWC.shape}, {kernel_HW1C.shape}")
    if kernel_HW1C.shape[3] != x_BHWC.shape[3]:
        raise ValueError(f"kernel has {kernel_HW1C.shape[3]} channels, input {x_BHWC.shape[3]}")


def _grouped_conv(x_BHWC, kernel_HW1C, pads, precision, preferred_element_type):
    dtype = jnp.result_type(x_BHWC.dtype, kernel_HW1C.dtype)
    return lax.conv_general_dilated(
        x_BHWC.astype(dtype), kernel_HW1C.astype(dtype), (1, 1), pads, dimension_numbers=_NHWC,
        feature_group_count=x_BHWC.shape[3], precision=precision, preferred_element_type=preferred_element_type,
    )


def _kernel_grad_swap(xp_BHWC, g_BHWC, precision):
    """dk[i, j, c] = sum_bhw xp[b, h + i, w + j, c] * g[b, h, w, c] as one grouped convolution: the input as a
    single image of C * B features (group c: channel c of every image), g as its (H, W, B, C) kernel."""
    b, hp, wp, c = xp_BHWC.shape
    lhs = xp_BHWC.transpose(1, 2, 3, 0).reshape(1, hp, wp, c * b)
    rhs = g_BHWC.astype(lhs.dtype).transpose(1, 2, 0, 3)
    out = lax.conv_general_dilated(lhs, rhs, (1, 1), "VALID", dimension_numbers=_NHWC, feature_group_count=c,
                                   precision=precision)
    return out[0]


def _kernel_grad_taps(xp_BHWC, g_BHWC, precision):
    """The same sum as a batched matmul: the kh * kw shifted views of the input stacked on a taps axis,
    contracted with g over batch and pixels, batched over channels."""
    _, h, w, c = g_BHWC.shape
    kh, kw = xp_BHWC.shape[1] - h + 1, xp_BHWC.shape[2] - w + 1
    taps = jnp.stack([xp_BHWC[:, i : i + h, j : j + w] for i in range(kh) for j in range(kw)])
    dk = jnp.einsum("tbhwc,bhwc->tc", taps, g_BHWC.astype(taps.dtype), precision=precision)
    return dk.reshape(kh, kw, c)


_KERNEL_GRADS = {"swap": _kernel_grad_swap, "taps": _kernel_grad_taps}


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _dw_lax_wgrad(x_BHWC, kernel_HW1C, pads, impl, precision, preferred_element_type):
    return _grouped_conv(x_BHWC, kernel_HW1C, pads, precision, preferred_element_type)


def _dw_lax_wgrad_fwd(x_BHWC, kernel_HW1C, pads, impl, precision, preferred_element_type):
    return _dw_lax_wgrad(x_BHWC, kernel_HW1C, pads, impl, precision, preferred_element_type), (x_BHWC, kernel_HW1C)


def _dw_lax_wgrad_bwd(pads, impl, precision, preferred_element_type, res, g_BHWC):
    x_BHWC, kernel_HW1C = res
    # The input gradient is XLA's own (a grouped convolution of g with the flipped kernel: a forward call).
    _, input_vjp = jax.vjp(lambda x: _grouped_conv(x, kernel_HW1C, pads, precision, preferred_element_type), x_BHWC)
    (dx,) = input_vjp(g_BHWC)
    ct = _compute_dtype(x_BHWC.dtype, kernel_HW1C.dtype, g_BHWC.dtype)
    dk = _KERNEL_GRADS[impl](_pad_hw(x_BHWC.astype(ct), pads), g_BHWC.astype(ct), precision)
    return dx, dk[:, :, None, :].astype(kernel_HW1C.dtype)


_dw_lax_wgrad.defvjp(_dw_lax_wgrad_fwd, _dw_lax_wgrad_bwd)


def _depthwise(impl, x_BHWC, kernel_HW1C, pads, preferred_element_type, precision):
    if impl == "shift":
        out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x_BHWC.dtype, kernel_HW1C.dtype))
        return _dw_shift(x_BHWC, kernel_HW1C[:, :, 0, :], pads, out_dtype)
    if impl == "lax":
        return _grouped_conv(x_BHWC, kernel_HW1C, pads, precision, preferred_element_type)
    return _dw_lax_wgrad(x_BHWC, kernel_HW1C, pads, impl, precision, preferred_element_type)


def _check_impl(impl):
    if impl not in IMPLS:
        raise ValueError(f"depthwise impl must be one of {IMPLS}, not {impl!r}")
    return impl


def depthwise_conv2d(x_BHWC, kernel_HW1C, padding: Padding = "SAME", *, impl: str = "auto",
                     preferred_element_type=None, precision=None):
    """Depthwise conv, stride 1: y[b,h,w,c] = sum_ij xpad[b, h+i, w+j, c] * kernel[i, j, 0, c].

    x_BHWC: (B, H, W, C); kernel_HW1C: (kh, kw, 1, C) as nnx.Conv stores it for feature_group_count=C;
    padding: an int p (p on every side), 'SAME'/'VALID', or ((lo_h, hi_h), (lo_w, hi_w)).
    impl: "auto" (per lowering platform: see the module docstring), or one of IMPLS.
    """
    _check(x_BHWC, kernel_HW1C)
    pads = _pads(padding, x_BHWC.shape, kernel_HW1C.shape)
    args = (x_BHWC, kernel_HW1C, pads, preferred_element_type, precision)
    if impl != "auto":
        return _depthwise(_check_impl(impl), *args)
    if _forced is not None:
        return _depthwise(_forced, *args)
    # Chosen when lowering, per platform: the CPU branch only exists in CPU executables.
    def branch(impl):
        return lambda x, k: _depthwise(impl, x, k, *args[2:])

    return lax.platform_dependent(
        x_BHWC, kernel_HW1C, **{p: branch(i) for p, i in DEFAULT_IMPL.items()}, default=branch("lax")
    )


def _all_ones(v) -> bool:
    return v is None or all(int(s) == 1 for s in v)


def _is_nhwc_hwio(lhs, rhs, dimension_numbers) -> bool:
    if dimension_numbers is None:
        return False  # lax's default is NCHW/OIHW
    try:
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    except (TypeError, ValueError):
        return False
    return dn == _NHWC_SPEC


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    batch_group_count=1,
    precision=None,
    preferred_element_type=None,
    out_sharding=None,
):
    """`jax.lax.conv_general_dilated`, with 2-D NHWC depthwise stride-1 convs routed to `depthwise_conv2d`.

    Pass it as `nnx.Conv(..., conv_general_dilated=conv_general_dilated)`. Calls that are not a 2-D
    NHWC/HWIO depthwise conv (kernel (kh, kw, 1, C), feature_group_count == C) with unit strides and
    dilations go to `lax.conv_general_dilated` unchanged.
    """
    fast = (
        lhs.ndim == 4
        and rhs.ndim == 4
        and batch_group_count == 1
        and out_sharding is None
        and _all_ones(window_strides)
        and _all_ones(lhs_dilation)
        and _all_ones(rhs_dilation)
        and _is_nhwc_hwio(lhs, rhs, dimension_numbers)
        and rhs.shape[2] == 1
        and feature_group_count == lhs.shape[3] == rhs.shape[3]
        and feature_group_count > 1
    )
    if not fast:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
            batch_group_count=batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type, out_sharding=out_sharding,
        )
    return depthwise_conv2d(lhs, rhs, padding, preferred_element_type=preferred_element_type, precision=precision)


if os.environ.get("DDPM_JAX_DEPTHWISE"):
    if os.environ["DDPM_JAX_DEPTHWISE"] not in IMPLS:
        raise ValueError(f"DDPM_JAX_DEPTHWISE={os.environ['DDPM_JAX_DEPTHWISE']!r}: expected one of {IMPLS}")
    _forced = os.environ["DDPM_JAX_DEPTHWISE"]

