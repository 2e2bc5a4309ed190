"""The data-dependent coupling: from a low-res latent to the flow's source ``x0`` and context.

Mirrors ``TrainerFMBoost.get_source_and_context`` / ``upsample_latent`` of the
original (fmboost/trainer.py):

1. The low-res latent is brought to the high-res latent grid with
   ``upsampling_mode``:

   * ``psu`` (the paper's): decode, bilinear up-sampling in pixel space, encode.
     A low-res latent that is already on the high-res grid (pre-computed
     records) is used as is.
   * ``bilinear`` / ``bicubic`` / ``area`` / ``nearest`` / ``nearest-exact``: PyTorch
     ``F.interpolate(lowres, size, mode=...)`` on the latent, what the original does for
     every mode it does not handle itself (``align_corners=False``, no antialiasing;
     bicubic: Keys a=-0.75 with border-clamped taps; area: adaptive average pooling;
     nearest: ``floor(dst * in/out)``; nearest-exact: ``floor((dst + 0.5) * in/out)``).
     Up- and down-sampling sizes both work.
   * ``noise_upsampling``: nearest up-sampling where every cell but the top-left
     of each ``s x s`` block is replaced by standard normal noise.
   * ``identity``: unchanged.

2. The source ``x0`` is that up-sampled latent, or pure noise with
   ``start_from_noise``; with ``noising_step > 0`` it is first noised by one
   forward-diffusion step of the shifted-cosine schedule
   (``sqrt(ab) x + sqrt(1 - ab) eps``, alpha_bar(400) = 0.653904).
3. The context (concatenated to the network input) is the up-sampled latent when
   ``concat_context`` or ``start_from_noise``; ``upsampling_mode_context`` may
   differ from ``upsampling_mode``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax.data import image_ops

# The modes that are a plain F.interpolate of the latent (image_ops.resize reproduces them).
INTERPOLATION_MODES = ("bilinear", "bicubic", "area", "nearest", "nearest-exact")
UPSAMPLING_MODES = ("psu", *INTERPOLATION_MODES, "noise_upsampling", "identity")
NUM_DIFFUSION_STEPS = 1000


def shifted_cosine_alpha_bar(num_steps: int = NUM_DIFFUSION_STEPS, im_size: int = 64,
                             ref_size: int = 64) -> np.ndarray:
    """alpha_bar on ``t = linspace(0, 1, num_steps)`` of the shifted-cosine schedule.

    ``alpha_bar = sigmoid(-2 log(tan(pi t / 2) + 1e-5) + 2 log(ref_size / im_size))``,
    computed in float64 then cast to float32 like the original's buffer. The original
    always builds it with ``im_size=64`` (no shift) whatever the data size.
    """
    t = np.linspace(0.0, 1.0, num_steps)
    with np.errstate(divide="ignore"):
        log_snr = -2.0 * np.log(np.tan(np.pi * t / 2.0) + 1e-5) + 2.0 * np.log(ref_size / im_size)
    return (1.0 / (1.0 + np.exp(-log_snr))).astype(np.float32)


def forward_diffuse(x: jax.Array, noise: jax.Array, *, step: int,
                    alpha_bar: np.ndarray | None = None) -> jax.Array:
    """One draw of q(x_step | x): ``sqrt(ab[step]) x + sqrt(1 - ab[step]) noise``."""
    alpha_bar = shifted_cosine_alpha_bar() if alpha_bar is None else alpha_bar
    ab = jnp.asarray(alpha_bar[step], dtype=x.dtype)
    return jnp.sqrt(ab) * x + jnp.sqrt(1.0 - ab) * noise


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest resize of NHWC ``x`` with PyTorch's ``mode='nearest'`` index rule
    ``src = floor(dst * in / out)`` (differs from half-pixel rules for non-integer ratios)."""
    return image_ops.resize(x, tuple(size), "nearest")


def resize(x: jax.Array, size: tuple[int, int], mode: str) -> jax.Array:
    """NHWC ``x`` resized to ``size`` like PyTorch ``F.interpolate(x, size, mode=mode)``
    (``align_corners=False``, no antialiasing), for ``mode`` in :data:`INTERPOLATION_MODES`;
    up or down, jittable."""
    if mode not in INTERPOLATION_MODES:
        raise ValueError(f"Unknown interpolation mode {mode!r}; choose one of {INTERPOLATION_MODES}.")
    return image_ops.resize(x, tuple(size), mode)


