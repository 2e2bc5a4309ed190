"""KL autoencoder: parity with diffusers' PyTorch `AutoencoderKL` through both weight
formats (diffusers names via our converter; LDM names via diffusers' own
`convert_ldm_vae_checkpoint`), checkpoint files and wrappers, clear errors, posterior."""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from cfm_jax.convert.vae import (config_from_diffusers_json, detect_format, infer_ldm_config,
                                 load_pretrained, load_state_dict, vae_params_from_diffusers,
                                 vae_params_from_ldm)
from cfm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian, abstract_params
from tests.random_weights import random_params
from tests.torch_layouts import vae_params_to_ldm

# fp32 parity tolerance: XLA and ATen sum convolutions, GroupNorm statistics and the
# attention products in different orders.
RTOL, ATOL = 1e-5, 1e-5
B, HW = 2, 32

# Small diffusers configs; "attn_levels" also puts attention in the level-1 blocks
# (diffusers numbers up_blocks from the lowest resolution: up_blocks.0 is level 1).
TORCH_CONFIGS = {
    "plain": dict(block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "attn_levels": dict(block_out_channels=(32, 64), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")),
}
COMMON = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, sample_size=HW,
              scaling_factor=0.5)
OURS_SMALL = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)


def _torch_vae(name, seed=0):
    """diffusers AutoencoderKL with every parameter re-drawn (not its default init)."""
    torch.manual_seed(seed)
    vae = TorchAutoencoderKL(**TORCH_CONFIGS[name], **COMMON).eval()
    with torch.no_grad():
        for pname, p in vae.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / np.sqrt(p[0].numel()))
            elif pname.endswith("weight"):  # norm scales
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return vae


def _random_params(model, seed=0):
    """Our params with every leaf drawn at random (not flax's init)."""
    return random_params(abstract_params(model), seed)


def _nchw(a):
    return np.transpose(np.asarray(a), (0, 3, 1, 2))


def _errors(ours, ref):
    """(max abs error, max error relative to the reference's largest magnitude)."""
    err = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
    return err.max(), err.max() / np.abs(ref).max()


def _torch_outputs(vae, x, z):
    with torch.no_grad():
        dist = vae.encode(torch.from_numpy(_nchw(x))).latent_dist
        images = vae.decode(torch.from_numpy(_nchw(z))).sample
    return dist.mean.numpy(), dist.logvar.numpy(), images.numpy()


def _our_outputs(model, params, x, z):
    encode = jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode))
    decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method=model.decode))
    post = encode(params, x)
    return _nchw(post.mean), _nchw(post.logvar), _nchw(decode(params, z))


