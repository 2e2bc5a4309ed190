"""The full set of cfm-jax settings with their defaults; experiment configs start here.

Every knob a user may turn lives in this tree. Config files call
:func:`base_config` and change what differs; the command line overrides any leaf
with ``--config.section.key=value``. The tree is locked, so a misspelt key is an
error, not a silently ignored setting.
"""
import ml_collections

from cfm_jax import sampling, sde


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    # The EfficientUNet (cfm_jax/models/unet.py); fields as in the original.
    c.model = ml_collections.ConfigDict(dict(
        in_channels=8, model_channels=128, out_channels=4, num_res_blocks=3,
        channel_mult=(1, 2, 4, 8), attention_resolutions=(8, 16), dropout=0.0,
        conv_resample=True, dim_head=64, num_heads=4, use_linear_attn=False,
        use_scale_shift_norm=True, pool_factor=-1,
        dtype="bfloat16",        # compute dtype; params stay in param_dtype
        param_dtype="float32",   # 'bfloat16' halves parameter, Adam-state and EMA memory
        remat="none",            # rematerialise blocks in the backward pass: none | full | save_matmuls
        init="torch",            # torch: PyTorch's default init, as the original trains from | flax
        padding_mode="zeros",    # 3x3 convs: zeros (the original) | reflect | replicate (docs/quickstart.md)
        norm="group",            # group (GroupNorm(32), the original) | none (docs/quickstart.md)
    ))

    # Device mesh (cfm_jax/sharding.py): the batch is split over data x fsdp devices, the
    # train state replicated over `data` and sharded over `fsdp` (FSDP). -1: the remaining
    # devices. dcn_data > 1: that many slices (multi-slice TPU), `data` spanning them.
    c.mesh = ml_collections.ConfigDict(dict(
        data=-1, fsdp=1, dcn_data=1,
        fsdp_min_size=2 ** 14,   # arrays with fewer elements stay replicated
    ))

    # Probability path (cfm_jax/flow.py).
    # t_exponent: training times t = u**t_exponent, u ~ U(0,1); 1.0 is the original's uniform t.
    c.flow = ml_collections.ConfigDict(dict(schedule="linear", sigma_min=0.0, t_exponent=1.0))

    # Source and context of the flow (cfm_jax/coupling.py).
    c.coupling = ml_collections.ConfigDict(dict(
        upsampling_mode="psu", upsampling_mode_context="", start_from_noise=False,
        noising_step=400, concat_context=True,
    ))

    # The frozen autoencoder between pixels and latents (cfm_jax/first_stage.py).
    # name: 'identity' (pixel space) or 'autoencoder' (an LDM/SD KL autoencoder at `path`:
    # sd_ae.ckpt, a full SD checkpoint, a diffusers VAE folder or a converted folder).
    # scale_factor -1: take it from the checkpoint (diffusers config; 0.18215 for LDM files).
    c.first_stage = ml_collections.ConfigDict(dict(
        name="identity", path="", scale_factor=1.0, shift_factor=0.0, dtype="float32",
        tile_size=0,      # latent cells per tile for encode/decode; 0: untiled
        tile_overlap=8,   # latent cells shared by neighbouring tiles
    ))

    # Data (cfm_jax/data/train_data.py): `records` = latent records prepared by
    # `python -m cfm_jax.data.prepare` at `path`; `photos` = random crops of the photos
    # bundled with scikit-image drawn on the fly.
    c.data = ml_collections.ConfigDict(dict(
        name="photos",
        path="",              # records folder ('' with prepare_photos: runs/photo_records/v2-<H>x<h>[-<filter>],
                              # the filter only when not box; train_data.records_path)
        prepare_photos=False,  # records: prepare the bundled photos into `path` if missing
        train_split="train",
        val_split="validation",  # '' : no validation (train.eval_every must be 0)
        flip=False,           # records: random horizontal flip of image and latents together
        worker_count=0,       # records: grain worker processes (0: read in the training process)
        worker_buffer_size=2,  # records: batches each worker prepares ahead
        image_size=64,        # high-res crop, pixels
        lowres_size=32,       # low-res image, pixels
        lowres_filter="box",  # low-res image: box (area average; chosen in docs/lowres_filter.md) | bilinear (the
                              # original's F.interpolate, no antialiasing); equal at x2
        batch_size=16,        # global batch (all devices) per optimizer update
        num_val_images=16,    # validation crops (fixed set, held-out photos)
    ))

    # Optimizer (cfm_jax/optim.py). `adam` = torch.optim.Adam semantics (L2 decay).
    c.optim = ml_collections.ConfigDict(dict(
        name="adam", lr=3e-5, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
        schedule="constant", warmup_steps=1000, total_steps=0, min_lr_ratio=0.0,
        num_cycles=0.5,       # cosine: waves over total_steps (0.5: one half-cosine down), as the original
        grad_clip_norm=0.0,   # 0: no clipping
        grad_accum_steps=1,   # micro-batches per optimizer update
    ))

    # EMA with ema-pytorch semantics (cfm_jax/ema.py).
    c.ema = ml_collections.ConfigDict(dict(
        beta=0.999, power=0.75, inv_gamma=1.0, min_value=0.0, update_every=1,
        update_after_step=1000,
    ))

    # Sampling for validation and evaluation (cfm_jax/solvers.py): an ODE method of
    # cfm_jax/sampling.py (euler heun midpoint ralston rk4 | tsit5 dopri5) or the original's SDE
    # sampler (sde_euler, sde_heun; cfm_jax/sde.py) with its diffusion form and last step.
    c.sample = ml_collections.ConfigDict(dict(
        method="rk4", num_steps=40, atol=sampling.DEFAULT_ATOL, rtol=sampling.DEFAULT_RTOL,
        max_steps=sampling.DEFAULT_MAX_STEPS, use_ema=True,
        diffusion_form=sde.DEFAULT_DIFFUSION_FORM, diffusion_norm=sde.DEFAULT_DIFFUSION_NORM,
        last_step=sde.DEFAULT_LAST_STEP, last_step_size=sde.DEFAULT_LAST_STEP_SIZE,
        border_pad=0,  # latent cells of reflect padding while sampling, cropped off (0: the original's math)
        # the velocity averaged over this many symmetries of the square, each applied to the input and
        # undone on the output (cfm_jax/model.py DIHEDRAL_AVERAGES): 1 none (the original's math),
        # 2 the left-right mirror, 4 and the up-down mirrors, 8 and the transposes; n network
        # evaluations per velocity
        dihedral_average=1,
        # every image channel upsampled as a gray image (repeated into all input channels, the output
        # channels averaged): for pixel-space models trained on gray photos; C network evaluations
        # per velocity (False: the original's math; cfm_jax/model.py, docs/quickstart.md)
        channelwise=False,
    ))

    # The training loop (cfm_jax/trainer.py).
    c.train = ml_collections.ConfigDict(dict(
        num_steps=100_000,
        # latent cells of reflect padding of source, target and context in the loss (0: the original's
        # math); train with the sample.border_pad you sample with (cfm_jax/model.py, docs/quickstart.md)
        border_pad=0,
        log_every=50,
        eval_every=5000,
        checkpoint_every=10_000,
        keep_checkpoints=3,
        num_grid_images=8,
    ))

    # Scoring shared by validation (every train.eval_every steps) and eval.py (cfm_jax/evaluation.py):
    # PSNR/SSIM/MSE always; FID and patch-FID (num_crops random crop_size² crops per image, 0:
    # half the image side) when `inception` names the FID Inception weights (pytorch-fid's
    # pt_inception-2015-12-05-6726825d.pth or a `python -m cfm_jax.convert inception` folder).
    # eval.py takes these as the defaults of --inception, --num_crops, --crop_size and --rim.
    # PSNR/SSIM/MSE are also reported for the interior without a rim of `rim` pixels, so that a
    # border problem shows beside the full-image mean (-1: two latent cells, at least 4 px).
    c.eval = ml_collections.ConfigDict(dict(
        inception="",  # '' : no FID
        num_crops=4,
        crop_size=0,
        rim=-1,
    ))

    c.logging = ml_collections.ConfigDict(dict(
        csv=True, tensorboard=True, wandb=False, wandb_project="cfm-jax", wandb_name="",
        progress_bar=True,
    ))
    return c
