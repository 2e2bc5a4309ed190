"""bench/bench_scaling.py runs data parallelism and FSDP on virtual CPU devices and reports that
FSDP, not data parallelism, divides the train state per device."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_scaling_smoke():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_scaling.py"),
           "--devices=1,2", "--modes=data,fsdp", "--steps=1", "--latent_size=16", "--batch_size=4",
           "--config.model.channel_mult=(1,)", "--config.model.attention_resolutions=()",
           "--config.mesh.fsdp_min_size=256"]  # small kernels get sharded too
    # Compile time dominates on CPU; the unoptimised backend halves it and changes no sizes.
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert "virtual" in result["note"]
    rows = {(r["mode"], r["devices"]): r for r in result["rows"]}
    assert sorted(rows) == [("data", 1), ("data", 2), ("fsdp", 1), ("fsdp", 2)]
    for r in rows.values():
        assert r["compile_s"] > 0 and r["step_s"] > 0 and r["examples_per_s"] > 0, r
        assert r["num_traces"] == 1 and r["global_batch"] == 4
        assert r["mesh"] == ({"data": r["devices"], "fsdp": 1} if r["mode"] == "data"
                             else {"data": 1, "fsdp": r["devices"]})
        assert r["memory_per_device"]["argument_bytes"] >= r["state_bytes_per_device"]
        assert r["state_bytes_per_device"] == r["state_bytes_per_device_planned"]
    data2, fsdp2 = rows["data", 2], rows["fsdp", 2]
    assert data2["state_bytes"] == fsdp2["state_bytes"] == rows["data", 1]["state_bytes"]
    assert data2["state_bytes_per_device"] == data2["state_bytes"]  # data parallelism: replicated
    assert fsdp2["state_bytes_per_device"] < 0.7 * data2["state_bytes_per_device"]
    replicated = fsdp2["state_replicated_bytes"]  # arrays under fsdp_min_size: whole on every device
    assert fsdp2["state_bytes_per_device"] == replicated + (fsdp2["state_bytes"] - replicated) // 2
    assert fsdp2["memory_per_device"]["argument_bytes"] < 0.7 * data2["memory_per_device"]["argument_bytes"]
    assert rows["data", 1]["speedup_vs_1"] == 1.0 and fsdp2["speedup_vs_1"] > 0
