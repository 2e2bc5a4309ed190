"""FID Inception weights (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`) -> our Flax variables.

The weights file is the user's (nothing is downloaded): pytorch-fid fetches it from
its GitHub release `fid_weights`; it holds the TF 2015-12-05 Inception-v3 graph ported
to PyTorch, keyed like torchvision's `Inception3`:

  Conv2d_1a_3x3.conv.weight              (32, 3, 3, 3)
  Conv2d_1a_3x3.bn.{weight,bias,running_mean,running_var}   (32,)
  Mixed_5b.branch1x1.conv.weight ...     one `BasicConv2d` per conv, as above
  fc.weight (1008, 2048), fc.bias        the classifier: ignored (FID uses pool3)

`*.bn.num_batches_tracked` (written by PyTorch >= 0.4.1) is ignored as well. A state
dict of pytorch-fid's wrapper module `InceptionV3` (`blocks.0.0.conv.weight`, ...,
`blocks.3.2...` for Mixed_7c; its max pools have no weights) is accepted too and mapped
onto the same names.

Our variables (`cfm_jax/models/inception.py`) mirror the state dict; BatchNorm is kept
as it is stored, not folded into the convolutions, so the arithmetic is pytorch-fid's:

  params/<module>/conv/kernel      <- <module>.conv.weight    OIHW -> HWIO
  params/<module>/bn/scale, bias   <- <module>.bn.weight, .bn.bias
  batch_stats/<module>/bn/mean     <- <module>.bn.running_mean
  batch_stats/<module>/bn/var      <- <module>.bn.running_var

with `<module>` a path such as `Mixed_5b/branch5x5_1` (`.` in PyTorch). Every missing,
unexpected and wrong-shaped key is reported together in one ValueError.

Converted folders (`save_converted`): `config.json` (`kind`, source) and an orbax
checkpoint `variables/` of the float32 `{"params", "batch_stats"}` tree. Reading one
needs neither PyTorch nor the `.pth` file. `load_fid_inception` reads either.
"""
import os
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict as _flatten, unflatten_dict as _unflatten

from cfm_jax.convert import converted_dir
from cfm_jax.convert.state_dict_io import load_state_dict, mismatch_lines
from cfm_jax.models.inception import FIDInceptionV3, abstract_variables

CONVERTED_KIND = "cfm_jax.fid_inception"
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"

# (collection, Flax leaf) -> PyTorch leaf, below `<module>.conv` / `<module>.bn`.
_LEAVES = {("params", "conv", "kernel"): "conv.weight",
           ("params", "bn", "scale"): "bn.weight",
           ("params", "bn", "bias"): "bn.bias",
           ("batch_stats", "bn", "mean"): "bn.running_mean",
           ("batch_stats", "bn", "var"): "bn.running_var"}
_IGNORED = re.compile(r"(fc\.(weight|bias)|.*\.bn\.num_batches_tracked)")

# pytorch-fid's InceptionV3 wrapper: blocks.<i>.<j> -> the torchvision module name
# (the max pools at blocks.0.3 and blocks.1.2 hold no weights).
_WRAPPER_BLOCKS = {
    (0, 0): "Conv2d_1a_3x3", (0, 1): "Conv2d_2a_3x3", (0, 2): "Conv2d_2b_3x3",
    (1, 0): "Conv2d_3b_1x1", (1, 1): "Conv2d_4a_3x3",
    (2, 0): "Mixed_5b", (2, 1): "Mixed_5c", (2, 2): "Mixed_5d", (2, 3): "Mixed_6a",
    (2, 4): "Mixed_6b", (2, 5): "Mixed_6c", (2, 6): "Mixed_6d", (2, 7): "Mixed_6e",
    (3, 0): "Mixed_7a", (3, 1): "Mixed_7b", (3, 2): "Mixed_7c",
}


def _torch_key(path: Tuple[str, ...]) -> Tuple[str, str]:
    """(`Mixed_5b.branch1x1.conv.weight`, kind) for a variables path such as
    ('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel'); kind 'conv' or 'vector'."""
    collection, modules, layer, leaf = path[0], path[1:-2], path[-2], path[-1]
    torch_leaf = _LEAVES.get((collection, layer, leaf))
    if torch_leaf is None:
        raise ValueError(f"unknown FID Inception variable {'/'.join(path)}")
    return ".".join(modules) + "." + torch_leaf, "conv" if leaf == "kernel" else "vector"


