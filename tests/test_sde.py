"""The flow's SDE sampler (cfm_jax/sde.py): parity with a PyTorch restatement of the
original's FlowSDE.sample (same noise), the Gaussian-to-Gaussian marginals, zero diffusion
versus the ODE, the original's interval/grid quirks, NFE against a real counter, jit and
key determinism, clear errors."""
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cfm_jax import sampling as S
from cfm_jax import sde
from tests.test_sampling import counted

# --------------------------------------------------------------------------- problems

ARGS = dict(a=0.3, b=0.5)


def step_noises(key, num_steps: int, shape, dtype=np.float32) -> jax.Array:
    """The standard normal draws of ``solve_sde``'s steps stacked, ``[num_steps - 1, *shape]``
    (row ``i``: ``normal(fold_in(key, i), shape, dtype)``), to feed a reference the same noise."""
    draw = jax.jit(sde._step_noise, static_argnums=(2, 3))  # as the sampler draws it, inside a jit
    return jnp.stack([draw(key, jnp.int32(i), tuple(int(d) for d in shape), np.dtype(dtype))
                      for i in range(num_steps - 1)])


def velocity(t, x, args):
    """Nonlinear, time-dependent elementwise field; its parameters come through args."""
    return (args["a"] + t) * jnp.tanh(x) - args["b"] * x + 0.7 * t - 0.4


def torch_velocity(x, t):
    """The same field in torch, called as the original calls its network: t is [B]."""
    t = t.reshape(-1, *([1] * (x.ndim - 1)))
    return (ARGS["a"] + t) * torch.tanh(x) - ARGS["b"] * x + 0.7 * t - 0.4


# --------------------------------------------------------------------------- torch restatement


class TorchFlowSDE:
    """Our restatement, in torch, of the original's SDE sampler (fmboost/flow.py: the
    schedules' ``compute_diffusion``/``get_score_from_velocity``, ``StepSDE``,
    ``FlowSDE.check_interval/last_step/sample``), step-by-step in the original's order of
    operations, with two deliberate changes: the per-step ``torch.randn`` draw is replaced
    by the given ``noises[i]``, and ``constant`` returns a tensor (the original's Python
    float makes ``torch.sqrt`` raise). Like the original, every SDE drift calls the network
    twice (once for the drift, once inside the score); ``calls`` counts them."""

    def __init__(self, net, schedule, sample_eps=0.0):
        self.net_fn, self.schedule, self.sample_eps, self.calls = net, schedule, sample_eps, 0

    def net(self, x, t):
        self.calls += 1
        return self.net_fn(x, t)

    @staticmethod
    def pad(t, x):
        return t.reshape(-1, *([1] * (x.ndim - 1)))

    def coefficients(self, t):  # alpha, d_alpha, sigma, d_sigma
        if self.schedule == "linear":
            return t, 1, 1 - t, -1
        return (torch.sin(t * math.pi / 2), 0.5 * math.pi * torch.cos(t * math.pi / 2),
                torch.cos(t * math.pi / 2), -0.5 * math.pi * torch.sin(t * math.pi / 2))

    def d_alpha_over_alpha(self, t):
        return 1 / t if self.schedule == "linear" else np.pi / (2 * torch.tan(t * np.pi / 2))

    def diffusion(self, x, t, form, norm):
        t = self.pad(t, x)
        _, _, sigma, d_sigma = self.coefficients(t)
        if form == "constant":
            return torch.as_tensor(norm, dtype=x.dtype)
        if form == "SBDM":
            return norm * (self.d_alpha_over_alpha(t) * sigma ** 2 - sigma * d_sigma)
        if form == "sigma":
            return norm * sigma
        if form == "linear":
            return norm * (1 - t)
        if form == "decreasing":
            return 0.25 * (norm * torch.cos(np.pi * t) + 1) ** 2
        assert form == "increasing-decreasing"
        return norm * torch.sin(np.pi * t) ** 2

    def score(self, x, t):
        v = self.net(x, t)
        t = self.pad(t, x)
        alpha, d_alpha, sigma, d_sigma = self.coefficients(t)
        r = alpha / d_alpha
        return (r * v - x) / (sigma ** 2 - r * d_sigma * sigma)

    def sde_drift(self, x, t, form, norm):
        return self.net(x, t) + self.diffusion(x, t, form, norm) * self.score(x, t)

    def sample(self, init, noises, *, method, form, norm, last_step, last_step_size, num_steps,
               grid_dtype=torch.float32):
        if last_step is None:
            last_step_size = 0.0
        eps = self.sample_eps
        t0 = eps if form == "SBDM" else 0
        t1 = 1 - eps if last_step_size == 0 else 1 - last_step_size
        ts = torch.linspace(t0, t1, num_steps, dtype=grid_dtype)  # the original: float32
        dt = ts[1] - ts[0]
        x, batch = init, init.shape[0]
        for i, ti in enumerate(ts[:-1]):
            dw = noises[i] * torch.sqrt(dt)
            t = torch.ones(batch).to(x) * ti
            if method == "euler":
                drift = self.sde_drift(x, t, form, norm)
                d = self.diffusion(x, t, form, norm)
                mean_x = x + drift * dt
                x = mean_x + torch.sqrt(2 * d) * dw
            else:
                d = self.diffusion(x, t, form, norm)
                xhat = x + torch.sqrt(2 * d) * dw
                k1 = self.sde_drift(xhat, t, form, norm)
                xp = xhat + dt * k1
                k2 = self.sde_drift(xp, t + dt, form, norm)
                x = xhat + 0.5 * dt * (k1 + k2)
        t_last = torch.ones(batch).to(x) * t1
        if last_step == "Mean":
            x = x + self.sde_drift(x, t_last, form, norm) * last_step_size
        elif last_step == "Euler":
            x = x + self.net(x, t_last) * last_step_size
        return x, ts


