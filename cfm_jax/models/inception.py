"""The FID Inception-v3 (pool3 features) in Flax Linen, NHWC.

Reproduces the feature extractor of pytorch-fid (`pytorch_fid.inception.InceptionV3`
with `use_fid_inception=True`, output block 3): the Inception-v3 of TensorFlow's
2015-12-05 graph that the original TF FID code used, as ported to PyTorch, so that
`pt_inception-2015-12-05-6726825d.pth` loads through `cfm_jax.convert.inception` and
gives pytorch-fid's 2048-d features. It differs from torchvision's ImageNet
Inception-v3 in three places, all kept here:

  * the average-pool branches of the A, C and E blocks (Mixed_5b..5d, 6b..6e, 7b)
    divide by the number of real pixels in the window (TF's behaviour; PyTorch's
    `count_include_pad=False`), not by 9;
  * the pool branch of the last block (Mixed_7c) is a 3x3 *max* pool;
  * the input is resized to 299x299 (bilinear, half-pixel centres, no antialiasing:
    `F.interpolate(mode="bilinear", align_corners=False)`) and mapped from [0, 1] to
    [-1, 1] (`2x - 1`) inside the model, in that order.

Every convolution is `BasicConv2d` (conv without bias, BatchNorm with eps 0.001 in
inference mode, ReLU). Submodules carry the PyTorch names, so `Mixed_5b/branch1x1/conv`
is `Mixed_5b.branch1x1.conv` of the state dict; BatchNorm running statistics live in
the `batch_stats` collection (`mean`, `var`), exactly as PyTorch stores them (not
folded into the convolutions), so `model.apply({"params": p, "batch_stats": s}, x)`.
The classifier (`fc`, 2048 -> 1008) is not part of the model.

Shapes through the network for a 299x299 input (after the resize):

  Conv2d_1a_3x3 s2 [149, 149, 32] -> Conv2d_2a_3x3 [147, 147, 32] -> Conv2d_2b_3x3
  [147, 147, 64] -> max pool s2 [73, 73, 64] -> Conv2d_3b_1x1 [73, 73, 80] ->
  Conv2d_4a_3x3 [71, 71, 192] -> max pool s2 [35, 35, 192] -> Mixed_5b..5d [35, 35, 288]
  -> Mixed_6a [17, 17, 768] -> Mixed_6b..6e [17, 17, 768] -> Mixed_7a [8, 8, 1280]
  -> Mixed_7b [8, 8, 2048] -> Mixed_7c [8, 8, 2048] -> mean over H, W [2048]

Mixed precision: `dtype` is the compute dtype of the convolutions and BatchNorms,
`param_dtype` the storage dtype of the parameters; the resize, the input scaling and
the final average are in float32 and the features are returned in float32. FID
numbers should be computed with the float32 default (bf16 moves the features measurably:
docs/evaluation.md). Convolutions run at `precision=HIGHEST` by default (see
`FIDInceptionV3`).
"""
from typing import Any, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cfm_jax.data import image_ops

INPUT_SIZE = 299
FEATURE_DIM = 2048
_BN_EPS = 1e-3

_Pair = Union[int, Tuple[int, int]]


