"""Analytic FLOP count of the EfficientUNet (`cfm_jax/models/unet.py`), from its config.

Used for the model-FLOP/s (and MFU) figures of the training logs: no tracing, no
compilation, just the architecture walked the way `EfficientUNet.__call__` walks it.

Conventions:

* A multiply-add is 2 FLOPs. Counted exactly: every convolution (the 3x3 convs of
  the res blocks, the input and output convs, the stride-2 downsampling convs, the
  convs after nearest up-sampling, the 1x1 skip convs, the `pool` patch conv and
  the `un_pool` transposed conv), every dense layer (time-embedding MLP, the
  per-block embedding projections, qkv and proj_out), and the attention products
  (q k^T and weights v for softmax attention; k^T v and q context for linear
  attention).
* Zero padding is not counted: a 3x3 conv with padding 1 over an n x n map does
  (3n - 2)^2, not 9 n^2, multiply-adds per (input, output) channel pair, because
  the taps that land on padding multiply zeros. These are *model* FLOPs, the math
  the network needs, and the same convention as XLA's cost analysis (which this
  count then matches exactly for every conv and matmul, `tests/test_flops.py`).
  `count_padding=True` gives the dense count (`9 n^2`, what a kernel that
  multiplies the zeros executes): 3.7 % more for the paper's config at latent 128,
  7.5 % at latent 64, where the 8² and 16² maps lose a larger share of their taps.
  With ``model.padding_mode`` reflect or replicate the padded taps multiply real
  values and are counted; with ``model.norm='none'`` there is no GroupNorm work.
* Elementwise work (GroupNorm, SiLU, scale-shift, biases, residual adds, softmax,
  the sinusoidal embedding, average pooling) is excluded by default, as in the
  usual MFU convention; `include_elementwise=True` adds an approximate count
  (`_ELEMENTWISE` below: FLOPs per element of each such op, close to what XLA's
  cost analysis charges). It adds 0.22 % for the paper's config (437 GFLOP per
  example at latent 128), 1.4 % for the quickstart's thinner network.
* Training is forward + backward, the backward costing twice the forward (one
  product for the gradient of the activations, one for that of the weights):
  3x the forward, `train_flops_per_example`. Rematerialisation would add a
  forward on top; the trainer does not use it.
"""
from typing import Sequence

# Approximate FLOPs per element of the elementwise ops, used only with
# `include_elementwise=True`. Calibrated against XLA's HloCostAnalysis of the
# graph (jax/jaxlib 0.10.2): it charges e.g. GroupNorm ~6 per element and SiLU 4.
# XLA also charges dtype converts (bf16 compute) and reductions; those are left out.
_ELEMENTWISE = dict(
    group_norm=6,   # two-pass mean/variance, normalise, affine
    silu=4,
    bias=1,         # bias add of a conv or dense layer, per output element
    add=1,          # residual add
    scale_shift=3,  # h * (1 + scale) + shift
    softmax=4,      # max, subtract, exp, sum, divide
    avg_pool=1,     # per input element (three adds and one divide per 2x2 window)
)
# GroupNorm expands its [B, 32] statistics to the channels with products with a 0/1 [32, C]
# matrix (models/unet.py `_per_channel`): two products (mean, inverse deviation) of 2 * 32 FLOPs
# per channel in the forward. Small, but 1-2 % of the tiny test networks' forward.
_GROUP_NORM_EXPAND_PER_CHANNEL = 2 * 2 * 32


def _taps(n_in: int, kernel: int, stride: int, pad_lo: int, pad_hi: int, count_padding: bool) -> int:
    """Sum over the outputs of one spatial axis of the kernel taps that fall inside the input."""
    n_out = (n_in + pad_lo + pad_hi - kernel) // stride + 1
    if count_padding:
        return n_out * kernel
    total = 0
    for o in range(n_out):
        start = o * stride - pad_lo
        total += max(0, min(start + kernel, n_in) - max(start, 0))
    return total


