"""One measurement of the original CompVis/fm-boosting code (PyTorch), for
``bench/bench_vs_original.py``; not meant to be run by hand.

    python bench/original_worker.py '{"original": "/path/to/fm-boosting", "task": "train", "batch": 1, ...}'

It runs under whatever interpreter ``--torch_python`` names (this project's ``.venv`` by
default), so it uses only the standard library, torch and the original's own modules
(``fmboost/flow.py`` imports einops, tqdm and torchdiffeq): the original's
``EfficientUNet`` with the paper's arguments, its ``FlowModel.training_losses`` and
``FlowModel.generate`` (torchdiffeq Euler), its ``EMA`` class and ``torch.optim.Adam`` as in
its ``trainer.py``. Prints one JSON line ``RESULT {...}``.
"""
import collections
import json
import resource
import statistics
import sys
import time

# configs/flow400_64-128/unet-base_psu.yaml of the original (net_cfg), 305,806,340 parameters.
PAPER_UNET = dict(in_channels=8, model_channels=128, out_channels=4, num_res_blocks=3,
                  channel_mult=[1, 2, 4, 8], attention_resolutions=[8, 16], dropout=0.0,
                  conv_resample=True, dim_head=64, num_heads=4, use_linear_attn=False,
                  use_scale_shift_norm=True, pool_factor=-1)


# Categories of bench/xla_profile.py, so that the two sides compare one to one.
CATEGORIES = ("convolution", "group_norm", "attention", "dense", "elementwise", "transpose/copy",
              "optimizer", "ema", "metrics", "other")
_COPIES = ("copy", "contiguous", "clone", "permute", "transpose", "reshape", "view", "cat", "expand",
           "slice", "select", "split", "chunk", "unsqueeze", "squeeze", "empty", "zeros", "as_strided")


def _category(event) -> str:
    """Category of a torch profiler event by its enclosing ranges and its op name. The
    original's attention projections are Conv1d (3-D inputs), counted as attention like the
    Dense projections inside cfm-jax's attention scope."""
    parent = event
    while parent is not None:
        name = parent.name
        if name == "ema":
            return "ema"
        if name == "optimizer" or name.startswith("Optimizer."):
            return "optimizer"
        if name == "aten::conv1d":
            return "attention"
        parent = parent.cpu_parent
    name = event.name.lower()
    if "conv" in name:
        shapes = [s for s in (event.input_shapes or []) if s]
        return "attention" if shapes and len(shapes[0]) == 3 else "convolution"
    if "group_norm" in name:
        return "group_norm"
    if any(k in name for k in ("scaled_dot_product", "attention", "softmax", "bmm")):
        return "attention"
    if any(k in name for k in ("addmm", "aten::mm", "linear", "matmul")):
        return "dense"
    if any(f"aten::{k}" in name or f"aten::_{k}" in name for k in _COPIES):
        return "transpose/copy"
    if name.startswith("aten::") or "backward" in name:
        return "elementwise"
    return "other"


