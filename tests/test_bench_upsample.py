"""bench/bench_upsample.py runs and prints one JSON row per batch size (tiny models, 64² output)."""
import json

from tests.test_trainer import run_cli


def test_bench_upsample_prints_json_rows():
    proc = run_cli(["bench/bench_upsample.py", "--small", "--batches", "2", "--num_steps", "4", "--repeats", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["batch"] for r in rows] == [2]
    for r in rows:
        assert r["nfe"] == 3 and r["input_latent"] == [4, 4, 4] and r["output_image"] == [64, 64, 3]
        per_image, per_call = r["seconds_per_image"], r["seconds_per_call"]
        assert per_call["total"] == per_call["cfm"] + per_call["decode"] > 0
        assert abs(per_call["cfm"] - per_call["psu"] - per_call["flow"]) < 1e-9
        assert abs(per_image["total"] * r["batch"] - per_call["total"]) < 1e-9
