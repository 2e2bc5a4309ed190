"""The compile-only TPU planner (cfm_jax/plan.py), with the real TPU compiler from libtpu.

No TPU is needed: libtpu compiles for a topology's compile-only devices on this CPU machine.
A tiny config compiles for one v5e chip (v5e:1x1) and is planned for v5e:2x2 (4 chips, to
exercise the sharding); the plan's numbers are compared with ``memory_analysis()`` of programs compiled here.
"""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from cfm_jax import plan as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join("tests", "plan_config_tiny.py")
TOPOLOGY = "v5e:2x2"
# the tiny UNet at 4096 channels: about 1.3e9 parameters, ~20 GiB of fp32 weights + Adam + EMA per chip
TOO_BIG = ["--config.model.model_channels=4096", "--config.model.channel_mult=1,2", "--config.data.image_size=8"]


def run_plan(*args, cache):
    return subprocess.run([sys.executable, "-m", "cfm_jax.plan", "--config", TINY, "--topology", TOPOLOGY,
                           "--cache_dir", str(cache), *args], capture_output=True, text=True, cwd=ROOT, timeout=900)


def tiny_config():
    sys.path.insert(0, ROOT)
    from tests.plan_config_tiny import get_config
    return get_config()


@pytest.mark.parametrize("text, expected", [
    ("v5e:4x4", "v5e:4x4"), ("v4-8", "v4:2x2x1"), ("v4-32", "v4:2x2x4"), ("v5litepod-16", "v5e:4x4"),
    ("v5e-64", "v5e:8x8"), ("v5litepod-1", "v5e:1x1"), ("v5p-8", "v5p:2x2x1"), ("v6e-16", "v6e:4x4"), ("v4:2x2x1", "v4:2x2x1"),
])
def test_topology_names(text, expected):
    assert plan_lib.topology_name(text) == expected


@pytest.mark.parametrize("text", ["v9-8", "v4-6", "tpu", "v5e:4"])
def test_unknown_topologies_are_usage_errors(text):
    with pytest.raises(plan_lib.PlanError, match="topology"):
        plan_lib.topology_name(text)


def test_devices_are_chips_with_known_figures():
    for topo, chips, kind in (("v4-8", 4, "TPU v4"), ("v5e:2x2", 4, "TPU v5 lite"), ("v5p-8", 4, "TPU v5"),
                              ("v5litepod-1", 1, "TPU v5 lite")):
        devices = plan_lib.tpu_devices(topo)
        assert len(devices) == chips and devices[0].device_kind == kind  # v4 in megacore mode: 1 device/chip


def test_the_smallest_topology_one_chip_compiles():
    """v5e:1x1, a single chip: the tiny config's sampler compiles and reports its memory."""
    config = tiny_config()
    config.data.batch_size = 2
    compiled = plan_lib.lower_program("sample", config, plan_lib.tpu_devices("v5e:1x1"))[0].compile()
    r = plan_lib.analyse(compiled, plan_lib.CHIPS["TPU v5 lite"], {"per_chip_batch": 2, "loop": None})
    assert r["fits"] and 0 < r["peak_bytes"] < 2 ** 30 and r["collective_bytes"] == 0  # one chip talks to nobody


def test_collective_bytes_of_hlo():
    hlo = """
  %ag = bf16[1024,1024]{1,0} all-gather(bf16[256,1024]{1,0} %p), replica_groups={{0,1,2,3}}, dimensions={0}
  %ar = f32[100]{0} all-reduce(f32[100]{0} %g), to_apply=%add
  %rs = f32[25]{0} reduce-scatter(f32[100]{0} %h), dimensions={0}
  %ad = f32[7]{0} add(f32[7]{0} %a, f32[7]{0} %b)
  %t = (bf16[32]{0:T(256)(128)(2,1)S(1)}, f32[3,3]{1,0}) all-reduce-start(bf16[32]{0:T(256)} %x, f32[3,3]{1,0} %y), channel_id=1, replica_groups=[1,4]<=[4]
  %d = (bf16[32]{0}, f32[3,3]{1,0}) all-reduce-done((bf16[32]{0}, f32[3,3]{1,0}) %t)
"""
    assert plan_lib.collective_bytes(hlo) == 1024 * 1024 * 2 + 2 * 400 + 400 + 2 * (64 + 36)


