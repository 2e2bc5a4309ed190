"""The flow's ODE sampler (cfm_jax/sampling.py): exact Euler parity with a lax.scan loop,
convergence orders, the 3/8-rule RK4, adaptive tolerances, NFE against a real counter,
intermediates, reverse direction, no retracing, clear errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfm_jax import sampling as S

# --------------------------------------------------------------------------- problems


def mlp_velocity(t, x, params):
    """Nonlinear, time-dependent per-pixel MLP over channels; params come through args."""
    h = jnp.tanh(x @ params["w1"] + t * params["wt"] + params["b1"])  # [B, H, W, hidden]
    return h @ params["w2"] + params["b2"] * jnp.cos(3.0 * t)  # [B, H, W, C]


def euler_scan_reference(velocity_fn, x0, args, num_steps: int, *, reverse: bool = False):
    """Plain ``lax.scan`` Euler on the solver's grid, ``x += (t_{i+1} - t_i) * v(t_i, x)``, with
    the state promoted to the time dtype (at least float32) as the solver does: the reference
    that ``solve_flow(method='euler')`` must match bit for bit."""
    tdtype = jnp.result_type(*[jnp.result_type(leaf) for leaf in jax.tree.leaves(x0)], jnp.float32)
    x0 = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.result_type(leaf, tdtype)), x0)
    ts = S.time_grid(num_steps, reverse=reverse, dtype=tdtype)

    def step(x, t_pair):
        t0, t1 = t_pair
        v = velocity_fn(t0, x, args)
        return jax.tree.map(lambda xi, vi: xi + (t1 - t0) * vi.astype(xi.dtype), x, v), None

    return jax.lax.scan(step, x0, (ts[:-1], ts[1:]))[0]


def mlp_params(key, channels=3, hidden=16):
    k = jax.random.split(key, 5)
    return dict(w1=jax.random.normal(k[0], (channels, hidden)), wt=jax.random.normal(k[1], (hidden,)),
                b1=jax.random.normal(k[2], (hidden,)),
                w2=jax.random.normal(k[3], (hidden, channels)) / 4, b2=jnp.ones((channels,)))


def linear_velocity(t, x, args):
    """x' = lam * x + cos(omega t), elementwise (lam per component)."""
    return args["lam"] * x + jnp.cos(args["omega"] * t)


def linear_solution(x_a, t_a, t_b, args):
    """Exact solution at t_b of linear_velocity started from x_a at t_a."""
    lam, om = args["lam"], args["omega"]
    xp = lambda t: (-lam * jnp.cos(om * t) + om * jnp.sin(om * t)) / (lam ** 2 + om ** 2)
    return (x_a - xp(t_a)) * jnp.exp(lam * (t_b - t_a)) + xp(t_b)


def linear_problem():
    args = dict(lam=jnp.array([-1.0, 0.5, -2.0]), omega=jnp.asarray(3.0))
    x0 = jnp.array([[1.0, -0.5, 0.3], [0.2, 0.7, -1.1]])  # [B=2, D=3]
    return x0, args


def counted(fn):
    """Wraps a velocity fn with a runtime evaluation counter (a host callback per call)."""
    count = [0]

    def bump():
        count[0] += 1

    def wrapped(t, x, args):
        jax.debug.callback(bump)
        return fn(t, x, args)

    def read():
        jax.effects_barrier()
        return count[0]

    return wrapped, read


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# --------------------------------------------------------------------------- Euler parity


def test_euler_matches_scan_reference_bit_for_bit():
    key_p, key_x = jax.random.split(jax.random.PRNGKey(0))
    params = mlp_params(key_p)
    x0 = jax.random.normal(key_x, (4, 8, 8, 3))  # [B, H, W, C]

    res = S.solve_flow(mlp_velocity, x0, params, method="euler", num_steps=40)
    ref = euler_scan_reference(mlp_velocity, x0, params, 40)
    np.testing.assert_array_equal(np.asarray(res.x), np.asarray(ref))
    assert int(res.nfe) == 39 and bool(res.success)

    jitted = jax.jit(lambda x, p: S.solve_flow(mlp_velocity, x, p, method="euler", num_steps=40).x)
    np.testing.assert_array_equal(np.asarray(jitted(x0, params)), np.asarray(ref))


