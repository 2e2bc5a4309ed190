"""Analytic FLOP count of the EfficientUNet (cfm_jax/flops.py) against XLA's cost analysis.

Two references, both from the traced network (shapes only, nothing allocated or compiled):
* every conv and matmul of the jaxpr lowered alone and costed by XLA: the analytic
  count must equal their sum *exactly*, which checks the architecture walk op by op;
* the cost analysis of the whole jitted forward (and of a jitted value_and_grad),
  which also charges elementwise ops, converts and reductions: agreement within the
  tolerances below.
"""
import functools
import importlib

import jax
import jax.extend as jex
import jax.numpy as jnp
import ml_collections
import pytest

from cfm_jax.flops import model_tflops_per_device, train_flops_per_example, unet_forward_flops
from cfm_jax.models import unet
from cfm_jax.model import build_unet
from configs.common import base_config
from configs.quickstart import get_config as quickstart_config

B = 2  # fixed batch: the count must scale with it as XLA's does


def _paper_model():
    return importlib.import_module("configs.flow400_64-128.unet_base_psu").get_config().model


SMALL = dict(in_channels=6, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=(1, 2),
             attention_resolutions=(2,), num_heads=2, dim_head=16, use_linear_attn=False,
             use_scale_shift_norm=True, dropout=0.0, conv_resample=True, pool_factor=-1,
             dtype="float32", param_dtype="float32")


def _small(**changes):
    def make():
        c = base_config().model
        c.update({**SMALL, **changes})
        return c
    return make


# name -> (model config factory, latent size). Together they cover every branch of the
# walk: softmax / linear attention (and the middle block's always-softmax attention),
# scale-shift or additive embedding, conv or pooled resampling, pool_factor 2 and 4
# (patch conv + transposed conv), skip convs, context concatenated or not, dropout.
CASES = {
    "paper_128": (_paper_model, 128),
    "paper_64": (_paper_model, 64),
    "quickstart_64": (lambda: quickstart_config().model, 64),
    "small_softmax": (_small(), 16),
    "small_linear_attn_full_res": (_small(use_linear_attn=True, attention_resolutions=(1, 2),
                                          num_res_blocks=2), 16),
    "small_no_scale_shift_avgpool": (_small(use_scale_shift_norm=False, conv_resample=False), 16),
    "small_pool2_three_levels": (_small(pool_factor=2, channel_mult=(1, 2, 2),
                                        attention_resolutions=(1, 4)), 32),
    "small_pool4_avgpool_dropout": (_small(pool_factor=4, conv_resample=False, dropout=0.1), 32),
}

# Tolerances, measured with jax/jaxlib 0.10.2 (analytic / XLA), since GroupNorm expands its
# statistics to the channels with small products (models/unet.py `_per_channel`), which XLA counts:
# * matmul-only count (the default) vs the whole forward: 0.9966 and 0.9953 (paper at
#   128 and 64), 0.992 (quickstart), 0.970-0.979 (small variants). The residual is the
#   elementwise work XLA charges (GroupNorm, SiLU, softmax, bias and residual adds, bf16
#   converts, GroupNorm's expansion products), larger in thin networks; the count never
#   exceeds XLA's.
MATMUL_ONLY_MIN_RATIO = 0.96
# * with `include_elementwise=True`: 0.994-1.0001 for every case.
WITH_ELEMENTWISE_RTOL = 0.01
# * jitted value_and_grad vs 3x the analytic forward: 1.0032 / 1.0048 (paper), 1.007
#   (quickstart), 1.022-1.033 (small), again XLA's elementwise work (now also in the
#   backward); against 3x the count with elementwise: 0.994-1.001.
GRAD_RTOL = 0.04
GRAD_WITH_ELEMENTWISE_RTOL = 0.015


def _abstract_inputs(cfg, size):
    net = build_unet(cfg)
    ctx_ch = cfg.in_channels - cfg.out_channels
    x = jax.ShapeDtypeStruct((B, size, size, cfg.out_channels), jnp.float32)
    ctx = jax.ShapeDtypeStruct((B, size, size, ctx_ch), jnp.float32) if ctx_ch else None
    t = jax.ShapeDtypeStruct((B,), jnp.float32)
    params = jax.eval_shape(net.init, jax.random.PRNGKey(0), x, t, ctx)["params"]
    return net, (params, x, t, ctx)


@functools.cache
def _case(name):
    make_cfg, size = CASES[name]
    return make_cfg(), size


