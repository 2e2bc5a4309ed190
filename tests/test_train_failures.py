"""How training fails, and what it leaves: a full disk is one line naming the newest complete
checkpoint (exit 74) and loses nothing; a resumed run logs each step once (metrics.csv, and a
TensorBoard purge marker); settings the loop cannot use and unusable work directories are
rejected before anything is compiled or written; train.py's user errors are one line, exit 2.
(Signals and exit code 75, config typos, incompatible resumes, reruns: tests/test_trainer.py.)"""
import csv
import errno
import importlib
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from cfm_jax import checkpointing
from cfm_jax.trainer import OutOfSpace, out_of_space_reason, train
from tests.test_trainer import ROOT, read_state, tiny_config

FULL_DISK_RUN = r"""
import errno, os, runpy, sys
sys.path.insert(0, {root!r})
import orbax.checkpoint as ocp
real = ocp.JsonCheckpointHandler.async_save

def full_disk(self, directory, item=None, args=None):
    meta = args.item if args is not None else item
    if meta.get("step") == 6:  # checkpoint 6: the disk is full (its train state is being written too)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
    return real(self, directory, item=item, args=args)

ocp.JsonCheckpointHandler.async_save = full_disk
sys.argv = ["train.py", "--config", {config!r}, "--workdir", {workdir!r}]
runpy.run_path(os.path.join({root!r}, "train.py"), run_name="__main__")
"""

TINY_CONFIG_FILE = """from tests.test_trainer import tiny_config


def get_config():
    c = tiny_config(num_steps=6, checkpoint_every=3)
    c.logging.tensorboard = True
    return c
"""


@pytest.fixture(scope="module")
def full_disk_run(tmp_path_factory):
    """train.py for 6 steps (checkpoint every 3, metrics every step, TensorBoard on) on a disk that
    is full when checkpoint 6 is written: ``(workdir, process)``."""
    root = tmp_path_factory.mktemp("full_disk")
    config, workdir = root / "tiny_config.py", str(root / "run")
    config.write_text(TINY_CONFIG_FILE)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_RUN.format(root=ROOT, config=str(config),
                                                                      workdir=workdir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    return workdir, proc


def test_a_full_disk_is_one_line_naming_the_newest_checkpoint(full_disk_run):
    workdir, proc = full_disk_run
    assert proc.returncode == 74, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) <= 5, proc.stderr[-3000:]  # two INFO lines (mesh, compile time), a blank, the error
    ckpts = checkpointing.checkpoint_dir(workdir)
    assert lines[-1] == (f"error: no space left on device writing checkpoint 6 to {ckpts}; the newest complete "
                         "checkpoint is step 3 (resume with the same command once space is free).")
    assert checkpointing.complete_steps(ckpts) == [3]
    assert int(read_state(workdir, 3)["step"]) == 3


