"""KL-regularised autoencoder of latent diffusion (the SD "KL-f8" VAE), in Flax Linen, NHWC.

Reproduces the computation of `fmboost/kl_autoencoder.py` (CompVis/fm-boosting,
PyTorch, NCHW; the LDM/CompVis architecture that diffusers' `AutoencoderKL` also
implements), so that `sd_ae.ckpt`, full SD checkpoints and diffusers VAE folders load
through `cfm_jax.convert.vae` and give the same numbers. Images are in [-1, 1].

Submodule names follow the LDM state-dict tree, each `<name>.<index>` written as
`<name>_<index>`, so the converter is mechanical:

  encoder/conv_in                          encoder.conv_in
  encoder/down_{i}/block_{j}/{norm1,conv1,norm2,conv2,nin_shortcut}
                                           encoder.down.{i}.block.{j}.*
  encoder/down_{i}/attn_{j}/{norm,q,k,v,proj_out}   encoder.down.{i}.attn.{j}.*
  encoder/down_{i}/downsample/conv         encoder.down.{i}.downsample.conv
  encoder/mid/{block_1,attn_1,block_2}     encoder.mid.{block_1,attn_1,block_2}
  encoder/{norm_out,conv_out}              encoder.{norm_out,conv_out}
  quant_conv, post_quant_conv              quant_conv, post_quant_conv
  decoder/...                              the same, with up_{i}/upsample/conv
                                           for decoder.up.{i}.upsample.conv

Under `mid`, `block_1`, `attn_1` and `block_2` are LDM's own names (not indices).
Level `i` of the decoder (`up_{i}`) is the one at the resolution of encoder level
`i`, as in LDM (it runs after `up_{i+1}`). The attention projections `q`, `k`, `v`,
`proj_out` are 1x1 convolutions in LDM and `nn.Dense` layers here (same math).

Mixed precision: `dtype` is the compute dtype of convolutions, dense layers and
attention, `param_dtype` the storage dtype of the parameters. GroupNorm statistics
and the attention softmax are computed in float32 whatever `dtype` is; the posterior
moments and decoded images are returned in float32.
"""
import math
from typing import Any, Sequence, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

_NUM_GROUPS = 32
_NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


# ----------------------------------------------------------------------------------
# Posterior
# ----------------------------------------------------------------------------------


@flax.struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z | x): `mean`, `logvar` [B, h, w, embed_dim].

    Build it with `from_moments`, which clamps `logvar` to [-30, 20] as LDM does.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split moments [B, h, w, 2 * D] into mean (first D channels) and logvar."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, rng: jax.Array) -> jax.Array:
        """One draw `mean + std * eps`, eps ~ N(0, I) from `rng`."""
        eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps


# ----------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------


def _group_norm(dtype, param_dtype, name):
    # GroupNorm(32, eps 1e-6) with float32 statistics and PyTorch's two-pass variance.
    return nn.GroupNorm(num_groups=_NUM_GROUPS, epsilon=_NORM_EPS, use_fast_variance=False,
                        dtype=dtype, param_dtype=param_dtype, name=name)


