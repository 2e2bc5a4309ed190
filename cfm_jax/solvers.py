"""One description of "how to sample" shared by ``eval.py``, the upsampling CLI and the benches.

A :class:`SolverSpec` names either an ODE solver of :mod:`cfm_jax.sampling` (``euler``,
``heun``, ``midpoint``, ``ralston``, ``rk4``, ``tsit5``, ``dopri5``) or the original's SDE
sampler of :mod:`cfm_jax.sde` (``sde_euler`` = Euler-Maruyama, ``sde_heun``), with its
step count (grid points, as the original: 40 points = 39 Euler steps) or tolerances, and
the SDE's diffusion form and last step.

Short text form (command lines, sweeps), parsed by :meth:`SolverSpec.parse`:

* ``euler:40``, ``rk4:10``, ``sde_heun:100``: method and number of grid points;
* ``dopri5:1e-4``: adaptive method and relative tolerance (``atol`` stays at its default);
* ``euler``: method with the default number of points.

Several specs are separated by commas: ``euler:10,euler:20,euler:40,dopri5:1e-3``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from cfm_jax import sampling, sde

SDE_PREFIX = "sde_"
SDE_METHODS = tuple(SDE_PREFIX + m for m in sde.SDE_METHODS)
ALL_METHODS = sampling.METHODS + SDE_METHODS


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """A sampler and its settings (hashable: it is a static argument of jitted samplers)."""

    method: str = "euler"
    num_steps: int = 40
    atol: float = sampling.DEFAULT_ATOL
    rtol: float = sampling.DEFAULT_RTOL
    max_steps: int = sampling.DEFAULT_MAX_STEPS
    diffusion_form: str = sde.DEFAULT_DIFFUSION_FORM
    diffusion_norm: float = sde.DEFAULT_DIFFUSION_NORM
    last_step: str | None = sde.DEFAULT_LAST_STEP
    last_step_size: float = sde.DEFAULT_LAST_STEP_SIZE

    def __post_init__(self):
        if self.method not in ALL_METHODS:
            raise ValueError(f"Unknown sampler method {self.method!r}; choose one of {ALL_METHODS} "
                             f"(ODE fixed step: {sampling.FIXED_METHODS}; ODE adaptive: "
                             f"{sampling.ADAPTIVE_METHODS}; SDE: {SDE_METHODS}).")
        if not self.is_adaptive and (not isinstance(self.num_steps, int) or self.num_steps < 2):
            raise ValueError(f"num_steps counts grid points (num_steps - 1 steps) and must be an int >= 2, "
                             f"got {self.num_steps!r}.")
        if self.is_adaptive and not (self.rtol > 0 or self.atol > 0):
            raise ValueError(f"{self.method} needs rtol > 0 or atol > 0 (got rtol={self.rtol}, atol={self.atol}).")
        if self.is_sde:
            if self.diffusion_form not in sde.DIFFUSION_FORMS:
                raise ValueError(f"Unknown diffusion_form {self.diffusion_form!r}; choose one of "
                                 f"{sde.DIFFUSION_FORMS}.")
            if self.last_step not in sde.LAST_STEPS:
                raise ValueError(f"Unknown last_step {self.last_step!r}; choose one of {sde.LAST_STEPS}.")

    # --- properties ---------------------------------------------------------------------
    @property
    def is_sde(self) -> bool:
        return self.method.startswith(SDE_PREFIX)

    @property
    def is_adaptive(self) -> bool:
        return self.method in sampling.ADAPTIVE_METHODS

    @property
    def label(self) -> str:
        """Short name for tables and file names, e.g. ``euler-40``, ``dopri5-rtol1e-03``."""
        if self.is_adaptive:
            return f"{self.method}-rtol{self.rtol:.0e}"
        if self.is_sde:
            last = self.last_step or "none"
            return f"{self.method}-{self.num_steps}-{self.diffusion_form}-{last}"
        return f"{self.method}-{self.num_steps}"

    def expected_nfe(self) -> int | None:
        """Network evaluations, known in advance for fixed-step solvers (None if adaptive)."""
        if self.is_adaptive:
            return None
        if self.is_sde:
            return sde.sde_nfe(self.method[len(SDE_PREFIX):], self.num_steps, self.last_step)
        return sampling.fixed_step_nfe(self.method, self.num_steps)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.is_sde:
            for k in ("diffusion_form", "diffusion_norm", "last_step", "last_step_size"):
                d.pop(k)
        if not self.is_adaptive:
            for k in ("atol", "rtol", "max_steps"):
                d.pop(k)
        else:
            d.pop("num_steps")
        return d

    # --- construction -------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, **defaults: Any) -> "SolverSpec":
        """``'euler:40'`` / ``'dopri5:1e-4'`` / ``'sde_heun'`` (see the module docstring)."""
        text = text.strip()
        method, _, value = text.partition(":")
        kwargs = dict(defaults)
        kwargs["method"] = method.strip()
        if value:
            try:
                if kwargs["method"] in sampling.ADAPTIVE_METHODS:
                    kwargs["rtol"] = float(value)
                else:
                    kwargs["num_steps"] = int(value)
            except ValueError:
                what = "a relative tolerance" if kwargs["method"] in sampling.ADAPTIVE_METHODS else \
                    "an integer number of grid points"
                raise ValueError(f"Solver {text!r}: {value!r} is not {what} "
                                 "(examples: euler:40, rk4:10, dopri5:1e-4, sde_euler:100).") from None
        return cls(**kwargs)

    @classmethod
    def parse_list(cls, text: str, **defaults: Any) -> list["SolverSpec"]:
        specs = [cls.parse(part, **defaults) for part in text.split(",") if part.strip()]
        if not specs:
            raise ValueError(f"No solver in {text!r}; example: euler:10,euler:40,dopri5:1e-3.")
        return specs

    @classmethod
    def from_config(cls, sample_cfg, **overrides: Any) -> "SolverSpec":
        """From a run's ``config.sample`` section."""
        kwargs = dict(method=sample_cfg.method, num_steps=int(sample_cfg.num_steps), atol=float(sample_cfg.atol),
                      rtol=float(sample_cfg.rtol), max_steps=int(sample_cfg.max_steps),
                      **{k: sample_cfg[k] for k in ("diffusion_form", "diffusion_norm", "last_step", "last_step_size")})
        if isinstance(kwargs.get("last_step"), str) and kwargs["last_step"].lower() == "none":
            kwargs["last_step"] = None
        kwargs.update(overrides)
        return cls(**kwargs)

    # --- solving ------------------------------------------------------------------------
    def solve(self, velocity_fn, x0, args, key, *, schedule: str = "linear") -> sampling.SampleResult:
        """Integrates ``velocity_fn(t, x, args)`` from x0 at t=0 to t=1 (``key``: SDE noise,
        one key, or one key per example [B] so that each example's noise does not depend
        on the batch it is in)."""
        if self.is_sde:
            return sde.solve_sde(velocity_fn, x0, args, key, schedule=schedule,
                                 method=self.method[len(SDE_PREFIX):], num_steps=self.num_steps,
                                 diffusion_form=self.diffusion_form, diffusion_norm=self.diffusion_norm,
                                 last_step=self.last_step, last_step_size=self.last_step_size)
        return sampling.solve_flow(velocity_fn, x0, args, method=self.method, num_steps=self.num_steps,
                                   atol=self.atol, rtol=self.rtol, max_steps=self.max_steps)


__all__ = ["ALL_METHODS", "SDE_METHODS", "SolverSpec"]
