"""Flow matching math: probability paths, target velocities and the training loss.

Pure, keyword-only functions over arrays; nothing here knows about the network.
Conventions follow the original (fmboost/flow.py):

* ``t`` runs from 0 (source ``x0``, e.g. the up-sampled low-res latent) to 1
  (target ``x1``, the high-res latent).
* ``x_t = alpha_t * x1 + sigma_t * x0`` (+ ``sigma_min * noise`` when
  ``sigma_min > 0``), ``u_t = alpha'_t * x1 + sigma'_t * x0``.
* ``linear``: alpha_t = t, sigma_t = 1 - t, so u_t = x1 - x0.
  ``gvp``: alpha_t = sin(pi t / 2), sigma_t = cos(pi t / 2) (no ``sigma_min``).
* The loss is the mean squared error over all elements; we return it per example
  (mean over the non-batch axes) so that callers can weight or mask examples.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

SCHEDULES = ("linear", "gvp")


class PathCoefficients(NamedTuple):
    alpha: jax.Array  # coefficient of x1
    sigma: jax.Array  # coefficient of x0
    d_alpha: jax.Array  # d alpha / dt
    d_sigma: jax.Array  # d sigma / dt


def check_schedule(schedule: str, sigma_min: float = 0.0, t_exponent: float = 1.0) -> None:
    """Raises a clear ValueError for an unknown schedule or an invalid combination."""
    if not t_exponent > 0:
        raise ValueError(f"flow.t_exponent must be > 0 (1.0: uniform training times, the original's), "
                         f"got {t_exponent}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown flow schedule {schedule!r}; choose one of {SCHEDULES}.")
    if sigma_min < 0:
        raise ValueError(f"sigma_min must be >= 0, got {sigma_min}.")
    if schedule == "gvp" and sigma_min != 0.0:
        raise ValueError("The 'gvp' schedule does not support sigma_min > 0 (as in the original); "
                         "set flow.sigma_min=0.0 or use flow.schedule='linear'.")


def path_coefficients(t: jax.Array, *, schedule: str = "linear") -> PathCoefficients:
    """alpha_t, sigma_t and their time derivatives for ``t`` of any shape."""
    t = jnp.asarray(t)
    if schedule == "linear":
        one = jnp.ones_like(t)
        return PathCoefficients(alpha=t, sigma=1.0 - t, d_alpha=one, d_sigma=-one)
    if schedule == "gvp":
        half_pi = 0.5 * math.pi
        return PathCoefficients(
            alpha=jnp.sin(half_pi * t),
            sigma=jnp.cos(half_pi * t),
            d_alpha=half_pi * jnp.cos(half_pi * t),
            d_sigma=-half_pi * jnp.sin(half_pi * t),
        )
    raise ValueError(f"Unknown flow schedule {schedule!r}; choose one of {SCHEDULES}.")


def _per_example(t: jax.Array, x: jax.Array) -> jax.Array:
    """Reshapes a per-example ``t`` [B] to broadcast against ``x`` [B, ...]."""
    t = jnp.asarray(t, dtype=x.dtype)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def x_t(*, x0: jax.Array, x1: jax.Array, t: jax.Array, schedule: str = "linear",
        sigma_min: float = 0.0, noise: jax.Array | None = None) -> jax.Array:
    """A point on the path between ``x0`` and ``x1`` at time ``t`` ([B] or scalar)."""
    c = path_coefficients(_per_example(t, x0), schedule=schedule)
    xt = c.alpha * x1 + c.sigma * x0
    if sigma_min > 0:
        if noise is None:
            raise ValueError("x_t with sigma_min > 0 needs `noise` (standard normal, shaped like x0).")
        xt = xt + sigma_min * noise
    return xt


def u_t(*, x0: jax.Array, x1: jax.Array, t: jax.Array, schedule: str = "linear") -> jax.Array:
    """The conditional target velocity d x_t / dt."""
    c = path_coefficients(_per_example(t, x0), schedule=schedule)
    return c.d_alpha * x1 + c.d_sigma * x0


def sample_t(rng: jax.Array, batch_size: int, dtype=jnp.float32, t_exponent: float = 1.0) -> jax.Array:
    """Training times, one per example: ``t = u ** t_exponent`` with ``u ~ U(0, 1)``.

    ``t_exponent=1`` is the original's ``t ~ U(0, 1)``. A larger exponent puts more of the
    training at small t, near the source; the sampler's first velocity evaluation is at t=0,
    and for a noise-free source that first step does most of the work (an option, not the
    original's training: docs/quickstart.md).
    """
    u = jax.random.uniform(rng, (batch_size,), dtype=dtype)
    return u if t_exponent == 1.0 else u ** t_exponent


def per_example_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over all non-batch axes, computed in float32: [B]."""
    diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def velocity_loss(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], *, x0: jax.Array,
                  x1: jax.Array, rng: jax.Array, schedule: str = "linear",
                  sigma_min: float = 0.0, t_exponent: float = 1.0) -> jax.Array:
    """The per-example flow matching loss ``|v(x_t, t) - u_t|^2`` with ``t ~ U(0,1)``
    (``t = u ** t_exponent``: ``sample_t``).

    ``velocity_fn(x_t, t)`` evaluates the network ([B,...], [B] -> [B,...]). Returns [B].
    """
    t_rng, noise_rng = jax.random.split(rng)
    t = sample_t(t_rng, x1.shape[0], dtype=x1.dtype, t_exponent=t_exponent)
    noise = jax.random.normal(noise_rng, x0.shape, x0.dtype) if sigma_min > 0 else None
    xt = x_t(x0=x0, x1=x1, t=t, schedule=schedule, sigma_min=sigma_min, noise=noise)
    ut = u_t(x0=x0, x1=x1, t=t, schedule=schedule)
    return per_example_mse(velocity_fn(xt, t), ut)
