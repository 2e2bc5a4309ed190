"""FSDP and data sharding rules, that FSDP really shards the train state, and the UNet's
rematerialisation policies (same numbers, less memory)."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cfm_jax import sharding
from cfm_jax.models.unet import EfficientUNet
from tests.test_configs import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mesh_shape_resolution_and_errors():
    assert sharding.mesh_shape(8, -1, 2) == (4, 2)
    assert sharding.mesh_shape(8, 2, -1) == (2, 4)
    assert sharding.mesh_shape(8, 8, 1) == (8, 1)
    for data, fsdp in ((-1, -1), (3, -1), (2, 2), (-1, 3)):
        with pytest.raises(ValueError, match="mesh"):
            sharding.mesh_shape(8, data, fsdp)


def test_param_spec_rules():
    assert sharding.param_spec((3, 3, 128, 256), 4) == P(None, None, None, "fsdp")  # output channels
    assert sharding.param_spec((3, 3, 512, 6), 4) == P(None, None, "fsdp", None)    # then input channels
    assert sharding.param_spec((512, 512), 1) == P()                                 # no fsdp axis
    assert sharding.param_spec((256,), 4) == P()                                     # small: replicated
    assert sharding.param_spec((3, 3, 4, 8), 4, min_size=1) == P(None, None, None, "fsdp")
    assert sharding.param_spec((5, 5, 7, 9), 4, min_size=1) == P()                  # nothing divisible
    assert sharding.param_spec((), 4, min_size=0) == P()


def test_paper_state_is_sharded_about_evenly():
    """The 306M-parameter paper model's train state (params, Adam moments, EMA) over fsdp=8,
    from shapes only: per-device bytes within 1% of total / 8."""
    from cfm_jax.optim import make_optimizer
    from cfm_jax.trainer import abstract_train_state
    from cfm_jax.first_stage import IdentityFirstStage
    from cfm_jax.model import CFMUpsampler

    c = load_config("configs/flow400_64-128/unet_base_psu.py")
    up = CFMUpsampler(c, first_stage=IdentityFirstStage(latent_channels=4, downsample_factor=8))
    tx, _ = make_optimizer(c.optim)
    devices = np.asarray([jax.devices()[0]] * 8)  # sharding arithmetic only: any 8 "devices"
    mesh = jax.sharding.Mesh(devices.reshape(1, 8), sharding.MESH_AXES)
    state = abstract_train_state(up, tx, 128, mesh)
    info = sharding.describe(state, jax.tree.map(lambda x: x.sharding, state))
    assert info["bytes"] > 3 * 305_806_340 * 4  # params + 2 Adam moments + EMA, fp32
    assert info["bytes_per_device"] == pytest.approx(info["bytes"] / 8, rel=0.01)
    assert info["replicated_leaves"] > 0 and info["sharded_leaves"] > 0


FSDP_SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
import jax, numpy as np
from cfm_jax import sharding
from cfm_jax.optim import make_optimizer
from cfm_jax.trainer import create_train_state
from cfm_jax.model import CFMUpsampler
from configs.quickstart import get_config
c = get_config()
c.mesh.update(data=1, fsdp=4)
mesh = sharding.make_mesh(c.mesh)
up = CFMUpsampler(c)
tx, _ = make_optimizer(c.optim)
state = create_train_state(up, tx, jax.random.PRNGKey(0), 64, mesh, fsdp_min_size=1024)
large = small = 0
for leaf in jax.tree.leaves(state.params):
    per_device = [s.data.nbytes for s in leaf.addressable_shards]
    assert len(per_device) == 4
    if leaf.size >= 1024:
        assert all(b * 4 == leaf.nbytes for b in per_device), (leaf.shape, per_device)
        large += leaf.nbytes
    else:
        assert all(b == leaf.nbytes for b in per_device), leaf.shape
        small += leaf.nbytes
total = large + small
per_dev = large / 4 + small
print("RESULT", total, per_dev, large / total)
assert per_dev < 0.3 * total, (per_dev, total)
"""


