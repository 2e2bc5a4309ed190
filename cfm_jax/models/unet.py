"""EfficientUNet of "Boosting Latent Diffusion with Flow Matching", in Flax Linen, NHWC.

Reproduces the computation of `fmboost/models/unet` (CompVis/fm-boosting, PyTorch,
NCHW) so that original checkpoints load through `cfm_jax.convert.fmboost_unet` and
give the same numbers. Submodules are named after the PyTorch module tree with
`.` replaced by `_` (`input_blocks.1.0.in_layers.2` -> `input_blocks_1_0/in_layers_2`);
the only exceptions are `pool` and `un_pool`, which hold the convolutions PyTorch
names `pool.down_conv` and `un_pool.up_conv`.

Initialisation (`param_init`, config key `model.init`; a field named `init` would
shadow `Module.init`): "torch" (default) draws every parameter as the original's
PyTorch modules do at construction, i.e. PyTorch's defaults for Conv2d, Conv1d,
ConvTranspose2d and Linear (`kaiming_uniform(a=sqrt(5))` weights and biases, both
U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in as torch computes it from its weight),
GroupNorm at ones/zeros, and zeros (kernel and bias) for the layers the original
wraps in `zero_module`: res-block `out_layers.3`, attention `proj_out` and, without
`pool`, the final `out.2`. "flax" keeps Flax's defaults (lecun_normal kernels, zero
biases) with the same zero layers.

Mixed precision: `dtype` is the compute dtype of convolutions, dense layers and
attention, `param_dtype` the storage dtype of the parameters. The sinusoidal
timestep embedding, GroupNorm statistics and attention softmaxes are computed in
float32 whatever `dtype` is; with `dtype=float32` the math is the original's.
"""
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from cfm_jax import xla_order
from cfm_jax.models import conv

_NUM_GROUPS = 32
_NORM_EPS = 1e-5
_POOL_FACTORS = (2, 4, 8)


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding `[cos(t * f), sin(t * f)]` of `t` [B] -> [B, dim], float32.

    `t` is used as given (the flow's t in [0, 1] is not multiplied by 1000);
    frequencies `f_i = max_period ** (-i / (dim // 2))`; one zero column is
    appended when `dim` is odd.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]  # [B, half]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


INITS = ("torch", "flax")


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ValueError(f"param_init={init!r} (config key model.init); choose one of {INITS}.")


def torch_fan_in(kernel_shape: Sequence[int], transposed: bool = False) -> int:
    """fan_in PyTorch computes for the torch weight that a Flax kernel of `kernel_shape` holds.

    Dense (I, O) and Conv (kh, kw, I, O): I * kh * kw. ConvTranspose (kh, kw, I, O):
    torch stores (I, O, kh, kw) and takes the fan_in from dimension 1, i.e. O * kh * kw.
    """
    kernel_shape = tuple(kernel_shape)
    if transposed:
        return math.prod(kernel_shape[:-2]) * kernel_shape[-1]
    return math.prod(kernel_shape[:-1])


def torch_uniform(fan_in: int):
    """Initializer U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for the weight
    (`kaiming_uniform_(a=sqrt(5))`, gain sqrt(1/3)) and the bias of Linear and ConvNd."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


def torch_kernel_init(transposed: bool = False):
    """Kernel initializer U(+-1/sqrt(fan_in)) with fan_in from the Flax kernel shape
    (`torch_fan_in`); for Dense, Conv and, with `transposed`, ConvTranspose."""

    def init(key, shape, dtype=jnp.float32):
        return torch_uniform(torch_fan_in(shape, transposed))(key, shape, dtype)

    return init


def _layer_inits(init: str, kernel_shape: Sequence[int], *, transposed: bool = False,
                 zero: bool = False) -> dict:
    """`kernel_init`/`bias_init` keywords of a Dense/Conv/ConvTranspose whose Flax kernel
    has shape `kernel_shape`; `zero` for the original's `zero_module` layers."""
    _check_init(init)
    if zero:
        return dict(kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)
    if init == "flax":
        return {}
    kernel_shape = tuple(kernel_shape)
    kernel_init = torch_kernel_init(transposed)

    def checked_kernel_init(key, shape, dtype=jnp.float32):
        if tuple(shape) != kernel_shape:  # the bias would get the fan_in of another shape
            raise ValueError(f"kernel shape {tuple(shape)} != {kernel_shape} given for its bias init")
        return kernel_init(key, shape, dtype)

    # flax's bias_init sees only the bias shape: the fan_in comes from the kernel shape here.
    return dict(kernel_init=checked_kernel_init,
                bias_init=torch_uniform(torch_fan_in(kernel_shape, transposed)))