def _conv(features, kernel, dtype, param_dtype, name, *, strides=1, padding=None):
    # Explicit PyTorch-like padding (`kernel // 2` each side unless given), never 'SAME'.
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding=padding,
                   dtype=dtype, param_dtype=param_dtype, name=name)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without time embedding (LDM `ResnetBlock`)."""

    out_channels: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        # x: [B, H, W, Cin] -> [B, H, W, Cout]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c_out = self.out_channels
        h = nn.silu(_group_norm(name="norm1", **kw)(x))
        h = _conv(c_out, 3, name="conv1", **kw)(h)
        h = nn.silu(_group_norm(name="norm2", **kw)(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = _conv(c_out, 3, name="conv2", **kw)(h)
        if x.shape[-1] != c_out:
            x = _conv(c_out, 1, name="nin_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, with residual (LDM `AttnBlock`)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, hgt, wid, c = x.shape
        h = _group_norm(name="norm", **kw)(x).reshape(b, hgt * wid, c)  # [B, L, C], l = y*W + x
        q = nn.Dense(c, name="q", **kw)(h)
        k = nn.Dense(c, name="k", **kw)(h)
        v = nn.Dense(c, name="v", **kw)(h)
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (1.0 / math.sqrt(c))  # [B, L, L]
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bqk,bkc->bqc", weights, v)  # [B, L, C]
        out = nn.Dense(c, name="proj_out", **kw)(out)
        return x + out.reshape(b, hgt, wid, c)


class Downsample(nn.Module):
    """Halve H and W: pad bottom/right by one, then 3x3 stride-2 conv `conv` (padding 0)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # LDM pads (0, 1, 0, 1) by hand: torch convs have no asymmetric padding.
        return _conv(x.shape[-1], 3, self.dtype, self.param_dtype, "conv", strides=2,
                     padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    """Double H and W: nearest neighbour, then 3x3 conv `conv`."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return _conv(x.shape[-1], 3, self.dtype, self.param_dtype, "conv")(x)


class MidBlock(nn.Module):
    """`block_1`, `attn_1`, `block_2` at the lowest resolution."""

    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.dropout, name="block_1", **kw)(x, train=train)
        x = AttnBlock(name="attn_1", **kw)(x)
        return ResnetBlock(c, self.dropout, name="block_2", **kw)(x, train=train)


class Level(nn.Module):
    """One resolution level: `block_{j}` (each followed by `attn_{j}` when `attention`),
    then `downsample` or `upsample` when `resample` is 'down' or 'up'."""

    out_channels: int
    num_blocks: int
    attention: bool = False
    resample: str = "none"  # 'down' | 'up' | 'none'
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, self.dropout, name=f"block_{j}", **kw)(x, train=train)
            if self.attention:
                x = AttnBlock(name=f"attn_{j}", **kw)(x)
        if self.resample == "down":
            x = Downsample(name="downsample", **kw)(x)
        elif self.resample == "up":
            x = Upsample(name="upsample", **kw)(x)
        return x


# ----------------------------------------------------------------------------------
# Encoder, decoder, autoencoder
# ----------------------------------------------------------------------------------


def _level_resolutions(resolution: int, num_levels: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """LDM's `curr_res` bookkeeping at each level, (encoder, decoder), indexed by level."""
    enc, res = [], resolution
    for _ in range(num_levels):
        enc.append(res)
        res //= 2
    dec, res = [0] * num_levels, resolution // 2 ** (num_levels - 1)
    for i in reversed(range(num_levels)):
        dec[i] = res
        res *= 2
    return tuple(enc), tuple(dec)


class Encoder(nn.Module):
    """Images [B, H, W, in_channels] -> [B, H/f, W/f, 2*z_channels (double_z) or z_channels]."""

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    z_channels: int = 4
    double_z: bool = True
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(self.ch_mult)
        resolutions = _level_resolutions(self.resolution, n)[0]
        h = _conv(self.ch, 3, name="conv_in", **kw)(x.astype(self.dtype))
        for i, mult in enumerate(self.ch_mult):
            h = Level(self.ch * mult, self.num_res_blocks,
                      attention=resolutions[i] in self.attn_resolutions,
                      resample="down" if i != n - 1 else "none", dropout=self.dropout,
                      name=f"down_{i}", **kw)(h, train=train)
        h = MidBlock(self.dropout, name="mid", **kw)(h, train=train)
        h = nn.silu(_group_norm(name="norm_out", **kw)(h))
        out = 2 * self.z_channels if self.double_z else self.z_channels
        return _conv(out, 3, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """Latents [B, h, w, z_channels] -> images [B, h*f, w*f, out_ch]."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z, *, train: bool = False):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        n = len(self.ch_mult)
        resolutions = _level_resolutions(self.resolution, n)[1]
        h = _conv(self.ch * self.ch_mult[-1], 3, name="conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(self.dropout, name="mid", **kw)(h, train=train)
        for i in reversed(range(n)):
            h = Level(self.ch * self.ch_mult[i], self.num_res_blocks + 1,
                      attention=resolutions[i] in self.attn_resolutions,
                      resample="up" if i != 0 else "none", dropout=self.dropout,
                      name=f"up_{i}", **kw)(h, train=train)
        h = nn.silu(_group_norm(name="norm_out", **kw)(h))
        return _conv(self.out_ch, 3, name="conv_out", **kw)(h)


class AutoencoderKL(nn.Module):
    """LDM KL autoencoder; NHWC, images in [-1, 1]; fields as LDM's `ddconfig` + `embed_dim`.

    The defaults are the Stable Diffusion KL-f8 VAE (downsampling 2**(len(ch_mult)-1)
    = 8, 4 latent channels). `attn_resolutions` holds resolutions in pixels, counted
    from `resolution` (which serves only this bookkeeping, as in LDM), at which every
    res block of a down/up level is followed by attention; the mid blocks always have
    attention. Use `encode` / `decode` through `apply(..., method=...)`; `__call__`
    (encode then decode) exists for `init` and returns `(images, posterior)`.
    """

    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    attn_resolutions: Sequence[int] = ()
    resolution: int = 256
    dropout: float = 0.0
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = True
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent cell along each axis."""
        return 2 ** (len(self.ch_mult) - 1)

    def setup(self):
        if not self.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (the encoder predicts mean and logvar)")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        common = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                      attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                      dropout=self.dropout, **kw)
        self.encoder = Encoder(z_channels=self.z_channels, double_z=self.double_z, **common)
        self.decoder = Decoder(out_ch=self.out_ch, **common)
        self.quant_conv = nn.Conv(2 * self.embed_dim, (1, 1), **kw)
        self.post_quant_conv = nn.Conv(self.z_channels, (1, 1), **kw)

    def encode(self, x: jax.Array, *, train: bool = False) -> DiagonalGaussian:
        """Posterior for images `x` [B, H, W, in_channels]; mean/logvar [B, H/f, W/f, embed_dim].

        H and W must be multiples of `downsample_factor`. Dropout, when `train` and
        `dropout > 0`, draws from the 'dropout' rng.
        """
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"AutoencoderKL.encode expects NHWC images with {self.in_channels} "
                             f"channels, got shape {x.shape}")
        f = self.downsample_factor
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image size {x.shape[1:3]} is not a multiple of the downsampling "
                             f"factor {f}")
        moments = self.quant_conv(self.encoder(x, train=train))  # [B, h, w, 2*embed_dim]
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z: jax.Array, *, train: bool = False) -> jax.Array:
        """Images [B, h*f, w*f, out_ch] (float32) from latents `z` [B, h, w, embed_dim].

        `z` is the unscaled latent (no SD scale factor applied; the first stage does that).
        """
        if z.ndim != 4 or z.shape[-1] != self.embed_dim:
            raise ValueError(f"AutoencoderKL.decode expects NHWC latents with {self.embed_dim} "
                             f"channels, got shape {z.shape}")
        h = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(h, train=train).astype(jnp.float32)

    def __call__(self, x: jax.Array, *, sample_posterior: bool = False, train: bool = False):
        """Reconstruction and posterior. Decodes the posterior mode unless `sample_posterior`
        (then draws from the 'posterior' rng; LDM's `forward` samples by default)."""
        posterior = self.encode(x, train=train)
        z = posterior.sample(self.make_rng("posterior")) if sample_posterior else posterior.mode()
        return self.decode(z, train=train), posterior


def abstract_params(model: AutoencoderKL):
    """The params tree of `model` as `jax.ShapeDtypeStruct`s (no allocation, no compute)."""
    f = model.downsample_factor
    x = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
