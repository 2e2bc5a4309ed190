"""Data dependencies that make XLA keep a buffer update in place.

The train step donates its state, so XLA writes each new parameter into the old parameter's
buffer. It may do so only after the last read of the old value, and its copy insertion
proves that order from data dependencies alone: two reads of a kernel are not ordered before
the write of its update by the data, so XLA copies every parameter at the start of the step
and works on the copies:

- the input gradient of a layer (``dx = dy . W^T``) reads the kernel, but the kernel's own
  gradient (``dw = x^T . dy``), which feeds its update, does not depend on ``dx``;
- the EMA reads the pre-update weights (the original's order), and nothing of the update
  depends on the new EMA.

In the paper train step at batch 8 (fp32, XLA:CPU) those copies were all 408 parameters,
1167 MiB, much of it live at the step's peak (docs/benchmarks.md, "Training memory").
``lax.optimization_barrier`` does not help: XLA:CPU removes barriers before copy insertion.
:func:`after` adds the missing dependency as arithmetic that leaves the value unchanged, on one
device (on a mesh of several it would cost a collective per layer; not done there).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax


def _one_device() -> bool:
    """Whether the program being traced runs on one device: no mesh set (``jax.set_mesh``), or a
    mesh of one device. On several devices one element of ``dep`` lives on one of them (``dx``
    is split over the batch, FSDP splits the weights), so reading it would add a collective per
    layer to the backward pass; there ``after`` adds nothing and XLA keeps its copies."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def after(x: jax.Array, dep: jax.Array) -> jax.Array:
    """``x``, computed only once ``dep`` is: ``x + min(|dep[0]|, 0)``. The added term is
    ``+0`` for every non-NaN ``dep`` (so ``x`` keeps its value; only a ``-0.0`` element of
    ``x`` becomes ``+0.0``) and NaN when ``dep``'s first element is NaN. Costs one scalar read
    of ``dep`` and an add that XLA fuses into ``x``'s consumer. ``x`` itself, unchanged, when
    traced under a mesh of several devices (see :func:`_one_device`)."""
    if not _one_device():
        return x
    s = jnp.ravel(dep)[0]
    return x + jnp.minimum(jnp.abs(s), 0).astype(x.dtype)


def bilinear_vjp(f, x, w, dy):
    """``(dx, dw)`` of ``f(x, w)`` at ``dy`` (``f`` linear in each: a convolution or a matrix
    product), autodiff's own, ordered for in-place weight updates: the layouts the backward
    products need (transposed copies of ``x`` and ``w``) are made once ``dy`` exists, not early
    in the step, and ``dw`` waits for ``dx``'s read of ``w``."""
    _, vjp = jax.vjp(f, after(x, dy), after(w, dy))
    dx, dw = vjp(dy)
    return dx, after(dw, dx)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _dot(x, w, dimension_numbers, precision):
    return lax.dot_general(x, w, dimension_numbers, precision=precision)


def _dot_fwd(x, w, dimension_numbers, precision):
    return lax.dot_general(x, w, dimension_numbers, precision=precision), (x, w)


def _dot_bwd(dimension_numbers, precision, res, dy):
    return bilinear_vjp(lambda a, b: lax.dot_general(a, b, dimension_numbers, precision=precision), *res, dy)


_dot.defvjp(_dot_fwd, _dot_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """``lax.dot_general`` (a drop-in for ``flax.linen.Dense``'s ``dot_general``) whose backward
    pass is ordered for in-place weight updates: the same products, in the same order, as
    autodiff's."""
    if preferred_element_type is not None:
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
    (lc, rc), (lb, rb) = dimension_numbers
    dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return _dot(lhs, rhs, dims, precision)