def noise_upsample(x: jax.Array, size: int, rng: jax.Array) -> jax.Array:
    """Nearest up-sampling that keeps one cell per ``s x s`` block and fills the rest with noise."""
    h, w = x.shape[1:3]
    if h != w:
        raise ValueError(f"upsampling_mode='noise_upsampling' needs square latents, got {h}x{w}.")
    if size <= h:
        return resize_nearest(x, (size, size))
    if size % h:
        raise ValueError(f"noise_upsampling needs the high-res size ({size}) to be a multiple of "
                         f"the low-res size ({h}).")
    scale = size // h
    up = resize_nearest(x, (size, size))
    keep = np.zeros((1, size, size, 1), dtype=bool)
    keep[:, ::scale, ::scale] = True
    return jnp.where(keep, up, jax.random.normal(rng, up.shape, up.dtype))


def upsample_latent(lowres: jax.Array, *, size: int, mode: str, first_stage: Any,
                    rng: jax.Array | None = None) -> jax.Array:
    """Brings a low-res latent [B, h, w, C] to the high-res latent grid [B, size, size, C]."""
    if mode == "identity":
        return lowres
    if mode == "psu":
        if lowres.shape[1] == size:  # pre-computed PSU latent, already on the high-res grid
            return lowres
        f = first_stage.downsample_factor
        images = first_stage.decode(lowres)
        return first_stage.encode(image_ops.resize(images, (size * f, size * f), "bilinear"))
    if mode in INTERPOLATION_MODES:
        return resize(lowres, (size, size), mode)
    if mode == "noise_upsampling":
        if rng is None:
            raise ValueError("upsampling_mode='noise_upsampling' needs an rng.")
        return noise_upsample(lowres, size, rng)
    raise ValueError(f"Unknown upsampling mode {mode!r}; choose one of {UPSAMPLING_MODES}.")


@dataclasses.dataclass(frozen=True)
class Coupling:
    """How the source and the context of the flow are built from a low-res latent."""

    upsampling_mode: str = "psu"
    upsampling_mode_context: str | None = None  # None: same as upsampling_mode
    start_from_noise: bool = False
    noising_step: int = -1  # -1 (or 0): no forward noising
    concat_context: bool = True

    def __post_init__(self):
        for name in ("upsampling_mode", "upsampling_mode_context"):
            mode = getattr(self, name)
            if mode is not None and mode not in UPSAMPLING_MODES:
                raise ValueError(f"coupling.{name}={mode!r} is not a known mode; "
                                 f"choose one of {UPSAMPLING_MODES}.")
        step = self.noising_step
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool):
            raise ValueError(f"coupling.noising_step must be an integer step of the 1000-step "
                             f"forward diffusion (or -1 to disable), got {step!r}.")
        if step > 0 and self.start_from_noise:
            raise ValueError("coupling.start_from_noise=True and coupling.noising_step > 0 are mutually "
                             "exclusive (the source is either pure noise or the noised low-res latent); "
                             "set coupling.noising_step=-1 or coupling.start_from_noise=False.")
        if step == 1 or step >= NUM_DIFFUSION_STEPS or step < -1:
            raise ValueError(f"coupling.noising_step={step} is invalid: use an integer in "
                             f"[2, {NUM_DIFFUSION_STEPS - 1}] (the paper uses 400), or -1 to disable.")

    @property
    def context_mode(self) -> str:
        return self.upsampling_mode_context or self.upsampling_mode

    @property
    def uses_context(self) -> bool:
        return self.concat_context or self.start_from_noise

    @classmethod
    def from_config(cls, cfg) -> "Coupling":
        return cls(upsampling_mode=cfg.upsampling_mode,
                   upsampling_mode_context=cfg.upsampling_mode_context or None,
                   start_from_noise=bool(cfg.start_from_noise), noising_step=int(cfg.noising_step),
                   concat_context=bool(cfg.concat_context))

    def source_and_context(self, lowres: jax.Array, *, size: int, first_stage: Any,
                           rng: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``(x0, context)`` for a low-res latent [B, h, w, C]; context is None when unused."""
        up_rng, noise_rng, ctx_rng = jax.random.split(rng, 3)
        lowres_hr = upsample_latent(lowres, size=size, mode=self.upsampling_mode,
                                    first_stage=first_stage, rng=up_rng)
        if self.start_from_noise:
            x0 = jax.random.normal(noise_rng, lowres_hr.shape, lowres_hr.dtype)
        elif self.noising_step > 0:
            noise = jax.random.normal(noise_rng, lowres_hr.shape, lowres_hr.dtype)
            x0 = forward_diffuse(lowres_hr, noise, step=self.noising_step)
        else:
            x0 = lowres_hr
        context = None
        if self.uses_context:
            if self.context_mode == self.upsampling_mode:
                context = lowres_hr
            else:
                context = upsample_latent(lowres, size=size, mode=self.context_mode,
                                          first_stage=first_stage, rng=ctx_rng)
        return x0, context


__all__ = ["Coupling", "INTERPOLATION_MODES", "UPSAMPLING_MODES", "forward_diffuse",
           "noise_upsample", "resize", "resize_nearest", "shifted_cosine_alpha_bar",
           "upsample_latent"]