class _Counter:
    """Accumulates the FLOPs of one example, split into matmul-class and elementwise work."""

    def __init__(self, count_padding: bool, norm: bool = True):
        self.count_padding = count_padding
        self.norm = norm  # model.norm='none': no GroupNorm work
        self.matmul = 0
        self.elementwise = 0

    def ew(self, kind: str, num_elements: int):
        if kind == "group_norm" and not self.norm:
            return
        self.elementwise += _ELEMENTWISE[kind] * num_elements

    def group_norm(self, num_elements: int, channels: int):
        """GroupNorm over ``num_elements`` values of ``channels`` channels: the per-element work and
        the products that expand its per-group mean and inverse deviation to the channels."""
        self.ew("group_norm", num_elements)
        if self.norm:
            self.elementwise += _GROUP_NORM_EXPAND_PER_CHANNEL * channels

    def conv(self, size: int, c_in: int, c_out: int, kernel: int, stride: int = 1, pad: int = 0) -> int:
        """A square conv with bias over a `size` x `size` map; returns the output size."""
        taps = _taps(size, kernel, stride, pad, pad, self.count_padding)
        self.matmul += 2 * taps * taps * c_in * c_out
        out = (size + 2 * pad - kernel) // stride + 1
        self.ew("bias", out * out * c_out)
        return out

    def conv_transpose_patches(self, size: int, c_in: int, c_out: int, p: int) -> int:
        """`ConvTranspose` with kernel = stride = p, VALID: each input pixel fills a p x p patch."""
        self.matmul += 2 * size * size * p * p * c_in * c_out
        self.ew("bias", (size * p) ** 2 * c_out)
        return size * p

    def dense(self, tokens: int, d_in: int, d_out: int):
        self.matmul += 2 * tokens * d_in * d_out
        self.ew("bias", tokens * d_out)

    def res_block(self, size: int, c_in: int, c_out: int, emb_dim: int, scale_shift: bool):
        n = size * size
        self.group_norm(n * c_in, c_in)
        self.ew("silu", n * c_in)
        self.conv(size, c_in, c_out, 3, pad=1)               # in_layers_2
        self.ew("silu", emb_dim)
        self.dense(1, emb_dim, 2 * c_out if scale_shift else c_out)  # emb_layers_1
        self.group_norm(n * c_out, c_out)
        self.ew("scale_shift" if scale_shift else "add", n * c_out)
        self.ew("silu", n * c_out)
        self.conv(size, c_out, c_out, 3, pad=1)              # out_layers_3
        if c_in != c_out:
            self.conv(size, c_in, c_out, 1)                  # skip_connection
        self.ew("add", n * c_out)

    def attention(self, size: int, c: int, heads: int, dim_head: int, linear: bool):
        L = size * size
        inner = heads * dim_head
        self.group_norm(L * c, c)
        self.dense(L, c, 3 * inner)                          # qkv
        if linear:
            self.ew("softmax", 2 * heads * L * dim_head)     # q over features, k over positions
            self.matmul += 2 * 2 * heads * L * dim_head * dim_head  # k^T v, then q context
        else:
            self.ew("softmax", heads * L * L)
            self.matmul += 2 * 2 * heads * L * L * dim_head  # q k^T, then weights v
        self.dense(L, inner, c)                              # proj_out
        self.ew("add", L * c)


def _field(cfg, name):
    """``cfg.name`` of a dict, ConfigDict or module."""
    if isinstance(cfg, dict) or hasattr(cfg, "get"):
        return cfg[name]
    return getattr(cfg, name)


