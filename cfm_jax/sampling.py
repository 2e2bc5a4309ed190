"""ODE sampler of the flow: integrate ``dx/dt = v(t, x)`` from t=0 to t=1 with diffrax.

Generic over the velocity function ``velocity_fn(t, x, args) -> dx/dt`` (diffrax's
signature): ``t`` is a scalar, ``x`` an array or pytree (e.g. ``[B, H, W, C]``) and
``args`` a pytree through which the caller passes the network parameters and the
context -- never by closure, so that one compiled sampler serves every set of params.

Time grid (as the original ``FlowModel.generate``, which calls torchdiffeq's
``odeint`` on ``t = linspace(0, 1, num_steps)``): ``num_steps`` counts grid *points*,
so ``num_steps=40`` means **39** intervals. Fixed-step methods step exactly on this
grid via ``diffrax.StepTo(ts)``. With ``reverse=True`` the grid is ``1 - linspace(0,
1, num_steps)``, i.e. the flow is integrated backwards from t=1 to t=0 (x1 -> x0) with
the same velocity field, as the original's ``reverse=True``.

Methods:

* fixed step: ``euler``, ``heun``, ``midpoint``, ``ralston`` (diffrax's solvers) and
  ``rk4``, the 3/8-rule fourth-order Runge--Kutta method that torchdiffeq's ``rk4``
  uses (``RK4ThreeEighths`` below; *not* the classic 1/6-1/3-1/3-1/6 rule).
* adaptive: ``tsit5``, ``dopri5`` with ``PIDController(rtol, atol)`` (defaults
  atol=1e-6, rtol=1e-3 like the original), the error measured by the RMS norm over
  the whole state, so every example of a batch shares the step sizes (as in the
  original). ``num_steps`` does not matter to them; ``max_steps`` bounds the number
  of steps (accepted + rejected). Failures (e.g. ``max_steps`` hit) are reported in
  ``SampleResult.success`` / ``status`` rather than raised inside ``jit``;
  ``raise_if_failed`` turns them into a RuntimeError outside ``jit``.

NFE accounting (network evaluations, reported in ``SampleResult.nfe`` for every method):

* fixed step: ``stages * (num_steps - 1)`` with stages euler 1, heun 2, midpoint 2,
  ralston 2, rk4 4 (none of them is FSAL). ``num_steps=40`` -> 39, 78, 78, 78, 156.
* adaptive: ``2 + 6 * n_steps`` with ``n_steps = sol.stats["num_steps"]`` (accepted
  plus rejected steps). The initial step size is chosen here (Hairer's heuristic, as
  torchdiffeq's ``_select_initial_step``) with 2 evaluations: ``f0 = v(t0, x0)`` and
  one probe. ``f0`` is handed to the FSAL solver as its initial state, so every step,
  the first one and rejected ones included, costs exactly 6 new evaluations of the 7
  stages (the 7th is the next step's first). Left to itself, diffrax 0.7.2 would
  re-evaluate ``f0`` on every attempt until the first accepted step, which
  ``sol.stats`` cannot reveal, and would skip its own initial-step heuristic
  (``dt0=0.01``) because the term it sees is wrapped.

Intermediate states (``num_intermediates=K >= 2``): ``K`` states stacked along a new
leading time axis, the first being ``x0`` and the last the final state (bit for
bit). Fixed-step methods store the grid states at the ``K`` grid points nearest to
``K`` evenly spaced times (``K == num_steps`` gives every grid point; this keeps all
``num_steps`` states in memory before selecting); adaptive methods interpolate at
``K`` evenly spaced times with the solver's dense output.
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx

VelocityFn = Callable[[jax.Array, Any, Any], Any]

FIXED_METHODS = ("euler", "heun", "midpoint", "ralston", "rk4")
ADAPTIVE_METHODS = ("tsit5", "dopri5")
METHODS = FIXED_METHODS + ADAPTIVE_METHODS

# Network evaluations per step of each fixed-step method.
FIXED_STAGES = {"euler": 1, "heun": 2, "midpoint": 2, "ralston": 2, "rk4": 4}
# Adaptive methods: both 7-stage FSAL pairs of order 5 (6 new evaluations per step).
_ADAPTIVE_ORDER = 5
_ADAPTIVE_NEW_EVALS_PER_STEP = 6
_INITIAL_STEP_NFE = 2

DEFAULT_ATOL = 1e-6
DEFAULT_RTOL = 1e-3
DEFAULT_MAX_STEPS = 4096

# `SampleResult.status` codes.
STATUS_OK = 0
STATUS_MAX_STEPS = 1  # adaptive solver used all `max_steps` steps before reaching t1
STATUS_SOLVER_FAILED = 2  # any other diffrax failure (e.g. dt_min_reached)
STATUS_NONFINITE = 3  # the solve finished but the final state holds NaN/Inf


# The 3/8 rule (Kutta 1901), torchdiffeq's `rk4` (`rk4_alt_step_func`):
#   0   |
#   1/3 | 1/3
#   2/3 | -1/3  1
#   1   | 1    -1    1
#   ----+---------------------
#       | 1/8   3/8  3/8  1/8
# Fixed steps only: it has no embedded error estimate (b_error = 0).
RK4_38_TABLEAU = diffrax.ButcherTableau(
    c=np.array([1 / 3, 2 / 3, 1.0]),
    b_sol=np.array([1 / 8, 3 / 8, 3 / 8, 1 / 8]),
    b_error=np.zeros(4),
    a_lower=(np.array([1 / 3]), np.array([-1 / 3, 1.0]), np.array([1.0, -1.0, 1.0])),
)


class RK4ThreeEighths(diffrax.AbstractERK):
    """Fourth-order 3/8-rule Runge--Kutta (torchdiffeq's ``rk4``); 4 stages, fixed steps."""

    tableau: ClassVar[diffrax.ButcherTableau] = RK4_38_TABLEAU
    # Only used for dense/`SaveAt(ts)` output, which this module never asks of it.
    interpolation_cls: ClassVar[Callable[..., Any]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation.from_k)

    def order(self, terms):
        del terms
        return 4


_SOLVERS = {
    "euler": diffrax.Euler,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "rk4": RK4ThreeEighths,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
}


class SampleResult(NamedTuple):
    """What ``solve_flow`` returns (a pytree: it can leave ``jit``)."""

    x: Any  # final state, same structure/shape as x0 (dtype promoted to >= float32)
    nfe: jax.Array  # int32: velocity evaluations actually used
    intermediates: Any  # [K, *x.shape] per leaf, or None (num_intermediates=0)
    intermediate_ts: jax.Array | None  # [K] times of `intermediates`, or None
    ts: jax.Array  # fixed: the step grid [num_steps]; adaptive: [t_start, t_end]
    success: jax.Array  # bool: the solve reached t_end and x is finite
    status: jax.Array  # int32: STATUS_OK / _MAX_STEPS / _SOLVER_FAILED / _NONFINITE
    num_solver_steps: jax.Array  # int32: steps taken (adaptive: accepted + rejected)
    num_rejected_steps: jax.Array  # int32: rejected steps (always 0 for fixed-step methods)


# ----------------------------------------------------------------------------- validation


def _validate(method: str, num_steps: int, max_steps: int, num_intermediates: int,
              atol: Any, rtol: Any) -> None:
    if method not in METHODS:
        raise ValueError(f"Unknown ODE method {method!r}; choose one of {METHODS} "
                         f"(fixed step: {FIXED_METHODS}; adaptive: {ADAPTIVE_METHODS}).")
    fixed = method in FIXED_METHODS
    if fixed and (not isinstance(num_steps, (int, np.integer)) or num_steps < 2):
        raise ValueError(f"num_steps counts grid points (num_steps - 1 intervals) and must be "
                         f"an int >= 2, got {num_steps!r}.")
    if not fixed and (not isinstance(max_steps, (int, np.integer)) or max_steps < 1):
        raise ValueError(f"max_steps must be an int >= 1, got {max_steps!r}.")
    if not isinstance(num_intermediates, (int, np.integer)) or num_intermediates < 0 \
            or num_intermediates == 1:
        raise ValueError(f"num_intermediates must be 0 (none) or an int >= 2 (x0 and the final "
                         f"state included), got {num_intermediates!r}.")
    if fixed and num_intermediates > num_steps:
        raise ValueError(f"num_intermediates={num_intermediates} exceeds the {num_steps} grid "
                         f"points of a fixed-step solve; use at most num_steps.")
    if not fixed:
        for name, tol in (("atol", atol), ("rtol", rtol)):
            if isinstance(tol, (int, float)) and tol < 0:
                raise ValueError(f"{name} must be >= 0, got {tol}.")
        if isinstance(atol, (int, float)) and isinstance(rtol, (int, float)) and atol == rtol == 0:
            raise ValueError("atol and rtol cannot both be 0.")


# ----------------------------------------------------------------------------- helpers


def _time_dtype(x0) -> jnp.dtype:
    # The original uses x's dtype; low-precision states still get a float32 clock.
    return jnp.result_type(*[jnp.result_type(leaf) for leaf in jax.tree.leaves(x0)], jnp.float32)


def _promote(x0, dtype):
    # diffrax promotes the state to the time dtype; do it up front (tests/test_sampling.py's
    # Euler reference does the same) so that both paths see the same dtypes.
    return jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.result_type(leaf, dtype)), x0)


