"""The training loop, read top to bottom.

1. Train state: params, optimizer state, EMA params, step and RNG in one pytree,
   checkpointed whole (``TrainState``).
2. The update step: coupling -> flow matching loss -> gradients (optionally
   accumulated over micro-batches) -> optax update -> EMA, one ``jax.jit`` with
   explicit shardings and the state donated (``make_train_step``).
3. Validation: the evaluator of ``eval.py`` (:class:`cfm_jax.evaluation.Evaluator`) on the
   held-out set with the EMA weights: PSNR/SSIM/MSE (and FID, patch-FID) of the prediction
   and of bicubic/bilinear up-sampling, an image grid (``make_validator``).
4. The run (``train``): build and check everything (``_build``) and restore the newest
   checkpoint (``_starting_state``) before anything is written; then the run's files
   (``_RunFiles``: config, metrics, checkpoints, grids, summary) and the loop (``_train_loop``):
   log, validate, checkpoint; stop on a NaN/inf loss, a full disk (one message naming the
   newest complete checkpoint) or a SIGTERM/SIGINT/SIGUSR1.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from cfm_jax import checkpointing, compile_options, distributed, flops as flops_lib, host_memory, sharding, xla_order
from cfm_jax.convert.fmboost_checkpoint import load_fmboost
from cfm_jax.data.train_data import make_data
from cfm_jax.ema import EMAConfig, ema_update
from cfm_jax.evaluation import Evaluator, FIDConfig, finite_json, resolve_rim
from cfm_jax.metric_writers import LogMirror, MetricWriter
from cfm_jax.optim import make_optimizer
from cfm_jax.solvers import SolverSpec
from cfm_jax.model import CFMUpsampler

log = logging.getLogger("cfm_jax")


class TrainingDiverged(RuntimeError):
    """Raised when the loss becomes NaN or infinite."""


# --------------------------------------------------------------------------- 1. state
@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer updates done
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array  # uint32 [2], folded with the step for each update
    # int32 [], the EMA's own update counter (ema-pytorch's ``step`` buffer): equal to ``step`` in a
    # run trained from scratch; ``--load_weights`` of a checkpoint continues the checkpoint's counter
    # while ``step`` starts again at 0, as the original's --load_weights does.
    ema_step: jax.Array


def _init_state(upsampler: CFMUpsampler, tx: optax.GradientTransformation, rng: jax.Array,
                latent_size: int) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    params = upsampler.init(init_rng, latent_size)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params), rng=state_rng,
                      ema_step=jnp.zeros((), jnp.int32))


def _state_shapes(upsampler, tx, latent_size: int) -> TrainState:
    return jax.eval_shape(lambda r: _init_state(upsampler, tx, r, latent_size), jax.random.PRNGKey(0))


def train_state_shardings(upsampler, tx, latent_size: int, mesh, fsdp_min_size: int | None = None):
    """The :class:`NamedSharding` of every leaf of the train state (``sharding.state_shardings``:
    replicated over ``data``, large arrays split over ``fsdp``)."""
    return _shardings(_state_shapes(upsampler, tx, latent_size), mesh, fsdp_min_size)


def _shardings(shapes: TrainState, mesh, fsdp_min_size: int | None):
    min_size = sharding.DEFAULT_FSDP_MIN_SIZE if fsdp_min_size is None else fsdp_min_size
    return sharding.state_shardings(shapes, mesh, min_size)


def create_train_state(upsampler: CFMUpsampler, tx: optax.GradientTransformation, rng: jax.Array,
                       latent_size: int, mesh, fsdp_min_size: int | None = None, shardings=None) -> TrainState:
    """Initialises the state directly into its sharding, inside one jit (``out_shardings``): no
    host or device ever holds more than its own shards. ``shardings``: already computed ones."""
    if shardings is None:
        shardings = train_state_shardings(upsampler, tx, latent_size, mesh, fsdp_min_size)
    init = jax.jit(lambda r: _init_state(upsampler, tx, r, latent_size), out_shardings=shardings)
    compiled = init.lower(rng).compile()
    # The compiler's freed heap goes back to the OS before the state is allocated: the state's
    # buffers do not reuse it, so it would add to the peak (docs/benchmarks.md, "Training memory").
    host_memory.release_freed_memory()
    return compiled(rng)


def abstract_train_state(upsampler, tx, latent_size: int, mesh, fsdp_min_size: int | None = None) -> TrainState:
    """Shapes, dtypes and shardings of the state, without allocating it."""
    shapes = _state_shapes(upsampler, tx, latent_size)  # traced once: the shardings derive from these shapes
    shardings = _shardings(shapes, mesh, fsdp_min_size)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


# --------------------------------------------------------------------------- 2. update step
def split_microbatches(batch: dict, n: int) -> dict:
    """[B, ...] -> [n, B/n, ...]; micro-batch j holds examples j, n+j, 2n+j, ... so that each
    device's contiguous rows split locally (no resharding of the data axis)."""
    def split(x):
        b = x.shape[0]
        if b % n:
            raise ValueError(f"The batch ({b}) is not divisible by optim.grad_accum_steps={n}.")
        return jnp.swapaxes(x.reshape((b // n, n) + x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_train_step(upsampler: CFMUpsampler, tx: optax.GradientTransformation,
                    schedule: Callable, ema_cfg: EMAConfig, mesh, *, grad_accum_steps: int = 1,
                    state_sharding=None):
    """The jitted update ``(state, batch) -> (state, metrics)``; ``state`` is donated.

    ``state_sharding``: the train state's shardings (:func:`train_state_shardings`; default
    replicated). The batch is split over the mesh's batch axes; metrics are replicated.
    ``train_step.num_traces()`` tells how often it was traced (a retrace is a bug).
    """
    traces = [0]

    def loss_and_grads(params, batch, rng):
        def mean_loss(p):
            return jnp.mean(upsampler.loss(p, batch, rng, train=True))
        return jax.value_and_grad(mean_loss)(params)

    def step_fn(state: TrainState, batch: dict):
        traces[0] += 1
        rng = jax.random.fold_in(state.rng, state.step)
        if grad_accum_steps == 1:
            loss, grads = loss_and_grads(state.params, batch, rng)
        else:
            micro = jax.lax.with_sharding_constraint(split_microbatches(batch, grad_accum_steps),
                                                     sharding.microbatch_sharding(mesh))

            def body(carry, xs):
                grad_sum, loss_sum = carry
                mb, i = xs
                loss_i, grads_i = loss_and_grads(state.params, mb, jax.random.fold_in(rng, i))
                return (jax.tree.map(jnp.add, grad_sum, grads_i), loss_sum + loss_i), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grad_sum, loss_sum), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32)), (micro, jnp.arange(grad_accum_steps)))
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grad_sum)
            loss = loss_sum / grad_accum_steps
        # Named scopes label the HLO (op_name metadata), so profiles can tell these parts apart.
        with jax.named_scope("ema"):
            # EMA from the pre-update weights with the EMA's counter before this update (the original's order).
            ema_params = ema_update(state.ema_params, state.params, state.ema_step, ema_cfg)
            # Each weight's update waits for its EMA's read of it, so that XLA updates the
            # donated weights in place instead of copying them all first (xla_order).
            grads = jax.tree.map(xla_order.after, grads, ema_params)
        with jax.named_scope("optimizer"):
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        with jax.named_scope("metrics"):
            metrics = {
                "loss": loss,
                "grad_norm": optax.tree.norm(grads),
                "param_norm": optax.tree.norm(params),
                "update_norm": optax.tree.norm(updates),
                "lr": schedule(state.step),
            }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  ema_params=ema_params, ema_step=state.ema_step + 1)
        return new_state, metrics

    rep, data = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    state_sh = rep if state_sharding is None else state_sharding
    jitted = jax.jit(step_fn, in_shardings=(state_sh, data), out_shardings=(state_sh, rep), donate_argnums=(0,),
                     compiler_options=compile_options.training(mesh.devices.flat[0].platform))
    jitted.num_traces = lambda: traces[0]
    return jitted


