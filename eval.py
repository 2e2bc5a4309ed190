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
sweep over more than one solver, ``psnr_vs_nfe.svg`` (and ssim, fid, patch-fid; matplotlib).
Deterministic for ``--seed`` (default: the run's ``config.seed``, the seed of its validation:
with the defaults, eval.py reproduces the numbers training logged for the same checkpoint).
"""
import json
import logging
import os
import sys

import jax
import ml_collections
from absl import flags
from tqdm import tqdm

from cfm_jax import checkpointing, cli, distributed, evaluation, sharding
from cfm_jax.data import eval_data
from cfm_jax.data.train_data import make_data
from cfm_jax.model import CFMUpsampler, check_channelwise, check_dihedral_average, check_params_fit_config
from cfm_jax.solvers import SolverSpec


def define_flags(fl: flags.FlagValues) -> None:
    """eval.py's flags, on ``fl`` (a fresh ``FlagValues`` per :func:`main` call, so that main runs
    in-process as often as a test wants)."""
    def string(name, help_):
        flags.DEFINE_string(name, None, help_, flag_values=fl)

    def integer(name, help_):
        flags.DEFINE_integer(name, None, help_, flag_values=fl)

    def real(name, help_):
        flags.DEFINE_float(name, None, help_, flag_values=fl)

    string("workdir", "Run directory written by train.py (or `convert fmboost`). Required.")
    integer("step", "Checkpoint step (default: newest).")
    flags.DEFINE_bool("online", False, "Evaluate the online weights instead of the EMA.", flag_values=fl)
    string("solvers", "Comma-separated solvers, e.g. euler:10,euler:40,rk4:10,dopri5:1e-3,sde_euler:40 (default: "
           "the run's sample.method:sample.num_steps).")
    string("diffusion_form", "SDE solvers: diffusion form (default: the run's sample.diffusion_form, else sigma).")
    real("diffusion_norm", "SDE solvers: diffusion scale (default: the run's, else 1).")
    string("last_step", "SDE solvers: Mean | Euler | none (default: the run's, else Mean).")
    real("last_step_size", "SDE solvers: size of the last step (default: the run's, else 0.04).")
    integer("dihedral_average", "Average the velocity over 1, 2, 4 or 8 symmetries of the square (mirrors, "
            "transposes) of the input, n network evaluations each (default: the run's sample.dihedral_average; "
            "1: the original's sampler).")
    flags.DEFINE_bool("channelwise", None, "Upsample every channel of the image as a gray image, C network "
                      "evaluations each (pixel-space models; default: the run's sample.channelwise; "
                      "--nochannelwise: the original's sampler).", flag_values=fl)
    string("records", "Prepared records to evaluate on (default: the run's data.path).")
    string("split", "Split of the records (default: the run's data.val_split).")
    string("images", "Folder of high-res images to evaluate on instead of records.")
    integer("num_images", "Images to evaluate, >= 1 (default: the run's data.num_val_images).")
    integer("batch_size", "Global batch size, >= 1 (default: the run's data.batch_size).")
    string("inception", "FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth or a `convert "
           "inception` folder (default: the run's eval.inception). Without it (or with --inception=) FID and "
           "patch-FID are not computed.")
    integer("num_crops", "patch-FID: random crops per image, >= 1 (default: the run's eval.num_crops, else 4).")
    integer("crop_size", "patch-FID: crop side in pixels, 0: image_size / 2 (default: the run's eval.crop_size, "
            "else 0).")
    integer("rim", "Interior scores leave out a rim of this many pixels on every side, reported beside the "
            "full-image scores; 0: none, -1: two latent cells, at least 4 px (default: the run's eval.rim, else -1).")
    string("fid_stats", "npz of the real images' FID statistics (pytorch-fid format): read when it exists, else "
           "computed and written there.")
    integer("seed", "Seed of the sampling noise and the patch-FID crops (default: the run's config.seed, which its "
            "validation used).")
    string("out", "Output folder (default: <workdir>/eval).")
    flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "jax.distributed.initialize, as in train.py.",
                      flag_values=fl)


def _check_counts(f: flags.FlagValues) -> None:
    """Counts and sizes that must be positive, named by their flag (before anything is loaded)."""
    cli.check_at_least(f, (("num_images", 1, "the number of images to evaluate"),
                           ("batch_size", 1, "the global batch size"),
                           ("num_crops", 1, "patch-FID crops per image"),
                           ("crop_size", 0, "the patch-FID crop side, 0 for image_size / 2"),
                           ("step", 0, "a checkpoint step"),
                           ("rim", -1, "the interior's margin in pixels, -1 for two latent cells")),
                       fix="omit it for the run's default")


def parse(argv) -> flags.FlagValues:
    """The flags of ``argv`` (``argv[0]`` the program), checked as far as they can be without
    reading the run: a bad flag or value is one line and exit code 2."""
    fl = flags.FlagValues()
    define_flags(fl)
    rest = cli.parse_flags(fl, argv, prog="python eval.py", usage="--workdir DIR [flags]", doc=__doc__)
    cli.reject_positional(rest, "python eval.py")
    if not fl.workdir:
        cli.fail("--workdir is required: the run directory written by train.py (or `python -m cfm_jax.convert "
                 "fmboost`).")
    _check_counts(fl)
    return fl


def main(argv=None) -> int:
    fl = parse(sys.argv if argv is None else argv)
    cli.skip_tpu_probe_without_accelerator()  # before JAX makes a backend
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax metadata chatter
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probes, compilation cache notes
    try:
        distributed.initialize(fl.distributed)
    except (RuntimeError, ValueError) as e:  # as train.py: a coordinator that is not there, bad settings
        cli.fail(str(e))
    config = run_config(fl)
    solvers = choose_solvers(fl, config.sample)  # a typo fails before anything is loaded
    s = settings(fl, config)
    try:
        _, step = checkpointing.locate(fl.workdir, fl.step)  # the newest complete checkpoint unless --step
        params = checkpointing.read_params(fl.workdir, use_ema=not fl.online, step=step)
    except (FileNotFoundError, ValueError) as e:
        cli.fail(f"{e} Train first: python train.py --workdir {fl.workdir}")
    mesh = sharding.make_data_mesh()
    try:
        ev, eval_set = make_evaluator(fl, config, params, mesh, s)
    except (FileNotFoundError, ValueError, ImportError) as e:  # UpsampleError is a ValueError
        cli.fail(str(e))
    print(f"Evaluating {ev.num_images} images ({eval_set.description}) on {mesh.devices.size} device(s), "
          f"{jax.process_count()} process(es); solvers {[s.label for s in solvers]}"
          f"{'; FID + patch-FID' if ev.fid else '; no FID (pass --inception)'}", flush=True)
    # one pass over the set: every batch is read once and scored by every solver and the baselines
    with tqdm(total=eval_set.num_batches, desc="eval", unit="batch", leave=False,
              disable=jax.process_index() != 0 or eval_set.num_batches < 2) as bar:
        results, grids = ev.run(params, solvers, progress=lambda done, total: bar.update(1))
    print_solver_lines(results[:len(solvers)])
    if jax.process_index() == 0:
        record = {"checkpoint": os.path.abspath(fl.workdir), "step": step, "weights": "online" if fl.online else "ema",
                  "data": eval_set.description, "num_images": ev.num_images, "image_size": config.data.image_size,
                  "lowres_size": config.data.lowres_size, "seed": s["seed"], "devices": mesh.devices.size,
                  "processes": jax.process_count(), "border_pad": int(config.sample.border_pad),
                  "dihedral_average": int(config.sample.dihedral_average),
                  "channelwise": bool(config.sample.channelwise),
                  "fid": ({"inception": os.path.abspath(s["inception"]), "num_crops": s["num_crops"],
                           "crop_size": ev.crop_size} if ev.fid else None)}
        notes = [] if ev.fid else ["FID and patch-FID not computed: pass --inception with pytorch-fid's "
                                   "pt_inception-2015-12-05-6726825d.pth."]
        out = fl.out or os.path.join(fl.workdir, "eval")
        files = evaluation.write_reports(out, record, results, {s.label: grids[s.label] for s in solvers},
                                         notes=notes)
        print(evaluation.markdown_table(results))
        print(summary_line(results))
        print(f"Results in {os.path.abspath(out)}: {' '.join(files)}")
    return 0


def run_config(fl: flags.FlagValues) -> ml_collections.ConfigDict:
    """The run's ``config.json`` with the data flags applied (``--num_images``, ``--batch_size``,
    ``--records``, ``--split``), ``--dihedral_average`` and ``--channelwise``."""
    cfg_path = os.path.join(fl.workdir, "config.json")
    if not os.path.exists(cfg_path):
        cli.fail(f"{cfg_path} not found: --workdir must be a directory written by train.py.")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    d = config.data
    if fl.num_images is not None:
        d.num_val_images = fl.num_images
    if fl.batch_size is not None:
        d.batch_size = fl.batch_size
    if fl.records:
        d.name, d.path, d.prepare_photos = "records", fl.records, False
    if fl.split:
        d.val_split = fl.split
    if fl.dihedral_average is not None:
        try:
            check_dihedral_average(fl.dihedral_average)  # before any checkpoint is read
        except ValueError as e:
            cli.fail(f"--dihedral_average: {e}")
        config.sample.dihedral_average = fl.dihedral_average
    if fl.channelwise is not None:
        config.sample.channelwise = fl.channelwise
        try:
            check_channelwise(config)  # before any checkpoint is read
        except ValueError as e:
            cli.fail(f"--channelwise: {e}")
    return config


def choose_solvers(fl: flags.FlagValues, sample) -> list[SolverSpec]:
    """``--solvers`` (default: the run's sampler), each with the run's atol, max_steps and SDE
    settings unless an SDE flag says otherwise."""
    sde_kwargs = {k: v for k, v in (("diffusion_form", fl.diffusion_form), ("diffusion_norm", fl.diffusion_norm),
                                    ("last_step", fl.last_step), ("last_step_size", fl.last_step_size))
                  if v is not None}
    if isinstance(sde_kwargs.get("last_step"), str) and sde_kwargs["last_step"].lower() == "none":
        sde_kwargs["last_step"] = None
    try:
        run = SolverSpec.from_config(sample, **sde_kwargs)
        if not fl.solvers:
            return [run]
        solvers = SolverSpec.parse_list(fl.solvers, **{k: getattr(run, k) for k in (
            "atol", "max_steps", "diffusion_form", "diffusion_norm", "last_step", "last_step_size")})
    except ValueError as e:
        cli.fail(str(e))
    if len({s.label for s in solvers}) != len(solvers):
        cli.fail(f"--solvers repeats a solver: {[s.label for s in solvers]}.")
    return solvers


def settings(fl: flags.FlagValues, config) -> dict:
    """FID, interior and seed settings: each flag, else the run's ``eval`` section and seed;
    the Inception weights and ``--images`` folder must exist."""
    pick = {k: getattr(fl, k) if getattr(fl, k) is not None else config.eval[k]
            for k in ("inception", "num_crops", "crop_size", "rim")}
    pick["seed"] = fl.seed if fl.seed is not None else int(config.seed)
    if pick["inception"] and not os.path.exists(pick["inception"]):
        cli.fail(f"--inception {pick['inception']!r} does not exist (pytorch-fid's "
                 "pt_inception-2015-12-05-6726825d.pth or a folder written by `python -m cfm_jax.convert inception`).")
    if fl.images and not os.path.isdir(fl.images):
        cli.fail(f"--images {fl.images!r} is not a folder.")
    return pick


def make_evaluator(fl: flags.FlagValues, config, params, mesh, s: dict):
    """The model (its weights checked against ``config.json``), the evaluation set (``--images``
    or the records' split) and the :class:`~cfm_jax.evaluation.Evaluator` over them."""
    upsampler = CFMUpsampler(config)
    # the weights must have the shapes config.json builds (the same check as the upsampling CLI's)
    check_params_fit_config(fl.workdir, upsampler, params)
    d = config.data
    if fl.images:
        eval_set = eval_data.image_folder_set(
            fl.images, image_size=d.image_size, lowres_size=d.lowres_size, num_images=d.num_val_images,
            batch_size=d.batch_size, n_devices=mesh.devices.size, lowres_filter=d.lowres_filter)
    else:
        _, eval_set = make_data(config, upsampler.first_stage, n_devices=mesh.devices.size, train=False)
    fid_cfg = evaluation.FIDConfig.from_path(s["inception"], num_crops=s["num_crops"], crop_size=s["crop_size"],
                                             reference_stats=fl.fid_stats)
    ev = evaluation.Evaluator(upsampler, eval_set, mesh, seed=s["seed"], fid=fid_cfg,
                              num_grid=config.train.num_grid_images,
                              rim=evaluation.resolve_rim(s["rim"], upsampler, eval_set.image_size))
    return ev, eval_set


def print_solver_lines(results) -> None:
    """One line per solver: NFE, PSNR (mean and of the mean MSE), SSIM, interior, FID, time."""
    for r in results:
        print(f"  {r.label}: NFE {r.nfe}, PSNR {r.psnr:.3f} dB (of the mean MSE {r.psnr_mean_mse:.3f} dB), "
              f"SSIM {r.ssim:.4f}"
              + (f"; interior (rim {r.rim} px) PSNR {r.psnr_interior:.3f} dB, SSIM {r.ssim_interior:.4f}"
                 if r.psnr_interior is not None else "")
              + (f", FID {r.fid:.4g}, patch-FID {r.patch_fid:.4g}" if r.fid is not None else "")
              + f", {r.seconds_per_image:.3f} s/image", flush=True)


def summary_line(results) -> str:
    """The best-PSNR solver minus bicubic, full image and interior."""
    best = max((r for r in results if r.method == "cfm"), key=lambda r: r.psnr)
    bicubic = next(r for r in results if r.method == "bicubic")
    return (f"\nCFM ({best.label}, best PSNR) minus bicubic: {best.psnr - bicubic.psnr:+.3f} dB PSNR, "
            f"{best.psnr_mean_mse - bicubic.psnr_mean_mse:+.3f} dB PSNR of the mean MSE, "
            f"{best.ssim - bicubic.ssim:+.4f} SSIM"
            + (f"; interior (rim {best.rim} px) {best.psnr_mean_mse_interior - bicubic.psnr_mean_mse_interior:+.3f}"
               f" dB PSNR of the mean MSE, {best.ssim_interior - bicubic.ssim_interior:+.4f} SSIM"
               if best.psnr_interior is not None else "") + ".")


if __name__ == "__main__":
    sys.exit(main())
