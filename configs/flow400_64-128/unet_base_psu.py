"""The paper's configuration (configs/flow400_64-128/unet-base_psu.yaml of the original).

512 px -> 1024 px (SD latents 64² -> 128²), PSU coupling, source noised to step 400
of the shifted-cosine forward diffusion, low-res latent concatenated as context,
EfficientUNet with 305,806,340 parameters, Adam lr 3e-5 with 1000 warm-up steps,
EMA 0.999 (power 3/4) after 1000 steps, bf16 compute, checkpoints every 10k steps,
validation every 5k (rk4, 40 grid points).

The first stage is the SD KL-f8 autoencoder (scale 0.18215) read from
``checkpoints/sd_ae.ckpt`` (override with ``--config.first_stage.path``; a diffusers
VAE folder or a folder from ``python -m cfm_jax.convert vae`` work too).
"""
from configs.common import base_config


def get_config(arg=None):
    del arg
    c = base_config()  # the defaults *are* the paper's model, flow, coupling, optimizer and EMA
    c.first_stage.update(name="autoencoder", path="checkpoints/sd_ae.ckpt", scale_factor=0.18215)
    # Records from `python -m cfm_jax.data.prepare ... --out data/cfm_latents_1024` (README); the
    # original reads its own latent dataset without flipping, so flip stays off.
    c.data.update(name="records", path="data/cfm_latents_1024", image_size=1024, lowres_size=512,
                  batch_size=64, worker_count=4)
    c.train.update(num_steps=1_000_000, eval_every=5000, checkpoint_every=10_000, keep_checkpoints=5)
    return c
