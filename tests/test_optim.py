"""Learning-rate schedules and Adam parity with torch.optim.Adam."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cfm_jax.optim import learning_rate_schedule, make_optimizer
from configs.common import base_config


def optim_cfg(**kw):
    c = base_config().optim
    c.update(**kw)
    return c


def test_constant_with_warmup_matches_original_lambda_lr_order():
    sched = learning_rate_schedule(optim_cfg(lr=1.0, warmup_steps=4))
    # update k runs at lambda(k + 1) = min((k + 1) / 4, 1)
    np.testing.assert_allclose([float(sched(k)) for k in range(6)], [0.25, 0.5, 0.75, 1, 1, 1])


def test_cosine_schedule_end_points():
    sched = learning_rate_schedule(optim_cfg(lr=2.0, warmup_steps=2, schedule="cosine", total_steps=12,
                                             min_lr_ratio=0.1))
    assert float(sched(0)) == pytest.approx(1.0)
    assert float(sched(1)) == pytest.approx(2.0)
    assert float(sched(6)) == pytest.approx(2.0 * (0.1 + 0.9 * 0.5), rel=1e-5)  # halfway
    assert float(sched(11)) == pytest.approx(0.2, rel=1e-5)
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate_schedule(optim_cfg(schedule="cosine", total_steps=0))


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_matches_torch(name):
    wd, lr = 0.1, 0.05
    tx, _ = make_optimizer(optim_cfg(name=name, lr=lr, warmup_steps=0, weight_decay=wd))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5,))
    w0 = rng.normal(size=(5,))

    def grad(w):  # of 0.5 * sum(a * w^2)
        return a * w

    # float64 on both sides: the update rules are compared, not float32 rounding
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(w0)}
        state = tx.init(params)
        for _ in range(10):
            updates, state = tx.update({"w": grad(params["w"])}, state, params)
            params = optax.apply_updates(params, updates)
        params = {"w": np.asarray(params["w"])}
    tw = torch.tensor(w0.copy(), requires_grad=True)
    topt = (torch.optim.Adam if name == "adam" else torch.optim.AdamW)([tw], lr=lr, weight_decay=wd)
    for _ in range(10):
        topt.zero_grad()
        tw.grad = torch.tensor(grad(tw.detach().numpy()))
        topt.step()
    assert params["w"].dtype == np.float64
    np.testing.assert_allclose(params["w"], tw.detach().numpy(), rtol=1e-12, atol=1e-13)


def test_unknown_optimizer_rejected():
    with pytest.raises(ValueError, match="choose one of"):
        make_optimizer(optim_cfg(name="sgd"))