def _unwrap_fid_wrapper(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """Renames pytorch-fid `InceptionV3` keys (`blocks.2.0.branch1x1...`) to torchvision's."""
    out = {}
    for key, value in state_dict.items():
        match = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", key)
        name = _WRAPPER_BLOCKS.get((int(match.group(1)), int(match.group(2)))) if match else None
        out[f"{name}.{match.group(3)}" if name else key] = value
    return out


def _abstract_target():
    return abstract_variables(FIDInceptionV3())


def inception_variables_from_torch(state_dict: Mapping[str, Any], target: Optional[Mapping] = None
                                   ) -> Dict[str, Dict[str, Any]]:
    """`{"params": ..., "batch_stats": ...}` (float32 numpy) from the FID Inception state dict.

    `state_dict` maps keys to arrays (anything `np.asarray` accepts, torch tensors
    included), with the keys of the module docstring. `target` is the variables tree
    to fill (default: `abstract_variables(FIDInceptionV3())`); shapes are checked
    against it. Raises ValueError naming every missing, unexpected and wrong-shaped key.
    """
    if target is None:
        target = _abstract_target()
    entries = dict(state_dict)
    if any(k.startswith("blocks.") for k in entries):
        entries = _unwrap_fid_wrapper(entries)
    remaining = {k: v for k, v in entries.items() if not _IGNORED.fullmatch(k)}
    out, missing, wrong_shape = {}, [], []
    for path, leaf in _flatten(target).items():
        key, kind = _torch_key(path)
        shape = tuple(leaf.shape)
        expected = (shape[3], shape[2], shape[0], shape[1]) if kind == "conv" else shape  # HWIO -> OIHW
        if key not in remaining:
            missing.append(f"{key} (for {'/'.join(path)}, expected shape {expected})")
            continue
        value = remaining.pop(key)
        value = np.asarray(value.detach().cpu().float() if hasattr(value, "detach") else value)
        if value.shape != expected:
            wrong_shape.append(f"{key}: got {value.shape}, expected {expected}")
            continue
        if kind == "conv":
            value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
        out[path] = np.ascontiguousarray(value, dtype=np.float32)

    if not out and not wrong_shape:
        roots = sorted({k.split(".", 1)[0] for k in entries})
        shown = ", ".join(roots[:12]) + (", ..." if len(roots) > 12 else "")
        raise ValueError(f"state dict contains no FID Inception-v3 weights (none of the {len(missing)} expected "
                         f"keys, such as 'Conv2d_1a_3x3.conv.weight'; expected pytorch-fid's {WEIGHTS_FILE}); "
                         f"its top-level key names are: {shown or '(none)'}")
    if missing or remaining or wrong_shape:
        lines = mismatch_lines("state dict does not match the FID Inception-v3", missing, remaining, wrong_shape)
        if any(k.startswith("AuxLogits.") for k in remaining):
            lines.append("  (AuxLogits.* belong to torchvision's ImageNet Inception-v3, a different network: "
                         f"FID needs pytorch-fid's {WEIGHTS_FILE})")
        raise ValueError("\n".join(lines))
    return _unflatten(out)


# ----------------------------------------------------------------------------------
# Files and folders
# ----------------------------------------------------------------------------------


def is_converted_dir(path) -> bool:
    """Whether `path` is a folder written by `save_converted`."""
    return converted_dir.is_converted_dir(path, CONVERTED_KIND)


def save_converted(out_dir, variables: Mapping, *, source: Optional[str] = None) -> None:
    """Writes `config.json` and the orbax checkpoint `variables/` (float32) to `out_dir`."""
    tree = {c: jax.tree.map(lambda a: np.asarray(a, np.float32), dict(variables[c])) for c in ("params", "batch_stats")}
    converted_dir.save(out_dir, CONVERTED_KIND, "variables", tree,
                       model="FIDInceptionV3 (pytorch-fid, TF 2015-12-05 graph)", source=source)


def load_fid_inception(path, *, dtype=None, param_dtype=None):
    """`(model, variables)` of the FID Inception-v3 from the `.pth` weights file or a folder
    written by `save_converted` (e.g. `python -m cfm_jax.convert inception`).

    `.pth` (or `.pt`, `.ckpt`, `.bin`, `.safetensors`) files are read with
    `torch.load(weights_only=True)` (safetensors without PyTorch) and converted;
    `dtype` / `param_dtype` (default float32) are the model's compute and storage
    dtypes (params are cast to `param_dtype`; BatchNorm statistics stay float32). Use as
    `model.apply(variables, images_01)` -> [B, 2048].
    """
    path = os.path.expanduser(os.fspath(path))
    model = FIDInceptionV3(dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32)
    target = abstract_variables(FIDInceptionV3())  # stored and converted in float32
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no FID Inception weights at {path!r}: pass pytorch-fid's {WEIGHTS_FILE} (from its GitHub "
            "release 'fid_weights') or a folder written by `python -m cfm_jax.convert inception`")
    if os.path.isdir(path):
        if not is_converted_dir(path):
            raise ValueError(f"{path} is a folder but not a converted FID Inception (its config.json "
                             f"lacks kind={CONVERTED_KIND!r}); pass the {WEIGHTS_FILE} file or convert it")
        variables = converted_dir.restore(path, "variables", {c: target[c] for c in ("params", "batch_stats")})
    else:
        variables = inception_variables_from_torch(load_state_dict(path), target)
    # BatchNorm statistics stay float32 (flax creates them so); params take `param_dtype`.
    return model, {"params": jax.tree.map(lambda a: jnp.asarray(a, model.param_dtype), variables["params"]),
                   "batch_stats": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), variables["batch_stats"])}


__all__ = ["inception_variables_from_torch", "load_fid_inception",
           "save_converted", "is_converted_dir", "CONVERTED_KIND", "WEIGHTS_FILE"]
