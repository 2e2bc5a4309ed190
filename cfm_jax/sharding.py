"""Device mesh and shardings: data parallelism and FSDP with JAX's own GSPMD.

The mesh has two axes, ``data`` and ``fsdp`` (config section ``mesh``: sizes, one of
them may be -1 for "the remaining devices"). Batches are split over both axes (every
device gets its own rows); parameters, optimizer state and EMA are *replicated* over
``data`` and *sharded* over ``fsdp``: each large array is split along one dimension
whose size ``fsdp`` divides, small arrays (fewer than ``mesh.fsdp_min_size``
elements: biases, norms, the time embedding) are replicated. XLA inserts the
all-gathers of the weights before their use and the reduce-scatters of the gradients
(``jax.jit`` with explicit ``in_shardings``/``out_shardings``, no hand-written
collectives). With ``fsdp=1`` this is plain data parallelism.

Rules (the same for every leaf of the train state, so that Adam's moments and the EMA
are laid out like the parameter they belong to): for a leaf of shape ``S`` with at
least ``fsdp_min_size`` elements, ``fsdp`` goes on the first of these dimensions that
it divides: the last (the output features of a Dense kernel, the output channels of a
Conv kernel ``[kh, kw, in, out]``), then the second-to-last (input features /
channels), then the others from the front. Nothing divisible: replicated (reported by
:func:`describe`).

Multi-slice (TPU pods over DCN): ``mesh.dcn_data > 1`` builds a hybrid mesh with
``mesh_utils.create_hybrid_device_mesh``: ``data`` spans the slices (``dcn_data`` of
them) and the devices inside a slice, ``fsdp`` stays inside a slice (ICI), where its
all-gathers are cheap.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # the batch is split over every device
DEFAULT_FSDP_MIN_SIZE = 2 ** 14


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """Resolves ``(data, fsdp)`` for ``num_devices`` (one of them may be -1)."""
    data, fsdp = int(data), int(fsdp)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh.data and mesh.fsdp cannot both be -1.")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if known < 1 or num_devices % known:
            raise ValueError(f"mesh: {num_devices} devices cannot be split with "
                             f"{'fsdp' if data == -1 else 'data'}={known}.")
        data, fsdp = (num_devices // known, known) if data == -1 else (known, num_devices // known)
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise ValueError(f"mesh.data={data} x mesh.fsdp={fsdp} must equal the {num_devices} devices "
                         "(use -1 for one axis to take the rest).")
    return data, fsdp


def device_grid(mesh_cfg=None, devices=None) -> np.ndarray:
    """The ``[data, fsdp]`` array of devices for config section ``mesh`` (``None``: all
    devices on ``data``); with ``dcn_data > 1`` a hybrid ICI/DCN layout (slices along
    ``data``, each ``fsdp`` group inside one slice)."""
    devices = list(jax.devices() if devices is None else devices)
    data = -1 if mesh_cfg is None else mesh_cfg.data
    fsdp = 1 if mesh_cfg is None else mesh_cfg.fsdp
    dcn = 1 if mesh_cfg is None else int(mesh_cfg.dcn_data)
    data, fsdp = mesh_shape(len(devices), data, fsdp)
    if dcn > 1:
        if data % dcn:
            raise ValueError(f"mesh.dcn_data={dcn} slices must divide mesh.data={data}.")
        return mesh_utils.create_hybrid_device_mesh((data // dcn, fsdp), (dcn, 1), devices)
    try:
        return mesh_utils.create_device_mesh((data, fsdp), devices)
    except (ValueError, NotImplementedError, AssertionError):  # CPU / unknown topology
        return np.asarray(devices).reshape(data, fsdp)


def make_mesh(mesh_cfg=None, devices=None) -> Mesh:
    """The ``('data', 'fsdp')`` mesh of config section ``mesh`` over ``devices`` (default
    ``jax.devices()``, every process's)."""
    return Mesh(device_grid(mesh_cfg, devices), MESH_AXES)


def make_data_mesh(devices=None) -> Mesh:
    """All devices on ``data`` (``fsdp`` of size 1): data parallelism."""
    return make_mesh(None, devices)


def fsdp_size(mesh: Mesh) -> int:
    return int(mesh.shape.get(FSDP_AXIS, 1))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device (``data`` and ``fsdp``)."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
    """``[n, B/n, ...]`` micro-batches: the second axis split like a batch."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(None, axes))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "data.batch_size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh; "
                         f"use a multiple of {n}.")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's rows) -> global arrays split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def param_spec(shape, n_fsdp: int, min_size: int = DEFAULT_FSDP_MIN_SIZE) -> P:
    """The :class:`PartitionSpec` of one state leaf (module docstring: the rules)."""
    shape = tuple(shape)
    if n_fsdp <= 1 or not shape or math.prod(shape) < min_size:
        return P()
    order = [len(shape) - 1] + ([len(shape) - 2] if len(shape) > 1 else []) + list(range(len(shape) - 2))
    for dim in order:
        if shape[dim] % n_fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_tree, mesh: Mesh, min_size: int = DEFAULT_FSDP_MIN_SIZE):
    """A tree of :class:`NamedSharding` for a tree of arrays/ShapeDtypeStructs."""
    n = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), n, min_size)), abstract_tree)


def describe(abstract_tree, shardings) -> dict:
    """Bytes of the tree in total and per device, and how many leaves are sharded/replicated."""
    total = per_device = 0
    sharded = replicated_n = 0
    for x, s in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
        nbytes = math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
        shard_shape = s.shard_shape(tuple(np.shape(x)))
        total += nbytes
        per_device += math.prod(shard_shape) * np.dtype(x.dtype).itemsize
        if tuple(shard_shape) != tuple(np.shape(x)):
            sharded += 1
        else:
            replicated_n += 1
    return {"bytes": total, "bytes_per_device": per_device, "sharded_leaves": sharded,
            "replicated_leaves": replicated_n}
