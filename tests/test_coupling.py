"""Coupling: up-sampling modes against PyTorch, forward noising, source/context, bad options."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfm_jax.coupling import (INTERPOLATION_MODES, Coupling, forward_diffuse,
                              resize, resize_nearest, shifted_cosine_alpha_bar, upsample_latent)
from cfm_jax.first_stage import IdentityFirstStage


def nchw(x):
    return torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


@pytest.fixture
def lowres():
    return jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))


def test_alpha_bar_matches_paper_value():
    assert shifted_cosine_alpha_bar()[400] == pytest.approx(0.653904, abs=5e-7)
    ab = shifted_cosine_alpha_bar()
    assert ab.shape == (1000,) and ab.dtype == np.float32
    assert ab[0] == pytest.approx(1.0, abs=1e-6) and ab[-1] < 1e-6
    assert np.all(np.diff(ab) <= 0)
    # im_size 128 shifts the log-SNR by 2 log(64/128): less signal at every step
    assert shifted_cosine_alpha_bar(im_size=128)[400] < ab[400]


def test_forward_diffuse_formula(lowres):
    noise = jax.random.normal(jax.random.PRNGKey(1), lowres.shape)
    ab = 0.653904
    np.testing.assert_allclose(forward_diffuse(lowres, noise, step=400),
                               np.sqrt(ab) * lowres + np.sqrt(1 - ab) * noise, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [16, 24, 5])
def test_bilinear_matches_torch(lowres, size):
    ref = torch.nn.functional.interpolate(nchw(lowres), size=size, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(resize(lowres, (size, size), "bilinear"), nhwc(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size", [16, 24, 5, 13])
def test_nearest_matches_torch(lowres, size):
    ref = torch.nn.functional.interpolate(nchw(lowres), size=size, mode="nearest")
    np.testing.assert_array_equal(resize_nearest(lowres, (size, size)), nhwc(ref))


# x2 and x4 up, x2 and x4 down, and non-integer ratios both ways
SIZE_PAIRS = [(8, 16), (8, 32), (16, 8), (32, 8), (24, 40), (40, 24), (13, 5)]


@pytest.mark.parametrize("mode", INTERPOLATION_MODES)
@pytest.mark.parametrize("size_in,size_out", SIZE_PAIRS)
def test_interpolation_modes_match_torch_up_and_down(mode, size_in, size_out):
    x = np.random.default_rng(size_in * 100 + size_out).standard_normal((2, 4, size_in, size_in)).astype(np.float32)
    kwargs = {} if mode in ("area", "nearest", "nearest-exact") else {"align_corners": False}
    ref = nhwc(torch.nn.functional.interpolate(torch.from_numpy(x), size=size_out, mode=mode, **kwargs))
    z = jnp.asarray(x.transpose(0, 2, 3, 1))  # NHWC
    out = jax.jit(lambda z: upsample_latent(z, size=size_out, mode=mode, first_stage=None))(z)
    assert out.shape == (2, size_out, size_out, 4) and out.dtype == jnp.float32
    if mode.startswith("nearest"):  # a gather: bit for bit
        np.testing.assert_array_equal(out, ref)
    else:
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # non-square sizes go through the same path
    ref_rect = nhwc(torch.nn.functional.interpolate(torch.from_numpy(x), size=(size_out, size_in + 3), mode=mode,
                                                    **kwargs))
    np.testing.assert_allclose(resize(z, (size_out, size_in + 3), mode), ref_rect, rtol=1e-5, atol=1e-5)


def test_nearest_exact_differs_from_nearest_by_the_centre_rule():
    x = jnp.arange(3.0).reshape(1, 3, 1, 1)
    # 3 -> 2: nearest takes floor(dst * 1.5) = 0, 1; nearest-exact floor((dst + 0.5) * 1.5) = 0, 2
    assert resize(x, (2, 1), "nearest").ravel().tolist() == [0.0, 1.0]
    assert resize(x, (2, 1), "nearest-exact").ravel().tolist() == [0.0, 2.0]


def test_noise_upsampling_keeps_grid_and_fills_noise(lowres):
    up = upsample_latent(lowres, size=32, mode="noise_upsampling", first_stage=None,
                         rng=jax.random.PRNGKey(3))
    assert up.shape == (2, 32, 32, 4)
    np.testing.assert_array_equal(up[:, ::4, ::4], lowres)
    rest = np.asarray(up).copy()
    rest[:, ::4, ::4] = np.nan
    rest = rest[~np.isnan(rest)]
    assert abs(rest.mean()) < 0.05 and abs(rest.std() - 1) < 0.05
    with pytest.raises(ValueError, match="multiple"):
        upsample_latent(lowres, size=20, mode="noise_upsampling", first_stage=None, rng=jax.random.PRNGKey(0))


def test_psu_in_pixel_space_is_bilinear_and_precomputed_latents_pass_through(lowres):
    fs = IdentityFirstStage(latent_channels=4)
    np.testing.assert_array_equal(upsample_latent(lowres, size=16, mode="psu", first_stage=fs),
                                  resize(lowres, (16, 16), "bilinear"))
    on_grid = jnp.ones((2, 16, 16, 4))
    assert upsample_latent(on_grid, size=16, mode="psu", first_stage=fs) is on_grid


def test_psu_decodes_upsamples_in_pixels_and_encodes():
    class ScaledF2:  # a toy first stage: factor 2 "autoencoder" with a scale
        latent_channels, downsample_factor, scale_factor, name = 3, 2, 0.5, "toy"

        def encode(self, img):
            b, h, w, c = img.shape
            return img.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4)) * 0.5

        def decode(self, z):
            return jnp.repeat(jnp.repeat(z / 0.5, 2, 1), 2, 2)

    fs = ScaledF2()
    z = jax.random.normal(jax.random.PRNGKey(2), (1, 4, 4, 3))
    out = upsample_latent(z, size=8, mode="psu", first_stage=fs)
    expected = fs.encode(resize(fs.decode(z), (16, 16), "bilinear"))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_source_and_context_variants(lowres):
    fs = IdentityFirstStage(latent_channels=4)
    rng = jax.random.PRNGKey(5)
    up = resize(lowres, (16, 16), "bilinear")

    x0, ctx = Coupling(upsampling_mode="bilinear", noising_step=-1).source_and_context(
        lowres, size=16, first_stage=fs, rng=rng)
    np.testing.assert_array_equal(x0, up)
    np.testing.assert_array_equal(ctx, up)

    x0, ctx = Coupling(upsampling_mode="bilinear", noising_step=-1, concat_context=False).source_and_context(
        lowres, size=16, first_stage=fs, rng=rng)
    assert ctx is None

    x0, ctx = Coupling(upsampling_mode="bilinear", noising_step=400).source_and_context(
        lowres, size=16, first_stage=fs, rng=rng)
    _, noise_rng, _ = jax.random.split(rng, 3)
    noise = jax.random.normal(noise_rng, up.shape)
    np.testing.assert_allclose(x0, forward_diffuse(up, noise, step=400), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(ctx, up)

    x0, ctx = Coupling(upsampling_mode="bilinear", noising_step=-1, start_from_noise=True,
                       concat_context=False).source_and_context(lowres, size=16, first_stage=fs, rng=rng)
    np.testing.assert_array_equal(x0, noise)  # pure noise from the same stream
    np.testing.assert_array_equal(ctx, up)  # start_from_noise always gives the context

    _, ctx = Coupling(upsampling_mode="bilinear", upsampling_mode_context="nearest",
                      noising_step=-1).source_and_context(lowres, size=16, first_stage=fs, rng=rng)
    np.testing.assert_array_equal(ctx, resize_nearest(lowres, (16, 16)))

    x0, ctx = Coupling(upsampling_mode="bicubic", upsampling_mode_context="area",
                       noising_step=-1).source_and_context(lowres, size=16, first_stage=fs, rng=rng)
    np.testing.assert_array_equal(x0, resize(lowres, (16, 16), "bicubic"))
    np.testing.assert_array_equal(ctx, resize(lowres, (16, 16), "area"))


@pytest.mark.parametrize("kwargs,match", [
    (dict(start_from_noise=True, noising_step=400), "mutually exclusive"),
    (dict(noising_step=1), "invalid"),
    (dict(noising_step=1000), "invalid"),
    (dict(noising_step=0.5), "integer"),
    (dict(upsampling_mode="lanczos"), "choose one of"),
    (dict(upsampling_mode="nearest_exact"), "choose one of"),
    (dict(upsampling_mode_context="conv"), "choose one of"),
])
def test_bad_coupling_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Coupling(**kwargs)

