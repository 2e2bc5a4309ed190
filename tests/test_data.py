"""Tests of cfm_jax.data.photos (the skimage-photo crop source) and of the resampling of
cfm_jax.data.image_ops against PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cfm_jax.data import image_ops
from cfm_jax.data.image_ops import downsample, upsample_bicubic, upsample_bilinear
from cfm_jax.data.photos import PhotoCrops, load_photos, photo_names

KEYS = {"image", "latent", "latent_lowres", "image_lowres"}


def _torch_resize(x, size, mode, **kw):
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return F.interpolate(t, size=size, mode=mode, **kw).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def train_src():
    return PhotoCrops("train", image_size=64, lowres_size=32, batch_size=8, seed=1)


@pytest.fixture(scope="module")
def val_src():
    return PhotoCrops("validation", image_size=64, lowres_size=16, batch_size=6, seed=1)


# ---------------------------------------------------------------- photos / split


def test_photos_are_uint8_rgb_and_cached():
    for split in ("train", "validation"):
        ims = load_photos(split)
        assert len(ims) == len(photo_names(split)) > 0
        for im in ims:
            assert im.dtype == np.uint8 and im.ndim == 3 and im.shape[2] == 3
            assert min(im.shape[:2]) >= 256
        assert all(a is b for a, b in zip(ims, load_photos(split)))


def test_split_disjoint_by_photo():
    train, val = photo_names("train"), photo_names("validation")
    assert set(val) == {"astronaut", "coffee", "chelsea", "rocket"}
    assert not set(train) & set(val)
    assert len(set(train)) == len(train) >= 10
    assert photo_names("val") == val
    # also by content (catches aliases such as skimage.data.cat == chelsea)
    for v in load_photos("validation"):
        for t in load_photos("train"):
            assert v.shape != t.shape or not np.array_equal(v, t)
    with pytest.raises(ValueError):
        photo_names("test")


# ---------------------------------------------------------------- batches


@pytest.mark.parametrize("src_name", ["train_src", "val_src"])
def test_keys_shapes_dtypes_range(src_name, request):
    src = request.getfixturevalue(src_name)
    b = src.batch_at(3)
    assert set(b) == KEYS
    big, small = src.image_size, src.lowres_size
    n = src.batch_size
    assert b["image"].shape == b["latent"].shape == b["latent_lowres"].shape == (n, big, big, 3)
    assert b["image_lowres"].shape == (n, small, small, 3)
    for k, v in b.items():
        assert isinstance(v, np.ndarray) and v.dtype == np.float32, k
        assert v.min() >= -1.0 and v.max() <= 1.0, k
        assert np.isfinite(v).all(), k
    # real content, not constant crops
    assert b["image"].reshape(n, -1).std(axis=1).min() > 0.01
    # identity first stage
    np.testing.assert_array_equal(b["latent"], b["image"])
    # the high-res image is an uint8 photo mapped to [-1, 1]
    u8 = (b["image"] + 1.0) * 127.5
    np.testing.assert_allclose(u8, np.round(u8), atol=1e-4)


def test_determinism_and_resume(train_src):
    a, b = train_src.batch_at(5), train_src.batch_at(5)
    other = PhotoCrops("train", 64, 32, 8, seed=1)
    c = other.batch_at(5)
    for k in KEYS:
        np.testing.assert_array_equal(a[k], b[k])
        np.testing.assert_array_equal(a[k], c[k])
    assert not np.array_equal(a["image"], train_src.batch_at(6)["image"])
    assert not np.array_equal(a["image"], PhotoCrops("train", 64, 32, 8, seed=2).batch_at(5)["image"])
    # iteration from a step == batch_at of the following steps (resume)
    it = iter(PhotoCrops("train", 64, 32, 8, seed=1, start_step=4))
    for step in (4, 5):
        np.testing.assert_array_equal(next(it)["image"], train_src.batch_at(step)["image"])
    it = other.iter_from(5)
    np.testing.assert_array_equal(next(it)["image"], a["image"])


def test_validation_fixed_and_independent_of_seed(val_src):
    v1 = [val_src.batch_at(i) for i in range(2)]
    v2 = [PhotoCrops("validation", 64, 16, 6, seed=123).batch_at(i) for i in range(2)]
    for x, y in zip(v1, v2):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not np.array_equal(v1[0]["image"], v1[1]["image"])


def test_validation_crops_are_native_pixels(val_src):
    """Validation crops are unresampled, unflipped windows of the validation photos."""
    b = val_src.batch_at(0)
    size = val_src.image_size
    ims = np.round((b["image"] + 1.0) * 127.5).astype(np.uint8)
    for i, crop in enumerate(ims):
        n = len(photo_names("validation"))
        photo = load_photos("validation")[i % n]  # round-robin over the held-out photos
        rows = np.lib.stride_tricks.sliding_window_view(photo, (size, 3), axis=(1, 2))
        # rows[y, x, 0] is photo[y, x:x+size, :]; find where crop's first row occurs
        hits = np.argwhere((rows[:, :, 0] == crop[0]).all(axis=(-1, -2)))
        assert any(np.array_equal(photo[y : y + size, x : x + size], crop) for y, x in hits), i


def test_train_flips(train_src):
    no_flip = PhotoCrops("train", 64, 32, 8, seed=1, flip=False, augment=False).batch_at(2)["image"]
    flip = PhotoCrops("train", 64, 32, 8, seed=1, augment=False).batch_at(2)["image"]
    flipped = 0
    for a, b in zip(no_flip, flip):
        if np.array_equal(a, b[:, ::-1]) and not np.array_equal(a, b):
            flipped += 1
        else:
            np.testing.assert_array_equal(a, b)
    assert 0 < flipped < len(flip)


def test_train_augmentation_rotates_and_permutes_channels():
    plain = PhotoCrops("train", 32, 16, 16, seed=3, augment=False).batch_at(5)["image"]
    augmented = PhotoCrops("train", 32, 16, 16, seed=3, augment=True).batch_at(5)["image"]
    changed = 0
    for a, b in zip(plain, augmented):
        # b is a rotation of a by a multiple of 90 degrees with its channels permuted
        matches = [np.array_equal(np.rot90(a, k)[:, :, list(p)], b)
                   for k in range(4) for p in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))]
        assert any(matches)
        changed += not np.array_equal(a, b)
    assert changed > 8
    assert PhotoCrops("validation", 32, 16, 4, augment=True).augment is False
    assert PhotoCrops("train", 32, 16, 4).augment is False


def test_crop_larger_than_some_photos():
    # chelsea / clock are 300 px high: the photo is up-scaled to fit the crop
    src = PhotoCrops("train", 320, 80, 4, seed=0, scale_range=None)
    for step in range(3):
        b = src.batch_at(step)
        assert b["image"].shape == (4, 320, 320, 3) and b["image_lowres"].shape == (4, 80, 80, 3)
    with pytest.raises(ValueError):
        PhotoCrops("train", 64, 24, 4)


# ---------------------------------------------------------------- low-res / PSU


@pytest.mark.parametrize("src_name", ["train_src", "val_src"])
def test_lowres_is_downsample_and_psu_is_bilinear(src_name, request):
    src = request.getfixturevalue(src_name)
    b = src.batch_at(1)
    np.testing.assert_array_equal(b["image_lowres"], downsample(b["image"], src.factor))
    np.testing.assert_allclose(
        b["latent_lowres"], upsample_bilinear(b["image_lowres"], src.image_size), rtol=0, atol=1e-6
    )
    ref = _torch_resize(b["image_lowres"], src.image_size, "bilinear", align_corners=False)
    np.testing.assert_allclose(b["latent_lowres"], ref, rtol=0, atol=1e-5)


def test_downsample_is_box_filter():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 12, 8, 3)).astype(np.float32)
    for f in (1, 2, 4):
        ref = _torch_resize(x, (12 // f, 8 // f), "area")
        np.testing.assert_allclose(downsample(x, f), ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(jax.jit(downsample, static_argnums=1)(jnp.asarray(x), f)), ref, atol=1e-6)
    # factor 2: identical to the original's non-antialiased bilinear down-sampling
    ref = _torch_resize(x, (6, 4), "bilinear", align_corners=False)
    np.testing.assert_allclose(downsample(x, 2), ref, rtol=0, atol=1e-6)
    assert downsample(np.zeros((4, 4, 3), np.uint8), 2).dtype == np.float32
    with pytest.raises(ValueError):
        downsample(x, 5)


@pytest.mark.parametrize("in_hw,out_hw", [((12, 8), (24, 16)), ((12, 8), (37, 29)), ((12, 8), (12, 8)),
                                          ((72, 88), (299, 299)), ((512, 384), (299, 299)),
                                          ((37, 53), (299, 299)), ((10, 7), (4, 13)), ((1, 5), (3, 2))])
def test_bilinear_resize_matches_torch(in_hw, out_hw):
    """The project's one bilinear resize (PSU, Inception input, baselines) against PyTorch's
    F.interpolate, up and down, on numpy (host) and jitted jax inputs."""
    x = np.random.default_rng(1).uniform(-1, 1, (2, *in_hw, 3)).astype(np.float32)
    ref = _torch_resize(x, out_hw, "bilinear", align_corners=False)
    out_np = image_ops.resize(x, out_hw, "bilinear")
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float32 and out_np.shape == ref.shape
    out_jax = np.asarray(jax.jit(image_ops.resize, static_argnums=(1, 2))(jnp.asarray(x), out_hw, "bilinear"))
    # torch's weights bit for bit; its kernel may fuse a multiply-add: at most a few float32 ulps
    for out in (out_np, out_jax):
        np.testing.assert_allclose(out, ref, rtol=0, atol=4e-7)
    if out_hw[0] >= in_hw[0] and out_hw[1] >= in_hw[1]:
        np.testing.assert_array_equal(upsample_bilinear(x, out_hw), out_np)
        # for up-sampling jax.image.resize is the same filter (its weights differ in rounding)
        j = jax.image.resize(jnp.asarray(x), (2, *out_hw, 3), "bilinear")
        np.testing.assert_allclose(out_np, np.asarray(j), rtol=0, atol=1e-5)


def test_upsample_bicubic_conventions():
    x = np.random.default_rng(2).uniform(-1, 1, (2, 12, 8, 3)).astype(np.float32)
    size = (48, 20)
    ref_t = _torch_resize(x, size, "bicubic", align_corners=False)
    np.testing.assert_allclose(upsample_bicubic(x, size, convention="torch"), ref_t, atol=1e-5)
    ref_j = np.asarray(jax.image.resize(jnp.asarray(x), (2, *size, 3), "bicubic"))
    np.testing.assert_allclose(upsample_bicubic(x, size), ref_j, atol=1e-5)
    np.testing.assert_allclose(np.asarray(upsample_bicubic(jnp.asarray(x), size)), ref_j, atol=1e-5)
    # the two conventions really differ (a=-0.5 vs a=-0.75)
    assert np.abs(ref_t - ref_j).max() > 1e-3
    with pytest.raises(ValueError):
        upsample_bicubic(x, (6, 4))


def test_to_uint8_inverts_to_unit_range_on_host_and_in_jit():
    from cfm_jax.data.image_ops import to_uint8, to_unit_range
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    unit = to_unit_range(u8)
    assert unit.dtype == np.float32 and unit.min() == -1.0 and unit.max() == 1.0
    np.testing.assert_array_equal(to_uint8(unit), u8)
    np.testing.assert_array_equal(jax.jit(to_uint8)(jnp.asarray(unit)), u8)
    np.testing.assert_array_equal(to_uint8(np.array([-1.5, -1.0, 0.0, 1.0, 2.0])), [0, 0, 128, 255, 255])
    assert to_uint8(u8) is u8