# --------------------------------------------------------------------------- grid & formulas


def test_grid_is_torch_linspace_bit_for_bit():
    for dtype, tdtype in ((np.float32, torch.float32), (np.float64, torch.float64)):
        for t0, t1 in ((0.0, 0.96), (0.0, 1.0), (0.02, 0.98), (0.001, 0.99)):
            for n in (2, 3, 9, 14, 25, 40, 101, 250):
                np.testing.assert_array_equal(sde.torch_linspace(t0, t1, n, dtype),
                                              torch.linspace(t0, t1, n, dtype=tdtype).numpy())
    # jnp.linspace is not bit-identical (reason for torch_linspace).
    assert any(not np.array_equal(np.asarray(jnp.linspace(0.0, 0.96, n, dtype=jnp.float32)),
                                  torch.linspace(0.0, 0.96, n).numpy()) for n in range(2, 40))


def test_interval_follows_check_interval():
    assert sde.sde_interval("sigma") == (0.0, 0.96)
    assert sde.sde_interval("SBDM", sample_eps=0.01) == (0.01, 0.96)
    assert sde.sde_interval("sigma", sample_eps=0.01) == (0.0, 0.96)  # eps only moves SBDM's t0
    # last_step=None forces last_step_size=0, then t1 = 1 - sample_eps.
    assert sde.sde_interval("sigma", last_step=None, last_step_size=0.3) == (0.0, 1.0)
    assert sde.sde_interval("SBDM", last_step=None, sample_eps=0.02) == (0.02, 0.98)
    assert sde.sde_interval("linear", last_step="Euler", last_step_size=0.0,
                            sample_eps=0.05) == (0.0, 0.95)
    np.testing.assert_array_equal(sde.torch_linspace(*sde.sde_interval(), 25, np.dtype(np.float32)),
                                  torch.linspace(0, 0.96, 25).numpy())