def time_grid(num_steps: int, *, reverse: bool = False, dtype=jnp.float32) -> jax.Array:
    """The original's grid ``linspace(0, 1, num_steps)`` (``1 - it`` when reversed)."""
    ts = jnp.linspace(0.0, 1.0, num_steps, dtype=dtype)
    return 1 - ts if reverse else ts


def fixed_step_nfe(method: str, num_steps: int) -> int:
    """Velocity evaluations of a fixed-step solve on ``num_steps`` grid points."""
    if method not in FIXED_STAGES:
        raise ValueError(f"{method!r} is not a fixed-step method; choose one of {FIXED_METHODS}.")
    return FIXED_STAGES[method] * (num_steps - 1)


def _intermediate_indices(num_steps: int, k: int) -> np.ndarray:
    """The ``k`` grid points nearest to ``k`` evenly spaced times (distinct when k <= num_steps)."""
    return np.floor(np.linspace(0, num_steps - 1, k) + 0.5).astype(np.int32)


def _initial_step_size(term: diffrax.ODETerm, t0, x0, f0, args, *, direction, rtol, atol,
                       max_dt):
    """Hairer et al. (II.4) / torchdiffeq's ``_select_initial_step``: one evaluation beyond f0."""
    dtype = jnp.result_type(t0)
    scale = jax.tree.map(lambda x: atol + jnp.abs(x) * rtol, x0)
    d0 = optx.rms_norm(jax.tree.map(jnp.divide, x0, scale)).astype(dtype)
    d1 = optx.rms_norm(jax.tree.map(jnp.divide, f0, scale)).astype(dtype)
    tiny = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(tiny, 1e-6, 0.01 * d0 / jnp.where(tiny, 1.0, d1))
    h0 = jnp.minimum(h0, max_dt).astype(dtype)  # never probe the velocity outside [0, 1]
    x1 = jax.tree.map(lambda x, f: x + (direction * h0) * f, x0, f0)
    f1 = term.vf(t0 + direction * h0, x1, args)
    d2 = optx.rms_norm(jax.tree.map(lambda a, b, s: (a - b) / s, f1, f0, scale)) / h0
    max_d = jnp.maximum(d1, d2)
    h1 = jnp.where(max_d <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                   (0.01 / jnp.where(max_d <= 1e-15, 1.0, max_d)) ** (1.0 / (_ADAPTIVE_ORDER + 1)))
    h = jnp.minimum(jnp.minimum(100 * h0, h1), max_dt)
    # A NaN/Inf velocity must not poison the step size; the solve then fails visibly.
    return jnp.where(jnp.isfinite(h) & (h > 0), h, 0.01 * max_dt).astype(dtype)


