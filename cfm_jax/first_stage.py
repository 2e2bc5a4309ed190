"""The first stage: the frozen autoencoder between pixels and the latents the flow works on.

The paper uses the Stable Diffusion KL-f8 autoencoder (latents scaled by 0.18215);
that one plugs in here as another ``FirstStage`` (autoencoder issue). The quick
start works in pixel space with :class:`IdentityFirstStage`, where "latents" are
the images themselves and PSU (decode, bilinear up-sampling in pixel space, encode)
reduces to bilinear up-sampling.

Interface (all arrays NHWC, images in [-1, 1]):
  ``encode(images) -> latents`` (already multiplied by ``scale_factor``),
  ``decode(latents) -> images`` (divides by ``scale_factor`` first),
  ``downsample_factor`` (pixels per latent cell), ``latent_channels``,
  ``scale_factor`` (what the records' unscaled latents are multiplied by).
"""
from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class IdentityFirstStage:
    """Pixel space: latents are images, nothing is learned or scaled."""

    latent_channels: int = 3
    downsample_factor: int = 1
    scale_factor: float = 1.0
    name: str = "identity"

    def encode(self, images: jax.Array) -> jax.Array:
        return images

    def decode(self, latents: jax.Array) -> jax.Array:
        return latents


def build_first_stage(config) -> IdentityFirstStage:
    """The first stage named by ``config.first_stage`` (a ConfigDict with ``name``)."""
    name = config.first_stage.name
    if name == "identity":
        if config.first_stage.scale_factor != 1.0:
            raise ValueError("The identity first stage cannot use a scale_factor other than 1.0 "
                             f"(got {config.first_stage.scale_factor}); set first_stage.scale_factor=1.0.")
        return IdentityFirstStage()
    if name in ("sd_vae", "kl_f8"):
        raise ValueError(
            f"first_stage.name={name!r}: the SD KL-f8 autoencoder is not part of this version of cfm-jax "
            "yet (it arrives with the autoencoder issue). Train on records whose latents are already "
            "computed, or use first_stage.name='identity' for pixel space.")
    raise ValueError(f"Unknown first_stage.name={name!r}; choose 'identity'.")