def test_euler_reverse_on_pytree_state_matches_reference():
    """reverse=True integrates t: 1 -> 0 on 1 - linspace(0, 1, n); pytree states work."""
    params = mlp_params(jax.random.PRNGKey(1))
    x0 = {"a": jax.random.normal(jax.random.PRNGKey(2), (2, 4, 4, 3)),
          "b": jax.random.normal(jax.random.PRNGKey(3), (5, 3))}

    def velocity(t, x, p):
        return {"a": mlp_velocity(t, x["a"], p), "b": mlp_velocity(t, x["b"], p) - x["a"].mean()}

    res = jax.jit(lambda x, p: S.solve_flow(velocity, x, p, method="euler", num_steps=13,
                                            reverse=True))(x0, params)
    ref = jax.jit(lambda x, p: euler_scan_reference(velocity, x, p, 13, reverse=True))(x0, params)
    for name in ("a", "b"):
        np.testing.assert_array_equal(np.asarray(res.x[name]), np.asarray(ref[name]))
    np.testing.assert_array_equal(np.asarray(res.ts), np.asarray(1 - jnp.linspace(0, 1, 13)))
    assert float(res.ts[0]) == 1.0 and float(res.ts[-1]) == 0.0 and int(res.nfe) == 12


# --------------------------------------------------------------------------- fixed-step orders


@pytest.mark.parametrize("method,order", [("euler", 1), ("heun", 2), ("midpoint", 2),
                                          ("ralston", 2), ("rk4", 4)])
def test_fixed_step_order_and_nfe(x64, method, order):
    x0, args = linear_problem()
    x0 = x0.astype(jnp.float64)
    exact = linear_solution(x0, 0.0, 1.0, args)
    velocity, read_count = counted(linear_velocity)
    errors = []
    for num_steps in (40, 79):  # 39 and 78 intervals
        res = S.solve_flow(velocity, x0, args, method=method, num_steps=num_steps)
        assert res.x.dtype == jnp.float64
        errors.append(float(jnp.max(jnp.abs(res.x - exact))))
        if num_steps == 40:
            # The original's grid: 40 points = 39 intervals; the count is real evaluations.
            assert int(res.nfe) == {"euler": 39, "heun": 78, "midpoint": 78, "ralston": 78,
                                    "rk4": 156}[method] == S.fixed_step_nfe(method, 40)
            assert read_count() == int(res.nfe)
    observed = np.log2(errors[0] / errors[1])
    assert abs(observed - order) < 0.3, (method, errors, observed)


def _rk_step(f, t0, y0, dt, a, b, c):
    """Explicit RK step written out by hand from a full Butcher tableau."""
    ks = []
    for i in range(len(b)):
        yi = y0 + dt * sum(a[i][j] * ks[j] for j in range(i))
        ks.append(f(t0 + c[i] * dt, yi))
    return y0 + dt * sum(bi * ki for bi, ki in zip(b, ks))


def test_rk4_is_the_three_eighths_rule(x64):
    tab = S.RK4_38_TABLEAU
    np.testing.assert_array_equal(tab.c, [1 / 3, 2 / 3, 1])
    np.testing.assert_array_equal(tab.b_sol, [1 / 8, 3 / 8, 3 / 8, 1 / 8])
    np.testing.assert_array_equal(np.concatenate(tab.a_lower), [1 / 3, -1 / 3, 1, 1, -1, 1])

    def velocity(t, x, args):  # nonlinear in x and t
        return -args * x ** 2 + jnp.sin(3.0 * t) * x

    f = lambda t, y: velocity(t, y, 1.5)
    x0 = jnp.array([1.0, 0.5, -0.3], dtype=jnp.float64)
    res = S.solve_flow(velocity, x0, 1.5, method="rk4", num_steps=4)  # 3 steps of 1/3

    three_eighths = dict(a=[[], [1 / 3], [-1 / 3, 1], [1, -1, 1]], b=[1 / 8, 3 / 8, 3 / 8, 1 / 8],
                         c=[0, 1 / 3, 2 / 3, 1])
    classic = dict(a=[[], [1 / 2], [0, 1 / 2], [0, 0, 1]], b=[1 / 6, 2 / 6, 2 / 6, 1 / 6],
                   c=[0, 1 / 2, 1 / 2, 1])
    ts = np.asarray(S.time_grid(4, dtype=jnp.float64))
    y38, ycl = x0, x0
    for t0, t1 in zip(ts[:-1], ts[1:]):
        y38 = _rk_step(f, t0, y38, t1 - t0, **three_eighths)
        ycl = _rk_step(f, t0, ycl, t1 - t0, **classic)
    # Same method up to float64 rounding (diffrax sums the stages with a tensordot).
    np.testing.assert_allclose(np.asarray(res.x), np.asarray(y38), rtol=1e-14, atol=1e-15)
    # ... and measurably not the classic 1/6-2/6-2/6-1/6 rule.
    assert float(jnp.max(jnp.abs(res.x - ycl))) > 1e-7
    assert int(res.nfe) == 12


