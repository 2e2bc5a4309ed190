"""A drop-in ``lax.conv_general_dilated`` for ``flax.linen.Conv`` whose input gradient does not
copy the kernel when the kernel is the larger operand.

Forward, it *is* ``lax.conv_general_dilated``. Backward, autodiff computes the input gradient
as a convolution of the output gradient with the kernel flipped in space and with its input
and output features swapped. XLA:CPU's convolution kernels take the kernel only in its stored
layout, so XLA materialises that flipped, transposed copy in every training step: for the
paper's UNet (305M parameters, mostly 3x3 kernels at 4x4 to 8x8 latents) these copies were
the largest item of the train step's profile at batch 1 and 8 (docs/benchmarks.md).

Here the input gradient of a layer whose kernel holds at least as many elements per tap as
its output gradient (``out_features >= batch * out_height * out_width``: the deep, small-
spatial layers) is instead one matrix product with the kernel as stored as its left operand,
contracting the output features (``W[(kh*kw*I), O] . dy[B*Ho*Wo, O]^T``: only the small output
gradient is transposed), and a col2im sum of the ``kh * kw`` shifted slices. The math is the same sum of products in a
different order (float32: ~1e-6 relative); the kernel gradient of these layers is an im2col
product (``patches^T . dy``). Both products also multiply the zero padding (on a 4x4 map a
third of the taps), which XLA's convolutions skip: more executed FLOPs, less time.
Large-spatial layers keep XLA's own gradients, which are faster there.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from cfm_jax import xla_order

# flax.linen.Conv passes NHWC / HWIO as these ConvDimensionNumbers.
_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1), out_spec=(0, 3, 1, 2))


def _conv(x, w, strides, padding, precision):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC_HWIO, precision=precision)


def use_gemm_gradients(x_shape, w_shape, strides, padding) -> bool:
    """Whether the gradients are computed as matrix products (static shapes): the kernel
    has at least as many elements per tap (``in * out``) as the output gradient (``B*Ho*Wo *
    out``), i.e. ``out_features >= batch * out_height * out_width``."""
    b, h, w, _ = x_shape
    kh, kw, _, o = w_shape
    ho = (h + padding[0][0] + padding[0][1] - kh) // strides[0] + 1
    wo = (w + padding[1][0] + padding[1][1] - kw) // strides[1] + 1
    return o >= b * ho * wo


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_gemm_grad(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision)


def _fwd(x, w, strides, padding, precision):
    return _conv(x, w, strides, padding, precision), (x, w)


def _bwd(strides, padding, precision, res, dy):
    x, w = res
    if not use_gemm_gradients(x.shape, w.shape, strides, padding):
        return xla_order.bilinear_vjp(lambda x_, w_: _conv(x_, w_, strides, padding, precision), x, w, dy)
    b, h, wd, i = x.shape
    kh, kw, _, o = w.shape
    ho, wo = dy.shape[1:3]
    (pt, pb), (pl, pr) = padding
    sy, sx = strides
    hp, wp = max(h + pt + pb, sy * (ho - 1) + kh), max(wd + pl + pr, sx * (wo - 1) + kw)
    with jax.named_scope("conv_kernel_grad"):
        # im2col: patches[b, y, x, k, i] = padded x at (sy*y + ky, sx*x + kx); dw = patches^T dy.
        xp = jnp.pad(xla_order.after(x, dy), ((0, 0), (pt, hp - h - pt), (pl, wp - wd - pl), (0, 0)))
        patches = jnp.stack([xp[:, ky:ky + sy * (ho - 1) + 1:sy, kx:kx + sx * (wo - 1) + 1:sx, :]
                             for ky in range(kh) for kx in range(kw)], axis=3)
        dw = jnp.einsum("bhwki,bhwo->kio", patches, dy, precision=precision,
                        preferred_element_type=jnp.float32).reshape(w.shape).astype(w.dtype)
    # z[k, i, b, y, x] = sum_o w[k, i, o] * dy[b, y, x, o]: the kernel is the product's left
    # operand in its stored layout ([kh*kw*I, O], contracting its minor axis), so XLA copies
    # only the (small) output gradient into the right operand's layout.
    with jax.named_scope("conv_input_grad"):  # labels the HLO for profiles (bench/xla_profile.py)
        z = jnp.einsum("kio,bhwo->kibhw", w.reshape(kh * kw, i, o), dy, precision=precision,
                       preferred_element_type=jnp.float32)
    # col2im: tap (ky, kx) of output (y, x) reads padded input (sy*y + ky, sx*x + kx).
    dxp = jnp.zeros((i, b, hp, wp), z.dtype)
    for ky in range(kh):
        for kx in range(kw):
            dxp = dxp.at[:, :, ky:ky + sy * (ho - 1) + 1:sy, kx:kx + sx * (wo - 1) + 1:sx].add(z[ky * kw + kx])
    dx = jnp.transpose(dxp[:, :, pt:pt + h, pl:pl + wd], (1, 2, 3, 0)).astype(x.dtype)
    return dx, xla_order.after(dw, dx)  # the kernel's update waits for dx's read of it (xla_order)


_conv_gemm_grad.defvjp(_fwd, _bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` with the input gradient above for 2-D NHWC/HWIO convolutions
    with explicit padding, no dilation and one feature group (what the UNet's ``nn.Conv`` layers
    are); anything else goes to ``lax.conv_general_dilated`` unchanged."""
    if isinstance(padding, str) and lhs.ndim == 4 and dimension_numbers == _NHWC_HWIO:  # e.g. 'SAME' of a 1x1
        padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    plain = (lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1 and batch_group_count == 1
             and all(d in (None, 1) for d in (lhs_dilation or (1,))) and all(d in (None, 1) for d in (rhs_dilation or (1,)))
             and dimension_numbers == _NHWC_HWIO and preferred_element_type is None)
    if not plain:
        return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                        dimension_numbers, feature_group_count, batch_group_count,
                                        precision, preferred_element_type)
    padding = tuple((int(a), int(b)) for a, b in padding)
    return _conv_gemm_grad(lhs, rhs, tuple(int(s) for s in window_strides), padding, precision)
