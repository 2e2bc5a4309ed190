"""Multi-host start-up and barriers with timeouts (JAX's own ``jax.distributed``).

``initialize`` must run before anything touches a JAX backend. Modes:

* ``auto`` (default): on a Cloud TPU VM slice, or under SLURM / Open MPI, call
  ``jax.distributed.initialize()`` and let JAX detect the cluster; with a coordinator
  address (flag or ``JAX_COORDINATOR_ADDRESS``) use it with the process count and id
  (flags or ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``); otherwise run as one process.
* ``on``: always initialise (fails clearly if no cluster can be found).
* ``off``: one process, no coordination service.

On CPU (tests, a laptop cluster) several processes need gloo collectives; that is set
here before the backend starts. ``initialization_timeout`` bounds the wait for all
processes to join and ``heartbeat_timeout`` how long a silent peer is tolerated: a
missing or dead process ends the run with an error instead of a hang.
"""
from __future__ import annotations

import logging
import os

import jax
from jax.experimental import multihost_utils

log = logging.getLogger("cfm_jax")

def in_multiprocess_cluster(env=None) -> bool:
    """Whether the environment describes a job of several processes (TPU slice, SLURM, Open MPI).

    One host or one task is not a cluster: ``TPU_WORKER_HOSTNAMES=localhost`` (which the planner sets
    to compile for TPUs on a CPU machine), a one-task SLURM allocation or ``mpirun -n 1`` run as one
    process without a coordination service."""
    env = os.environ if env is None else env

    def count(key: str) -> int:
        try:
            return int(env.get(key, "") or 0)
        except ValueError:
            return 0

    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    return (len(hosts) > 1 or bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))
            or count("SLURM_NTASKS") > 1 or count("OMPI_COMM_WORLD_SIZE") > 1)


class PeerTimeout(RuntimeError):
    """A peer process did not reach a barrier in time (stalled or failed)."""


def initialize(mode: str = "auto", *, coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> bool:
    """Joins the processes of a multi-host run; returns whether ``jax.distributed`` was started."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode {mode!r}; choose auto, on or off.")
    if mode == "off":
        return False
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if mode == "auto" and coordinator_address is None and not in_multiprocess_cluster():
        return False
    if coordinator_address is not None and (num_processes is None or process_id is None):
        raise ValueError("A coordinator address needs --num_processes and --process_id (or JAX_NUM_PROCESSES "
                         "and JAX_PROCESS_ID).")
    # Several CPU processes exchange data through gloo (the default CPU client has no collectives).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=int(timeout_s),
                                   heartbeat_timeout_seconds=int(heartbeat_timeout_s))
    except Exception as e:  # noqa: BLE001 -- jax raises RuntimeError/ValueError/XlaRuntimeError here
        raise RuntimeError(
            f"jax.distributed.initialize failed ({type(e).__name__}: {e}). Check that every process was "
            f"started with the same coordinator address ({coordinator_address or 'auto-detected'}) and process "
            f"count, that the coordinator (process 0) is reachable, and that no process is missing; processes "
            f"wait at most {timeout_s} s for each other.") from e
    log.info("jax.distributed: process %d of %d, %d local / %d global devices.", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def barrier(name: str, timeout_s: float = 300.0) -> None:
    """Waits until every process reaches barrier ``name``; raises :class:`PeerTimeout` naming
    the barrier after ``timeout_s`` instead of hanging. A no-op in a single-process run."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _dist  # lazy: a jax._src internal (jax.distributed's coordination client)

    client = _dist.global_state.client
    if client is None:  # processes joined without jax.distributed (should not happen)
        multihost_utils.sync_global_devices(name)
        return
    try:
        client.wait_at_barrier(name, int(timeout_s * 1000))
    except Exception as e:  # noqa: BLE001 -- XlaRuntimeError (DEADLINE_EXCEEDED, peer errors)
        raise PeerTimeout(
            f"Process {jax.process_index()} waited {timeout_s:.0f} s at barrier {name!r} but not all "
            f"{jax.process_count()} processes arrived: a peer stalled or failed (see its log). "
            f"({type(e).__name__}: {e})") from e
