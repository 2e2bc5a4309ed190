"""Weight conversion from the original PyTorch checkpoints."""
from cfm_jax.convert.fmboost_unet import unet_params_from_torch, unet_params_to_torch

__all__ = ["unet_params_from_torch", "unet_params_to_torch"]
