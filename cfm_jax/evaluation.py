"""Scoring a CFM checkpoint on a fixed set of images: the one evaluator behind training
validation (``trainer.train``, every ``train.eval_every`` steps) and ``eval.py``.

For every solver (:class:`cfm_jax.solvers.SolverSpec`) the checkpoint up-samples the
evaluation set and the prediction is compared with the ground truth by

* PSNR, SSIM, MSE per image (:mod:`cfm_jax.metrics`: dm-pix, checked against
  scikit-image), averaged over the set. Per-image PSNR is capped at
  ``metrics.PSNR_MAX_DB`` (100 dB) before the mean, so one exact reconstruction (bilinear
  up-sampling of a flat image is one) cannot make it ``+inf``; ``psnr_mean_mse`` is the PSNR
  of the set's mean MSE (capped the same way), the other usual set PSNR;
* FID over whole images and patch-FID over ``num_crops`` random ``crop_size``² crops per
  image, the same positions in the real and the generated image (as the original's
  ``ImageMetricTracker``), with the FID Inception network of :mod:`cfm_jax.fid` when its
  weights are given.

Bicubic and bilinear up-sampling of the same low-res images are scored the same way as
baselines; they do not depend on the weights, so an evaluator scores them once and
reuses them (training validates many times with one evaluator).

Streaming: the set is an :class:`cfm_jax.data.eval_data.EvalSet` (records, an image folder
or the bundled photos), read batch by batch. One :meth:`Evaluator.run` is one pass over
it: each batch is scored by every requested solver, the baselines and, for FID, the real
images' reference statistics before the next batch is read. Host memory holds, whatever
the number of images: a few batches; three scores per image and method; the Inception
features of the first 2,048 images of each method (the exact small-set FID needs them),
after which only their float64 sum and sum of outer products are kept (:class:`FeatureStats`,
at most 2048² x 8 bytes = 32 MiB each, two per method: whole images and crops); and the
first ``num_grid`` images of each method for the grid. Latents of sets without them (image
folders with an autoencoder) are encoded once per batch and pass, shared by the solvers
of the pass, and not kept after it.

Files: ``metrics.json`` is strict JSON (``allow_nan=False``): a non-finite number (a FID of a
degenerate set, say) is written as ``null`` and named under ``non_finite`` (:func:`finite_json`).

Seeds: validation uses ``config.seed``, ``eval.py`` ``--seed`` (default: the run's
``config.seed``), so for the same checkpoint, solver and images the numbers training logs
and those ``eval.py`` writes are the same (tested).

Sharding and determinism: each global batch is split over every device of every process
(every process reads the whole global batch and contributes its own rows, ``_local``);
predictions, Inception features and per-image scores are gathered to every process, which
all compute the same numbers (process 0 writes the files). Example ``i`` of the set draws
its coupling / SDE noise and its crop positions from ``fold_in(PRNGKey(seed), i)``, so
results do not depend on the batch size, the number of devices or hosts, or which other
solvers are in the sweep.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cfm_jax import compile_options
from cfm_jax import fid as fid_lib
from cfm_jax import metrics as image_metrics
from cfm_jax import sampling, sharding
from cfm_jax.data import image_ops
from cfm_jax.data.eval_data import EvalSet
from cfm_jax.models import inception as inception_lib

log = logging.getLogger(__name__)

BASELINES = ("bicubic", "bilinear")
FEATURE_BATCH = 32  # at most this many images per Inception call (a multiple of the device count)
_CROP_STREAM = 7  # fold_in stream of the patch-FID crop positions (noise uses streams 0/1 of the sample key)


# --------------------------------------------------------------------------- results
@dataclasses.dataclass
class MethodResult:
    """Scores of one method (a solver of the CFM model, or a baseline) on the set."""

    method: str  # "cfm" or a baseline name
    label: str  # solver label for CFM, the baseline's name otherwise
    solver: dict | None
    nfe: int
    psnr: float  # mean of per-image PSNR, each capped at metrics.PSNR_MAX_DB
    ssim: float
    mse: float
    psnr_mean_mse: float | None = None  # PSNR of the mean MSE (capped at metrics.PSNR_MAX_DB)
    # the same scores without a rim of `rim` pixels on every side (None: no interior scores)
    rim: int = 0
    psnr_interior: float | None = None
    ssim_interior: float | None = None
    mse_interior: float | None = None
    psnr_mean_mse_interior: float | None = None
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

    @classmethod
    def from_path(cls, inception: str, *, num_crops: int = 4, crop_size: int = 0,
                  reference_stats: str | None = None) -> "FIDConfig | None":
        """With the FID Inception at ``inception`` (pytorch-fid's ``.pth`` or a converted
        folder); ``None`` for an empty path (no FID)."""
        if not inception:
            return None
        if not os.path.exists(inception):
            raise FileNotFoundError(
                f"FID Inception weights {inception!r} do not exist (pytorch-fid's "
                "pt_inception-2015-12-05-6726825d.pth or a folder written by `python -m cfm_jax.convert inception`).")
        if num_crops < 1:
            raise ValueError(f"patch-FID num_crops must be >= 1, got {num_crops}.")
        return cls(features=fid_lib.InceptionFeatures.from_path(inception), num_crops=int(num_crops),
                   crop_size=int(crop_size), reference_stats=reference_stats or None)


class FeatureStats:
    """Inception features of a streamed set in bounded memory: the features themselves while
    there are at most ``keep`` (default 2,048, the feature dimension: below it the exact
    low-rank FID needs them), then only their float64 sum and sum of outer products, from
    which pytorch-fid's mean and unbiased covariance follow."""

    def __init__(self, keep: int = fid_lib.FEATURE_DIM):
        self.keep = int(keep)
        self.count = 0
        self._kept: list[np.ndarray] = []
        self._sum: np.ndarray | None = None  # [D] float64
        self._outer: np.ndarray | None = None  # [D, D] float64

    def add(self, features: np.ndarray) -> None:
        f = np.asarray(features, np.float32)
        self.count += len(f)
        if self._sum is None:
            self._kept.append(f)
            if self.count <= self.keep:
                return
            f, self._kept = np.concatenate(self._kept), []
            self._sum = np.zeros(f.shape[1], np.float64)
            self._outer = np.zeros((f.shape[1],) * 2, np.float64)
        f64 = f.astype(np.float64)
        self._sum += f64.sum(axis=0)
        self._outer += f64.T @ f64

    def reference(self) -> dict:
        """``mu``, ``sigma`` and, while at most ``keep`` were added, ``features``."""
        if self.count < 2:
            raise ValueError(f"FID needs at least 2 images, got {self.count}.")
        if self._sum is None:
            features = np.concatenate(self._kept)
            mu, sigma = fid_lib.statistics(features)
            return {"mu": mu, "sigma": sigma, "features": features}
        n = self.count
        mu = self._sum / n
        sigma = (self._outer - n * np.outer(mu, mu)) / (n - 1)
        return {"mu": mu, "sigma": sigma}


