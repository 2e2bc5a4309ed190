"""Device mesh and shardings.

This version trains data-parallel on a 1-D ``data`` mesh over every device
(``jax.devices()``): batches are global ``jax.Array``s split along their leading
axis, parameters, optimizer state and EMA are replicated, and ``jax.jit`` with
explicit ``in_shardings``/``out_shardings`` (the modern form of ``pjit``) inserts the
gradient all-reduce. The same code runs on 1 or N devices. The multi-host / FSDP
issue generalises the mesh to ``('data', 'fsdp')``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_data_mesh(devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch: int, mesh: Mesh, what: str = "data.batch_size") -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(f"{what}={global_batch} is not divisible by the {n} devices of the mesh; "
                         f"use a multiple of {n}.")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch (this process's rows) -> global arrays sharded over ``data``."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