@functools.cache
def _xla_forward(name):
    """(whole-forward flops, sum of the flops of each conv/matmul lowered alone)."""
    cfg, size = _case(name)
    net, args = _abstract_inputs(cfg, size)
    fwd = lambda p, x, t, ctx: net.apply({"params": p}, x, t, ctx)  # noqa: E731
    whole = jax.jit(fwd).lower(*args).cost_analysis()["flops"]

    per_op_cache, total = {}, 0
    jaxprs = [jax.make_jaxpr(fwd)(*args).jaxpr]
    while jaxprs:
        jaxpr = jaxprs.pop()
        jaxprs.extend(jex.core.subjaxprs(jaxpr))
        for eqn in jaxpr.eqns:
            if eqn.primitive.name not in ("dot_general", "conv_general_dilated"):
                continue
            if unet.GROUP_SUMS_SCOPE in str(eqn.source_info.name_stack):
                continue  # GroupNorm's statistics as a product with ones: not a model FLOP
            avals = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
            key = (eqn.primitive.name, tuple((a.shape, str(a.dtype)) for a in avals),
                   repr(sorted(eqn.params.items())))
            if key not in per_op_cache:
                prim, params = eqn.primitive, eqn.params
                per_op_cache[key] = jax.jit(lambda *a: prim.bind(*a, **params)).lower(*avals).cost_analysis()["flops"]
            total += per_op_cache[key]
    return whole, total


@pytest.mark.parametrize("name", CASES)
def test_convs_and_matmuls_equal_xla_op_by_op(name):
    cfg, size = _case(name)
    _, per_op = _xla_forward(name)
    assert unet_forward_flops(cfg, size, B) == int(per_op)


@pytest.mark.parametrize("name", CASES)
def test_forward_close_to_xla_cost_analysis(name):
    cfg, size = _case(name)
    whole, _ = _xla_forward(name)
    ratio = unet_forward_flops(cfg, size, B) / whole
    assert MATMUL_ONLY_MIN_RATIO <= ratio <= 1.0, ratio
    ratio_all = unet_forward_flops(cfg, size, B, include_elementwise=True) / whole
    assert ratio_all == pytest.approx(1.0, rel=WITH_ELEMENTWISE_RTOL)


@pytest.mark.parametrize("name", CASES)
def test_train_is_three_forwards_and_close_to_xla_value_and_grad(name, monkeypatch):
    """The model's FLOPs: XLA's count of autodiff's gradient. cfm_jax/models/conv.py computes the
    gradients of kernel-heavy layers as GEMMs that also multiply the zero padding (up to 13%
    more executed FLOPs on these small maps, 4% on the paper's 64² latents), so its own
    gradient is switched off here to count the math, not the kernels."""
    from cfm_jax.models import conv

    monkeypatch.setattr(conv, "use_gemm_gradients", lambda *a: False)
    cfg, size = _case(name)
    forward = unet_forward_flops(cfg, size)
    assert train_flops_per_example(cfg, size) == 3 * forward

    net, args = _abstract_inputs(cfg, size)
    loss = lambda p, x, t, ctx: jnp.mean(net.apply({"params": p}, x, t, ctx) ** 2)  # noqa: E731
    grad_flops = jax.jit(jax.value_and_grad(loss)).lower(*args).cost_analysis()["flops"]
    assert B * train_flops_per_example(cfg, size) == pytest.approx(grad_flops, rel=GRAD_RTOL)
    with_ew = 3 * unet_forward_flops(cfg, size, B, include_elementwise=True)
    assert with_ew == pytest.approx(grad_flops, rel=GRAD_WITH_ELEMENTWISE_RTOL)


def test_paper_config_numbers():
    cfg = _paper_model()
    # 437 GFLOP per example at 128² (XLA: 438.2 with elementwise work), 105 at 64².
    assert unet_forward_flops(cfg, 128) == 436_820_946_944
    assert unet_forward_flops(cfg, 64) == 105_219_534_848
    assert train_flops_per_example(cfg, 128) == 1_310_462_840_832
    assert unet_forward_flops(cfg, 128, batch_size=64) == 64 * 436_820_946_944
    # Dense count (padding taps multiplied too): 3.7 % more at 128², 7.5 % at 64².
    assert unet_forward_flops(cfg, 128, count_padding=True) / unet_forward_flops(cfg, 128) == \
        pytest.approx(1.0369, abs=1e-4)


def test_dropout_does_not_change_the_count():
    cfg, size = _case("small_softmax")
    with_dropout = ml_collections.ConfigDict({**cfg.to_dict(), "dropout": 0.3})
    assert unet_forward_flops(with_dropout, size) == unet_forward_flops(cfg, size)


def test_with_context_is_checked_against_the_channels():
    paper, quick = _paper_model(), quickstart_config().model  # 8 -> 4 channels; 3 -> 3
    assert unet_forward_flops(paper, 64, with_context=True) == unet_forward_flops(paper, 64)
    assert unet_forward_flops(quick, 64, with_context=False) == unet_forward_flops(quick, 64)
    with pytest.raises(ValueError, match="in_channels=8"):
        unet_forward_flops(paper, 64, with_context=False)
    with pytest.raises(ValueError, match="not divisible"):
        unet_forward_flops(paper, 100)


def test_model_tflops_per_device():
    # The paper's step (batch 64 at 128²) taking 1 s on 8 devices: 64 * 1.31 TFLOP / 8.
    per_example = train_flops_per_example(_paper_model(), 128)
    assert model_tflops_per_device(per_example, 1.0, 64, 8) == pytest.approx(64 * 1.310462840832 / 8)
    assert model_tflops_per_device(per_example, 0.5, 64, 16) == pytest.approx(64 * 1.310462840832 / 8)
    with pytest.raises(ValueError):
        model_tflops_per_device(per_example, 0.0, 64, 8)
