"""Offline evaluation of a trained CFM upsampler (library: ``cfm_jax/evaluation.py``).

    python eval.py --workdir runs/quickstart
    python eval.py --workdir runs/quickstart --solvers euler:2,euler:4,euler:8,rk4:4,dopri5:1e-3
    python eval.py --workdir runs/cfm --records data/cfm_latents_1024 --split validation \\
        --num_images 5000 --inception checkpoints/pt_inception-2015-12-05-6726825d.pth --num_crops 4
    python eval.py --workdir runs/cfm --images /data/laion_hr --num_images 5000 --inception converted_inception/

Loads the run's ``config.json`` and a checkpoint (EMA weights unless ``--online``), reads an
evaluation set (the run's validation split by default; ``--records`` prepared records, or
``--images`` a folder of high-res images, centre-cropped) batch by batch, samples it with every
solver of ``--solvers`` (default: the run's ``sample`` section) and scores PSNR / SSIM / MSE,
and with ``--inception`` (default: the run's ``eval.inception``) FID and patch-FID, against the
ground truth, next to bicubic and bilinear up-sampling: all in one pass over the set, with the
evaluator training validates with (``cfm_jax/evaluation.py``). Runs over every device (and
every host: start it on each, like train.py).

Writes ``<out>/metrics.json``, ``metrics.csv``, ``report.md``, ``grid_<solver>.png`` and, for a
sweep over more than one solver, ``psnr_vs_nfe.svg`` (and ssim, fid, patch-fid).
Deterministic for ``--seed`` (default: the run's ``config.seed``, the seed of its validation:
with the defaults, eval.py reproduces the numbers training logged for the same checkpoint).
"""
import logging
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py (or `convert fmboost`).",
                               required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_ONLINE = flags.DEFINE_bool("online", False, "Evaluate the online weights instead of the EMA.")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Same as --online (kept for older commands).")
_SOLVERS = flags.DEFINE_string("solvers", None, "Comma-separated solvers, e.g. euler:10,euler:40,rk4:10,dopri5:1e-3,"
                               "sde_euler:40 (default: the run's sample.method:sample.num_steps).")
_METHOD = flags.DEFINE_string("method", None, "Single solver method (shorthand; --solvers wins).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Grid points for --method.")
_DIFFUSION_FORM = flags.DEFINE_string("diffusion_form", None, "SDE solvers: diffusion form (default: the run's "
                                      "sample.diffusion_form, else sigma).")
_DIFFUSION_NORM = flags.DEFINE_float("diffusion_norm", None, "SDE solvers: diffusion scale (default: the run's, "
                                     "else 1).")
_LAST_STEP = flags.DEFINE_string("last_step", None, "SDE solvers: Mean | Euler | none (default: the run's, else "
                                 "Mean).")
_LAST_STEP_SIZE = flags.DEFINE_float("last_step_size", None, "SDE solvers: size of the last step (default: the "
                                     "run's, else 0.04).")
_RECORDS = flags.DEFINE_string("records", None, "Prepared records to evaluate on (default: the run's data.path).")
_SPLIT = flags.DEFINE_string("split", None, "Split of the records (default: the run's data.val_split).")
_IMAGES = flags.DEFINE_string("images", None, "Folder of high-res images to evaluate on instead of records.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Images to evaluate (default: data.num_val_images).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size (default: data.batch_size).")
_INCEPTION = flags.DEFINE_string("inception", None, "FID Inception weights: pytorch-fid's "
                                 "pt_inception-2015-12-05-6726825d.pth or a `convert inception` folder "
                                 "(default: the run's eval.inception). Without it (or with --inception=) FID and "
                                 "patch-FID are not computed.")
_NUM_CROPS = flags.DEFINE_integer("num_crops", None, "patch-FID: random crops per image (default: the run's "
                                  "eval.num_crops, else 4).")
