"""The folder a converter writes, for any converted network (the SD autoencoder, the FID
Inception): ``config.json`` saying what it holds (``kind``, the ``source`` file, the model's
settings) and the weights as one orbax tree in a sub-folder, so a start reads them without
PyTorch and without converting again."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def read_meta(path, kind: str) -> dict | None:
    """``config.json`` of ``path`` when it is a converted folder of ``kind``, else ``None``."""
    config = os.path.join(os.fspath(path), "config.json")
    if not os.path.isfile(config):
        return None
    with open(config) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError:
            return None
    return meta if isinstance(meta, dict) and meta.get("kind") == kind else None


def is_converted_dir(path, kind: str) -> bool:
    """Whether ``path`` is a folder written by :func:`save` with this ``kind``."""
    return read_meta(path, kind) is not None


def save(out_dir, kind: str, item: str, tree: Any, **meta) -> None:
    """Writes ``config.json`` (``kind`` and ``meta``) and the orbax checkpoint ``item/`` of
    ``tree`` (host arrays) to ``out_dir``."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"kind": kind, **meta}, f, indent=2)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(out_dir, item), jax.tree.map(np.asarray, tree), force=True)


def restore(path, item: str, target: Any) -> Any:
    """The tree ``item/`` of a converted folder, with ``target``'s structure, shapes and dtypes."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(os.path.abspath(os.fspath(path)), item), target)
