"""End-to-end training on a tiny model: loss goes down, resume is exact, no retrace, NaN stops,
gradient accumulation, weights-only start, config typos, incompatible resumes and reruns (eval.py:
tests/test_eval.py; full disks, bad settings, exit codes: tests/test_train_failures.py). (Several devices and
processes: tests/test_multihost.py.)"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from cfm_jax import checkpointing, sharding
from cfm_jax.data import photos
from cfm_jax.ema import EMAConfig, ema_decay
from cfm_jax.trainer import TrainingDiverged, create_train_state, make_train_step, train
from cfm_jax.model import CFMUpsampler
from configs.quickstart import get_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train_kw):
    c = get_config()
    c.model.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                   num_heads=1, dim_head=32)
    # crops drawn on the fly (fast, nothing to prepare); records: tests/test_train_records.py
    c.data.update(name="photos", prepare_photos=False, image_size=16, lowres_size=8, batch_size=4,
                  num_val_images=4)
    # the original's training math and sampler, whatever the quick start tunes (t_exponent, b2,
    # border padding, the EMA's mean, the dihedral average, channelwise sampling)
    c.flow.update(t_exponent=1.0)
    c.optim.update(lr=2e-3, b2=0.999, warmup_steps=2, schedule="constant", grad_clip_norm=1.0)
    c.ema.update(update_after_step=2, power=0.75)
    c.sample.update(method="euler", num_steps=3, border_pad=0, dihedral_average=1, channelwise=False)
    c.train.update(num_steps=6, border_pad=0, log_every=1, eval_every=0, checkpoint_every=3, keep_checkpoints=5,
                   num_grid_images=2)
    c.logging.update(progress_bar=False, tensorboard=False)
    c.train.update(**train_kw)
    return c


def read_state(workdir, step):
    path = os.path.join(checkpointing.checkpoint_dir(workdir), str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        return jax.tree.map(np.asarray, ckptr.restore(path))


def losses(workdir, key="train/loss"):
    import csv
    with open(os.path.join(workdir, "metrics.csv")) as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("straight"))
    summary = train(tiny_config(eval_every=6), workdir)
    return workdir, summary


def test_run_writes_outputs_and_never_retraces(straight_run):
    workdir, summary = straight_run
    assert summary["final_step"] == 6
    assert summary["num_traces"] == 1  # the jitted step compiled once for 6 steps
    for name in ("config.json", "metrics.csv", "train_summary.json", "samples/val_0000006.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert checkpointing.make_manager(workdir, read_only=True).all_steps() == [3, 6]
    val = summary["validation"]
    for k in ("val/cfm_psnr", "val/cfm_ssim", "val/bicubic_psnr", "val/bicubic_ssim"):
        assert np.isfinite(val[k])
    assert val["val/nfe"] == 2  # euler on 3 grid points


def test_resume_continues_with_identical_state(straight_run, tmp_path):
    workdir_a, _ = straight_run
    workdir_b = str(tmp_path / "resumed")
    first = train(tiny_config(num_steps=3), workdir_b)
    assert first["final_step"] == 3
    second = train(tiny_config(num_steps=6), workdir_b)
    assert second["start_step"] == 3 and second["final_step"] == 6
    a, b = read_state(workdir_a, 6), read_state(workdir_b, 6)
    jax.tree.map(np.testing.assert_array_equal, a, b)  # params, opt state, EMA, step, rng
    assert int(b["step"]) == 6
    np.testing.assert_array_equal(losses(workdir_a), losses(workdir_b))


def test_loss_decreases(tmp_path):
    summary = train(tiny_config(num_steps=40, checkpoint_every=40), str(tmp_path))
    trace = losses(str(tmp_path))
    assert len(trace) == 40 and summary["num_traces"] == 1
    assert np.mean(trace[-8:]) < 0.6 * np.mean(trace[:8]), trace


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = photos.PhotoCrops.batch_at

    def poisoned(self, step):
        batch = real(self, step)
        if self.split == "train" and step == 4:
            batch = {k: np.full_like(v, np.nan) for k, v in batch.items()}
        return batch

    monkeypatch.setattr(photos.PhotoCrops, "batch_at", poisoned)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 5.*newest good checkpoint is step 3"):
        train(tiny_config(num_steps=6), str(tmp_path))
    assert checkpointing.make_manager(str(tmp_path), read_only=True).all_steps() == [3]


def check_gradient_accumulation(mesh, batch_size: int = 4, fsdp_min_size: int | None = None):
    """One SGD(1) step with 2 accumulated micro-batches equals minus the mean of the two
    micro-batch gradients computed one by one (on ``mesh``, the state sharded by its rules)."""
    from cfm_jax.trainer import train_state_shardings
    config = tiny_config()
    up = CFMUpsampler(config)
    tx = optax.sgd(1.0)  # update = -grad, so the parameter change exposes the gradient
    state = create_train_state(up, tx, jax.random.PRNGKey(0), 16, mesh, fsdp_min_size)
    params0 = jax.device_get(state.params)
    rng0 = jax.device_get(state.rng)
    batch = photos.PhotoCrops("train", 16, 8, batch_size, seed=0).batch_at(0)
    step = make_train_step(up, tx, lambda s: 1.0, EMAConfig(), mesh, grad_accum_steps=2,
                           state_sharding=train_state_shardings(up, tx, 16, mesh, fsdp_min_size))
    with jax.set_mesh(mesh):
        new_state, metrics = step(state, sharding.shard_batch(batch, mesh))
    got = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), params0, jax.device_get(new_state.params))

    rng = jax.random.fold_in(rng0, 0)
    grads, loss_sum = [], 0.0
    # jitted once (eagerly, every primitive of the UNet's forward and backward compiles on its own)
    micro = jax.jit(jax.value_and_grad(lambda p, mb, key: jnp.mean(up.loss(p, mb, key))))
    for i in range(2):  # micro-batch i holds examples i, i + 2, ...
        mb = {k: v[i::2] for k, v in batch.items()}
        loss, g = micro(params0, mb, jax.random.fold_in(rng, i))
        grads.append(g)
        loss_sum += float(loss)
    expected = jax.tree.map(lambda a, b: -(a + b) / 2, *grads)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7), got, expected)
    assert float(metrics["loss"]) == pytest.approx(loss_sum / 2, rel=1e-5)


def test_load_weights_takes_online_ema_and_the_ema_counter(straight_run, tmp_path):
    """As the original's --load_weights: online -> params, EMA -> EMA, the EMA's counter continues
    (here 6 > update_after_step=2: a decayed update, no warm-up copy); step and optimizer restart."""
    workdir_a, _ = straight_run
    online_a = checkpointing.read_params(workdir_a, use_ema=False)
    ema_a = checkpointing.read_params(workdir_a, use_ema=True)
    workdir_c = str(tmp_path / "finetune")
    c = tiny_config(num_steps=1, checkpoint_every=1)
    c.optim.lr = 0.0  # the params stay the loaded online ones exactly
    train(c, workdir_c, load_weights=workdir_a)
    state = read_state(workdir_c, 1)
    assert int(state["step"]) == 1 and int(state["ema_step"]) == 7
    jax.tree.map(np.testing.assert_array_equal, state["params"], online_a)
    decay = float(ema_decay(6, EMAConfig.from_config(c.ema)))
    assert 0.0 < decay < 1.0
    expected = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema_a, online_a)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), state["ema_params"], expected)


def test_resume_from_an_explicit_step_or_path(straight_run, tmp_path):
    import shutil
    workdir_a, _ = straight_run
    final_a = read_state(workdir_a, 6)
    # another run's step folder into a fresh work directory (the original's --resume_checkpoint=PATH)
    fresh = str(tmp_path / "from_path")
    out = train(tiny_config(num_steps=6), fresh, resume=os.path.join(workdir_a, "checkpoints", "3"))
    assert out["start_step"] == 3 and out["final_step"] == 6
    jax.tree.map(np.testing.assert_array_equal, read_state(fresh, 6), final_a)
    # a step of this run: the newer checkpoint is moved aside, kept, and the run redone from 3
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir_a, copy)
    out = train(tiny_config(num_steps=6), copy, resume="3")
    assert out["start_step"] == 3 and out["final_step"] == 6
    assert os.path.isdir(os.path.join(copy, "superseded_checkpoints", "6", "state"))
    jax.tree.map(np.testing.assert_array_equal, read_state(copy, 6), final_a)
    # errors, before anything is written
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint of step 4 .*available: \[3, 6\]"):
        train(tiny_config(num_steps=6), copy, resume="4")
    with pytest.raises(ValueError, match="another run's checkpoint"):
        train(tiny_config(num_steps=6), copy, resume=workdir_a)
    with pytest.raises(ValueError, match="exclude each other"):
        train(tiny_config(num_steps=6), copy, resume="3", load_weights=workdir_a)


def tree_snapshot(root):
    """Every file and folder under ``root`` with its size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns)
    return out


