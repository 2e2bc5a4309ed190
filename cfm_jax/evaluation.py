"""Offline evaluation of a CFM checkpoint (the library behind ``eval.py``).

For every solver of a sweep (:class:`cfm_jax.solvers.SolverSpec`) the checkpoint up-samples
the evaluation set, and the prediction is compared with the ground truth by

* PSNR, SSIM, MSE per image (:mod:`cfm_jax.metrics`: dm-pix, checked against
  scikit-image), averaged over the set;
* FID over whole images and patch-FID over ``num_crops`` random ``crop_size``² crops per
  image, the same positions in the real and the generated image (as the original's
  ``ImageMetricTracker``), with the FID Inception network of :mod:`cfm_jax.fid` when its
  weights are given.

Bicubic and bilinear up-sampling of the same low-res images are scored the same way as
baselines (they do not depend on the solver, so they are computed once).

Sharding and determinism: each global batch is split over every device of every process
(``sharding.shard_batch``); predictions, Inception features and per-image scores are
gathered to every process, which all write the same numbers (process 0 writes the files).
Example ``i`` of the set draws its coupling / SDE noise and its crop positions from
``fold_in(PRNGKey(seed), i)``, so results do not depend on the batch size, the number of
devices or hosts, or which other solvers are in the sweep.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax import fid as fid_lib
from cfm_jax import metrics as image_metrics
from cfm_jax import sharding
from cfm_jax.data import photos

log = logging.getLogger(__name__)

BASELINES = ("bicubic", "bilinear")
FEATURE_BATCH = 32  # images per Inception call (a multiple of the device count)
_CROP_STREAM = 7  # fold_in stream of the patch-FID crop positions (noise uses streams 0/1 of the sample key)


# --------------------------------------------------------------------------- data
def image_folder_batches(folder: str, *, image_size: int, lowres_size: int, num_images: int, batch_size: int,
                         n_devices: int) -> list[dict]:
    """Evaluation batches from a folder of high-res images: the short side resized to
    ``image_size`` (PIL bicubic, antialiased), the centre ``image_size``² crop, its low-res
    version by the records' area down-sampling. Images smaller than ``image_size`` are
    skipped with a warning (they have no high-res ground truth)."""
    from cfm_jax.data import image_io, prepare

    names, _ = image_io.list_images(folder)
    if not names:
        raise FileNotFoundError(f"No images ({image_io.IMAGE_EXTENSIONS}) in {folder}.")
    crops, skipped = [], []
    for name in names:
        if len(crops) >= num_images:
            break
        loaded = image_io.load_image(os.path.join(folder, name), min_size=image_size)
        if not loaded.ok:
            skipped.append(f"{name} ({loaded.skip_reason}: {loaded.detail})")
            continue
        img = prepare.resize_short_side(loaded.image, image_size)
        crops.append(prepare.make_crops(img, image_size=image_size, crop="center", crops_per_image=1)[0][0])
    if skipped:
        log.warning("Skipped %d image(s) of %s: %s", len(skipped), folder, "; ".join(skipped[:5]))
    n = len(crops) - len(crops) % n_devices
    if n == 0:
        raise ValueError(f"{folder}: {len(crops)} usable image(s) of at least {image_size}² pixels; need at least "
                         f"{n_devices} (one per device).")
    if n < len(crops):
        log.warning("Evaluating %d of %d images (a multiple of the %d devices).", n, len(crops), n_devices)
    images = prepare.to_unit_range(np.stack(crops[:n]))
    lowres = prepare.downsample_antialiased(images, lowres_size)
    bs = max(n_devices, batch_size - batch_size % n_devices)
    return [{"image": images[i:i + bs], "image_lowres": lowres[i:i + bs]} for i in range(0, n, bs)]


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class MethodResult:
    """Scores of one method (a solver of the CFM model, or a baseline) on the set."""

    method: str  # "cfm" or a baseline name
    label: str  # solver label for CFM, the baseline's name otherwise
    solver: dict | None
    nfe: int
    psnr: float
    ssim: float
    mse: float
    fid: float | None = None
    patch_fid: float | None = None
    seconds_per_image: float | None = None  # sampling + decoding, compile excluded
    compile_seconds: float | None = None

    def row(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FIDConfig:
    features: Any  # fid.InceptionFeatures, or None: no FID
    num_crops: int = 4
    crop_size: int = 0  # 0: image_size // 2 (the paper: 512 of 1024)
    reference_stats: str | None = None  # npz (pytorch-fid format) of the real images: read if present, else written


# --------------------------------------------------------------------------- the evaluator
class Evaluator:
    """Runs sweeps of solvers over fixed evaluation batches on a mesh."""

    def __init__(self, upsampler, params, batches: Sequence[dict], mesh, *, seed: int = 0,
                 fid: FIDConfig | None = None, num_grid: int = 8):
        if not batches:
            raise ValueError("The evaluation set is empty.")
        self.upsampler = upsampler
        self.batches = list(batches)
        self.mesh = mesh
        self.rng = jax.random.PRNGKey(seed)
        self.fid = fid if (fid is not None and fid.features is not None) else None
        self.num_grid = num_grid
        self.params = jax.device_put(params, sharding.replicated(mesh))
        self.image_size = int(self.batches[0]["image"].shape[1])
        self.num_images = sum(len(b["image"]) for b in self.batches)
        n_dev = mesh.devices.size
        for i, b in enumerate(self.batches):
            if len(b["image"]) % n_dev:
                raise ValueError(f"Evaluation batch {i} has {len(b['image'])} images, not a multiple of the {n_dev} "
                                 "devices.")
        self.crop_size = 0
        if self.fid is not None:
            self.crop_size = self.fid.crop_size or self.image_size // 2
            if not 1 <= self.crop_size <= self.image_size:
                raise ValueError(f"patch-FID crop_size={self.crop_size} does not fit {self.image_size}² images.")
            if self.fid.num_crops < 1:
                raise ValueError(f"patch-FID num_crops must be >= 1, got {self.fid.num_crops}.")
        self._gather = jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))
        self._latents = upsampler.make_latents_fn()

        @jax.jit
        def scores(pred, target):
            return {"psnr": image_metrics.psnr(pred, target), "ssim": image_metrics.ssim(pred, target),
                    "mse": image_metrics.mse(pred, target)}
        self._scores = scores
        self._compiled: dict = {}
        self._latent_cache: dict[int, dict] = {}
        self._real = None
        if self.fid is not None:
            from cfm_jax.models import inception

            feats = self.fid.features
            self._to_299 = jax.jit(lambda x: inception.resize_bilinear(
                fid_lib.to_unit_range(x, value_range=feats.value_range, clip=feats.clip, quantize=feats.quantize),
                (inception.INPUT_SIZE, inception.INPUT_SIZE)))
            self._inception = jax.jit(feats.model.apply, out_shardings=sharding.replicated(mesh))

    # ---------------------------------------------------------------- helpers
    def _offsets(self) -> list[int]:
        return list(np.cumsum([0] + [len(b["image"]) for b in self.batches])[:-1])

    def _local(self, x: np.ndarray) -> np.ndarray:
        rows = len(x) // jax.process_count()
        p = jax.process_index()
        return x[p * rows:(p + 1) * rows]

    def _shard(self, arrays: dict) -> dict:
        return sharding.shard_batch({k: self._local(np.asarray(v)) for k, v in arrays.items()}, self.mesh)

    def _keys(self, start: int, n: int) -> np.ndarray:
        return np.asarray(jax.vmap(lambda i: jax.random.fold_in(self.rng, i))(jnp.arange(start, start + n)))

    def _prepared(self, i: int, batch: dict) -> dict:
        """``latent``/``latent_lowres`` (unscaled) of batch ``i``, sharded; encoded once (image
        folders with an autoencoder) and kept on the devices for the other solvers of a sweep."""
        if i not in self._latent_cache:
            if "latent_lowres" in batch:
                g = self._shard({k: batch[k] for k in ("latent", "latent_lowres")})
            else:
                g = self._latents(self._shard({k: batch[k] for k in ("image", "image_lowres")}))
            self._latent_cache[i] = {k: g[k] for k in ("latent", "latent_lowres")}
        return self._latent_cache[i]

    def _features(self, images: np.ndarray) -> np.ndarray:
        """Inception features [N, 2048] of host images (all rows; every process has them), in
        fixed-size batches split over the devices. Images are resized to 299² by a small
        jitted function first, so one compiled Inception serves whole images and crops."""
        n_dev = self.mesh.devices.size
        n = len(images)
        fb = -(-min(FEATURE_BATCH, n) // n_dev) * n_dev
        out = []
        for s in range(0, n, fb):
            chunk = np.asarray(images[s:s + fb])
            m = len(chunk)
            if m < fb:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fb - m, axis=0)])
            g = self._shard({"x": chunk})["x"]
            out.append((self._inception(self.fid.features.variables, self._to_299(g)), m))
        return np.concatenate([np.asarray(f)[:m] for f, m in out])

    def _crops(self, images: np.ndarray, start: int) -> np.ndarray:
        n = images.shape[0]
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(self.rng, i), _CROP_STREAM))(
            jnp.arange(start, start + n))
        anchors = jax.vmap(lambda k: fid_lib.crop_anchors(k, 1, self.fid.num_crops, self.image_size,
                                                          self.crop_size)[0])(keys)
        return np.asarray(fid_lib.take_crops(images, anchors, self.crop_size))

    def _predict_fn(self, solver) -> Callable:
        ups = self.upsampler

        def predict(params, fs, batch, keys):
            images, r = ups.predict(params, batch, keys, solver=solver, first_stage=fs)
            return images, r.nfe, r.success
        return jax.jit(predict)

    # ---------------------------------------------------------------- stats of a set
    def _accumulate(self, images_fn: Callable[[int, dict], Any]) -> tuple[dict, np.ndarray | None,
                                                                           np.ndarray | None, list]:
        """Per-image scores, features and crop features of the images ``images_fn(i, batch)``
        (a global array or host array per batch)."""
        per_image: dict[str, list] = {}
        feats, crop_feats, grid = [], [], []
        for i, (start, batch) in enumerate(zip(self._offsets(), self.batches)):
            images = images_fn(i, batch)
            full = images if isinstance(images, np.ndarray) else np.asarray(self._gather(images))
            for k, v in self._scores(full, batch["image"]).items():
                per_image.setdefault(k, []).append(np.asarray(v))
            if self.fid is not None:
                feats.append(self._features(full))
                crop_feats.append(self._features(self._crops(full, start)))
            if sum(len(g) for g in grid) < self.num_grid:
                grid.append(full)
        scores = {k: float(np.mean(np.concatenate(v))) for k, v in per_image.items()}
        if self.fid is None:
            return scores, None, None, grid
        return scores, np.concatenate(feats), np.concatenate(crop_feats), grid

    def real_reference(self) -> tuple[dict, dict]:
        """The real images' reference for FID, whole images and crops: each a dict with
        ``mu``, ``sigma`` and, for sets smaller than the feature dimension, ``features``.
        Read from ``FIDConfig.reference_stats`` (+ ``_crops``) when present, else computed
        (and written there)."""
        if self._real is None:
            path = self.fid.reference_stats
            paths = (path, _crop_stats_path(path)) if path else None
            if paths and all(os.path.exists(p) for p in paths):
                log.info("FID reference statistics from %s", path)
                self._real = tuple(_read_reference(p) for p in paths)
            else:
                _, f, cf, _ = self._accumulate(lambda i, b: np.asarray(b["image"]))
                self._real = tuple(_reference(x) for x in (f, cf))
                if paths and jax.process_index() == 0:
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
                    for p, ref in zip(paths, self._real):
                        fid_lib.save_stats(p, ref["mu"], ref["sigma"], features=ref.get("features"))
        return self._real

    def _fids(self, feats, crop_feats) -> tuple[float | None, float | None]:
        if self.fid is None:
            return None, None
        return tuple(_fid(ref, f) for ref, f in zip(self.real_reference(), (feats, crop_feats)))

    # ---------------------------------------------------------------- public
    def baselines(self) -> tuple[list[MethodResult], dict[str, list]]:
        results, grids = [], {}
        for name in BASELINES:
            fn = photos.upsample_bicubic if name == "bicubic" else photos.upsample_bilinear
            scores, f, cf, grid = self._accumulate(
                lambda i, b, fn=fn: np.asarray(fn(b["image_lowres"], self.image_size), np.float32))
            fid_v, patch = self._fids(f, cf)
            results.append(MethodResult(method=name, label=name, solver=None, nfe=0, fid=fid_v, patch_fid=patch,
                                        **scores))
            grids[name] = grid
        return results, grids

    def evaluate(self, solver, *, progress: Callable[[int, int], None] | None = None) -> tuple[MethodResult, list]:
        """Scores of the CFM model sampled with ``solver``; also the first grid images.
        ``progress(done, total)`` is called after every batch."""
        predict = self._predict_fn(solver)
        fs = self.upsampler.first_stage
        timing = {"run": 0.0, "compile": 0.0}
        nfe = [0]

        def images(i, batch):
            g = self._prepared(i, batch)
            start = self._offsets()[i]
            keys = self._shard({"k": self._keys(start, len(batch["image"]))})["k"]
            args = (self.params, fs, g, keys)
            shape_key = (solver, tuple(g["latent"].shape))
            t0 = time.perf_counter()
            if shape_key not in self._compiled:
                self._compiled[shape_key] = predict.lower(*args).compile()
                timing["compile"] += time.perf_counter() - t0
                t0 = time.perf_counter()
            pred, n, ok = self._compiled[shape_key](*args)
            pred.block_until_ready()
            timing["run"] += time.perf_counter() - t0
            if not bool(np.all(np.asarray(self._gather(ok)))):
                raise RuntimeError(f"Solver {solver.label} failed (non-finite values, or an adaptive solver hit "
                                   "max_steps): raise sample.max_steps in the run's config.json or loosen the "
                                   "tolerance (e.g. dopri5:1e-2).")
            nfe[0] = max(nfe[0], int(np.max(np.asarray(self._gather(n)))))
            if progress:
                progress(i + 1, len(self.batches))
            return pred

        scores, f, cf, grid = self._accumulate(images)
        fid_v, patch = self._fids(f, cf)
        result = MethodResult(method="cfm", label=solver.label, solver=solver.as_dict(), nfe=nfe[0], fid=fid_v,
                              patch_fid=patch, seconds_per_image=timing["run"] / self.num_images,
                              compile_seconds=timing["compile"], **scores)
        return result, grid

    def grid_rows(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        high = np.concatenate([b["image"] for b in self.batches])[:n]
        low = np.concatenate([b["image_lowres"] for b in self.batches])[:n]
        return np.asarray(high), np.asarray(photos.upsample_bilinear(low, self.image_size))


def _reference(features: np.ndarray) -> dict:
    mu, sigma = fid_lib.statistics(features)
    ref = {"mu": mu, "sigma": sigma}
    if len(features) <= features.shape[1]:  # small set: keep the features for the exact low-rank FID
        ref["features"] = features
    return ref


def _read_reference(path: str) -> dict:
    mu, sigma = fid_lib.load_stats(path)
    ref = {"mu": mu, "sigma": sigma}
    feats = fid_lib.load_features(path)
    if feats is not None:
        ref["features"] = feats
    return ref


def _fid(ref: dict, features: np.ndarray) -> float:
    """FID of generated features against a reference: the exact low-rank computation when
    both sets are small and the reference kept its features, else pytorch-fid's."""
    if "features" in ref:
        return fid_lib.features_fid(ref["features"], features)
    return fid_lib.frechet_distance(ref["mu"], ref["sigma"], *fid_lib.statistics(features))


