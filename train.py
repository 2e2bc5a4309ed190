"""Trains a Coupling Flow Matching upsampler.

    python train.py --config configs/quickstart.py --workdir runs/quickstart
    python train.py --config configs/quickstart.py --config.optim.lr=3e-4 --workdir runs/lr3e-4

Any config leaf can be overridden with ``--config.section.key=value``; unknown keys
are rejected. Re-running with the same ``--workdir`` resumes from its newest
checkpoint, or from ``--resume_checkpoint=STEP|PATH``; ``--load_weights=PATH`` starts a new run from
another run's (or an original fm-boosting ``.ckpt``'s) weights. SIGTERM, SIGINT and SIGUSR1 (SLURM's
``--signal=USR1@90``) save a checkpoint at the next step boundary and stop.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file (ml_collections).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (checkpoints, logs, samples). "
                               "Default: runs/<config file name>.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed: auto = on TPU VM slices / SLURM / with a coordinator address.")
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


def main(argv):
    del argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from cfm_jax import distributed
    try:  # before anything touches a JAX backend
        distributed.initialize(_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                               timeout_s=_DIST_TIMEOUT.value)
    except (RuntimeError, ValueError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)
    from cfm_jax.trainer import TrainingDiverged, train

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join(
        "runs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
    try:
        summary = train(config, workdir, load_weights=_LOAD_WEIGHTS.value, resume=_RESUME.value)
    except TrainingDiverged as e:
        print(f"\nTraining stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except (FileNotFoundError, ValueError, ImportError) as e:  # bad config, missing file or checkpoint
        print(f"\nerror: {e}", file=sys.stderr)
        sys.exit(2)
    import jax
    if jax.process_index() != 0:  # the other processes' outputs are the same run
        return
    print(f"\nTraining finished at step {summary['final_step']}. Outputs in {summary['workdir']}:")
    print("  checkpoints/  metrics.csv  tensorboard/  samples/  config.json  train_summary.json")
    val = summary.get("validation")
    if val:
        print(f"  validation PSNR: CFM {val['val/cfm_psnr']:.2f} dB | bicubic {val['val/bicubic_psnr']:.2f} dB; "
              f"SSIM: CFM {val['val/cfm_ssim']:.4f} | bicubic {val['val/bicubic_ssim']:.4f}")


if __name__ == "__main__":
    app.run(main)
