"""SDE sampler of the flow: the original's ``FlowSDE.sample`` (fmboost/flow.py) in JAX.

The original (adapted from SiT's sampler) turns the learned velocity ``v(t, x)`` into an
SDE with the same marginals as the flow ODE,

    dx = [v(t, x) + D(t) * score(t, x)] dt + sqrt(2 D(t)) dW,

where the score is derived from the velocity (only velocities are trained) and ``D(t)``
is a chosen diffusion coefficient. It is integrated forward from t0 to t1 with
Euler--Maruyama or a stochastic Heun step, followed by one deterministic "last step".
Generic over ``velocity_fn(t, x, args) -> dx/dt`` (diffrax's signature, as
``sampling.solve_flow``): ``t`` a scalar, ``x`` an array ``[B, ...]``, ``args`` a pytree
carrying the network parameters and the context.

Conventions (t=0 is the source ``x0``, t=1 the target; see ``flow.py``):

* score from velocity (``get_score_from_velocity``), with alpha/sigma of the schedule and
  ``r = alpha_t / alpha'_t``: ``score = (r * v - x) / (sigma_t^2 - r * sigma'_t * sigma_t)``.
  Linear: ``(t v - x) / (1 - t)``; gvp: ``(2 tan(pi t / 2) / pi) * v - x``.
* diffusion ``D(t)`` (``compute_diffusion``), ``n = diffusion_norm``:
  ``constant``: n; ``SBDM``: n * ((alpha'_t / alpha_t) * sigma_t^2 - sigma_t * sigma'_t)
  (linear: n (1 - t) / t; ``alpha'/alpha`` is computed as the original does, 1/t and
  pi / (2 tan(pi t / 2))); ``sigma``: n * sigma_t; ``linear``: n * (1 - t);
  ``decreasing``: 0.25 * (n cos(pi t) + 1)^2; ``increasing-decreasing``: n sin(pi t)^2.
* SDE drift ``f(t, x) = v + D(t) * score`` (``__get_sde_diffusion_and_drift``).

Time interval (``check_interval``) and grid, as the original:

* ``last_step=None`` first forces ``last_step_size = 0``.
* ``t0 = sample_eps`` for ``SBDM``, else 0; ``t1 = 1 - last_step_size``, or
  ``1 - sample_eps`` when ``last_step_size == 0``.
* ``ts = torch.linspace(t0, t1, num_steps)`` reproduced bit for bit (``torch_linspace``):
  ``num_steps`` counts grid *points*; one constant ``dt = ts[1] - ts[0]``. The loop runs
  over ``ts[:-1]`` (``num_steps - 1`` stochastic steps), then the last step is taken at
  ``t1`` (``SampleResult.ts`` is this grid; with a last step the trajectory ends at
  ``t1 + last_step_size``, i.e. t=1 by default).

Steps (``StepSDE``), ``w ~ N(0, I)`` one draw per step, ``dw = w * sqrt(dt)``:

* ``euler`` (Euler--Maruyama): ``mean = x + f(t, x) dt``; ``x = mean + sqrt(2 D(t)) dw``.
* ``heun``: noise first, ``xhat = x + sqrt(2 D(t)) dw``, then a deterministic Heun step
  from ``xhat``: ``k1 = f(t, xhat)``, ``k2 = f(t + dt, xhat + dt k1)``,
  ``x = xhat + dt (k1 + k2) / 2``.
* last step (``FlowSDE.last_step``, at ``t1``, size ``h = last_step_size``, no noise):
  ``Mean``: ``x + f(t1, x) h``; ``Euler``: ``x + v(t1, x) h``; ``None``: ``x`` unchanged.
  The original's ``Tweedie`` only raises NotImplementedError; here it is a ValueError.

Noise layout: step ``i`` (0-based, ``i < num_steps - 1``) uses
``jax.random.normal(jax.random.fold_in(key, i), x.shape, state_dtype)``, generated inside
the loop (no ``[num_steps - 1, *x.shape]`` buffer); tests/test_sde.py stacks the same
arrays to feed a reference implementation the identical noise. The last step draws nothing. (Torch's ``randn`` stream cannot be reproduced; only the law is.)

NFE accounting (``SampleResult.nfe``, ``sde_nfe``): drift and score are both functions of
the same velocity ``v(t, x)``, so we evaluate the network **once** per point and reuse it:
``stages * (num_steps - 1) + (1 if last_step else 0)`` with stages euler 1, heun 2
(``num_steps=40``: euler 40, heun 79 with the default ``Mean`` last step). The original
calls the network twice per SDE drift (``self.drift`` and ``self.score`` each run the
model on the same input), so its count is ``2 * stages * (num_steps - 1)`` plus 2 for
``Mean``, 1 for ``Euler``, 0 for ``None`` (``sde_nfe(..., original=True)``); the samples
are the same, as the network is deterministic.

Quirks of the original, kept (K) or deliberately not (N):

* (K) The last step is applied to ``x``, the noisy state, not to ``mean_x``: the original
  tracks ``mean_x`` (euler: the pre-noise mean; heun: ``xhat``, i.e. *after* the noise)
  but never uses it for the output. We do not track it.
* (K) ``sample_eps`` (default 0, and always 0 via ``FlowModel.generate``) is the only
  guard of ``SBDM``: at t=0 ``alpha'/alpha`` is infinite, so ``SBDM`` with
  ``sample_eps=0`` yields a non-finite sample (``STATUS_NONFINITE``). Use
  ``sample_eps > 0`` with ``SBDM``.
* (K) With ``last_step=None`` (or ``last_step_size=0``) and ``sample_eps=0``, ``t1 = 1``
  where the linear schedule's score is singular (``1 - t = 0``): ``euler`` never evaluates
  there, but ``heun``'s second stage of the final step does (at ``ts[-2] + dt``, exactly
  1.0 on the torch grid), and the sample is non-finite (even where ``D(1) = 0``:
  0 * inf = NaN). A ``Mean`` last step with size 0 evaluates there too.
* (K) ``decreasing`` does not vanish for ``diffusion_norm=0`` (it is 0.25 * (0 + 1)^2);
  ``sigma`` and ``linear`` coincide for the linear schedule.
* (K) Heun's second stage is at ``t + dt`` (not ``ts[i + 1]``), with the single ``dt``.
* (N) ``constant`` crashes in the original with a Python-float ``diffusion_norm``
  (``torch.sqrt`` of a float is a TypeError); we implement the evident ``D = norm``.
* (N) The original's grid is always float32 (``torch.linspace`` default) and cast to x's
  dtype; ours is in the state dtype (x0's dtype promoted to >= float32), identical for
  float32 states.
* (N) ``FlowModel.generate(reverse=True, use_sde=True)`` silently samples forward in the
  original (``reverse`` is not passed on); there is no ``reverse`` here.
* Defaults are those of ``FlowModel.generate(use_sde=True)``: ``euler``, ``sigma``, norm 1,
  ``Mean``, 0.04, ``sample_eps=0`` (``FlowModel`` builds ``FlowSDE`` with its default);
  ``num_steps=40`` is the original trainer's default ``sample_kwargs`` (and
  ``solve_flow``'s); ``generate``'s own fallback is 50, ``FlowSDE.sample``'s 250. Classifier-free guidance belongs in ``velocity_fn``.
"""
from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cfm_jax import flow
from cfm_jax.sampling import STATUS_NONFINITE, STATUS_OK, SampleResult

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