def _dense(features, in_features, init, name, *, zero=False, **kw):
    return nn.Dense(features, name=name, dot_general=xla_order.dot_general,
                    **_layer_inits(init, (in_features, features), zero=zero), **kw)


# The UNet's normalisation layers: 'group' (GroupNorm(32), the original's) or 'none'. GroupNorm
# normalises each image's feature maps, so the network's output cannot follow the contrast of
# its input; a residual that should scale with the image (sharpening a noise-free source, as the
# pixel-space quick start does) is then hard to learn (docs/quickstart.md). 'none' keeps the
# layers' places without normalising (the zero-initialised residual branches keep it stable).
NORMS = ("group", "none")


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"model.norm={norm!r}; choose one of {NORMS} ('group' is the original's).")


GROUP_SUMS_SCOPE = "group_norm_sums"


def _group_sums(v, groups: int):
    """[B, ..., C] -> [B, G]: summed over the spatial axes per channel first, then per group.
    The per-channel sums are a product with a ones vector: XLA:CPU's dot kernels are
    vectorised, its reductions over the non-minor (spatial) axes of a channels-last array are
    not (docs/benchmarks.md). The batch is the product's batch dimension, so that ``v`` is
    already in the [batch, contracted, kept] layout a dot wants; with the batch among the kept
    dimensions XLA transposed every activation first. float32 products and sums (``HIGHEST``:
    no reduced-precision passes on accelerators)."""
    b, c = v.shape[0], v.shape[-1]
    flat = v.reshape(b, -1, c)
    ones = jnp.ones((b, 1, flat.shape[1]), v.dtype)
    with jax.named_scope(GROUP_SUMS_SCOPE):  # not a model FLOP (flops.py counts convs and matmuls)
        per_channel = jax.lax.dot_general(ones, flat, (((2,), (1,)), ((0,), (0,))),
                                          precision=jax.lax.Precision.HIGHEST)  # [B, 1, C]
    return per_channel[:, 0].reshape(b, groups, c // groups).sum(-1)


def _per_channel(g, like):
    """[B, G] -> [B, 1.., C] broadcastable against ``like`` [B, ..., C].

    The repeat is a product with a constant 0/1 matrix [G, C] (one 1 per column), not
    ``jnp.repeat``: XLA:CPU fuses a repeat into every element-wise consumer and recomputes its
    broadcast-of-a-bitcast index arithmetic per element: in a batch-8 forward of the paper UNet the
    GroupNorm + SiLU fusion at 8x32x32x128 took 2.8 ms, 0.3 ms with a [B, C] operand
    (docs/benchmarks.md). Each GroupNorm calls this twice forward (mean, rstd), four times backward.
    A product is a separate kernel whose [B, C] output the consumers read with a plain broadcast.
    For finite ``g`` the values are the repeat's (``v * 1 + 0 * w + ...``; only ``-0.0`` becomes
    ``+0.0``; ``HIGHEST``: no reduced-precision passes on accelerators); a non-finite group
    statistic makes its whole sample's row non-finite (``0 * inf``), where the repeat kept it to
    the group's channels."""
    b, c, groups = like.shape[0], like.shape[-1], g.shape[1]
    ones = np.equal.outer(np.arange(groups), np.arange(c) // (c // groups)).astype(np.float32)
    with jax.named_scope(GROUP_SUMS_SCOPE):  # not a model FLOP either (see _group_sums)
        v = jax.lax.dot_general(g, jnp.asarray(ones, g.dtype), (((1,), (0,)), ((), ())),
                                precision=jax.lax.Precision.HIGHEST)
    return v.reshape((b,) + (1,) * (like.ndim - 2) + (c,))


def _group_stats(xf, groups: int, eps: float):
    """(mean, rstd) per group [B, G], and the mean per channel (the variance pass's, reused)."""
    count = math.prod(xf.shape[1:-1]) * (xf.shape[-1] // groups)
    mean = _group_sums(xf, groups) / count
    mean_c = _per_channel(mean, xf)
    var = _group_sums(jnp.square(xf - mean_c), groups) / count  # two passes, as torch
    return mean, jax.lax.rsqrt(var + eps), mean_c


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x, scale, bias, groups: int, eps: float):
    return _group_norm_fwd(x, scale, bias, groups, eps)[0]


def _group_norm_fwd(x, scale, bias, groups, eps):
    xf = x.astype(jnp.float32)
    mean, rstd, mean_c = _group_stats(xf, groups, eps)
    y = (xf - mean_c) * (_per_channel(rstd, xf) * scale) + bias
    return y, (x, scale, mean, rstd)  # no normalised copy of x is kept for the backward pass


def _group_norm_bwd(groups, eps, res, dy):
    x, scale, mean, rstd = res
    xf = x.astype(jnp.float32)
    rstd_c = _per_channel(rstd, xf)
    xhat = (xf - _per_channel(mean, xf)) * rstd_c
    axes = tuple(range(x.ndim - 1))
    dscale, dbias = jnp.sum(dy * xhat, axis=axes), jnp.sum(dy, axis=axes)
    g = dy * scale
    count = math.prod(x.shape[1:-1]) * (x.shape[-1] // groups)
    m1 = _per_channel(_group_sums(g, groups) / count, xf)
    m2 = _per_channel(_group_sums(g * xhat, groups) / count, xf)
    dx = rstd_c * (g - m1 - xhat * m2)
    return dx.astype(x.dtype), dscale.astype(scale.dtype), dbias.astype(scale.dtype)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
    """PyTorch's ``GroupNorm(num_groups, C, eps)`` on channels-last input, with the parameters
    (``scale``, ``bias``) and numbers of flax's ``nn.GroupNorm(use_fast_variance=False)``:
    statistics in float32 by two passes (the exact variance, as PyTorch), normalised output in
    ``dtype``. Written for XLA:CPU (docs/benchmarks.md): sums per channel, then per group, and an
    analytic backward pass that keeps only the input and the per-group statistics (autodiff kept
    a float32 copy of every normalised activation)."""

    num_groups: int = _NUM_GROUPS
    epsilon: float = _NORM_EPS
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, g = x.shape[-1], self.num_groups
        if c % g:
            raise ValueError(f"GroupNorm({g}) needs channels divisible by {g}, got {c}.")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        y = _group_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32), g, self.epsilon)
        return y.astype(self.dtype or jnp.result_type(x, scale))


def _norm_layer(dtype, param_dtype, name, norm="group"):
    if norm == "none":
        return lambda x: x
    return GroupNorm(dtype=dtype, param_dtype=param_dtype, name=name)


# How 3x3 convolutions pad, with PyTorch's `Conv2d(padding_mode=...)` names. 'zeros' is the
# original's; 'reflect' and 'replicate' extend the feature map by its own content, so that no
# layer sees an artificial zero edge (an option against a border frame, docs/quickstart.md).
PADDING_MODES = ("zeros", "reflect", "replicate")
_JNP_PAD_MODE = {"reflect": "reflect", "replicate": "edge"}


def _check_padding_mode(mode: str) -> None:
    if mode not in PADDING_MODES:
        raise ValueError(f"model.padding_mode={mode!r}; choose one of {PADDING_MODES} ('zeros' is the original's).")


def _conv3x3(features, in_features, init, dtype, param_dtype, name, *, strides=1, zero=False,
             padding_mode="zeros"):
    # PyTorch `Conv2d(.., 3, padding=1, padding_mode=...)`: explicit padding, not 'SAME'
    # (differs at stride 2).
    inits = _layer_inits(init, (3, 3, in_features, features), zero=zero)
    if padding_mode == "zeros":
        return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                       dtype=dtype, param_dtype=param_dtype, name=name,
                       conv_general_dilated=conv.conv_general_dilated, **inits)
    conv_ = nn.Conv(features, (3, 3), strides=(strides, strides), padding=((0, 0), (0, 0)),
                    dtype=dtype, param_dtype=param_dtype, name=name,
                    conv_general_dilated=conv.conv_general_dilated, **inits)
    return lambda x: conv_(jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=_JNP_PAD_MODE[padding_mode]))


