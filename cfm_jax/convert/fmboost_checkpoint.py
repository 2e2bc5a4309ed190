"""The original fm-boosting Lightning checkpoints of the CFM UNet -> our params and EMA params.

A checkpoint of the original trainer (``TrainerFMBoost``) holds, under ``state_dict``:

* ``model.net.*``: the EfficientUNet inside the FlowModel (the online weights);
* ``ema_model.ema_model.net.*``: its EMA copy (ema-pytorch);
* bookkeeping ``ema_model.initted`` and ``ema_model.step``, and ``first_stage.*`` (the frozen
  VAE) when one was configured: these are not UNet weights and are skipped.

Anything else is reported as unexpected, together with missing and wrong-shape keys, in
one error (``unet_params_from_torch`` does the per-network check).
"""
from __future__ import annotations

import os
from typing import Any, Mapping, NamedTuple

import numpy as np

from cfm_jax import checkpointing
from cfm_jax.convert.fmboost_unet import unet_params_from_torch
from cfm_jax.convert.state_dict_io import load_state_dict

NET_PREFIX = "model.net."
EMA_PREFIX = "ema_model.ema_model.net."
SKIPPED = ("ema_model.initted", "ema_model.step")
SKIPPED_PREFIXES = ("first_stage.",)


def split_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict, dict, list[str]]:
    """``(online, ema, skipped)`` UNet state dicts (prefixes removed) of a Lightning state dict."""
    online, ema, skipped, unexpected = {}, {}, [], []
    for key, value in state_dict.items():
        if key.startswith(NET_PREFIX):
            online[key[len(NET_PREFIX):]] = value
        elif key.startswith(EMA_PREFIX):
            ema[key[len(EMA_PREFIX):]] = value
        elif key in SKIPPED or key.startswith(SKIPPED_PREFIXES):
            skipped.append(key)
        else:
            unexpected.append(key)
    if not online and not ema:
        raise ValueError(f"This is not an fm-boosting CFM checkpoint: no '{NET_PREFIX}*' or '{EMA_PREFIX}*' keys "
                         f"(first keys: {sorted(state_dict)[:5]}).")
    if unexpected:
        raise ValueError(f"Unexpected keys in the fm-boosting checkpoint (not the UNet, its EMA, the EMA "
                         f"bookkeeping or the first stage): {sorted(unexpected)[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)} in all).")
    return online, ema, skipped


class FmboostWeights(NamedTuple):
    params: dict       # the online weights (``model.net.*``)
    ema_params: dict   # the EMA weights (``ema_model.ema_model.net.*``)
    ema_step: int      # ema-pytorch's update counter (``ema_model.step``); 0 without an EMA copy


def load_fmboost(source: str | Mapping[str, Any], target) -> FmboostWeights:
    """The online weights, EMA weights and EMA counter for our EfficientUNet ``target`` tree from
    a Lightning checkpoint file (``.ckpt``, ``.safetensors``) or an already loaded state dict.
    When the checkpoint has no EMA copy, the EMA params are the online ones and the counter 0
    (the EMA starts again with its warm-up copies); without online weights, the EMA ones."""
    state_dict = load_state_dict(source) if isinstance(source, (str, os.PathLike)) else source
    online, ema, _ = split_state_dict(state_dict)
    errors = []
    converted = {}
    for name, sd in (("model.net", online), ("ema_model.ema_model.net", ema)):
        if not sd:
            continue
        try:
            converted[name] = unet_params_from_torch(sd, target)
        except ValueError as e:
            errors.append(f"[{name}] {e}")
    if errors:
        raise ValueError("The fm-boosting checkpoint does not fit this UNet config (check model.* settings):\n"
                         + "\n".join(errors))
    params = converted.get("model.net", converted.get("ema_model.ema_model.net"))
    ema_params = converted.get("ema_model.ema_model.net", params)
    ema_step = int(np.asarray(state_dict.get("ema_model.step", 0))) if ema else 0
    return FmboostWeights(params, ema_params, ema_step)


def write_run_dir(out_dir: str, config, params, ema_params, *, source: str, step: int = 0,
                  ema_step: int = 0) -> str:
    """Writes a cfm-jax run folder (``config.json``, ``checkpoints/<step>/``) holding the weights,
    usable by ``eval.py --workdir`` and ``train.py --load_weights``."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    manager = checkpointing.make_manager(out_dir, keep=1)
    state = {"params": params, "ema_params": ema_params, "step": np.int32(step), "ema_step": np.int32(ema_step)}
    checkpointing.save(manager, step, state, {"step": step, "converted_from": os.path.abspath(source)})
    manager.close()
    return out_dir
