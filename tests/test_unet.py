"""EfficientUNet: parameter count, zero output at init, parity with a PyTorch
re-statement of the original (fmboost/models/unet), and the weight converter."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn as tnn

from cfm_jax.convert import unet_params_from_torch
from cfm_jax.models import EfficientUNet, count_params, timestep_embedding
from tests.torch_layouts import unet_params_to_torch

PAPER = dict(in_channels=8, model_channels=128, out_channels=4, num_res_blocks=3,
             channel_mult=(1, 2, 4, 8), attention_resolutions=(8, 16), num_heads=4, dim_head=64,
             use_linear_attn=False, use_scale_shift_norm=True, dropout=0.0, conv_resample=True,
             pool_factor=-1)
PAPER_PARAMS = 305_806_340

# fp32 parity tolerance (XLA vs. ATen kernels sum in different orders).
RTOL, ATOL = 1e-5, 1e-5

SMALL = dict(in_channels=6, model_channels=32, out_channels=4, num_res_blocks=1, channel_mult=(1, 2),
             attention_resolutions=(2,), num_heads=2, dim_head=16, use_linear_attn=False,
             use_scale_shift_norm=True, dropout=0.0, conv_resample=True, pool_factor=-1)
# Each variant changes a few fields of SMALL; together they cover every code path.
VARIANTS = {
    "softmax_attn": {},
    "linear_attn_full_res": dict(use_linear_attn=True, attention_resolutions=(1, 2), num_res_blocks=2),
    "no_scale_shift_avgpool": dict(use_scale_shift_norm=False, conv_resample=False),
    "pool2_three_levels": dict(pool_factor=2, channel_mult=(1, 2, 2), attention_resolutions=(1, 4)),
}
SCALAR_T_VARIANT = "linear_attn_full_res"  # this one passes t as a Python float (broadcast to B)
B, HW, X_CH = 2, 16, 4  # batch, spatial size, channels of x (the rest is context)


# ----------------------------------------------------------------------------------
# PyTorch re-statement of the original architecture (channels-first), written from
# its semantics, with the same module tree / state-dict keys. Initialisation is
# irrelevant here: the tests re-draw every parameter.
# ----------------------------------------------------------------------------------


def torch_timestep_embedding(t, dim, max_period=10000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(emb.shape[0], 1)], dim=1)
    return emb


class TResBlock(tnn.Module):
    def __init__(self, cin, emb_dim, cout, dropout, scale_shift):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = tnn.Sequential(tnn.GroupNorm(32, cin), tnn.SiLU(), tnn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = tnn.Sequential(tnn.SiLU(), tnn.Linear(emb_dim, 2 * cout if scale_shift else cout))
        self.out_layers = tnn.Sequential(tnn.GroupNorm(32, cout), tnn.SiLU(), tnn.Dropout(dropout),
                                         tnn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = tnn.Identity() if cin == cout else tnn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)
        e = self.emb_layers(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            for layer in self.out_layers[1:]:
                h = layer(h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class TAttention(tnn.Module):
    """`textbook=True` splits heads the usual way instead of the original's reshape."""

    def __init__(self, c, heads, dim_head, linear, textbook=False):
        super().__init__()
        self.heads, self.dh, self.linear, self.textbook = heads, dim_head, linear, textbook
        self.norm = tnn.GroupNorm(32, c)
        self.qkv = tnn.Conv1d(c, 3 * heads * dim_head, 1)
        self.proj_out = tnn.Conv1d(heads * dim_head, c, 1)

    def forward(self, x):
        b, c, hgt, wid = x.shape
        L, nh, dh = hgt * wid, self.heads, self.dh
        x = x.reshape(b, c, L)
        qkv = self.qkv(self.norm(x))  # (b, 3*nh*dh, L)
        if self.textbook:
            q, k, v = qkv.reshape(b, 3, nh, dh, L).permute(1, 0, 2, 4, 3)  # 3 x (b, nh, L, dh)
        else:
            q, k, v = qkv.reshape(b, nh, L, 3 * dh).chunk(3, dim=-1)
        if self.linear:
            q = q.softmax(dim=-1) / math.sqrt(dh)
            k = k.softmax(dim=-2)
            out = q @ (k.transpose(-1, -2) @ v)
        else:
            out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
        if self.textbook:
            out = out.transpose(-1, -2)
        out = out.reshape(b, nh * dh, L)
        return (x + self.proj_out(out)).reshape(b, c, hgt, wid)