def test_an_incompatible_config_is_rejected_with_the_work_directory_untouched(straight_run, tmp_path):
    """Resuming with another model: the error names what differs from the checkpoint's config, and
    nothing in the work directory changed (config.json still describes the checkpoints)."""
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(straight_run[0], copy)
    before = tree_snapshot(copy)
    c = tiny_config(eval_every=6)
    c.model.model_channels = 64
    with pytest.raises(ValueError, match=r"does not fit checkpoint 6 .*model\.model_channels: 32 -> 64"):
        train(c, copy)
    assert tree_snapshot(copy) == before
    with open(os.path.join(copy, "config.json")) as f:
        assert json.load(f)["model"]["model_channels"] == 32


def test_rerunning_a_finished_run_keeps_its_summary(straight_run, tmp_path):
    import shutil
    copy = str(tmp_path / "copy")
    shutil.copytree(straight_run[0], copy)
    with open(os.path.join(copy, "train_summary.json")) as f:
        written = f.read()
    again = train(tiny_config(eval_every=6), copy)
    with open(os.path.join(copy, "train_summary.json")) as f:
        assert f.read() == written  # metrics and validation kept, not {start_step: 6, final_step: 6}
    assert again["start_step"] == again["final_step"] == 6 and again["num_traces"] == 0
    assert again["validation"] == json.loads(written)["validation"]
    assert losses(copy) == losses(straight_run[0])


