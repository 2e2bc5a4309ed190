"""Records from the original's WebDataset tar shards (``image``, ``latent``, ``latent_lowres``):
stored latents copied bit for bit (unscaled, [C, h, h] -> [h, h, C]), bad samples skipped with a
reason naming tar, key and member, brace patterns, tar_base, image-only shards, truncated tars."""
import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from cfm_jax.data import prepare, records, webdataset_source
from cfm_jax.first_stage import AutoencoderFirstStage
from cfm_jax.models.autoencoder import AutoencoderKL, abstract_params
from tests.random_weights import random_params

SIZE, LOWRES = 16, 8
GOOD = ["train-000000.tar/s0", "train-000000.tar/s2", "train-000001.tar/s5"]
EXPECTED_SKIPS = {"not_an_image": ["train-000000.tar/s1"], "missing_key": ["train-000000.tar/s3"],
                  "bad_latent": ["train-000001.tar/s4"],
                  "wrong_shape": ["train-000001.tar/s6", "train-000001.tar/s7"]}


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(i: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _latent(i: int, channels: int, side: int, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(100 + i).standard_normal((channels, side, side)) * 5).astype(dtype)


def _write_shards(folder, channels: int, side: int) -> dict:
    """Two shards of four samples (three good, five bad, see EXPECTED_SKIPS) written with
    webdataset's own ShardWriter; returns the good samples as stored."""
    good = {}
    samples = []
    for i in range(8):
        s = {"__key__": f"s{i}", "image.png": _png(_pixels(i)), "latent.npy": _latent(i, channels, side),
             "latent_lowres.npy": _latent(50 + i, channels, side)}
        if i == 1:
            s["image.png"] = b"garbage, not a PNG"
        if i == 2:  # float16 latents: float32 holds them exactly
            s["latent.npy"], s["latent_lowres.npy"] = (_latent(i, channels, side, np.float16),
                                                       _latent(50 + i, channels, side, np.float16))
        if i == 3:
            del s["latent_lowres.npy"]
        if i == 4:
            buf = io.BytesIO()
            np.save(buf, _latent(i, channels, side))
            s["latent.npy"] = buf.getvalue()[:-40]  # truncated .npy
        if i == 6:  # a low-res latent not on the high-res grid (not PSU)
            s["latent_lowres.npy"] = _latent(50 + i, channels, side // 2)
        if i == 7:
            s["image.png"] = _png(_pixels(i, SIZE - 4))
        samples.append(s)
        if i in (0, 2, 5):
            good[f"train-{i // 4:06d}.tar/s{i}"] = {"image": _pixels(i), "latent": s["latent.npy"],
                                                     "latent_lowres": s["latent_lowres.npy"]}
    with wds.ShardWriter(os.path.join(str(folder), "train-%06d.tar"), maxcount=4, verbose=0) as sink:
        for s in samples:
            sink.write(s)
    return good


@pytest.fixture(scope="module")
def tiny_ae():
    model = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4)
    return AutoencoderFirstStage(params=random_params(abstract_params(model), seed=3), model=model,
                                 scale_factor=0.18215, name="tiny_ae")


def _check_records(out, good: dict) -> None:
    source = records.data_source(str(out))
    assert [source[i]["file_name"].decode() for i in range(len(source))] == list(good)
    for i, (name, want) in enumerate(good.items()):
        ex = source[i]
        np.testing.assert_array_equal(ex["image"], want["image"])
        for key in ("latent", "latent_lowres"):
            stored = want[key]
            assert ex[key].dtype == np.float32
            # Unscaled as stored (the original multiplies by scale_factor at load time), channels last.
            np.testing.assert_array_equal(ex[key], np.transpose(stored, (1, 2, 0)).astype(np.float32))
        np.testing.assert_array_equal(ex["original_size"], [SIZE, SIZE])
        assert int(ex["crop_index"]) == 0 and ex["crop_offset"].tolist() == [0, 0]


def test_stored_latents_are_copied_and_bad_samples_skipped_with_reasons(tmp_path, tiny_ae):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = _write_shards(shards, channels=4, side=SIZE // 2)
    out = tmp_path / "out"
    summary = prepare.prepare(str(shards / "train-{000000..000001}.tar"), str(out), image_size=SIZE,
                              lowres_size=LOWRES, first_stage=tiny_ae, progress=False)
    assert summary["finalized"] and summary["num_shards"] == 2 and summary["num_files"] == 2
    assert summary["examples"] == summary["images_written"] == 3
    assert summary["skipped"] == EXPECTED_SKIPS and summary["images_skipped"] == 5
    details = summary["skip_details"]
    assert details["train-000000.tar/s1"].startswith("s1.image.png: ")
    assert "latent_lowres" in details["train-000000.tar/s3"]
    assert details["train-000001.tar/s4"].startswith("s4.latent.npy: ")
    assert details["train-000001.tar/s6"].startswith("s6.latent_lowres.npy: shape (4, 4, 4), expected (4, 8, 8)")
    assert details["train-000001.tar/s7"].startswith("s7.image.png: 12x12")
    _check_records(out, good)

    meta = records.dataset_metadata(str(out))
    assert meta["scale_factor"] == pytest.approx(0.18215) and meta["first_stage"]["kind"] == "autoencoder_kl"
    assert (meta["latent_size"], meta["latent_channels"]) == (8, 4)
    assert meta["splits"]["train"]["webdataset_latents"] == "stored"
    again = prepare.prepare(str(shards / "train-{000000..000001}.tar"), str(out), image_size=SIZE,
                            lowres_size=LOWRES, first_stage=tiny_ae, progress=False)
    assert again["shards_already_done"] == [0, 1] and again["shards_written"] == []


def test_cli_with_tar_base_and_several_patterns(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = _write_shards(shards, channels=3, side=SIZE)  # pixel space: identity first stage, [3, H, H]
    out = tmp_path / "out"
    assert prepare.main([prepare.PROG, "--src", "train-000000.tar", "--src", "train-{000001..000001}.tar",
                         "--tar_base", str(tmp_path / "missing"), "--tar_base", str(shards), "--out", str(out),
                         "--image_size", str(SIZE), "--lowres_size", str(LOWRES), "--no_progress"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed["examples"] == 3 and printed["skipped"] == EXPECTED_SKIPS and printed["finalized"]
    assert "skipped (bad_latent): train-000001.tar/s4: s4.latent.npy: " in captured.err
    assert "skipped (not_an_image): train-000000.tar/s1: s1.image.png: " in captured.err
    _check_records(out, good)


def test_image_only_shards_take_the_normal_path(tmp_path):
    """Without latents the images are decoded and encoded like a folder of the same files."""
    folder, shards = tmp_path / "folder", tmp_path / "shards"
    folder.mkdir()
    shards.mkdir()
    with wds.ShardWriter(str(shards / "img-%06d.tar"), maxcount=2, verbose=0) as sink:
        for i in range(3):
            pixels = _pixels(i, 24 + 4 * i)
            sink.write({"__key__": f"k{i}", "jpg" if i == 1 else "image.png": _png(pixels)})
            Image.fromarray(pixels).save(folder / f"k{i}.png")
        sink.write({"__key__": "k3", "image.png": _png(_pixels(3))[:80]})  # truncated PNG
    kw = dict(image_size=SIZE, lowres_size=LOWRES, progress=False)
    from_tars = prepare.prepare(str(shards / "img-{000000..000001}.tar"), str(tmp_path / "a"), **kw)
    from_folder = prepare.prepare(str(folder), str(tmp_path / "b"), **kw)
    assert from_tars["examples"] == from_folder["examples"] == 3
    assert from_tars["skipped"] == {"corrupt": ["img-000001.tar/k3"]}
    assert from_tars["skip_details"]["img-000001.tar/k3"].startswith("k3.image.png: ")
    a, b = records.data_source(str(tmp_path / "a")), records.data_source(str(tmp_path / "b"))
    assert [a[i]["file_name"] for i in range(3)] == [b"img-000000.tar/k0", b"img-000000.tar/k1",
                                                      b"img-000001.tar/k2"]
    for i in range(3):
        for key in ("image", "latent", "latent_lowres", "original_size", "crop_offset"):
            np.testing.assert_array_equal(a[i][key], b[i][key])
    assert records.dataset_metadata(str(tmp_path / "a"))["splits"]["train"]["webdataset_latents"] == "encode"


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "t-%06d.tar"), maxcount=10, verbose=0) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i}", "image.png": _png(_pixels(i)), "latent.npy": _latent(i, 3, SIZE),
                        "latent_lowres.npy": _latent(50 + i, 3, SIZE)})
    path = shards / "t-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[:data.index(b"s2.image.png") + 200])  # inside the header of sample s2
    summary = prepare.prepare(str(path), str(tmp_path / "out"), image_size=SIZE, lowres_size=LOWRES,
                              progress=False)
    assert summary["examples"] == 2 and summary["skipped"] == {"corrupt_shard": ["t-000000.tar"]}
    assert "2 samples read" in summary["skip_details"]["t-000000.tar"]
    assert "end-of-archive" in summary["skip_details"]["t-000000.tar"]


def test_clear_errors(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "x-%06d.tar"), verbose=0) as sink:
        sink.write({"__key__": "a", "image.png": _png(_pixels(0)), "latent.pyd": b"pickle",
                    "latent_lowres.npy": _latent(0, 3, SIZE)})
    kw = dict(image_size=SIZE, lowres_size=LOWRES, progress=False)
    with pytest.raises(FileNotFoundError, match="1 of 2 shards do not exist"):
        prepare.prepare(str(shards / "x-{000000..000001}.tar"), str(tmp_path / "o1"), **kw)
    with pytest.raises(ValueError, match="unsupported latent format"):  # pickles are not loaded
        prepare.prepare(str(shards / "x-000000.tar"), str(tmp_path / "o2"), **kw)
    with pytest.raises(ValueError, match="written as they are"):
        prepare.prepare(str(shards / "x-000000.tar"), str(tmp_path / "o3"), crop="random", **kw)
    with pytest.raises(FileNotFoundError, match="tar_base"):
        webdataset_source.open_shards("x-000000.tar", [str(tmp_path / "nope")])