REMAT_POLICIES = ("none", "full", "save_matmuls")


def _save_matmuls(prim, *_, **__) -> bool:
    """Remat policy: keep the outputs of matmuls and convolutions, recompute the rest
    (norms, activations, adds) in the backward pass."""
    return prim.name in ("dot_general", "conv_general_dilated")


def _remat(cls, policy: str, static_argnums=()):
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r}; choose one of {REMAT_POLICIES}.")
    if policy == "none":
        return cls
    return nn.remat(cls, policy=None if policy == "full" else _save_matmuls, static_argnums=static_argnums)


def _constrain(h, axes: tuple):
    """Pins the batch axis of an activation to the mesh axes ``axes`` when traced under a
    mesh (``jax.set_mesh``) that has them; a no-op otherwise (tests, plain ``apply``). Keeps
    GSPMD from sharding activations on channels after FSDP-sharded weights."""
    if not axes:
        return h
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(axes) <= set(mesh.axis_names):
        return h
    return jax.lax.with_sharding_constraint(h, PartitionSpec(axes))


class ResBlock(nn.Module):
    """ADM residual block conditioned on the timestep embedding (torch `ResBlock`)."""

    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    param_init: str = "torch"  # torch | flax (module docstring)
    padding_mode: str = "zeros"  # of the 3x3 convolutions: PADDING_MODES
    norm: str = "group"  # NORMS

    @nn.compact
    def __call__(self, x, emb, train: bool = False):
        # x: [B, H, W, Cin], emb: [B, E]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv_kw = dict(padding_mode=self.padding_mode, **kw)
        c_in, c_out, init = x.shape[-1], self.out_channels, self.param_init
        h = _norm_layer(self.dtype, self.param_dtype, "in_layers_0", self.norm)(x)
        h = _conv3x3(c_out, c_in, init, name="in_layers_2", **conv_kw)(nn.silu(h))  # [B, H, W, Cout]

        n_emb = 2 * c_out if self.use_scale_shift_norm else c_out
        emb_out = _dense(n_emb, emb.shape[-1], init, "emb_layers_1", **kw)(nn.silu(emb))
        emb_out = emb_out.astype(h.dtype)[:, None, None, :]  # [B, 1, 1, n_emb]

        out_norm = _norm_layer(self.dtype, self.param_dtype, "out_layers_0", self.norm)
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(emb_out, 2, axis=-1)  # scale first, as torch.chunk
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = _conv3x3(c_out, c_out, init, name="out_layers_3", zero=True, **conv_kw)(h)

        if c_in == c_out:
            skip = x
        else:
            skip = nn.Conv(c_out, (1, 1), name="skip_connection", conv_general_dilated=conv.conv_general_dilated,
                           **_layer_inits(init, (1, 1, c_in, c_out)), **kw)(x)
        return skip + h


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over all positions, with residual (torch `SpatialSelfAttention`).

    The original works channels-first and *reshapes* (reinterprets memory, not
    transposes) its qkv tensor [B, 3*inner, L] to [B, heads, L, 3*dim_head], then
    splits q, k, v on the last axis; the result [B, heads, L, dim_head] is reshaped
    back to [B, inner, L]. A textbook head split gives different outputs with the
    same weights, so this module reproduces the reinterpretation exactly.
    """

    num_heads: int = 4
    dim_head: int = 64
    use_linear: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    param_init: str = "torch"  # torch | flax (module docstring)
    norm: str = "group"  # NORMS

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        L = hgt * wid
        heads, dh = self.num_heads, self.dim_head
        inner = heads * dh

        with jax.named_scope("attention"):  # labels the HLO for profiles (bench/xla_profile.py)
            h = _norm_layer(self.dtype, self.param_dtype, "norm", self.norm)(x).reshape(b, L, c)  # l = y*W + x
            # torch Conv1d(c, 3*inner, 1): fan_in c, as this Dense (c, 3*inner).
            qkv = _dense(3 * inner, c, self.param_init, "qkv", **kw)(h)  # [B, L, 3*inner]
            # The reshape quirk: go to the original's channels-first layout, reinterpret.
            qkv = jnp.transpose(qkv, (0, 2, 1)).reshape(b, heads, L, 3 * dh)
            q, k, v = jnp.split(qkv, 3, axis=-1)  # [B, heads, L, dh] each

            scale = 1.0 / math.sqrt(dh)
            if self.use_linear:
                # Linear attention (arXiv:1812.01243): softmax q over features, k over positions.
                q = jax.nn.softmax(q.astype(jnp.float32), axis=-1).astype(v.dtype) * scale
                k = jax.nn.softmax(k.astype(jnp.float32), axis=-2).astype(v.dtype)
                context = jnp.einsum("bhnd,bhne->bhde", k, v)  # [B, heads, dh, dh]
                out = jnp.einsum("bhnd,bhde->bhne", q, context)  # [B, heads, L, dh]
            else:
                logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * scale  # [B, heads, L, L]
                weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
                out = jnp.einsum("bhqk,bhkd->bhqd", weights, v)  # [B, heads, L, dh]

            # Inverse quirk: reinterpret [B, heads, L, dh] as [B, inner, L], back to NHWC.
            out = jnp.transpose(out.reshape(b, inner, L), (0, 2, 1))  # [B, L, inner]
            out = _dense(c, inner, self.param_init, "proj_out", zero=True, **kw)(out)
            return x + out.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Halve H and W: 3x3 stride-2 conv `op` (padding 1), or 2x2 average pooling."""

    use_conv: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    param_init: str = "torch"  # torch | flax (module docstring)
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x):
        if self.use_conv:
            c = x.shape[-1]
            return _conv3x3(c, c, self.param_init, self.dtype, self.param_dtype, "op", strides=2,
                            padding_mode=self.padding_mode)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then an optional 3x3 conv `conv`."""

    use_conv: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    param_init: str = "torch"  # torch | flax (module docstring)
    padding_mode: str = "zeros"

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        if self.use_conv:
            c = x.shape[-1]
            x = _conv3x3(c, c, self.param_init, self.dtype, self.param_dtype, "conv",
                         padding_mode=self.padding_mode)(x)
        return x


class EfficientUNet(nn.Module):
    """ADM-style UNet of fm-boosting; NHWC inputs, fields as the PyTorch constructor.

    `attention_resolutions` holds downsampling rates (1 = input resolution, after
    the optional `pool`) at which each res block is followed by attention.
    `in_channels` counts the channels of `x` and `context` together.
    """

    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[int] = (1, 2, 3, 4)
    conv_resample: bool = True
    dim_head: int = 64
    num_heads: int = 4
    use_linear_attn: bool = True
    use_scale_shift_norm: bool = True
    pool_factor: int = -1
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    remat: str = "none"  # rematerialise each res/attention block: none | full | save_matmuls
    param_init: str = "torch"  # torch (the original's PyTorch defaults) | flax; module docstring
    padding_mode: str = "zeros"  # of every 3x3 conv: zeros (the original) | reflect | replicate
    norm: str = "group"  # group (GroupNorm(32), the original) | none
    activation_axes: tuple = ()  # mesh axes of the batch dimension of activations (under a mesh)

    @nn.compact
    def __call__(self, x, t, context: Optional[jax.Array] = None, *, train: bool = False):
        """Velocity for `x` [B, H, W, C] at times `t` [B] (or a scalar) -> [B, H, W, out_channels].

        `context` [B, H, W, Cc] is concatenated to `x` on channels (so C + Cc must
        equal `in_channels`). Dropout, when `train` and `dropout > 0`, draws from
        the 'dropout' rng. The output is float32 whatever the compute dtype.

        The layout is the original's: time embedding, optional pooling, encoder (`input_blocks`),
        middle block, decoder (`output_blocks`, each consuming one encoder skip), output head.
        """
        x = self._check_inputs(x, context)
        emb = self._time_embedding(t, x.shape[0])
        h = x.astype(self.dtype)
        if self.pool_factor > 1:
            p = self.pool_factor
            h = nn.Conv(self.model_channels, (p, p), strides=(p, p), padding="VALID", name="pool",
                        **_layer_inits(self.param_init, (p, p, h.shape[-1], self.model_channels)), **self._kw)(h)
        h, skips = self._encoder(h, emb, train)
        h = self._middle(h, emb, train)
        h = self._decoder(h, skips, emb, train)
        return self._head(h).astype(jnp.float32)

    # The parts of __call__, in order. Submodules are named as the original's state dict
    # (`input_blocks_{i}_{j}` is torch's `input_blocks.i.j`), so checkpoints convert one to one.

    @property
    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _blocks(self):
        """The res-block and attention classes (rematerialised per ``remat``; lifted transforms
        keep the module names) and their keyword arguments."""
        init, pad, kw = self.param_init, self.padding_mode, self._kw
        res_kw = dict(dropout=self.dropout, use_scale_shift_norm=self.use_scale_shift_norm,
                      param_init=init, padding_mode=pad, norm=self.norm, **kw)
        attn_kw = dict(num_heads=self.num_heads, dim_head=self.dim_head, param_init=init, norm=self.norm, **kw)
        res_block = functools.partial(_remat(ResBlock, self.remat, static_argnums=(3,)), **res_kw)  # (self, x, emb, train)
        attention = functools.partial(_remat(SpatialSelfAttention, self.remat), **attn_kw)
        return res_block, attention, dict(param_init=init, padding_mode=pad, **kw)

    def _check_inputs(self, x, context):
        """Checks the options and shapes; returns `x` with `context` concatenated on channels."""
        if self.pool_factor > 1 and self.pool_factor not in _POOL_FACTORS:
            raise ValueError(f"pool_factor must be <= 1 or one of {_POOL_FACTORS}, got {self.pool_factor}")
        _check_init(self.param_init)
        _check_padding_mode(self.padding_mode)
        _check_norm(self.norm)
        if context is not None:
            if context.shape[:-1] != x.shape[:-1]:
                raise ValueError(f"context shape {context.shape} does not match x shape {x.shape} "
                                 "outside the channel axis (both NHWC)")
            x = jnp.concatenate([x, context.astype(x.dtype)], axis=-1)
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"EfficientUNet expects in_channels={self.in_channels} channels (x and context "
                f"concatenated, NHWC), got {x.shape[-1]} (x {x.shape}, context "
                f"{None if context is None else context.shape})")
        return x

    def _time_embedding(self, t, batch: int):
        """[B, 4 * model_channels]: sinusoidal embedding of `t`, then Linear, SiLU, Linear."""
        mc, init = self.model_channels, self.param_init
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        emb = timestep_embedding(t, mc)  # [B, mc], float32
        emb = _dense(4 * mc, mc, init, "time_embed_0", **self._kw)(emb)
        return _dense(4 * mc, 4 * mc, init, "time_embed_2", **self._kw)(nn.silu(emb))

    def _encoder(self, h, emb, train):
        """`input_blocks`: a 3x3 conv, then per level `num_res_blocks` res blocks (with attention
        at `attention_resolutions`) and a downsampling. Returns `h` and every block's output
        (the decoder's skips)."""
        res_block, attention, resample_kw = self._blocks()
        axes = tuple(self.activation_axes)
        mc = self.model_channels
        h = _conv3x3(mc, h.shape[-1], self.param_init, name="input_blocks_0_0", padding_mode=self.padding_mode,
                     **self._kw)(h)
        skips = [h]
        block, ds = 1, 1
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = res_block(mult * mc, name=f"input_blocks_{block}_0")(h, emb, train)
                if ds in self.attention_resolutions:
                    h = attention(use_linear=self.use_linear_attn, name=f"input_blocks_{block}_1")(h)
                h = _constrain(h, axes)
                skips.append(h)
                block += 1
            if level != len(self.channel_mult) - 1:
                h = Downsample(self.conv_resample, name=f"input_blocks_{block}_0", **resample_kw)(h)
                skips.append(h)
                block += 1
                ds *= 2
        return h, skips

    def _middle(self, h, emb, train):
        """`middle_block`: res block, full (softmax) attention, res block."""
        res_block, attention, _ = self._blocks()
        ch = h.shape[-1]
        h = res_block(ch, name="middle_block_0")(h, emb, train)
        h = attention(use_linear=False, name="middle_block_1")(h)
        h = res_block(ch, name="middle_block_2")(h, emb, train)
        return _constrain(h, tuple(self.activation_axes))

    def _decoder(self, h, skips, emb, train):
        """`output_blocks`: per level, from the lowest resolution, `num_res_blocks + 1` res
        blocks, each on `h` concatenated with the last skip (torch.cat([h, skip])), with
        attention where the encoder had it and an upsampling after the level's last block."""
        res_block, attention, resample_kw = self._blocks()
        axes = tuple(self.activation_axes)
        skips = list(skips)
        ds = 2 ** (len(self.channel_mult) - 1)
        block = 0
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                j = 0
                h = res_block(mult * self.model_channels, name=f"output_blocks_{block}_{j}")(h, emb, train)
                if ds in self.attention_resolutions:
                    j += 1
                    h = attention(use_linear=self.use_linear_attn, name=f"output_blocks_{block}_{j}")(h)
                if level and i == self.num_res_blocks:
                    j += 1
                    h = Upsample(self.conv_resample, name=f"output_blocks_{block}_{j}", **resample_kw)(h)
                    ds //= 2
                h = _constrain(h, axes)
                block += 1
        return h

    def _head(self, h):
        """`out`: GroupNorm, SiLU and a zero-initialised 3x3 conv to `out_channels` (with
        pooling: a 3x3 conv and the transposed-conv un-pooling)."""
        mc, init, pad, kw = self.model_channels, self.param_init, self.padding_mode, self._kw
        h = nn.silu(_norm_layer(self.dtype, self.param_dtype, "out_0", self.norm)(h))
        if self.pool_factor > 1:
            p = self.pool_factor
            h = _conv3x3(mc, h.shape[-1], init, name="out_2", padding_mode=pad, **kw)(h)  # no zero-init: as the original
            un_pool_kernel = (p, p, mc, self.out_channels)  # torch ConvTranspose2d: fan_in = out * p * p
            return nn.ConvTranspose(self.out_channels, (p, p), strides=(p, p), padding="VALID", name="un_pool",
                                    **_layer_inits(init, un_pool_kernel, transposed=True), **kw)(h)
        return _conv3x3(self.out_channels, h.shape[-1], init, name="out_2", zero=True, padding_mode=pad, **kw)(h)


def count_params(model: nn.Module, input_hw: Sequence[int] = (16, 16)) -> int:
    """Number of parameters of `model` (an EfficientUNet), from shapes only (no allocation).

    `input_hw` must be divisible by the total downsampling of the model.
    """
    x = jax.ShapeDtypeStruct((1, *input_hw, model.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x, t)
    return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes["params"]))
