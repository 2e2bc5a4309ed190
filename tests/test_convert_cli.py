"""Converters from the command line: original fm-boosting Lightning checkpoints and VAEs."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfm_jax import checkpointing
from cfm_jax.convert.fmboost_checkpoint import load_fmboost
from cfm_jax.ema import EMAConfig, ema_decay
from cfm_jax.first_stage import load_autoencoder
from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params
from cfm_jax.model import build_unet
from configs.quickstart import get_config
from tests.random_weights import random_params
from tests.torch_layouts import unet_params_to_torch, vae_params_to_ldm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cfm_jax.convert", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.fixture(scope="module")
def quickstart_unet():
    cfg = get_config().model
    cfg.norm = "group"  # the original's UNet (the quick start leaves out its GroupNorm)
    model = build_unet(cfg)
    target = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jax.ShapeDtypeStruct((1, 16, 16, model.in_channels), jnp.float32),
                            jax.ShapeDtypeStruct((1,), jnp.float32))["params"]
    return model, target, random_params(target, seed=1), random_params(target, seed=2)


def lightning_checkpoint(online, ema):
    sd = {f"model.net.{k}": torch.from_numpy(v) for k, v in unet_params_to_torch(online).items()}
    sd.update({f"ema_model.ema_model.net.{k}": torch.from_numpy(v) for k, v in unet_params_to_torch(ema).items()})
    sd.update({"ema_model.initted": torch.tensor(True), "ema_model.step": torch.tensor(1234),
               "first_stage.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)})
    return {"state_dict": sd, "global_step": 1234, "epoch": 3}


def test_fmboost_checkpoint_round_trip_and_outputs(quickstart_unet, tmp_path):
    model, target, online, ema = quickstart_unet
    ckpt = str(tmp_path / "last.ckpt")
    torch.save(lightning_checkpoint(online, ema), ckpt)
    out = str(tmp_path / "run")
    proc = run_cli("fmboost", "--src", ckpt, "--out", out, "--config", "configs/quickstart.py",
                   "--config.model.norm=group")  # the quick start's UNet, normalised as the original
    assert proc.returncode == 0, proc.stderr[-3000:]
    got_online, got_ema, ema_step = checkpointing.read_weights(out)
    assert ema_step == 1234  # the original's ema_model.step, kept for --load_weights
    jax.tree.map(np.testing.assert_array_equal, got_ema, ema)
    jax.tree.map(np.testing.assert_array_equal, got_online, online)
    # back to the original's naming and layout, exactly
    back = unet_params_to_torch(got_ema)
    orig = unet_params_to_torch(ema)
    assert back.keys() == orig.keys()
    for k in orig:
        np.testing.assert_array_equal(back[k], orig[k])
    # the converted weights compute what the same weights compute in our model
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
    t = jnp.array([0.1, 0.8])
    np.testing.assert_array_equal(model.apply({"params": got_ema}, x, t), model.apply({"params": ema}, x, t))
    assert os.path.exists(os.path.join(out, "config.json"))


def test_fmboost_checkpoint_errors(quickstart_unet):
    model, target, online, ema = quickstart_unet
    sd = lightning_checkpoint(online, ema)["state_dict"]
    with pytest.raises(ValueError, match="Unexpected keys.*optimizer_junk"):
        load_fmboost({**sd, "optimizer_junk.weight": torch.zeros(1)}, target)
    with pytest.raises(ValueError, match="not an fm-boosting CFM checkpoint"):
        load_fmboost({"encoder.conv_in.weight": np.zeros((1,))}, target)
    broken = dict(sd)
    del broken["model.net.out.2.weight"]
    broken["ema_model.ema_model.net.input_blocks.0.0.weight"] = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"(?s)\[model.net\].*missing: out.2.weight.*\[ema_model.ema_model.net\]"
                                         r".*wrong shape: input_blocks.0.0.weight"):
        load_fmboost(broken, target)


def test_load_weights_accepts_an_original_checkpoint_file(quickstart_unet, tmp_path):
    from cfm_jax.trainer import train
    _, _, online, ema = quickstart_unet
    ckpt = str(tmp_path / "orig.ckpt")
    torch.save(lightning_checkpoint(online, ema), ckpt)
    c = get_config()
    c.model.norm = "group"  # the original's UNet
    c.data.update(image_size=16, lowres_size=8, batch_size=2, num_val_images=2)
    c.train.update(num_steps=1, eval_every=0, checkpoint_every=1, log_every=1)
    c.logging.update(progress_bar=False, tensorboard=False)
    c.optim.lr = 0.0  # the params stay the loaded online weights exactly
    train(c, str(tmp_path / "ft"), load_weights=ckpt)
    # as the original's --load_weights: online -> params, EMA -> EMA, and the EMA's counter (1234, past
    # update_after_step=100) continues: one decayed update from the loaded EMA toward the online weights
    params, ema_params, ema_step = checkpointing.read_weights(str(tmp_path / "ft"))
    assert ema_step == 1235
    jax.tree.map(np.testing.assert_array_equal, params, online)
    decay = float(ema_decay(1234, EMAConfig.from_config(c.ema)))
    expected = jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, online)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), ema_params, expected)


def test_vae_cli_converts_ldm_file(tmp_path):
    import safetensors.numpy
    model = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1)
    params = random_params(abstract_params(model), seed=3)
    src = str(tmp_path / "ae.safetensors")
    safetensors.numpy.save_file(vae_params_to_ldm(params), src)
    out = str(tmp_path / "ae_flax")
    proc = run_cli("vae", "--src", src, "--out", out, "--scale_factor", "0.13025")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scale_factor 0.13025" in proc.stdout
    m, p, scale = load_autoencoder(out)
    assert scale == pytest.approx(0.13025) and m.ch == 32
    jax.tree.map(np.testing.assert_array_equal, p, params)


def test_cli_usage_errors(tmp_path):
    proc = run_cli("unet", "--src", "x", "--out", str(tmp_path))
    assert proc.returncode != 0 and "usage" in proc.stderr
    proc = run_cli("vae", "--src", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "o"))
    assert proc.returncode != 0 and "does not exist" in proc.stderr
