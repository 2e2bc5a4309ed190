"""data.lowres_filter: 'bilinear' is the original's F.interpolate, 'box' the exact area average; every
place that makes a low-res image (photo crops, records, the record loader, image folders) honours it."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cfm_jax.data import eval_data, image_ops, photos, pipeline, prepare, records, train_data
from cfm_jax.first_stage import IdentityFirstStage
from configs.common import base_config


def torch_bilinear(x, size):
    """The original's low-res image: resize_ims(x, size, mode='bilinear') on NHWC numpy."""
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return F.interpolate(t, size=size, mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 40, 40, 3)).astype(np.float32)


@pytest.mark.parametrize("size", [20, 10, 16, 24, 5])  # x2, x4, x2.5, x1.5 (non-integer), x8
def test_bilinear_equals_torch_interpolate(images, size):
    ref = torch_bilinear(images, size)
    np.testing.assert_allclose(image_ops.make_lowres(images, size, "bilinear"), ref, rtol=1e-5, atol=1e-6)
    jitted = jax.jit(lambda x: image_ops.make_lowres(x, size, "bilinear"))(jnp.asarray(images))
    np.testing.assert_allclose(jitted, ref, rtol=1e-5, atol=1e-6)


def test_box_and_bilinear_agree_at_x2_only(images):
    np.testing.assert_allclose(image_ops.make_lowres(images, 20, "box"), image_ops.make_lowres(images, 20, "bilinear"),
                               rtol=0, atol=1e-6)
    assert image_ops.lowres_filters_agree(40, 20) and not image_ops.lowres_filters_agree(40, 10)
    box4, bilinear4 = image_ops.make_lowres(images, 10, "box"), image_ops.make_lowres(images, 10, "bilinear")
    assert np.abs(box4 - bilinear4).max() > 0.1
    # bilinear /4 without antialiasing averages 2 of every 4 rows and columns: rows 1, 2 of each 4
    np.testing.assert_allclose(bilinear4, images.reshape(2, 10, 4, 10, 4, 3)[:, :, 1:3, :, 1:3].mean((2, 4)),
                               atol=1e-6)


@pytest.mark.parametrize("factor", [1, 2, 4, 5, 8])
def test_box_at_integer_factors_is_todays_block_mean_bit_for_bit(images, factor):
    """Records and runs made before the area weights keep their exact low-res images."""
    size = 40 // factor
    np.testing.assert_array_equal(image_ops.make_lowres(images, size, "box"), image_ops.downsample(images, factor))
    np.testing.assert_array_equal(image_ops.downsample_antialiased(images, size), image_ops.downsample(images, factor))
    np.testing.assert_array_equal(jax.jit(lambda x: image_ops.make_lowres(x, size, "box"))(jnp.asarray(images)),
                                  image_ops.downsample(jnp.asarray(images), factor))
    # the area weights are the same filter (to float rounding)
    np.testing.assert_allclose(image_ops.make_lowres(images, size, "box"),
                               image_ops.resize(images, size, "area"), rtol=0, atol=1e-6)


