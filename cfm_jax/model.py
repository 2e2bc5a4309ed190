"""The CFM upsampler: network + coupling + first stage + flow, assembled from a config.

This is the one place that knows how a batch becomes a loss and how a low-res
latent becomes a high-res image; the trainer, ``eval.py`` and the benchmarks all
go through it.

Batch keys (NHWC): ``image`` (high-res image in [-1, 1]), ``latent`` (its latent,
*unscaled*, like the original's records), ``latent_lowres`` (the low-res latent,
unscaled, either on the low-res grid or already PSU-up-sampled to the high-res
grid). Latents are scaled on the way in (``first_stage.scale_latents``: ``(z - shift_factor)
* scale_factor``, as ``first_stage.encode`` does).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax import flow, sampling
from cfm_jax.coupling import Coupling
from cfm_jax.data import image_ops
from cfm_jax.dtypes import DTYPES
from cfm_jax.first_stage import build_first_stage, scale_latents
from cfm_jax.models.unet import EfficientUNet
from cfm_jax.sharding import BATCH_AXES

def _dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"Unknown dtype {name!r}; choose one of {sorted(DTYPES)}.")
    return DTYPES[name]


def _reflect_pad(pad: int, *arrays):
    """``arrays`` [B, H, W, C] reflect-padded by ``pad`` cells on every side (``None`` stays ``None``)."""
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return tuple(None if a is None else jnp.pad(a, widths, mode="reflect") for a in arrays)


# The symmetries of the square as (flip H, flip W, transpose) of [B, H, W, C] arrays, in the order
# sample.dihedral_average takes them: identity, the left-right mirror (the training data's flip
# augmentation), the up-down mirror, both (a half turn), then the same four followed by a transpose.
_DIHEDRAL = tuple((h, w, t) for t in (False, True) for h, w in ((False, False), (False, True), (True, False),
                                                                (True, True)))


def _dihedral(z, symmetry, *, inverse: bool = False):
    """``z`` [B, H, W, C] under ``symmetry`` (the mirrors, then the transpose), or its inverse
    (the transpose, then the mirrors: each is its own inverse, and the mirrors commute)."""
    flip_h, flip_w, transpose = symmetry
    if inverse and transpose:
        z = jnp.swapaxes(z, 1, 2)
    z = z[:, ::-1 if flip_h else 1, ::-1 if flip_w else 1]
    if transpose and not inverse:
        z = jnp.swapaxes(z, 1, 2)
    return z


DIHEDRAL_AVERAGES = (1, 2, 4, 8)  # sample.dihedral_average: the first n of _DIHEDRAL


def check_dihedral_average(n) -> None:
    """Rejects a ``sample.dihedral_average`` that is not one of :data:`DIHEDRAL_AVERAGES`."""
    if n not in DIHEDRAL_AVERAGES:
        raise ValueError(f"sample.dihedral_average={n}; choose one of {DIHEDRAL_AVERAGES} (1: no averaging, "
                         "the original's sampler).")


def check_channelwise(config) -> None:
    """Rejects ``sample.channelwise`` where the channels are not those of an image: it upsamples
    every channel of the source as a gray image, which needs a pixel-space model (the identity
    first stage) without concatenated context."""
    if not config.sample.channelwise:
        return
    if config.first_stage.name != "identity" or Coupling.from_config(config.coupling).uses_context:
        raise ValueError(
            "sample.channelwise upsamples every image channel as a gray image: it needs a pixel-space model "
            f"(first_stage.name='identity', got {config.first_stage.name!r}) without concatenated context "
            f"(coupling.concat_context={config.coupling.concat_context}); set sample.channelwise=False.")


def build_unet(cfg) -> EfficientUNet:
    """The EfficientUNet of config section ``model``."""
    return EfficientUNet(
        in_channels=cfg.in_channels, model_channels=cfg.model_channels, out_channels=cfg.out_channels,
        num_res_blocks=cfg.num_res_blocks, attention_resolutions=tuple(cfg.attention_resolutions),
        dropout=cfg.dropout, channel_mult=tuple(cfg.channel_mult), conv_resample=cfg.conv_resample,
        dim_head=cfg.dim_head, num_heads=cfg.num_heads, use_linear_attn=cfg.use_linear_attn,
        use_scale_shift_norm=cfg.use_scale_shift_norm, pool_factor=cfg.pool_factor,
        dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype),
        remat=cfg.remat, param_init=cfg.init, padding_mode=cfg.padding_mode, norm=cfg.norm,
        activation_axes=BATCH_AXES)


class CFMUpsampler:
    """Everything needed to train and sample a Coupling Flow Matching upsampler."""

    def __init__(self, config, first_stage: Any | None = None):
        self.config = config
        check_dihedral_average(config.sample.dihedral_average)
        check_channelwise(config)
        self.model = build_unet(config.model)
        self.coupling = Coupling.from_config(config.coupling)
        self.first_stage = build_first_stage(config) if first_stage is None else first_stage
        flow.check_schedule(config.flow.schedule, config.flow.sigma_min, config.flow.t_exponent)
        c = self.first_stage.latent_channels
        expected_in = c * (2 if self.coupling.uses_context else 1)
        if config.model.in_channels != expected_in or config.model.out_channels != c:
            raise ValueError(
                f"model.in_channels={config.model.in_channels}, model.out_channels={config.model.out_channels} "
                f"do not fit the {c}-channel latents of first stage {self.first_stage.name!r} "
                f"{'with' if self.coupling.uses_context else 'without'} concatenated context: "
                f"use in_channels={expected_in}, out_channels={c}.")

    # --- shapes -----------------------------------------------------------------
    def latent_size(self, image_size: int) -> int:
        f = self.first_stage.downsample_factor
        if image_size % f:
            raise ValueError(f"Image size {image_size} is not divisible by the first stage's factor {f}.")
        return image_size // f

    def init(self, rng: jax.Array, latent_size: int, batch_size: int = 1):
        """Parameters for latents of ``latent_size``² (float32 or ``param_dtype``)."""
        c = self.first_stage.latent_channels
        x = jnp.zeros((batch_size, latent_size, latent_size, c), jnp.float32)
        ctx = x if self.coupling.uses_context else None
        return self.model.init({"params": rng}, x, jnp.zeros((batch_size,)), ctx)["params"]

    # --- training ---------------------------------------------------------------
    def scaled_latents(self, batch: dict) -> tuple[jax.Array, jax.Array]:
        fs = self.first_stage
        return (scale_latents(fs, batch["latent"].astype(jnp.float32)),
                scale_latents(fs, batch["latent_lowres"].astype(jnp.float32)))

    def velocity(self, params, x, t, context, *, train: bool = False, dropout_rng=None) -> jax.Array:
        """The network's velocity at ``x`` [B,H,W,C] and times ``t`` ([B] or scalar), float32."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (x.shape[0],))
        rngs = {"dropout": dropout_rng} if (train and dropout_rng is not None) else None
        out = self.model.apply({"params": params}, x, t, context, train=train, rngs=rngs)
        return out.astype(jnp.float32)

    def loss(self, params, batch: dict, rng: jax.Array, *, train: bool = True, first_stage=None) -> jax.Array:
        """Per-example flow matching loss [B] on a batch (coupling drawn with ``rng``).

        ``train.border_pad`` > 0 (not the original's math): source, target and context are
        reflect-padded by that many latent cells and the loss covers the padded latents, so the
        network learns the mirrored borders that ``sample.border_pad`` gives it when sampling,
        and its own zero-padded edge lies outside the image (docs/quickstart.md)."""
        first_stage = self.first_stage if first_stage is None else first_stage
        x1, lowres = self.scaled_latents(batch)
        couple_rng, flow_rng, drop_rng = jax.random.split(rng, 3)
        x0, context = self.coupling.source_and_context(lowres, size=x1.shape[1],
                                                       first_stage=first_stage, rng=couple_rng)
        pad = int(self.config.train.border_pad)
        if pad:  # train on reflect-padded source, target and context, as sample.border_pad samples
            self.check_border_pad(x1.shape[1], x1.shape[2], "train.border_pad")
            x0, x1, context = _reflect_pad(pad, x0, x1, context)

        def velocity_fn(xt, t):
            return self.velocity(params, xt, t, context, train=train, dropout_rng=drop_rng)

        return flow.velocity_loss(velocity_fn, x0=x0, x1=x1, rng=flow_rng,
                                  schedule=self.config.flow.schedule, sigma_min=self.config.flow.sigma_min,
                                  t_exponent=self.config.flow.t_exponent)

    # --- sampling ---------------------------------------------------------------
    def source(self, lowres: jax.Array, keys: jax.Array, *, size: int, first_stage=None):
        """``(x0, context)`` of the flow for low-res latents (scaled) [B, h, w, C], one key per
        example: the coupling (PSU, noising) of example ``i`` draws from ``fold_in(keys[i], 0)``
        alone; with ``sample.border_pad`` both are reflect-padded (:meth:`integrate` crops back)."""
        first_stage = self.first_stage if first_stage is None else first_stage
        source_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)

        def one_source(latent, key):
            x0, context = self.coupling.source_and_context(latent[None], size=size, first_stage=first_stage,
                                                           rng=key)
            return x0[0], (None if context is None else context[0])

        x0, context = jax.vmap(one_source)(lowres, source_keys)
        pad = self.border_pad
        if pad:  # reflect-pad source and context (sample.border_pad)
            self.check_border_pad(x0.shape[1], x0.shape[2])
            x0, context = _reflect_pad(pad, x0, context)
        return x0, context

    def integrate(self, params, x0: jax.Array, context, keys: jax.Array, *, solver) -> sampling.SampleResult:
        """The flow from :meth:`source`'s ``(x0, context)`` to high-res latents with ``solver`` (a
        :class:`cfm_jax.solvers.SolverSpec`); an SDE solver's noise of example ``i`` comes from
        ``fold_in(keys[i], 1)``. The ``sample.border_pad`` frame is cropped off."""
        noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
        result = solver.solve(lambda t, x, a: self.sampling_velocity(a["params"], x, t, a["context"]), x0,
                              {"params": params, "context": context}, noise_keys, schedule=self.config.flow.schedule)
        per_velocity = self.dihedral_average * (x0.shape[-1] if self.channelwise else 1)
        result = result._replace(nfe=result.nfe * per_velocity)  # network evaluations of one image
        pad = self.border_pad
        if pad:
            crop = lambda a: a[..., pad:-pad, pad:-pad, :]  # noqa: E731 -- [.., H, W, C] leaves
            result = result._replace(x=crop(result.x), intermediates=None if result.intermediates is None
                                     else jax.tree.map(crop, result.intermediates))
        return result

    def sampling_velocity(self, params, x, t, context) -> jax.Array:
        """The velocity the samplers integrate: :meth:`velocity`, or, with the options that are not
        the original's math (docs/quickstart.md):

        * ``sample.dihedral_average`` = n > 1: the mean over the first n symmetries of the square
          of the velocity of the transformed input (and context), transformed back: a flow that
          treats mirrored (and transposed) images alike, at n network evaluations;
        * ``sample.channelwise``: every channel k of ``x`` [B, H, W, C] is upsampled as a gray image:
          the network's (averaged) velocity of channel k repeated into all C input channels, its C
          output channels averaged, is the velocity of channel k. C network evaluations per image,
          run as one batch of C * B."""
        if not self.channelwise:
            return self._averaged_velocity(params, x, t, context)
        b, c, spatial = x.shape[0], x.shape[-1], x.shape[1:-1]
        gray = jnp.moveaxis(x, -1, 0).reshape((c * b, *spatial, 1))  # channel k of example i at k * b + i
        t = jnp.tile(jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,)), c)
        v = self._averaged_velocity(params, jnp.repeat(gray, c, axis=-1), t, None).mean(-1)
        return jnp.moveaxis(v.reshape((c, b, *spatial)), 0, -1)

    def _averaged_velocity(self, params, x, t, context) -> jax.Array:
        """:meth:`velocity`, averaged over ``sample.dihedral_average`` symmetries of the square."""
        n = self.dihedral_average
        if n == 1:
            return self.velocity(params, x, t, context)
        total = 0.0
        for symmetry in _DIHEDRAL[:n]:
            moved = None if context is None else _dihedral(context, symmetry)
            total = total + _dihedral(self.velocity(params, _dihedral(x, symmetry), t, moved), symmetry, inverse=True)
        return total / n

    @property
    def channelwise(self) -> bool:
        """``sample.channelwise`` (False: the original's sampler)."""
        return bool(self.config.sample.channelwise)

    @property
    def dihedral_average(self) -> int:
        """``sample.dihedral_average`` (:data:`DIHEDRAL_AVERAGES`; 1: the original's sampler)."""
        return int(self.config.sample.dihedral_average)

    def sample(self, params, lowres: jax.Array, keys: jax.Array, *, size: int, solver,
               first_stage=None) -> sampling.SampleResult:
        """High-res latents (scaled) from low-res latents (scaled) [B, h, w, C] with one key per
        example (``keys`` [B]): :meth:`source`, then :meth:`integrate`. The coupling's noise and
        the SDE's noise of example ``i`` come from ``keys[i]`` alone, so a result does not depend
        on the batch size, the batch's other examples or the number of devices (fixed-step
        solvers; adaptive ones share their step sizes over the batch). ``solver`` is a
        :class:`cfm_jax.solvers.SolverSpec`."""
        x0, context = self.source(lowres, keys, size=size, first_stage=first_stage)
        return self.integrate(params, x0, context, keys, solver=solver)

    @property
    def border_pad(self) -> int:
        """``sample.border_pad``: latent cells of reflect padding around the source and context
        while sampling, cropped off the result (0: none, the original's math). The network then
        never sees an output pixel next to its zero padding (issue: a frame at the borders)."""
        return int(self.config.sample.border_pad)

    def check_border_pad(self, height: int, width: int, key: str = "sample.border_pad") -> None:
        """Rejects a reflect padding (``sample.border_pad`` or ``train.border_pad``) that does not fit
        ``height`` x ``width`` latents or the UNet's down-sampling."""
        section, name = key.split(".")
        pad = int(self.config[section][name])
        levels = 2 ** (len(self.config.model.channel_mult) - 1)
        if pad < 0 or pad >= min(height, width):
            raise ValueError(f"{key}={pad} must be in [0, {min(height, width)}) for {height}x{width} "
                             "latents (reflect padding).")
        if (height + 2 * pad) % levels or (width + 2 * pad) % levels:
            raise ValueError(f"{key}={pad}: the padded latents {height + 2 * pad}x{width + 2 * pad} must "
                             f"stay divisible by the UNet's {levels}x down-sampling; use a multiple of {levels // 2 or 1}.")

    def predict(self, params, batch: dict, keys: jax.Array, *, solver, first_stage=None):
        """``(images [B,H,W,3] in [-1,1], SampleResult)`` for a batch with ``latent`` (its shape
        gives the output size) and ``latent_lowres`` (unscaled), one noise key per example."""
        first_stage = self.first_stage if first_stage is None else first_stage
        x1, lowres = self.scaled_latents(batch)
        result = self.sample(params, lowres, keys, size=x1.shape[1], solver=solver, first_stage=first_stage)
        return jnp.clip(first_stage.decode(result.x), -1.0, 1.0), result

    def make_latents_fn(self):
        """Jitted ``batch -> batch`` that adds ``latent`` and ``latent_lowres`` (unscaled, like
        records) computed with the first stage from ``image`` and ``image_lowres``: the PSU
        latent of the low-res image (bilinear to the high-res size in pixels, then encode)."""
        def add_latents(fs, batch):
            image = batch["image"]
            up = image_ops.resize(batch["image_lowres"], image.shape[1:3], "bilinear")
            return {**batch, "latent": fs.encode_unscaled(image), "latent_lowres": fs.encode_unscaled(up)}

        jitted = jax.jit(add_latents)
        return lambda batch: jitted(self.first_stage, batch)


def check_params_fit_config(path: str, ups: CFMUpsampler, params) -> None:
    """The weights of the checkpoint at ``path`` must have the shapes its config (``ups.config``)
    builds; a ValueError listing the mismatches otherwise (``eval.py`` and upsample check this
    before any compute)."""
    size = max(ups.config.data.image_size // ups.first_stage.downsample_factor, 8)
    expected = jax.eval_shape(lambda: ups.init(jax.random.PRNGKey(0), size))
    flat_e = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_p = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    bad = [f"{k}: checkpoint {flat_p.get(k)} vs config {v}" for k, v in flat_e.items() if flat_p.get(k) != v]
    bad += [f"{k}: in the checkpoint, not in the config's model" for k in flat_p if k not in flat_e]
    if bad:
        raise ValueError(f"{path}: the weights do not fit its config.json ({len(bad)} mismatches, e.g. "
                         f"{bad[:3]}); was config.json edited or copied from another run?")