# --------------------------------------------------------------------------- adaptive


@pytest.mark.parametrize("method,reverse", [("tsit5", False), ("dopri5", True)])
def test_adaptive_hits_tolerance_and_counts_nfe(x64, method, reverse):
    x_start, args = linear_problem()
    x_start = x_start.astype(jnp.float64)
    t_a, t_b = (1.0, 0.0) if reverse else (0.0, 1.0)
    rtol, atol = 1e-6, 1e-8
    velocity, read_count = counted(linear_velocity)
    res = jax.jit(lambda x, a: S.solve_flow(velocity, x, a, method=method, rtol=rtol, atol=atol,
                                            num_intermediates=5, reverse=reverse))(x_start, args)
    assert bool(res.success) and int(res.status) == S.STATUS_OK

    exact = linear_solution(x_start, t_a, t_b, args)
    bound = atol + rtol * float(jnp.max(jnp.abs(exact)))
    err = float(jnp.max(jnp.abs(res.x - exact)))
    assert err < 2 * bound, (err, bound)

    # NFE derived from sol.stats equals the evaluations actually run: 2 (initial step
    # size, f0 reused by FSAL) + 6 per step, rejected steps included.
    assert int(res.nfe) == read_count() == 2 + 6 * int(res.num_solver_steps)
    assert int(res.num_solver_steps) >= 5

    # Intermediates: K evenly spaced times, x_start and the final state exactly at the ends,
    # dense-output values accurate in between.
    assert res.intermediates.shape == (5,) + x_start.shape
    np.testing.assert_allclose(np.asarray(res.intermediate_ts),
                               np.linspace(t_a, t_b, 5), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(res.intermediates[0]), np.asarray(x_start))
    np.testing.assert_array_equal(np.asarray(res.intermediates[-1]), np.asarray(res.x))
    for t, xi in zip(np.asarray(res.intermediate_ts), res.intermediates):
        assert float(jnp.max(jnp.abs(xi - linear_solution(x_start, t_a, t, args)))) < 2 * bound


def test_adaptive_max_steps_failure_and_nfe_with_rejected_first_steps():
    """A too-small max_steps is reported, not raised inside jit; the helper raises clearly.

    The problem (a bump at t=0.15 that the initial step-size heuristic cannot see) makes
    tsit5 reject its first step twice; the NFE derived from sol.stats still equals the
    evaluations actually run, because f0 is never re-evaluated (FSAL state handed in).
    """
    times = []

    def velocity(t, x, bump):
        jax.debug.callback(lambda tt: times.append(float(tt)), t, ordered=True)
        return jnp.zeros_like(x) + 0.01 + bump * jnp.exp(-(((t - 0.15) / 0.05) ** 2))

    res = jax.jit(lambda x, a: S.solve_flow(velocity, x, a, method="tsit5", max_steps=3))(
        jnp.ones((2, 3)), jnp.asarray(10.0))
    jax.effects_barrier()
    assert not bool(res.success)
    assert int(res.status) == S.STATUS_MAX_STEPS
    assert int(res.num_solver_steps) == 3 and int(res.num_rejected_steps) == 2
    # Evaluations: f0 and the step-size probe, then 6 per step; the 2nd attempt restarts at
    # t=0 (its first new stage comes before the 1st attempt's last stage): rejected.
    assert int(res.nfe) == len(times) == 2 + 6 * 3
    assert times[0] == 0.0 and times[8] < times[7]
    with pytest.raises(RuntimeError, match=r"ODE sampling failed: .*max_steps \(3 steps, 20 velocity evaluations\).*Raise max_steps"):
        S.raise_if_failed(res)


