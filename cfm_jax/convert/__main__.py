"""Converts PyTorch checkpoints into cfm-jax folders.

    # the SD autoencoder (sd_ae.ckpt, a full SD .ckpt/.safetensors, or a diffusers VAE folder)
    python -m cfm_jax.convert vae --src checkpoints/sd_ae.ckpt --out checkpoints/sd_ae_flax
    # an original fm-boosting Lightning checkpoint of the CFM UNet (online + EMA weights)
    python -m cfm_jax.convert fmboost --src last.ckpt --out runs/converted \\
        --config configs/flow400_64-128/unet_base_psu.py
    # pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth), for FID
    python -m cfm_jax.convert inception --src pt_inception-2015-12-05-6726825d.pth --out checkpoints/fid_inception

``vae`` writes ``config.json`` (architecture, scale factor, source) and an orbax
``params`` folder; point ``first_stage.path`` at it (the original files load directly
too; converting once saves reading PyTorch pickles at every start). ``fmboost`` writes a
run folder (``config.json``, ``checkpoints/<step>/`` with params and EMA params) that
``eval.py --workdir`` and ``train.py --load_weights`` accept.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_SRC = flags.DEFINE_string("src", None, "Checkpoint file or folder to convert.", required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_SCALE = flags.DEFINE_float("scale_factor", -1.0, "vae: latent scale to record (-1: from the source; "
                            "0.18215 for LDM files, the diffusers config's scaling_factor otherwise).")
_CONFIG = config_flags.DEFINE_config_file("config", "configs/flow400_64-128/unet_base_psu.py",
                                          "fmboost: the config whose model the checkpoint was trained with.",
                                          lock_config=True)
COMMANDS = ("vae", "fmboost", "inception")


def main(argv):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        sys.exit(f"usage: python -m cfm_jax.convert {{{'|'.join(COMMANDS)}}} --src SRC --out OUT [...]")
    import jax

    if argv[1] == "inception":
        from cfm_jax.convert.inception import load_fid_inception, save_converted as save_inception
        _, variables = load_fid_inception(_SRC.value)
        save_inception(_OUT.value, variables, source=os.path.abspath(_SRC.value))
        n = sum(x.size for x in jax.tree.leaves(variables["params"]))
        print(f"Converted {_SRC.value} -> {_OUT.value}: FID Inception-v3 ({n:,} parameters).")
        return
    if argv[1] == "vae":
        from cfm_jax.first_stage import load_autoencoder, save_converted
        model, params, scale = load_autoencoder(_SRC.value)
        if _SCALE.value != -1.0:
            scale = _SCALE.value
        save_converted(_OUT.value, model, params, scale_factor=scale, source=os.path.abspath(_SRC.value))
        n = sum(x.size for x in jax.tree.leaves(params))
        print(f"Converted {_SRC.value} -> {_OUT.value}: AutoencoderKL ch={model.ch} ch_mult={tuple(model.ch_mult)} "
              f"z={model.z_channels}, {n:,} parameters, scale_factor {scale}.")
        return

    from cfm_jax.convert.fmboost_checkpoint import load_fmboost, write_run_dir
    from cfm_jax.upsampler import build_unet
    from cfm_jax.models.unet import count_params

    config = _CONFIG.value
    model = build_unet(config.model)
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 16, 16, config.model.in_channels), "float32"),
                            jax.ShapeDtypeStruct((1,), "float32"))["params"]
    weights = load_fmboost(_SRC.value, target)
    write_run_dir(_OUT.value, config, weights.params, weights.ema_params, source=_SRC.value,
                  ema_step=weights.ema_step)
    print(f"Converted {_SRC.value} -> {_OUT.value}: EfficientUNet with {count_params(model):,} parameters "
          f"(online and EMA). Evaluate with: python eval.py --workdir {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
