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

import contextlib
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util


def checkpoint_dir(workdir: str) -> str:
    """``<workdir>/checkpoints``; absolute for local paths, as given for URLs (``gs://...``)."""
    path = os.path.join(str(workdir), "checkpoints")
    return path if "://" in path else os.path.abspath(path)


def make_manager(workdir: str, *, keep: int = 3, read_only: bool = False,
                 directory: str | None = None) -> ocp.CheckpointManager:
    """The manager of ``<workdir>/checkpoints`` (or of the checkpoints folder ``directory``)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep > 0 and not read_only else None, save_interval_steps=0 if read_only else 1,
        create=not read_only, read_only=read_only, enable_async_checkpointing=False,
        cleanup_tmp_directories=not read_only)
    with _orbax_warnings_off(read_only):  # "Given directory is read only": as asked (a restore)
        return ocp.CheckpointManager(directory or checkpoint_dir(workdir), options=options, item_names=ITEMS)


@contextlib.contextmanager
def _orbax_warnings_off(off: bool = True):
    """Orbax's warnings (it logs through absl) off for a call whose warnings say nothing useful."""
    logger = logging.getLogger("absl")
    level = logger.level
    if off:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def complete_steps(directory: str) -> list[int]:
    """The steps of the complete checkpoints (``<step>/state`` present) in a checkpoints folder
    (a local path or a bucket URL). Orbax writes into ``<step>.orbax-checkpoint-tmp...`` folders
    and renames them when complete, so a half-written step is never listed."""
    path = epath.Path(directory)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and (p / "state").is_dir())


def locate(path: str, step: int | None = None) -> tuple[str, int]:
    """``(checkpoints folder, step)`` for ``path``: a work directory, its ``checkpoints`` folder
    (the newest complete step, or ``step``) or one step folder ``.../checkpoints/<step>``."""
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "checkpoints")):
        path = os.path.join(path, "checkpoints")
    if os.path.isdir(os.path.join(path, "state")):  # a step folder
        name = os.path.basename(path.rstrip(os.sep))
        if not name.isdigit():
            raise FileNotFoundError(f"{path} holds a 'state' folder but is not named after its step "
                                    "(expected .../checkpoints/<step>).")
        if step is not None and step != int(name):
            raise ValueError(f"{path} is the checkpoint of step {name}, not {step}.")
        return os.path.dirname(path.rstrip(os.sep)), int(name)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"No checkpoint directory at {path}.")
    steps = complete_steps(path)
    if not steps:
        raise FileNotFoundError(f"No complete checkpoint in {path}.")
    chosen = steps[-1] if step is None else step
    if chosen not in steps:
        raise FileNotFoundError(f"No checkpoint for step {chosen} in {path}; available: {steps}.")
    return path, chosen


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


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The ``meta`` record (step, config) of checkpoint ``step``; ``{}`` when it has none."""
    try:
        return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})
    except Exception:  # noqa: BLE001 -- only used to explain another error; missing is fine
        return {}


def _read_state_tree(path: str, step: int | None) -> tuple[dict, str]:
    directory, chosen = locate(path, step)
    state_dir = os.path.join(directory, str(chosen), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        # restore as host numpy arrays: works whatever devices or mesh wrote the checkpoint
        meta = ckptr.metadata(state_dir)
        structure = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
        tree = ckptr.restore(state_dir, restore_args=args)
    return tree, state_dir


def read_params(path: str, *, use_ema: bool = True, step: int | None = None) -> dict:
    """Reads the (EMA) parameters of a checkpoint as host numpy arrays, no target needed.

    ``path`` is a work directory, its ``checkpoints`` folder, or one step folder.
    """
    tree, state_dir = _read_state_tree(path, step)
    key = "ema_params" if use_ema else "params"
    if key not in tree:
        raise ValueError(f"{state_dir} holds no '{key}'; is it a cfm-jax train state?")
    return jax.tree.map(np.asarray, tree[key])


def read_weights(path: str, *, step: int | None = None) -> tuple[dict, dict, int]:
    """``(params, ema_params, ema_step)`` of a checkpoint as host arrays (see :func:`read_params`).

    ``ema_step`` is the EMA's update counter (the state's ``ema_step``)."""
    tree, state_dir = _read_state_tree(path, step)
    if "params" not in tree or "ema_params" not in tree or "ema_step" not in tree:
        raise ValueError(f"{state_dir} holds no 'params', 'ema_params' and 'ema_step'; is it a cfm-jax train "
                         "state?")
    return (jax.tree.map(np.asarray, tree["params"]), jax.tree.map(np.asarray, tree["ema_params"]),
            int(np.asarray(tree["ema_step"])))


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