SDE_METHODS = ("euler", "heun")  # Euler--Maruyama, stochastic Heun
DIFFUSION_FORMS = ("constant", "SBDM", "sigma", "linear", "decreasing", "increasing-decreasing")
LAST_STEPS = ("Mean", "Euler", None)

# Velocity evaluations per stochastic step (ours: one per point, see module docstring).
SDE_STAGES = {"euler": 1, "heun": 2}
# The original's network calls per last step (its SDE drift calls the network twice).
_ORIGINAL_LAST_STEP_NFE = {"Mean": 2, "Euler": 1, None: 0}

# The defaults of the original's FlowModel.generate(use_sde=True), here and wherever a sampler is configured
# (SolverSpec, configs/common.py, the upsampling CLI).
DEFAULT_DIFFUSION_FORM = "sigma"
DEFAULT_DIFFUSION_NORM = 1.0
DEFAULT_LAST_STEP = "Mean"
DEFAULT_LAST_STEP_SIZE = 0.04


# ----------------------------------------------------------------------------- validation


def _is_real(value) -> bool:
    return (isinstance(value, (numbers.Real, np.floating, np.integer))
            and not isinstance(value, bool))


def _check_last_step(last_step) -> None:
    if last_step == "Tweedie":
        raise ValueError("last_step='Tweedie' is not supported: the original never implemented it "
                         "(its FlowSDE.last_step raises NotImplementedError for 'Tweedie'); "
                         f"choose one of {LAST_STEPS}.")
    if last_step not in LAST_STEPS:
        raise ValueError(f"Unknown SDE last step {last_step!r}; choose one of {LAST_STEPS}.")


