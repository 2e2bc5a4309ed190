"""KL autoencoder weights (LDM/CompVis or diffusers PyTorch format) <-> our Flax params.

Pure numpy; PyTorch is needed only to read pickled `.ckpt`/`.pt`/`.bin` files.

Formats:
  'ldm'        the CompVis names of `fmboost/kl_autoencoder.py` and SD's `first_stage_model`
               (`encoder.down.0.block.0.conv1.weight`, `encoder.mid.attn_1.q.weight` as a
               1x1 conv (C, C, 1, 1), `decoder.up.3.upsample.conv.weight`, ...). Accepted
               bare (`sd_ae.ckpt`; keys outside encoder/decoder/quant_conv/post_quant_conv
               such as `loss.*` are ignored), inside a Lightning `{"state_dict": ...}`, and
               under the prefix `first_stage_model.` (SD checkpoints), `first_stage.`
               (fm-boosting trainer checkpoints) or `vae.`; keys outside the prefix
               (`model.*`, `cond_stage_model.*`, ...) are ignored.
  'diffusers'  `AutoencoderKL` of diffusers (`encoder.down_blocks.0.resnets.0.conv1.weight`,
               `encoder.mid_block.attentions.0.to_q.weight` as a Linear (C, C),
               `decoder.up_blocks.0.upsamplers.0.conv.weight`, ...); diffusers numbers the
               decoder's `up_blocks` from the lowest resolution, so `up_blocks.{k}` is LDM's
               `up.{n-1-k}`. The legacy attention names `query`/`key`/`value`/`proj_attn`
               are accepted too.

Our names are LDM's with `<name>.<index>` written `<name>_<index>` (see
`cfm_jax/models/autoencoder.py`). Layouts (PyTorch -> Flax): Conv2d (O, I, kh, kw) ->
(kh, kw, I, O); attention projections (O, I, 1, 1) or (O, I) -> Dense (I, O); GroupNorm
weight, bias -> scale, bias. Every missing, unexpected and wrong-shaped key is reported
together in one ValueError.
"""
import json
import os
import re
from typing import Any, Callable, Dict, List, Mapping, Tuple

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict as _flatten, unflatten_dict as _unflatten

from cfm_jax.convert.state_dict_io import (load_state_dict, mismatch_lines, strip_collection as _strip_collection,
                                           unwrap_lightning as _unwrap)
from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params

LDM_PREFIXES = ("first_stage_model.", "first_stage.", "vae.")
_VAE_ROOTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")
SD_SCALE_FACTOR = 0.18215  # SD's latent scale; LDM checkpoints do not store it
_DIFFUSERS_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                           "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_LOOKED_FOR = ("keys like 'encoder.down.0.block.0.conv1.weight' (LDM) or "
               "'encoder.down_blocks.0.resnets.0.conv1.weight' (diffusers), bare, inside a Lightning "
               "'state_dict', or under one of the prefixes " + ", ".join(repr(p) for p in LDM_PREFIXES))


# ----------------------------------------------------------------------------------
# Names and layouts
# ----------------------------------------------------------------------------------

# kinds: 'conv' (HWIO <-> OIHW), 'attn' (Dense (I, O) <-> 1x1 conv or Linear), 'vector'


def _kind(modules: Tuple[str, ...], leaf: str, ndim: int) -> str:
    if leaf in ("scale", "bias"):
        return "vector"
    if leaf != "kernel":
        raise ValueError(f"unknown parameter {'/'.join(modules + (leaf,))}")
    if ndim == 4:
        return "conv"
    if ndim == 2:
        return "attn"
    raise ValueError(f"unexpected kernel rank {ndim} at {'/'.join(modules + (leaf,))}")


def _torch_leaf(leaf: str) -> str:
    return "bias" if leaf == "bias" else "weight"


def _ldm_module(modules: Tuple[str, ...]) -> str:
    """`encoder/down_0/block_1/conv1` -> `encoder.down.0.block.1.conv1`; `mid/block_1` stays."""
    parts, in_mid = [], False
    for m in modules:
        match = re.fullmatch(r"(down|up|block|attn)_(\d+)", m)
        if match and not in_mid:
            parts += [match.group(1), match.group(2)]
        else:
            parts.append(m)
        in_mid = in_mid or m == "mid"
    return ".".join(parts)


_DIFFUSERS_ATTN = {"norm": ("group_norm",), "q": ("to_q", "query"), "k": ("to_k", "key"),
                   "v": ("to_v", "value"), "proj_out": ("to_out.0", "proj_attn")}


