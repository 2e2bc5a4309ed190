"""The first stage: the frozen autoencoder between pixels and the latents the flow works on.

Two kinds, both ``flax.struct`` pytrees so that they can be passed *into* jitted
functions (the autoencoder's weights then travel as arguments, not as constants
baked into the compiled program):

* :class:`IdentityFirstStage`: pixel space. "Latents" are the images; PSU (decode,
  bilinear up-sampling in pixel space, encode) reduces to bilinear up-sampling.
* :class:`AutoencoderFirstStage`: the Stable Diffusion KL-f8 autoencoder (or any
  LDM ``AutoencoderKL``). ``encode`` takes the posterior *mode* like the original
  and returns ``(z - shift_factor) * scale_factor`` (scale 0.18215 for SD 1.x/2.x,
  0.13025 for the SDXL VAE; shift 0 for both); ``decode`` inverts that first.
  Large inputs can be encoded and decoded in overlapping, blended tiles
  (``tile_size`` latent cells, ``tile_overlap`` of them shared by neighbours) so
  that memory stays bounded; see :func:`tiled_map` for the error this causes.

Interface (arrays NHWC, images in [-1, 1]): ``encode(images) -> scaled latents``,
``decode(latents) -> images``, ``encode_unscaled`` (the latent as records store it),
``latent_channels``, ``downsample_factor``, ``scale_factor``, ``name``.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax.convert import converted_dir
from cfm_jax.convert.vae import load_pretrained
from cfm_jax.dtypes import DTYPES
from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params

SD_SCALE_FACTOR = 0.18215
CONVERTED_KIND = "cfm_jax.autoencoder_kl"
AUTOENCODER_DTYPES = ("bfloat16", "float32")  # first_stage.dtype


def scale_latents(first_stage, z: jax.Array) -> jax.Array:
    """Latents as records store them (unscaled) -> the scaled latents the flow works on:
    ``(z - shift_factor) * scale_factor``; ``decode`` inverts it."""
    return (z - first_stage.shift_factor) * first_stage.scale_factor


@flax.struct.dataclass
class IdentityFirstStage:
    """Pixel space: latents are images, nothing is learned or scaled."""

    latent_channels: int = flax.struct.field(pytree_node=False, default=3)
    downsample_factor: int = flax.struct.field(pytree_node=False, default=1)
    scale_factor: float = flax.struct.field(pytree_node=False, default=1.0)
    shift_factor: float = flax.struct.field(pytree_node=False, default=0.0)
    name: str = flax.struct.field(pytree_node=False, default="identity")

    def encode_unscaled(self, images: jax.Array) -> jax.Array:
        return images

    def encode(self, images: jax.Array) -> jax.Array:
        return images

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents


# --------------------------------------------------------------------------- tiling
def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(n: int, ramp: int) -> np.ndarray:
    """1-D blending weight of a tile of length ``n``: linear over ``ramp`` cells at both ends."""
    i = np.arange(n)
    return np.minimum(np.minimum(i + 1, n - i), max(ramp, 1)).astype(np.float32) / max(ramp, 1)


def tiled_map(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *, tile: int, overlap: int,
              scale: float) -> jax.Array:
    """Applies ``fn`` ([B, tile, tile, C] -> [B, tile*scale, tile*scale, C']) to overlapping
    tiles of ``x`` [B, H, W, C] and blends the outputs with linear ramps over the overlaps.

    Tiles are processed one after another (``lax.map``), so peak activation memory is that
    of one tile whatever the image size. Each output pixel is the normalised weighted sum of
    the tiles covering it. The result differs from ``fn(x)`` because every tile sees only its
    own context (zero padding at tile edges, GroupNorm statistics per tile); the overlap
    hides the seams. ``tests/test_first_stage.py`` measures the difference.
    """
    b, h, w, c = x.shape
    if h <= tile and w <= tile:
        return fn(x)
    if not 0 <= overlap < tile:
        raise ValueError(f"tile_overlap ({overlap}) must be >= 0 and smaller than tile_size ({tile}).")
    th, tw = min(tile, h), min(tile, w)
    ys, xs = _tile_starts(h, th, th - overlap), _tile_starts(w, tw, tw - overlap)
    coords = [(y, xx) for y in ys for xx in xs]
    tiles = jnp.stack([jax.lax.dynamic_slice(x, (0, y, xx, 0), (b, th, tw, c)) for y, xx in coords])
    outs = jax.lax.map(fn, tiles)  # [T, B, th*s, tw*s, C']
    oth, otw = outs.shape[2], outs.shape[3]
    if oth != round(th * scale) or otw != round(tw * scale):
        raise ValueError(f"tiled_map: fn maps {th}x{tw} tiles to {oth}x{otw}, expected scale {scale}.")
    weight = jnp.asarray(np.outer(_ramp(oth, round(overlap * scale)), _ramp(otw, round(overlap * scale))))
    out_h, out_w = round(h * scale), round(w * scale)
    acc = jnp.zeros((b, out_h, out_w, outs.shape[-1]), jnp.float32)
    norm = jnp.zeros((out_h, out_w), jnp.float32)
    for i, (y, xx) in enumerate(coords):
        oy, ox = round(y * scale), round(xx * scale)
        acc = acc.at[:, oy:oy + oth, ox:ox + otw].add(outs[i].astype(jnp.float32) * weight[None, :, :, None])
        norm = norm.at[oy:oy + oth, ox:ox + otw].add(weight)
    return acc / norm[None, :, :, None]


# --------------------------------------------------------------------------- autoencoder
@flax.struct.dataclass
class AutoencoderFirstStage:
    """A frozen KL autoencoder with its latent scale (and optional shift)."""

    params: Any
    model: AutoencoderKL = flax.struct.field(pytree_node=False)
    scale_factor: float = flax.struct.field(pytree_node=False, default=SD_SCALE_FACTOR)
    shift_factor: float = flax.struct.field(pytree_node=False, default=0.0)
    tile_size: int = flax.struct.field(pytree_node=False, default=0)  # latent cells; 0: untiled
    tile_overlap: int = flax.struct.field(pytree_node=False, default=8)
    name: str = flax.struct.field(pytree_node=False, default="autoencoder_kl")

    @property
    def latent_channels(self) -> int:
        return self.model.embed_dim

    @property
    def downsample_factor(self) -> int:
        return self.model.downsample_factor

    def _encode_mode(self, images):
        return self.model.apply({"params": self.params}, images, method=AutoencoderKL.encode).mode()

    def _decode(self, z):
        return self.model.apply({"params": self.params}, z, method=AutoencoderKL.decode)

    def encode_unscaled(self, images: jax.Array) -> jax.Array:
        """Posterior mode [B, H/f, W/f, C] of images [B, H, W, 3], unscaled (as records store it)."""
        f = self.downsample_factor
        if self.tile_size:
            return tiled_map(self._encode_mode, images, tile=self.tile_size * f,
                             overlap=self.tile_overlap * f, scale=1.0 / f)
        return self._encode_mode(images)

    def encode(self, images: jax.Array) -> jax.Array:
        return scale_latents(self, self.encode_unscaled(images))

    def decode(self, latents: jax.Array) -> jax.Array:
        z = latents / self.scale_factor + self.shift_factor
        if self.tile_size:
            return tiled_map(self._decode, z, tile=self.tile_size, overlap=self.tile_overlap,
                             scale=float(self.downsample_factor))
        return self._decode(z)


# --------------------------------------------------------------------------- loading
def save_converted(out_dir: str, model: AutoencoderKL, params, *, scale_factor: float, source: str) -> None:
    """Writes a converted autoencoder: ``config.json`` plus an orbax ``params`` folder."""
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model_fields(model).items()}
    converted_dir.save(out_dir, CONVERTED_KIND, "params", params, model=fields, scale_factor=scale_factor,
                       source=source)


def model_fields(model: AutoencoderKL) -> dict:
    return {k: getattr(model, k) for k in ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim",
                                            "attn_resolutions", "resolution", "dropout", "in_channels",
                                            "out_ch", "double_z")}


def is_converted_dir(path: str) -> bool:
    """Whether ``path`` is a folder written by :func:`save_converted`."""
    return converted_dir.is_converted_dir(path, CONVERTED_KIND)


def _model_of_meta(meta: dict, dtype) -> AutoencoderKL:
    """The ``AutoencoderKL`` a converted folder's ``config.json`` describes."""
    return AutoencoderKL(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in meta["model"].items()},
                         dtype=dtype)


def load_autoencoder(path: str, *, dtype=jnp.float32) -> tuple[AutoencoderKL, Any, float]:
    """``(model, params, scale_factor)`` from a converted folder, an LDM/SD checkpoint file
    (``sd_ae.ckpt``, ``.safetensors``) or a diffusers VAE folder."""
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"first_stage.path={path!r} does not exist. Point it at the SD autoencoder: the original's "
            "`sd_ae.ckpt`, a full SD checkpoint, a diffusers VAE folder (config.json + "
            "diffusion_pytorch_model.safetensors), or a folder written by `python -m cfm_jax.convert vae`.")
    meta = converted_dir.read_meta(path, CONVERTED_KIND) if os.path.isdir(path) else None
    if meta is not None:
        model = _model_of_meta(meta, dtype)
        target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_params(model))
        return model, converted_dir.restore(path, "params", target), float(meta["scale_factor"])
    model, params, scale = load_pretrained(path, dtype=dtype)
    return model, params, scale


