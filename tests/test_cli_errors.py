"""User errors of the command lines (eval.py, ``python -m cfm_jax.upsample``, ``.data.prepare``,
``.convert``) end in one line naming the problem and the fix, with exit code 2, while an
unexpected error keeps its traceback; a file that is not a PyTorch checkpoint is named as such;
JAX does not probe for a TPU on a machine without one. Most checks call ``main`` in-process;
one runs eval.py as a user does (without JAX_PLATFORMS)."""
import importlib
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from cfm_jax import cli, upsample
from cfm_jax.convert import __main__ as convert_cli
from cfm_jax.convert.fmboost_checkpoint import write_run_dir
from cfm_jax.convert.state_dict_io import load_state_dict
from cfm_jax.data import prepare, train_data
from cfm_jax.model import CFMUpsampler
from tests.random_weights import random_params
from tests.test_trainer import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
eval_cli = importlib.import_module("eval")  # eval.py (the name would shadow the builtin)


def one_error_line(capsys) -> str:
    """stderr of the call, which must be exactly one ``error: ...`` line."""
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def exits_with_usage_error(fn, *args) -> None:
    with pytest.raises(SystemExit) as info:
        fn(*args)
    assert info.value.code == 2


def random_weights(config):
    """Random weights of the config's model (no compilation: shapes from eval_shape)."""
    ups = CFMUpsampler(config)
    return random_params(jax.eval_shape(lambda k: ups.init(k, config.data.image_size), jax.random.PRNGKey(0)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory of a tiny pixel-space model (8² -> 16²), weights at initialisation."""
    c = tiny_config()
    return write_run_dir(str(tmp_path_factory.mktemp("run")), c, *[random_weights(c)] * 2, source="random (test)")


@pytest.fixture(scope="module")
def mismatched_run(run_dir, tmp_path_factory):
    """The same weights under a config.json of a wider model."""
    bad = str(tmp_path_factory.mktemp("mismatch") / "run")
    shutil.copytree(run_dir, bad)
    with open(os.path.join(bad, "config.json")) as f:
        cfg = json.load(f)
    cfg["model"]["model_channels"] = 64
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump(cfg, f)
    return bad


# --------------------------------------------------------------------------- eval.py
def test_eval_names_weights_that_do_not_fit_config_json_in_one_line(mismatched_run):
    """As a user runs it: without JAX_PLATFORMS, so also no TPU probe chatter on a CPU machine."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    proc = subprocess.run([sys.executable, "eval.py", "--workdir", mismatched_run], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip()
    assert "do not fit its config.json" in err and "ScopeParamShapeError" not in err, err
    if not cli.accelerator_hardware_present() and not cli.accelerator_plugins():
        assert err.startswith("error: ") and "\n" not in err, err  # no "Unable to initialize backend 'tpu'"


@pytest.mark.parametrize("flag, value", [("--num_images", "-5"), ("--num_images", "0"), ("--batch_size", "0"),
                                         ("--num_crops", "0")])
def test_eval_rejects_counts_below_one(run_dir, flag, value, capsys):
    exits_with_usage_error(eval_cli.main, ["eval.py", "--workdir", run_dir, flag, value])
    err = one_error_line(capsys)
    assert f"{flag}={value}" in err and ">= 1" in err, err


def test_eval_flag_errors_are_one_line(run_dir, capsys):
    exits_with_usage_error(eval_cli.main, ["eval.py", "--workdir", run_dir, "--num_imagess", "3"])
    assert "Did you mean: num_images" in one_error_line(capsys)
    exits_with_usage_error(eval_cli.main, ["eval.py", "--num_images", "3"])
    assert "--workdir is required" in one_error_line(capsys)


def test_eval_report_names_the_records_folder(tmp_path, monkeypatch, capsys):
    """The quick start's records live at a path derived from the config (data.path empty): the
    report names that folder (it once said "from records , split validation")."""
    monkeypatch.chdir(tmp_path)  # the derived path, runs/photo_records/v2-16x8, is relative
    c = tiny_config()
    c.data.update(name="records", path="", prepare_photos=True, num_val_images=2, batch_size=2)
    run = write_run_dir(str(tmp_path / "run"), c, *[random_weights(c)] * 2, source="random (test)")
    assert eval_cli.main(["eval.py", "--workdir", run, "--solvers", "euler:2", "--distributed", "off",
                          "--dihedral_average", "2", "--channelwise"]) == 0
    records = os.path.join(str(tmp_path), "runs", "photo_records", f"{train_data.PHOTO_RECORDS_VERSION}-16x8")
    with open(os.path.join(run, "eval", "report.md")) as f:
        assert f"from records {records}, split validation" in f.read()
    with open(os.path.join(run, "eval", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["data"] == f"records {records}, split validation"
    assert metrics["dihedral_average"] == 2  # --dihedral_average overrides the run's (1)
    assert metrics["channelwise"] is True  # --channelwise overrides the run's (False)
    assert "euler-2 | 6 |" in capsys.readouterr().out  # one Euler step: two symmetries of three channels
    exits_with_usage_error(eval_cli.main, ["eval.py", "--workdir", run, "--dihedral_average", "3"])
    assert "sample.dihedral_average=3; choose one of (1, 2, 4, 8)" in one_error_line(capsys)


# --------------------------------------------------------------------------- upsample
def test_upsample_option_errors_are_one_line(run_dir, tmp_path, capsys):
    photo = tmp_path / "in.npy"
    np.save(photo, np.zeros((3, 8, 8), np.float32))
    base = [upsample.PROG, "--checkpoint", run_dir, "--input", str(photo)]
    assert upsample.main([*base, "--out", str(tmp_path / "out"), "--solver", "bogus:3"]) == 2
    assert "--solver bogus:3: Unknown sampler method 'bogus'; choose one of" in one_error_line(capsys)
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"")
    assert upsample.main([*base, "--out", str(a_file)]) == 2
    assert f"--out '{a_file}' is a file" in one_error_line(capsys)
    exits_with_usage_error(upsample.main, [*base, "--out", str(tmp_path / "out"), "--batch_size", "0"])
    assert "--batch_size=0: it is the number of inputs per network call and must be >= 1" in one_error_line(capsys)
    exits_with_usage_error(upsample.main, [*base, "--out", str(tmp_path / "out"), "--no-latents_scaled"])
    assert "'no-latents_scaled'" in one_error_line(capsys)  # the negation is --nolatents_scaled
    exits_with_usage_error(upsample.main, [upsample.PROG, "--input", str(photo)])
    assert "--checkpoint (the run directory), --out (the output folder) are required" in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- prepare
@pytest.mark.parametrize("args, needle", [
    (["--src", "{tmp}/missing", "--image_size", "16", "--lowres_size", "8"], "is not a folder"),
    (["--src", "photos", "--image_size", "16", "--lowres_size", "32"], "lowres_size=32 must be in (0, image_size=16]"),
    (["--src", "photos", "--image_size", "16", "--lowres_size", "8", "--batch_size", "0"],
     "--batch_size=0: it is the number of crops per encoder call and must be >= 1"),
    (["--src", "photos", "--image_size", "16", "--lowres_size", "8", "--max_shards", "-1"],
     "--max_shards=-1: it is the number of shards to write in this run and must be >= 0"),
    (["--src", "photos", "--image_size", "sixteen", "--lowres_size", "8"],
     "--image_size=sixteen: invalid literal for int()"),
    (["--src", "photos", "--image_size", "16"], "--lowres_size (the low-res side) is required"),
    (["--src", "photos", "extra", "--image_size", "16", "--lowres_size", "8"],
     "unexpected arguments ['extra']: every option is a --flag; give several --src patterns"),
    (["--src", "photos", "--image_size", "16", "--lowres_size", "8", "--crop", "middle"],
     "flag --crop=middle: value should be one of <center|random>"),
    (["--src", "photos:bogus", "--image_size", "16", "--lowres_size", "8"], "unknown split 'bogus'"),
    (["--src", "photos", "--image_size", "16", "--lowres_size", "8", "--first_stage_path", "{tmp}/vae.ckpt"],
     "does not exist"),
])
def test_prepare_errors_are_one_line(args, needle, tmp_path, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    exits_with_usage_error(prepare.main, [prepare.PROG, *args, "--out", str(tmp_path / "out"), "--no_progress"])
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_prepare_out_must_be_a_folder(tmp_path, capsys):
    (tmp_path / "records").write_text("")
    exits_with_usage_error(prepare.main, [prepare.PROG, "--src", "photos", "--out", str(tmp_path / "records"),
                                          "--image_size", "16", "--lowres_size", "8"])
    assert "is a file" in one_error_line(capsys)


def test_every_option_has_help():
    from absl import flags

    for module in (prepare, upsample):
        fl = flags.FlagValues()
        module.define_flags(fl)
        assert len(list(fl)) > 15 and [name for name in fl if not fl[name].help] == [], module.PROG


@pytest.mark.parametrize("module, flag", [(prepare, "tar_base"), (upsample, "[no]latents_scaled")])
def test_help_lists_the_flags_and_points_to_the_docstring(module, flag, capsys):
    with pytest.raises(SystemExit) as info:
        module.main([module.PROG, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {module.PROG} --") and f"  --{flag}:" in out and "  --out:" in out
    assert f"python -c 'import {module.__name__} as" in out and "print(" in out  # the module docstring pointer


def test_unexpected_errors_keep_their_traceback(monkeypatch, tmp_path):
    def broken(*a, **k):
        raise RuntimeError("a bug")
    monkeypatch.setattr(prepare, "load_first_stage", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        prepare.main([prepare.PROG, "--src", "photos", "--out", str(tmp_path / "out"), "--image_size", "16",
                      "--lowres_size", "8"])


# --------------------------------------------------------------------------- convert
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (root / "page.ckpt").write_bytes(b"<!DOCTYPE html><html><body>Not Found</body></html>")
    torch.save({"state_dict": {"classifier.weight": torch.zeros(2, 2)}}, root / "other.ckpt")
    return root


@pytest.mark.parametrize("args, needle", [
    (["vae", "--src", "{f}/missing.ckpt"], "does not exist"),
    (["vae", "--src", "{f}/other.ckpt"], "contains no autoencoder weights"),
    (["fmboost", "--src", "{f}/other.ckpt", "--config", "configs/quickstart.py", "--config.model.norm=group"],
     "not an fm-boosting CFM checkpoint"),
    (["fmboost", "--src", "{f}/other.ckpt", "--config", "configs/quickstart.py"],
     "model.norm='none' is not the original's UNet, which an fm-boosting checkpoint was trained as: add "),
    (["inception", "--src", "{f}/other.ckpt"], "no FID Inception-v3 weights"),
    (["vae", "--src", "{f}/random.ckpt"], "is not a PyTorch checkpoint"),
    (["fmboost", "--src", "{f}/other.ckpt", "--config", "configs/missing.py"], "--config 'configs/missing.py' does not"),
    (["fmboost", "--src", "{f}/other.ckpt", "--config", "configs/quickstart.py", "--config.model.channels=3"],
     "--config has no key 'channels' (did you mean 'in_channels'?)"),
    (["vea", "--src", "{f}/other.ckpt"], "unknown command 'vea'; usage: python -m cfm_jax.convert {vae|fmboost|"),
    (["vae"], "--src (the file or folder to convert) and --out (the folder to write) are required"),
    (["vae", "--source", "x"], "Unknown command line flag 'source'"),
])
def test_convert_errors_are_one_line(args, needle, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = [a.replace("{f}", str(files)) for a in args]
    out = [] if args == ["vae"] else ["--out", str(tmp_path / "out")]
    exits_with_usage_error(convert_cli.main, ["convert", *args, *out])
    assert needle in one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_checkpoint_is_not_called_a_pickle(files, tmp_path):
    """Random bytes or a saved web page are not "a pickle holding Python objects"."""
    with pytest.raises(ValueError, match=r"is not a PyTorch checkpoint: torch.save writes a zip archive or a "
                                         r"pickle, and it starts with bytes") as info:
        load_state_dict(files / "random.ckpt")
    assert "Python objects" not in str(info.value)
    with pytest.raises(ValueError, match=r"it is text \(HTML"):
        load_state_dict(files / "page.ckpt")
    import argparse
    torch.save({"w": torch.zeros(2), "hparams": argparse.Namespace(a=1)}, tmp_path / "objects.ckpt")
    with pytest.raises(ValueError, match=r"holds Python objects other than tensors .*argparse.Namespace here"):
        load_state_dict(tmp_path / "objects.ckpt")
    data = (tmp_path / "objects.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])  # a zip archive, cut
    with pytest.raises(ValueError, match=r"truncated or corrupt"):
        load_state_dict(tmp_path / "cut.ckpt")


# --------------------------------------------------------------------------- the TPU probe
def test_the_tpu_probe_is_skipped_only_without_an_accelerator(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS")  # restored after the test
    monkeypatch.setattr(cli, "accelerator_plugins", lambda: [])
    monkeypatch.setattr(jax.config, "update", lambda *a, **k: None)  # JAX is imported: keep its config
    assert cli.skip_tpu_probe_without_accelerator(str(tmp_path)) and os.environ["JAX_PLATFORMS"] == "cpu"
    monkeypatch.delenv("JAX_PLATFORMS")
    (tmp_path / "sys/bus/pci/devices/0000:00:05.0").mkdir(parents=True)
    (tmp_path / "sys/bus/pci/devices/0000:00:05.0/vendor").write_text("0x1ae0\n")  # Google: maybe a TPU
    assert not cli.skip_tpu_probe_without_accelerator(str(tmp_path)) and "JAX_PLATFORMS" not in os.environ
    for device in ("dev/accel0", "dev/vfio/0", "dev/nvidia0"):
        root = tmp_path / device.replace("/", "_")
        (root / device).parent.mkdir(parents=True)
        (root / device).write_text("")
        assert not cli.skip_tpu_probe_without_accelerator(str(root)), device
    monkeypatch.setattr(cli, "accelerator_plugins", lambda: ["xla_cuda12"])
    assert not cli.skip_tpu_probe_without_accelerator(str(tmp_path / "empty"))
    monkeypatch.setenv("JAX_PLATFORMS", "")  # the user's choice, even empty, is kept
    monkeypatch.setattr(cli, "accelerator_plugins", lambda: [])
    assert not cli.skip_tpu_probe_without_accelerator(str(tmp_path / "empty")) and os.environ["JAX_PLATFORMS"] == ""