def read_events(path):
    """The events of a TensorBoard event file (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto.event_pb2 import Event
    events = []
    with open(path, "rb") as f:
        while header := f.read(8):
            (length,) = struct.unpack("Q", header)
            f.read(4)
            events.append(Event.FromString(f.read(length)))
            f.read(4)
    return events


def test_a_resumed_run_logs_each_step_once(full_disk_run, tmp_path):
    """The full-disk run logged steps 1-6 but saved only checkpoint 3: resuming drops the CSV rows
    of steps 4-6 before logging them again, and TensorBoard gets a new event file that starts with
    a purge marker at step 4 (SessionLog.START: TensorBoard discards the older files' steps >= 4)."""
    from tensorboardX.proto.event_pb2 import SessionLog
    workdir = str(tmp_path / "run")
    shutil.copytree(full_disk_run[0], workdir)
    with open(os.path.join(workdir, "metrics.csv")) as f:
        before = {int(r["step"]): r for r in csv.DictReader(f)}
    assert sorted(before) == [1, 2, 3, 4, 5, 6]
    old_events = os.listdir(os.path.join(workdir, "tensorboard"))
    config = tiny_config(num_steps=6, checkpoint_every=3)
    config.logging.tensorboard = True
    summary = train(config, workdir)
    assert summary["start_step"] == 3 and summary["final_step"] == 6
    with open(os.path.join(workdir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    # the same steps again (resume is exact): the rows of the first attempt, recomputed
    np.testing.assert_allclose([float(r["train/loss"]) for r in rows],
                               [float(before[s]["train/loss"]) for s in range(1, 7)], rtol=1e-6)
    new = [n for n in os.listdir(os.path.join(workdir, "tensorboard")) if n not in old_events]
    assert len(new) == 1, new
    events = read_events(os.path.join(workdir, "tensorboard", new[0]))
    marker = [e for e in events if e.HasField("session_log")]
    assert len(marker) == 1 and marker[0].session_log.status == SessionLog.START and marker[0].step == 4
    steps = sorted({e.step for e in events if e.HasField("summary")})
    assert steps == [4, 5, 6]
    assert checkpointing.complete_steps(checkpointing.checkpoint_dir(workdir)) == [3, 6]


def test_out_of_space_is_recognised_in_all_its_forms():
    assert out_of_space_reason(OSError(errno.ENOSPC, "No space left on device")) == "no space left on device"
    assert out_of_space_reason(OSError(errno.EDQUOT, "Disk quota exceeded")) == "disk quota exceeded"
    # TensorStore (orbax's array writes): a ValueError carrying the OS message
    tensorstore = ValueError("RESOURCE_EXHAUSTED: Error writing \"params.x/0\" in OCDBT database: Failed to write "
                             "5824512 bytes to file 23: No space left on device [os_error_code='28']")
    assert out_of_space_reason(tensorstore) == "no space left on device"
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert out_of_space_reason(outer) == "no space left on device"
    assert out_of_space_reason(ValueError("shape mismatch")) is None
    assert out_of_space_reason(OSError(errno.EACCES, "Permission denied")) is None
    assert issubclass(OutOfSpace, RuntimeError)


@pytest.mark.parametrize("key, value", [("log_every", 0), ("checkpoint_every", 0), ("log_every", -5),
                                        ("checkpoint_every", -1), ("num_steps", 0), ("eval_every", -1)])
def test_settings_the_loop_cannot_use_are_rejected_before_anything_is_written(tmp_path, key, value):
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"train\.{key}={value}: must be"):
        train(tiny_config(**{key: value}), str(workdir))
    assert not workdir.exists()


def test_eval_every_zero_still_means_no_validation():
    from cfm_jax.trainer import check_train_settings, make_validator
    config = tiny_config(eval_every=0)
    check_train_settings(config.train)
    assert make_validator(config, None, object(), None) is None


def test_an_unusable_work_directory_is_rejected_before_anything_is_written(tmp_path, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        train(tiny_config(), str(a_file))
    with pytest.raises(ValueError, match=r"is a file, not a directory \(.*notes\.txt is a file\)"):
        train(tiny_config(), str(a_file / "run"))
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # (chmod would not do: the tests may run as root, whom permissions do not stop)
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    with pytest.raises(ValueError, match="no permission to write"):
        train(tiny_config(), str(locked / "run"))
    assert os.listdir(locked) == [] and a_file.read_text() == ""


@pytest.fixture(scope="module")
def train_cli():
    """train.py as a module (its flags are defined on absl's global FLAGS, which nothing else in
    the tests uses)."""
    return importlib.import_module("train")


def test_train_py_user_errors_are_one_line(train_cli, tmp_path, capsys):
    """Each user error becomes one ``error:`` line (exit 2); an unexpected error keeps its
    traceback (``user_error`` gives ``None``). The config key typo is run as a user does in
    tests/test_trainer.py::test_config_typo_is_rejected."""
    from absl import flags
    from ml_collections import config_dict
    user_error = train_cli.user_error

    # a config key typo, as ml_collections raises it while parsing --config.optim.lrr=1
    config = config_dict.ConfigDict({"optim": {"lr": 1.0}})
    try:
        config.optim.lrr  # noqa: B018
    except AttributeError as e:
        typo = e
    assert user_error(typo, ["train.py", "--config.optim.lrr=1"]) == (
        "'lrr' not found in config.optim (--config.optim.lrr=1); did you mean \"lr\" instead of \"lrr\"?")
    assert user_error(typo, ["train.py"]) is None  # not from an override: a bug, keep the traceback
    assert user_error(flags.UnrecognizedFlagError("workdirr")) == "Unknown command line flag 'workdirr'"
    missing = OSError("Failed loading config file config_config\n  Attempted [Relative path]:\n    configs/nope.py\n"
                      "      [Errno 2] No such file or directory: 'configs/nope.py'")
    assert user_error(missing) == ("cannot load the config file: [Errno 2] No such file or directory: "
                                   "'configs/nope.py'")
    assert user_error(PermissionError(errno.EACCES, "Permission denied", "/runs/x")) == \
        "Permission denied: /runs/x"
    assert user_error(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run")) == \
        "Read-only file system: /mnt/ro/run"
    assert user_error(ValueError("train.log_every=0: must be a positive number of steps.")) == \
        "train.log_every=0: must be a positive number of steps."
    for unexpected in (RuntimeError("boom"), TypeError("bad operand"), ZeroDivisionError("division by zero"),
                       OutOfSpace("no space left on device writing ...")):
        assert user_error(unexpected) is None

    # the parser (before any JAX import): a missing config file, a typo of a flag name
    for argv, expected in ((["train.py", "--config", str(tmp_path / "nope.py")],
                            f"error: cannot load the config file: [Errno 2] No such file or directory: "
                            f"'{tmp_path / 'nope.py'}'"),
                           (["train.py", "--config", os.path.join(ROOT, "configs", "quickstart.py"), "--workdirr=x"],
                            "error: Unknown command line flag 'workdirr'. Did you mean: workdir ?")):
        flags.FLAGS.unparse_flags()
        with pytest.raises(SystemExit) as info:
            train_cli._parse_flags(argv)
        assert info.value.code == 2
        assert capsys.readouterr().err.strip() == expected
    flags.FLAGS.unparse_flags()
