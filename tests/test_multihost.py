"""Multi-host training on one machine: 2 processes x 2 CPU devices (jax.distributed, gloo
collectives) against 1 process x 4 devices, training and offline evaluation; checkpoints across
process counts; a peer that never arrives ends the run with a clear error instead of a hang."""
import csv
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from cfm_jax import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = r"""
import json, sys
sys.path.insert(0, {root!r})
from cfm_jax import distributed
if {nproc} > 1:
    distributed.initialize("on", coordinator_address="127.0.0.1:{port}", num_processes={nproc},
                           process_id={pid}, timeout_s=120)
import jax
from tests.test_trainer import tiny_config
from cfm_jax.trainer import train
assert jax.device_count() == {ndev} and jax.process_count() == {nproc}, (jax.devices(), jax.process_count())
c = tiny_config(num_steps={steps}, checkpoint_every=3)
c.optim.eps = 1e-3  # smooth Adam updates: parameters comparable across reduction orders
c.mesh.update(data=-1, fsdp=2, fsdp_min_size=256)
s = train(c, {workdir!r})
scores = None
if {evaluate}:  # offline evaluation over every device of every process, SDE noise per example
    from cfm_jax import checkpointing, evaluation, sharding
    from cfm_jax.data.train_data import make_data
    from cfm_jax.solvers import SolverSpec
    from cfm_jax.model import CFMUpsampler
    ups, mesh = CFMUpsampler(c), sharding.make_data_mesh()
    _, val_set = make_data(c, ups.first_stage, n_devices=mesh.devices.size, train=False)
    ev = evaluation.Evaluator(ups, val_set, mesh, seed=3)
    (r,), _ = ev.run(checkpointing.read_params({workdir!r}, step=3), [SolverSpec(method="sde_euler", num_steps=3)],
                     baselines=False)
    scores = [r.psnr, r.ssim, r.mse, r.nfe, ev.num_images]
print("SUMMARY", json.dumps({{"final": s["final_step"], "start": s["start_step"], "pid": jax.process_index(),
                             "eval": scores}}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(workdir: str, nproc: int, steps: int = 3, timeout: int = 420, ndev: int = 4, evaluate: bool = False):
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={ndev // nproc}"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER.format(root=ROOT, nproc=nproc, port=port, pid=i,
                                                                   steps=steps, workdir=workdir, ndev=ndev,
                                                                   evaluate=evaluate)],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(nproc)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-4000:]
            outs.append(json.loads(out.split("SUMMARY", 1)[1]))
    finally:
        for p in procs:
            p.kill()
    return outs


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.csv")) as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_two_processes_match_one_process_and_checkpoints_move_between_them(tmp_path):
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    outs = _run(two, nproc=2, evaluate=True)
    assert sorted(o["pid"] for o in outs) == [0, 1] and all(o["final"] == 3 for o in outs)
    # the reference: 1 process on 4 devices, 4 steps (checkpoints at 3 and 4); compared at step 3,
    # and its step 4 with the 2-process checkpoint's step 4 taken in another layout (below)
    ones = _run(one, nproc=1, steps=4, evaluate=True)
    # offline evaluation: both processes see the gathered scores of all 4 images, equal to 1 process's
    assert outs[0]["eval"][3:] == outs[1]["eval"][3:] == ones[0]["eval"][3:] == [3, 4]  # 2 SDE steps + the Mean last step
    np.testing.assert_allclose(outs[0]["eval"], outs[1]["eval"], rtol=1e-6)
    np.testing.assert_allclose(outs[0]["eval"], ones[0]["eval"], rtol=1e-5)
    # metrics.csv is written by process 0 only, once per step
    assert len(_losses(two)) == 3 and len(_losses(one)) == 4
    np.testing.assert_allclose(_losses(two), _losses(one)[:3], rtol=1e-5)
    p2, p1 = (checkpointing.read_params(d, use_ema=False, step=3) for d in (two, one))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p2, p1)

    # the 2-process checkpoint resumes in a single process on another device count (4 -> 2
    # devices: the FSDP shards are resharded by orbax) and takes the step the 1-process run on 4
    # devices took after its own step 3
    resumed = _run(two, nproc=1, steps=4, ndev=2)
    assert resumed[0]["start"] == 3 and resumed[0]["final"] == 4
    np.testing.assert_allclose(_losses(two)[-1], _losses(one)[3], rtol=1e-5)


BARRIER = r"""
import sys, time
sys.path.insert(0, {root!r})
from cfm_jax import distributed
distributed.initialize("on", coordinator_address="127.0.0.1:{port}", num_processes=2, process_id={pid},
                       timeout_s=60)
if {pid} == 0:
    try:
        distributed.barrier("test.barrier", timeout_s=3)
    except distributed.PeerTimeout as e:
        print("TIMEOUT", e)
        sys.exit(3)
else:
    time.sleep(8)  # stalls: never reaches the barrier in time
"""


def test_a_stalled_peer_ends_the_wait_with_a_clear_error():
    port = _free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER.format(root=ROOT, port=port, pid=i)], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        out0, err0 = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode == 3, err0[-3000:]
    assert "barrier 'test.barrier'" in out0 and "a peer stalled or failed" in out0


def test_one_host_or_one_task_is_not_a_cluster(monkeypatch):
    """`--distributed=auto` joins a coordination service only for jobs of several processes: the
    planner's TPU_WORKER_HOSTNAMES=localhost (left in the environment of a test process and inherited
    by every train.py it starts) once made single-process runs wait for a coordinator."""
    from cfm_jax import distributed
    assert not distributed.in_multiprocess_cluster({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert not distributed.in_multiprocess_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"})
    assert not distributed.in_multiprocess_cluster({"OMPI_COMM_WORLD_SIZE": "1"})
    assert distributed.in_multiprocess_cluster({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"})
    assert distributed.in_multiprocess_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    assert distributed.in_multiprocess_cluster({"OMPI_COMM_WORLD_SIZE": "2"})
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert distributed.initialize("auto") is False  # one process, no coordinator asked for