# --------------------------------------------------------------------------- 3. validation
def make_validator(config, upsampler: CFMUpsampler, val_set, mesh) -> Evaluator | None:
    """The evaluator of validation (``None`` when ``train.eval_every`` is 0): ``eval.py``'s
    :class:`cfm_jax.evaluation.Evaluator` on the validation set, seeded with ``config.seed``,
    with FID and patch-FID when ``eval.inception`` is set."""
    if config.train.eval_every <= 0 or val_set is None:
        return None
    e = config.eval
    fid = FIDConfig.from_path(e.inception, num_crops=e.num_crops, crop_size=e.crop_size)
    return Evaluator(upsampler, val_set, mesh, seed=config.seed, fid=fid, num_grid=config.train.num_grid_images,
                     rim=resolve_rim(config.eval.rim, upsampler, val_set.image_size))


def validation_metrics(results) -> dict:
    """``val/<method>_<metric>`` (psnr, ssim, mse; fid and patch_fid when computed) of the
    CFM sampler and the baselines, and ``val/nfe``."""
    out = {}
    for r in results:
        for k in ("psnr", "ssim", "mse", "psnr_mean_mse", "psnr_interior", "ssim_interior", "psnr_mean_mse_interior",
                  "fid", "patch_fid"):
            if getattr(r, k) is not None:
                out[f"val/{r.method}_{k}"] = float(getattr(r, k))
        if r.method == "cfm":
            out["val/nfe"] = r.nfe
    return out