def _check_method(method: str) -> None:
    if method not in SDE_METHODS:
        raise ValueError(f"Unknown SDE method {method!r}; choose one of {SDE_METHODS} "
                         f"(euler = Euler-Maruyama, heun = stochastic Heun).")


def _check_num_steps(num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 2:
        raise ValueError(f"num_steps counts grid points (num_steps - 1 stochastic steps before "
                         f"the last step) and must be an int >= 2, got {num_steps!r}.")


def _check_diffusion_form(diffusion_form: str) -> None:
    if diffusion_form not in DIFFUSION_FORMS:
        raise ValueError(f"Unknown SDE diffusion form {diffusion_form!r}; choose one of "
                         f"{DIFFUSION_FORMS}.")


def _validate(schedule: str, method: str, num_steps: int, diffusion_form: str, diffusion_norm,
              last_step, last_step_size, sample_eps) -> None:
    flow.check_schedule(schedule)
    _check_method(method)
    _check_num_steps(num_steps)
    _check_diffusion_form(diffusion_form)
    _check_last_step(last_step)
    if _is_real(diffusion_norm) and not (math.isfinite(diffusion_norm) and diffusion_norm >= 0):
        raise ValueError(f"diffusion_norm must be a finite number >= 0, got {diffusion_norm!r}.")
    for name, value in (("last_step_size", last_step_size), ("sample_eps", sample_eps)):
        # Both decide the (static) time interval, so they must be concrete numbers.
        if not _is_real(value) or not 0 <= value < 1:
            raise ValueError(f"{name} must be a Python number in [0, 1), got {value!r}.")


# ----------------------------------------------------------------------------- helpers


def _round_exact(value: Fraction, dtype: np.dtype) -> np.floating:
    """``value`` correctly rounded (to nearest, ties to even) to ``dtype`` (float32/float64)."""
    first = dtype.type(float(value))  # float(Fraction) is correctly rounded to float64
    if dtype == np.float64:
        return first
    candidates = [first, np.nextafter(first, dtype.type(-np.inf)),
                  np.nextafter(first, dtype.type(np.inf))]

    def rank(c):  # nearest first; on a tie the even significand
        return abs(Fraction(float(c)) - value), int(np.asarray(c).view(np.int32)) & 1

    return min(candidates, key=rank)


def torch_linspace(start: float, end: float, steps: int, dtype=np.float32) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=dtype)``, bit for bit (host-side NumPy).

    PyTorch fills the first half as ``start + step * i`` and the second half as
    ``end - step * (steps - 1 - i)`` with ``step = (end - start) / (steps - 1)`` in
    ``dtype``, each entry rounded once (a fused multiply-add; checked against PyTorch's CPU
    kernel, and its CUDA kernel uses the same formula).
    ``jnp.linspace`` rounds differently (in the last bit), which matters where a grid time
    plus ``dt`` lands exactly on a singular t=1 (see the module docstring).
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"torch_linspace supports float32 and float64, got {dtype}.")
    s, e = dtype.type(start), dtype.type(end)
    if steps == 1:
        return np.asarray([s], dtype)
    step = (e - s) / dtype.type(steps - 1)
    fs, fe, fstep = Fraction(float(s)), Fraction(float(e)), Fraction(float(step))
    half = steps // 2
    values = [fs + fstep * i if i < half else fe - fstep * (steps - 1 - i) for i in range(steps)]
    return np.asarray([_round_exact(v, dtype) for v in values], dtype)


def sde_interval(diffusion_form: str = DEFAULT_DIFFUSION_FORM, *, last_step: str | None = DEFAULT_LAST_STEP,
                 last_step_size: float = DEFAULT_LAST_STEP_SIZE,
                 sample_eps: float = 0.0) -> tuple[float, float]:
    """``(t0, t1)`` of the stochastic steps, as the original's ``check_interval``.

    ``last_step=None`` forces ``last_step_size = 0`` first (as ``FlowSDE.sample``).
    """
    _check_diffusion_form(diffusion_form)
    _check_last_step(last_step)
    if last_step is None:
        last_step_size = 0.0
    t0 = sample_eps if diffusion_form == "SBDM" else 0.0
    t1 = 1.0 - sample_eps if last_step_size == 0 else 1.0 - last_step_size
    if not t0 < t1:
        raise ValueError(f"Empty SDE time interval [t0={t0}, t1={t1}] (diffusion_form="
                         f"{diffusion_form!r}, sample_eps={sample_eps}, last_step_size="
                         f"{last_step_size}); need t0 < t1.")
    return float(t0), float(t1)


