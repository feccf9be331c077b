"""Interpolation schedules ``x_t = alpha_t x1 + beta_t x0``.

Conventions (``docs/maths.md``, "Paths and parameterisations"): ``t = 0`` is noise, ``t = 1`` is data,
``alpha_0 = beta_1 = 0`` and ``alpha_1 = beta_0 = 1``. ``beta`` is never assumed to
be ``1 - alpha``.

Every scheduler maps a time tensor ``t`` (any shape, float) to tensors of the same
shape. Derived quantities used by the SDE:

- ``kappa_t = d_alpha_t / alpha_t``
- ``eta_t = beta_t (kappa_t beta_t - d_beta_t)``  (so that ``v = kappa x + eta score``)
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor
from diffusiongym.utils.validation import (
    ArgumentTypeError,
    as_float64_vector,
    check_int,
    check_real,
    unknown_name_error,
)

__all__ = ["Scheduler", "LinearScheduler", "CosineScheduler", "DiscreteVPScheduler", "make_scheduler", "SCHEDULERS"]


def _as_tensor(t: Tensor | float) -> Tensor:
    if isinstance(t, Tensor):
        if t.dtype == torch.bool or t.is_complex():
            raise ArgumentTypeError(f"t: expected a real time tensor, got {t.dtype}")
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    if isinstance(t, bool) or not isinstance(t, numbers.Real):
        raise ArgumentTypeError(f"t: expected a tensor or a real number, got {type(t).__name__}")
    return torch.tensor(float(t), dtype=torch.float64)


class Scheduler(ABC):
    """Base class: ``alpha``, ``beta`` and their exact time derivatives."""

    name: str = "scheduler"

    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor:
        """Signal coefficient ``alpha_t``."""

    @abstractmethod
    def beta(self, t: Tensor) -> Tensor:
        """Noise coefficient ``beta_t``."""

    @abstractmethod
    def d_alpha(self, t: Tensor) -> Tensor:
        """Exact time derivative of ``alpha_t``."""

    @abstractmethod
    def d_beta(self, t: Tensor) -> Tensor:
        """Exact time derivative of ``beta_t``."""

    def __call__(self, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Return ``(alpha, beta, d_alpha, d_beta)`` at ``t``."""
        t = _as_tensor(t)
        return self.alpha(t), self.beta(t), self.d_alpha(t), self.d_beta(t)

    def kappa(self, t: Tensor | float) -> Tensor:
        """``d_alpha / alpha`` (singular where ``alpha = 0``)."""
        t = _as_tensor(t)
        return self.d_alpha(t) / self.alpha(t)

    def eta(self, t: Tensor | float) -> Tensor:
        """``beta (kappa beta - d_beta)``; memoryless noise has ``sigma^2 = 2 eta``."""
        t = _as_tensor(t)
        beta = self.beta(t)
        return beta * (self.kappa(t) * beta - self.d_beta(t))

    def config(self) -> dict[str, Any]:
        """Plain-data description (diffusers style), enough to rebuild the scheduler."""
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearScheduler(Scheduler):
    """Linear / optimal-transport path: ``alpha = t``, ``beta = 1 - t``."""

    name = "linear"

    def alpha(self, t: Tensor) -> Tensor:
        return t.clone()

    def beta(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def d_alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def d_beta(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)


class CosineScheduler(Scheduler):
    """Trigonometric path: ``alpha = sin(pi t / 2)``, ``beta = cos(pi t / 2)``."""

    name = "cosine"

    def alpha(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t)

    def beta(self, t: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * t)

    def d_alpha(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.cos(0.5 * math.pi * t)

    def d_beta(self, t: Tensor) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


class DiscreteVPScheduler(Scheduler):
    """Variance-preserving schedule from a discrete DDPM ``alphas_cumprod`` table.

    diffusers indexes ``tau = 0 .. T-1`` with ``tau = T-1`` the noisiest. Here
    ``t = 1 - tau / (T - 1)``, ``alpha = sqrt(abar)``, ``beta = sqrt(1 - abar)``, with
    ``log abar`` interpolated piecewise-linearly in ``t`` (log-space is smooth), so the
    derivatives are exact derivatives of the interpolant (constant on each cell).
    Note that ``alpha`` at ``t = 0`` is ``sqrt(abar_{T-1}) > 0`` and ``beta`` at
    ``t = 1`` is ``sqrt(1 - abar_0) > 0``: a discrete table never reaches pure noise
    or clean data, exactly as in diffusers.

    Parameters
    ----------
    alphas_cumprod : Tensor, shape (T,)
        Cumulative products ``abar_tau``, decreasing in ``tau``.
    """

    name = "vp"

    def __init__(self, alphas_cumprod: Tensor | Any):
        abar = as_float64_vector("alphas_cumprod", alphas_cumprod, "entries")
        if not torch.all((abar > 0) & (abar < 1)):
            raise ValueError("alphas_cumprod: expected every entry in the open interval (0, 1)")
        if not torch.all(abar[1:] < abar[:-1]):
            raise ValueError("alphas_cumprod: expected strictly decreasing values (tau = T-1 noisiest)")
        self.alphas_cumprod = abar
        self.num_train_timesteps = abar.numel()
        # Table on an increasing t grid: t_j = j / (T-1) corresponds to tau = T-1-j.
        self._log_abar = torch.log(abar.flip(0))

    @classmethod
    def from_betas(cls, betas: Tensor | Any) -> DiscreteVPScheduler:
        """Build from DDPM per-step ``betas`` (``abar = cumprod(1 - betas)``)."""
        try:
            betas = torch.as_tensor(betas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ArgumentTypeError(
                f"betas: expected a 1-D tensor or sequence of numbers, got {type(betas).__name__}"
            ) from err
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas: expected a 1-D tensor with every entry in (0, 1)")
        return cls(torch.cumprod(1.0 - betas, 0))

    @classmethod
    def linear_ddpm(
        cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
    ) -> DiscreteVPScheduler:
        """The DDPM paper's linear ``betas`` (diffusers' default ``DDPMScheduler``);
        ``2 <= num_train_timesteps <= 100000``, ``0 < beta_start, beta_end < 1``."""
        num_train_timesteps = check_int("num_train_timesteps", num_train_timesteps, low=2, high=100_000)
        beta_start = check_real("beta_start", beta_start, positive=True, high=1.0)
        beta_end = check_real("beta_end", beta_end, positive=True, high=1.0)
        return cls.from_betas(torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64))

    def timestep(self, t: Tensor | float) -> Tensor:
        """Continuous diffusers timestep ``tau = (1 - t)(T - 1)`` for time ``t``."""
        return (1.0 - _as_tensor(t)) * (self.num_train_timesteps - 1)

    def _interp(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``log abar`` at ``t`` and its slope ``d log abar / dt``."""
        table = self._log_abar.to(device=t.device)
        n = self.num_train_timesteps - 1
        pos = t.to(torch.float64).clamp(0.0, 1.0) * n
        idx = pos.floor().long().clamp(max=n - 1)
        frac = pos - idx
        lo, hi = table[idx], table[idx + 1]
        slope = (hi - lo) * n
        return (lo + frac * (hi - lo)).to(t.dtype), slope.to(t.dtype)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(0.5 * self._interp(t)[0])

    def beta(self, t: Tensor) -> Tensor:
        return torch.sqrt(-torch.expm1(self._interp(t)[0]))

    def d_alpha(self, t: Tensor) -> Tensor:
        log_abar, slope = self._interp(t)
        return 0.5 * slope * torch.exp(0.5 * log_abar)

    def d_beta(self, t: Tensor) -> Tensor:
        log_abar, slope = self._interp(t)
        abar = torch.exp(log_abar)
        return -0.5 * slope * abar / torch.sqrt(-torch.expm1(log_abar))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "num_train_timesteps": self.num_train_timesteps}

    def __repr__(self) -> str:
        return f"DiscreteVPScheduler(T={self.num_train_timesteps})"


SCHEDULERS: dict[str, type[Scheduler]] = {"linear": LinearScheduler, "cosine": CosineScheduler}


def make_scheduler(scheduler: str | Scheduler) -> Scheduler:
    """Return a scheduler from a name (``"linear"``, ``"cosine"``, ``"vp"``) or pass one through.

    ``"vp"`` gives :meth:`DiscreteVPScheduler.linear_ddpm` (diffusers' default table).
    """
    if isinstance(scheduler, Scheduler):
        return scheduler
    if isinstance(scheduler, str):
        if scheduler == "vp":
            return DiscreteVPScheduler.linear_ddpm()
        if scheduler in SCHEDULERS:
            return SCHEDULERS[scheduler]()

        raise unknown_name_error("scheduler", scheduler, [*SCHEDULERS, "vp"])
    raise TypeError(f"scheduler: expected a name or a Scheduler, got {type(scheduler).__name__}")
