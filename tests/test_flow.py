"""Flow matching math: path end points, velocity = d x_t / dt, the loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax import flow


@pytest.fixture
def pair():
    k0, k1 = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(k0, (3, 4, 4, 2)), jax.random.normal(k1, (3, 4, 4, 2))


@pytest.mark.parametrize("schedule", ["linear", "gvp"])
def test_path_end_points(pair, schedule):
    x0, x1 = pair
    np.testing.assert_allclose(flow.x_t(x0=x0, x1=x1, t=jnp.zeros(3), schedule=schedule), x0, atol=1e-6)
    np.testing.assert_allclose(flow.x_t(x0=x0, x1=x1, t=jnp.ones(3), schedule=schedule), x1, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "gvp"])
def test_velocity_is_time_derivative_of_path(pair, schedule):
    x0, x1 = (np.asarray(a, np.float64) for a in pair)
    t = np.array([0.1, 0.5, 0.93])
    h = 1e-4
    with jax.enable_x64(True):
        fd = (np.asarray(flow.x_t(x0=x0, x1=x1, t=t + h, schedule=schedule))
              - np.asarray(flow.x_t(x0=x0, x1=x1, t=t - h, schedule=schedule))) / (2 * h)
        u = np.asarray(flow.u_t(x0=x0, x1=x1, t=t, schedule=schedule))
    np.testing.assert_allclose(u, fd, rtol=1e-7, atol=1e-8)


def test_linear_velocity_is_difference(pair):
    x0, x1 = pair
    np.testing.assert_allclose(flow.u_t(x0=x0, x1=x1, t=jnp.full(3, 0.3)), x1 - x0, rtol=1e-6)


def test_sigma_min_adds_scaled_noise(pair):
    x0, x1 = pair
    noise = jnp.ones_like(x0)
    t = jnp.full(3, 0.25)
    out = flow.x_t(x0=x0, x1=x1, t=t, sigma_min=0.1, noise=noise)
    np.testing.assert_allclose(out, 0.25 * x1 + 0.75 * x0 + 0.1, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs `noise`"):
        flow.x_t(x0=x0, x1=x1, t=t, sigma_min=0.1)


def test_schedule_checks():
    with pytest.raises(ValueError, match="does not support sigma_min"):
        flow.check_schedule("gvp", 0.1)
    with pytest.raises(ValueError, match="choose one of"):
        flow.check_schedule("cosine")


def test_loss_is_zero_for_the_exact_velocity_and_per_example(pair):
    x0, x1 = pair
    loss = flow.velocity_loss(lambda xt, t: jnp.broadcast_to(x1 - x0, xt.shape), x0=x0, x1=x1,
                              rng=jax.random.PRNGKey(1))
    assert loss.shape == (3,)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)
    # a zero network gives the per-example mean of (x1 - x0)^2
    loss = flow.velocity_loss(lambda xt, t: jnp.zeros_like(xt), x0=x0, x1=x1, rng=jax.random.PRNGKey(1))
    np.testing.assert_allclose(loss, np.mean(np.square(np.asarray(x1 - x0)), axis=(1, 2, 3)), rtol=1e-5)


def test_t_is_uniform_on_unit_interval():
    t = np.asarray(flow.sample_t(jax.random.PRNGKey(3), 20000))
    assert t.min() >= 0.0 and t.max() < 1.0
    assert abs(t.mean() - 0.5) < 0.01 and abs(t.var() - 1 / 12) < 0.003


def test_t_exponent_skews_training_times_towards_the_source():
    # t = u ** p with u ~ U(0, 1): P(t < x) = x ** (1 / p), E[t] = 1 / (p + 1)
    t = np.asarray(flow.sample_t(jax.random.PRNGKey(3), 20000, t_exponent=3.0))
    assert t.min() >= 0.0 and t.max() < 1.0
    assert abs(t.mean() - 0.25) < 0.01
    assert abs(np.mean(t < 0.1) - 0.1 ** (1 / 3)) < 0.01
    # the same draws as the uniform default, raised to the power (reproducible per key)
    u = np.asarray(flow.sample_t(jax.random.PRNGKey(3), 20000))
    np.testing.assert_allclose(t, u ** 3, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="t_exponent must be > 0"):
        flow.check_schedule("linear", 0.0, t_exponent=0.0)