def _box_weights(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of the 'box' filter along the height, read off ``make_lowres`` of
    one-hot images (image k is 1 at row k): output o of image k is the weight of row k in o."""
    one_hot = np.eye(n_in, dtype=np.float32).reshape(n_in, n_in, 1, 1)
    return image_ops.make_lowres(one_hot, (n_out, 1), "box")[:, :, 0, 0].T


@pytest.mark.parametrize("n_in, n_out", [(3, 2), (5, 2), (40, 16), (40, 24), (1024, 683), (7, 7), (12, 3)])
def test_area_weights_sum_to_one_per_output(n_in, n_out):
    w = _box_weights(n_in, n_out)
    assert w.shape == (n_out, n_in) and w.dtype == np.float32 and (w >= 0).all()
    np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    # every input pixel counts as much as any other: n_out / n_in of it in all
    np.testing.assert_allclose(w.sum(axis=0), n_out / n_in, rtol=0, atol=1e-6)


def test_area_weights_by_hand():
    # x1.5: output 0 covers [0, 1.5) = all of pixel 0 and half of pixel 1, over a length of 1.5
    np.testing.assert_allclose(_box_weights(3, 2), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]],
                               rtol=0, atol=1e-7)
    # x2.5: [0, 2.5) and [2.5, 5)
    np.testing.assert_allclose(_box_weights(5, 2), [[0.4, 0.4, 0.2, 0, 0], [0, 0, 0.2, 0.4, 0.4]],
                               rtol=0, atol=1e-7)
    image = np.arange(9, dtype=np.float32).reshape(1, 3, 3, 1)  # rows [0 1 2], [3 4 5], [6 7 8]
    # low-res pixel (0, 0) covers [0, 1.5)^2 (area 2.25): pixel 0 whole, 1 and 3 half, 4 a quarter
    top_left = (1 * 0 + 0.5 * 1 + 0.5 * 3 + 0.25 * 4) / 2.25
    expected = np.array([[top_left, 8 / 3], [16 / 3, 20 / 3]])  # 3 x 3 -> 2 x 2, the others alike
    assert top_left == pytest.approx(4 / 3)
    for x in (image, jnp.asarray(image)):
        np.testing.assert_allclose(np.asarray(image_ops.make_lowres(x, 2, "box"))[0, :, :, 0], expected, atol=1e-6)


@pytest.mark.parametrize("size", [16, 24, (16, 24), 10])  # x2.5, x1.5, both, x4
def test_box_keeps_a_constant_image_constant(size):
    for value in (-1.0, 0.3, 1.0):
        flat = np.full((1, 40, 40, 3), value, np.float32)
        np.testing.assert_allclose(image_ops.make_lowres(flat, size, "box"), value, rtol=0, atol=1e-6)
        np.testing.assert_allclose(jax.jit(lambda x: image_ops.make_lowres(x, size, "box"))(jnp.asarray(flat)), value,
                                   rtol=0, atol=1e-6)


def test_box_at_x1_5_averages_every_pixel_instead_of_copying_some():
    """PIL's BOX (the old non-integer box) makes, at x1.5, a 2-pixel mean and then a copy of one
    pixel; the area average gives each low-res pixel 2/3 of one pixel and 1/3 of the next."""
    rows = np.zeros((12, 12, 12, 1), np.float32)
    rows[np.arange(12), np.arange(12)] = 1.0  # image k: a line of ones on row k
    response = image_ops.make_lowres(rows, 8, "box")[:, :, 4, 0].T  # [out row, impulse row k]
    np.testing.assert_allclose(response, np.kron(np.eye(4), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]]), atol=1e-6)
    assert response.max() < 0.67  # no output copies an input pixel
    pil = np.stack([np.asarray(Image.fromarray(r[:, :, 0]).resize((8, 8), Image.Resampling.BOX))[:, 4]
                    for r in rows], axis=1)
    assert pil.max() == pytest.approx(1.0)  # what it replaces: copied pixels


def test_box_at_non_integer_factors_is_jittable_and_matches_numpy(images):
    for size in (16, 24, (16, 24)):
        np.testing.assert_allclose(jax.jit(lambda x: image_ops.make_lowres(x, size, "box"))(jnp.asarray(images)),
                                   image_ops.make_lowres(images, size, "box"), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(image_ops.downsample_antialiased(images, 16), image_ops.make_lowres(images, 16, "box"))


def test_photo_crops_honour_the_filter():
    box = photos.PhotoCrops("validation", 32, 8, 2, lowres_filter="box").batch_at(0)
    bil = photos.PhotoCrops("validation", 32, 8, 2, lowres_filter="bilinear").batch_at(0)
    np.testing.assert_array_equal(box["image"], bil["image"])  # same crops
    np.testing.assert_array_equal(box["image_lowres"], image_ops.downsample(box["image"], 4))
    np.testing.assert_allclose(bil["image_lowres"], torch_bilinear(bil["image"], 8), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bil["latent_lowres"],
                               np.clip(image_ops.upsample_bilinear(bil["image_lowres"], 32), -1, 1), atol=1e-6)
    assert np.abs(box["image_lowres"] - bil["image_lowres"]).max() > 0.01


@pytest.mark.parametrize("bad", ["lanczos", "Bilinear", ""])
def test_unknown_filter_is_a_clear_error(bad, tmp_path):
    match = r"data\.lowres_filter=.*choose one of \('box', 'bilinear'\)"
    with pytest.raises(ValueError, match=match):
        photos.PhotoCrops("validation", 32, 16, 2, lowres_filter=bad)
    with pytest.raises(ValueError, match=match):
        image_ops.make_lowres(np.zeros((1, 8, 8, 3), np.float32), 4, bad)
    config = base_config()
    config.data.lowres_filter = bad
    with pytest.raises(ValueError, match=match):
        train_data.make_data(config, IdentityFirstStage(), n_devices=1)
    with pytest.raises(ValueError, match=match):
        prepare.prepare("photos:validation", str(tmp_path / "out"), image_size=32, lowres_size=8, lowres_filter=bad,
                        progress=False)
    assert not os.path.exists(tmp_path / "out")  # nothing written


@pytest.fixture(scope="module")
def bilinear_records(tmp_path_factory):
    """Pixel-space records of the two validation photos, 32 -> 8 px with the bilinear filter."""
    out = str(tmp_path_factory.mktemp("records"))
    prepare.prepare("photos:validation", out, split="validation", image_size=32, lowres_size=8,
                    lowres_filter="bilinear", progress=False)
    return out


def test_records_record_and_use_the_filter(bilinear_records):
    meta = records.dataset_metadata(bilinear_records)
    assert meta["lowres_method"] == "bilinear"
    assert pipeline.records_lowres_filter(meta) == "bilinear"
    batch = next(iter(pipeline.make_record_loader(bilinear_records, split="validation", batch_size=2,
                                                  shuffle=False, num_epochs=1, process_index=0, process_count=1)))
    np.testing.assert_allclose(batch["image_lowres"], torch_bilinear(batch["image"], 8), rtol=1e-5, atol=1e-6)
    # the stored PSU latent was made from that low-res image
    np.testing.assert_allclose(batch["latent_lowres"], image_ops.upsample_bilinear(batch["image_lowres"], 32),
                               atol=1e-5)
    assert image_ops.lowres_method("box", 32, 8) == "box" and image_ops.lowres_method("box", 30, 8) == "box_area"


def test_records_of_the_other_filter_are_refused(bilinear_records):
    config = base_config()
    config.data.update(name="records", path=bilinear_records, image_size=32, lowres_size=8, lowres_filter="box")
    with pytest.raises(ValueError, match=r"lowres_filter: records made with 'bilinear'.*data\.lowres_filter='box'"):
        train_data.check_records(bilinear_records, config, IdentityFirstStage())
    with pytest.raises(ValueError, match=r"--config\.data\.lowres_filter=bilinear"):
        pipeline.make_record_loader(bilinear_records, split="validation", batch_size=2, lowres_filter="box",
                                    process_index=0, process_count=1)
    config.data.lowres_filter = "bilinear"
    assert train_data.check_records(bilinear_records, config, IdentityFirstStage())["lowres_method"] == "bilinear"


def test_box_records_at_x2_fit_either_filter():
    meta = {"image_size": 32, "lowres_size": 16, "lowres_method": "box"}  # at x2 the filters are the same
    pipeline.check_lowres_filter_matches(meta, "bilinear")
    with pytest.raises(ValueError, match="prepared with the 'box' filter"):
        pipeline.check_lowres_filter_matches(dict(meta, lowres_size=8), "bilinear")
    # records older than the option carry no other filter
    assert pipeline.records_lowres_filter({"image_size": 32, "lowres_size": 8}) == "box"


def test_records_of_pils_box_filter_are_refused_with_the_fix():
    """Records of an older version at a non-integer factor were made with PIL's BOX, a filter no
    version makes now: reading them would pair new low-res images with their old latent_lowres."""
    meta = {"image_size": 40, "lowres_size": 16, "lowres_method": "pil_box"}
    fix = r"PIL's BOX filter.*python -m cfm_jax\.data\.prepare .*--image_size 40 --lowres_size 16 --lowres_filter box"
    for filter_ in image_ops.LOWRES_FILTERS:
        with pytest.raises(ValueError, match=fix):
            pipeline.check_lowres_filter_matches(meta, filter_, "/data/old")
    with pytest.raises(ValueError, match=r"records at /data/old were prepared by an older version"):
        pipeline.records_lowres_filter(meta, "/data/old")
    assert pipeline.records_lowres_filter(dict(meta, lowres_method="box_area")) == "box"


def test_image_folder_set_honours_the_filter(tmp_path):
    for name in ("astronaut", "coffee"):
        Image.fromarray(photos.load_photos("validation")[photos.VALIDATION_PHOTOS.index(name)]).save(
            tmp_path / f"{name}.png")
    sets = {f: eval_data.image_folder_set(str(tmp_path), image_size=32, lowres_size=8, num_images=2, batch_size=2,
                                          n_devices=1, lowres_filter=f) for f in image_ops.LOWRES_FILTERS}
    box, bil = (next(iter(sets[f])) for f in ("box", "bilinear"))
    np.testing.assert_array_equal(box["image"], bil["image"])
    np.testing.assert_array_equal(box["image_lowres"], image_ops.downsample(box["image"], 4))
    np.testing.assert_allclose(bil["image_lowres"], torch_bilinear(bil["image"], 8), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lowres_filter", image_ops.LOWRES_FILTERS)
def test_records_of_a_non_integer_factor_are_read_with_their_filter(lowres_filter, tmp_path):
    out = str(tmp_path)
    prepare.prepare("photos:validation", out, split="validation", image_size=40, lowres_size=16,
                    lowres_filter=lowres_filter, progress=False)
    assert records.dataset_metadata(out)["lowres_method"] == {"box": "box_area", "bilinear": "bilinear"}[lowres_filter]
    batch = next(iter(pipeline.make_record_loader(out, split="validation", batch_size=2, shuffle=False, num_epochs=1,
                                                  process_index=0, process_count=1)))
    np.testing.assert_allclose(batch["image_lowres"], image_ops.downsample_antialiased(batch["image"], 16, lowres_filter),
                               rtol=0, atol=1e-6)  # per example vs per batch: float rounding only
    np.testing.assert_allclose(batch["latent_lowres"], image_ops.upsample_bilinear(batch["image_lowres"], 40), atol=1e-5)