class _MethodStats:
    """What a pass keeps of one method: per-image scores, feature statistics, grid images."""

    def __init__(self, with_fid: bool):
        self.scores: dict[str, list[np.ndarray]] = {}
        self.features = FeatureStats() if with_fid else None
        self.crop_features = FeatureStats() if with_fid else None
        self.grid: list[np.ndarray] = []

    def mean_scores(self) -> dict[str, float]:
        """Set means of the per-image scores, and ``psnr_mean_mse``; all finite (per-image PSNR
        is capped when scored)."""
        means = {k: float(np.mean(np.concatenate(v))) for k, v in self.scores.items()}
        means["psnr_mean_mse"] = float(image_metrics.psnr_from_mse(means["mse"]))
        if "mse_interior" in means:
            means["psnr_mean_mse_interior"] = float(image_metrics.psnr_from_mse(means["mse_interior"]))
        return means


@dataclasses.dataclass
class _Pass:
    """What one :meth:`Evaluator.run` keeps while it streams the set."""

    solvers: list
    params: Any  # placed on the mesh when there are solvers
    fresh_baselines: bool  # the baselines are scored in this pass (not kept from an earlier one)
    methods: dict[str, _MethodStats]  # per label: the solvers', and the fresh baselines'
    real: _MethodStats | None  # the real images' features, when the FID reference is made in this pass
    timing: dict[str, dict]  # per solver: run and compile seconds, NFE
    columns: dict[str, list[np.ndarray]]  # the grid's shared columns: high-res, bilinear, bicubic (uint8)