def _all_finite(x) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(x)]))


# ----------------------------------------------------------------------------- sampler


def solve_flow(velocity_fn: VelocityFn, x0, args, *, method: str = "euler", num_steps: int = 40,
               atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL,
               max_steps: int = DEFAULT_MAX_STEPS, num_intermediates: int = 0,
               reverse: bool = False) -> SampleResult:
    """Integrates ``dx/dt = velocity_fn(t, x, args)`` from t=0 to 1 (1 to 0 if ``reverse``).

    Pure and jittable; ``method``, ``num_steps``, ``max_steps``, ``num_intermediates`` and
    ``reverse`` must be static, ``atol``/``rtol`` may be traced. ``num_steps`` (grid points,
    so ``num_steps - 1`` intervals) only matters to fixed-step methods, ``atol``, ``rtol`` and
    ``max_steps`` only to adaptive ones. Never raises on a failed solve: see
    ``SampleResult.success`` and ``raise_if_failed``.
    """
    _validate(method, num_steps, max_steps, num_intermediates, atol, rtol)
    tdtype = _time_dtype(x0)
    x0 = _promote(x0, tdtype)
    term = diffrax.ODETerm(velocity_fn)
    solver = _SOLVERS[method]()
    t_start = jnp.asarray(1.0 if reverse else 0.0, tdtype)
    t_end = jnp.asarray(0.0 if reverse else 1.0, tdtype)
    k = num_intermediates

    if method in FIXED_METHODS:
        ts = time_grid(num_steps, reverse=reverse, dtype=tdtype)
        # Grid states are saved after each step (exact, no interpolation), then subsampled.
        saveat = diffrax.SaveAt(t0=True, steps=True) if k else diffrax.SaveAt(t1=True)
        sol = diffrax.diffeqsolve(
            term, solver, t0=ts[0], t1=ts[-1], dt0=None, y0=x0, args=args,
            stepsize_controller=diffrax.StepTo(ts), saveat=saveat,
            max_steps=num_steps - 1, throw=False)
        n_steps = sol.stats["num_steps"]
        nfe = FIXED_STAGES[method] * n_steps
        if k:
            idx = _intermediate_indices(num_steps, k)
            intermediates = jax.tree.map(lambda ys: ys[idx], sol.ys)  # [K, ...]
            intermediate_ts = ts[idx]
        else:
            intermediates, intermediate_ts = None, None
        x = jax.tree.map(lambda ys: ys[-1], sol.ys)
        grid = ts
    else:
        atol_ = jnp.asarray(atol, tdtype)
        rtol_ = jnp.asarray(rtol, tdtype)
        direction = -1 if reverse else 1
        f0 = term.vf(t_start, x0, args)  # evaluation 1
        dt0 = _initial_step_size(term, t_start, x0, f0, args, direction=direction,  # evaluation 2
                                 rtol=rtol_, atol=atol_, max_dt=jnp.abs(t_end - t_start))
        # FSAL solver state (first_step, f(t0, y0)): the first stage of every step is
        # then reused, never re-evaluated (see module docstring).
        solver_state = (jnp.asarray(False), f0)
        if k:
            intermediate_ts = time_grid(k, reverse=reverse, dtype=tdtype)
            saveat = diffrax.SaveAt(t0=True, ts=intermediate_ts[1:-1], t1=True)  # [K, ...]
        else:
            intermediate_ts = None
            saveat = diffrax.SaveAt(t1=True)
        sol = diffrax.diffeqsolve(
            term, solver, t0=t_start, t1=t_end, dt0=direction * dt0, y0=x0, args=args,
            stepsize_controller=diffrax.PIDController(rtol=rtol_, atol=atol_),
            saveat=saveat, max_steps=max_steps, solver_state=solver_state, throw=False)
        n_steps = sol.stats["num_steps"]
        nfe = _INITIAL_STEP_NFE + _ADAPTIVE_NEW_EVALS_PER_STEP * n_steps
        intermediates = sol.ys if k else None
        x = jax.tree.map(lambda ys: ys[-1], sol.ys)
        grid = jnp.stack([t_start, t_end])

    solver_ok = sol.result == diffrax.RESULTS.successful
    status = jnp.where(
        solver_ok,
        jnp.where(_all_finite(x), STATUS_OK, STATUS_NONFINITE),
        jnp.where(sol.result == diffrax.RESULTS.max_steps_reached, STATUS_MAX_STEPS,
                  STATUS_SOLVER_FAILED)).astype(jnp.int32)
    return SampleResult(
        x=x, nfe=jnp.asarray(nfe, jnp.int32), intermediates=intermediates,
        intermediate_ts=intermediate_ts, ts=grid, success=status == STATUS_OK, status=status,
        num_solver_steps=jnp.asarray(n_steps, jnp.int32),
        num_rejected_steps=jnp.asarray(sol.stats["num_rejected_steps"], jnp.int32))