# --------------------------------------------------------------------------- 4. the loop
def batch_preparer(upsampler: CFMUpsampler, has_latents: bool = False):
    """``None`` when batches already carry the latents the flow needs (records; pixel-space
    photos); else a jitted function adding them (photo crops with an autoencoder first stage
    are encoded on the fly, each step)."""
    if has_latents or upsampler.first_stage.name == "identity":
        return None
    return upsampler.make_latents_fn()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class _StopSignal:
    """Turns SIGTERM/SIGINT/SIGUSR1 into a flag checked at step boundaries (save, then exit).

    SIGUSR1 is what SLURM sends with ``--signal=USR1@<seconds>`` before a job's time limit; the
    original saves ``interrupted.ckpt`` on it."""

    def __init__(self):
        self.received = None
        self._old = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _agreed_stop(received: str | None, step: int) -> str | None:
    """Whether to save and stop after ``step``, the same answer on every process: a signal
    received by any process, or a TPU preemption notice (JAX's preemption sync point)."""
    if jax.process_count() == 1:
        return received
    from jax._src import distributed as _dist  # lazy: a JAX internal, only needed with several processes

    flags = multihost_utils.process_allgather(np.asarray(received is not None))
    if np.any(flags):
        return received or f"a signal on process {int(np.argmax(flags))}"
    if _dist.global_state.preemption_sync_manager is not None and \
            multihost_utils.reached_preemption_sync_point(step):
        return "TPU preemption notice"
    return None


def _host_metrics(metrics: list[dict]) -> list[dict]:
    return [{k: float(v) for k, v in m.items()} for m in jax.device_get(metrics)]


class OutOfSpace(RuntimeError):
    """Raised when a write fails for lack of disk space (or quota); the message names what could
    not be written, where, and the newest complete checkpoint (nothing complete is lost)."""


def check_train_settings(t) -> None:
    """Rejects step counts and intervals the loop cannot use (``config.train``), before anything
    is compiled or written."""
    for key in ("num_steps", "log_every", "checkpoint_every"):
        if t[key] < 1:
            raise ValueError(f"train.{key}={t[key]}: must be a positive number of steps.")
    if t.eval_every < 0:
        raise ValueError(f"train.eval_every={t.eval_every}: must be a number of steps, or 0 for no validation.")


def _check_workdir(workdir: str) -> None:
    """A local work directory must be a directory we may write in (or creatable in one)."""
    if "://" in str(workdir):
        return
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == path else f" ({existing} is a file)"
        raise ValueError(f"--workdir {workdir} is a file, not a directory{where}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" (in {existing})"
        raise ValueError(f"--workdir {workdir}: no permission to write{where}; choose another --workdir.")


_OUT_OF_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def out_of_space_reason(e: BaseException | str) -> str | None:
    """``"no space left on device"`` or ``"disk quota exceeded"`` when ``e`` (or an exception it
    was raised from, or its text) says so, else ``None``. Orbax/TensorStore report a full disk as a
    ``ValueError`` whose text carries the OS message; Python writes raise ``OSError``."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _OUT_OF_SPACE:
            return _OUT_OF_SPACE[x.errno]
        for code, reason in _OUT_OF_SPACE.items():
            if os.strerror(code) in str(x):
                return reason
        if isinstance(x, BaseException):
            todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return None


class _QuietOutOfSpace(logging.Filter):
    """Drops the log records (each with a traceback) that orbax's threads and asyncio's unretrieved
    tasks write for every array of a save that failed for lack of space: the trainer reports that
    once, as :class:`OutOfSpace`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return out_of_space_reason(record.getMessage()) is None


def _is_orphaned_write_callback(exc_type, exc: BaseException | None) -> bool:
    """TensorStore completing a write of a failed orbax save after orbax closed that save's event
    loop: ``RuntimeError('Event loop is closed')``, printed from TensorStore's own threads, once per
    array, also after the error was reported. Never the main thread's own error."""
    return (exc_type is RuntimeError and str(exc) == "Event loop is closed"
            and threading.current_thread() is not threading.main_thread())


_failed_write_reports_quiet = False


def _quiet_failed_write_reports() -> None:
    """Installs, once per process, the filters of the reports a failed save keeps producing after
    the trainer raised (logged when asyncio collects the failed tasks, or printed by TensorStore's
    callbacks until the process exits): they name nothing the :class:`OutOfSpace` message does not."""
    global _failed_write_reports_quiet
    if _failed_write_reports_quiet:
        return
    _failed_write_reports_quiet = True
    for name in ("absl", "asyncio"):  # orbax logs through absl
        logging.getLogger(name).addFilter(_QuietOutOfSpace())
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def quiet_excepthook(exc_type, exc, tb):
        if not _is_orphaned_write_callback(exc_type, exc):
            excepthook(exc_type, exc, tb)

    def quiet_unraisablehook(unraisable):
        if not _is_orphaned_write_callback(unraisable.exc_type, unraisable.exc_value):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = quiet_excepthook, quiet_unraisablehook


@contextlib.contextmanager
def _writing(what: str, where, checkpoints: str):
    """Turns a write that fails for lack of space into :class:`OutOfSpace`, naming ``what``,
    ``where`` and the newest complete checkpoint in ``checkpoints``."""
    try:
        yield
    except Exception as e:
        reason = out_of_space_reason(e)
        if reason is None:
            raise
        try:
            steps = checkpointing.complete_steps(checkpoints)
        except Exception:  # noqa: BLE001 -- the message must not fail
            steps = []
        newest = f"the newest complete checkpoint is step {steps[-1]}" if steps else "no checkpoint is complete yet"
        raise OutOfSpace(f"{reason} writing {what} to {where}; {newest} (resume with the same command once "
                         "space is free).") from e


def _close_quietly(*closables) -> None:
    """Closes what a failed run leaves open (progress bar, checkpoint manager, metric files)
    without a second error on top of the one being raised."""
    quiet = logging.getLogger("absl"), logging.getLogger("orbax")
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.CRITICAL)
    try:
        for c in closables:
            if c is not None:
                try:
                    c.close()
                except Exception:  # noqa: BLE001
                    pass
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _read_summary(wd) -> dict:
    try:
        return json.loads((wd / "train_summary.json").read_text())
    except Exception:  # noqa: BLE001 -- none yet, or unreadable: nothing to keep
        return {}


