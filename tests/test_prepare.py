"""Latent records: the bad-input policy of image loading, record contents (pixel space and a
tiny random autoencoder), resuming, several processes, and reading back through TFDS."""
import io
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
import tensorflow_datasets as tfds
from PIL import Image

from cfm_jax.coupling import resize
from cfm_jax.data import image_io, image_ops, prepare, records
from cfm_jax.first_stage import AutoencoderFirstStage
from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params
from tests.random_weights import random_params

SIZE, LOWRES = 32, 16
EXPECTED_SKIPS = {"corrupt": ["truncated.jpg"], "not_an_image": ["fake.png"], "too_small": ["tiny.png"]}


def _exif_rotated_pixels():
    """A 40x60 (HxW) picture of smooth gradients along x and y: as stored, before orientation."""
    y, x = np.mgrid[0:40, 0:60]
    return np.stack([x * 4, y * 6, 255 - 2 * x - 2 * y], -1).astype(np.uint8)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Real photos plus broken and odd images (12 image files, 3 of them skipped, 4 ignored)."""
    root = tmp_path_factory.mktemp("src")
    (root / "nested").mkdir()
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.jpg", quality=95)
    Image.fromarray(skimage.data.chelsea()).save(root / "chelsea.JPEG", quality=95)
    Image.fromarray(skimage.data.coffee()).save(root / "nested" / "coffee.png")
    Image.fromarray(skimage.data.camera()[::8, ::8]).save(root / "gray.png")  # L, 64x64
    rgba = np.concatenate([skimage.data.coffee()[:48, :64], np.zeros((48, 64, 1), np.uint8)], -1)
    rgba[:, 32:, 3] = 255
    rgba[:, 16:32, 3] = 128
    Image.fromarray(rgba).save(root / "rgba.png")  # left quarter transparent, then half, then opaque
    palette = Image.fromarray(skimage.data.chelsea()[:48, :64]).convert("P")
    palette.save(root / "palette.png", transparency=int(np.asarray(palette)[0, 0]))  # that entry transparent
    Image.fromarray(skimage.data.coffee()[:40, :48]).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 40).reshape(40, 48) * 34).astype(np.uint16)).save(root / "gray16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(_exif_rotated_pixels()).save(root / "exif_rotated.jpg", exif=exif, quality=95)
    Image.fromarray(skimage.data.astronaut()[:20, :20]).save(root / "tiny.png")
    jpg = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(jpg, format="JPEG")
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (root / "fake.png").write_text("this is not a picture\n")
    (root / "notes.txt").write_text("ignored\n")
    Image.fromarray(skimage.data.astronaut()[:64, :64]).save(root / "anim.gif")
    (root / ".hidden.jpg").write_bytes(jpg.getvalue())
    return str(root)


def _prepare(src, out, **kw):
    kw = {"image_size": SIZE, "lowres_size": LOWRES, "images_per_shard": 3, "batch_size": 4, "progress": False,
          **kw}
    return prepare.prepare(src, str(out), **kw)


@pytest.fixture(scope="module")
def pixel_run(src, tmp_path_factory):
    """One uninterrupted pixel-space run, laid out as DATA_DIR/cfm_latents/1.0.0."""
    data_dir = tmp_path_factory.mktemp("data")
    out = data_dir / "cfm_latents" / "1.0.0"
    return str(data_dir), str(out), _prepare(src, out)


def _shard_bytes(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))
            if ".array_record-" in f or f in records.METADATA_FILES}


def _by_file(source):
    return {(source[i]["file_name"].decode(), int(source[i]["crop_index"])): source[i] for i in range(len(source))}


# --------------------------------------------------------------------------- image_io
def test_listing_is_sorted_recursive_and_ignores_other_files(src):
    images, ignored = image_io.list_images(src)
    assert images == ["astronaut.jpg", "chelsea.JPEG", "cmyk.jpg", "exif_rotated.jpg", "fake.png", "gray.png",
                      "gray16.png", "nested/coffee.png", "palette.png", "rgba.png", "tiny.png", "truncated.jpg"]
    assert ignored == [".hidden.jpg", "anim.gif", "notes.txt"]


def test_load_policy_for_odd_images(src):
    def load(name, **kw):
        return image_io.load_image(os.path.join(src, name), **kw)

    for name, reason in (("truncated.jpg", "corrupt"), ("fake.png", "not_an_image")):
        assert load(name).skip_reason == reason, load(name)
    small = load("tiny.png", min_size=32)
    assert small.skip_reason == "too_small" and "20x20" in small.detail
    assert load("tiny.png", min_size=20).ok

    gray = load("gray.png").image
    assert gray.dtype == np.uint8 and gray.shape == (64, 64, 3)
    np.testing.assert_array_equal(gray, np.repeat(skimage.data.camera()[::8, ::8, None], 3, -1))
    g16 = np.asarray(Image.open(os.path.join(src, "gray16.png")))
    assert g16.dtype == np.uint16 and g16.max() > 255  # a real 16-bit range, not clipped at 255
    np.testing.assert_array_equal(load("gray16.png").image[..., 1], np.round(g16 / 257.0).astype(np.uint8))

    rgba = np.asarray(Image.open(os.path.join(src, "rgba.png"))).astype(int)
    out = load("rgba.png").image.astype(int)  # composited onto white
    assert out.shape == (48, 64, 3)
    np.testing.assert_array_equal(out[:, :16], 255)
    np.testing.assert_array_equal(out[:, 32:], rgba[:, 32:, :3])
    np.testing.assert_allclose(out[:, 16:32], (rgba[:, 16:32, :3] * 128 + 255 * 127) / 255, atol=1)

    pal = Image.open(os.path.join(src, "palette.png"))
    assert pal.mode == "P"
    idx, rgb = np.asarray(pal), np.asarray(pal.convert("RGB"))
    transparent = idx == pal.info["transparency"]
    assert 0 < transparent.mean() < 1
    expected = np.where(transparent[..., None], 255, rgb)
    np.testing.assert_array_equal(load("palette.png").image, expected)

    cmyk = Image.open(os.path.join(src, "cmyk.jpg"))
    assert cmyk.mode == "CMYK"
    np.testing.assert_array_equal(load("cmyk.jpg").image, np.asarray(cmyk.convert("RGB")))

    rotated = load("exif_rotated.jpg")
    stored = np.asarray(Image.open(os.path.join(src, "exif_rotated.jpg")))  # decoded, not rotated
    assert stored.shape == (40, 60, 3) and rotated.original_size == (60, 40)
    np.testing.assert_array_equal(rotated.image, np.rot90(stored, k=-1))  # turned clockwise
    np.testing.assert_allclose(rotated.image.astype(int), np.rot90(_exif_rotated_pixels(), k=-1), atol=8)


def _within(seconds, fn, *args, release=None, **kw):
    """``fn(*args, **kw)`` in a thread; fails instead of hanging if it takes longer than
    ``seconds`` (then opens the FIFO ``release`` for writing, which frees a blocked reader)."""
    import threading

    result = {}
    thread = threading.Thread(target=lambda: result.update(value=fn(*args, **kw)), daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if release:
            os.close(os.open(release, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{getattr(fn, '__name__', fn)} still running after {seconds} s (blocked on a FIFO?)")
    return result["value"]


def test_a_fifo_named_like_an_image_is_skipped_not_read(tmp_path):
    """A named pipe called ``*.png`` would block ``open`` forever: it is skipped as
    ``not_a_file`` by loading and by prepare, which names it in the summary."""
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(skimage.data.astronaut()[:64, :64]).save(src / "photo.png")
    os.mkfifo(src / "pipe.png")
    assert image_io.list_images(str(src))[0] == ["photo.png", "pipe.png"]
    loaded = _within(10, image_io.load_image, str(src / "pipe.png"), release=str(src / "pipe.png"))
    assert loaded.skip_reason == "not_a_file" and loaded.detail == "a FIFO (named pipe), not a regular file"
    summary = _within(60, _prepare, str(src), tmp_path / "out", release=str(src / "pipe.png"))
    assert summary["finalized"] and summary["examples"] == 1
    assert summary["skipped"] == {"not_a_file": ["pipe.png"]}
    assert "FIFO" in summary["skip_details"]["pipe.png"]


# --------------------------------------------------------------------------- records
def test_pixel_space_records_contents_and_summary(pixel_run, src):
    data_dir, out, summary = pixel_run
    assert summary["complete"] and summary["finalized"] and summary["num_shards"] == 4
    assert summary["skipped"] == EXPECTED_SKIPS
    assert "truncated" in summary["skip_details"]["truncated.jpg"]
    assert summary["images_written"] == 9 and summary["examples"] == 9
    assert summary["ignored"] == [".hidden.jpg", "anim.gif", "notes.txt"]
    saved = json.load(open(os.path.join(out, "summary_train.json")))
    assert saved["skipped"] == EXPECTED_SKIPS and saved["num_examples"] == 9

    source = tfds.builder_from_directory(out).as_data_source(split="train")
    assert len(source) == 9
    ex = source[0]
    assert set(ex) == {"image", "latent", "latent_lowres", "file_name", "original_size", "crop_index",
                       "crop_offset"}
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (SIZE, SIZE, 3)
    for key in ("latent", "latent_lowres"):
        assert ex[key].dtype == np.float32 and ex[key].shape == (SIZE, SIZE, 3)
    images = np.stack([source[i]["image"] for i in range(len(source))])
    image_f = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    np.testing.assert_array_equal(np.stack([source[i]["latent"] for i in range(9)]), image_f)
    np.testing.assert_allclose(np.stack([source[i]["latent_lowres"] for i in range(9)]),
                               image_ops.upsample_bilinear(image_ops.downsample(image_f, SIZE // LOWRES), SIZE),
                               atol=2e-6)

    by_file = _by_file(source)
    assert sorted(f for f, _ in by_file) == sorted(
        f for f in image_io.list_images(src)[0] if f not in sum(EXPECTED_SKIPS.values(), []))
    # The whole pipeline for two files, restated with PIL: a JPEG decoded in draft mode (DCT scaling),
    # antialiased bicubic resize of the short side, centre crop.
    with Image.open(os.path.join(src, "astronaut.jpg")) as im:
        im.draft("RGB", (SIZE, SIZE))
        expected = np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(by_file["astronaut.jpg", 0]["image"], expected)
    np.testing.assert_array_equal(by_file["astronaut.jpg", 0]["original_size"], [512, 512])
    rotated = by_file["exif_rotated.jpg", 0]
    stored = np.asarray(Image.open(os.path.join(src, "exif_rotated.jpg")))
    upright = np.asarray(Image.fromarray(np.rot90(stored, k=-1)).resize((SIZE, 48), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(rotated["original_size"], [60, 40])
    np.testing.assert_array_equal(rotated["crop_offset"], [8, 0])
    np.testing.assert_array_equal(rotated["image"], upright[8:8 + SIZE])

    meta = records.dataset_metadata(out)
    assert (meta["image_size"], meta["lowres_size"], meta["downsample_factor"], meta["scale_factor"]) == (
        SIZE, LOWRES, 2, 1.0)
    assert meta["first_stage"]["kind"] == "identity" and meta["splits"]["train"]["num_examples"] == 9


def test_records_read_back_through_tfds_data_source_and_grain(pixel_run):
    import grain

    data_dir, out, _ = pixel_run
    a = tfds.data_source("cfm_latents", data_dir=data_dir, split="train")
    b = records.data_source(out, "train")
    assert len(a) == len(b) == 9
    for i in (0, 8):
        for key in ("image", "latent", "latent_lowres", "original_size", "crop_offset"):
            np.testing.assert_array_equal(a[i][key], b[i][key])
    batch = next(iter(grain.MapDataset.source(a).batch(4)))
    assert batch["latent"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8


def test_autoencoder_records_equal_encode_of_the_same_crops(src, tmp_path):
    model = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
    fs = AutoencoderFirstStage(params=random_params(abstract_params(model), seed=3), model=model,
                               scale_factor=0.18215, name="tiny_ae")
    sub = tmp_path / "src"
    sub.mkdir()
    for name in ("astronaut.jpg", "gray.png", "rgba.png"):
        (sub / name).write_bytes(open(os.path.join(src, name), "rb").read())
    summary = _prepare(str(sub), tmp_path / "out", first_stage=fs, with_moments=True, crop="random",
                       crops_per_image=2, seed=5, short_side=40)
    assert summary["finalized"] and summary["examples"] == 6
    source = records.data_source(str(tmp_path / "out"))
    ex = [source[i] for i in range(len(source))]
    assert [(e["file_name"], e["crop_index"]) for e in ex] == [
        (n, c) for n in (b"astronaut.jpg", b"gray.png", b"rgba.png") for c in (0, 1)]
    offsets = [e["crop_offset"].tolist() for e in ex]  # random crops of images resized to a 40 px short side
    assert len({tuple(o) for o in offsets}) > 3 and all(0 <= v <= 40 - SIZE for o in offsets[:4] for v in o)
    for key, shape in (("latent", (16, 16, 4)), ("latent_lowres", (16, 16, 4)), ("moments", (16, 16, 8)),
                       ("moments_lowres", (16, 16, 8))):
        assert ex[0][key].dtype == np.float32 and ex[0][key].shape == shape, key
    image = jnp.asarray(np.stack([e["image"] for e in ex]), jnp.float32) / 127.5 - 1.0
    lowres = image_ops.downsample(image, SIZE // LOWRES)
    np.testing.assert_allclose(np.stack([e["latent"] for e in ex]), fs.encode_unscaled(image),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.stack([e["latent_lowres"] for e in ex]),
                               fs.encode_unscaled(resize(lowres, (SIZE, SIZE), "bilinear")), rtol=1e-4, atol=1e-4)
    for e in ex:
        np.testing.assert_array_equal(e["moments"][..., :4], e["latent"])
        np.testing.assert_array_equal(e["moments_lowres"][..., :4], e["latent_lowres"])
    meta = records.dataset_metadata(str(tmp_path / "out"))
    assert meta["scale_factor"] == pytest.approx(0.18215) and meta["with_moments"] is True
    assert meta["first_stage"]["kind"] == "autoencoder_kl" and len(meta["first_stage"]["params_sha256"]) == 64


# --------------------------------------------------------------------------- resuming, processes
def test_interrupted_runs_resume_to_identical_bytes(pixel_run, src, tmp_path, monkeypatch):
    _, reference, _ = pixel_run
    out = tmp_path / "out"
    first = _prepare(src, out, max_shards=1)  # stops after one shard
    assert first["shards_written"] == [0] and not first["complete"] and not first["finalized"]
    assert not os.path.exists(out / "dataset_info.json")

    real_load = image_io.load_image

    def crash_on_rgba(path, **kw):  # shard 3 holds rgba.png, tiny.png, truncated.jpg
        if path.endswith("rgba.png"):
            raise KeyboardInterrupt("simulated kill")
        return real_load(path, **kw)

    monkeypatch.setattr(image_io, "load_image", crash_on_rgba)
    with pytest.raises(KeyboardInterrupt):
        _prepare(src, out)
    monkeypatch.setattr(image_io, "load_image", real_load)
    assert not os.path.exists(out / "dataset_info.json")
    shard_files = sorted(f for f in os.listdir(out) if ".array_record-" in f)
    assert shard_files[-1] != "cfm_latents-train.array_record-00003-of-00004"  # nothing of the crashed shard

    final = _prepare(src, out)
    assert final["shards_already_done"] == [0, 1, 2] and final["shards_written"] == [3] and final["finalized"]
    assert final["skipped"] == EXPECTED_SKIPS  # includes files of shards written by earlier runs
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert len(records.data_source(str(out))) == 9  # no duplicates
    assert os.listdir(out / "_prepare" / "tmp") == []
    again = _prepare(src, out)  # a finished folder: nothing to do
    assert again["shards_written"] == [] and again["finalized"]


def test_two_identical_runs_write_identical_bytes(tmp_path):
    """Two runs of the same command in two processes (other Python hash seeds, which used to
    reorder the tf.train.Example feature map) write the same bytes in every file but the
    per-process summary (its timings and output path)."""
    from tests.test_trainer import run_cli

    src = tmp_path / "src"
    src.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()[:96, :96]).save(src / f"{name}.jpg", quality=90)
    runs = []
    for seed in ("1", "2"):
        out = tmp_path / f"run{seed}"
        proc = run_cli(["-m", "cfm_jax.data.prepare", "--src", str(src), "--out", str(out), "--image_size", "32",
                        "--lowres_size", "16", "--crop", "random", "--crops_per_image", "2",
                        "--images_per_shard", "2", "--no_progress"], env={"PYTHONHASHSEED": seed}, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append({os.path.relpath(os.path.join(d, f), out): open(os.path.join(d, f), "rb").read()
                     for d, _, files in os.walk(out) for f in files if not f.startswith("summary_process")})
    assert sorted(runs[0]) == sorted(runs[1])
    assert sum(".array_record-" in f for f in runs[0]) == 2 and "dataset_info.json" in runs[0]
    assert [f for f in runs[0] if runs[0][f] != runs[1][f]] == []


def test_two_processes_write_disjoint_shards_that_cover_the_data(pixel_run, src, tmp_path):
    _, reference, _ = pixel_run
    out = tmp_path / "out"
    p0 = _prepare(src, out, num_processes=2, process_index=0)
    assert p0["shards_written"] == [0, 2] and p0["complete"] and not p0["finalized"]
    p1 = _prepare(src, out, num_processes=2, process_index=1)
    assert p1["shards_written"] == [1, 3] and p1["finalized"]  # the last one to finish writes the metadata
    assert p0["skipped"] == {} and p1["skipped"] == EXPECTED_SKIPS  # shards 1 and 3 hold the broken files
    assert _shard_bytes(out) == _shard_bytes(reference)


def test_changed_settings_or_files_fail_instead_of_mixing(pixel_run, src, tmp_path):
    _, reference, _ = pixel_run
    with pytest.raises(ValueError, match="image_size"):
        _prepare(src, reference, image_size=16, lowres_size=8)
    sub = tmp_path / "src"
    sub.mkdir()
    (sub / "astronaut.jpg").write_bytes(open(os.path.join(src, "astronaut.jpg"), "rb").read())
    with pytest.raises(ValueError, match="file list changed"):
        _prepare(str(sub), reference)


def test_cli_on_the_bundled_photos(tmp_path, capsys):
    out = tmp_path / "photos"
    assert prepare.main([prepare.PROG, "--src", "photos:validation", "--split", "validation", "--out", str(out),
                         "--image_size", "64", "--lowres_size", "16", "--no_progress"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["finalized"] and printed["examples"] == 4
    source = records.data_source(str(out), "validation")
    assert [source[i]["file_name"] for i in range(2)] == [b"skimage.data.astronaut", b"skimage.data.coffee"]
    ex = source[1]  # coffee 400x600 -> short side 64 (64x96), centre crop
    np.testing.assert_array_equal(ex["original_size"], [400, 600])
    np.testing.assert_array_equal(ex["crop_offset"], [0, 16])
    assert ex["latent_lowres"].shape == (64, 64, 3) and records.dataset_metadata(str(out))["downsample_factor"] == 4


def test_native_size_cap_and_zoomed_out_crops():
    """short_side=0 keeps native pixels, max_short_side caps large images, min_scale < 1 crops a
    larger region resampled by PIL (checked against PIL directly) and stays inside the image."""
    image = skimage.data.astronaut()  # 512 x 512
    rng = np.random.default_rng(0)
    native = image_ops.make_crops(image, image_size=64, crop="random", crops_per_image=3, rng=rng)
    for crop, (top, left) in native:
        np.testing.assert_array_equal(crop, image[top:top + 64, left:left + 64])
    zoomed = image_ops.make_crops(image, image_size=64, crop="random", crops_per_image=20,
                                rng=np.random.default_rng(1), min_scale=0.25)
    u = np.random.default_rng(1).random((20, 3))
    for (crop, (top, left)), (us, uy, ux) in zip(zoomed, u):
        side = 64 / np.exp(np.log(0.25) * (1 - us))
        assert 64 <= side <= 256 + 1e-9 and 0 <= top <= 512 - side + 0.5 and 0 <= left <= 512 - side + 0.5
        ref = Image.fromarray(image).resize((64, 64), Image.Resampling.BICUBIC,
                                            box=(ux * (512 - side), uy * (512 - side),
                                                 ux * (512 - side) + side, uy * (512 - side) + side))
        np.testing.assert_array_equal(crop, np.asarray(ref))
    with pytest.raises(ValueError, match="min_scale"):
        prepare.prepare("photos:validation", "/nonexistent", image_size=64, lowres_size=32, min_scale=0.5)
    with pytest.raises(ValueError, match="max_short_side"):
        prepare.prepare("photos:validation", "/nonexistent", image_size=64, lowres_size=32, max_short_side=32)


def test_photos_at_native_size_with_a_cap(tmp_path):
    out = str(tmp_path / "native")
    s = prepare.prepare("photos:train", out, image_size=64, lowres_size=32, short_side=0, max_short_side=512,
                        crop="random", crops_per_image=1, progress=False)
    assert s["images_written"] == 11 and s["images_skipped"] == 0
    source = records.data_source(out, "train")
    rows = {source[i]["file_name"].decode(): source[i] for i in range(len(source))}
    cam = rows["skimage.data.camera"]  # 512 x 512 gray: native pixels
    top, left = cam["crop_offset"]
    expected = np.repeat(skimage.data.camera()[top:top + 64, left:left + 64, None], 3, -1)
    np.testing.assert_array_equal(cam["image"], expected)
    retina = rows["skimage.data.retina"]  # 1411 x 1411, reduced to 512
    top, left = retina["crop_offset"]
    assert top + 64 <= 512 and left + 64 <= 512
    reduced = image_ops.resize_short_side(skimage.data.retina(), 512)
    np.testing.assert_array_equal(retina["image"], reduced[top:top + 64, left:left + 64])