def _crop_stats_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}_crops{ext or '.npz'}"


# --------------------------------------------------------------------------- reports
def image_grid(columns: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 grid: one row per image, one column per array of [N, H, W, 3] images in [-1, 1]."""
    rows = np.concatenate([np.asarray(c) for c in columns], axis=2)
    rows = rows.reshape((-1,) + rows.shape[2:])
    return np.clip(np.round((rows + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _family(r: MethodResult) -> str:
    if r.solver is None:
        return r.method
    s = r.solver
    if "rtol" in s:
        return s["method"]
    if "diffusion_form" in s:
        return f"{s['method']} ({s['diffusion_form']}, last {s['last_step']})"
    return s["method"]


def nfe_plot_svg(results: Sequence[MethodResult], metric: str, *, title: str, lower_is_better: bool = False) -> str:
    """A self-contained SVG line chart of ``metric`` against NFE, one line per solver family,
    baselines as dashed horizontal lines (no plotting library needed)."""
    cfm = [r for r in results if r.method == "cfm" and getattr(r, metric) is not None]
    base = [r for r in results if r.method != "cfm" and getattr(r, metric) is not None]
    if not cfm:
        return ""
    w, h, ml, mr, mt, mb = 640, 400, 70, 170, 40, 50
    xs = [max(r.nfe, 1) for r in cfm]
    ys = [getattr(r, metric) for r in cfm + base]
    x_lo, x_hi = math.log10(min(xs)), math.log10(max(xs))
    if x_hi - x_lo < 1e-9:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    y_lo, y_hi = min(ys), max(ys)
    pad = (y_hi - y_lo) * 0.08 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(nfe):
        return ml + (math.log10(max(nfe, 1)) - x_lo) / (x_hi - x_lo) * (w - ml - mr)

    def py(v):
        return mt + (y_hi - v) / (y_hi - y_lo) * (h - mt - mb)

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           'font-size="12">', f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle" font-size="14">{title}</text>',
           f'<line x1="{ml}" y1="{h - mb}" x2="{w - mr}" y2="{h - mb}" stroke="black"/>',
           f'<line x1="{ml}" y1="{mt}" x2="{ml}" y2="{h - mb}" stroke="black"/>',
           f'<text x="{(ml + w - mr) / 2}" y="{h - 12}" text-anchor="middle">NFE (log scale)</text>',
           f'<text x="16" y="{(mt + h - mb) / 2}" text-anchor="middle" transform="rotate(-90 16 '
           f'{(mt + h - mb) / 2})">{metric}{" (lower is better)" if lower_is_better else ""}</text>']
    for nfe in sorted(set(xs)):
        out.append(f'<line x1="{px(nfe):.1f}" y1="{h - mb}" x2="{px(nfe):.1f}" y2="{h - mb + 5}" stroke="black"/>')
        out.append(f'<text x="{px(nfe):.1f}" y="{h - mb + 18}" text-anchor="middle">{nfe}</text>')
    for k in range(5):
        v = y_lo + (y_hi - y_lo) * k / 4
        out.append(f'<text x="{ml - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>')
        out.append(f'<line x1="{ml}" y1="{py(v):.1f}" x2="{w - mr}" y2="{py(v):.1f}" stroke="#ddd"/>')
    families: dict[str, list[MethodResult]] = {}
    for r in cfm:
        families.setdefault(_family(r), []).append(r)
    legend_y = mt + 10
    for i, (fam, rs) in enumerate(families.items()):
        c = colours[i % len(colours)]
        rs = sorted(rs, key=lambda r: r.nfe)
        pts = " ".join(f"{px(r.nfe):.1f},{py(getattr(r, metric)):.1f}" for r in rs)
        out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>')
        out += [f'<circle cx="{px(r.nfe):.1f}" cy="{py(getattr(r, metric)):.1f}" r="3.5" fill="{c}"/>' for r in rs]
        out.append(f'<text x="{w - mr + 10}" y="{legend_y}" fill="{c}">CFM {fam}</text>')
        legend_y += 18
    for j, r in enumerate(base):
        c = "#555" if j == 0 else "#999"
        y = py(getattr(r, metric))
        out.append(f'<line x1="{ml}" y1="{y:.1f}" x2="{w - mr}" y2="{y:.1f}" stroke="{c}" stroke-dasharray="6,4"/>')
        out.append(f'<text x="{w - mr + 10}" y="{legend_y}" fill="{c}">{r.method} (dashed)</text>')
        legend_y += 18
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_table(results: Sequence[MethodResult]) -> str:
    lines = ["| method | solver | NFE | PSNR (dB) | SSIM | MSE | FID | patch-FID | s/image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.method} | {r.label if r.method == 'cfm' else '-'} | {r.nfe} | {r.psnr:.3f} | "
                     f"{r.ssim:.4f} | {r.mse:.5f} | {_fmt(r.fid, '.4g')} | {_fmt(r.patch_fid, '.4g')} | "
                     f"{_fmt(r.seconds_per_image, '.3f')} |")
    return "\n".join(lines)


CSV_FIELDS = ("method", "label", "nfe", "psnr", "ssim", "mse", "fid", "patch_fid", "seconds_per_image",
              "compile_seconds")


def write_reports(out: str, record: dict, results: Sequence[MethodResult], grids: dict[str, np.ndarray],
                  notes: Sequence[str] = ()) -> list[str]:
    """Writes metrics.json, metrics.csv, report.md, grid_<label>.png and, for sweeps, the
    quality-vs-NFE plots. Returns the file names."""
    import csv
    import json

    from PIL import Image

    os.makedirs(out, exist_ok=True)
    files = ["metrics.json", "metrics.csv", "report.md"]
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({**record, "results": [r.row() for r in results]}, f, indent=2)
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_FIELDS)
        for r in results:
            w.writerow(["" if getattr(r, k) is None else getattr(r, k) for k in CSV_FIELDS])
    for label, grid in grids.items():
        name = f"grid_{label}.png"
        Image.fromarray(grid).save(os.path.join(out, name))
        files.append(name)
    cfm = [r for r in results if r.method == "cfm"]
    plots = []
    if len(cfm) > 1:
        for metric, lower in (("psnr", False), ("ssim", False), ("fid", True), ("patch_fid", True)):
            svg = nfe_plot_svg(results, metric, title=f"{metric} against NFE", lower_is_better=lower)
            if svg:
                name = f"{metric}_vs_nfe.svg"
                with open(os.path.join(out, name), "w") as f:
                    f.write(svg)
                plots.append(name)
        files += plots
    d = record
    text = [f"# Evaluation of {d['checkpoint']}", "",
            f"Step {d['step']}, {d['weights']} weights; {d['num_images']} images "
            f"({d['lowres_size']}² -> {d['image_size']}²) from {d['data']}; seed {d['seed']}.", ""]
    if d.get("fid"):
        text += [f"FID: {d['fid']['inception']}; patch-FID over {d['fid']['num_crops']} random "
                 f"{d['fid']['crop_size']}² crops per image (the same positions in real and generated images).", ""]
    text += [markdown_table(results), ""]
    text += [f"- {n}" for n in notes]
    if notes:
        text.append("")
    text += [f"![{p}]({p})" for p in plots]
    if plots:
        text.append("")
    text += ["Grids, one row per image: high-res | low-res (bilinear) | CFM.", ""]
    text += [f"![{g}](grid_{g}.png)" for g in grids]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    return files
