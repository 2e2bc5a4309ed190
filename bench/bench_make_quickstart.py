"""`make quickstart` end to end, timed, and the README's quick-start table written from its result.

Runs what `make quickstart` runs (``train.py --config configs/quickstart.py``, then ``eval.py``)
in a fresh run folder, with the bundled photos prepared into records inside it (so preparation is
timed too), prints one JSON line (``RESULT {...}``: seconds per stage, the scores of
``eval/metrics.json``, date, commit, CPU) and, with ``--readme README.md``, rewrites the table
between the ``<!-- quickstart-results -->`` markers of that file with them::

    .venv/bin/python bench/bench_make_quickstart.py --readme README.md

``--metrics`` skips the runs and writes the table from an existing ``eval/metrics.json`` (its
timing then unknown, left out of the table).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import doc_tables  # noqa: E402

TABLE = "quickstart-results"  # the README block this script writes (doc_tables markers)
_ROWS = (("cfm", "CFM ({solver}, {nfe} network evaluations per image)"), ("bicubic", "bicubic"),
         ("bilinear", "bilinear (the flow's source)"))


def define_flags() -> None:
    """The command line's flags (defined when run, not on import: tests import the module)."""
    flags.DEFINE_string("workdir", os.path.join(ROOT, "runs", "bench_make_quickstart"),
                        "Folder of the run (run/) and of its records (records/); both are replaced.")
    flags.DEFINE_string("readme", None, "Rewrite the quick-start table of this file.")
    flags.DEFINE_string("metrics", None, "Write the table from this eval/metrics.json instead of running.")


def table(metrics: dict, *, seconds: dict | None, where: dict) -> str:
    """The markdown between the markers: how it was measured (``where``: date, commit and CPU,
    ``doc_tables.provenance()``), then one row per method."""
    rows = {r["method"]: r for r in metrics["results"]}
    missing = [m for m, _ in _ROWS if m not in rows]
    if missing:
        raise ValueError(f"metrics.json has no result for {missing}: it must come from eval.py on the quick start.")
    when = doc_tables.measured_by("bench/bench_make_quickstart.py", where)
    if seconds:
        minutes, rest = divmod(round(seconds["total"]), 60)
        when += (f": {minutes} min {rest} s for preparation and training "
                 f"({seconds['train']:.0f} s) and evaluation ({seconds['eval']:.0f} s)")
    lines = [when + ".", "",
             f"| method ({metrics['num_images']} held-out {metrics['image_size']}² crops) | PSNR of the mean MSE (dB) "
             f"| SSIM | mean PSNR (dB) | interior (rim {rows['cfm'].get('rim', 0)} px): PSNR of the mean MSE, SSIM |",
             "|---|---|---|---|---|"]
    for method, label in _ROWS:
        r = rows[method]
        name = label.format(solver=r["label"], nfe=r["nfe"])
        lines.append(f"| {name} | {r['psnr_mean_mse']:.3f} | {r['ssim']:.4f} | {r['psnr']:.3f} | "
                     f"{r['psnr_mean_mse_interior']:.3f}, {r['ssim_interior']:.4f} |")
    return "\n".join(lines)


def run_quickstart(workdir: str) -> tuple[dict, dict]:
    """Runs train.py and eval.py as `make quickstart` does; returns (metrics.json, seconds)."""
    run, records = os.path.join(workdir, "run"), os.path.join(workdir, "records")
    for folder in (run, records):  # only what an earlier call of this bench wrote: nothing else is removed
        shutil.rmtree(folder, ignore_errors=True)
    train = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs", "quickstart.py"),
             "--workdir", run, f"--config.data.path={records}"]
    evaluate = [sys.executable, os.path.join(ROOT, "eval.py"), "--workdir", run]
    seconds = {}
    for name, cmd in (("train", train), ("eval", evaluate)):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, cwd=ROOT)
        seconds[name] = round(time.perf_counter() - start, 1)
    seconds["total"] = round(seconds["train"] + seconds["eval"], 1)
    with open(os.path.join(run, "eval", "metrics.json")) as f:
        return json.load(f), seconds


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    fl = flags.FLAGS
    if fl.metrics:
        with open(fl.metrics) as f:
            metrics, seconds = json.load(f), None
    else:
        metrics, seconds = run_quickstart(fl.workdir)
    where = doc_tables.provenance()
    block = table(metrics, seconds=seconds, where=where)
    print("RESULT " + json.dumps({"benchmark": "make_quickstart", **where, "seconds": seconds,
                                  "results": metrics["results"]}))
    if fl.readme:
        doc_tables.write_block(fl.readme, TABLE, block)
        print(f"Rewrote the quick-start table of {fl.readme}.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
