"""Networks: the EfficientUNet of fm-boosting and the KL autoencoder (first stage)."""
from cfm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from cfm_jax.models.unet import EfficientUNet, count_params, timestep_embedding

__all__ = ["AutoencoderKL", "DiagonalGaussian", "EfficientUNet", "count_params", "timestep_embedding"]