def _check_parity(model, params, vae, label):
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (B, HW, HW, 3)).astype(np.float32)
    f = model.downsample_factor
    z = rng.standard_normal((B, HW // f, HW // f, model.embed_dim)).astype(np.float32)
    ours = _our_outputs(model, params, x, z)
    refs = _torch_outputs(vae, x, z)
    for what, o, r in zip(("mean", "logvar", "decoded"), ours, refs):
        assert o.shape == r.shape, (what, o.shape, r.shape)
        abs_err, rel_err = _errors(o, r)
        print(f"[{label}] {what}: max abs err {abs_err:.2e}, relative to max|ref| {rel_err:.2e}")
        np.testing.assert_allclose(o, r, rtol=RTOL, atol=ATOL, err_msg=f"{label} {what}")


def _model_for(name):
    vae_config = dict(TORCH_CONFIGS[name], **COMMON)
    fields, scale = config_from_diffusers_json(vae_config)
    assert scale == 0.5
    return AutoencoderKL(**fields)


# ----------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(TORCH_CONFIGS))
def test_parity_diffusers_format(name):
    vae = _torch_vae(name)
    model = _model_for(name)
    state_dict = {k: v.numpy() for k, v in vae.state_dict().items()}
    assert detect_format(state_dict) == "diffusers"
    params = vae_params_from_diffusers(state_dict, abstract_params(model))
    _check_parity(model, params, vae, f"diffusers/{name}")


def test_parity_ldm_format_through_diffusers_converter():
    model = AutoencoderKL(**OURS_SMALL)
    params = _random_params(model)
    ldm = vae_params_to_ldm(params)
    assert "encoder.mid.attn_1.q.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert "decoder.up.1.upsample.conv.weight" in ldm and "encoder.down.0.downsample.conv.weight" in ldm
    assert detect_format(ldm) == "ldm"

    # diffusers' own LDM -> diffusers mapping, loaded strictly.
    vae = TorchAutoencoderKL(**TORCH_CONFIGS["plain"], **COMMON).eval()
    converted = convert_ldm_vae_checkpoint({k: torch.from_numpy(v) for k, v in ldm.items()},
                                           dict(vae.config))
    vae.load_state_dict(converted, strict=True)

    # Our LDM -> params mapping is the exact inverse of vae_params_to_ldm.
    back = vae_params_from_ldm(ldm, abstract_params(model))
    jax.tree.map(np.testing.assert_array_equal, back, params)
    _check_parity(model, back, vae, "ldm")


def test_sd_architecture_matches_diffusers_names_and_shapes():
    """The full SD KL-f8 VAE: every diffusers key and shape maps (meta tensors, no compute)."""
    with torch.device("meta"):
        vae = TorchAutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                 down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=256)
    fields, scale = config_from_diffusers_json(dict(vae.config))
    model = AutoencoderKL(**fields, param_dtype=jnp.bfloat16)
    assert (model.ch, tuple(model.ch_mult), model.num_res_blocks, model.z_channels, model.embed_dim,
            tuple(model.attn_resolutions), scale) == (128, (1, 2, 4, 4), 2, 4, 4, (), 0.18215)
    assert fields == {k: getattr(AutoencoderKL(), k) for k in fields}  # our defaults are SD's
    zero = np.zeros((), np.float32)
    state_dict = {k: np.broadcast_to(zero, v.shape) for k, v in vae.state_dict().items()}
    params = vae_params_from_diffusers(state_dict, abstract_params(model))
    assert sum(p.size for p in jax.tree.leaves(params)) == 83_653_863
    assert {p.dtype for p in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}


# ----------------------------------------------------------------------------------
# Checkpoint layouts and files
# ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ldm():
    model = AutoencoderKL(**OURS_SMALL)
    params = _random_params(model, seed=3)
    return model, params, vae_params_to_ldm(params)


def test_wrapped_and_prefixed_ldm_dicts_load_identically(small_ldm):
    model, params, ldm = small_ldm
    target = abstract_params(model)
    other = {"model.diffusion_model.input_blocks.0.0.weight": np.zeros(3),
             "cond_stage_model.transformer.x": np.zeros(2), "loss.logvar": np.zeros(())}
    variants = {
        "bare_with_loss": {**ldm, "loss.discriminator.main.0.weight": np.zeros((2, 2))},
        "lightning": {"state_dict": ldm, "global_step": 10},
        "sd_full": {**{f"first_stage_model.{k}": v for k, v in ldm.items()}, **other},
        "fmboost_trainer": {"state_dict": {**{f"first_stage.{k}": v for k, v in ldm.items()},
                                           "model.net.out.0.weight": np.zeros(4)}},
    }
    for name, sd in variants.items():
        assert detect_format(sd) == "ldm", name
        assert infer_ldm_config(sd) == infer_ldm_config(ldm), name
        got = vae_params_from_ldm(sd, target)
        jax.tree.map(np.testing.assert_array_equal, got, params)


def test_infer_ldm_config_with_level_attention():
    fields = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=3, embed_dim=2,
                  attn_resolutions=(64,), resolution=256, in_channels=3, out_ch=1, double_z=True)
    model = AutoencoderKL(**fields)
    ldm = vae_params_to_ldm(_random_params(model))
    assert "encoder.down.2.attn.1.proj_out.weight" in ldm and "decoder.up.2.attn.2.k.weight" in ldm
    assert not any(".down.1.attn" in k or ".up.1.attn" in k for k in ldm)
    assert infer_ldm_config(ldm) == fields


def test_diffusers_folder_loads(tmp_path):
    vae = _torch_vae("attn_levels", seed=5)
    vae.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    model, params, scale = load_pretrained(tmp_path)
    assert scale == 0.5 and tuple(model.attn_resolutions) == (128,)
    expected = vae_params_from_diffusers({k: v.numpy() for k, v in vae.state_dict().items()},
                                         abstract_params(model))
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    # A pipeline folder with the VAE in vae/ works too.
    pipeline = tmp_path / "pipe"
    vae.save_pretrained(pipeline / "vae", safe_serialization=True)
    assert load_pretrained(pipeline)[0] == model


