"""Quick start: a small pixel-space CFM upsampler (32² -> 64²) on the photos bundled with scikit-image.

Runs on a laptop CPU in a few minutes (``make quickstart``):

    python train.py --config configs/quickstart.py --workdir runs/quickstart
    python eval.py --workdir runs/quickstart

Pixel space means an identity first stage: the "latents" are the images, and PSU
(decode, bilinear up-sampling, encode) is bilinear up-sampling of the low-res
photo crop. The UNet learns the velocity from that bilinear image to the real
high-res crop, with the bilinear image also given as context.
"""
from configs.common import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.update(
        in_channels=6, model_channels=32, out_channels=3, num_res_blocks=1,
        channel_mult=(1, 2, 2), attention_resolutions=(4,), num_heads=2, dim_head=16,
        dtype="float32",  # bf16 matmuls are slow on most CPUs
    )
    c.coupling.update(upsampling_mode="psu", noising_step=-1, concat_context=True)
    c.data.update(image_size=64, lowres_size=32, batch_size=16, num_val_images=32)
    c.optim.update(lr=1e-3, warmup_steps=100, schedule="cosine", total_steps=1500, min_lr_ratio=0.05,
                   grad_clip_norm=1.0)
    c.ema.update(beta=0.995, update_after_step=200)
    c.sample.update(method="heun", num_steps=11)
    c.train.update(num_steps=1500, log_every=25, eval_every=500, checkpoint_every=500,
                   keep_checkpoints=2)
    return c