def sde_nfe(method: str, num_steps: int, last_step: str | None = DEFAULT_LAST_STEP, *,
            original: bool = False) -> int:
    """Velocity evaluations of ``solve_sde`` (or, ``original=True``, the original's network calls).

    Ours: ``stages * (num_steps - 1) + (last_step is not None)``, stages euler 1, heun 2.
    The original: ``2 * stages * (num_steps - 1)`` plus 2 (``Mean``), 1 (``Euler``) or 0.
    """
    _check_method(method)
    _check_num_steps(num_steps)
    _check_last_step(last_step)
    stages = SDE_STAGES[method]
    if original:
        return 2 * stages * (num_steps - 1) + _ORIGINAL_LAST_STEP_NFE[last_step]
    return stages * (num_steps - 1) + (0 if last_step is None else 1)


def _is_key_batch(key: jax.Array) -> bool:
    """One key per example: ``[B]`` typed keys or ``[B, 2]`` raw ``uint32`` keys."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def _step_noise(key: jax.Array, step: jax.Array, shape: tuple, dtype) -> jax.Array:
    """The standard normal noise of step ``step``.

    With one key per example (``key`` [B] typed or [B, 2] raw), example ``b`` draws
    ``normal(fold_in(key[b], step), shape[1:])``: its noise does not depend on the batch."""
    if _is_key_batch(key):
        if key.shape[0] != shape[0]:
            raise ValueError(f"{key.shape[0]} keys for a batch of {shape[0]} examples.")
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, step), shape[1:], dtype))(key)
    return jax.random.normal(jax.random.fold_in(key, step), shape, dtype)


def d_alpha_alpha_ratio(t: jax.Array, *, schedule: str = "linear") -> jax.Array:
    """``alpha'_t / alpha_t`` written as the original (``1/t``; ``pi / (2 tan(pi t / 2))``)."""
    t = jnp.asarray(t)
    if schedule == "linear":
        return 1.0 / t
    if schedule == "gvp":
        return math.pi / (2.0 * jnp.tan(t * math.pi / 2.0))
    raise ValueError(f"Unknown flow schedule {schedule!r}; choose one of {flow.SCHEDULES}.")


def diffusion_coefficient(t: jax.Array, *, form: str = "sigma", norm=1.0,
                          schedule: str = "linear") -> jax.Array:
    """The diffusion coefficient ``D(t)`` of the SDE (``compute_diffusion``); same shape as t."""
    _check_diffusion_form(form)
    t = jnp.asarray(t)
    norm = jnp.asarray(norm, t.dtype)
    if form == "constant":
        return jnp.broadcast_to(norm, t.shape)
    if form == "SBDM":
        c = flow.path_coefficients(t, schedule=schedule)
        ratio = d_alpha_alpha_ratio(t, schedule=schedule)
        return norm * (ratio * c.sigma ** 2 - c.sigma * c.d_sigma)
    if form == "sigma":
        return norm * flow.path_coefficients(t, schedule=schedule).sigma
    if form == "linear":
        return norm * (1.0 - t)
    if form == "decreasing":
        return 0.25 * (norm * jnp.cos(math.pi * t) + 1.0) ** 2
    return norm * jnp.sin(math.pi * t) ** 2  # increasing-decreasing


def score_from_velocity(velocity: jax.Array, x: jax.Array, t: jax.Array, *,
                        schedule: str = "linear") -> jax.Array:
    """The score ``grad log p_t(x)`` implied by the velocity (``get_score_from_velocity``).

    ``t`` is a scalar (or broadcasts against ``x``). Singular at t=1 for the linear schedule.
    """
    c = flow.path_coefficients(jnp.asarray(t), schedule=schedule)
    reverse_ratio = c.alpha / c.d_alpha
    var = c.sigma ** 2 - reverse_ratio * c.d_sigma * c.sigma
    return (reverse_ratio * velocity - x) / var


# ----------------------------------------------------------------------------- sampler