def _diffusers_modules(modules: Tuple[str, ...], num_levels: int) -> List[str]:
    """Candidate diffusers module names for one of ours, canonical name first."""
    out = [modules[0]]  # encoder / decoder / quant_conv / post_quant_conv
    in_attn = False
    for m in modules[1:]:
        if match := re.fullmatch(r"down_(\d+)", m):
            out.append(f"down_blocks.{match.group(1)}")
        elif match := re.fullmatch(r"up_(\d+)", m):
            out.append(f"up_blocks.{num_levels - 1 - int(match.group(1))}")
        elif m == "mid":
            out.append("mid_block")
        elif match := re.fullmatch(r"block_(\d+)", m):
            j = int(match.group(1))
            out.append(f"resnets.{j - 1 if out[-1] == 'mid_block' else j}")
        elif match := re.fullmatch(r"attn_(\d+)", m):
            j = int(match.group(1))
            out.append(f"attentions.{0 if out[-1] == 'mid_block' else j}")
            in_attn = True
        elif m == "downsample":
            out.append("downsamplers.0")
        elif m == "upsample":
            out.append("upsamplers.0")
        elif m == "nin_shortcut":
            out.append("conv_shortcut")
        elif m == "norm_out" and len(out) == 1:
            out.append("conv_norm_out")
        elif in_attn and m in _DIFFUSERS_ATTN:
            base = ".".join(out)
            return [f"{base}.{name}" for name in _DIFFUSERS_ATTN[m]]
        else:
            out.append(m)
    return [".".join(out)]


def _torch_shapes(kind: str, shape: Tuple[int, ...], fmt: str) -> List[Tuple[int, ...]]:
    """Accepted PyTorch shapes for a Flax leaf of `shape`, the format's own first."""
    if kind == "conv":
        kh, kw, i, o = shape
        return [(o, i, kh, kw)]
    if kind == "attn":
        i, o = shape
        return [(o, i, 1, 1), (o, i)] if fmt == "ldm" else [(o, i), (o, i, 1, 1)]
    return [tuple(shape)]


def _from_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":  # OIHW -> HWIO
        return np.transpose(a, (2, 3, 1, 0))
    if kind == "attn":  # (O, I[, 1, 1]) -> (I, O)
        return np.transpose(a.reshape(a.shape[:2]))
    return a


# ----------------------------------------------------------------------------------
# Format detection, prefixes
# ----------------------------------------------------------------------------------


def _ldm_vae_entries(state_dict: Mapping) -> Tuple[Dict[str, Any], str]:
    """VAE entries of an LDM-format dict with any prefix removed, and that prefix."""
    sd = _unwrap(state_dict)
    for prefix in LDM_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, prefix
    return {k: v for k, v in sd.items() if k.split(".", 1)[0] in _VAE_ROOTS}, ""


def _is_diffusers_key(key: str) -> bool:
    return bool(re.match(r"(encoder|decoder)\.(down_blocks|mid_block|up_blocks|conv_norm_out)\.", key))


def _is_ldm_key(key: str) -> bool:
    return bool(re.match(r"(encoder|decoder)\.(down|mid|up|norm_out)\.", key))


def _no_vae_error(state_dict: Mapping) -> ValueError:
    roots = sorted({k.split(".", 1)[0] for k in _unwrap(state_dict)})
    shown = ", ".join(roots[:12]) + (", ..." if len(roots) > 12 else "")
    return ValueError(f"state dict contains no autoencoder weights (looked for {_LOOKED_FOR}); "
                      f"its top-level key names are: {shown or '(none)'}")


def detect_format(state_dict: Mapping) -> str:
    """'ldm' or 'diffusers'; ValueError when `state_dict` holds no autoencoder weights."""
    if any(_is_diffusers_key(k) for k in _unwrap(state_dict)):
        return "diffusers"
    if any(_is_ldm_key(k) for k in _ldm_vae_entries(state_dict)[0]):
        return "ldm"
    raise _no_vae_error(state_dict)


# ----------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------


def _convert(entries: Mapping[str, Any], target: Mapping, fmt: str,
             names: Callable[[Tuple[str, ...]], List[str]], what: str) -> Dict[str, Any]:
    remaining = dict(entries)
    out, missing, wrong_shape = {}, [], []
    for path, leaf in _flatten(target).items():
        modules, name = _strip_collection(path)[:-1], path[-1]
        shape = tuple(leaf.shape)
        kind = _kind(modules, name, len(shape))
        keys = [f"{m}.{_torch_leaf(name)}" for m in names(modules)]
        accepted = _torch_shapes(kind, shape, fmt)
        key = next((k for k in keys if k in remaining), None)
        if key is None:
            missing.append(f"{keys[0]} (for {'/'.join(path)}, expected shape {accepted[0]})")
            continue
        value = np.asarray(remaining.pop(key))
        if value.shape not in accepted:
            wrong_shape.append(f"{key}: got {value.shape}, expected {accepted[0]}")
            continue
        out[path] = np.ascontiguousarray(_from_torch_layout(kind, value)).astype(leaf.dtype)

    if missing or remaining or wrong_shape:
        lines = mismatch_lines(f"{what} does not match the AutoencoderKL params", missing, remaining, wrong_shape)
        if wrong_shape or missing:
            lines.append("  (a different architecture? infer_ldm_config(state_dict) or "
                         "config_from_diffusers_json(config) give the matching AutoencoderKL fields)")
        raise ValueError("\n".join(lines))
    return _unflatten(out)


