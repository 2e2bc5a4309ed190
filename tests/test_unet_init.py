"""EfficientUNet initialisation: `param_init="torch"` draws every parameter as the
original's PyTorch modules do at construction (checked, module by module of the
original's state dict, against torch.nn modules of the same shapes), "flax" keeps
Flax's defaults, and any other value is a clear error."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from cfm_jax.models import EfficientUNet
from cfm_jax.model import build_unet
from configs.common import base_config
from tests.torch_layouts import unet_params_to_torch

# Covers every layer type: Linear (time_embed, emb_layers), Conv2d 3x3 (incl. the stride-2
# `op` and the upsample `conv`), 1x1 Conv2d (skip_connection), Conv1d (qkv, proj_out of the
# middle block's attention; the others are alike), the pool conv and the ConvTranspose2d
# un_pool, GroupNorm. Small, because compiling the init dominates the runtime.
POOLED = dict(in_channels=6, model_channels=32, out_channels=8, num_res_blocks=1, channel_mult=(1, 2),
              attention_resolutions=(), num_heads=2, dim_head=16, use_linear_attn=True,
              use_scale_shift_norm=True, dropout=0.0, conv_resample=True, pool_factor=2)
UNPOOLED = dict(POOLED, pool_factor=-1)  # the final out.2 conv is zero-initialised only here
HW = 8
SEEDS = 64  # inits pooled per tensor: the smallest (un_pool bias, 8 values) gets 512 samples
TORCH_SAMPLES = 4096  # at least this many reference values per torch tensor
# Modules the original wraps in `zero_module` (weight and bias), as torch state-dict prefixes.
ZERO_MODULES = ("out_layers.3", "proj_out")


def lazy_init(cfg, param_init, key):
    model = EfficientUNet(**cfg, param_init=param_init)
    x = jax.ShapeDtypeStruct((1, HW, HW, cfg["in_channels"]), jnp.float32)
    return model.lazy_init(key, x, jax.ShapeDtypeStruct((1,), jnp.float32))["params"]  # no forward pass


def to_torch(params):
    """{torch key: [seeds, *torch shape]} from params with a leading seed axis, in torch layout."""
    seeds = jax.tree_util.tree_leaves(params)[0].shape[0]
    per_seed = [unet_params_to_torch(jax.tree_util.tree_map(lambda a, i=i: a[i], params))
                for i in range(seeds)]
    return {k: np.stack([sd[k] for sd in per_seed]) for k in per_seed[0]}


@pytest.fixture(scope="module")
def inits():
    """Params of all variants from one compilation: {(cfg name, param_init): params [seeds, ...]}.

    'rbg' keys: XLA compiles threefry-derived keys for ~100 parameters several times slower on
    CPU; the initialisers only call jax.random, so the distributions do not depend on the impl.
    """
    cfgs = {"pooled": POOLED, "unpooled": UNPOOLED}
    variants = {("pooled", "torch"): SEEDS, ("unpooled", "torch"): 1, ("unpooled", "flax"): 1}

    def init_all(key):
        out = {}
        for i, ((cfg, param_init), seeds) in enumerate(variants.items()):
            keys = jax.random.split(jax.random.fold_in(key, i), seeds)
            out[cfg, param_init] = jax.vmap(lambda k: lazy_init(cfgs[cfg], param_init, k))(keys)
        return out

    return jax.device_get(jax.jit(init_all)(jax.random.key(0, impl="rbg")))


def torch_reference(prefix, weight_shape):
    """The torch.nn module the original has at `prefix`, built with the same weight shape."""
    if len(weight_shape) == 1:
        return tnn.GroupNorm(32, weight_shape[0])
    if len(weight_shape) == 2:  # (O, I)
        return tnn.Linear(weight_shape[1], weight_shape[0])
    if len(weight_shape) == 3:  # (O, I, 1)
        return tnn.Conv1d(weight_shape[1], weight_shape[0], weight_shape[2])
    k = tuple(weight_shape[2:])
    if prefix == "un_pool.up_conv":  # (I, O, kh, kw)
        return tnn.ConvTranspose2d(weight_shape[0], weight_shape[1], k, stride=k)
    return tnn.Conv2d(weight_shape[1], weight_shape[0], k)  # (O, I, kh, kw)


def modules_of(state_dict):
    return sorted({key.rsplit(".", 1)[0] for key in state_dict})


def is_zero_module(prefix, cfg):
    return any(z in prefix for z in ZERO_MODULES) or (prefix == "out.2" and cfg["pool_factor"] <= 1)


def torch_draws(module, n_min):
    """{"weight": values, "bias": values} of `module` over repeated default inits (>= n_min each)."""
    torch.manual_seed(0)
    reps = math.ceil(n_min / module.bias.numel())
    draws = {"weight": [], "bias": []}
    for _ in range(reps):
        module.reset_parameters()
        for name in draws:
            draws[name].append(getattr(module, name).detach().numpy().ravel().copy())  # reset is in place
    return {name: np.concatenate(v) for name, v in draws.items()}


def uniform_std_tol(n):
    # Sample std of U(-1, 1) (std 1/sqrt(3)) has standard error sqrt(4/45)*sqrt(3)/2/sqrt(n)
    # ~= 0.258/sqrt(n) (4th moment 1/5); 6 standard errors of the difference of two samples.
    return 6 * 0.258 * math.sqrt(1 / n)


def test_torch_init_matches_torch_modules(inits):
    sd = to_torch(inits["pooled", "torch"])
    kinds = set()
    for prefix in modules_of(sd):
        weight = sd[f"{prefix}.weight"]
        ref = torch_reference(prefix, weight.shape[1:])
        kinds.add(type(ref).__name__)
        if isinstance(ref, tnn.GroupNorm):
            for name in ("weight", "bias"):
                np.testing.assert_array_equal(sd[f"{prefix}.{name}"][0], getattr(ref, name).detach().numpy(),
                                              err_msg=f"{prefix}.{name}")
            continue
        if is_zero_module(prefix, POOLED):
            continue  # test_zero_modules_are_exactly_zero
        fan_in, _ = tnn.init._calculate_fan_in_and_fan_out(ref.weight)  # as torch's reset_parameters
        bound = 1 / math.sqrt(fan_in)
        draws = torch_draws(ref, TORCH_SAMPLES)
        for name in ("weight", "bias"):
            ours = sd[f"{prefix}.{name}"].ravel() / bound  # should be U(-1, 1)
            theirs = draws[name] / bound
            msg = f"{prefix}.{name} (torch {type(ref).__name__}{tuple(ref.weight.shape)}, fan_in {fan_in})"
            assert np.abs(theirs).max() <= 1 + 1e-6, msg  # the reference really is U(+-1/sqrt(fan_in))
            assert np.abs(ours).max() <= 1 + 1e-6, msg
            # Both ends reached: P(max < 0.95) = 0.95**n < 1e-11 for the n >= 512 values here; a
            # bound sqrt(3) too small, a zero bias or a one-sided draw fail.
            assert ours.size >= 512, msg
            assert ours.max() >= 0.95 and ours.min() <= -0.95, msg
            assert theirs.max() >= 0.95 and theirs.min() <= -0.95, msg
            tol = uniform_std_tol(ours.size) * math.sqrt(1 + ours.size / theirs.size)
            assert abs(ours.std() - theirs.std()) <= tol, (msg, ours.std(), theirs.std(), tol)
            mean_tol = 6 * math.sqrt(1 / 3 / ours.size + 1 / 3 / theirs.size)  # U(-1, 1) has variance 1/3
            assert abs(ours.mean() - theirs.mean()) <= mean_tol, msg
    assert kinds == {"GroupNorm", "Linear", "Conv1d", "Conv2d", "ConvTranspose2d"}


@pytest.mark.parametrize("cfg, param_init",
                         [("pooled", "torch"), ("unpooled", "torch"), ("unpooled", "flax")])
def test_zero_modules_are_exactly_zero(inits, cfg, param_init):
    sd = to_torch(inits[cfg, param_init])
    cfg = {"pooled": POOLED, "unpooled": UNPOOLED}[cfg]
    zero = [p for p in modules_of(sd) if is_zero_module(p, cfg)]
    # 8 res blocks (2 encoder, 2 middle, 4 decoder), the middle attention.
    assert len(zero) == 8 + 1 + (cfg["pool_factor"] <= 1), zero
    for prefix in zero:
        for name in ("weight", "bias"):
            assert np.all(sd[f"{prefix}.{name}"] == 0), f"{prefix}.{name}"
    assert np.any(sd["out.2.weight"] != 0) == (cfg["pool_factor"] > 1)


def test_flax_init_keeps_flax_defaults(inits):
    """lecun_normal kernels (std 1/sqrt(fan_in), truncated at 2 sigma of the underlying
    normal), zero biases, GroupNorm ones/zeros: the behaviour before `param_init` existed."""
    checked = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(inits["unpooled", "flax"])[0]:
        leaf = leaf[0]  # the one seed
        name, where = path[-1].key, jax.tree_util.keystr(path)
        if name == "scale":
            assert np.all(leaf == 1), where
        elif name == "bias":
            assert np.all(leaf == 0), where
        elif np.all(leaf == 0):
            assert any(z in where for z in ("out_layers_3", "proj_out", "['out_2']")), where  # zero_module
        else:
            std = 1 / math.sqrt(math.prod(leaf.shape[:-1]))  # flax fan_in: all but the output axis
            assert leaf.size >= 768, where
            # Sample std of a (truncated) normal: relative standard error < 1/sqrt(2n) < 2.6%.
            assert abs(leaf.std() / std - 1) < 0.1, (where, leaf.std() / std)
            assert np.abs(leaf).max() <= 2 / 0.87962566 * std * (1 + 1e-6), where
            checked += 1
    assert checked >= 20


def test_bad_param_init_raises():
    model = EfficientUNet(**POOLED, param_init="kaiming")
    with pytest.raises(ValueError, match=r"param_init='kaiming' \(config key model.init\); choose one of "
                                         r"\('torch', 'flax'\)"):
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, HW, HW, POOLED["in_channels"])), jnp.zeros((1,)))


def test_build_unet_passes_config_init():
    cfg = base_config().model
    assert cfg.init == "torch" and build_unet(cfg).param_init == "torch"
    cfg.init = "flax"
    assert build_unet(cfg).param_init == "flax"
