"""Orbax checkpoints of the whole train state.

Layout: ``<workdir>/checkpoints/<step>/{state,meta[,data]}``: ``state`` is the train
state pytree (params, optimizer state, EMA params, step, RNG), ``meta`` a small JSON
record (step, config), ``data`` the position of the input pipeline's iterator when the
run reads records (grain's checkpoint handler, one JSON file per process). Orbax writes each checkpoint into a temporary directory
and renames it when complete, so a process killed mid-save leaves the previous
checkpoints intact; on the next start the newest *complete* one is restored.

``--load_weights`` starts a fresh run from the (EMA) parameters of another
checkpoint, non-strictly: matching leaves are taken, the rest is reported.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


def checkpoint_dir(workdir: str) -> str:
    """``<workdir>/checkpoints``; absolute for local paths, as given for URLs (``gs://...``)."""
    path = os.path.join(str(workdir), "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def make_manager(workdir: str, *, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 else None, save_interval_steps=1, create=not read_only,
        read_only=read_only, enable_async_checkpointing=False, cleanup_tmp_directories=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


ITEMS = ("state", "meta", "data")


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict, data: Any = None) -> None:
    """Saves ``state`` and ``meta`` (and ``data``, a grain ``CheckpointSave`` of the input
    iterator, when given) as checkpoint ``step``; returns when it is on disk."""
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data is not None:
        items["data"] = data
    manager.save(step, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()


def has_item(manager: ocp.CheckpointManager, step: int, item: str) -> bool:
    return os.path.isdir(os.path.join(str(manager.directory), str(step), item))


def restore_data(manager: ocp.CheckpointManager, step: int, data: Any) -> None:
    """Restores the input iterator of checkpoint ``step`` in place; ``data`` is a grain
    ``CheckpointRestore`` of a fresh iterator of the same loader settings."""
    try:
        manager.restore(step, args=ocp.args.Composite(data=data))
    except Exception as e:  # noqa: BLE001 -- grain/orbax raise several types here
        raise ValueError(
            f"Cannot restore the data iterator of checkpoint {step} in {manager.directory}: {type(e).__name__}: "
            f"{e}. It is saved per process: resume with the same number of processes and the same "
            "data.worker_count (or start a new --workdir with --load_weights).") from e


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None):
    """Restores ``(state, meta)`` at ``step`` (default: the newest) into ``abstract_state``'s
    structure, shapes and shardings. Raises a clear error when the trees do not match."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint in {manager.directory}.")
    try:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"The checkpoint at step {step} in {manager.directory} does not match this run's train state "
            f"(different model or optimizer config?). Use a fresh --workdir, or start from its weights with "
            f"--load_weights={manager.directory}. Orbax said: {e}") from e
    return out["state"], out["meta"]


def read_params(path: str, *, use_ema: bool = True, step: int | None = None) -> dict:
    """Reads the (EMA) parameters of a checkpoint as host numpy arrays, no target needed.

    ``path`` is a work directory, its ``checkpoints`` folder, or one step folder.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isdir(os.path.join(path, "state")):  # a step folder
        state_dir = os.path.join(path, "state")
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"No checkpoint directory at {path}.")
        steps = sorted(int(d) for d in os.listdir(path) if d.isdigit()
                       and os.path.isdir(os.path.join(path, d, "state")))
        if not steps:
            raise FileNotFoundError(f"No complete checkpoint in {path}.")
        chosen = steps[-1] if step is None else step
        if chosen not in steps:
            raise FileNotFoundError(f"No checkpoint for step {chosen} in {path}; available: {steps}.")
        state_dir = os.path.join(path, str(chosen), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        # restore as host numpy arrays: works whatever devices or mesh wrote the checkpoint
        meta = ckptr.metadata(state_dir)
        structure = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
        tree = ckptr.restore(state_dir, restore_args=args)
    key = "ema_params" if use_ema else "params"
    if key not in tree:
        raise ValueError(f"{state_dir} holds no '{key}'; is it a cfm-jax train state?")
    return jax.tree.map(np.asarray, tree[key])


def merge_weights(target: dict, source: dict) -> tuple[dict, list[str], list[str], list[str]]:
    """Non-strict load: leaves of ``source`` with the same path and shape replace ``target``'s.

    Returns ``(params, loaded, missing, mismatched)`` where ``missing`` are target paths
    absent from the source and ``mismatched`` those present with another shape.
    """
    flat_t = traverse_util.flatten_dict(target, sep="/")
    flat_s = traverse_util.flatten_dict(source, sep="/")
    loaded, missing, mismatched = [], [], []
    out = {}
    for k, v in flat_t.items():
        if k not in flat_s:
            missing.append(k)
            out[k] = v
        elif tuple(np.shape(flat_s[k])) != tuple(np.shape(v)):
            mismatched.append(f"{k}: checkpoint {tuple(np.shape(flat_s[k]))} vs model {tuple(np.shape(v))}")
            out[k] = v
        else:
            out[k] = np.asarray(flat_s[k]).astype(np.asarray(v).dtype if hasattr(v, "dtype") else None)
            loaded.append(k)
    return traverse_util.unflatten_dict(out, sep="/"), loaded, missing, mismatched