def vae_params_from_ldm(state_dict: Mapping[str, Any], target: Mapping) -> Dict[str, Any]:
    """Flax params for `target` from an LDM/CompVis-format autoencoder state dict.

    `state_dict` maps keys to arrays (anything `np.asarray` accepts), bare, wrapped in
    `{"state_dict": ...}` or with the VAE under a prefix (see the module docstring);
    `target` is the params tree of our `AutoencoderKL` (e.g. `abstract_params(model)`,
    with or without the top-level 'params' collection). The result has the same
    structure and dtypes, as numpy arrays.
    """
    entries, prefix = _ldm_vae_entries(state_dict)
    if not entries:
        if any(_is_diffusers_key(k) for k in _unwrap(state_dict)):
            raise ValueError("state dict is in the diffusers format (encoder.down_blocks...); "
                             "use vae_params_from_diffusers")
        raise _no_vae_error(state_dict)
    if any(_is_diffusers_key(k) for k in entries):
        raise ValueError("state dict is in the diffusers format (encoder.down_blocks...); "
                         "use vae_params_from_diffusers")
    what = f"LDM state dict (prefix {prefix!r})" if prefix else "LDM state dict"
    return _convert(entries, target, "ldm", lambda m: [_ldm_module(m)], what)


def vae_params_from_diffusers(state_dict: Mapping[str, Any], target: Mapping) -> Dict[str, Any]:
    """Flax params for `target` from a diffusers `AutoencoderKL` state dict (see `vae_params_from_ldm`)."""
    sd = _unwrap(state_dict)
    if not any(k.split(".", 1)[0] in _VAE_ROOTS for k in sd):
        raise _no_vae_error(state_dict)
    if not any(_is_diffusers_key(k) for k in sd) and any(_is_ldm_key(k) for k in _ldm_vae_entries(sd)[0]):
        raise ValueError("state dict is in the LDM format (encoder.down.0.block...); use vae_params_from_ldm")
    flat_target = _flatten(target)
    levels = {m for p in flat_target for m in _strip_collection(p)[:2] if re.fullmatch(r"(down|up)_\d+", m)}
    num_levels = max([int(m.split("_")[1]) + 1 for m in levels if m.startswith("up_")], default=0)
    return _convert(sd, target, "diffusers", lambda m: _diffusers_modules(m, num_levels),
                    "diffusers state dict")


# ----------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------