def build_first_stage(config, *, abstract: bool = False):
    """The first stage named by ``config.first_stage`` (see :func:`make_first_stage`)."""
    fs = config.first_stage
    return make_first_stage(fs.name, fs.path, scale_factor=fs.scale_factor, shift_factor=fs.shift_factor,
                            dtype=fs.dtype, tile_size=fs.tile_size, tile_overlap=fs.tile_overlap, abstract=abstract)


def make_first_stage(name: str, path: str = "", *, scale_factor: float = -1.0, shift_factor: float = 0.0,
                     dtype: str = "float32", tile_size: int = 0, tile_overlap: int = 8, abstract: bool = False):
    """The one constructor of a first stage: ``name`` ``'identity'`` (pixel space) or
    ``'autoencoder'`` (the one at ``path``, any format :func:`load_autoencoder` reads);
    ``scale_factor=-1``: the checkpoint's. ``abstract``: the autoencoder with abstract weights,
    nothing read from disk but a converted folder's ``config.json`` (the SD KL-f8 architecture
    and scale for checkpoint files or no ``path``), for compiling without the weights."""
    if name == "identity":
        if scale_factor not in (1.0, -1.0):
            raise ValueError("The identity first stage cannot use a scale_factor other than 1.0 "
                             f"(got {scale_factor}); set first_stage.scale_factor=1.0.")
        return IdentityFirstStage()
    if name != "autoencoder":
        raise ValueError(f"Unknown first_stage.name={name!r}; choose 'identity' or 'autoencoder'.")
    if dtype not in AUTOENCODER_DTYPES:
        raise ValueError(f"first_stage.dtype={dtype!r}; choose one of {sorted(AUTOENCODER_DTYPES)}.")
    if abstract:
        path = os.path.expanduser(path or "")
        meta = converted_dir.read_meta(path, CONVERTED_KIND) if path and os.path.isdir(path) else None
        model = AutoencoderKL(dtype=DTYPES[dtype]) if meta is None else _model_of_meta(meta, DTYPES[dtype])
        params, file_scale, label = abstract_params(model), SD_SCALE_FACTOR, "abstract"
    else:
        if not path:
            raise ValueError("first_stage.name='autoencoder' needs first_stage.path: the SD VAE checkpoint "
                             "(e.g. --config.first_stage.path=checkpoints/sd_ae.ckpt).")
        model, params, file_scale = load_autoencoder(path, dtype=DTYPES[dtype])
        params, label = jax.tree.map(jnp.asarray, params), os.path.basename(path.rstrip("/"))
    scale = file_scale if scale_factor == -1.0 else float(scale_factor)
    return AutoencoderFirstStage(params=params, model=model, scale_factor=scale, shift_factor=float(shift_factor),
                                 tile_size=int(tile_size), tile_overlap=int(tile_overlap), name=label)
