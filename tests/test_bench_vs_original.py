"""bench/bench_vs_original.py end to end against tests/fake_fmboost (a stand-in with the
original's module paths and call signatures; CI has no checkout of the original), with a tiny
UNet: both sides are measured in their own processes and profiled by category."""
import json
import os

from tests.test_trainer import run_cli

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_fmboost")


def test_bench_runs_both_sides_and_reports_ratios_and_profiles(tmp_path):
    out = tmp_path / "result.jsonl"
    proc = run_cli(["bench/bench_vs_original.py", "--original", FAKE, "--small", "--batches", "2",
                    "--steps", "1", "--warmup", "0", "--grid", "3", "--profile_calls", "1", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert json.loads(out.read_text().strip()[len("RESULT "):]) == result
    m = result["measurements"]
    assert set(m) == {"train_b2", "sample_b2"}
    for name, entry in m.items():
        assert entry["original_s"] > 0 and entry["cfm_jax_s"] > 0
        assert abs(entry["ratio"] - entry["cfm_jax_s"] / entry["original_s"]) < 1e-3
        for side in ("original", "cfm_jax"):
            ms = entry["profile"][side]["categories_ms"]
            assert ms["convolution"] > 0, (name, side, ms)
            assert abs(sum(entry["profile"][side]["categories_share"].values()) - 1) < 0.01
    train = m["train_b2"]
    assert train["rss_target_mib"] == train["original_peak_rss_mib"]
    for side in ("original", "cfm_jax"):  # the optimizer and the EMA are found on both sides
        ms = train["profile"][side]["categories_ms"]
        assert ms["optimizer"] > 0 and ms["ema"] > 0, (side, ms)


def test_missing_original_is_a_clear_error():
    proc = run_cli(["bench/bench_vs_original.py", "--original", "/nonexistent"], env={"FMBOOST_ORIGINAL": ""})
    assert proc.returncode != 0
    assert "is not a checkout of CompVis/fm-boosting" in proc.stderr