def _count(model_cfg, latent_size: int, count_padding: bool) -> _Counter:
    """Walk `EfficientUNet.__call__` for one example of `latent_size`² and count."""
    f = lambda name: _field(model_cfg, name)  # noqa: E731
    mc, c_in, c_out = f("model_channels"), f("in_channels"), f("out_channels")
    mult: Sequence[int] = tuple(f("channel_mult"))
    n_res, attn_res = f("num_res_blocks"), tuple(f("attention_resolutions"))
    heads, dim_head, linear = f("num_heads"), f("dim_head"), f("use_linear_attn")
    scale_shift, conv_resample, pool = f("use_scale_shift_norm"), f("conv_resample"), f("pool_factor")

    size = latent_size
    if pool > 1:
        if size % pool:
            raise ValueError(f"latent_size {latent_size} is not divisible by pool_factor {pool}")
        size //= pool
    if size % 2 ** (len(mult) - 1):
        raise ValueError(f"latent_size {latent_size} (after pool_factor {pool}) is not divisible by "
                         f"the {len(mult) - 1} downsamplings of channel_mult {mult}")

    # reflect/replicate padding: the taps on the padding multiply real values, model FLOPs too
    padded = _field(model_cfg, "padding_mode") != "zeros"
    k = _Counter(count_padding or padded, norm=_field(model_cfg, "norm") != "none")
    emb = 4 * mc
    # Time embedding: sinusoids, Dense(mc -> 4mc), SiLU, Dense(4mc -> 4mc).
    k.ew("silu", mc)  # cos/sin of the sinusoidal embedding, about as costly
    k.dense(1, mc, emb)
    k.ew("silu", emb)
    k.dense(1, emb, emb)

    if pool > 1:
        k.conv(latent_size, c_in, mc, pool, stride=pool)     # pool: p x p patches, VALID
        size = latent_size // pool
    k.conv(size, mc if pool > 1 else c_in, mc, 3, pad=1)   # input_blocks_0_0

    # Encoder: channels of every tensor pushed on the skip stack, as `hs`.
    ch, ds = mc, 1
    skips = [ch]
    for level, m in enumerate(mult):
        for _ in range(n_res):
            k.res_block(size, ch, m * mc, emb, scale_shift)
            ch = m * mc
            if ds in attn_res:
                k.attention(size, ch, heads, dim_head, linear)
            skips.append(ch)
        if level != len(mult) - 1:
            if conv_resample:
                size = k.conv(size, ch, ch, 3, stride=2, pad=1)
            else:
                k.ew("avg_pool", size * size * ch)
                size //= 2
            skips.append(ch)
            ds *= 2

    # Middle: res block, softmax attention (never linear), res block.
    k.res_block(size, ch, ch, emb, scale_shift)
    k.attention(size, ch, heads, dim_head, linear=False)
    k.res_block(size, ch, ch, emb, scale_shift)

    # Decoder: every res block eats one skip, concatenated on channels.
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(n_res + 1):
            k.res_block(size, ch + skips.pop(), m * mc, emb, scale_shift)
            ch = m * mc
            if ds in attn_res:
                k.attention(size, ch, heads, dim_head, linear)
            if level and i == n_res:
                size *= 2  # nearest-neighbour repeat: no arithmetic
                if conv_resample:
                    k.conv(size, ch, ch, 3, pad=1)
                ds //= 2

    # Output: GroupNorm, SiLU, 3x3 conv (to mc and un_pool back up when pooling).
    k.group_norm(size * size * ch, ch)
    k.ew("silu", size * size * ch)
    if pool > 1:
        k.conv(size, ch, mc, 3, pad=1)                      # out_2
        k.conv_transpose_patches(size, mc, c_out, pool)     # un_pool
    else:
        k.conv(size, ch, c_out, 3, pad=1)                   # out_2
    return k


def unet_forward_flops(model_cfg, latent_size: int, batch_size: int = 1,
                       with_context: bool | None = None, *, include_elementwise: bool = False,
                       count_padding: bool = False) -> int:
    """FLOPs of one EfficientUNet forward pass on `batch_size` inputs of `latent_size`².

    `model_cfg` is the config section `model` (an ml_collections ConfigDict, or a
    dict with the EfficientUNet fields). `in_channels` already counts the context
    channels, so the count does not depend on `with_context`; when given, it is
    checked against the project's convention (`in_channels` is `2 * out_channels`
    with concatenated context, `out_channels` without), as `CFMUpsampler` does.
    Conventions (multiply-add = 2, padding excluded, elementwise excluded unless
    `include_elementwise`): see the module docstring.
    """
    if with_context is not None:
        c_in, c_out = _field(model_cfg, "in_channels"), _field(model_cfg, "out_channels")
        expected = c_out * (2 if with_context else 1)
        if c_in != expected:
            raise ValueError(f"in_channels={c_in} does not fit out_channels={c_out} "
                             f"{'with' if with_context else 'without'} concatenated context "
                             f"(expected in_channels={expected})")
    k = _count(model_cfg, latent_size, count_padding)
    per_example = k.matmul + (k.elementwise if include_elementwise else 0)
    return batch_size * per_example


def train_flops_per_example(model_cfg, latent_size: int) -> int:
    """FLOPs of one training example: forward + backward = 3x the forward.

    The backward pass of every matmul/conv is two products of the forward's size
    (gradient with respect to the input and to the weights), hence 3x; this is the
    usual model-FLOPs convention (the `6N` per token of transformers). The ODE
    sampling, the coupling, the first stage and the optimizer update are not counted.
    """
    return 3 * unet_forward_flops(model_cfg, latent_size)


def model_tflops_per_device(flops_per_example: float, seconds_per_step: float,
                            global_batch_size: int, num_devices: int) -> float:
    """Achieved model TFLOP/s per device of a step of `global_batch_size` examples.

    `flops_per_example` is e.g. `train_flops_per_example(config.model, latent_size)`;
    divide the result by a device's peak TFLOP/s for the MFU.
    """
    if seconds_per_step <= 0 or num_devices <= 0:
        raise ValueError(f"need seconds_per_step > 0 and num_devices > 0, got {seconds_per_step}, {num_devices}")
    return flops_per_example * global_batch_size / (seconds_per_step * num_devices) / 1e12
