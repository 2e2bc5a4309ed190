"""Weight conversion from PyTorch checkpoints: the fm-boosting UNet and the KL autoencoder."""
from cfm_jax.convert.fmboost_unet import unet_params_from_torch
from cfm_jax.convert.state_dict_io import load_state_dict
from cfm_jax.convert.vae import detect_format, load_pretrained, vae_params_from_diffusers, vae_params_from_ldm

__all__ = ["detect_format", "load_pretrained", "load_state_dict", "unet_params_from_torch",
           "vae_params_from_diffusers", "vae_params_from_ldm"]
