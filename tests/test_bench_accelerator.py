"""bench/bench_accelerator.py: the batch search settles on the largest batch that fits (and never
compiles or runs one predicted too big), the MFU is model FLOPs / (time x peak), and a --small
run on the CPU prints the JSON rows a GPU run will print."""
import json

import pytest

from bench.bench_accelerator import Budget, mfu, peak_tflops, predict_memory, search_batch
from tests.test_trainer import run_cli


def linear_compiler(per_example, fixed, calls, oom_from=None, error_at=None, clock=None, compile_s=0.0):
    """A stand-in for the XLA compile: memory ``fixed + per_example * b``; out-of-memory errors
    from ``oom_from`` on, another error at ``error_at``; every call is logged in ``calls``."""
    def compile_fn(b):
        calls.append(b)
        if clock is not None:
            clock[0] += compile_s
        if error_at is not None and b == error_at:
            raise ValueError("INTERNAL: some unrelated compiler failure")
        if oom_from is not None and b >= oom_from:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 137438953472 bytes.")
        return f"program@{b}", fixed + per_example * b
    return compile_fn


def test_search_jumps_to_the_largest_predicted_fit_and_never_compiles_a_predicted_misfit():
    calls = []
    best, compiled, rows, reason = search_batch(linear_compiler(3, 10, calls), [1, 2, 4, 8, 16, 32, 64], 100,
                                                fixed_bytes=10)
    assert calls == [1, 16]  # 1, then 16 (32 would need 106 > 1.05 x 100): two compiles, not five
    assert (best, compiled, reason) == (16, "program@16", "memory (predicted)")
    assert [(r["per_device_batch"], r["fits"], r["source"]) for r in rows] == [
        (1, True, "compiled"), (16, True, "compiled"), (32, False, "predicted")]
    assert rows[-1]["memory_bytes"] == 106 and rows[1]["predicted_bytes"] == 58


def test_search_counts_an_out_of_memory_compile_as_not_fitting_and_backs_off():
    calls = []
    best, compiled, rows, reason = search_batch(linear_compiler(1, 10, calls, oom_from=8), [1, 2, 4, 8, 16], 10 ** 6)
    assert calls == [1, 16, 8, 4]
    assert (best, compiled, reason) == (4, "program@4", "memory")
    assert [r["source"] for r in rows] == ["compiled", "compile: out of memory", "compile: out of memory", "compiled"]
    assert not rows[1]["fits"] and "RESOURCE_EXHAUSTED" in rows[1]["error"]


def test_search_stops_on_other_compile_errors_and_when_nothing_fits():
    calls = []
    best, _, rows, reason = search_batch(linear_compiler(1, 10, calls, error_at=16), [1, 16], 10 ** 6)
    assert (best, reason) == (1, "compile error") and "ValueError" in rows[-1]["error"]

    best, compiled, rows, reason = search_batch(linear_compiler(50, 10, []), [4, 8], 100)
    assert (best, compiled, reason) == (None, None, "memory")
    assert [(r["per_device_batch"], r["fits"], r["memory_bytes"]) for r in rows] == [(4, False, 210)]


def test_search_leaves_a_compile_out_when_the_budget_would_not_hold_it():
    clock = [0.0]
    calls = []
    budget = Budget(100.0, clock=lambda: clock[0])
    best, _, rows, reason = search_batch(linear_compiler(1, 0, calls, clock=clock, compile_s=60.0), [1, 2, 4],
                                         100, confirm=1.0, budget=budget)
    # after the first 60 s compile, 40 s are left < 1.2 x 60 s: batch 4 is not compiled
    assert calls == [1] and (best, reason) == (1, "budget")


def test_memory_prediction_from_one_and_two_points():
    assert predict_memory([(2, 30)], 8, fixed_bytes=10) == 90           # 10 + 10 per example
    assert predict_memory([(2, 30), (4, 40)], 8, fixed_bytes=0) == 60   # the line through both
    assert predict_memory([], 8, fixed_bytes=0) is None


def test_peak_table_and_mfu():
    assert peak_tflops("NVIDIA H200") == (989.0, "table: H200")
    assert peak_tflops("NVIDIA H100 80GB HBM3")[0] == 989.0
    assert peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert peak_tflops("TPU v5 lite")[0] == 197.0 and peak_tflops("TPU v5")[0] == 459.0
    assert peak_tflops("cpu") == (None, "unknown")
    assert peak_tflops("cpu", 2.5) == (2.5, "--peak_tflops")
    assert mfu(989e12 * 0.5, 1.0, 989.0) == pytest.approx(0.5)
    assert mfu(1.0, 1.0, None) is None


def test_small_run_prints_the_json_rows(tmp_path):
    # Limit 0.0055 GiB x 0.95: the tiny step fits at batch 1 (about 4.7 MB) and is predicted not
    # to at batch 4 (about 7 MB): one compile of the train step. The breakdown and the upsampling
    # rows cost more compiles (the latter's pieces are tested in test_bench_upsample.py).
    out = tmp_path / "rows.jsonl"
    proc = run_cli(["bench/bench_accelerator.py", "--small", "--train_batches", "1,4", "--memory_limit_gib",
                    "0.0055", "--peak_tflops", "0.5", "--nobreakdown", "--noupsample", "--out_jsonl", str(out),
                    "--profile_dir", str(tmp_path / "profile"), "--profile_steps", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["bench"]: r for r in map(json.loads, (l for l in proc.stdout.splitlines() if l.startswith("{")))}
    assert list(rows) == ["accelerator_env", "train_batch_search", "train_step", "train_profile", "summary"]
    assert [json.loads(l)["bench"] for l in out.read_text().splitlines()] == list(rows)

    env = rows["accelerator_env"]
    assert env["peak_tflops"] == 0.5 and env["fit_limit_bytes"] == int(0.95 * 0.0055 * 2 ** 30)

    search = rows["train_batch_search"]
    assert search["chosen_per_device_batch"] == 1 and search["stop_reason"].startswith("memory")
    first, last = search["rows"][0], search["rows"][-1]
    assert first["fits"] and 0 < first["memory_bytes"] <= search["memory_limit_bytes"] and first["compile_s"] > 0
    assert last["per_device_batch"] == 4 and not last["fits"]

    step = rows["train_step"]
    assert step["per_device_batch"] == step["global_batch"] == 1 and step["loss_finite"]
    assert step["step_s"] > 0 and step["examples_per_s"] == pytest.approx(1 / step["step_s"])
    assert step["model_flops_per_step_per_device"] == step["model_flops_per_example"] > 0
    assert step["mfu"] == pytest.approx(step["model_flops_per_example"] / (step["step_s"] * 0.5e12))
    assert 0 < step["mfu"] < 1
    assert step["xla_flops_per_step_per_device"] > 0 and step["memory"]["total"] == first["memory_bytes"]

    assert any(f.endswith("xplane.pb") for f in rows["train_profile"]["files"]), rows["train_profile"]
    assert rows["summary"]["mfu"] == step["mfu"] and rows["summary"]["sections"]["train"] == "ran"