@pytest.mark.parametrize("schedule", ["linear", "gvp"])
def test_diffusion_and_score_formulas_match_torch(schedule):
    ref = TorchFlowSDE(torch_velocity, schedule)
    t = np.linspace(0.01, 0.97, 13)
    x = np.random.default_rng(0).normal(size=(13, 3))
    v = np.random.default_rng(1).normal(size=(13, 3))
    with jax.enable_x64(True):
        for form in sde.DIFFUSION_FORMS:
            ours = sde.diffusion_coefficient(jnp.asarray(t), form=form, norm=0.7,
                                             schedule=schedule)
            want = ref.diffusion(torch.from_numpy(x), torch.from_numpy(t), form, 0.7)
            want = np.broadcast_to(np.asarray(want), x.shape)[:, 0]
            np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-13, err_msg=form)
        score = jax.vmap(lambda vi, xi, ti: sde.score_from_velocity(vi, xi, ti, schedule=schedule))(
            jnp.asarray(v), jnp.asarray(x), jnp.asarray(t))
    ref.net_fn = lambda x_, t_: torch.from_numpy(v)
    want = ref.score(torch.from_numpy(x), torch.from_numpy(t)).numpy()
    np.testing.assert_allclose(np.asarray(score), want, rtol=1e-12)
    # Known closed forms: linear (t v - x) / (1 - t); gvp (2 tan(pi t / 2) / pi) v - x.
    tt = t[:, None]
    closed = (tt * v - x) / (1 - tt) if schedule == "linear" else \
        2 * np.tan(np.pi * tt / 2) / np.pi * v - x
    np.testing.assert_allclose(np.asarray(score), closed, rtol=1e-9)


# --------------------------------------------------------------------------- parity with torch

# (schedule, method, diffusion_form, last_step, sample_eps, num_steps): every form, both
# methods, every last step and both schedules; every (method, last_step) pair in float32.
PARITY_CASES = [
    ("linear", "euler", "sigma", "Mean", 0.0, 12),
    ("linear", "heun", "constant", "Euler", 0.0, 9),
    ("linear", "euler", "SBDM", None, 0.02, 10),
    ("linear", "heun", "increasing-decreasing", None, 0.03, 11),
    ("gvp", "heun", "sigma", "Mean", 0.0, 9),
    ("gvp", "euler", "decreasing", "Euler", 0.0, 12),
    ("gvp", "heun", "SBDM", "Euler", 0.05, 8),
    ("gvp", "euler", "linear", "Mean", 0.0, 11),
]
PARITY_CASES_X64 = [
    ("gvp", "euler", "constant", None, 0.02, 10),
    ("linear", "heun", "decreasing", "Mean", 0.0, 7),
]


def _run_parity(case, dtype):
    schedule, method, form, last_step, eps, n = case
    key = jax.random.PRNGKey(7)
    x0 = np.array(jax.random.normal(jax.random.PRNGKey(1), (3, 4, 2)), dtype)  # writable
    fn, read = counted(velocity)
    res = sde.solve_sde(fn, jnp.asarray(x0), ARGS, key, schedule=schedule, method=method,
                        num_steps=n, diffusion_form=form, diffusion_norm=0.8, last_step=last_step,
                        last_step_size=0.04, sample_eps=eps)
    ours = np.asarray(res.x)
    # NFE: our counter, the reported value and sde_nfe agree.
    assert read() == int(res.nfe) == sde.sde_nfe(method, n, last_step)

    noises = torch.from_numpy(np.array(step_noises(key, n, x0.shape, dtype)))
    ref = TorchFlowSDE(torch_velocity, schedule, sample_eps=eps)
    grid_dtype = torch.float32 if dtype == np.float32 else torch.float64
    want, ts = ref.sample(torch.from_numpy(x0), noises, method=method, form=form, norm=0.8,
                          last_step=last_step, last_step_size=0.04, num_steps=n,
                          grid_dtype=grid_dtype)
    # The original calls its network twice per SDE drift.
    assert ref.calls == sde.sde_nfe(method, n, last_step, original=True)
    assert ours.dtype == dtype and ours.shape == x0.shape
    np.testing.assert_array_equal(np.asarray(res.ts), ts.numpy())
    assert int(res.num_solver_steps) == n - 1 + (last_step is not None)
    assert int(res.num_rejected_steps) == 0 and res.intermediates is None
    return ours, want.numpy(), res


