"""The second stage of the paper's 2048² cascade: 1024 px -> 2048 px (SD latents 128² -> 256²).

The paper cascades CFM models (128² -> 256² -> ... -> 2048² latents); the original ships a config
only for the first stage (configs/flow400_64-128). This one is that configuration with the sizes
doubled: the same EfficientUNet (305,806,340 parameters; it is fully convolutional, attention at
downsample factors 8 and 16, i.e. on 32² and 16² grids here), PSU coupling, source noised to step
400, Adam 3e-5, EMA 0.999 after 1000 updates.

Memory: at global batch 64 the train step fits a v4-8 and a v5p-8 with pure data parallelism,
but not a v5e-16 as configured: there `python -m cfm_jax.plan` recommends
``--config.mesh.data=1 --config.mesh.fsdp=16`` (per-chip memory of each slice: docs/tpu_planning.md,
"The paper configuration on real slices"). Plan the slice before renting it:

    python -m cfm_jax.plan --config configs/flow400_128-256/unet_base_psu.py --topology v5e:4x4

Data: records of 2048² images with their 256² latents and the PSU latents of their 1024²
versions, e.g. ``python -m cfm_jax.data.prepare --src /data/images --out data/cfm_latents_2048
--image_size 2048 --lowres_size 1024 --first_stage_path checkpoints/sd_ae.ckpt`` (docs/data.md).
"""
from configs.common import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.first_stage.update(name="autoencoder", path="checkpoints/sd_ae.ckpt", scale_factor=0.18215)
    c.data.update(name="records", path="data/cfm_latents_2048", image_size=2048, lowres_size=1024,
                  batch_size=64, worker_count=4)
    c.eval.update(crop_size=512)  # the original's metric crops: 4 random 512² crops per image
    c.train.update(num_steps=1_000_000, eval_every=5000, checkpoint_every=10_000, keep_checkpoints=5)
    return c
