"""4x up-sampling: 256 px -> 1024 px (SD latents 32² -> 128²), the paper's "SD1.5 + CFM 256² -> 1024²".

The paper's configuration (configs/flow400_64-128) with a 4x smaller low-res image: the PSU
coupling decodes the 32² latent to 256 px, up-samples it bilinearly to 1024 px and encodes it
to the 128² source and context. Same EfficientUNet, noising step 400, Adam 3e-5, EMA 0.999.

The low-res image is made with ``data.lowres_filter`` (docs/lowres_filter.md): at x4 the
project's default and the original's non-antialiased bilinear differ; the original's is
``--config.data.lowres_filter=bilinear`` (records store which filter made them).

Data: ``python -m cfm_jax.data.prepare --src /data/images --out data/cfm_latents_1024_x4
--image_size 1024 --lowres_size 256 --first_stage_path checkpoints/sd_ae.ckpt`` (docs/data.md).
"""
from configs.common import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.first_stage.update(name="autoencoder", path="checkpoints/sd_ae.ckpt", scale_factor=0.18215)
    c.data.update(name="records", path="data/cfm_latents_1024_x4", image_size=1024, lowres_size=256,
                  batch_size=64, worker_count=4)
    c.train.update(num_steps=1_000_000, eval_every=5000, checkpoint_every=10_000, keep_checkpoints=5)
    return c