@pytest.mark.parametrize("case", PARITY_CASES, ids=lambda c: "-".join(map(str, c)))
def test_parity_with_torch_restatement_float32(case):
    ours, want, res = _run_parity(case, np.float32)
    assert bool(res.success) and int(res.status) == S.STATUS_OK
    assert np.all(np.isfinite(want))
    # Transcendentals differ in the last bit between torch and XLA; gvp's score amplifies it
    # near t=1 (r = 2 tan(pi t / 2) / pi), hence the tolerance.
    np.testing.assert_allclose(ours, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("case", PARITY_CASES_X64, ids=lambda c: "-".join(map(str, c)))
def test_parity_with_torch_restatement_float64(case):
    with jax.enable_x64(True):
        ours, want, _ = _run_parity(case, np.float64)
    np.testing.assert_allclose(ours, want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("case", [
    # SBDM with sample_eps=0 (always the case via FlowModel.generate): D(0) = inf.
    ("linear", "euler", "SBDM", "Mean", 0.0, 6),
    # t1 = 1 without a last step: Heun's second stage of the final step sits on t=1 where
    # the linear score divides by 1 - t = 0 (0 * inf = NaN even though D(1) = 0).
    ("linear", "heun", "sigma", None, 0.0, 6),
], ids=["SBDM-eps0", "heun-t1-is-1"])
def test_original_nonfinite_quirks_are_reproduced(case):
    with np.errstate(all="ignore"):
        ours, want, res = _run_parity(case, np.float32)
    assert not np.all(np.isfinite(want))  # the original fails too
    assert not np.all(np.isfinite(ours))
    assert not bool(res.success) and int(res.status) == S.STATUS_NONFINITE


# --------------------------------------------------------------------------- Gaussian marginals

M, SD = 1.5, 0.5  # x0 ~ N(0, 1) -> x1 ~ N(M, SD^2), independent coupling, linear path


def gaussian_velocity(t, x, args):
    """Exact marginal velocity E[x1 - x0 | x_t = x]: x_t ~ N(t M, t^2 SD^2 + (1 - t)^2)."""
    m, s = args
    var = t ** 2 * s ** 2 + (1 - t) ** 2
    return m + (t * s ** 2 - (1 - t)) / var * (x - t * m)


@pytest.mark.parametrize("method,form,norm", [("euler", "sigma", 1.0), ("heun", "sigma", 1.0),
                                              ("heun", "increasing-decreasing", 2.0)])
def test_gaussian_to_gaussian_marginals(method, form, norm):
    n = 20_000
    x0 = jax.random.normal(jax.random.PRNGKey(0), (n,))
    run = jax.jit(lambda key: sde.solve_sde(
        gaussian_velocity, x0, (M, SD), key, method=method, num_steps=200, diffusion_form=form,
        diffusion_norm=norm, last_step="Mean", last_step_size=0.01).x)
    x = np.asarray(run(jax.random.PRNGKey(1)), np.float64)
    # MC standard errors: mean SD / sqrt(n) = 0.0035, std SD / sqrt(2 n) = 0.0025. The
    # last (noise-free) Mean step of size h shrinks the std by O(h) (about 0.3% here).
    assert abs(x.mean() - M) < 0.015, x.mean()
    assert abs(x.std() - SD) < 0.015, x.std()
    # The noise matters: from the same x0, another key gives other samples (the ODE would
    # map x0 deterministically).
    other = np.asarray(run(jax.random.PRNGKey(2)), np.float64)
    assert np.corrcoef(x, other)[0, 1] < 0.95
    assert abs(other.mean() - M) < 0.015 and abs(other.std() - SD) < 0.015


# --------------------------------------------------------------------------- zero diffusion


def test_zero_diffusion_euler_is_the_ode_euler():
    x0 = jax.random.normal(jax.random.PRNGKey(2), (4, 3))
    key = jax.random.PRNGKey(3)
    ode = S.solve_flow(velocity, x0, ARGS, method="euler", num_steps=26)
    # No last step and sample_eps=0: the grid is linspace(0, 1, n), solve_flow's grid.
    res = sde.solve_sde(velocity, x0, ARGS, key, num_steps=26, diffusion_norm=0.0,
                        last_step=None)
    np.testing.assert_allclose(np.asarray(res.ts), np.asarray(ode.ts), rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(res.x), np.asarray(ode.x), rtol=1e-5, atol=1e-6)
    assert int(res.nfe) == int(ode.nfe) == 25
    # 25 points on [0, 0.96] (dt = 0.04) plus an Euler last step of 0.04 at t1 = 0.96: the
    # same 26 points on [0, 1].
    res = sde.solve_sde(velocity, x0, ARGS, key, num_steps=25, diffusion_norm=0.0,
                        last_step="Euler")
    np.testing.assert_allclose(np.asarray(res.ts), np.asarray(ode.ts[:-1]), atol=1e-7)
    np.testing.assert_allclose(np.asarray(res.x), np.asarray(ode.x), rtol=1e-5, atol=1e-6)
    assert int(res.nfe) == 25


def test_zero_diffusion_heun_is_deterministic_heun_on_the_grid():
    x0 = jax.random.normal(jax.random.PRNGKey(4), (4, 3))
    n, eps = 21, 0.01
    res = sde.solve_sde(velocity, x0, ARGS, jax.random.PRNGKey(5), method="heun", num_steps=n,
                        diffusion_norm=0.0, last_step=None, sample_eps=eps)
    ts = np.linspace(0.0, 1 - eps, n)  # t1 = 1 - sample_eps < 1 (no last step)
    np.testing.assert_allclose(np.asarray(res.ts), ts, atol=1e-7)
    x, dt = x0, ts[1] - ts[0]
    for t in ts[:-1]:
        k1 = velocity(t, x, ARGS)
        k2 = velocity(t + dt, x + dt * k1, ARGS)
        x = x + 0.5 * dt * (k1 + k2)
    np.testing.assert_allclose(np.asarray(res.x), np.asarray(x), rtol=1e-5, atol=1e-6)
    assert int(res.nfe) == 2 * (n - 1)


# --------------------------------------------------------------------------- jit, keys, NFE


def test_jit_is_deterministic_per_key():
    x0 = jax.random.normal(jax.random.PRNGKey(6), (5, 2, 2, 3))
    opts = dict(method="heun", num_steps=8, diffusion_form="sigma", last_step="Mean")

    @jax.jit
    def run(x0, key, norm):
        return sde.solve_sde(velocity, x0, ARGS, key, diffusion_norm=norm, **opts)

    a = run(x0, jax.random.PRNGKey(0), 1.0)
    b = run(x0, jax.random.PRNGKey(0), 1.0)
    c = run(x0, jax.random.PRNGKey(1), 1.0)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert np.max(np.abs(np.asarray(a.x) - np.asarray(c.x))) > 1e-2
    assert int(a.nfe) == sde.sde_nfe("heun", 8, "Mean") == 15 and bool(a.success)
    # diffusion_norm is traced: a new value reuses the executable and changes the sample.
    d = run(x0, jax.random.PRNGKey(0), 0.5)
    assert run._cache_size() == 1
    assert np.max(np.abs(np.asarray(a.x) - np.asarray(d.x))) > 1e-2
    # Typed keys draw the same noise as raw keys; steps draw independent noise.
    raw = jax.random.PRNGKey(0)
    noise = np.asarray(step_noises(raw, 8, (4, 3)))
    np.testing.assert_array_equal(
        np.asarray(step_noises(jax.random.wrap_key_data(raw), 8, (4, 3))), noise)
    assert noise.shape == (7, 4, 3)
    assert abs(np.corrcoef(noise[0].ravel(), noise[1].ravel())[0, 1]) < 0.9


@pytest.mark.parametrize("method,last_step", [("euler", None), ("heun", "Mean")])
def test_nfe_counts_real_evaluations_under_jit(method, last_step):
    fn, read = counted(velocity)
    run = jax.jit(lambda x0, key: sde.solve_sde(fn, x0, ARGS, key, method=method, num_steps=6,
                                                last_step=last_step))
    res = run(jnp.ones((2, 3), jnp.bfloat16), jax.random.PRNGKey(0))
    assert read() == int(res.nfe) == sde.sde_nfe(method, 6, last_step)
    run(jnp.ones((2, 3), jnp.bfloat16), jax.random.PRNGKey(1))
    assert read() == 2 * int(res.nfe)
    # A low-precision state is promoted to float32 (as solve_flow).
    assert res.x.dtype == jnp.float32 and res.ts.dtype == jnp.float32


def test_sde_nfe_formulas():
    # Ours: one evaluation per point; the original: two per SDE drift.
    assert sde.sde_nfe("euler", 40, "Mean") == 40
    assert sde.sde_nfe("heun", 40, "Mean") == 79
    assert sde.sde_nfe("euler", 40, None) == 39
    assert sde.sde_nfe("heun", 40, "Euler") == 79
    assert sde.sde_nfe("euler", 40, "Mean", original=True) == 80
    assert sde.sde_nfe("heun", 40, "Mean", original=True) == 158
    assert sde.sde_nfe("euler", 40, "Euler", original=True) == 79
    assert sde.sde_nfe("heun", 40, None, original=True) == 156


def test_defaults_are_the_originals_generate_defaults():
    params = inspect.signature(sde.solve_sde).parameters
    want = dict(schedule="linear", method="euler", num_steps=40, diffusion_form="sigma",
                diffusion_norm=1.0, last_step="Mean", last_step_size=0.04, sample_eps=0.0)
    assert {k: params[k].default for k in want} == want
    assert sde.SDE_METHODS == ("euler", "heun") and sde.LAST_STEPS == ("Mean", "Euler", None)
    assert sde.DIFFUSION_FORMS == ("constant", "SBDM", "sigma", "linear", "decreasing",
                                   "increasing-decreasing")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rk4"), r"Unknown SDE method 'rk4'.*\('euler', 'heun'\)"),
    (dict(diffusion_form="sbdm"), r"Unknown SDE diffusion form 'sbdm'.*'SBDM'"),
    (dict(last_step="mean"), r"Unknown SDE last step 'mean'.*\('Mean', 'Euler', None\)"),
    (dict(last_step="Tweedie"), r"'Tweedie' is not supported: the original never implemented"),
    (dict(num_steps=1), r"num_steps .* int >= 2, got 1"),
    (dict(num_steps=10.0), r"num_steps .* int >= 2, got 10.0"),
    (dict(schedule="cosine"), r"Unknown flow schedule 'cosine'.*\('linear', 'gvp'\)"),
    (dict(last_step_size=1.0), r"last_step_size must be a Python number in \[0, 1\), got 1.0"),
    (dict(last_step_size=-0.1), r"last_step_size .* got -0.1"),
    (dict(sample_eps=jnp.asarray(0.1)), r"sample_eps must be a Python number"),
    (dict(diffusion_norm=-1.0), r"diffusion_norm must be a finite number >= 0, got -1.0"),
    (dict(diffusion_form="SBDM", sample_eps=0.5, last_step_size=0.6),
     r"Empty SDE time interval \[t0=0.5, t1=0.4"),
])
def test_bad_arguments_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sde.solve_sde(velocity, jnp.ones((2, 3)), ARGS, jax.random.PRNGKey(0), **kwargs)