def _pair(v: _Pair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


# ----------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) `conv` -> BatchNorm `bn` (eps 0.001, running statistics) -> ReLU.

    `padding` is PyTorch's symmetric zero padding per axis (an int or (ph, pw)).
    """

    features: int
    kernel_size: _Pair
    strides: _Pair = 1
    padding: _Pair = 0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x):
        ph, pw = _pair(self.padding)
        x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                    padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                    param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPS, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # TF-style average: padded zeros are not counted (count_include_pad=False).
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x, stride: int = 1, pad: int = 1):
    # Padding of a max pool never wins (flax pads with -inf, as PyTorch does implicitly).
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class _Block(nn.Module):
    """Base for the mixed blocks: holds dtypes and builds named `BasicConv2d`s."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    def conv(self, name: str, features: int, kernel: _Pair, strides: _Pair = 1, padding: _Pair = 0):
        return BasicConv2d(features, kernel, strides, padding, dtype=self.dtype,
                           param_dtype=self.param_dtype, precision=self.precision, name=name)


class InceptionA(_Block):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | avg pool -> 1x1.

    Output channels 64 + 64 + 96 + `pool_features`.
    """

    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64, 1)(x)
        b5 = self.conv("branch5x5_1", 48, 1)(x)
        b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5)
        b3 = self.conv("branch3x3dbl_1", 64, 1)(x)
        b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3)
        b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3)
        bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """35 -> 17 reduction (Mixed_6a): 3x3 s2 | 1x1 -> 3x3 -> 3x3 s2 | max pool s2.

    Output channels 384 + 96 + C_in.
    """

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, 3, strides=2)(x)
        bd = self.conv("branch3x3dbl_1", 64, 1)(x)
        bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd)
        bd = self.conv("branch3x3dbl_3", 96, 3, strides=2)(bd)
        bp = _max_pool_3x3(x, stride=2, pad=0)
        return jnp.concatenate([b3, bd, bp], axis=-1)


class InceptionC(_Block):
    """17x17 block (Mixed_6b..6e) with factorised 7x7s (1x7 and 7x1); `channels_7x7`
    inner width. Output channels 4 x 192 = 768."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, 1)(x)
        b7 = self.conv("branch7x7_1", c7, 1)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, 1)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """17 -> 8 reduction (Mixed_7a): 1x1 -> 3x3 s2 | 1x1 -> 1x7 -> 7x1 -> 3x3 s2 | max
    pool s2. Output channels 320 + 192 + C_in."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_1", 192, 1)(x)
        b3 = self.conv("branch3x3_2", 320, 3, strides=2)(b3)
        b7 = self.conv("branch7x7x3_1", 192, 1)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, 3, strides=2)(b7)
        bp = _max_pool_3x3(x, stride=2, pad=0)
        return jnp.concatenate([b3, b7, bp], axis=-1)


class InceptionE(_Block):
    """8x8 block (Mixed_7b, Mixed_7c) with split 1x3 / 3x1 heads. Output channels
    320 + 2 x 384 + 2 x 384 + 192 = 2048. `pool` is 'avg' (Mixed_7b, padded zeros not
    counted) or 'max' (Mixed_7c: the FID graph's max pool)."""

    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320, 1)(x)
        b3 = self.conv("branch3x3_1", 384, 1)(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
        bd = self.conv("branch3x3dbl_1", 448, 1)(x)
        bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd)
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        elif self.pool == "max":
            pooled = _max_pool_3x3(x)
        else:
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        bp = self.conv("branch_pool", 192, 1)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# ----------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------


class FIDInceptionV3(nn.Module):
    """Images [B, H, W, 3] in [0, 1] -> pool3 features [B, 2048] (float32).

    `resize_input`: bilinearly resize to 299x299 first (pytorch-fid's default; any
    input size then works). `normalize_input`: map [0, 1] to [-1, 1] after the resize
    (turn it off to feed [-1, 1] images that are already 299x299). Inference only: the
    BatchNorms always use their running statistics, there is no dropout.

    `precision` of the convolutions defaults to HIGHEST: true float32 products on TPU
    and GPU, whose defaults (a single bf16 pass on TPU, TF32 on recent NVIDIA GPUs)
    give up float32 accuracy for speed. FID is cheap next to sampling, so exactness
    wins; `model.clone(precision=None)` gives the backend default. No effect on CPU.
    """

    resize_input: bool = True
    normalize_input: bool = True
    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32
    precision: Any = jax.lax.Precision.HIGHEST

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 expects NHWC RGB images [B, H, W, 3], got shape {x.shape}")
        x = jnp.asarray(x, jnp.float32)
        if self.resize_input:
            x = image_ops.resize(x, INPUT_SIZE, "bilinear")  # [B, 299, 299, 3]
        if self.normalize_input:
            x = 2.0 * x - 1.0
        x = x.astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

        def conv(name, features, kernel, strides=1, padding=0):
            return BasicConv2d(features, kernel, strides, padding, name=name, **kw)

        # Stem.
        x = conv("Conv2d_1a_3x3", 32, 3, strides=2)(x)
        x = conv("Conv2d_2a_3x3", 32, 3)(x)
        x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x)
        x = _max_pool_3x3(x, stride=2, pad=0)
        x = conv("Conv2d_3b_1x1", 80, 1)(x)
        x = conv("Conv2d_4a_3x3", 192, 3)(x)
        x = _max_pool_3x3(x, stride=2, pad=0)  # [B, 35, 35, 192] at 299
        # 35x35.
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        # 17x17.
        x = InceptionB(name="Mixed_6a", **kw)(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = InceptionC(channels_7x7=c7, name=name, **kw)(x)
        # 8x8.
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)  # [B, 8, 8, 2048]
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # [B, 2048]


def abstract_variables(model: FIDInceptionV3):
    """`{"params": ..., "batch_stats": ...}` of `model` as `jax.ShapeDtypeStruct`s (no compute)."""
    size = INPUT_SIZE if not model.resize_input else 8  # resized inside: any size traces
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


__all__ = ["FIDInceptionV3", "BasicConv2d", "InceptionA", "InceptionB", "InceptionC", "InceptionD",
           "InceptionE", "abstract_variables", "INPUT_SIZE", "FEATURE_DIM"]
