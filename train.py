"""Trains a Coupling Flow Matching upsampler.

    python train.py --config configs/quickstart.py --workdir runs/quickstart
    python train.py --config configs/quickstart.py --config.optim.lr=3e-4 --workdir runs/lr3e-4

Any config leaf can be overridden with ``--config.section.key=value``; unknown keys
are rejected. Re-running with the same ``--workdir`` resumes from its newest
checkpoint, or from ``--resume_checkpoint=STEP|PATH``; ``--load_weights=PATH`` starts a new run from
another run's (or an original fm-boosting ``.ckpt``'s) weights. SIGTERM, SIGINT and SIGUSR1 (SLURM's
``--signal=USR1@90``) save a checkpoint at the next step boundary and stop.

Exit codes (for schedulers and requeue scripts):
  0   the run finished (``train.num_steps`` reached; also a rerun with nothing left to do)
  1   the loss became NaN/inf (``TrainingDiverged``), or an unexpected error (with its traceback)
  2   a user error, one line ``error: ...``: config key typo, bad value, missing config file or
      checkpoint, unusable work directory (all found before anything is written)
  74  (EX_IOERR) the disk or quota is full: one line naming what could not be written, where, and
      the newest complete checkpoint; run the same command once space is free
  75  (EX_TEMPFAIL) stopped early by SIGTERM/SIGINT/SIGUSR1 or a TPU preemption notice after saving a
      checkpoint: run the same command to resume
"""
import errno
import logging
import os
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from cfm_jax import cli, distributed
from cfm_jax.trainer import OutOfSpace, TrainingDiverged, train

EXIT_DIVERGED, EXIT_OUT_OF_SPACE, EXIT_STOPPED = 1, 74, 75  # a user error: cli.EXIT_USAGE (2)
DEFAULT_CONFIG = "configs/quickstart.py"

# No default here: ml_collections would load a default config while the flag is defined, at import,
# where an override typo cannot be reported as a usage error. _parse_flags supplies it.
_CONFIG = config_flags.DEFINE_config_file("config", None, f"Config file (ml_collections); default "
                                          f"{DEFAULT_CONFIG}.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs, samples). "
                               "Default: runs/<config file name>.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed: auto = for several SLURM/MPI tasks or TPU hosts, or with a coordinator "
                                 "address; on = always (launch_tpu.sh passes it on TPU VMs).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host outside "
                                   "TPU VMs; or JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (or JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (or JAX_PROCESS_ID).")
_DIST_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300, "Seconds to wait for all processes to join, "
                                     "and at barriers, before failing.")
_LOAD_WEIGHTS = flags.DEFINE_string("load_weights", None, "Start a new run from the weights of this checkpoint "
                                    "(a work directory, checkpoint folder or an original fm-boosting .ckpt), "
                                    "non-strictly: online weights, EMA weights and the EMA's counter; a fresh "
                                    "optimizer at step 0.")
_RESUME = flags.DEFINE_string("resume_checkpoint", None, "Resume from this checkpoint instead of the work "
                              "directory's newest: a step of --workdir (e.g. 20000) or a path (a step folder "
                              ".../checkpoints/<step>, or another run's work directory into a fresh --workdir). "
                              "Newer checkpoints of --workdir are moved to superseded_checkpoints/.")


def user_error(e: BaseException, argv: list[str] = ()) -> str | None:
    """The one-line message of an error the user can fix from the command line (exit 2), or
    ``None`` for an unexpected error, which keeps its traceback. ``argv``: the command line, to
    name the override a config key typo came from."""
    if isinstance(e, (TrainingDiverged, OutOfSpace)):
        return None
    if isinstance(e, flags.Error):  # unknown flag, bad value, --config.x before --config
        return cli.one_line(e)
    if isinstance(e, (KeyError, AttributeError)):  # a config key typo in --config.a.b=..., else a bug
        return cli.config_error(e, argv)
    message = cli.config_error(e)  # a config file that does not load
    if message is not None:
        return message
    if isinstance(e, (FileNotFoundError, ValueError, ImportError)):  # bad config, missing file or checkpoint
        return cli.one_line(e)
    if isinstance(e, (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)) or \
            (isinstance(e, OSError) and e.errno == errno.EROFS):  # an unusable --workdir
        return f"{e.strerror}: {e.filename}" if e.filename else cli.one_line(e)
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with one-line usage errors (exit 2) instead of a traceback."""
    if not any(a == "--config" or a.startswith("--config=") or a in ("-config",) or a.startswith("-config=")
               for a in argv[1:]):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a config file that failed to load raises on first use: here
        return rest
    except Exception as e:  # noqa: BLE001 -- sorted by user_error; the rest re-raised
        message = user_error(e, argv)
        if message is None:
            raise
        cli.fail(message)


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cli.skip_tpu_probe_without_accelerator()  # no libtpu probe noise on machines without one
    try:  # before anything touches a JAX backend
        distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               timeout_s=_DIST_TIMEOUT.value)
    except (RuntimeError, ValueError) as e:
        cli.fail(str(e))

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(
        "runs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
    try:
        summary = train(config, workdir, load_weights=_LOAD_WEIGHTS.value, resume=_RESUME.value)
    except TrainingDiverged as e:
        print(f"\nTraining stopped: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except OutOfSpace as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(EXIT_OUT_OF_SPACE)
    except Exception as e:  # noqa: BLE001 -- sorted by user_error; the rest re-raised
        message = user_error(e)
        if message is None:
            raise
        cli.fail(message)
    if summary.get("stopped_by"):  # every process: the scheduler reads any of them
        if jax.process_index() == 0:
            print(f"\nstopped at step {summary['final_step']} of {summary['num_steps']} "
                  f"({summary['stopped_by']}); run the same command to resume", file=sys.stderr)
        sys.exit(EXIT_STOPPED)
    if jax.process_index() != 0:  # the other processes' outputs are the same run
        return
    print(f"\nTraining finished at step {summary['final_step']}. Outputs in {summary['workdir']}:")
    print("  checkpoints/  metrics.csv  tensorboard/  samples/  config.json  train_summary.json")
    val = summary.get("validation")
    if val:
        print(f"  validation PSNR: CFM {val['val/cfm_psnr']:.2f} dB | bicubic {val['val/bicubic_psnr']:.2f} dB; "
              f"SSIM: CFM {val['val/cfm_ssim']:.4f} | bicubic {val['val/bicubic_ssim']:.4f}")


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