def example_keys(key: jax.Array, indices, stream: int | None = None) -> jax.Array:
    """The key of each example: ``fold_in(key, i)`` for ``i`` in ``indices`` (then
    ``fold_in(., stream)`` for a separate stream of the same example). How evaluation, the
    upsampling CLI and validation give example ``i`` its noise whatever the batch it is in."""
    def one(i):
        k = jax.random.fold_in(key, i)
        return k if stream is None else jax.random.fold_in(k, stream)
    return jax.vmap(one)(jnp.asarray(indices))


def raise_if_failed(result: SampleResult, *, what: str = "ODE sampling", remedy: str = "") -> SampleResult:
    """Raises a RuntimeError naming the cause (and the knob to turn) if any solve failed.

    Call it outside ``jit`` on a (possibly batched, vmapped or gathered) ``SampleResult``, or
    on any object with its ``status``, ``nfe`` and ``num_solver_steps``; returns it unchanged
    when every solve succeeded. ``what`` names the sampling in the message (``"The sampler
    euler:41"``, ``"Stage runs/cfm"``), ``remedy`` is appended: how the user changes the
    solver where they run it (a flag, a config key).
    """
    status = np.asarray(jax.device_get(result.status))
    if np.all(status == STATUS_OK):
        return result
    nfe = int(np.max(np.asarray(result.nfe)))
    steps = int(np.max(np.asarray(result.num_solver_steps)))
    # adaptive solvers share their steps over a batch: one status for all of it
    where = f"{what} failed" + (f" for {int(np.sum(status != STATUS_OK))} of {status.size} inputs" if status.size > 1
                                else "") + ": "
    if np.any(status == STATUS_MAX_STEPS):
        cause = (f"the adaptive solver used all its max_steps ({steps} steps, {nfe} velocity evaluations) "
                 "before reaching the end time. Raise max_steps, loosen rtol/atol, or use a fixed-step method.")
    elif np.any(status == STATUS_SOLVER_FAILED):
        cause = (f"diffrax reported a solver failure after {steps} steps ({nfe} velocity evaluations), "
                 "e.g. the step size collapsed. Check the velocity function for non-smooth or non-finite "
                 "outputs, or loosen rtol/atol.")
    else:
        cause = (f"the final state holds non-finite values (NaN/Inf) after {steps} steps ({nfe} velocity "
                 "evaluations). Check the network and its inputs, or use more steps / a tighter tolerance.")
    raise RuntimeError(where + cause + (f" {remedy}" if remedy else ""))


__all__ = [
    "ADAPTIVE_METHODS", "DEFAULT_ATOL", "DEFAULT_MAX_STEPS", "DEFAULT_RTOL", "FIXED_METHODS",
    "FIXED_STAGES", "METHODS", "RK4_38_TABLEAU", "RK4ThreeEighths", "STATUS_MAX_STEPS",
    "STATUS_NONFINITE", "STATUS_OK", "STATUS_SOLVER_FAILED", "SampleResult",
    "example_keys", "fixed_step_nfe", "raise_if_failed", "solve_flow",
    "time_grid",
]
