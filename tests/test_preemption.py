"""A process killed hard (SIGKILL) in the middle of writing a checkpoint leaves the previous one
intact; the next start resumes from it and loses only the steps since then (here it recomputes
them and ends with exactly the state of an uninterrupted run)."""
import os
import subprocess
import sys

import jax
import numpy as np

from cfm_jax import checkpointing
from cfm_jax.trainer import train
from tests.test_trainer import ROOT, read_state, tiny_config

KILLED_RUN = r"""
import os, signal, sys
sys.path.insert(0, {root!r})
import orbax.checkpoint as ocp
real = ocp.JsonCheckpointHandler.async_save

def dying_save(self, directory, item=None, args=None):
    meta = args.item if args is not None else item
    if meta.get("step") == 4:  # the train state of step 4 is being written: die now
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, directory, item=item, args=args)

ocp.JsonCheckpointHandler.async_save = dying_save
from tests.test_trainer import tiny_config
from cfm_jax.trainer import train
train(tiny_config(num_steps=6, checkpoint_every=2), {workdir!r})
"""


def test_hard_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    workdir = str(tmp_path / "killed")
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN.format(root=ROOT, workdir=workdir)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert checkpointing.make_manager(workdir, read_only=True).all_steps() == [2]  # step 4 never completed
    leftovers = [d for d in os.listdir(checkpointing.checkpoint_dir(workdir)) if d not in ("2",)]
    assert leftovers and all("tmp" in d for d in leftovers), leftovers  # the half-written step 4
    resumed = train(tiny_config(num_steps=6, checkpoint_every=2), workdir)
    assert resumed["start_step"] == 2 and resumed["final_step"] == 6
    assert checkpointing.make_manager(workdir, read_only=True).all_steps() == [2, 4, 6]
    assert not [d for d in os.listdir(checkpointing.checkpoint_dir(workdir)) if "tmp" in d], leftovers

    straight = str(tmp_path / "straight")
    train(tiny_config(num_steps=6, checkpoint_every=6), straight)
    jax.tree.map(np.testing.assert_array_equal, read_state(straight, 6), read_state(workdir, 6))


def test_metric_files_mirror_to_and_from_a_work_directory(tmp_path):
    """The copy logic used for bucket work directories (etils.epath; exercised on local paths:
    there is no bucket here): push writes the local metric files, fetch restores them on a
    machine that lacks them, without overwriting local ones."""
    from etils import epath

    from cfm_jax.metric_writers import LogMirror

    assert LogMirror.local_dir("gs://bucket/runs/a").endswith(os.path.join("runs", "_logs", "bucket", "runs", "a"))
    local, remote = tmp_path / "local", epath.Path(tmp_path / "remote")
    (local / "tensorboard").mkdir(parents=True)
    (local / "metrics.csv").write_text("step,loss\n1,0.5\n")
    (local / "tensorboard" / "events.out").write_bytes(b"\x00\x01")
    LogMirror(remote, str(local)).push()
    assert (remote / "metrics.csv").read_text() == "step,loss\n1,0.5\n"
    assert (remote / "tensorboard" / "events.out").read_bytes() == b"\x00\x01"
    fresh = tmp_path / "fresh"
    LogMirror(remote, str(fresh)).fetch()
    assert (fresh / "metrics.csv").read_text() == "step,loss\n1,0.5\n"
    assert (fresh / "tensorboard" / "events.out").read_bytes() == b"\x00\x01"
    (fresh / "metrics.csv").write_text("newer\n")
    LogMirror(remote, str(fresh)).fetch()
    assert (fresh / "metrics.csv").read_text() == "newer\n"