def test_small_config_plan_equals_the_compilers_memory_analysis(tmp_path):
    """The CLI plans train, eval and sample of a tiny config on 4 v5e chips; its JSON numbers are
    the ones memory_analysis()/cost_analysis() give for the same programs compiled here; a second
    run reads the cache and compiles nothing."""
    r = run_plan("--search", "0", "--json", str(tmp_path / "plan.json"), cache=tmp_path / "cache")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "FITS" in r.stdout and "DOES NOT FIT" not in r.stdout
    (report,) = json.loads((tmp_path / "plan.json").read_text())
    assert report["topology"] == TOPOLOGY and report["chips"] == 4 and report["fits"] is True
    assert report["compiles"] == 3
    programs = report["given"]["programs"]
    assert set(programs) == set(plan_lib.PROGRAMS)

    config = tiny_config()
    devices = plan_lib.tpu_devices(TOPOLOGY)
    for name, got in programs.items():
        lowered, info = plan_lib.lower_program(name, config, devices)
        compiled = lowered.compile()
        m = compiled.memory_analysis()
        assert (got["argument_bytes"], got["output_bytes"], got["alias_bytes"], got["temp_bytes"],
                got["generated_code_bytes"]) == (m.argument_size_in_bytes, m.output_size_in_bytes,
                                                 m.alias_size_in_bytes, m.temp_size_in_bytes,
                                                 m.generated_code_size_in_bytes), name
        assert got["peak_bytes"] == (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                                     + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
        assert got["xla_flops"] == compiled.cost_analysis()["flops"] > 0
        assert got["fits"] and got["headroom_bytes"] == 16 * 2 ** 30 - got["peak_bytes"]
        assert got["predicted_seconds"] == max(got["roofline_seconds"].values()) > 0
        assert got["per_chip_batch"] == 2
    train = programs["train"]
    # the train step is one update: XLA's FLOPs cover forward + backward, at least the analytic 3x forward
    assert train["flops"] >= train["model_flops"] > 0
    assert 0 < train["predicted_mfu"] < 1
    # data parallelism (data=4): the gradients (bf16, the compute dtype) are all-reduced: twice their bytes
    import jax
    from cfm_jax.model import CFMUpsampler
    params = jax.eval_shape(lambda r: CFMUpsampler(config).init(r, 16), jax.random.PRNGKey(0))
    grad_bytes = sum(x.size * 2 for x in jax.tree.leaves(params))
    assert 2 * grad_bytes <= train["collective_bytes"] <= 2.5 * grad_bytes  # + loss, norms
    # the samplers' loop (2 Euler steps) is counted once by XLA and corrected to both steps
    sample = programs["sample"]
    assert sample["flops"] > sample["xla_flops"]

    again = run_plan("--search", "0", "--json", str(tmp_path / "again.json"), cache=tmp_path / "cache")
    assert again.returncode == 0, again.stderr
    (report2,) = json.loads((tmp_path / "again.json").read_text())
    assert report2["compiles"] == 0 and all(p["cached"] for p in report2["given"]["programs"].values())
    assert report2["given"]["programs"]["train"]["peak_bytes"] == train["peak_bytes"]


def test_a_config_sized_not_to_fit_is_reported_with_exit_3(tmp_path):
    r = run_plan("--programs", "train", "--search", "0", "--json", str(tmp_path / "plan.json"), *TOO_BIG,
                 cache=tmp_path / "cache")
    assert r.returncode == plan_lib.EXIT_DOES_NOT_FIT == 3, r.stdout + r.stderr
    assert "DOES NOT FIT as configured" in r.stdout
    assert "train | no" in r.stdout  # the compiler itself refused: HBM exhausted
    (report,) = json.loads((tmp_path / "plan.json").read_text())
    train = report["given"]["programs"]["train"]
    assert report["fits"] is False and train["fits"] is False
    assert train["required_temp_bytes"] > train["compiler_available_bytes"] > 15 * 2 ** 30  # v5e: 16 GiB


def test_usage_errors_exit_2_with_one_line(tmp_path):
    r = run_plan("--search", "0", "--topology", "v9:1x1", cache=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "topology" in r.stderr
    r = run_plan("--config.model.bogus=1", cache=tmp_path)
    assert r.returncode == 2 and "error:" in r.stderr and "bogus" in r.stderr


# --------------------------------------------------------------------------- the layout search, without compiling
class FakePlanner(plan_lib.Planner):
    """The search logic over a made-up memory model: peak = per-chip batch * act / (remat factor) +
    params / fsdp * (0.5 for bf16), time = per-chip batch (accumulation and remat cost extra)."""

    def __init__(self, n_chips, hbm, act, params):
        self.n_chips, self.hbm, self.act, self.params = n_chips, hbm, act, params
        self.log = lambda s: None
        self.measured = []

    def measure(self, program, config):
        layout = plan_lib.Layout.of(config, self.n_chips)
        self.measured.append(layout)
        per_chip = layout.batch_size / self.n_chips
        remat = {"none": 1.0, "save_matmuls": 2.0, "full": 4.0}[layout.remat]
        peak = per_chip / layout.grad_accum * self.act / remat + \
            self.params / layout.fsdp * (0.5 if layout.param_dtype == "bfloat16" else 1.0)
        seconds = per_chip * (1 + 0.3 * (remat > 1)) * (1 + 0.05 * (layout.grad_accum > 1))
        return {"fits": peak <= self.hbm, "peak_bytes": peak, "hbm_bytes": self.hbm, "predicted_seconds": seconds,
                "predicted_examples_per_s_per_chip": per_chip / seconds, "flops": 1.0, "bound": "compute",
                "compile_seconds": 0.0}


def _base(config, n):
    return plan_lib.Layout.of(config, n)


def test_search_saves_memory_step_by_step_until_it_fits():
    config = tiny_config()
    config.data.batch_size = 64
    p = FakePlanner(n_chips=4, hbm=100.0, act=10.0, params=80.0)  # 16/chip: 160 + 80 > 100
    base = _base(config, 4)
    first = p.measure("train", config)
    assert not first["fits"]
    tried = p.search(config, base, first, budget=8)
    layouts = [l for l, _ in tried]
    # full FSDP (160 + 20), remat save_matmuls (80 + 20 = 100: fits) and stop
    assert layouts[1] == dataclasses.replace(base, data=1, fsdp=4)
    assert layouts[2] == dataclasses.replace(base, data=1, fsdp=4, remat="save_matmuls")
    assert len(layouts) == 3 and tried[-1][1]["fits"]
    best_layout, _ = plan_lib._best(tried)
    assert best_layout == layouts[2]
    assert best_layout.overrides(base) == ["--config.mesh.data=1", "--config.mesh.fsdp=4",
                                           "--config.model.remat=save_matmuls"]


def test_search_respects_its_budget_and_reports_no_fit():
    config = tiny_config()
    p = FakePlanner(n_chips=4, hbm=1.0, act=10.0, params=80.0)  # nothing fits
    base = _base(config, 4)
    tried = p.search(config, base, p.measure("train", config), budget=2)
    assert len(tried) == 3 and plan_lib._best(tried) is None


def test_search_grows_the_per_chip_batch_while_it_fits():
    config = tiny_config()  # batch 8 = 2 per chip
    p = FakePlanner(n_chips=4, hbm=100.0, act=10.0, params=10.0)  # fits up to 9 per chip
    base = _base(config, 4)
    tried = p.search(config, base, p.measure("train", config), budget=6)
    sizes = [l.batch_size for l, _ in tried]
    assert sizes == [8, 8, 16, 32, 64]  # base, the other fsdp split, 4/chip, 8/chip, 16/chip (no fit)
    assert [r["fits"] for _, r in tried] == [True, True, True, True, False]


def test_the_recommendation_changes_the_layout_only_for_a_real_gain():
    base = plan_lib.Layout(data=4, fsdp=1, remat="none", param_dtype="float32", grad_accum=1, batch_size=64)
    fsdp = dataclasses.replace(base, data=1, fsdp=4)
    big = dataclasses.replace(base, batch_size=128)

    def r(rate, fits=True):
        return {"fits": fits, "predicted_examples_per_s_per_chip": rate}
    # measured on a v4-8 at 256² latents: 51.07 (as given), 51.08 (FSDP), 49.3 (batch 128)
    assert plan_lib._best([(base, r(51.07)), (fsdp, r(51.08)), (big, r(49.3))])[0] == base
    assert plan_lib._best([(base, r(40.0)), (fsdp, r(51.08)), (big, r(49.3))])[0] == fsdp
    assert plan_lib._best([(base, r(60.0, fits=False)), (fsdp, r(51.08))])[0] == fsdp
