"""Evaluation end to end: a tiny checkpoint trained on records, validated with FID and patch-FID
(random Inception weights) -> eval.py on their validation split (solver sweep) ->
metrics.json / CSV / report / grids / plots; the same numbers on 1 and 2 devices and as
training's validation; an image-folder evaluation set; option errors; streamed FID statistics;
the report's SVG plot; solver specs."""
import csv
import json
import os
import xml.etree.ElementTree as ET

import jax
import numpy as np
import pytest
from PIL import Image

from cfm_jax import evaluation, metrics
from cfm_jax.solvers import SolverSpec
from cfm_jax.trainer import train
from tests.random_weights import random_params
from tests.test_trainer import run_cli, tiny_config

FIELDS_SAME_ON_ANY_DEVICES = ("nfe", "psnr", "ssim", "mse", "fid", "patch_fid")


@pytest.fixture(scope="module")
def inception_dir(tmp_path_factory):
    """The FID Inception with random weights (the real file is user-supplied)."""
    from cfm_jax.convert.inception import save_converted
    from cfm_jax.models.inception import FIDInceptionV3

    out = str(tmp_path_factory.mktemp("inception"))
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), np.zeros((1, 299, 299, 3), np.float32))
    rng = np.random.default_rng(1)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, s: (1.0 + 0.2 * np.abs(rng.standard_normal(s.shape)) if p[-1].key == "var"
                      else 0.1 * rng.standard_normal(s.shape)).astype(np.float32), shapes["batch_stats"])
    # He-scaled kernels: activations keep their scale through the 90 layers, so features differ between images
    params = jax.tree_util.tree_map_with_path(
        lambda p, a: a * np.float32(np.sqrt(2.0)) if p[-1].key == "kernel" else a, random_params(shapes["params"]))
    save_converted(out, {"params": params, "batch_stats": stats},
                   source="random weights (test)")
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory, inception_dir):
    """A tiny run trained on prepared records (the photos, 8² -> 16²), validated at its last
    step with FID and patch-FID; eval.py reads their validation split."""
    from cfm_jax.data import train_data

    records = str(tmp_path_factory.mktemp("photo_records"))
    train_data.ensure_photo_records(records, image_size=16, lowres_size=8, progress=False)
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    c = tiny_config(num_steps=4, checkpoint_every=4, eval_every=4)
    c.data.update(name="records", path=records, prepare_photos=False, num_val_images=4)
    c.eval.update(inception=inception_dir, num_crops=2, crop_size=8)
    train(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def two_device_eval(trained, inception_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval2"))
    proc = run_cli(["eval.py", "--workdir", trained, "--solvers", "euler:3,heun:3,euler:5", "--inception",
                    inception_dir, "--num_crops", "2", "--crop_size", "8", "--out", out,
                    "--fid_stats", os.path.join(out, "real_stats.npz")],
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def _rows(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return {r["label"]: r for r in json.load(f)["results"]}


def test_eval_writes_every_report_with_all_metrics(two_device_eval):
    out, proc = two_device_eval
    with open(os.path.join(out, "metrics.json")) as f:
        record = json.load(f)
    assert record["devices"] == 2 and record["num_images"] == 4 and record["weights"] == "ema"
    assert record["data"].startswith("records") and record["data"].endswith("split validation")
    assert record["fid"]["num_crops"] == 2 and record["fid"]["crop_size"] == 8
    rows = {r["label"]: r for r in record["results"]}
    assert set(rows) == {"euler-3", "heun-3", "euler-5", "bicubic", "bilinear"}
    assert [rows[k]["nfe"] for k in ("euler-3", "heun-3", "euler-5", "bicubic")] == [2, 4, 4, 0]
    for label, r in rows.items():
        for k in ("psnr", "ssim", "mse", "fid", "patch_fid"):
            assert r[k] is not None and np.isfinite(r[k]), (label, k)
        assert r["fid"] > 0 and r["patch_fid"] > 0
    # random Inception weights still see that bilinear is blurrier than bicubic
    assert rows["bilinear"]["fid"] > rows["bicubic"]["fid"]
    # CSV carries the same numbers
    with open(os.path.join(out, "metrics.csv")) as f:
        csv_rows = {r["label"]: r for r in csv.DictReader(f)}
    for label, r in rows.items():
        assert float(csv_rows[label]["psnr"]) == pytest.approx(r["psnr"], rel=1e-12)
        assert float(csv_rows[label]["fid"]) == pytest.approx(r["fid"], rel=1e-12)
    # interior scores beside the full ones: the default rim of a pixel-space run is 4 px, at most
    # (16 - 11) // 2 = 2 px here (an SSIM window must stay)
    for label, r in rows.items():
        assert r["rim"] == 2 and 0 < r["mse_interior"] and r["psnr_interior"] != r["psnr"], label
        assert float(csv_rows[label]["psnr_interior"]) == pytest.approx(r["psnr_interior"], rel=1e-12)
    assert "interior PSNR (rim 2 px)" in open(os.path.join(out, "report.md")).read()
    # grids: a title row, then 2 images enlarged x16 to 256 px; columns high | bilinear | bicubic | cfm
    grid = np.asarray(Image.open(os.path.join(out, "grid_euler-3.png")))
    title = grid.shape[0] - 2 * 256
    assert grid.shape == (title + 2 * 256, 4 * 256, 3) and title >= 20
    for col in range(4):  # every column has its title (dark text on white)
        assert grid[:title, col * 256:(col + 1) * 256].min() < 100
    tiles = grid[title:].reshape(2 * 16, 16, 4 * 16, 16, 3)
    assert (tiles == tiles[:, :1, :, :1]).all()  # nearest-neighbour enlargement: whole pixels
    for metric in ("psnr", "ssim", "fid", "patch_fid"):
        root = ET.parse(os.path.join(out, f"{metric}_vs_nfe.svg")).getroot()
        assert root.tag.endswith("svg")
    report = open(os.path.join(out, "report.md")).read()
    assert "psnr_vs_nfe.svg" in report and "| bicubic |" in report and "patch-FID" in report
    assert os.path.exists(os.path.join(out, "real_stats.npz")) and os.path.exists(
        os.path.join(out, "real_stats_crops.npz"))
    assert "bicubic" in proc.stdout


def test_eval_numbers_do_not_depend_on_the_device_count_or_the_sweep(trained, inception_dir, two_device_eval,
                                                                     tmp_path):
    """1 device, euler:3 alone, FID reference statistics read back from the 2-device run's cache."""
    out2, _ = two_device_eval
    out1 = str(tmp_path / "eval1")
    proc = run_cli(["eval.py", "--workdir", trained, "--solvers", "euler:3", "--inception", inception_dir,
                    "--num_crops", "2", "--crop_size", "8", "--out", out1,
                    "--fid_stats", os.path.join(out2, "real_stats.npz")],
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    one, two = _rows(out1), _rows(out2)
    assert set(one) == {"euler-3", "bicubic", "bilinear"}
    for label in one:
        for k in FIELDS_SAME_ON_ANY_DEVICES:
            # FID of 4 images (rank-deficient covariances) amplifies float32 feature rounding
            rtol = 1e-3 if "fid" in k else 1e-5
            assert one[label][k] == pytest.approx(two[label][k], rel=rtol, abs=1e-6), (label, k)
    # eval.py's defaults (the run's sampler, seed and validation set) give the numbers training
    # logged at its last step: both use the same evaluator
    with open(os.path.join(trained, "train_summary.json")) as f:
        val = json.load(f)["validation"]
    assert val["val/nfe"] == one["euler-3"]["nfe"]
    for method, label in (("cfm", "euler-3"), ("bicubic", "bicubic"), ("bilinear", "bilinear")):
        for k in ("psnr", "ssim", "mse"):
            assert val[f"val/{method}_{k}"] == pytest.approx(one[label][k], rel=1e-6), (method, k)
        for k in ("fid", "patch_fid"):  # reference statistics from the 2-device run's cache
            assert val[f"val/{method}_{k}"] == pytest.approx(one[label][k], rel=1e-3), (method, k)


def test_validation_logs_fid_and_patch_fid(trained):
    """With eval.inception set, training's validation logs FID and patch-FID of the CFM
    prediction and of the baselines, and the usual grid."""
    with open(os.path.join(trained, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/cfm_fid")]
    assert len(rows) == 1 and rows[0]["step"] == "4"
    for method in ("cfm", "bicubic", "bilinear"):
        for k in ("fid", "patch_fid", "psnr", "ssim", "mse", "psnr_mean_mse", "psnr_interior", "ssim_interior",
                  "psnr_mean_mse_interior"):
            v = float(rows[0][f"val/{method}_{k}"])
            assert np.isfinite(v) and (v > 0 or k == "mse"), (method, k)
    grid = np.asarray(Image.open(os.path.join(trained, "samples", "val_0000004.png")))
    # a title row, then train.num_grid_images rows: high-res | bilinear | bicubic | CFM, enlarged to 256 px
    assert grid.shape[1:] == (4 * 256, 3) and grid.shape[0] - 2 * 256 >= 20


def test_eval_on_a_folder_of_images(trained, tmp_path):
    import skimage.data

    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).save(folder / f"{name}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")  # smaller than 16²: skipped
    out = str(tmp_path / "ev")
    proc = run_cli(["eval.py", "--workdir", trained, "--images", str(folder), "--num_images", "4", "--out", out,
                    "--solvers", "euler:2", "--inception="])  # FID off (the run's eval.inception is set)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "metrics.json")) as f:
        record = json.load(f)
    assert record["num_images"] == 3 and "centre crops" in record["data"]
    rows = {r["label"]: r for r in record["results"]}
    assert rows["euler-2"]["fid"] is None and "not computed" in open(os.path.join(out, "report.md")).read()
    # the baselines scored here equal the metrics of the same crops computed directly
    from cfm_jax import metrics
    from cfm_jax.data import image_ops

    crops = [image_ops.make_crops(image_ops.resize_short_side(getattr(skimage.data, n)(), 16), image_size=16,
                                crop="center", crops_per_image=1)[0][0] for n in ("astronaut", "chelsea", "coffee")]
    hr = image_ops.to_unit_range(np.stack(crops))
    bic = image_ops.upsample_bicubic(image_ops.downsample_antialiased(hr, 8), 16)
    assert rows["bicubic"]["psnr"] == pytest.approx(float(np.mean(metrics.psnr(bic, hr))), rel=1e-5)


def test_eval_rejects_bad_options_before_loading(trained, tmp_path):
    proc = run_cli(["eval.py", "--workdir", trained, "--solvers", "eulr:3"])
    assert proc.returncode == 2 and "Unknown sampler method 'eulr'" in proc.stderr
    proc = run_cli(["eval.py", "--workdir", trained, "--solvers", "euler:x"])
    assert proc.returncode == 2 and "integer number of grid points" in proc.stderr
    proc = run_cli(["eval.py", "--workdir", trained, "--inception", str(tmp_path / "missing.pth")])
    assert proc.returncode == 2 and "pt_inception" in proc.stderr
    proc = run_cli(["eval.py", "--workdir", str(tmp_path)])
    assert proc.returncode == 2 and "config.json" in proc.stderr


def test_image_folder_set_reads_batch_by_batch_and_explains_bad_folders(tmp_path):
    from cfm_jax.data import eval_data

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")  # smaller than 16²: skipped
    s = eval_data.image_folder_set(str(folder), image_size=16, lowres_size=8, num_images=10, batch_size=2,
                                   n_devices=1)
    assert (s.num_images, s.batch_size, s.num_batches) == (5, 2, 3)
    first, again = list(s), list(s)  # re-iterable: every pass reads the images afresh
    assert [len(b["image"]) for b in first] == [2, 2, 1]
    assert first[0]["image"].shape == (2, 16, 16, 3) and first[0]["image_lowres"].shape == (2, 8, 8, 3)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
    os.remove(folder / "4.png")  # images are loaded when their batch is read, not before
    with pytest.raises(RuntimeError, match="not any more"):
        list(s)
    with pytest.raises(ValueError, match=r"4 usable image\(s\).*at least 8 \(one per device\)"):
        eval_data.image_folder_set(str(folder), image_size=16, lowres_size=8, num_images=8, batch_size=8,
                                   n_devices=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="No images"):
        eval_data.image_folder_set(str(tmp_path / "empty"), image_size=16, lowres_size=8, num_images=4,
                                   batch_size=2, n_devices=1)


def test_streamed_feature_statistics_equal_pytorch_fids():
    """FeatureStats keeps the features of small sets, then only their sums: the mean and the
    covariance equal fid.statistics of all the features at once."""
    from cfm_jax import fid

    rng = np.random.default_rng(0)
    features = rng.standard_normal((40, 6)).astype(np.float32) + 3.0
    small, large = evaluation.FeatureStats(keep=64), evaluation.FeatureStats(keep=8)
    for chunk in np.split(features, [5, 12, 30]):
        small.add(chunk)
        large.add(chunk)
    mu, sigma = fid.statistics(features)
    np.testing.assert_array_equal(small.reference()["features"], features)
    assert "features" not in large.reference()
    for ref in (small.reference(), large.reference()):
        np.testing.assert_allclose(ref["mu"], mu, rtol=1e-12)
        np.testing.assert_allclose(ref["sigma"], sigma, rtol=1e-10, atol=1e-12)


def test_solver_specs_parse_and_label():
    specs = SolverSpec.parse_list("euler:40, rk4:10,dopri5:1e-4,sde_heun:20")
    assert [s.label for s in specs] == ["euler-40", "rk4-10", "dopri5-rtol1e-04", "sde_heun-20-sigma-Mean"]
    assert [s.expected_nfe() for s in specs[:2]] == [39, 36] and specs[2].expected_nfe() is None
    assert specs[2].rtol == 1e-4 and specs[3].is_sde and not specs[0].is_sde
    assert "rtol" not in specs[0].as_dict() and "diffusion_form" in specs[3].as_dict()
    with pytest.raises(ValueError, match="grid points"):
        SolverSpec(method="euler", num_steps=1)
    with pytest.raises(ValueError, match="diffusion_form"):
        SolverSpec(method="sde_euler", diffusion_form="cosine")


def test_nfe_plot_places_points_by_value():
    R = evaluation.MethodResult
    results = [R("cfm", "euler-3", {"method": "euler", "num_steps": 3}, 2, 30.0, 0.9, 0.001),
               R("cfm", "euler-9", {"method": "euler", "num_steps": 9}, 8, 32.0, 0.95, 0.0006),
               R("cfm", "rk4-3", {"method": "rk4", "num_steps": 3}, 8, 31.5, 0.94, 0.0007),
               R("bicubic", "bicubic", None, 0, 31.0, 0.92, 0.0008)]
    fig = evaluation.nfe_figure(results, "psnr", title="t")
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert sorted(lines) == ["CFM euler", "CFM rk4", "bicubic"]  # one line per solver family, the baseline
    np.testing.assert_array_equal(lines["CFM euler"].get_xdata(), [2, 8])
    np.testing.assert_array_equal(lines["CFM euler"].get_ydata(), [30.0, 32.0])
    assert lines["bicubic"].get_linestyle() == "--" and list(lines["bicubic"].get_ydata()) == [31.0, 31.0]
    assert ax.get_xscale() == "log"
    assert evaluation.nfe_figure(results, "fid", title="t") is None  # no FID: no plot


def _strict_json(path):
    """Parses like a strict JSON parser: a bare NaN / Infinity / -Infinity is an error."""
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")
    with open(path) as f:
        return json.load(f, parse_constant=refuse)


def test_flat_images_keep_means_finite_and_metrics_json_strict(tmp_path):
    """A flat (saturated white) image is up-sampled exactly by bilinear: its PSNR would be
    +inf. The set mean uses the per-image PSNR capped at metrics.PSNR_MAX_DB, the PSNR
    of the mean MSE is reported beside it, and metrics.json is strict JSON (a NaN FID becomes
    null and is named)."""
    import dataclasses

    from cfm_jax import metrics, sharding
    from cfm_jax.data import eval_data, image_ops
    from cfm_jax.model import CFMUpsampler

    rng = np.random.default_rng(0)
    image = np.stack([np.ones((16, 16, 3), np.float32),  # flat white
                      rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)])
    lowres = np.asarray(image_ops.downsample(image, 2), np.float32)
    eval_set = eval_data.EvalSet(num_images=2, batch_size=2, image_size=16, description="a flat and a noisy image",
                                 read=lambda: iter([{"image": image, "image_lowres": lowres}]))
    mesh = sharding.make_data_mesh(jax.devices()[:1])
    ev = evaluation.Evaluator(CFMUpsampler(tiny_config()), eval_set, mesh, num_grid=1)
    results, grids = ev.run(None, [])
    bilinear = next(r for r in results if r.method == "bilinear")
    up = np.asarray(image_ops.upsample_bilinear(lowres, 16), np.float32)
    per_image = np.asarray(metrics.psnr(up, image))
    assert np.isposinf(per_image[0]) and np.isfinite(per_image[1])  # uncapped: the mean would be +inf
    assert bilinear.psnr == pytest.approx((metrics.PSNR_MAX_DB + per_image[1]) / 2, rel=1e-6)
    assert bilinear.psnr_mean_mse == pytest.approx(-10 * np.log10(np.mean(metrics.mse(up, image))), rel=1e-5)
    assert all(np.isfinite([r.psnr, r.psnr_mean_mse, r.ssim, r.mse]).all() for r in results)

    record = {"checkpoint": "test", "step": 0, "weights": "ema", "data": eval_set.description, "num_images": 2,
              "image_size": 16, "lowres_size": 8, "seed": 0, "fid": None}
    results[1] = dataclasses.replace(results[1], fid=float("nan"), patch_fid=float("inf"))  # a degenerate FID
    evaluation.write_reports(str(tmp_path), record, results, grids)
    written = _strict_json(tmp_path / "metrics.json")
    assert written["psnr_max_db"] == metrics.PSNR_MAX_DB
    assert written["results"][1]["psnr"] == pytest.approx(bilinear.psnr)
    assert written["results"][1]["fid"] is None and written["results"][1]["patch_fid"] is None
    assert written["non_finite"]["fields"] == ["results[1].fid", "results[1].patch_fid"]
    with open(tmp_path / "metrics.csv") as f:
        assert "psnr_mean_mse" in next(csv.reader(f))
    assert evaluation.finite_json({"a": [1.0, np.float32("-inf")], "b": np.int64(3)}) == ({"a": [1.0, None], "b": 3},
                                                                                           ["a[1]"])


def test_interior_scores_leave_out_the_rim():
    """An error only in a 2-pixel frame: the full image has it, the interior without a 2-pixel rim
    is exact (PSNR at the cap); a rim that leaves less than an SSIM window is refused."""
    target = np.random.default_rng(0).uniform(-1, 1, (2, 24, 24, 3)).astype(np.float32)
    pred = target.copy()
    pred[:, :2] += 0.5
    pred[:, :, -2:] -= 0.5
    s = jax.tree.map(np.asarray, evaluation.image_scores(pred, target, rim=2))
    assert (s["mse"] > 1e-3).all() and (s["mse_interior"] == 0).all()
    assert (s["psnr_interior"] == metrics.PSNR_MAX_DB).all() and (s["psnr"] < 40).all()
    # SSIM's valid 11-px Gaussian window reaches a 2-px rim only with its tails: barely below 1
    assert np.allclose(s["ssim_interior"], 1.0) and (s["ssim"] < 0.9999).all()
    s1 = jax.tree.map(np.asarray, evaluation.image_scores(pred, target, rim=1))
    assert (s1["mse_interior"] > 0).all()  # a 1-pixel rim leaves half of the frame in
    with pytest.raises(ValueError, match="SSIM window"):
        evaluation.check_rim(7, 24)
    assert evaluation.check_rim(6, 24) == 6