def solve_sde(velocity_fn: VelocityFn, x0: jax.Array, args: Any, key: jax.Array, *,
              schedule: str = "linear", method: str = "euler", num_steps: int = 40,
              diffusion_form: str = DEFAULT_DIFFUSION_FORM, diffusion_norm=DEFAULT_DIFFUSION_NORM, last_step: str | None = DEFAULT_LAST_STEP,
              last_step_size: float = DEFAULT_LAST_STEP_SIZE,
              sample_eps: float = 0.0) -> SampleResult:
    """Samples the flow's SDE from ``x0`` at t0 to t1, then takes the last step (see module doc).

    Pure and jittable; ``schedule``, ``method``, ``num_steps``, ``diffusion_form``,
    ``last_step``, ``last_step_size`` and ``sample_eps`` must be static (they fix the time
    grid and the program); ``x0``, ``args``, ``key`` and ``diffusion_norm`` may be traced.
    ``key`` is a JAX PRNG key; step ``i`` draws its noise from ``fold_in(key, i)``,
    or one key per example (``[B]`` typed / ``[B, 2]`` raw), example ``b``
    then drawing from ``fold_in(key[b], i)`` alone. Never raises on a non-finite sample: see
    ``SampleResult.status``.

    Returns a ``SampleResult`` with ``x`` the final state (x0's dtype promoted to >= float32),
    ``nfe`` our velocity evaluations (``sde_nfe``), ``ts`` the grid ``[num_steps]`` of the
    stochastic steps (t0 .. t1), ``intermediates``/``intermediate_ts`` None,
    ``num_solver_steps`` ``num_steps - 1`` plus 1 when a last step is taken, no rejections.
    """
    _validate(schedule, method, num_steps, diffusion_form, diffusion_norm, last_step,
              last_step_size, sample_eps)
    if last_step is None:
        last_step_size = 0.0  # as the original, before check_interval
    t0, t1 = sde_interval(diffusion_form, last_step=last_step, last_step_size=last_step_size,
                          sample_eps=sample_eps)

    x0 = jnp.asarray(x0)
    dtype = jnp.result_type(x0.dtype, jnp.float32)
    x0 = x0.astype(dtype)
    ts_host = torch_linspace(t0, t1, num_steps, dtype)  # static: a compile-time constant
    dt_host = ts_host[1] - ts_host[0]
    ts = jnp.asarray(ts_host)
    dt = jnp.asarray(dt_host, dtype)
    sqrt_dt = jnp.asarray(np.sqrt(dt_host), dtype)
    norm = jnp.asarray(diffusion_norm, dtype)

    def diffusion(t):
        return diffusion_coefficient(t, form=diffusion_form, norm=norm, schedule=schedule)

    def velocity(t, x):
        return jnp.asarray(velocity_fn(t, x, args)).astype(dtype)

    def sde_drift(t, x):
        # One network evaluation gives both the drift and the score (the original: two).
        v = velocity(t, x)
        return v + diffusion(t) * score_from_velocity(v, x, t, schedule=schedule)

    def step(x, inputs):
        i, t = inputs
        dw = _step_noise(key, i, x.shape, dtype) * sqrt_dt
        d = diffusion(t)
        if method == "euler":
            mean_x = x + sde_drift(t, x) * dt
            x = mean_x + jnp.sqrt(2.0 * d) * dw
        else:  # heun
            xhat = x + jnp.sqrt(2.0 * d) * dw
            k1 = sde_drift(t, xhat)
            xp = xhat + dt * k1
            k2 = sde_drift(t + dt, xp)
            x = xhat + 0.5 * dt * (k1 + k2)
        return x, None

    steps = jnp.arange(num_steps - 1, dtype=jnp.int32)
    x, _ = jax.lax.scan(step, x0, (steps, ts[:-1]))

    t_last = jnp.asarray(t1, dtype)
    if last_step == "Mean":
        x = x + sde_drift(t_last, x) * last_step_size
    elif last_step == "Euler":
        x = x + velocity(t_last, x) * last_step_size

    finite = jnp.all(jnp.isfinite(x))
    status = jnp.where(finite, STATUS_OK, STATUS_NONFINITE).astype(jnp.int32)
    n_solver_steps = num_steps - 1 + (0 if last_step is None else 1)
    return SampleResult(
        x=x, nfe=jnp.asarray(sde_nfe(method, num_steps, last_step), jnp.int32),
        intermediates=None, intermediate_ts=None, ts=ts, success=status == STATUS_OK,
        status=status, num_solver_steps=jnp.asarray(n_solver_steps, jnp.int32),
        num_rejected_steps=jnp.asarray(0, jnp.int32))


__all__ = [
    "DEFAULT_DIFFUSION_FORM", "DEFAULT_DIFFUSION_NORM", "DEFAULT_LAST_STEP", "DEFAULT_LAST_STEP_SIZE",
    "DIFFUSION_FORMS", "LAST_STEPS", "SDE_METHODS", "SDE_STAGES",
    "d_alpha_alpha_ratio", "diffusion_coefficient", "score_from_velocity", "sde_interval",
    "sde_nfe", "solve_sde", "torch_linspace",
]
