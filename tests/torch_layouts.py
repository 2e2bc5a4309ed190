"""Our weights as PyTorch state dicts, the inverse of the converters in ``cfm_jax.convert``: for
parity tests against the original networks and for writing test checkpoints in their formats."""
from typing import Dict, Mapping

import numpy as np
from flax.traverse_util import flatten_dict

from cfm_jax.convert import fmboost_unet, inception, vae
from cfm_jax.convert.state_dict_io import strip_collection


def _state_dict(tree: Mapping, leaf_to_torch) -> Dict[str, np.ndarray]:
    """``{torch key: contiguous array}`` from ``leaf_to_torch(path, leaf) -> (key, array)`` per leaf."""
    return {key: np.ascontiguousarray(a) for key, a in
            (leaf_to_torch(path, leaf) for path, leaf in flatten_dict(tree).items())}


def unet_params_to_torch(params: Mapping) -> Dict[str, np.ndarray]:
    """Original EfficientUNet state dict (numpy arrays, PyTorch layouts) from our params."""
    def leaf(path, value):
        modules, name, a = strip_collection(path)[:-1], path[-1], np.asarray(value)
        kind = fmboost_unet._kind(modules, name, a.ndim)
        return fmboost_unet._torch_key(modules, name), fmboost_unet._to_torch_layout(kind, a)
    return _state_dict(params, leaf)


def vae_params_to_ldm(params: Mapping) -> Dict[str, np.ndarray]:
    """LDM-format state dict (numpy, PyTorch layouts; attention as 1x1 convs) from our params."""
    def leaf(path, value):
        modules, name, a = strip_collection(path)[:-1], path[-1], np.asarray(value)
        kind = vae._kind(modules, name, a.ndim)
        if kind == "conv":  # HWIO -> OIHW
            a = np.transpose(a, (3, 2, 0, 1))
        elif kind == "attn":  # (I, O) -> (O, I, 1, 1)
            a = np.transpose(a)[:, :, None, None]
        return f"{vae._ldm_module(modules)}.{vae._torch_leaf(name)}", a
    return _state_dict(params, leaf)


def inception_variables_to_torch(variables: Mapping) -> Dict[str, np.ndarray]:
    """A torchvision-named FID Inception state dict (numpy, PyTorch layouts, no ``fc``)."""
    def leaf(path, value):
        key, kind = inception._torch_key(path)
        a = np.asarray(value, np.float32)
        return key, np.transpose(a, (3, 2, 0, 1)) if kind == "conv" else a
    return _state_dict(variables, leaf)