# --------------------------------------------------------------------------- the evaluator
class Evaluator:
    """Scores solvers of a checkpoint and the baselines on an evaluation set, streaming it
    over a mesh (module docstring). ``seed``: of the sampling noise and the crop positions."""

    def __init__(self, upsampler, eval_set: EvalSet, mesh, *, seed: int = 0, fid: FIDConfig | None = None,
                 num_grid: int = 8, rim: int = 0):
        n_dev = mesh.devices.size
        if num_grid < 1:
            raise ValueError(f"The grid needs at least one image (train.num_grid_images), got {num_grid}.")
        if eval_set.num_images < 1:
            raise ValueError("The evaluation set is empty.")
        if eval_set.num_images % n_dev or eval_set.batch_size % n_dev:
            raise ValueError(f"The evaluation set ({eval_set.num_images} images in batches of {eval_set.batch_size}) "
                             f"does not split over the {n_dev} devices: use multiples of {n_dev}.")
        self.upsampler = upsampler
        self.eval_set = eval_set
        self.mesh = mesh
        self.seed = int(seed)
        self.rng = jax.random.PRNGKey(self.seed)
        self.fid = fid if (fid is not None and fid.features is not None) else None
        self.num_grid = int(num_grid)
        self.image_size = int(eval_set.image_size)
        self.num_images = int(eval_set.num_images)
        self.rim = check_rim(rim, self.image_size)
        self.crop_size = 0
        rep = sharding.replicated(mesh)
        self._gather = jax.jit(lambda x: x, out_shardings=rep)
        self._encode = upsampler.make_latents_fn()
        self._scores = jax.jit(functools.partial(image_scores, rim=self.rim))
        self._compiled: dict = {}
        self._baselines: tuple[list[MethodResult], dict[str, np.ndarray]] | None = None
        self._real: tuple[dict, dict] | None = None  # FID reference of the real images: whole, crops
        if self.fid is not None:
            self.crop_size = self.fid.crop_size or self.image_size // 2
            if not 1 <= self.crop_size <= self.image_size:
                raise ValueError(f"patch-FID crop_size={self.crop_size} does not fit {self.image_size}² images.")
            if self.fid.num_crops < 1:
                raise ValueError(f"patch-FID num_crops must be >= 1, got {self.fid.num_crops}.")
            feats = self.fid.features
            # one Inception batch size for whole images and crops: one compiled Inception
            self._feature_batch = -(-min(FEATURE_BATCH, eval_set.batch_size * self.fid.num_crops) // n_dev) * n_dev
            self._to_299 = jax.jit(lambda x: image_ops.resize(
                fid_lib.to_unit_range(x, value_range=feats.value_range, clip=feats.clip, quantize=feats.quantize),
                inception_lib.INPUT_SIZE, "bilinear"))
            self._inception = jax.jit(feats.model.apply, out_shardings=rep)
            self._inception_vars = jax.device_put(feats.variables, rep)  # sent once, not with every call
            crop = self.crop_size
            self._take_crops = jax.jit(lambda images, anchors: fid_lib.take_crops(images, anchors, crop))
            self._real = self._read_reference()

    # ---------------------------------------------------------------- helpers
    def _local(self, x: np.ndarray) -> np.ndarray:
        """This process's rows of a global host batch (every process reads the whole batch)."""
        rows = len(x) // jax.process_count()
        p = jax.process_index()
        return x[p * rows:(p + 1) * rows]

    def _shard(self, arrays: dict) -> dict:
        return sharding.shard_batch({k: self._local(np.asarray(v)) for k, v in arrays.items()}, self.mesh)

    def _keys(self, start: int, n: int) -> np.ndarray:
        return np.asarray(sampling.example_keys(self.rng, np.arange(start, start + n)))

    def _params(self, params):
        """Weights already placed on this mesh (the trainer's state) as they are, others replicated."""
        if all(isinstance(x, jax.Array) and getattr(x.sharding, "mesh", None) == self.mesh
               for x in jax.tree.leaves(params)):
            return params
        return jax.device_put(params, sharding.replicated(self.mesh))

    def _latents(self, batch: dict) -> dict:
        """``latent``/``latent_lowres`` (unscaled) of a host batch, sharded: the set's own
        (records, pixel-space photos) or encoded by the first stage (image folders)."""
        if "latent" in batch and "latent_lowres" in batch:
            return self._shard({k: batch[k] for k in ("latent", "latent_lowres")})
        g = self._encode(self._shard({k: batch[k] for k in ("image", "image_lowres")}))
        return {k: g[k] for k in ("latent", "latent_lowres")}

    def _features(self, images) -> np.ndarray:
        """Inception features [N, 2048] of host images (all rows; every process has them), in
        fixed-size batches split over the devices. Images are resized to 299² by a small
        jitted function first, so one compiled Inception serves whole images and crops."""
        images = np.asarray(images)
        fb, out = self._feature_batch, []
        for s in range(0, len(images), fb):
            chunk = images[s:s + fb]
            m = len(chunk)
            if m < fb:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fb - m, axis=0)])
            g = self._shard({"x": chunk})["x"]
            out.append((self._inception(self._inception_vars, self._to_299(g)), m))
        return np.concatenate([np.asarray(f)[:m] for f, m in out])

    def _anchors(self, start: int, n: int) -> jax.Array:
        """Crop positions [n, num_crops, 2] of examples ``start .. start + n - 1``."""
        keys = sampling.example_keys(self.rng, np.arange(start, start + n), stream=_CROP_STREAM)
        return jax.vmap(lambda k: fid_lib.crop_anchors(k, 1, self.fid.num_crops, self.image_size,
                                                       self.crop_size)[0])(keys)

    def _add(self, stats: _MethodStats | None, images: np.ndarray, target: np.ndarray | None, anchors) -> None:
        """Scores and grid images (when there is a ``target``) and features of one batch of a
        method (of the real images: no target)."""
        if stats is None:
            return
        if self.fid is not None:
            stats.features.add(self._features(images))
            stats.crop_features.add(self._features(self._take_crops(images, anchors)))
        if target is None:
            return
        for k, v in self._scores(images, target).items():
            stats.scores.setdefault(k, []).append(np.asarray(v))
        have = sum(len(g) for g in stats.grid)
        if have < self.num_grid:  # kept as uint8, as the grid shows them (a quarter of float32)
            stats.grid.append(image_ops.to_uint8(np.asarray(images[:self.num_grid - have])))

    def _sample(self, solver, params, latents: dict, keys, timing: dict) -> np.ndarray:
        """The solver's prediction of one sharded batch, gathered to host [B, H, W, 3]."""
        ups, fs = self.upsampler, self.upsampler.first_stage
        args = (params, fs, latents, keys)
        shape_key = (solver, tuple(latents["latent"].shape))
        t0 = time.perf_counter()
        if shape_key not in self._compiled:
            def predict(params, fs, batch, keys):
                images, r = ups.predict(params, batch, keys, solver=solver, first_stage=fs)
                return images, r._replace(x=None, intermediates=None, intermediate_ts=None)
            self._compiled[shape_key] = jax.jit(predict, compiler_options=compile_options.inference()).lower(*args).compile()
            timing["compile"] += time.perf_counter() - t0
            t0 = time.perf_counter()
        pred, result = self._compiled[shape_key](*args)
        pred.block_until_ready()
        timing["run"] += time.perf_counter() - t0
        result = self._gather(result)
        sampling.raise_if_failed(result, what=f"The sampler {solver.label}", remedy=(
            "For an adaptive solver raise sample.max_steps (--config.sample.max_steps when training, the run's "
            "config.json for eval.py) or loosen the tolerance (e.g. dopri5:1e-2)."))
        timing["nfe"] = max(timing["nfe"], int(np.max(np.asarray(result.nfe))))
        return np.asarray(self._gather(pred))

    # ---------------------------------------------------------------- FID reference
    def _reference_paths(self) -> tuple[str, str] | None:
        path = self.fid.reference_stats
        return (path, _crop_stats_path(path)) if path else None

    def _read_reference(self) -> tuple[dict, dict] | None:
        paths = self._reference_paths()
        if paths and all(os.path.exists(p) for p in paths):
            log.info("FID reference statistics from %s", paths[0])
            return tuple(_read_reference(p) for p in paths)
        return None

    def _write_reference(self) -> None:
        paths = self._reference_paths()
        if paths and jax.process_index() == 0:
            os.makedirs(os.path.dirname(os.path.abspath(paths[0])), exist_ok=True)
            for p, ref in zip(paths, self._real):
                fid_lib.save_stats(p, ref["mu"], ref["sigma"], features=ref.get("features"))

    # ---------------------------------------------------------------- public
    def run(self, params, solvers: Sequence = (), *, baselines: bool = True,
            progress: Callable[[int, int], None] | None = None) -> tuple[list[MethodResult], dict[str, np.ndarray]]:
        """Scores ``params`` (host or device arrays) sampled with each of ``solvers`` and, with
        ``baselines``, bicubic and bilinear up-sampling, in one pass over the set.

        Returns the results (the solvers in order, then the baselines) and, per label, a uint8
        grid of the first ``num_grid`` images with titles: high-res | bilinear | bicubic | CFM
        (:func:`labelled_grid`; a baseline's grid has no CFM column).
        ``progress(done, total)`` is called after every batch."""
        solvers = list(solvers)
        if len({s.label for s in solvers}) != len(solvers):
            raise ValueError(f"Solvers repeat: {[s.label for s in solvers]}.")
        with_fid = self.fid is not None
        fresh_baselines = baselines and self._baselines is None
        methods = {s.label: _MethodStats(with_fid) for s in solvers}
        if fresh_baselines:
            methods.update({name: _MethodStats(with_fid) for name in BASELINES})
        p = _Pass(solvers=solvers, params=self._params(params) if solvers else params,
                  fresh_baselines=fresh_baselines, methods=methods,
                  real=_MethodStats(with_fid) if with_fid and self._real is None else None,  # reference in this pass
                  timing={s.label: {"run": 0.0, "compile": 0.0, "nfe": 0} for s in solvers},
                  columns={"high-res": [], "bilinear": [], "bicubic": []})
        start, total = 0, self.eval_set.num_batches
        for b, batch in enumerate(self.eval_set):
            start += self._run_batch(p, b, batch, start)
            if progress:
                progress(b + 1, total)
        if p.real is not None:
            self._real = (p.real.features.reference(), p.real.crop_features.reference())
            self._write_reference()
        return self._results(p, baselines=baselines)

    def _run_batch(self, p: _Pass, b: int, batch: dict, start: int) -> int:
        """Batch ``b`` (examples ``start ..``) of a pass: the grid's shared columns, the real
        images' features, the baselines' and every solver's scores; returns its size."""
        target = np.asarray(batch["image"], np.float32)  # [B, H, W, 3]
        n = len(target)
        if n % self.mesh.devices.size:
            raise ValueError(f"Evaluation batch {b} has {n} images, not a multiple of the "
                             f"{self.mesh.devices.size} devices.")
        anchors = self._anchors(start, n) if self.fid is not None else None
        have = sum(len(g) for g in p.columns["high-res"])
        low_up = bicubic = None
        if p.fresh_baselines or have < self.num_grid:
            low_up = np.asarray(image_ops.upsample_bilinear(batch["image_lowres"], self.image_size), np.float32)
            bicubic = np.asarray(image_ops.upsample_bicubic(batch["image_lowres"], self.image_size), np.float32)
        if have < self.num_grid:
            p.columns["high-res"].append(image_ops.to_uint8(np.asarray(target[:self.num_grid - have])))
            p.columns["bilinear"].append(image_ops.to_uint8(np.asarray(low_up[:self.num_grid - have])))
            p.columns["bicubic"].append(image_ops.to_uint8(np.asarray(bicubic[:self.num_grid - have])))
        self._add(p.real, target, None, anchors)
        if p.fresh_baselines:
            self._add(p.methods["bicubic"], bicubic, target, anchors)
            self._add(p.methods["bilinear"], low_up, target, anchors)
        del low_up, bicubic
        if p.solvers:
            latents = self._latents(batch)  # encoded once per batch for every solver of the pass
            keys = self._shard({"k": self._keys(start, n)})["k"]  # example i's noise: fold_in(rng, i)
            for s in p.solvers:
                self._add(p.methods[s.label], self._sample(s, p.params, latents, keys, p.timing[s.label]), target,
                          anchors)
        return n

    def _results(self, p: _Pass, *, baselines: bool) -> tuple[list[MethodResult], dict[str, np.ndarray]]:
        """The results and grids of a finished pass (:meth:`run`'s return value); the baselines'
        are kept for later passes."""
        columns = {k: np.concatenate(v) for k, v in p.columns.items()}

        def finish(label: str, method: str, **fields) -> tuple[MethodResult, np.ndarray]:
            stats = p.methods[label]
            fid_v = patch = None
            if self.fid is not None:
                fid_v = _fid(self._real[0], stats.features.reference())
                patch = _fid(self._real[1], stats.crop_features.reference())
            result = MethodResult(label=label, method=method, fid=fid_v, patch_fid=patch, rim=self.rim, **fields,
                                  **stats.mean_scores())
            if method == "cfm":
                return result, labelled_grid({**columns, f"CFM {label}": np.concatenate(stats.grid)})
            return result, labelled_grid(columns)

        results, grids = [], {}
        for s in p.solvers:
            t = p.timing[s.label]
            r, grids[s.label] = finish(s.label, method="cfm", solver=s.as_dict(), nfe=t["nfe"],
                                       seconds_per_image=t["run"] / self.num_images, compile_seconds=t["compile"])
            results.append(r)
        if p.fresh_baselines:
            base = [finish(name, method=name, solver=None, nfe=0) for name in BASELINES]
            self._baselines = ([r for r, _ in base], {r.label: g for r, g in base})
        if baselines:
            results += self._baselines[0]
            grids.update(self._baselines[1])
        return results, grids


