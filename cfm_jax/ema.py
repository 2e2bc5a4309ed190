"""Exponential moving average of the parameters, with the original's exact semantics.

The original wraps the flow model in ``ema-pytorch``'s ``EMA`` (beta 0.999,
power 3/4, inv_gamma 1, min_value 0, update_every 1, update_after_step 1000).
At each update with counter ``step`` (the number of earlier updates):

* ``step % update_every != 0``: nothing happens;
* ``step <= update_after_step``: the EMA is a copy of the online weights, and so is
  the first update after that (ema-pytorch's ``initted`` flag);
* otherwise ``decay = clamp(1 - (1 + e / inv_gamma) ** -power, min_value, beta)``
  with ``e = step - update_after_step`` (``decay = 0`` when ``e <= 0``) and
  ``ema <- ema + (1 - decay) * (online - ema)``.

  ema-pytorch's ``get_current_decay()`` reads ``self.step - update_after_step - 1``, but
  ``update()`` has already incremented ``self.step`` when it calls it, so in terms of the
  counter *before* the update the ``- 1`` cancels. (An earlier version of this module kept
  the ``- 1``, one update behind the original; tests/test_ema.py now checks values recorded
  by running the original's ``fmboost/ema.py``.)

A timing detail that parity depends on: the original calls ``ema.update()``
inside Lightning's ``training_step``, i.e. *before* that step's optimizer update,
so the EMA after ``n`` optimizer steps averages the weights *before* each of them
(theta_0 ... theta_{n-1}). :func:`cfm_jax.trainer.train_step` does the same: it
updates the EMA from the pre-update parameters with ``step`` = optimizer steps done.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    beta: float = 0.999
    power: float = 0.75
    inv_gamma: float = 1.0
    min_value: float = 0.0
    update_every: int = 1
    update_after_step: int = 1000

    def __post_init__(self):
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"ema.beta must be in [0, 1], got {self.beta}.")
        if self.update_every < 1:
            raise ValueError(f"ema.update_every must be >= 1, got {self.update_every}.")

    @classmethod
    def from_config(cls, cfg) -> "EMAConfig":
        return cls(beta=cfg.beta, power=cfg.power, inv_gamma=cfg.inv_gamma, min_value=cfg.min_value,
                   update_every=cfg.update_every, update_after_step=cfg.update_after_step)


def ema_decay(step: jax.Array, cfg: EMAConfig) -> jax.Array:
    """The decay used by the update with counter ``step`` once past ``update_after_step``."""
    e = jnp.maximum(jnp.asarray(step, jnp.float32) - cfg.update_after_step, 0.0)
    value = jnp.clip(1.0 - (1.0 + e / cfg.inv_gamma) ** -cfg.power, cfg.min_value, cfg.beta)
    return jnp.where(e <= 0, 0.0, value)


def ema_update(ema_params, params, step: jax.Array, cfg: EMAConfig):
    """One EMA update with counter ``step`` (see module docstring); returns the new EMA tree.

    Copy, skip and lerp are all the same expression ``ema + w * (online - ema)`` with
    ``w = 1`` (copy), ``0`` (skip) or ``1 - decay``, so the function is jit-friendly.
    """
    step = jnp.asarray(step)
    active = (step % cfg.update_every) == 0
    # ema-pytorch copies during warm-up and once more at its first update past it
    # (the `initted` flag); that update is the first multiple of update_every > update_after_step.
    first_after = (cfg.update_after_step // cfg.update_every + 1) * cfg.update_every
    copy = step <= first_after
    weight = jnp.where(active, jnp.where(copy, 1.0, 1.0 - ema_decay(step, cfg)), 0.0)
    if cfg.beta == 1.0:  # a frozen EMA ("is_frozen") still copies during warm-up
        weight = jnp.where(active & copy, 1.0, 0.0)

    def lerp(e, p):
        # torch.lerp's formula (exact at both ends): e + w d for w < 0.5, else p - (1 - w) d
        w = weight.astype(jnp.float32)
        e32, p32 = e.astype(jnp.float32), p.astype(jnp.float32)
        d = p32 - e32
        out = jnp.where(jnp.abs(w) < 0.5, e32 + w * d, p32 - d * (1.0 - w))
        return out.astype(e.dtype)

    return jax.tree.map(lerp, ema_params, params)
