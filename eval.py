"""Evaluates a trained CFM upsampler on held-out validation photos.

    python eval.py --workdir runs/quickstart
    python eval.py --workdir runs/quickstart --method euler --num_steps 40 --no_ema

Reads the run's ``config.json`` and its newest checkpoint (EMA weights by default),
samples the validation crops, and compares PSNR / SSIM / MSE of the CFM prediction
with bicubic and bilinear up-sampling of the same low-res crops. Writes
``<workdir>/eval/metrics.json``, ``metrics.csv``, ``report.md`` and ``grid.png``.
(The offline-evaluation issue grows this into FID, patch-FID, sweeps and records.)
"""
import csv
import json
import os
import sys

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by train.py.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: newest).")
_METHOD = flags.DEFINE_string("method", None, "ODE solver (default: the run's sample.method).")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "Grid points of fixed-step solvers (default: config).")
_NO_EMA = flags.DEFINE_bool("no_ema", False, "Evaluate the online weights instead of the EMA.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Validation crops (default: data.num_val_images).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: <workdir>/eval).")


def main(argv):
    del argv
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)  # orbax metadata chatter
    import jax
    import ml_collections
    from PIL import Image

    from cfm_jax import checkpointing, sharding
    from cfm_jax.trainer import Validator, batch_preparer, make_data
    from cfm_jax.upsampler import CFMUpsampler

    workdir = _WORKDIR.value
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        sys.exit(f"{cfg_path} not found: --workdir must be a directory written by train.py.")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    if _METHOD.value:
        config.sample.method = _METHOD.value
    if _NUM_STEPS.value:
        config.sample.num_steps = _NUM_STEPS.value
    if _NUM_IMAGES.value:
        config.data.num_val_images = _NUM_IMAGES.value
    use_ema = not _NO_EMA.value

    try:
        params = checkpointing.read_params(workdir, use_ema=use_ema, step=_STEP.value)
    except FileNotFoundError as e:
        sys.exit(f"{e} Train first: python train.py --workdir {workdir}")
    mesh = sharding.make_data_mesh()
    try:
        upsampler = CFMUpsampler(config)
    except (FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    params = jax.device_put(params, sharding.replicated(mesh))
    try:
        _, val_batches = make_data(config, upsampler.first_stage, n_devices=mesh.devices.size, train=False)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    validator = Validator(upsampler, val_batches, mesh, config.sample, config.seed,
                          prepare=batch_preparer(upsampler, has_latents=config.data.name == "records"))
    results, grid = validator.run(params, num_grid=config.train.num_grid_images)

    out = _OUT.value or os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    n_images = sum(len(b["image"]) for b in val_batches)
    record = {"workdir": os.path.abspath(workdir), "weights": "ema" if use_ema else "online",
              "solver": config.sample.method, "num_steps": config.sample.num_steps,
              "num_images": n_images, "metrics": {k.removeprefix("val/"): v for k, v in results.items()}}
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
    rows = [(m, record["metrics"].get(f"{m}_psnr"), record["metrics"].get(f"{m}_ssim"),
             record["metrics"].get(f"{m}_mse")) for m in ("cfm", "bicubic", "bilinear")]
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "psnr_db", "ssim", "mse"])
        w.writerows(rows)
    Image.fromarray(grid).save(os.path.join(out, "grid.png"))
    table = ["| method | PSNR (dB) | SSIM | MSE |", "|---|---|---|---|"]
    table += [f"| {m} | {p:.3f} | {s:.4f} | {e:.5f} |" for m, p, s, e in rows]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(f"# Evaluation of {record['workdir']}\n\n{n_images} held-out validation crops "
                f"({config.data.lowres_size}² -> {config.data.image_size}²), {record['weights']} weights, "
                f"solver {config.sample.method} with {config.sample.num_steps} grid points "
                f"({results['val/nfe']} NFE).\n\n" + "\n".join(table) +
                "\n\n![grid: high-res | low-res (bilinear) | CFM](grid.png)\n")
    print("\n".join(table))
    better = record["metrics"]["cfm_psnr"] > record["metrics"]["bicubic_psnr"]
    print(f"\nCFM {'beats' if better else 'does NOT beat'} bicubic by "
          f"{record['metrics']['cfm_psnr'] - record['metrics']['bicubic_psnr']:+.3f} dB PSNR, "
          f"{record['metrics']['cfm_ssim'] - record['metrics']['bicubic_ssim']:+.4f} SSIM.")
    print(f"Results in {os.path.abspath(out)}: metrics.json metrics.csv report.md grid.png")


if __name__ == "__main__":
    app.run(main)
