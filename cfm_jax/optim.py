"""Optimizer and learning-rate schedules (optax).

The original uses ``torch.optim.Adam(lr, weight_decay)`` (L2 weight decay added to
the gradient, *not* decoupled) with a constant schedule after a linear warm-up.
Its Lightning module steps the LambdaLR scheduler inside ``training_step``, i.e.
before that step's optimizer update, so optimizer update ``k`` (0-based) runs at
``lr * min((k + 1) / warmup_steps, 1)``: the first update already uses
``lr / warmup_steps`` and the full rate is reached at update ``warmup_steps - 1``.
Our schedules take optax's update count ``k`` and reproduce that.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(cfg) -> optax.Schedule:
    """``cfg``: ``lr``, ``schedule`` ('constant' | 'cosine'), ``warmup_steps``, ``total_steps``
    (cosine only), ``min_lr_ratio`` (cosine floor as a fraction of ``lr``), ``num_cycles`` (cosine
    waves over the decay, the original's ``get_cosine_schedule_with_warmup``; 0.5 = one half-cosine).

    Past ``total_steps`` the cosine holds its end value; the original's keeps following the
    cosine (for ``num_cycles=0.5`` it rises again), see docs/differences.md."""
    lr, warmup = float(cfg.lr), int(cfg.warmup_steps)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"optim.schedule={cfg.schedule!r} is unknown; choose one of {SCHEDULES}.")
    if warmup < 0:
        raise ValueError(f"optim.warmup_steps must be >= 0, got {warmup}.")
    total = int(cfg.total_steps)
    if cfg.schedule == "cosine" and total <= warmup:
        raise ValueError(f"optim.schedule='cosine' needs optim.total_steps ({total}) > "
                         f"optim.warmup_steps ({warmup}).")
    floor = float(cfg.min_lr_ratio)
    cycles = float(cfg.num_cycles)
    if cycles <= 0:
        raise ValueError(f"optim.num_cycles must be > 0, got {cycles}.")

    def schedule(count):
        k = jnp.asarray(count, jnp.float32)
        warm = jnp.minimum((k + 1.0) / max(warmup, 1), 1.0) if warmup > 0 else 1.0
        if cfg.schedule == "constant":
            return lr * warm
        progress = jnp.clip((k + 1.0 - warmup) / (total - warmup), 0.0, 1.0)
        cosine = floor + (1.0 - floor) * 0.5 * (1.0 + jnp.cos(2.0 * math.pi * cycles * progress))
        return lr * jnp.where(k + 1.0 < warmup, warm, cosine)

    return schedule


def make_optimizer(cfg) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The optax chain for ``cfg`` (config section ``optim``) and its LR schedule.

    ``adam`` adds ``weight_decay * param`` to the gradient like ``torch.optim.Adam``;
    ``adamw`` decouples it. Optional global-norm clipping comes first.
    """
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name!r} is unknown; choose one of {OPTIMIZERS}.")
    schedule = learning_rate_schedule(cfg)
    parts = []
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(float(cfg.grad_clip_norm)))
    if cfg.name == "adam":
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(float(cfg.weight_decay)))
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
    else:
        parts.append(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
        if cfg.weight_decay:
            parts.append(optax.add_decayed_weights(float(cfg.weight_decay)))
    parts.append(optax.scale_by_learning_rate(schedule))
    return optax.chain(*parts), schedule