class TDown(tnn.Module):
    def __init__(self, c, use_conv):
        super().__init__()
        self.op = tnn.Conv2d(c, c, 3, stride=2, padding=1) if use_conv else tnn.AvgPool2d(2)

    def forward(self, x):
        return self.op(x)


class TUp(tnn.Module):
    def __init__(self, c, use_conv):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = tnn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class TSeq(tnn.ModuleList):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TResBlock) else layer(x)
        return x


class TWrap(tnn.Module):
    """`pool.down_conv` / `un_pool.up_conv` nesting of the original."""

    def __init__(self, name, layer):
        super().__init__()
        self.add_module(name, layer)
        self.name = name

    def forward(self, x):
        return getattr(self, self.name)(x)


class TorchUNet(tnn.Module):
    def __init__(self, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions,
                 dropout=0.0, channel_mult=(1, 2, 3, 4), conv_resample=True, dim_head=64, num_heads=4,
                 use_linear_attn=True, use_scale_shift_norm=True, pool_factor=-1, textbook_heads=False):
        super().__init__()
        mc, ted = model_channels, 4 * model_channels
        self.mc, self.pool_factor = mc, pool_factor
        res = lambda cin, cout: TResBlock(cin, ted, cout, dropout, use_scale_shift_norm)
        attn = lambda c, linear: TAttention(c, num_heads, dim_head, linear, textbook_heads)
        self.time_embed = tnn.Sequential(tnn.Linear(mc, ted), tnn.SiLU(), tnn.Linear(ted, ted))
        first = in_channels
        if pool_factor > 1:
            self.pool = TWrap("down_conv", tnn.Conv2d(in_channels, mc, pool_factor, stride=pool_factor))
            first = mc
        self.input_blocks = tnn.ModuleList([TSeq([tnn.Conv2d(first, mc, 3, padding=1)])])
        chans, ch, ds = [mc], mc, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [res(ch, mult * mc)]
                ch = mult * mc
                if ds in attention_resolutions:
                    layers.append(attn(ch, use_linear_attn))
                self.input_blocks.append(TSeq(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TSeq([TDown(ch, conv_resample)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = TSeq([res(ch, ch), attn(ch, False), res(ch, ch)])
        self.output_blocks = tnn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [res(ch + chans.pop(), mult * mc)]
                ch = mult * mc
                if ds in attention_resolutions:
                    layers.append(attn(ch, use_linear_attn))
                if level and i == num_res_blocks:
                    layers.append(TUp(ch, conv_resample))
                    ds //= 2
                self.output_blocks.append(TSeq(layers))
        last = mc if pool_factor > 1 else out_channels
        self.out = tnn.Sequential(tnn.GroupNorm(32, ch), tnn.SiLU(), tnn.Conv2d(mc, last, 3, padding=1))
        if pool_factor > 1:
            self.un_pool = TWrap("up_conv", tnn.ConvTranspose2d(mc, out_channels, pool_factor, stride=pool_factor))

    def forward(self, x, t, context=None):
        emb = self.time_embed(torch_timestep_embedding(t, self.mc))
        h = x if context is None else torch.cat([x, context], dim=1)
        if self.pool_factor > 1:
            h = self.pool(h)
        hs = []
        for block in self.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        h = self.out(h)
        return self.un_pool(h) if self.pool_factor > 1 else h


def randomise_(module: tnn.Module, seed: int) -> None:
    """Re-draw every parameter (no zeros, so zero-initialised layers hide nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1:  # biases, GroupNorm affine
                is_norm_weight = name.endswith("weight")
                p.copy_(1.0 + 0.1 * noise if is_norm_weight else 0.1 * noise)
            else:
                p.copy_(noise / math.sqrt(p[0].numel()))


def state_dict_np(module: tnn.Module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------------
# Shared, cached runs (each config is compiled once).
# ----------------------------------------------------------------------------------

_CACHE = {}


def flax_model(cfg, **kw):
    return EfficientUNet(**{**cfg, **kw})


def target_params(model):
    x = jax.ShapeDtypeStruct((1, HW, HW, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)["params"]


def inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, X_CH, HW, HW, generator=g)
    ctx = torch.randn(B, cfg["in_channels"] - X_CH, HW, HW, generator=g)
    t = torch.rand(B, generator=g)
    return x, ctx, t


def nhwc(a: torch.Tensor) -> jnp.ndarray:
    return jnp.asarray(a.numpy().transpose(0, 2, 3, 1))


def run_variant(name):
    if name in _CACHE:
        return _CACHE[name]
    cfg = {**SMALL, **VARIANTS[name]}
    tmodel = TorchUNet(**cfg).eval()
    randomise_(tmodel, seed=len(_CACHE) + 1)
    sd = state_dict_np(tmodel)
    x, ctx, t = inputs(cfg)
    t_flax = jnp.asarray(t.numpy())
    if name == SCALAR_T_VARIANT:
        t_flax, t = float(t[0]), torch.full((B,), float(t[0]))
    with torch.no_grad():
        ref = tmodel(x, t, ctx).numpy().transpose(0, 2, 3, 1)
    model = flax_model(cfg)
    params = unet_params_from_torch(sd, target_params(model))
    out = jax.jit(model.apply)({"params": params}, nhwc(x), t_flax, nhwc(ctx))
    _CACHE[name] = dict(cfg=cfg, tmodel=tmodel, sd=sd, params=params, x=x, ctx=ctx, t=t,
                        ref=ref, out=np.asarray(out))
    return _CACHE[name]


# ----------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------


def test_paper_config_parameter_count():
    assert count_params(EfficientUNet(**PAPER)) == PAPER_PARAMS


def test_torch_restatement_paper_parameter_count():
    with torch.device("meta"):  # shapes only, nothing allocated
        tmodel = TorchUNet(**PAPER)
    assert sum(p.numel() for p in tmodel.parameters()) == PAPER_PARAMS


def test_output_is_zero_at_init():
    model = flax_model(SMALL)
    x, ctx, t = inputs(SMALL)

    def init_and_apply(key, *args):  # one compilation for both
        variables = model.init(key, *args)
        return variables, model.apply(variables, *args)

    variables, out = jax.jit(init_and_apply)(jax.random.PRNGKey(0), nhwc(x), jnp.asarray(t.numpy()), nhwc(ctx))
    assert out.shape == (B, HW, HW, SMALL["out_channels"]) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0.0)
    # The zero-initialised layers of the original: res-block out convs, attention proj_out, out conv.
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    zero = {jax.tree_util.keystr(p): np.all(np.asarray(v) == 0) for p, v in flat}
    expect_zero = [k for k in zero if any(n in k for n in ("out_layers_3", "proj_out", "'out_2'"))]
    assert len(expect_zero) == 2 * (8 + 4 + 1)  # kernel and bias: 8 res blocks, 4 attentions, out
    assert all(zero[k] for k in expect_zero)
    assert not zero["['input_blocks_0_0']['kernel']"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parity_with_torch(name):
    r = run_variant(name)
    assert r["out"].shape == r["ref"].shape
    assert np.abs(r["ref"]).max() > 0.1  # a non-trivial output
    np.testing.assert_allclose(r["out"], r["ref"], rtol=RTOL, atol=ATOL)


def test_textbook_head_split_does_not_match():
    """Same weights, usual head layout: far from our output, so the quirk is what we reproduce."""
    r = run_variant("softmax_attn")
    textbook = TorchUNet(**r["cfg"], textbook_heads=True).eval()
    textbook.load_state_dict({k: torch.from_numpy(v) for k, v in r["sd"].items()})
    with torch.no_grad():
        other = textbook(r["x"], r["t"], r["ctx"]).numpy().transpose(0, 2, 3, 1)
    assert np.abs(other - r["out"]).max() > 100 * ATOL


@pytest.mark.parametrize("dim", [7, 8])
def test_timestep_embedding_matches_torch(dim):
    t = torch.tensor([0.0, 0.3, 1.0])
    ours = timestep_embedding(jnp.asarray(t.numpy()), dim)
    np.testing.assert_allclose(np.asarray(ours), torch_timestep_embedding(t, dim).numpy(), rtol=1e-6, atol=1e-6)


def test_conversion_round_trip_is_exact():
    r = run_variant("pool2_three_levels")  # has every layer kind, incl. the transposed conv
    back = unet_params_to_torch(r["params"])
    assert back.keys() == r["sd"].keys()
    for k, v in r["sd"].items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)


def test_conversion_reports_all_mismatches_at_once():
    r = run_variant("softmax_attn")
    sd = dict(r["sd"])
    del sd["middle_block.1.qkv.bias"]
    sd["middle_block.3.weight"] = np.zeros(3, np.float32)
    sd["input_blocks.1.0.emb_layers.1.weight"] = np.zeros((5, 5), np.float32)
    with pytest.raises(ValueError) as info:
        unet_params_from_torch(sd, target_params(flax_model(r["cfg"])))
    msg = str(info.value)
    assert "missing: middle_block.1.qkv.bias" in msg
    assert "unexpected: middle_block.3.weight" in msg
    assert "wrong shape: input_blocks.1.0.emb_layers.1.weight" in msg


def test_bf16_compute_close_to_fp32():
    r = run_variant("softmax_attn")
    model = flax_model(r["cfg"], dtype=jnp.bfloat16)
    out = jax.jit(model.apply)({"params": r["params"]}, nhwc(r["x"]), jnp.asarray(r["t"].numpy()), nhwc(r["ctx"]))
    out = np.asarray(out)
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    rel = np.abs(out - r["out"]).max() / np.abs(r["out"]).max()
    assert rel < 0.05, rel


def test_dropout_uses_rng_in_train_mode_only():
    r = run_variant("softmax_attn")
    model = flax_model(r["cfg"], dropout=0.5)
    args = ({"params": r["params"]}, nhwc(r["x"]), jnp.asarray(r["t"].numpy()), nhwc(r["ctx"]))
    apply = jax.jit(model.apply, static_argnames="train")
    a = apply(*args, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    b = apply(*args, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    assert not np.allclose(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), r["out"])  # r["out"]: same params, eval mode


def test_context_channel_mismatch_raises():
    model = flax_model(SMALL)  # in_channels 6 = x 4 + context 2
    x = jax.ShapeDtypeStruct((1, HW, HW, X_CH), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    bad_ctx = jax.ShapeDtypeStruct((1, HW, HW, 3), jnp.float32)
    with pytest.raises(ValueError, match="in_channels=6"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t, bad_ctx)
    with pytest.raises(ValueError, match="in_channels=6"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)  # context forgotten


def test_invalid_pool_factor_raises():
    model = flax_model(SMALL, pool_factor=3)
    x = jax.ShapeDtypeStruct((1, HW, HW, SMALL["in_channels"]), jnp.float32)
    with pytest.raises(ValueError, match="pool_factor"):
        jax.eval_shape(model.init, jax.random.PRNGKey(0), x, jax.ShapeDtypeStruct((1,), jnp.float32))