def _config_changes(saved: dict | None, now: dict, limit: int = 8) -> str:
    """``"model.model_channels: 32 -> 64, ..."``: the leaves in which ``now`` differs from the
    config a checkpoint was saved with (``""`` when unknown or equal)."""
    if not saved:
        return ""
    a = flax.traverse_util.flatten_dict(saved, sep=".")
    b = flax.traverse_util.flatten_dict(json.loads(json.dumps(now, default=str)), sep=".")
    diff = [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    return ", ".join(diff[:limit]) + (f" and {len(diff) - limit} more" if len(diff) > limit else "")


def train(config, workdir: str, *, load_weights: str | None = None, resume: str | None = None) -> dict:
    """Trains ``config`` in ``workdir``; returns a summary.

    By default a run resumes from the newest checkpoint of ``workdir``. ``resume`` picks another
    checkpoint to resume from (the whole state: weights, optimizer, EMA, data position): a step
    of ``workdir`` (``"20000"``), or a path (a step folder ``.../checkpoints/<step>``, a
    checkpoints folder or another run's work directory, whose newest step is taken) -- the
    original's ``--resume_checkpoint``. Checkpoints of ``workdir`` newer than the chosen step
    are moved to ``workdir/superseded_checkpoints/`` (kept, not deleted). ``load_weights`` starts
    a fresh run from another checkpoint's weights (see :func:`_load_weights`).

    Nothing in ``workdir`` changes until the config is known to work: settings, data, sampler
    and the restore of the checkpoint (or the weights to load) come first. The summary has
    ``stopped_by`` when a signal or a preemption notice stopped the run before ``num_steps``.
    Raises :class:`TrainingDiverged` on a NaN/inf loss and :class:`OutOfSpace` when a write
    fails for lack of space.
    """
    if resume is not None and load_weights:
        raise ValueError("--resume_checkpoint and --load_weights exclude each other: resume continues a run "
                         "(optimizer, EMA, data position); --load_weights starts a new one from weights.")
    _quiet_failed_write_reports()
    run = _build(config, workdir)  # everything that can reject the config; nothing written yet
    state, resumed_from = _starting_state(run, config, workdir, resume=resume, load_weights=load_weights)
    files = _RunFiles(config, workdir, start_step=int(state.step),
                      supersede_after=resumed_from if resume is not None else None)
    summary = {"workdir": files.workdir_name, "start_step": int(state.step), "num_steps": config.train.num_steps}
    try:
        step = _train_loop(config, run, state, files, summary)
    except BaseException:
        files.close_quietly()
        raise
    files.close()
    summary["final_step"] = step
    summary["num_traces"] = run.train_step.num_traces()
    distributed.barrier("cfm_jax.train.end")
    return files.write_summary(summary)


@dataclasses.dataclass
class _Run:
    """What a run is made of, built (and checked) before anything is written."""

    mesh: Any
    upsampler: CFMUpsampler
    latent_size: int
    solver: SolverSpec  # the validation sampler
    train_data: Any
    validator: Evaluator | None
    abstract: TrainState  # shapes, dtypes and shardings of the state
    tx: optax.GradientTransformation
    train_step: Callable
    flops_per_example: float


def _build(config, workdir: str) -> _Run:
    """Checks the settings and builds the model, optimizer, data, validation and the (not yet
    compiled) train step. Raises on any setting that cannot work; writes nothing."""
    check_train_settings(config.train)
    _check_workdir(workdir)
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch_size(config.data.batch_size, mesh)
    if config.optim.grad_accum_steps > 1:
        sharding.check_batch_size(config.data.batch_size // config.optim.grad_accum_steps, mesh,
                                  "data.batch_size / optim.grad_accum_steps")
    upsampler = CFMUpsampler(config)
    latent_size = upsampler.latent_size(config.data.image_size)
    for key in ("train.border_pad", "sample.border_pad"):  # before anything is compiled or written
        upsampler.check_border_pad(latent_size, latent_size, key)
    tx, schedule = make_optimizer(config.optim)
    ema_cfg = EMAConfig.from_config(config.ema)
    solver = SolverSpec.from_config(config.sample)  # the validation sampler (ODE or SDE) exists
    train_data, val_set = make_data(config, upsampler.first_stage, n_devices=mesh.devices.size)
    validator = make_validator(config, upsampler, val_set, mesh)
    abstract = abstract_train_state(upsampler, tx, latent_size, mesh, config.mesh.fsdp_min_size)
    state_sharding = jax.tree.map(lambda a: a.sharding, abstract)
    layout = sharding.describe(abstract, state_sharding)
    log.info("Mesh %s over %d devices (%d processes); train state %.1f MiB, %.1f MiB per device "
             "(%d arrays sharded over fsdp, %d replicated).", dict(mesh.shape), mesh.devices.size,
             jax.process_count(), layout["bytes"] / 2**20, layout["bytes_per_device"] / 2**20,
             layout["sharded_leaves"], layout["replicated_leaves"])
    train_step = make_train_step(upsampler, tx, schedule, ema_cfg, mesh,
                                 grad_accum_steps=config.optim.grad_accum_steps, state_sharding=state_sharding)
    # model FLOPs (forward + backward of the UNet, analytic; a rematerialised forward is not counted)
    flops_per_example = flops_lib.train_flops_per_example(config.model, latent_size)
    return _Run(mesh=mesh, upsampler=upsampler, latent_size=latent_size, solver=solver, train_data=train_data,
                validator=validator, abstract=abstract, tx=tx, train_step=train_step,
                flops_per_example=flops_per_example)


def _starting_state(run: _Run, config, workdir: str, *, resume: str | None,
                    load_weights: str | None) -> tuple[TrainState, tuple[str, int] | None]:
    """The state the run starts from, and ``(checkpoints folder, step)`` when it was restored:
    the checkpoint ``resume`` names, else the newest of ``workdir``, else a new state (with the
    weights of ``load_weights``). Also restores the data position. Writes nothing: a checkpoint
    this config cannot restore (another model or optimizer) is rejected with the work directory
    untouched, config.json included."""
    own_checkpoints = checkpointing.checkpoint_dir(workdir)
    if resume is not None:
        source_dir, start_step = _resume_source(resume, workdir)
    else:
        steps = checkpointing.complete_steps(own_checkpoints)
        source_dir, start_step = own_checkpoints, (steps[-1] if steps else None)
    if start_step is None:
        state = create_train_state(run.upsampler, run.tx, jax.random.PRNGKey(config.seed), run.latent_size, run.mesh,
                                   shardings=jax.tree.map(lambda a: a.sharding, run.abstract))
        if load_weights:
            state = _load_weights(state, load_weights, run.mesh)
        host_memory.release_freed_memory()  # what initialising freed
        return state, None
    source = checkpointing.make_manager(None, read_only=True, directory=source_dir)
    try:
        state = _restore_state(source, run.abstract, start_step, config)
        if run.train_data.restore_arg() is not None:
            if checkpointing.has_item(source, start_step, "data"):
                checkpointing.restore_data(source, start_step, run.train_data.restore_arg())
            else:
                log.warning("Checkpoint %d holds no data iterator (saved by a run on another data source?): "
                            "the records are read from the start of a new epoch order.", start_step)
    finally:
        source.close()
    log.info("Resumed from %s at step %d.", os.path.join(source_dir, str(start_step)), int(state.step))
    if load_weights:
        log.warning("--load_weights ignored: the work directory already has checkpoints (resuming).")
    host_memory.release_freed_memory()  # what restoring freed
    return state, (source_dir, start_step)


class _RunFiles:
    """Everything a run writes in its work directory: config.json, the metric files, the
    checkpoints, the validation grids and train_summary.json.

    With a bucket work directory (``gs://...``) the metric files are appended to in a local
    mirror that is copied to the bucket at every checkpoint and at the end (and fetched back when
    a run resumes on a new machine). A write that fails for lack of space raises
    :class:`OutOfSpace` naming the newest complete checkpoint. Creating it writes config.json and,
    when ``supersede_after`` is a checkpoint of this run, moves this run's newer checkpoints aside.
    """

    def __init__(self, config, workdir: str, *, start_step: int, supersede_after: tuple[str, int] | None):
        self.config = config
        self.wd = epath.Path(workdir)  # a local folder or a bucket URL (gs://...)
        self.remote = "://" in str(workdir)
        self.workdir_name = str(workdir) if self.remote else os.path.abspath(workdir)
        self.is_main = jax.process_index() == 0
        self.checkpoints = checkpointing.checkpoint_dir(workdir)
        self.previous_summary = _read_summary(self.wd) if self.is_main else {}
        if self.is_main:
            with self.writing("config.json", self.wd):
                self.wd.mkdir(parents=True, exist_ok=True)
                (self.wd / "config.json").write_text(config.to_json_best_effort(indent=2))
        # metric files of a bucket work directory are written locally and copied there
        self.mirror = LogMirror(self.wd, LogMirror.local_dir(str(workdir))) if self.remote else None
        self.log_dir = self.mirror.log_dir if self.mirror else workdir
        if self.mirror and self.is_main:
            self.mirror.fetch()
        if supersede_after is not None and self.is_main:
            _supersede_newer(workdir, supersede_after)
        distributed.barrier("cfm_jax.train.resume")
        self.manager = checkpointing.make_manager(workdir, keep=config.train.keep_checkpoints)
        with self.writing("metrics.csv and tensorboard/", self.log_dir):
            lg = config.logging
            self.writer = MetricWriter(self.log_dir, use_csv=lg.csv, tensorboard=lg.tensorboard, wandb=lg.wandb,
                                       wandb_project=lg.wandb_project, wandb_name=lg.wandb_name,
                                       config_dict=config.to_dict(), resume_step=start_step)

    def writing(self, what: str, where):
        return _writing(what, where, self.checkpoints)

    def save(self, step: int, state: TrainState, data) -> None:
        with self.writing(f"checkpoint {step}", self.checkpoints):
            checkpointing.save(self.manager, step, state, {"step": step, "config": self.config.to_dict()}, data=data)
            if self.mirror and self.is_main:
                self.writer.flush()
                self.mirror.push()

    def write_metrics(self, step: int, metrics: dict) -> None:
        with self.writing(f"the metrics of step {step}", self.log_dir):
            self.writer.write(step, metrics)

    def write_grid(self, step: int, grid: np.ndarray) -> None:
        with self.writing(f"the validation grid of step {step}", self.wd / "samples"):
            if self.is_main:
                (self.wd / "samples").mkdir(parents=True, exist_ok=True)
                png = io.BytesIO()
                Image.fromarray(grid).save(png, format="PNG")
                (self.wd / "samples" / f"val_{step:07d}.png").write_bytes(png.getvalue())
            self.writer.write_image(step, "val/grid", grid)

    def close(self) -> None:
        self.manager.close()
        with self.writing("the metric files", self.log_dir):
            self.writer.close()

    def close_quietly(self) -> None:
        _close_quietly(self.manager, self.writer)

    def write_summary(self, summary: dict) -> dict:
        """Writes train_summary.json (process 0) and returns the summary. A rerun of a finished
        run (no step done) keeps the summary as it was; a run without a validation of its own
        keeps the last one."""
        previous = self.previous_summary
        if summary["final_step"] == summary["start_step"] and previous:
            kept = {k: v for k, v in previous.items() if k != "stopped_by"}
            return {**kept, **summary}
        for key in ("validation", "validation_step"):
            if key not in summary and key in previous:
                summary[key] = previous[key]
        if self.is_main:
            with self.writing("train_summary.json", self.wd):
                clean, non_finite = finite_json(summary)  # strict JSON: NaN/inf become null, named
                if non_finite:
                    clean["non_finite"] = {"fields": non_finite, "note": "not finite (NaN or infinite); written as null"}
                (self.wd / "train_summary.json").write_text(json.dumps(clean, indent=2, allow_nan=False))
                if self.mirror:
                    self.mirror.push()
        return summary


def _train_loop(config, run: _Run, state: TrainState, files: _RunFiles, summary: dict) -> int:
    """Steps from ``state.step`` to ``train.num_steps``: logs every ``log_every`` steps,
    validates every ``eval_every``, checkpoints every ``checkpoint_every`` and when a stop signal
    (or a preemption notice) arrives. Fills ``summary``; returns the last step done."""
    t_cfg, mesh = config.train, run.mesh
    step, num_steps = int(state.step), t_cfg.num_steps
    prepare = batch_preparer(run.upsampler, run.train_data.has_latents) or (lambda b: b)
    run.train_data.seek(step)
    pbar = None
    if files.is_main and config.logging.progress_bar:
        pbar = tqdm(total=num_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    pending: list[dict] = []
    compiled_step = None
    last_time, last_step = time.perf_counter(), step
    try:
        with _StopSignal() as stop:
            while step < num_steps:
                batch = prepare(sharding.shard_batch(run.train_data.next_batch(), mesh))
                if compiled_step is None:  # ahead-of-time: trace, lower and compile once, timed
                    compiled_step = _compile(run.train_step, state, batch, mesh, summary)
                    last_time = time.perf_counter()
                state, metrics = compiled_step(state, batch)
                step += 1
                pending.append(metrics)
                if "first_step_seconds" not in summary:
                    jax.block_until_ready(metrics)
                    summary["first_step_seconds"] = time.perf_counter() - last_time
                    last_time, last_step = time.perf_counter(), step
                stop_by = _agreed_stop(stop.received, step)
                at_log = step % t_cfg.log_every == 0 or step == num_steps
                at_ckpt = step % t_cfg.checkpoint_every == 0 or step == num_steps
                at_eval = run.validator is not None and (step % t_cfg.eval_every == 0 or step == num_steps)
                if at_log or at_ckpt or at_eval or stop_by:
                    host = _host_metrics(pending)
                    _check_finite(host, step, files.manager)
                    pending = []
                    now = time.perf_counter()
                    row = _train_row(host, (step - last_step) / max(now - last_time, 1e-9), config,
                                     mesh.devices.size, run.flops_per_example)
                    last_time, last_step = now, step
                    files.write_metrics(step, {f"train/{k}": v for k, v in row.items()})
                    summary["train"] = row
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                         ex_s=f"{row['examples_per_sec']:.1f}")
                if at_eval:
                    params = state.ema_params if config.sample.use_ema else state.params
                    results = _validate(run, params, step, files, summary)
                    if pbar is not None:
                        pbar.write(f"step {step}: PSNR cfm {results['val/cfm_psnr']:.2f} dB vs bicubic "
                                   f"{results['val/bicubic_psnr']:.2f} dB | SSIM cfm {results['val/cfm_ssim']:.4f} "
                                   f"vs bicubic {results['val/bicubic_ssim']:.4f}")
                if at_ckpt or stop_by:
                    files.save(step, state, run.train_data.save_arg())
                if pbar is not None:
                    pbar.update(1)
                if stop_by and step < num_steps:  # (at the last step the run is simply finished)
                    log.warning("Stopping (%s): saved a checkpoint at step %d.", stop_by, step)
                    summary["stopped_by"] = stop_by
                    break
    except BaseException:
        _close_quietly(pbar)
        raise
    if pbar is not None:
        pbar.close()
    return step


def _compile(train_step, state: TrainState, batch: dict, mesh, summary: dict):
    """The train step compiled ahead of time for this state and batch, timed into ``summary``."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = train_step.lower(state, batch).compile()
    summary["compile_seconds"] = time.perf_counter() - t0
    host_memory.release_freed_memory()  # the compiler's working memory
    log.info("Compiled the train step in %.1f s.", summary["compile_seconds"])
    return compiled


def _check_finite(host: list[dict], step: int, manager) -> None:
    """Raises :class:`TrainingDiverged` naming the first step (of those ending at ``step``) whose
    loss is NaN or infinite; nothing has been saved after it."""
    for i, m in enumerate(host):
        if not np.isfinite(m["loss"]):
            bad = step - len(host) + i + 1
            raise TrainingDiverged(
                f"The loss became {m['loss']} at step {bad} (grad_norm {m['grad_norm']}). "
                f"Nothing was saved after it; the newest good checkpoint is step "
                f"{manager.latest_step()}. Lower --config.optim.lr, set "
                f"--config.optim.grad_clip_norm, or check the data.")


def _train_row(host: list[dict], steps_per_sec: float, config, n_devices: int, flops_per_example: float) -> dict:
    """The logged ``train/`` row: the metrics averaged over the steps since the last row, and
    the throughput (steps and examples per second, model TFLOP/s per device)."""
    row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    row["steps_per_sec"] = steps_per_sec
    row["step_seconds"] = 1.0 / max(steps_per_sec, 1e-12)
    row["examples_per_sec"] = steps_per_sec * config.data.batch_size
    row["examples_per_sec_per_device"] = row["examples_per_sec"] / n_devices
    row["tflops_per_device"] = flops_lib.model_tflops_per_device(
        flops_per_example, row["step_seconds"], config.data.batch_size, n_devices)
    return row


def _validate(run: _Run, params, step: int, files: _RunFiles, summary: dict) -> dict:
    """Validates ``params`` with the run's sampler, writes the metrics and the grid of ``step``."""
    evaluated, grids = run.validator.run(params, [run.solver])
    results = validation_metrics(evaluated)
    files.write_metrics(step, results)
    files.write_grid(step, grids[run.solver.label])
    summary["validation"] = results
    summary["validation_step"] = step
    return results


def _resume_source(resume: str, workdir: str) -> tuple[str, int]:
    """``(checkpoints folder, step)`` named by ``--resume_checkpoint`` (see :func:`train`)."""
    own = checkpointing.checkpoint_dir(workdir)
    text = str(resume).strip()
    if text.isdigit():
        steps = checkpointing.complete_steps(own)
        if int(text) not in steps:
            raise FileNotFoundError(f"--resume_checkpoint={text}: no complete checkpoint of step {text} in {own}; "
                                    f"available: {steps or 'none'}.")
        return own, int(text)
    directory, step = checkpointing.locate(text)
    if directory != own and checkpointing.complete_steps(own):
        raise ValueError(f"--resume_checkpoint={text} is another run's checkpoint, but {workdir} already has "
                         f"checkpoints {checkpointing.complete_steps(own)}: resume into a fresh --workdir, or "
                         "give a step of this one (--resume_checkpoint=STEP).")
    return directory, step


def _supersede_newer(workdir: str, resume_from: tuple[str, int]) -> None:
    """Moves this run's checkpoints newer than the step it resumes from out of the way (into
    ``superseded_checkpoints/``), so that the resumed run can save those steps again."""
    own = checkpointing.checkpoint_dir(workdir)
    if resume_from[0] != own:
        return
    newer = [s for s in checkpointing.complete_steps(own) if s > resume_from[1]]
    if not newer:
        return
    aside = os.path.join(str(workdir), "superseded_checkpoints")
    os.makedirs(aside, exist_ok=True)
    for s in newer:
        dst, n = os.path.join(aside, str(s)), 1
        while os.path.exists(dst):
            dst, n = os.path.join(aside, f"{s}.{n}"), n + 1
        os.rename(os.path.join(own, str(s)), dst)
    log.warning("Resuming from step %d: moved the newer checkpoints %s to %s.", resume_from[1], newer, aside)


def _restore_state(manager, abstract: TrainState, step: int, config) -> TrainState:
    """The train state of checkpoint ``step``; a checkpoint of another model or optimizer is
    rejected naming the config keys that differ."""
    try:
        return checkpointing.restore(manager, abstract, step)[0]
    except ValueError as e:
        changes = _config_changes(checkpointing.read_meta(manager, step).get("config"), config.to_dict())
        if not changes:
            raise
        raise ValueError(f"This config does not fit checkpoint {step} in {manager.directory} (nothing was "
                         f"changed): it differs from the checkpoint's config in {changes}. Resume with the "
                         f"checkpoint's settings, use a fresh --workdir, or start a new run from its weights "
                         f"with --load_weights={manager.directory}.") from e


def _load_weights(state: TrainState, path: str, mesh) -> TrainState:
    """Non-strict weights-only start (``--load_weights``) from a cfm-jax run, checkpoints or step
    folder, or an original fm-boosting Lightning checkpoint file, as the original's
    ``--load_weights`` (``load_state_dict(strict=False)`` of the whole module): the online weights
    go to ``params``, the EMA weights to ``ema_params``, and the EMA continues the checkpoint's
    update counter (no new warm-up copy when it was past ``ema.update_after_step``). The
    optimizer and the step count start afresh."""
    host_params = jax.device_get(state.params)
    if os.path.isfile(path):
        online, ema, ema_step = load_fmboost(path, host_params)
    else:
        online, ema, ema_step = checkpointing.read_weights(path)
    params, loaded, missing, mismatched = checkpointing.merge_weights(host_params, online)
    if not loaded:
        raise ValueError(f"--load_weights={path}: no parameter of the checkpoint matches this model "
                         f"(missing {len(missing)}, wrong shape {len(mismatched)}).")
    ema_params, _, _, _ = checkpointing.merge_weights(params, ema)  # leaves it lacks: the loaded/init ones
    log.warning("--load_weights: loaded %d tensors, %d missing (kept at init), %d with another shape "
                "(kept at init)%s The EMA continues at update counter %d.", len(loaded), len(missing),
                len(mismatched), (": " + "; ".join(mismatched[:5]) + ".") if mismatched else ".", ema_step)
    shardings = jax.tree.map(lambda a: a.sharding, state.params)
    return state.replace(params=jax.device_put(params, shardings), ema_params=jax.device_put(ema_params, shardings),
                         ema_step=jax.device_put(jnp.asarray(ema_step, jnp.int32), state.ema_step.sharding))


__all__ = ["OutOfSpace", "TrainState", "TrainingDiverged", "check_train_settings", "create_train_state",
           "make_train_step", "make_validator", "out_of_space_reason", "split_microbatches", "train",
           "validation_metrics"]