def _profile(fn, calls: int, top: int = 12) -> dict:
    """Self CPU time per category (ms per call) of ``calls`` calls of ``fn`` under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile  # lazy: torch is slow to import (see main)

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = (time.perf_counter() - t0) / calls
    per_cat = collections.defaultdict(float)
    per_op = collections.defaultdict(float)
    for event in prof.events():
        ms = event.self_cpu_time_total / 1e3 / calls
        if ms > 0:
            per_cat[_category(event)] += ms
            per_op[event.name] += ms
    total = sum(per_cat.values())
    return {"wall_ms_per_call": round(wall * 1e3, 1), "op_ms_per_call": round(total, 1),
            "categories_ms": {c: round(per_cat.get(c, 0.0), 1) for c in CATEGORIES},
            "categories_share": {c: round(per_cat.get(c, 0.0) / total, 3) if total else 0.0 for c in CATEGORIES},
            "top_ops": [{"name": n, "ms": round(ms, 1)} for n, ms in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]]}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(spec: dict) -> dict:
    import torch  # lazy: slow to import and optional (requirements-test.txt); the usage error runs without it

    torch.set_num_threads(int(spec["threads"]))
    sys.path.insert(0, spec["original"])
    try:
        from fmboost.ema import EMA  # here: the original's checkout is on sys.path only from the line above
        from fmboost.flow import FlowModel  # here: as above
        from fmboost.models.unet.model import EfficientUNet  # here: as above
    except ImportError as e:
        raise SystemExit(f"cannot import the original's modules from {spec['original']}: {e}. "
                         "Its fmboost/flow.py needs einops, tqdm and torchdiffeq in the interpreter "
                         "given by --torch_python (e.g. `.venv/bin/pip install torchdiffeq==0.2.5`).")

    torch.manual_seed(0)
    b, c, s = int(spec["batch"]), 4, int(spec["latent_size"])
    unet = dict(PAPER_UNET, **{k: list(v) if isinstance(v, (list, tuple)) else v
                                for k, v in (spec.get("small") or {}).items()})
    flow = FlowModel(net_cfg=EfficientUNet(**unet), schedule="linear")
    n_params = sum(p.numel() for p in flow.parameters())
    x1 = torch.randn(b, c, s, s)
    x0 = torch.randn(b, c, s, s)
    context = torch.randn(b, c, s, s)
    out = {"side": "original", "task": spec["task"], "batch": b, "latent_size": s, "params": n_params,
           "torch": torch.__version__, "threads": torch.get_num_threads()}

    if spec["task"] == "train":
        # trainer.py: Adam(lr=3e-5, weight_decay=0) and EMA(beta=0.999, power=3/4) updated once per
        # step before the optimizer. update_after_step=0 so that every timed update is the lerp
        # (the original copies for its first 1000 updates, which costs the same memory traffic).
        ema = EMA(flow, beta=0.999, update_after_step=0, update_every=1, power=3 / 4,
                  include_online_model=False)
        opt = torch.optim.Adam(flow.parameters(), lr=3e-5, weight_decay=0.0)
        flow.train()

        def step():
            t0 = time.perf_counter()
            loss = flow.training_losses(x1=x1, x0=x0, context=context, context_ca=None)
            t1 = time.perf_counter()
            with torch.profiler.record_function("ema"):
                ema.update()
            t2 = time.perf_counter()
            loss.backward()
            with torch.profiler.record_function("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            return t3 - t0, t2 - t1

        for _ in range(int(spec["warmup"])):
            step()
        times = [step() for _ in range(int(spec["steps"]))]
        out.update(step_s=statistics.median(t for t, _ in times), ema_s=statistics.median(e for _, e in times),
                   step_times_s=[round(t, 4) for t, _ in times])
        if spec.get("profile_calls"):
            out["profile"] = _profile(step, int(spec["profile_calls"]))
    elif spec["task"] == "sample":
        flow.eval()
        num_steps = int(spec["grid"])
        with torch.no_grad():
            # warm-up: one Euler step (the grid of 2 points) primes the kernels
            flow.generate(x=x0, context=context, context_ca=None, sample_kwargs=dict(num_steps=2, method="euler"))
            times = []
            for _ in range(int(spec["repeats"])):
                t0 = time.perf_counter()
                flow.generate(x=x0, context=context, context_ca=None,
                              sample_kwargs=dict(num_steps=num_steps, method="euler"))
                times.append(time.perf_counter() - t0)
            if spec.get("profile_calls"):
                out["profile"] = _profile(lambda: flow.generate(
                    x=x0, context=context, context_ca=None,
                    sample_kwargs=dict(num_steps=num_steps, method="euler")), int(spec["profile_calls"]))
        out.update(sample_s=statistics.median(times), grid=num_steps, nfe=num_steps - 1)
    else:
        raise SystemExit(f"unknown task {spec['task']!r}")
    out["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print("RESULT " + json.dumps(main(json.loads(sys.argv[1]))), flush=True)