_CROP_SIZE = flags.DEFINE_integer("crop_size", None, "patch-FID: crop side in pixels, 0: image_size / 2 (default: "
                                  "the run's eval.crop_size, else 0).")
_FID_STATS = flags.DEFINE_string("fid_stats", None, "npz of the real images' FID statistics (pytorch-fid "
                                 "format): read when it exists, else computed and written there.")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the sampling noise and the patch-FID crops (default: the run's "
                             "config.seed, which its validation used).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/eval).")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "jax.distributed.initialize, as in train.py.")


def _fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv):
    del argv
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax metadata chatter
    import jax
    import ml_collections

    from cfm_jax import checkpointing, distributed, evaluation, sharding
    from cfm_jax.data import eval_data
    from cfm_jax.solvers import SolverSpec
    from cfm_jax.upsampler import CFMUpsampler

    distributed.initialize(_DISTRIBUTED.value)
    workdir = _WORKDIR.value
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        _fail(f"{cfg_path} not found: --workdir must be a directory written by train.py.")
    import json
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    d = config.data
    if _NUM_IMAGES.value:
        d.num_val_images = _NUM_IMAGES.value
    if _BATCH_SIZE.value:
        d.batch_size = _BATCH_SIZE.value
    if _RECORDS.value:
        d.name, d.path, d.prepare_photos = "records", _RECORDS.value, False
    if _SPLIT.value:
        d.val_split = _SPLIT.value

    # solvers and options first: a typo fails before anything is loaded
    sample = config.sample
    sde_kwargs = {k: v for k, v in (("diffusion_form", _DIFFUSION_FORM.value),
                                    ("diffusion_norm", _DIFFUSION_NORM.value), ("last_step", _LAST_STEP.value),
                                    ("last_step_size", _LAST_STEP_SIZE.value)) if v is not None}
    if isinstance(sde_kwargs.get("last_step"), str) and sde_kwargs["last_step"].lower() == "none":
        sde_kwargs["last_step"] = None
    try:
        if _SOLVERS.value:  # the run's atol, max_steps and SDE settings unless a flag says otherwise
            run = SolverSpec.from_config(sample, **sde_kwargs)
            solvers = SolverSpec.parse_list(_SOLVERS.value, **{k: getattr(run, k) for k in (
                "atol", "max_steps", "diffusion_form", "diffusion_norm", "last_step", "last_step_size")})
        else:
            overrides = {k: v for k, v in (("method", _METHOD.value), ("num_steps", _NUM_STEPS.value)) if v}
            solvers = [SolverSpec.from_config(sample, **sde_kwargs, **overrides)]
    except ValueError as e:
        _fail(str(e))
    if len({s.label for s in solvers}) != len(solvers):
        _fail(f"--solvers repeats a solver: {[s.label for s in solvers]}.")
    run_eval = config.get("eval") or {}  # absent from the config.json of older runs
    inception = _INCEPTION.value if _INCEPTION.value is not None else run_eval.get("inception", "")
    num_crops = _NUM_CROPS.value if _NUM_CROPS.value is not None else run_eval.get("num_crops", 4)
    crop_size = _CROP_SIZE.value if _CROP_SIZE.value is not None else run_eval.get("crop_size", 0)
    seed = _SEED.value if _SEED.value is not None else int(config.get("seed", 0))
    if inception and not os.path.exists(inception):
        _fail(f"--inception {inception!r} does not exist (pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
              "or a folder written by `python -m cfm_jax.convert inception`).")
    if _IMAGES.value and not os.path.isdir(_IMAGES.value):
        _fail(f"--images {_IMAGES.value!r} is not a folder.")

    use_ema = not (_ONLINE.value or _NO_EMA.value)
    try:
        params = checkpointing.read_params(workdir, use_ema=use_ema, step=_STEP.value)
    except (FileNotFoundError, ValueError) as e:
        _fail(f"{e} Train first: python train.py --workdir {workdir}")
    step = _STEP.value if _STEP.value is not None else _newest_step(workdir)
    mesh = sharding.make_data_mesh()
    try:
        upsampler = CFMUpsampler(config)
        if _IMAGES.value:
            eval_set = eval_data.image_folder_set(
                _IMAGES.value, image_size=d.image_size, lowres_size=d.lowres_size, num_images=d.num_val_images,
                batch_size=d.batch_size, n_devices=mesh.devices.size,
                lowres_filter=d.get("lowres_filter", "box"))  # absent from older runs' config.json
        else:
            from cfm_jax.data.train_data import make_data
            _, eval_set = make_data(config, upsampler.first_stage, n_devices=mesh.devices.size, train=False)
        fid_cfg = evaluation.FIDConfig.from_path(inception, num_crops=num_crops, crop_size=crop_size,
                                                 reference_stats=_FID_STATS.value)
        ev = evaluation.Evaluator(upsampler, eval_set, mesh, seed=seed, fid=fid_cfg,
                                  num_grid=config.train.num_grid_images)
    except (FileNotFoundError, ValueError, ImportError) as e:
        _fail(str(e))
    print(f"Evaluating {ev.num_images} images ({eval_set.description}) on {mesh.devices.size} device(s), "
          f"{jax.process_count()} process(es); solvers {[s.label for s in solvers]}"
          f"{'; FID + patch-FID' if fid_cfg else '; no FID (pass --inception)'}", flush=True)
    from tqdm import tqdm
    # one pass over the set: every batch is read once and scored by every solver and the baselines
    with tqdm(total=eval_set.num_batches, desc="eval", unit="batch", leave=False,
              disable=jax.process_index() != 0 or eval_set.num_batches < 2) as bar:
        results, grids = ev.run(params, solvers, progress=lambda done, total: bar.update(1))
    for r in results[:len(solvers)]:
        print(f"  {r.label}: NFE {r.nfe}, PSNR {r.psnr:.3f} dB, SSIM {r.ssim:.4f}"
              + (f", FID {r.fid:.4g}, patch-FID {r.patch_fid:.4g}" if r.fid is not None else "")
              + f", {r.seconds_per_image:.3f} s/image", flush=True)
    grid_images = {s.label: grids[s.label] for s in solvers}

    out = _OUT.value or os.path.join(workdir, "eval")
    record = {"checkpoint": os.path.abspath(workdir), "step": step, "weights": "ema" if use_ema else "online",
              "data": eval_set.description, "num_images": ev.num_images, "image_size": d.image_size,
              "lowres_size": d.lowres_size, "seed": seed, "devices": mesh.devices.size,
              "processes": jax.process_count(),
              "fid": ({"inception": os.path.abspath(inception), "num_crops": num_crops,
                       "crop_size": ev.crop_size} if fid_cfg else None)}
    notes = [] if fid_cfg else ["FID and patch-FID not computed: pass --inception with pytorch-fid's "
                                "pt_inception-2015-12-05-6726825d.pth."]
    if jax.process_index() == 0:
        files = evaluation.write_reports(out, record, results, grid_images, notes=notes)
        print(evaluation.markdown_table(results))
        best = max((r for r in results if r.method == "cfm"), key=lambda r: r.psnr)
        bicubic = next(r for r in results if r.method == "bicubic")
        print(f"\nCFM ({best.label}, best PSNR) minus bicubic: {best.psnr - bicubic.psnr:+.3f} dB PSNR, "
              f"{best.ssim - bicubic.ssim:+.4f} SSIM.")
        print(f"Results in {os.path.abspath(out)}: {' '.join(files)}")


def _newest_step(workdir: str):
    ckpt = os.path.join(workdir, "checkpoints")
    steps = [int(s) for s in os.listdir(ckpt) if s.isdigit()] if os.path.isdir(ckpt) else []
    return max(steps) if steps else None


if __name__ == "__main__":
    app.run(main)
