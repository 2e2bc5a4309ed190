"""Tests of cfm_jax.metrics against scikit-image on real photos."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import skimage.filters
import skimage.metrics
from PIL import Image

from cfm_jax import metrics

PSNR_TOL_DB = 1e-4
SSIM_TOL = 1e-4


def _jpeg(x, quality):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


@pytest.fixture(scope="module")
def pairs():
    """(pred, target) float32 [B, H, W, 3] in [-1, 1]: degraded versions of real photo crops."""
    rng = np.random.default_rng(0)
    targets, preds = [], []
    for photo, (y, x) in ((skimage.data.astronaut(), (100, 150)), (skimage.data.coffee(), (60, 200))):
        crop = photo[y : y + 96, x : x + 128]
        t = crop.astype(np.float64) / 255.0
        for p in (
            _jpeg(crop, 10) / 255.0,
            _jpeg(crop, 60) / 255.0,
            skimage.filters.gaussian(t, sigma=1.5, channel_axis=-1),
            np.clip(t + rng.normal(0.0, 0.1, t.shape), 0.0, 1.0),
            np.clip(t + 0.02, 0.0, 1.0),  # brightness shift
        ):
            preds.append(p)
            targets.append(t)
    to_pm1 = lambda a: (np.stack(a) * 2.0 - 1.0).astype(np.float32)
    return to_pm1(preds), to_pm1(targets)


def _unit64(x):
    return np.clip(np.asarray(x, np.float64) / 2.0 + 0.5, 0.0, 1.0)


def test_psnr_matches_skimage(pairs):
    pred, target = pairs
    got = np.asarray(jax.jit(metrics.psnr)(pred, target))
    assert got.shape == (len(pred),)
    ref = [
        skimage.metrics.peak_signal_noise_ratio(_unit64(t), _unit64(p), data_range=1.0)
        for p, t in zip(pred, target)
    ]
    np.testing.assert_allclose(got, ref, rtol=0, atol=PSNR_TOL_DB)
    # also the original's formula, 20 log10(1 / sqrt(mse)) on clipped [0, 1] images
    mse = ((_unit64(pred) - _unit64(target)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(got, 20 * np.log10(1 / np.sqrt(mse)), rtol=0, atol=PSNR_TOL_DB)


def test_ssim_matches_skimage(pairs):
    pred, target = pairs
    got = np.asarray(jax.jit(metrics.ssim)(pred, target))
    assert got.shape == (len(pred),)
    ref = [
        skimage.metrics.structural_similarity(
            _unit64(t),
            _unit64(p),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1.0,
            channel_axis=-1,
        )
        for p, t in zip(pred, target)
    ]
    np.testing.assert_allclose(got, ref, rtol=0, atol=SSIM_TOL)
    assert np.ptp(got) > 0.3  # the degradations span a real range of SSIM


def test_inputs_are_clipped(pairs):
    pred, target = pairs
    wild = pred * 1.7 + 0.2  # well outside [-1, 1]
    clipped = np.clip(wild, -1, 1)
    np.testing.assert_allclose(metrics.psnr(wild, target), metrics.psnr(clipped, target), atol=1e-5)
    np.testing.assert_allclose(metrics.ssim(wild, target), metrics.ssim(clipped, target), atol=1e-6)
    np.testing.assert_allclose(metrics.mse(wild, target), metrics.mse(clipped, target), atol=1e-7)


def test_identical_images(pairs):
    _, target = pairs
    p = np.asarray(metrics.psnr(target, target))
    assert np.isposinf(p).all()
    np.testing.assert_array_equal(metrics.psnr(target, target, max_db=100.0), 100.0)
    np.testing.assert_allclose(metrics.ssim(target, target), 1.0, atol=1e-6)
    np.testing.assert_array_equal(metrics.mse(target, target), 0.0)


def test_psnr_from_mse_is_capped_and_matches_psnr(pairs):
    pred, target = pairs
    np.testing.assert_allclose(metrics.psnr_from_mse(metrics.mse(pred, target)), metrics.psnr(pred, target),
                               atol=1e-4)
    assert float(metrics.psnr_from_mse(0.0)) == metrics.PSNR_MAX_DB == 100.0  # MSE 1e-10
    assert float(metrics.psnr_from_mse(1e-10)) == pytest.approx(100.0)
    assert np.isposinf(metrics.psnr_from_mse(0.0, max_db=None))


def test_mse(pairs):
    pred, target = pairs
    unit = np.asarray(metrics.mse(pred, target))
    assert unit.shape == (len(pred),)
    np.testing.assert_allclose(unit, ((_unit64(pred) - _unit64(target)) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(metrics.psnr(pred, target), -10 * np.log10(unit), atol=1e-4)
    # raw space: the original's F.mse_loss on [-1, 1] images (inputs here are in range)
    raw = np.asarray(metrics.mse(pred, target, space="raw"))
    np.testing.assert_allclose(raw, 4 * unit, rtol=1e-5)
    with pytest.raises(ValueError):
        metrics.mse(pred, target, space="bogus")


def test_single_image_and_jit_consistency(pairs):
    pred, target = pairs
    one = metrics.ssim(pred[0], target[0])
    assert jnp.shape(one) == ()
    np.testing.assert_allclose(one, metrics.ssim(pred, target)[0], atol=1e-6)
    np.testing.assert_allclose(jax.jit(metrics.psnr)(pred, target), metrics.psnr(pred, target), atol=1e-5)
