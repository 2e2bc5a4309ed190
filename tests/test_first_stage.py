"""The autoencoder as first stage: scaling, PSU in latent space, tiling, converted folders,
and a CFM run end to end on latents (tiny random autoencoder)."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax.coupling import resize, upsample_latent
from cfm_jax.data import photos
from cfm_jax.first_stage import (AutoencoderFirstStage, build_first_stage, load_autoencoder, save_converted,
                                 tiled_map)
from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params
from tests.random_weights import random_params
from tests.torch_layouts import vae_params_to_ldm

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)


@pytest.fixture(scope="module")
def tiny_ae():
    model = AutoencoderKL(**TINY)
    return model, random_params(abstract_params(model), seed=7)


@pytest.fixture(scope="module")
def photo_batch():
    return photos.PhotoCrops("validation", 32, 16, 2, seed=0).batch_at(0)


def test_encode_scales_mode_and_decode_inverts_scale(tiny_ae, photo_batch):
    model, params = tiny_ae
    fs = AutoencoderFirstStage(params=params, model=model, scale_factor=0.5, shift_factor=0.25)
    x = jnp.asarray(photo_batch["image"])
    mode = model.apply({"params": params}, x, method=AutoencoderKL.encode).mode()
    np.testing.assert_allclose(fs.encode(x), (mode - 0.25) * 0.5, rtol=1e-6, atol=1e-6)
    z = jax.random.normal(jax.random.PRNGKey(0), mode.shape)
    np.testing.assert_allclose(fs.decode(z), model.apply({"params": params}, z / 0.5 + 0.25,
                                                         method=AutoencoderKL.decode), rtol=1e-6, atol=1e-6)
    assert fs.latent_channels == 4 and fs.downsample_factor == 2


def test_psu_in_latent_space_is_one_jitted_function(tiny_ae, photo_batch):
    model, params = tiny_ae
    fs = AutoencoderFirstStage(params=params, model=model, scale_factor=0.18215)
    z = fs.encode(jnp.asarray(photo_batch["image_lowres"]))  # [2, 8, 8, 4]
    psu = jax.jit(lambda fs, z: upsample_latent(z, size=16, mode="psu", first_stage=fs))
    out = psu(fs, z)  # the weights enter as an argument of the jitted function
    expected = fs.encode(resize(fs.decode(z), (32, 32), "bilinear"))
    assert out.shape == (2, 16, 16, 4)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_tiled_map_is_exact_for_pointwise_functions():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 40, 56, 3))
    up = tiled_map(lambda t: jnp.repeat(jnp.repeat(t * 2.0, 4, 1), 4, 2), x, tile=16, overlap=6, scale=4.0)
    np.testing.assert_allclose(up, jnp.repeat(jnp.repeat(x * 2.0, 4, 1), 4, 2), rtol=1e-6)
    down = tiled_map(lambda t: t[:, ::2, ::2] + 1.0, x, tile=16, overlap=4, scale=0.5)
    np.testing.assert_allclose(down, x[:, ::2, ::2] + 1.0, rtol=1e-6)


def test_tiled_decode_and_encode_error_shrinks_with_context(tiny_ae):
    """Tiles see only their own context (per-tile GroupNorm statistics and attention), so tiled
    results differ from untiled ones; bigger tiles and overlaps bring them closer, and a tile
    covering the whole input is exact. On this random tiny autoencoder and a real 128² photo the
    mean abs decode error is ~0.33 (32-cell tiles, overlap 8) and ~0.19 (48, overlap 16) against
    a mean |output| of 0.42; random weights exaggerate the normalisation mismatch, so the bound
    for a trained VAE must be measured with bench/bench_vae.py on its real weights."""
    model, params = tiny_ae
    image = jnp.asarray(photos.PhotoCrops("validation", 128, 64, 1, seed=0).batch_at(0)["image"])

    def stage(tile, overlap):
        return AutoencoderFirstStage(params=params, model=model, scale_factor=1.0, tile_size=tile,
                                     tile_overlap=overlap)

    full = stage(0, 0)
    z = full.encode(image)  # [1, 64, 64, 4]
    ref = full.decode(z)
    errors = {}
    for tile, overlap in ((32, 0), (32, 8), (48, 16)):
        dec, enc = stage(tile, overlap).decode(z), stage(tile, overlap).encode(image)
        assert dec.shape == ref.shape and enc.shape == z.shape
        errors[tile, overlap] = (float(jnp.mean(jnp.abs(dec - ref))), float(jnp.mean(jnp.abs(enc - z))))
    assert errors[48, 16][0] < errors[32, 8][0] < errors[32, 0][0], errors
    assert errors[48, 16][1] < errors[32, 8][1] < errors[32, 0][1], errors
    assert errors[32, 8][0] < 0.4 and errors[48, 16][0] < 0.25, errors
    np.testing.assert_allclose(stage(64, 8).decode(z), ref, rtol=1e-6, atol=1e-6)  # one tile: untiled


def test_converted_folder_and_checkpoint_file_load_identically(tiny_ae, tmp_path):
    import safetensors.numpy
    model, params = tiny_ae
    ldm_file = str(tmp_path / "tiny_ae.safetensors")
    safetensors.numpy.save_file(vae_params_to_ldm(params), ldm_file)
    m1, p1, s1 = load_autoencoder(ldm_file)
    assert (m1.ch, tuple(m1.ch_mult), m1.num_res_blocks) == (32, (1, 2), 1) and s1 == pytest.approx(0.18215)
    out = str(tmp_path / "converted")
    save_converted(out, m1, p1, scale_factor=s1, source=ldm_file)
    m2, p2, s2 = load_autoencoder(out)
    assert m2 == m1 and s2 == s1
    jax.tree.map(np.testing.assert_array_equal, p1, p2)
    jax.tree.map(np.testing.assert_array_equal, p1, params)


def _paper_config():
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "paper", os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs/flow400_64-128/unet_base_psu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_training_target_is_what_encode_gives_and_decode_inverts_with_a_shift(tiny_ae, photo_batch):
    """Records store unscaled latents; the model scales them like ``encode`` does, so that the
    target it trains on and the latents it samples decode back to the records' latents, also
    with a nonzero ``shift_factor`` (training once multiplied by ``scale_factor`` only)."""
    from cfm_jax.model import CFMUpsampler
    model, params = tiny_ae
    fs = AutoencoderFirstStage(params=params, model=model, scale_factor=0.5, shift_factor=0.25)
    up = CFMUpsampler(_paper_config(), first_stage=fs)
    batch = up.make_latents_fn()(photo_batch)  # unscaled, as records store them
    x1, lowres = up.scaled_latents(batch)
    np.testing.assert_allclose(x1, fs.encode(jnp.asarray(photo_batch["image"])), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lowres, (batch["latent_lowres"] - 0.25) * 0.5, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(fs.decode(x1), fs._decode(batch["latent"]), rtol=1e-5, atol=1e-5)


def test_paper_config_runs_end_to_end_on_latents(tiny_ae, tmp_path):
    """The paper's flow, coupling (PSU, noising step 400, context) and optimizer on latents of
    an autoencoder first stage, shrunk to CPU size: bundled photos are encoded on the fly."""
    from cfm_jax.trainer import train
    model, params = tiny_ae
    path = str(tmp_path / "ae")
    save_converted(path, model, params, scale_factor=0.18215, source="random")
    c = _paper_config()
    c.first_stage.update(path=path, tile_size=0)
    c.model.update(model_channels=32, channel_mult=(1,), num_res_blocks=1, attention_resolutions=(1,),
                   num_heads=1, dim_head=32, dtype="float32")
    c.data.update(name="photos", image_size=32, lowres_size=16, batch_size=2, num_val_images=2)
    c.optim.update(warmup_steps=1)
    c.sample.update(method="sde_euler", num_steps=3)  # validation through the original's SDE sampler
    c.train.update(num_steps=2, log_every=1, eval_every=2, checkpoint_every=2, num_grid_images=2)
    c.logging.update(progress_bar=False, tensorboard=False)
    summary = train(c, str(tmp_path / "run"))
    assert summary["final_step"] == 2 and np.isfinite(summary["train"]["loss"])
    val = summary["validation"]
    assert np.isfinite(val["val/cfm_psnr"]) and val["val/nfe"] == 3  # 2 steps + the Mean last step
    assert build_first_stage(c).scale_factor == 0.18215


def test_bench_vae_prints_json_rows():
    import json
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "bench/bench_vae.py", "--small", "--sizes", "32", "--tiles", "0,8",
                           "--overlap", "2", "--repeats", "1"], cwd=root, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["tile_latent"] for r in rows] == [0, 8]
    for r in rows:
        assert r["encode_images_per_s"] > 0 and r["decode_images_per_s"] > 0
    assert rows[1]["decode_max_abs_err"] >= rows[1]["decode_mean_abs_err"] > 0
