"""cfm_jax/xla_order.py: the data dependencies that let XLA update the donated train state in
place. ``after`` keeps values exactly; the ordered ``dot_general`` and convolution give
autodiff's values and gradients; and the compiled train step copies no weight (before
xla_order, XLA copied every parameter at the start of each step)."""
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax import sharding, xla_order
from cfm_jax.ema import EMAConfig
from cfm_jax.model import CFMUpsampler
from cfm_jax.optim import make_optimizer
from cfm_jax.trainer import abstract_train_state, make_train_step
from configs.quickstart import get_config


def test_after_keeps_the_value_and_passes_nan_on():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 7))
    for dep in (jnp.array([3.0, -1.0]), jnp.array([-jnp.inf]), jnp.zeros((2, 2)), jnp.array([1e30], jnp.float32)):
        np.testing.assert_array_equal(jax.jit(xla_order.after)(x, dep), x)
    xb = x.astype(jnp.bfloat16)
    got = xla_order.after(xb, jnp.array([2.0]))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(got, xb)
    assert bool(jnp.all(jnp.isnan(xla_order.after(x, jnp.array([jnp.nan, 1.0])))))


def test_after_adds_nothing_under_a_mesh_of_several_devices():
    # one element of dep would live on one device: reading it would be a collective per layer
    x, dep = jnp.ones(3), jnp.arange(3.0)
    jaxpr = jax.make_jaxpr(xla_order.after)(x, dep)
    assert any(e.primitive.name == "add" for e in jaxpr.eqns)
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("data",))):
        assert not jax.make_jaxpr(xla_order.after)(x, dep).eqns
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("data",))):
        assert jax.make_jaxpr(xla_order.after)(x, dep).eqns


def test_dense_with_the_ordered_dot_equals_flax_dense_forward_and_backward():
    ours = nn.Dense(24, dot_general=xla_order.dot_general)
    ref = nn.Dense(24)
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 16))
    params = ref.init(jax.random.PRNGKey(2), x)
    dy = jax.random.normal(jax.random.PRNGKey(3), (3, 5, 24))

    def vjp(layer):
        y, f = jax.vjp(lambda p, x: layer.apply(p, x), params, x)
        return y, f(dy)

    (y, (dp, dx)), (y_ref, (dp_ref, dx_ref)) = vjp(ours), vjp(ref)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for got, want in zip(jax.tree.leaves(dp), jax.tree.leaves(dp_ref)):
        np.testing.assert_array_equal(got, want)


def _weight_copy_bytes(hlo: str) -> int:
    """Bytes of the optimised program's copies of parameter leaves (``copy(%state_params...``)."""
    total = 0
    for dims in re.findall(r"= f32\[([0-9,]*)\]\{[0-9,]*\} copy\(%state_params", hlo):
        total += 4 * math.prod(int(d) for d in dims.split(",") if d)
    return total


def test_the_train_step_updates_weights_in_place_without_copying_them():
    # Adam without clipping (the paper's optimizer), the EMA from the pre-update weights; a small
    # UNet with both convolution gradient paths, attention, the time embedding's dense layers
    # and 1x1 skip convolutions. Before xla_order: a copy of every parameter (copies = 100%).
    c = get_config()
    c.model.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                   num_heads=1, dim_head=32, dtype="float32")
    c.optim.update(grad_clip_norm=0.0)
    up = CFMUpsampler(c)
    size = 8
    mesh = sharding.make_data_mesh()
    tx, schedule = make_optimizer(c.optim)
    step = make_train_step(up, tx, schedule, EMAConfig.from_config(c.ema), mesh)
    ch = up.first_stage.latent_channels
    batch = {k: jax.ShapeDtypeStruct((2, size, size, ch), jnp.float32, sharding=sharding.batch_sharding(mesh))
             for k in ("latent", "latent_lowres")}
    state = abstract_train_state(up, tx, size, mesh)
    with jax.set_mesh(mesh):  # as the trainer compiles it (a mesh of this one device)
        hlo = step.lower(state, batch).compile().as_text()
    param_bytes = sum(4 * math.prod(p.shape) for p in jax.tree.leaves(state.params))
    copied = _weight_copy_bytes(hlo)
    # what may stay: a few small leaves read again in the backward pass (GroupNorm scales)
    assert copied <= 0.01 * param_bytes, f"{copied} of {param_bytes} parameter bytes copied"