def test_nonfinite_state_is_a_failure():
    res = S.solve_flow(lambda t, x, a: x / a, jnp.ones((2, 3)), jnp.zeros(()), method="euler",
                       num_steps=3)
    assert not bool(res.success) and int(res.status) == S.STATUS_NONFINITE
    with pytest.raises(RuntimeError, match="non-finite"):
        S.raise_if_failed(res)


# --------------------------------------------------------------------------- intermediates


def test_fixed_step_intermediates_are_grid_states(x64):
    x0, args = linear_problem()
    x0 = x0.astype(jnp.float64)
    res = S.solve_flow(linear_velocity, x0, args, method="heun", num_steps=9, num_intermediates=5)
    assert res.intermediates.shape == (5,) + x0.shape
    np.testing.assert_array_equal(np.asarray(res.intermediates[0]), np.asarray(x0))
    np.testing.assert_array_equal(np.asarray(res.intermediates[-1]), np.asarray(res.x))
    ts = np.linspace(0.0, 1.0, 9)
    np.testing.assert_array_equal(np.asarray(res.intermediate_ts), ts[[0, 2, 4, 6, 8]])
    # The states really are the Heun iterates at those grid points.
    f = lambda t, y: linear_velocity(t, y, args)
    y, expected = x0, [x0]
    for i, (t0, t1) in enumerate(zip(ts[:-1], ts[1:])):
        y = _rk_step(f, t0, y, t1 - t0, a=[[], [1.0]], b=[0.5, 0.5], c=[0, 1])
        if i % 2 == 1:
            expected.append(y)
    np.testing.assert_allclose(np.asarray(res.intermediates), np.stack(expected), rtol=1e-13)
    assert res.x.shape == x0.shape and int(res.nfe) == 16


# --------------------------------------------------------------------------- under jit


def test_a_jitted_solve_compiles_once():
    traces = [0]

    def velocity(t, x, params):
        traces[0] += 1  # Python side effect: runs only while tracing
        return mlp_velocity(t, x, params)

    sampler = jax.jit(lambda x, p: S.solve_flow(velocity, x, p, method="midpoint", num_steps=6))
    x0 = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4, 3))
    first = sampler(x0, mlp_params(jax.random.PRNGKey(5)))
    n_traces = traces[0]
    assert n_traces > 0
    second = sampler(x0 + 1.0, mlp_params(jax.random.PRNGKey(6)))  # new values, same shapes
    assert traces[0] == n_traces
    assert not np.array_equal(np.asarray(first.x), np.asarray(second.x))
    assert int(second.nfe) == 10 and bool(second.success)
    assert S.raise_if_failed(second) is second


# --------------------------------------------------------------------------- validation


def test_clear_errors_for_bad_options():
    x0, args = jnp.zeros((2, 3)), None
    v = lambda t, x, a: x
    with pytest.raises(ValueError, match=r"Unknown ODE method 'rk45'.*'euler'.*'dopri5'"):
        S.solve_flow(v, x0, args, method="rk45")
    with pytest.raises(ValueError, match="num_steps .* >= 2"):
        S.solve_flow(v, x0, args, method="euler", num_steps=1)
    with pytest.raises(ValueError, match="num_intermediates"):
        S.solve_flow(v, x0, args, num_intermediates=1)
    with pytest.raises(ValueError, match="exceeds the 5 grid points"):
        S.solve_flow(v, x0, args, num_steps=5, num_intermediates=6)
    with pytest.raises(ValueError, match="max_steps"):
        S.solve_flow(v, x0, args, method="tsit5", max_steps=0)
    with pytest.raises(ValueError, match="Unknown ODE method"):
        S.solve_flow(v, x0, args, method="RK4")
    with pytest.raises(ValueError, match="not a fixed-step method"):
        S.fixed_step_nfe("tsit5", 40)
