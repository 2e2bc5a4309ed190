"""PyTorch state dict of fm-boosting's EfficientUNet <-> our Flax params (pure numpy).

Names: a Flax module path maps to the PyTorch key by joining with `.` and turning
each `_<digits>` into `.<digits>` (`input_blocks_1_0/in_layers_2/kernel` ->
`input_blocks.1.0.in_layers.2.weight`); the top-level `pool` and `un_pool` are
PyTorch's `pool.down_conv` and `un_pool.up_conv`.

Layouts (PyTorch -> Flax):
  Conv2d          (O, I, kh, kw) -> (kh, kw, I, O)
  ConvTranspose2d (I, O, kh, kw) -> (kh, kw, I, O) flipped in kh and kw (flax's
                  `ConvTranspose(transpose_kernel=False)` correlates, torch's
                  transposed conv scatters, i.e. convolves with the flipped kernel)
  Conv1d          (O, I, 1)      -> Dense (I, O)   (attention `qkv`, `proj_out`)
  Linear          (O, I)         -> Dense (I, O)
  GroupNorm       weight, bias   -> scale, bias
"""
import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np
from flax.traverse_util import flatten_dict as _flatten, unflatten_dict as _unflatten

from cfm_jax.convert.state_dict_io import mismatch_lines, strip_collection as _strip_collection

# Top-level Flax module names whose PyTorch module holds the layer one level deeper.
_ALIASES = {"pool": "pool.down_conv", "un_pool": "un_pool.up_conv"}
_CONV1D_MODULES = ("qkv", "proj_out")
_CONV_TRANSPOSE_MODULES = ("un_pool",)


def _kind(modules: Tuple[str, ...], leaf: str, ndim: int) -> str:
    """Layer kind of a Flax leaf, from its module path, leaf name and rank."""
    if leaf == "scale":
        return "norm_scale"
    if leaf == "bias":
        return "bias"
    if leaf != "kernel":
        raise ValueError(f"unknown parameter {'/'.join(modules + (leaf,))}")
    if ndim == 4:
        return "conv_transpose2d" if modules[-1] in _CONV_TRANSPOSE_MODULES else "conv2d"
    if ndim == 2:
        return "conv1d" if modules[-1] in _CONV1D_MODULES else "linear"
    raise ValueError(f"unexpected kernel rank {ndim} at {'/'.join(modules + (leaf,))}")


def _torch_key(modules: Tuple[str, ...], leaf: str) -> str:
    names = [re.sub(r"_(\d+)", r".\1", m) for m in modules]
    if modules and modules[0] in _ALIASES:
        names[0] = _ALIASES[modules[0]]
    return ".".join(names + ["bias" if leaf == "bias" else "weight"])


def _to_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv2d":  # HWIO -> OIHW
        return np.transpose(a, (3, 2, 0, 1))
    if kind == "conv_transpose2d":  # flipped HWIO -> IOHW
        return np.transpose(a[::-1, ::-1], (2, 3, 0, 1))
    if kind == "conv1d":  # (I, O) -> (O, I, 1)
        return np.transpose(a)[:, :, None]
    if kind == "linear":  # (I, O) -> (O, I)
        return np.transpose(a)
    return a


def _from_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv2d":  # OIHW -> HWIO
        return np.transpose(a, (2, 3, 1, 0))
    if kind == "conv_transpose2d":  # IOHW -> HWIO, flipped
        return np.transpose(a, (2, 3, 0, 1))[::-1, ::-1]
    if kind == "conv1d":  # (O, I, 1) -> (I, O)
        return np.transpose(a[:, :, 0])
    if kind == "linear":
        return np.transpose(a)
    return a


def _torch_shape(kind: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    return _to_torch_layout(kind, np.empty(shape, dtype=np.uint8)).shape


def unet_params_from_torch(state_dict: Mapping[str, Any], target: Mapping) -> Dict[str, Any]:
    """Flax params for `target` from an original EfficientUNet state dict.

    `state_dict` maps PyTorch keys to arrays (anything `np.asarray` accepts);
    `target` is the params tree of our `EfficientUNet` (e.g. from `jax.eval_shape`
    of `model.init`, with or without the top-level 'params' collection); the
    result has the same structure and dtypes, as numpy arrays. Every missing,
    unexpected and wrong-shaped key is reported together in one ValueError.
    """
    flat_target = _flatten(target)
    remaining = dict(state_dict)
    out, missing, wrong_shape = {}, [], []
    for path, leaf in flat_target.items():
        modules, name = _strip_collection(path)[:-1], path[-1]
        shape = tuple(leaf.shape)
        kind = _kind(modules, name, len(shape))
        key = _torch_key(modules, name)
        if key not in remaining:
            missing.append(f"{key} (for {'/'.join(path)}, expected torch shape {_torch_shape(kind, shape)})")
            continue
        value = np.asarray(remaining.pop(key))
        expected = _torch_shape(kind, shape)
        if value.shape != expected:
            wrong_shape.append(f"{key}: got {value.shape}, expected {expected}")
            continue
        out[path] = np.ascontiguousarray(_from_torch_layout(kind, value)).astype(leaf.dtype)

    if missing or remaining or wrong_shape:
        lines = mismatch_lines("state dict does not match the EfficientUNet params", missing, remaining,
                               wrong_shape)
        raise ValueError("\n".join(lines))
    return _unflatten(out)
