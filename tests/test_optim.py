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


# lr of update k (lambda(k + 1), the scheduler being stepped before each update) of the original's
# get_cosine_schedule_with_warmup(num_warmup_steps=3, num_training_steps=15, num_cycles=C), base lr 2.0,
# recorded by running CompVis/fm-boosting@8f38bd3 fmboost/lr_schedulers.py (torch 2.13.0).
ORIGINAL_COSINE_LR = {
    0.5: [0.6666666666666666, 1.3333333333333333, 2.0, 1.9659258262890682, 1.8660254037844388,
          1.7071067811865475, 1.5, 1.2588190451025207, 1.0, 0.7411809548974791, 0.5000000000000002,
          0.29289321881345254, 0.1339745962155613, 0.0340741737109318, 0.0],
    1.5: [0.6666666666666666, 1.3333333333333333, 2.0, 1.7071067811865475, 1.0, 0.29289321881345254,
          0.0, 0.2928932188134523, 0.9999999999999998, 1.7071067811865475, 2.0, 1.7071067811865477,
          1.0000000000000002, 0.2928932188134533, 0.0],
}


@pytest.mark.parametrize("cycles", sorted(ORIGINAL_COSINE_LR))
def test_cosine_num_cycles_matches_original(cycles):
    sched = learning_rate_schedule(optim_cfg(lr=2.0, warmup_steps=3, schedule="cosine", total_steps=15,
                                             num_cycles=cycles))
    got = [float(sched(k)) for k in range(15)]
    np.testing.assert_allclose(got, ORIGINAL_COSINE_LR[cycles], rtol=1e-5, atol=2e-6)
    with pytest.raises(ValueError, match="num_cycles"):
        learning_rate_schedule(optim_cfg(schedule="cosine", warmup_steps=0, total_steps=10, num_cycles=0))


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
