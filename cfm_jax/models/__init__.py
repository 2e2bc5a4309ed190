"""Networks: the EfficientUNet of fm-boosting."""
from cfm_jax.models.unet import EfficientUNet, count_params, timestep_embedding

__all__ = ["EfficientUNet", "count_params", "timestep_embedding"]