def test_fsdp_really_shards_the_parameters():
    proc = subprocess.run([sys.executable, "-c", FSDP_SCRIPT.format(root=ROOT)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                                       "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, per_dev, frac_large = (float(x) for x in proc.stdout.split("RESULT", 1)[1].split())
    assert frac_large > 0.9 and per_dev < 0.3 * total


def _small_unet(remat):
    return EfficientUNet(in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                         attention_resolutions=(2,), channel_mult=(1, 2), num_heads=2, dim_head=16,
                         dropout=0.1, remat=remat)


def test_remat_policies_give_the_same_outputs_and_gradients_and_recompute_what_they_say():
    """The memory saving itself is not visible on XLA:CPU (its memory analysis reports the same
    temp size with and without jax.checkpoint even for a toy chain); what is checked here is
    that the compiled backward recomputes the forward convolutions under 'full' and keeps
    them under 'save_matmuls'."""
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
    t = jnp.linspace(0.1, 0.9, 2)
    params = jax.jit(_small_unet("none").init)(jax.random.PRNGKey(0), x, t)["params"]
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)

    def loss_fn(remat):
        net = _small_unet(remat)
        return lambda p: jnp.mean(net.apply({"params": p}, x, t, train=True,
                                            rngs={"dropout": jax.random.PRNGKey(3)}) ** 2)

    temp = {}
    for remat in ("none", "full", "save_matmuls"):  # "none" first: the reference
        shapes = jax.eval_shape(_small_unet(remat).init, jax.random.PRNGKey(0), x, t)["params"]
        assert jax.tree.structure(shapes) == jax.tree.structure(params)  # same parameter names
        compiled = jax.jit(jax.value_and_grad(loss_fn(remat))).lower(params).compile()  # compiled once
        loss, grads = compiled(params)
        if remat == "none":
            ref_loss, ref_grads = loss, grads
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, ref_grads)
        temp[remat] = compiled.as_text().count("convolution(")
    assert temp["full"] > temp["none"], temp  # forward convs run again in the backward pass
    assert temp["save_matmuls"] == temp["none"], temp  # conv outputs are kept
    with pytest.raises(ValueError, match="remat"):
        jax.eval_shape(_small_unet("sometimes").init, jax.random.PRNGKey(0), x, t)


def test_training_with_bf16_params_and_remat(tmp_path):
    """param_dtype=bfloat16 keeps parameters, Adam moments and EMA in bf16; remat composes with
    the trainer (and gradient accumulation)."""
    from cfm_jax import checkpointing
    from cfm_jax.trainer import train
    from tests.test_trainer import losses, read_state, tiny_config

    c = tiny_config(num_steps=2, checkpoint_every=2)
    c.model.update(param_dtype="bfloat16", remat="save_matmuls")
    c.optim.grad_accum_steps = 2
    summary = train(c, str(tmp_path))
    assert summary["final_step"] == 2 and summary["num_traces"] == 1
    assert all(np.isfinite(losses(str(tmp_path))))
    state = read_state(str(tmp_path), 2)
    kernels = [x for x in jax.tree.leaves(state["params"]) if x.ndim == 4]
    assert kernels and all(x.dtype == jnp.bfloat16 for x in kernels)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state["ema_params"]) if x.ndim == 4)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state["opt_state"]) if x.ndim == 4)
    assert checkpointing.read_params(str(tmp_path))  # readable as host arrays


class _FakeDevice:
    """Enough of a TPU device for mesh_utils' hybrid layout."""

    def __init__(self, i, slice_index):
        self.id, self.slice_index, self.platform, self.device_kind = i, slice_index, "cpu", "cpu"
        self.process_index = i // 4


def test_hybrid_mesh_keeps_fsdp_inside_a_slice():
    import ml_collections

    devices = [_FakeDevice(i, i // 4) for i in range(8)]  # 2 slices of 4 devices
    cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2, dcn_data=2, fsdp_min_size=1))
    grid = sharding.device_grid(cfg, devices)
    assert grid.shape == (4, 2)
    slices = np.vectorize(lambda d: d.slice_index)(grid)
    assert (slices == slices[:, :1]).all()  # every fsdp group within one slice
    assert sorted(slices[:, 0]) == [0, 0, 1, 1]  # data spans both slices
    with pytest.raises(ValueError, match="dcn_data"):
        sharding.device_grid(ml_collections.ConfigDict(dict(data=-1, fsdp=8, dcn_data=2)), devices)


GRAD_ACCUM_SCRIPT = r"""
import sys
sys.path.insert(0, {root!r})
import ml_collections
from cfm_jax import sharding
from tests.test_trainer import check_gradient_accumulation
mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, dcn_data=1)))
check_gradient_accumulation(mesh, batch_size=8, fsdp_min_size=256)
print("OK")
"""


def test_gradient_accumulation_composes_with_data_and_fsdp_sharding():
    proc = subprocess.run([sys.executable, "-c", GRAD_ACCUM_SCRIPT.format(root=ROOT)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu",
                               "XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