def infer_ldm_config(state_dict: Mapping[str, Any], *, resolution: int = 256) -> Dict[str, Any]:
    """`AutoencoderKL` fields matching an LDM-format state dict, from its shapes.

    Attention inside down/up levels is reported as `attn_resolutions` counted from
    `resolution` (LDM's bookkeeping; only the level matters).
    """
    sd, _ = _ldm_vae_entries(state_dict)
    if not sd:
        raise _no_vae_error(state_dict)

    def shape(key):
        if key not in sd:
            raise ValueError(f"cannot infer the autoencoder config: key {key!r} is missing")
        return tuple(np.shape(sd[key]))

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if levels != list(range(len(levels))) or not levels:
        raise ValueError(f"cannot infer the autoencoder config: encoder levels {levels} are not 0..n-1")
    ch_mult = []
    for i in levels:
        c = shape(f"encoder.down.{i}.block.0.conv1.weight")[0]
        if c % ch:
            raise ValueError(f"cannot infer the autoencoder config: level {i} has {c} channels, "
                             f"not a multiple of ch={ch}")
        ch_mult.append(c // ch)
    num_res_blocks = len({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    z_channels = shape("decoder.conv_in.weight")[1]
    enc_out = shape("encoder.conv_out.weight")[0]
    attn_levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.attn\.", k))})
    return dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, z_channels=z_channels,
                embed_dim=shape("post_quant_conv.weight")[1],
                attn_resolutions=tuple(resolution // 2 ** i for i in attn_levels), resolution=resolution,
                in_channels=in_channels, out_ch=shape("decoder.conv_out.weight")[0],
                double_z=enc_out == 2 * z_channels)


def config_from_diffusers_json(config: Mapping[str, Any], *, resolution: int = 256
                               ) -> Tuple[Dict[str, Any], float]:
    """(`AutoencoderKL` fields, scaling_factor) from a diffusers `AutoencoderKL` config.json dict.

    Settings our model does not implement (another activation or group count, no
    quant convs, a latent shift, attention-free mid blocks, other block types) are
    all reported in one ValueError.
    """
    problems = []
    boc = list(config.get("block_out_channels", (64,)))
    ch = boc[0]
    if any(c % ch for c in boc):
        problems.append(f"block_out_channels {boc} are not multiples of the first")
    n = len(boc)
    down_types = list(config.get("down_block_types", ("DownEncoderBlock2D",) * n))
    up_types = list(config.get("up_block_types", ("UpDecoderBlock2D",) * n))
    if len(down_types) != n or len(up_types) != n:
        problems.append(f"{len(down_types)} down and {len(up_types)} up block types for {n} block_out_channels")
    down_attn = [t == "AttnDownEncoderBlock2D" for t in down_types]
    up_attn = [t == "AttnUpDecoderBlock2D" for t in up_types][::-1]  # up_blocks.k is level n-1-k
    bad_types = sorted({t for t in down_types if t not in ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")}
                       | {t for t in up_types if t not in ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")})
    if bad_types:
        problems.append(f"unsupported block types {bad_types}")
    elif down_attn != up_attn:
        problems.append("attention in down and up blocks at different levels (LDM's attn_resolutions "
                        "places both)")
    expected = dict(act_fn="silu", norm_num_groups=32, use_quant_conv=True, use_post_quant_conv=True,
                    mid_block_add_attention=True, shift_factor=None, latents_mean=None, latents_std=None)
    for key, value in expected.items():
        got = config.get(key, value)
        if got != value:
            problems.append(f"{key}={got!r} (only {value!r} is supported)")
    if problems:
        raise ValueError("unsupported diffusers AutoencoderKL config: " + "; ".join(problems))
    latent = config.get("latent_channels", 4)
    kwargs = dict(ch=ch, ch_mult=tuple(c // ch for c in boc), num_res_blocks=config.get("layers_per_block", 1),
                  z_channels=latent, embed_dim=latent,
                  attn_resolutions=tuple(resolution // 2 ** i for i in range(n) if down_attn[i]),
                  resolution=resolution, in_channels=config.get("in_channels", 3),
                  out_ch=config.get("out_channels", 3), double_z=True)
    return kwargs, float(config.get("scaling_factor", SD_SCALE_FACTOR))


def load_pretrained(path, *, dtype=None, param_dtype=None, resolution: int = 256):
    """(model, params, scaling_factor) from a checkpoint file or a diffusers VAE folder.

    A folder needs `config.json` and `diffusion_pytorch_model.{safetensors,bin}` (a
    pipeline folder with a `vae/` subfolder works too); its scaling factor comes from the
    config. A file in the LDM format (`sd_ae.ckpt`, a full SD checkpoint, ...) gets its
    architecture from `infer_ldm_config` and SD's scaling factor 0.18215. `params` is the
    params tree: `model.apply({"params": params}, x, method=model.encode)`.
    """
    path = os.fspath(path)
    kw = dict(dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32)
    if os.path.isdir(path):
        folder = path
        if not os.path.isfile(os.path.join(folder, "config.json")) and \
                os.path.isfile(os.path.join(folder, "vae", "config.json")):
            folder = os.path.join(folder, "vae")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path} is a folder without config.json (expected a diffusers VAE folder)")
        weights = next((os.path.join(folder, f) for f in _DIFFUSERS_WEIGHT_FILES
                        if os.path.isfile(os.path.join(folder, f))), None)
        if weights is None:
            raise FileNotFoundError(f"{folder} has no weights file (looked for {', '.join(_DIFFUSERS_WEIGHT_FILES)})")
        with open(config_path) as f:
            fields, scale = config_from_diffusers_json(json.load(f), resolution=resolution)
        state_dict = load_state_dict(weights)
        convert = vae_params_from_diffusers
    else:
        state_dict = load_state_dict(path)
        if detect_format(state_dict) == "diffusers":
            raise ValueError(f"{path} holds diffusers-format weights, whose architecture is in the "
                             "config.json beside them: pass the folder holding both")
        fields, scale = infer_ldm_config(state_dict, resolution=resolution), SD_SCALE_FACTOR
        convert = vae_params_from_ldm
    model = AutoencoderKL(**fields, **kw)
    params = convert(state_dict, abstract_params(model))
    return model, params, scale


__all__ = ["detect_format", "vae_params_from_ldm", "vae_params_from_diffusers",
           "infer_ldm_config", "config_from_diffusers_json", "load_state_dict", "load_pretrained",
           "LDM_PREFIXES", "SD_SCALE_FACTOR"]