def check_rim(rim: int, image_size: int) -> int:
    """``rim`` as an int, or a ValueError naming the sizes (the interior keeps an SSIM window)."""
    rim = int(rim)
    if rim < 0 or image_size - 2 * rim < image_metrics.SSIM_WINDOW:
        raise ValueError(f"eval.rim={rim}: the interior of {image_size}² images without a rim of {rim} px must keep "
                         f"at least {image_metrics.SSIM_WINDOW} px (the SSIM window); use 0 <= rim <= "
                         f"{max(0, (image_size - image_metrics.SSIM_WINDOW) // 2)}.")
    return rim


def default_rim(upsampler, image_size: int) -> int:
    """The default interior margin: two latent cells (16 px of a 1024² image under the SD
    autoencoder), at least 4 px (pixel-space models), at most what leaves an SSIM window."""
    return max(0, min(max(4, 2 * int(upsampler.first_stage.downsample_factor)),
                      (int(image_size) - image_metrics.SSIM_WINDOW) // 2))


def resolve_rim(rim: int, upsampler, image_size: int) -> int:
    """``eval.rim``: -1 is :func:`default_rim`; other values are checked by :func:`check_rim`."""
    return default_rim(upsampler, image_size) if int(rim) == -1 else check_rim(rim, image_size)


def image_scores(pred, target, *, rim: int = 0) -> dict:
    """Per-image PSNR (capped), SSIM and MSE of [B, H, W, C] images in [-1, 1] and, with a
    ``rim`` > 0, the same of the interior without ``rim`` pixels on every side (``*_interior``)."""
    out = {"psnr": image_metrics.psnr(pred, target, max_db=image_metrics.PSNR_MAX_DB),
           "ssim": image_metrics.ssim(pred, target),
           "mse": image_metrics.mse(pred, target)}
    if rim:
        inner = (slice(None), slice(rim, -rim), slice(rim, -rim))
        out.update({f"{k}_interior": v for k, v in image_scores(pred[inner], target[inner]).items()})
    return out


def _read_reference(path: str) -> dict:
    mu, sigma = fid_lib.load_stats(path)
    ref = {"mu": mu, "sigma": sigma}
    feats = fid_lib.load_features(path)
    if feats is not None:
        ref["features"] = feats
    return ref


def _fid(ref: dict, gen: dict) -> float:
    """FID of generated statistics against a reference: the exact low-rank computation when
    both sets kept their features (small sets), else pytorch-fid's."""
    if "features" in ref and "features" in gen:
        return fid_lib.features_fid(ref["features"], gen["features"])
    return fid_lib.frechet_distance(ref["mu"], ref["sigma"], gen["mu"], gen["sigma"])


def _crop_stats_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}_crops{ext or '.npz'}"


# --------------------------------------------------------------------------- reports
def image_grid(columns: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 grid: one row per image, one column per array of [N, H, W, 3] images in [-1, 1]
    (or uint8)."""
    rows = np.concatenate([image_ops.to_uint8(np.asarray(c)) for c in columns], axis=2)
    return rows.reshape((-1,) + rows.shape[2:])


GRID_MIN_TILE = 256  # grid tiles smaller than this are enlarged (nearest neighbour: pixels stay visible)


def labelled_grid(columns: dict[str, np.ndarray], *, min_tile: int = GRID_MIN_TILE) -> np.ndarray:
    """uint8 grid with a title row: one column per entry of ``columns`` (title -> [N, H, W, 3]
    images in [-1, 1] or uint8), one row per image. Images smaller than ``min_tile`` are
    enlarged by a whole factor (nearest neighbour), so that a person sees the pixels each
    method made, not a viewer's smoothing."""
    h, w = next(iter(columns.values())).shape[1:3]
    zoom = max(1, -(-min_tile // min(h, w)))
    grid = image_grid(list(columns.values())).repeat(zoom, axis=0).repeat(zoom, axis=1)
    tile = w * zoom  # a column's width
    title_h = max(20, tile // 12)
    try:  # Pillow's bundled scalable font (Pillow >= 10.1 with FreeType), else its bitmap font
        font = ImageFont.load_default(size=int(title_h * 0.7))
    except TypeError:
        font = ImageFont.load_default()
    head = Image.new("RGB", (grid.shape[1], title_h), (255, 255, 255))
    draw = ImageDraw.Draw(head)
    for i, title in enumerate(columns):
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        draw.text((i * tile + (tile - (right - left)) // 2 - left, (title_h - (bottom - top)) // 2 - top), title,
                  fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(head), grid], axis=0)


def _family(r: MethodResult) -> str:
    if r.solver is None:
        return r.method
    s = r.solver
    if "rtol" in s:
        return s["method"]
    if "diffusion_form" in s:
        return f"{s['method']} ({s['diffusion_form']}, last {s['last_step']})"
    return s["method"]


def nfe_figure(results: Sequence[MethodResult], metric: str, *, title: str, lower_is_better: bool = False):
    """A matplotlib figure of ``metric`` against NFE (log scale): one line per solver family, the
    baselines as dashed horizontal lines; ``None`` when no CFM row has the metric."""
    import matplotlib  # lazy: matplotlib (with pyplot) is slow to import; only sweeps draw figures

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    cfm = [r for r in results if r.method == "cfm" and getattr(r, metric) is not None]
    base = [r for r in results if r.method != "cfm" and getattr(r, metric) is not None]
    if not cfm:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    families: dict[str, list[MethodResult]] = {}
    for r in cfm:
        families.setdefault(_family(r), []).append(r)
    for fam, rs in families.items():
        rs = sorted(rs, key=lambda r: r.nfe)
        ax.plot([max(r.nfe, 1) for r in rs], [getattr(r, metric) for r in rs], marker="o", label=f"CFM {fam}")
    for j, r in enumerate(base):
        ax.axhline(getattr(r, metric), linestyle="--", color="0.35" if j == 0 else "0.6", label=r.method)
    nfes = sorted({max(r.nfe, 1) for r in cfm})
    ax.set_xscale("log")
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.minorticks_off()
    ax.set_xlabel("NFE (network evaluations)")
    ax.set_ylabel(metric + (" (lower is better)" if lower_is_better else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return fig


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown_table(results: Sequence[MethodResult]) -> str:
    """Full-image scores and, beside them, the interior's (without the rim) when computed."""
    rim = next((r.rim for r in results if r.psnr_interior is not None), 0)
    head = ["method", "solver", "NFE", "PSNR (dB)", "PSNR of mean MSE (dB)", "SSIM", "MSE"]
    if rim:
        head += [f"interior PSNR (rim {rim} px)", "interior PSNR of mean MSE", "interior SSIM"]
    head += ["FID", "patch-FID", "s/image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = [r.method, r.label if r.method == "cfm" else "-", str(r.nfe), f"{r.psnr:.3f}",
               _fmt(r.psnr_mean_mse, ".3f"), f"{r.ssim:.4f}", f"{r.mse:.3g}"]
        if rim:
            row += [_fmt(r.psnr_interior, ".3f"), _fmt(r.psnr_mean_mse_interior, ".3f"),
                    _fmt(r.ssim_interior, ".4f")]
        row += [_fmt(r.fid, ".4g"), _fmt(r.patch_fid, ".4g"), _fmt(r.seconds_per_image, ".3f")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


CSV_FIELDS = ("method", "label", "nfe", "psnr", "ssim", "mse", "psnr_mean_mse", "rim", "psnr_interior",
              "ssim_interior", "mse_interior", "psnr_mean_mse_interior", "fid", "patch_fid",
              "seconds_per_image", "compile_seconds")


def finite_json(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """``obj`` (dicts, lists, tuples, numbers, strings, None) with every non-finite float
    (NaN, +-inf, also numpy scalars) replaced by ``None``, and the paths of those values
    (``results[0].fid``): what ``json.dumps(..., allow_nan=False)`` accepts. Strict parsers
    (JavaScript's ``JSON.parse``, ``jq``, Go, Rust) reject the bare ``NaN`` / ``Infinity``
    Python's ``json`` writes by default."""
    if isinstance(obj, dict):
        out, bad = {}, []
        for k, v in obj.items():
            out[k], b = finite_json(v, f"{path}.{k}" if path else str(k))
            bad += b
        return out, bad
    if isinstance(obj, (list, tuple)):
        out, bad = [], []
        for i, v in enumerate(obj):
            item, b = finite_json(v, f"{path}[{i}]")
            out.append(item)
            bad += b
        return out, bad
    if isinstance(obj, (float, np.floating)):
        return (float(obj), []) if math.isfinite(obj) else (None, [path])
    if isinstance(obj, np.integer):
        return int(obj), []
    return obj, []


def write_reports(out: str, record: dict, results: Sequence[MethodResult], grids: dict[str, np.ndarray],
                  notes: Sequence[str] = ()) -> list[str]:
    """Writes metrics.json, metrics.csv, report.md, grid_<label>.png and, for sweeps, the
    quality-vs-NFE plots. Returns the file names."""
    os.makedirs(out, exist_ok=True)
    files = ["metrics.json", "metrics.csv", "report.md"]
    metrics, non_finite = finite_json({**record, "psnr_max_db": image_metrics.PSNR_MAX_DB,
                                       "results": [r.row() for r in results]})
    if non_finite:
        metrics["non_finite"] = {"fields": non_finite, "note": "not finite (NaN or infinite); written as null"}
        log.warning("metrics.json: non-finite values written as null: %s", ", ".join(non_finite))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2, allow_nan=False)
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
            fig = nfe_figure(results, metric, title=f"{metric} against NFE", lower_is_better=lower)
            if fig is not None:
                import matplotlib.pyplot as plt  # lazy: slow to import (see nfe_figure)

                name = f"{metric}_vs_nfe.svg"
                fig.savefig(os.path.join(out, name))
                plt.close(fig)
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
    text += ["Grids, one row per image: high-res | bilinear | bicubic | CFM (small images enlarged, nearest "
             "neighbour).", ""]
    text += [f"![{g}](grid_{g}.png)" for g in grids]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(text) + "\n")
    return files
