"""The UNet's layers written for speed: cfm_jax/models/conv.py equals lax.conv_general_dilated
forward and backward (reference: JAX's own autodiff of it), on both gradient paths; the
UNet's GroupNorm equals PyTorch's torch.nn.functional.group_norm, forward and backward."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from cfm_jax.models import conv

DN = ("NHWC", "HWIO", "NHWC")


def _lax(x, w, strides, padding):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=DN)


def _ours(x, w, strides, padding):
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    return conv.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)


# (batch, size, in, out, kernel, stride, padding): gemm path where out >= batch * Ho * Wo
CASES = [
    (1, 4, 96, 64, 3, 1, ((1, 1), (1, 1))),    # gemm
    (2, 6, 32, 80, 3, 2, ((1, 1), (1, 1))),    # gemm, stride 2 (the Downsample conv)
    (1, 5, 48, 40, 3, 1, ((0, 0), (0, 0))),    # gemm, VALID (reflect/replicate padding_mode)
    (1, 4, 24, 16, 1, 1, ((0, 0), (0, 0))),    # gemm, 1x1 (skip connection)
    (2, 8, 16, 8, 3, 1, ((1, 1), (1, 1))),     # XLA's own gradient (activations larger)
]


@pytest.mark.parametrize("b,s,ci,co,k,stride,padding", CASES)
def test_values_and_gradients_match_lax(b, s, ci, co, k, stride, padding):
    kx, kw, kd = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, (b, s, s, ci))
    w = jax.random.normal(kw, (k, k, ci, co)) / np.sqrt(k * k * ci)
    strides = (stride, stride)
    y_ref, vjp_ref = jax.vjp(lambda x, w: _lax(x, w, strides, padding), x, w)
    y, vjp = jax.vjp(lambda x, w: _ours(x, w, strides, padding), x, w)
    np.testing.assert_array_equal(y, y_ref)  # the forward is lax's
    dy = jax.random.normal(kd, y.shape)
    for got, want in zip(vjp(dy), vjp_ref(dy)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_path_choice_and_no_kernel_copy_on_the_gemm_path():
    assert conv.use_gemm_gradients((1, 4, 4, 96), (3, 3, 96, 64), (1, 1), ((1, 1), (1, 1)))  # 64 >= 16
    assert not conv.use_gemm_gradients((2, 8, 8, 16), (3, 3, 16, 8), (1, 1), ((1, 1), (1, 1)))  # 8 < 128
    x, w = jnp.ones((1, 4, 4, 96)), jnp.ones((3, 3, 96, 64))

    def grad_hlo(fn):
        return jax.jit(jax.grad(lambda x, w: jnp.sum(fn(x, w, (1, 1), ((1, 1), (1, 1))) ** 2), argnums=0)) \
            .lower(x, w).compile().as_text()

    # autodiff flips the kernel (a reversed copy); the gemm path reads it as stored
    assert " reverse(" in grad_hlo(_lax)
    assert " reverse(" not in grad_hlo(_ours)


def test_bfloat16_gradients_close_to_float32():
    x = jax.random.normal(jax.random.PRNGKey(1), (1, 4, 4, 64))
    w = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 64, 64)) / 24.0
    pad = ((1, 1), (1, 1))

    def loss(fn, dtype):
        return lambda x, w: jnp.sum(fn(x.astype(dtype), w.astype(dtype), (1, 1), pad).astype(jnp.float32) ** 2)

    ref = jax.grad(loss(_lax, jnp.float32), argnums=(0, 1))(x, w)
    got = jax.grad(loss(_ours, jnp.bfloat16), argnums=(0, 1))(x, w)
    for g, r in zip(got, ref):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, r, rtol=0.05, atol=0.05 * float(jnp.max(jnp.abs(r))))


def test_flax_conv_uses_it_and_other_convolutions_fall_back():
    layer = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)), conv_general_dilated=conv.conv_general_dilated)
    ref = nn.Conv(8, (3, 3), padding=((1, 1), (1, 1)))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 6, 4))
    params = ref.init(jax.random.PRNGKey(4), x)
    np.testing.assert_array_equal(layer.apply(params, x), ref.apply(params, x))
    # a string padding becomes lax's explicit pads (then this path); a dilated kernel is lax's own convolution
    w = jnp.ones((3, 3, 4, 8))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    for kw in (dict(padding="SAME"), dict(padding=((2, 2), (2, 2)), rhs_dilation=(2, 2))):
        np.testing.assert_array_equal(
            conv.conv_general_dilated(x, w, (1, 1), dimension_numbers=dn, **kw),
            lax.conv_general_dilated(x, w, (1, 1), dimension_numbers=dn, **kw))


@pytest.mark.parametrize("shape,dtype", [((2, 6, 6, 64), "float32"), ((1, 4, 4, 96), "float32"),
                                         ((2, 6, 6, 64), "bfloat16")])
def test_group_norm_matches_torch_forward_and_backward(shape, dtype):
    import torch

    from cfm_jax.models.unet import GroupNorm

    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    scale, bias = 1 + 0.1 * rng.standard_normal(shape[-1]), 0.1 * rng.standard_normal(shape[-1])
    dy = rng.standard_normal(shape).astype(np.float32)
    params = {"params": {"scale": jnp.asarray(scale, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}}
    layer = GroupNorm(dtype=jnp.dtype(dtype))
    y, vjp = jax.vjp(lambda p, x: layer.apply(p, x.astype(dtype)).astype(jnp.float32), params, jnp.asarray(x))
    dp, dx = vjp(jnp.asarray(dy))
    assert layer.apply(params, jnp.asarray(x, dtype)).dtype == jnp.dtype(dtype)

    xt = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)  # reference in fp64
    wt = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.group_norm(xt, 32, wt, bt, eps=1e-5)
    yt.backward(torch.tensor(dy.transpose(0, 3, 1, 2), dtype=torch.float64))
    tol = 1e-5 if dtype == "float32" else 3e-2
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=tol, atol=tol)
    if dtype == "float32":  # bf16 inputs: the gradient reaches x through a bf16 cast
        np.testing.assert_allclose(dx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["params"]["scale"], wt.grad.numpy(), rtol=tol, atol=tol * 10)
    np.testing.assert_allclose(dp["params"]["bias"], bt.grad.numpy(), rtol=tol, atol=tol * 10)


def test_group_norm_per_channel_product_is_the_repeat_bit_for_bit():
    # GroupNorm expands [B, G] statistics to channels with a 0/1 product (unet._per_channel),
    # not jnp.repeat, for XLA:CPU's sake: the values must be those of the repeat exactly.
    from cfm_jax.models.unet import _per_channel

    rng = np.random.default_rng(0)
    for b, g, c, ndim in [(2, 32, 64, 4), (3, 32, 2048, 4), (1, 4, 12, 3)]:
        stats = rng.standard_normal((b, g)) * np.exp(rng.uniform(-30, 30, (b, g)))  # magnitudes 1e-13 .. 1e13
        stats[0, 0], stats[-1, -1] = -0.0, np.finfo(np.float32).tiny
        stats = stats.astype(np.float32)
        like = jnp.zeros((b,) + (2,) * (ndim - 2) + (c,))
        out = jax.jit(_per_channel)(jnp.asarray(stats), like)
        assert out.shape == (b,) + (1,) * (ndim - 2) + (c,)
        np.testing.assert_array_equal(np.asarray(out).reshape(b, c), np.repeat(stats, c // g, axis=-1))
    # a non-finite statistic spreads over its sample's channels (0 * nan), not to other samples
    stats = np.ones((2, 4), np.float32)
    stats[0, 1] = np.nan
    out = np.asarray(_per_channel(jnp.asarray(stats), jnp.zeros((2, 1, 1, 8)))).reshape(2, 8)
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