def test_helpers_validate_too():
    with pytest.raises(ValueError, match="Unknown SDE method 'midpoint'"):
        sde.sde_nfe("midpoint", 10, "Mean")
    with pytest.raises(ValueError, match="never implemented"):
        sde.sde_nfe("euler", 10, "Tweedie")
    with pytest.raises(ValueError, match="got 0"):
        sde.sde_nfe("euler", 0, "Mean")
    with pytest.raises(ValueError, match="Unknown SDE diffusion form 'cosine'"):
        sde.diffusion_coefficient(0.5, form="cosine")


def test_one_key_per_example_makes_each_sample_independent_of_the_batch():
    """Per-example keys: example b's noise comes from keys[b] alone (what the upsampling CLI and
    eval.py use so that results do not depend on the batch size or the device count)."""
    x0 = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4, 4, 2)), jnp.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(3))

    def v(t, x, args):
        return -x * args

    both = sde.solve_sde(v, x0, jnp.float32(0.5), keys, num_steps=6).x
    for b in range(3):
        alone = sde.solve_sde(v, x0[b:b + 1], jnp.float32(0.5), keys[b:b + 1], num_steps=6).x
        np.testing.assert_allclose(np.asarray(alone[0]), np.asarray(both[b]), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="2 keys for a batch of 3"):
        sde.solve_sde(v, x0, jnp.float32(0.5), keys[:2], num_steps=6)