def test_ckpt_loads_with_weights_only(small_ldm, tmp_path):
    model, params, ldm = small_ldm
    path = tmp_path / "sd.ckpt"
    torch.save({"state_dict": {f"first_stage_model.{k}": torch.from_numpy(v).half() for k, v in ldm.items()},
                "global_step": 7}, path)
    sd = load_state_dict(path)
    assert all(v.dtype == np.float32 for v in sd.values())
    loaded_model, loaded, scale = load_pretrained(path)
    assert loaded_model == model and scale == 0.18215
    expected = jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, loaded, expected)


def test_bf16_safetensors_read_without_torch(tmp_path, monkeypatch):
    import safetensors.torch
    tensors = {"a": torch.randn(5, 3).bfloat16(), "b": torch.randn(4).half(), "c": torch.arange(3)}
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(tensors, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    sd = load_state_dict(path)
    monkeypatch.undo()
    assert sd["a"].dtype == np.float32 and sd["b"].dtype == np.float32 and sd["c"].dtype == np.int64
    np.testing.assert_array_equal(sd["a"], tensors["a"].float().numpy())
    np.testing.assert_array_equal(sd["b"], tensors["b"].float().numpy())


# ----------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------


def test_truncated_files_name_the_file(small_ldm, tmp_path):
    import safetensors.numpy
    _, _, ldm = small_ldm
    st_path, ckpt_path = tmp_path / "vae.safetensors", tmp_path / "vae.ckpt"
    safetensors.numpy.save_file(ldm, st_path)
    torch.save({k: torch.from_numpy(v) for k, v in ldm.items()}, ckpt_path)
    for path in (st_path, ckpt_path):
        data = path.read_bytes()
        for cut in (len(data) // 2, 20):
            path.write_bytes(data[:cut])
            with pytest.raises(ValueError, match=r"truncated or corrupt") as info:
                load_state_dict(path)
            assert str(path) in str(info.value)


def test_missing_torch_is_named(small_ldm, tmp_path, monkeypatch):
    path = tmp_path / "vae.ckpt"
    torch.save({"w": torch.zeros(2)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"torch==2\.13\.0.*safetensors"):
        load_state_dict(path)


def test_pickled_objects_are_refused_clearly(tmp_path):
    import argparse
    path = tmp_path / "obj.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hparams": argparse.Namespace(a=1)}, path)
    with pytest.raises(ValueError, match=r"weights_only=True.*other than tensors"):
        load_state_dict(path)


def test_wrong_architecture_lists_every_wrong_shape(small_ldm):
    _, _, ldm = small_ldm  # ch_mult (1, 2)
    target = abstract_params(AutoencoderKL(**dict(OURS_SMALL, ch_mult=(1, 1))))
    with pytest.raises(ValueError) as info:
        vae_params_from_ldm(ldm, target)
    msg = str(info.value)
    # (1, 1) has no channel change, so no nin_shortcut in down.1.block.0 and up.0.block.0.
    assert "(0 missing, 4 unexpected, 84 wrong shape)" in msg
    assert "unexpected: encoder.down.1.block.0.nin_shortcut.weight (64, 32, 1, 1)" in msg
    assert "wrong shape: encoder.down.1.block.0.conv1.weight: got (64, 32, 3, 3), expected (32, 32, 3, 3)" in msg
    assert "wrong shape: decoder.conv_in.weight: got (64, 4, 3, 3), expected (32, 4, 3, 3)" in msg
    assert msg.count("\n  wrong shape: ") == 84 and "infer_ldm_config" in msg


def test_missing_and_unexpected_keys_listed_together(small_ldm):
    model, _, ldm = small_ldm
    sd = {k: v for k, v in ldm.items() if k not in ("encoder.conv_in.bias", "decoder.mid.attn_1.q.weight")}
    sd["encoder.mid.attn_2.q.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(ValueError) as info:
        vae_params_from_ldm(sd, abstract_params(model))
    msg = str(info.value)
    assert "2 missing, 1 unexpected, 0 wrong shape" in msg
    assert "missing: encoder.conv_in.bias (for encoder/conv_in/bias, expected shape (32,))" in msg
    assert "missing: decoder.mid.attn_1.q.weight" in msg and "expected shape (64, 64, 1, 1)" in msg
    assert "unexpected: encoder.mid.attn_2.q.weight (64, 64, 1, 1)" in msg


def test_not_a_vae_and_wrong_format(small_ldm, tmp_path):
    model, _, ldm = small_ldm
    target = abstract_params(model)
    unet = {"input_blocks.0.0.weight": np.zeros((4, 4, 3, 3)), "out.2.bias": np.zeros(4)}
    for fn in (detect_format, lambda sd: vae_params_from_ldm(sd, target),
               lambda sd: vae_params_from_diffusers(sd, target), infer_ldm_config):
        with pytest.raises(ValueError, match=r"contains no autoencoder weights \(looked for .*input_blocks"):
            fn({"state_dict": unet})
    path = tmp_path / "unet.safetensors"
    import safetensors.numpy
    safetensors.numpy.save_file({k: v.astype(np.float32) for k, v in unet.items()}, path)
    with pytest.raises(ValueError, match="contains no autoencoder weights"):
        load_pretrained(path)
    with pytest.raises(ValueError, match="use vae_params_from_ldm"):
        vae_params_from_diffusers(ldm, target)
    diffusers_sd = {k: v.numpy() for k, v in _torch_vae("plain").state_dict().items()}
    with pytest.raises(ValueError, match="use vae_params_from_diffusers"):
        vae_params_from_ldm(diffusers_sd, target)


def test_legacy_diffusers_attention_names(small_ldm):
    model, _, _ = small_ldm
    sd = {k: v.numpy() for k, v in _torch_vae("plain", seed=2).state_dict().items()}
    target = abstract_params(model)
    expected = vae_params_from_diffusers(sd, target)
    legacy = {}
    for k, v in sd.items():
        for new, old in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."),
                         (".to_out.0.", ".proj_attn.")):
            k = k.replace(new, old)
        legacy[k] = v[:, :, None, None] if k.endswith("query.weight") else v  # old conv-shaped too
    jax.tree.map(np.testing.assert_array_equal, vae_params_from_diffusers(legacy, target), expected)


def test_unsupported_diffusers_config_is_listed():
    with pytest.raises(ValueError, match=r"norm_num_groups=16.*use_quant_conv=False.*shift_factor=0\.1"):
        config_from_diffusers_json(dict(block_out_channels=(32, 64), norm_num_groups=16,
                                        use_quant_conv=False, shift_factor=0.1))


# ----------------------------------------------------------------------------------
# Posterior and model
# ----------------------------------------------------------------------------------


def test_posterior():
    rng = np.random.default_rng(0)
    mean = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
    logvar = rng.uniform(-3, 1, (2, 3, 3, 4)).astype(np.float32)
    logvar[0, 0, 0, :2] = (-100.0, 50.0)
    post = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], axis=-1))
    np.testing.assert_array_equal(post.mode(), mean)
    np.testing.assert_array_equal(post.mean, mean)
    clamped = np.clip(logvar, -30.0, 20.0)
    np.testing.assert_array_equal(post.logvar, clamped)
    np.testing.assert_allclose(post.std, np.exp(0.5 * clamped), rtol=1e-6)
    np.testing.assert_allclose(post.var, np.exp(clamped), rtol=1e-6)

    big = DiagonalGaussian(mean=jnp.full((4000, 2, 2, 2), 1.5), logvar=jnp.full((4000, 2, 2, 2), np.log(0.25)))
    draws = np.asarray(big.sample(jax.random.PRNGKey(0)))
    assert abs(draws.mean() - 1.5) < 0.01 and abs(draws.std() - 0.5) < 0.01
    assert not np.array_equal(draws, np.asarray(big.sample(jax.random.PRNGKey(1))))


def test_call_shapes_and_input_checks():
    model = AutoencoderKL(**OURS_SMALL)
    x = jnp.zeros((1, 8, 8, 3))
    variables = {"params": _random_params(model)}  # model.init compiles for ~15 s on CPU
    run = jax.jit(lambda v, x, rng: (model.apply(v, x),
                                     model.apply(v, x, sample_posterior=True, rngs={"posterior": rng})))
    (images, post), (sampled, _) = run(variables, x, jax.random.PRNGKey(1))
    assert images.shape == sampled.shape == (1, 8, 8, 3) and images.dtype == jnp.float32
    assert post.mean.shape == post.logvar.shape == (1, 4, 4, 4)
    assert not np.allclose(images, sampled)
    encode = lambda x: jax.eval_shape(lambda v: model.apply(v, x, method=model.encode), variables)
    with pytest.raises(ValueError, match="NHWC"):
        encode(jnp.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="multiple of the downsampling factor 2"):
        encode(jnp.zeros((1, 7, 8, 3)))
