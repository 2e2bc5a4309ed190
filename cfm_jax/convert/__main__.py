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
import re
import sys

import jax
from absl import flags
from ml_collections import config_flags

from cfm_jax import cli
from cfm_jax.convert.fmboost_checkpoint import load_fmboost, write_run_dir
from cfm_jax.convert.inception import load_fid_inception, save_converted as save_inception
from cfm_jax.first_stage import load_autoencoder, save_converted
from cfm_jax.model import build_unet
from cfm_jax.models.unet import count_params

COMMANDS = ("vae", "fmboost", "inception")
PROG = "python -m cfm_jax.convert"
USAGE = f"{{{'|'.join(COMMANDS)}}} --src SRC --out OUT [flags]"
_DEFAULT_CONFIG = "configs/flow400_64-128/unet_base_psu.py"


def define_flags(fl: flags.FlagValues, argv) -> None:
    """The converter's flags, on ``fl`` (a fresh ``FlagValues`` per :func:`main` call);
    ``--config.section.key=value`` overrides are looked for in ``argv``."""
    flags.DEFINE_string("src", None, "Checkpoint file or folder to convert. Required.", flag_values=fl)
    flags.DEFINE_string("out", None, "Output folder. Required.", flag_values=fl)
    flags.DEFINE_float("scale_factor", -1.0, "vae: latent scale to record (-1: from the source; 0.18215 for LDM "
                       "files, the diffusers config's scaling_factor otherwise).", flag_values=fl)
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "fmboost: the config whose model the checkpoint "
                                    "was trained with (--config.model.key=value overrides).", lock_config=True,
                                    flag_values=fl, sys_argv=list(argv))


def parse(argv) -> tuple[str, flags.FlagValues]:
    """The command and the flags of ``argv`` (``argv[0]`` the program; the config file loaded for
    ``fmboost``); every command-line error is one line and exit code 2."""
    fl = flags.FlagValues()
    try:  # the config file and its overrides are read while the flags are defined and parsed
        define_flags(fl, argv)
        rest = cli.parse_flags(fl, argv, prog=PROG, usage=USAGE, doc=__doc__)
        if len(rest) != 2 or rest[1] not in COMMANDS:
            problem = f"unknown command {' '.join(rest[1:])!r}" if len(rest) > 1 else "no command"
            cli.fail(f"{problem}; usage: {PROG} {USAGE}")
        if not fl.src or not fl.out:
            cli.fail(f"--src (the file or folder to convert) and --out (the folder to write) are required: "
                     f"{PROG} {rest[1]} --src SRC --out OUT.")
        if rest[1] == "fmboost":
            path = fl["config"].config_filename.split(":")[0]
            if not os.path.isfile(path):
                cli.fail(f"--config {path!r} does not exist: give the config file the checkpoint was trained "
                         f"with, e.g. {_DEFAULT_CONFIG}.")
            fl.config.model  # noqa: B018 -- loads the config file: a broken one fails here, not mid-conversion
    except (AttributeError, KeyError) as e:  # an override of a key the config does not have
        key = re.search(r"'([^'\\]+)", str(e))  # ml_collections nests the key in reprs
        hint = re.search(r'Did you mean "([^"]+)"', str(e))
        cli.fail(f"--config has no key {key.group(1) if key else str(e)!r}"
                 f"{f' (did you mean {hint.group(1)!r}?)' if hint else ''}: check the spelling of the "
                 "--config.section.key=value overrides against the config file.")
    except (OSError, ValueError) as e:  # a config file that does not load
        cli.fail(f"--config: {str(e).strip().splitlines()[0]}")
    return rest[1], fl


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    command, fl = parse(argv)
    cli.skip_tpu_probe_without_accelerator()  # before JAX makes a backend
    try:
        _convert(command, fl)
    except (FileNotFoundError, NotADirectoryError, ValueError, ImportError) as e:  # a missing, wrong or damaged file
        cli.fail(str(e))
    return 0


def _convert(command: str, fl: flags.FlagValues) -> None:
    src, out = fl.src, fl.out
    if command == "inception":
        _, variables = load_fid_inception(src)
        save_inception(out, variables, source=os.path.abspath(src))
        n = sum(x.size for x in jax.tree.leaves(variables["params"]))
        print(f"Converted {src} -> {out}: FID Inception-v3 ({n:,} parameters).")
        return
    if command == "vae":
        model, params, scale = load_autoencoder(src)
        if fl.scale_factor != -1.0:
            scale = fl.scale_factor
        save_converted(out, model, params, scale_factor=scale, source=os.path.abspath(src))
        n = sum(x.size for x in jax.tree.leaves(params))
        print(f"Converted {src} -> {out}: AutoencoderKL ch={model.ch} ch_mult={tuple(model.ch_mult)} "
              f"z={model.z_channels}, {n:,} parameters, scale_factor {scale}.")
        return

    config = fl.config
    # the original's UNet pads with zeros and normalises with GroupNorm: a checkpoint of it under
    # other options would load (same shapes, for padding) and compute something else
    not_original = [f"model.{k}={config.model.get(k, v)!r}" for k, v in (("padding_mode", "zeros"), ("norm", "group"))
                    if config.model.get(k, v) != v]
    if not_original:
        raise ValueError(f"{', '.join(not_original)} is not the original's UNet, which an fm-boosting checkpoint "
                         "was trained as: add --config.model.padding_mode=zeros --config.model.norm=group.")
    model = build_unet(config.model)
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 16, 16, config.model.in_channels), "float32"),
                            jax.ShapeDtypeStruct((1,), "float32"))["params"]
    weights = load_fmboost(src, target)
    write_run_dir(out, config, weights.params, weights.ema_params, source=src, ema_step=weights.ema_step)
    print(f"Converted {src} -> {out}: EfficientUNet with {count_params(model):,} parameters "
          f"(online and EMA). Evaluate with: python eval.py --workdir {out}")


if __name__ == "__main__":
    sys.exit(main())