def test_stop_signals_include_slurms_sigusr1():
    import signal
    from cfm_jax.trainer import _StopSignal
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        with _StopSignal() as stop:
            os.kill(os.getpid(), sig)
            assert stop.received == sig.name


def run_cli(args, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_unknown_sampler_is_rejected_before_anything_is_written(tmp_path):
    c = tiny_config()
    c.sample.method = "eulr"
    with pytest.raises(ValueError, match="Unknown sampler method 'eulr'"):
        train(c, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_config_typo_is_rejected(tmp_path):
    """As the README promises: one line, exit 2, nothing written (other user errors of train.py:
    tests/test_train_failures.py::test_train_py_user_errors_are_one_line)."""
    proc = run_cli(["train.py", "--config.optim.lrr=1e-4", "--workdir", str(tmp_path / "run")])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == ("error: 'lrr' not found in config.optim (--config.optim.lrr=1e-4); "
                                   'did you mean "lr" instead of "lrr"?')
    assert not os.path.exists(tmp_path / "run")


def test_sigusr1_saves_a_resumable_checkpoint(tmp_path):
    """SIGUSR1 (SLURM's --signal=USR1, as the original uses; SIGTERM takes the same path, see
    test_stop_signals_include_slurms_sigusr1) to train.py mid-training: a checkpoint at the step
    boundary, exit code 75 (EX_TEMPFAIL: not finished, run again) with a one-line message, then
    resume to the end."""
    import re
    import signal
    import time
    workdir = str(tmp_path / "run")
    config = tmp_path / "tiny_config.py"
    config.write_text("from tests.test_trainer import tiny_config\n\n\ndef get_config():\n"
                      "    return tiny_config(num_steps=100000, checkpoint_every=100000)\n")
    proc = subprocess.Popen([sys.executable, "train.py", "--config", str(config), "--workdir", workdir], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    csv_path = os.path.join(workdir, "metrics.csv")
    deadline = time.time() + 240
    while time.time() < deadline and len(losses(workdir) if os.path.exists(csv_path) else []) < 3:
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "Training finished" not in out
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"stopped at step (\d+) of 100000 \(SIGUSR1\); run the same command to resume", last)
    assert match, err[-3000:]
    final = int(match.group(1))
    with open(os.path.join(workdir, "train_summary.json")) as f:
        summary = json.load(f)
    assert summary["stopped_by"] == "SIGUSR1" and summary["final_step"] == final >= 3
    steps = checkpointing.make_manager(workdir, read_only=True).all_steps()
    assert steps == [final]
    resumed = train(tiny_config(num_steps=final + 2), workdir)
    assert resumed["start_step"] == final and resumed["final_step"] == final + 2
    assert "stopped_by" not in resumed
