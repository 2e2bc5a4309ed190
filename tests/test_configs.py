"""Configs: the paper configuration builds the paper's model, overrides and typos behave."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cfm_jax.data import photos
from cfm_jax.first_stage import IdentityFirstStage
from cfm_jax.models.unet import count_params
from cfm_jax.model import CFMUpsampler, build_unet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(relpath):
    spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_paper_config_builds_the_paper_model_and_passes_shape_check():
    c = load_config("configs/flow400_64-128/unet_base_psu.py")
    assert (c.coupling.upsampling_mode, c.coupling.noising_step, c.coupling.concat_context) == ("psu", 400, True)
    assert (c.optim.lr, c.optim.warmup_steps, c.ema.beta, c.ema.update_after_step) == (3e-5, 1000, 0.999, 1000)
    assert c.first_stage.scale_factor == 0.18215
    model = build_unet(c.model)
    assert model.dtype == jnp.bfloat16 and model.param_dtype == jnp.float32
    assert count_params(model, (128, 128)) == 305_806_340
    # 512 px -> 1024 px: 4-channel latents at 128², context concatenated (8 input channels)
    stand_in = IdentityFirstStage(latent_channels=4, downsample_factor=8, scale_factor=0.18215, name="stand-in")
    up = CFMUpsampler(c, first_stage=stand_in)
    assert up.latent_size(c.data.image_size) == 128
    x = jax.ShapeDtypeStruct((2, 128, 128, 4), jnp.float32)
    params = jax.eval_shape(lambda: up.init(jax.random.PRNGKey(0), 128))
    out = jax.eval_shape(lambda p, x: up.velocity(p, x, jnp.zeros(2), x), params, x)
    assert out.shape == (2, 128, 128, 4) and out.dtype == jnp.float32
    loss = jax.eval_shape(lambda p: up.loss(p, {"latent": jnp.zeros(x.shape), "latent_lowres": jnp.zeros(x.shape)},
                                            jax.random.PRNGKey(0)), params)
    assert loss.shape == (2,)


@pytest.mark.parametrize("relpath,image,lowres,latent", [
    ("configs/flow400_128-256/unet_base_psu.py", 2048, 1024, 256),  # the 2048² cascade's second stage
    ("configs/flow400_32-128/unet_base_psu.py", 1024, 256, 128),    # 4x: 256 px -> 1024 px
])
def test_cascade_and_4x_configs_are_the_paper_model_at_other_sizes(relpath, image, lowres, latent):
    paper = load_config("configs/flow400_64-128/unet_base_psu.py")
    c = load_config(relpath)
    assert (c.data.image_size, c.data.lowres_size) == (image, lowres)
    for section in ("model", "coupling", "flow", "optim", "ema"):
        assert c[section].to_dict() == paper[section].to_dict(), section
    assert count_params(build_unet(c.model), (latent, latent)) == 305_806_340
    stand_in = IdentityFirstStage(latent_channels=4, downsample_factor=8, scale_factor=0.18215, name="stand-in")
    up = CFMUpsampler(c, first_stage=stand_in)
    assert up.latent_size(image) == latent
    x = jax.ShapeDtypeStruct((1, latent, latent, 4), jnp.float32)
    params = jax.eval_shape(lambda: up.init(jax.random.PRNGKey(0), latent))
    out = jax.eval_shape(lambda p, x: up.velocity(p, x, jnp.zeros(1), x), params, x)
    assert out.shape == (1, latent, latent, 4)


def test_paper_config_without_the_vae_file_says_where_to_get_it(tmp_path):
    c = load_config("configs/flow400_64-128/unet_base_psu.py")
    c.first_stage.path = str(tmp_path / "missing" / "sd_ae.ckpt")
    with pytest.raises(FileNotFoundError, match="sd_ae.ckpt.*diffusers VAE folder"):
        CFMUpsampler(c)


def test_quickstart_config_is_consistent():
    c = load_config("configs/quickstart.py")
    up = CFMUpsampler(c)
    assert up.first_stage.name == "identity" and c.model.in_channels == 3 and not up.coupling.uses_context
    with pytest.raises(AttributeError):  # locked-in keys: a typo in code fails too
        c.lock()
        c.optim.lrr = 1.0


def test_channel_mismatch_is_explained():
    c = load_config("configs/quickstart.py")
    c.model.in_channels = 6
    with pytest.raises(ValueError, match="use in_channels=3, out_channels=3"):
        CFMUpsampler(c)


def test_bench_script_prints_json():
    proc = subprocess.run(
        [sys.executable, "bench/bench_train.py", "--config", "configs/quickstart.py", "--latent_size", "16",
         "--batch_size", "2", "--steps", "1", "--sampler_grid", "3",
         "--config.model.channel_mult=(1,2)", "--config.model.attention_resolutions=(2,)"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["sampler_nfe"] == 2 and result["global_batch"] == 2
    for k in ("train_examples_per_s", "train_step_compile_s", "sampler_s_per_nfe", "peak_rss_mib"):
        assert result[k] > 0, k


def test_train_cli_reports_a_missing_vae_without_traceback(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/flow400_64-128/unet_base_psu.py",
                           "--config.first_stage.path", str(tmp_path / "sd_ae.ckpt"), "--workdir", str(workdir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 2
    assert "error: first_stage.path=" in proc.stderr and "Traceback" not in proc.stderr
    assert not workdir.exists()  # nothing written for a rejected config


def test_bench_data_prints_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "bench/bench_data.py", "--workers", "0", "--qs_batches", "2", "--paper_examples", "4",
         "--paper_batches", "1", "--batch_size", "2", "--train_steps", "0", "--train_examples_per_sec", "10",
         "--tmp", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["prepare"][0]["crops"] == len(photos.photo_names("train")) * 64 and result["prepare"][0]["crops_per_sec"] > 0
    assert result["paper_shaped_bytes_per_example"] > 3_000_000  # 1024² uint8 + 2 x 128²x4 float32
    for key in ("quickstart_64px", "paper_1024px", "paper_1024px_with_pixels"):
        assert result["loader"][key][0]["examples_per_sec"] > 0, key
    rate = result["loader"]["paper_1024px"][0]["examples_per_sec"]
    assert result["headroom_paper_vs_given_rate"]["0"] == pytest.approx(rate / 10, rel=1e-2)
