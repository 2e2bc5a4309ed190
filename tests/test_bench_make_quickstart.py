"""bench/bench_make_quickstart.py writes the README's quick-start table from eval.py's
metrics.json (rows made by the evaluator's own ``MethodResult.row``) between its markers, and
leaves the rest of the file as it was."""
import importlib.util
import json
import os
import subprocess
import sys

from cfm_jax.evaluation import MethodResult

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_make_quickstart.py")


def _result(method, label, nfe, base):
    return MethodResult(method=method, label=label, solver=None, nfe=nfe, psnr=base + 4.1, ssim=0.9 + base / 1000,
                        mse=1e-3, psnr_mean_mse=base, rim=4, psnr_interior=base + 4.6, ssim_interior=0.91,
                        mse_interior=1e-3, psnr_mean_mse_interior=base + 0.05).row()


def test_table_is_written_between_the_markers(tmp_path):
    metrics = {"num_images": 128, "image_size": 64,
               "results": [_result("cfm", "euler-2", 6, 30.9), _result("bicubic", "bicubic", 0, 30.2367),
                           _result("bilinear", "bilinear", 0, 29.3142)]}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n\n<!-- quickstart-results -->\nold table\n<!-- /quickstart-results -->\n\nafter\n")
    cmd = [sys.executable, SCRIPT, "--metrics", str(tmp_path / "metrics.json"), "--readme", str(readme)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n<!-- quickstart-results -->\nMeasured by `bench/bench_make_quickstart.py` on ")
    assert text.endswith("<!-- /quickstart-results -->\n\nafter\n") and "old table" not in text
    assert "| CFM (euler-2, 6 network evaluations per image) | 30.900 | 0.9309 | 35.000 | 30.950, 0.9100 |" in text
    assert "| bicubic | 30.237 |" in text and "| bilinear (the flow's source) | 29.314 |" in text
    assert "| method (128 held-out 64² crops) |" in text and "interior (rim 4 px)" in text
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["seconds"] is None and len(result["results"]) == 3

    spec = importlib.util.spec_from_file_location("bench_make_quickstart", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    timed = bench.table(metrics, seconds={"train": 373.7, "eval": 18.3, "total": 392.0},
                        where={"date": "2026-12-03", "commit": "abc1234", "cpu": "a CPU"})
    assert timed.startswith("Measured by `bench/bench_make_quickstart.py` on 2026-12-03 at commit abc1234, on a CPU: "
                            "6 min 32 s for preparation and training (374 s) and evaluation (18 s).\n")

    readme.write_text("no markers here\n")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "needs exactly one <!-- quickstart-results -->" in proc.stderr
    assert readme.read_text() == "no markers here\n"  # nothing written on error
