"""bench/bench_vs_original.py end to end against tests/fake_fmboost (a stand-in with the
original's module paths and call signatures; CI has no checkout of the original), with a tiny
UNet: both sides are measured in their own processes and profiled by category."""
import json
import os

from tests.test_trainer import run_cli

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_fmboost")


def test_bench_runs_both_sides_and_reports_ratios_and_profiles(tmp_path):
    out, doc = tmp_path / "result.jsonl", tmp_path / "benchmarks.md"
    doc.write_text("# CPU\n\n<!-- vs-original -->\nold\n<!-- /vs-original -->\n\nafter\n")
    proc = run_cli(["bench/bench_vs_original.py", "--original", FAKE, "--small", "--batches", "2",
                    "--steps", "1", "--warmup", "0", "--grid", "3", "--profile_calls", "1", "--out", str(out),
                    "--doc", str(doc)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    assert json.loads(out.read_text().strip()[len("RESULT "):]) == result
    assert result["date"] and result["cpu"] and result["commit"]
    # the docs table, written from this result between its markers
    text = doc.read_text()
    assert text.startswith("# CPU\n\n<!-- vs-original -->\nMeasured by `bench/bench_vs_original.py` on "
                           f"{result['date']} at commit {result['commit']}, on {result['cpu']}: 1 round(s)")
    assert text.endswith("<!-- /vs-original -->\n\nafter\n") and "\nold\n" not in text
    train_row = next(x for x in text.splitlines() if x.startswith("| train step, batch 2 (EMA included) |"))
    assert f"**{result['measurements']['train_b2']['ratio']:.3f}**" in train_row
    assert any(x.startswith("| 3-point Euler (2 NFE), batch 2 |") for x in text.splitlines())
    assert any(x.startswith("| peak RSS, train step, batch 2 |") for x in text.splitlines())
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


def test_docs_table_from_an_earlier_result(tmp_path):
    """--from_result writes the table of an earlier run's --out file: per-round ratios, and
    each target met or missed by how much."""
    entry = dict(original_s=40.0, cfm_jax_s=28.4, ratio=0.71, ratios=[0.71, 0.69, 0.72], original_peak_rss_mib=3000.0,
                 cfm_jax_peak_rss_mib=3600.0, rss_ratio=1.2, rss_ratios=[1.2, 1.2, 1.2])
    train = dict(original_s=6.0, cfm_jax_s=3.0, ratio=0.5, ratios=[0.5, 0.5, 0.5], original_peak_rss_mib=7000.0,
                 cfm_jax_peak_rss_mib=6930.0, rss_ratio=0.99, rss_ratios=[0.99, 1.01, 0.98])
    result = {"benchmark": "cfm-jax_vs_original", "date": "2026-12-03", "commit": "abc1234", "cpu": "a CPU",
              "latent_size": 32, "threads": 2, "euler_grid": 40, "rounds": 3,
              "cpu_convolutions": {"training": "ynnpack", "inference": "eigen"},
              "measurements": {"sample_b8": entry, "train_b8": train}}
    src, doc = tmp_path / "out.jsonl", tmp_path / "benchmarks.md"
    src.write_text("RESULT " + json.dumps(result) + "\n")
    doc.write_text("<!-- vs-original -->\n<!-- /vs-original -->\n")
    proc = run_cli(["bench/bench_vs_original.py", "--from_result", str(src), "--doc", str(doc)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = doc.read_text().splitlines()
    assert lines[1] == ("Measured by `bench/bench_vs_original.py` on 2026-12-03 at commit abc1234, on a CPU: "
                        "3 round(s) (medians), 2 threads, a 40-point Euler grid, latents 32², cfm-jax's CPU "
                        "convolutions training ynnpack, inference eigen.")
    rows = [x for x in lines if x.startswith("| ") and not x.startswith("| what")]
    assert rows == [
        "| train step, batch 8 (EMA included) | 6.00 s | 3.00 s | **0.500** (0.500, 0.500, 0.500) | ≤ 0.8 met |",
        "| 40-point Euler (39 NFE), batch 8 | 40.00 s | 28.40 s | **0.710** (0.710, 0.690, 0.720) | "
        "≤ 0.7: NOT met (1.4% over) |",
        "| peak RSS, train step, batch 8 | 7000 MiB | 6930 MiB | **0.990** (0.990, 1.010, 0.980) | ≤ 1 met |",
        "| peak RSS, 40-point Euler, batch 8 | 3000 MiB | 3600 MiB | **1.200** (1.200, 1.200, 1.200) | (none) |",
    ]
    proc = run_cli(["bench/bench_vs_original.py", "--from_result", str(doc), "--doc", str(doc)])
    assert proc.returncode != 0 and "no line starting with 'RESULT '" in proc.stderr
