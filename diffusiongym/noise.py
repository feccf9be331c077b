"""Diffusion coefficients ``sigma(t)`` of the SDE ``dX = b dt + sigma dB``.

Every SDE in the family ``b = v + (sigma^2 / 2) score`` has the base model's
marginals; ``sigma`` only decides how much randomness is injected (and so what the
KL of a control costs: ``1/2 int |u|^2 dt`` is measured against the *same* sigma).

- :class:`ODE`: ``sigma = 0``, the probability-flow ODE. No KL is defined.
- :class:`Memoryless`: ``sigma^2 = 2 eta = 2 beta (alpha_dot beta / alpha - beta_dot)``
  (times ``scale^2`` for a scaled memoryless schedule). With ``scale = 1``, ``X0`` and
  ``X1`` are independent, which is what the reward-tilt oracle and adjoint matching
  need.
- :class:`Constant`: ``sigma = c``.
- :class:`CallableNoise`: any ``t -> sigma(t)``.
"""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.schedulers import Scheduler
from diffusiongym.utils.validation import check_real, unknown_name_error

__all__ = ["Noise", "ODE", "Memoryless", "Constant", "CallableNoise", "make_noise", "NOISES"]


class Noise(ABC):
    """A diffusion coefficient ``sigma(t)`` (may depend on the scheduler)."""

    name: str = "noise"

    @abstractmethod
    def sigma(self, t: Tensor, scheduler: Scheduler) -> Tensor:
        """``sigma(t)``, same shape as ``t``."""

    @property
    def is_deterministic(self) -> bool:
        """True for the ODE (sigma identically zero): no KL is defined then."""
        return False

    def __call__(self, t: Tensor, scheduler: Scheduler) -> Tensor:
        return self.sigma(t, scheduler)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class ODE(Noise):
    """``sigma = 0``: the probability-flow ODE."""

    name = "ode"

    def sigma(self, t: Tensor, scheduler: Scheduler) -> Tensor:
        return torch.zeros_like(t)

    @property
    def is_deterministic(self) -> bool:
        return True

    def __repr__(self) -> str:
        return "ODE()"


class Memoryless(Noise):
    """``sigma = scale * sqrt(2 eta)``; ``scale = 1`` is the memoryless schedule."""

    name = "memoryless"

    def __init__(self, scale: float = 1.0):
        self.scale = check_real("scale", scale, positive=True)

    def sigma(self, t: Tensor, scheduler: Scheduler) -> Tensor:
        return self.scale * torch.sqrt(2.0 * scheduler.eta(t).clamp(min=0.0))

    @property
    def is_memoryless(self) -> bool:
        return self.scale == 1.0

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "scale": self.scale}

    def __repr__(self) -> str:
        return f"Memoryless(scale={self.scale})"


class Constant(Noise):
    """``sigma = value`` at every time."""

    name = "constant"

    def __init__(self, value: float):
        value = check_real("value", value)
        if value <= 0:
            raise ValueError(f"value: expected a positive number (use 'ode' for zero), got {value!r}")
        self.value = value

    def sigma(self, t: Tensor, scheduler: Scheduler) -> Tensor:
        return torch.full_like(t, self.value)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value}

    def __repr__(self) -> str:
        return f"Constant({self.value})"


class CallableNoise(Noise):
    """Wrap a user function ``fn(t) -> sigma`` (tensor in, tensor out, ``sigma >= 0``)."""

    name = "callable"

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable t -> sigma(t), got {type(fn).__name__}")
        self.fn = fn

    def sigma(self, t: Tensor, scheduler: Scheduler) -> Tensor:
        out = torch.as_tensor(self.fn(t), dtype=t.dtype, device=t.device)
        return out.expand_as(t) if out.shape != t.shape else out

    def __repr__(self) -> str:
        return f"CallableNoise({self.fn!r})"


NOISES = ("ode", "memoryless", "constant", "callable")


def make_noise(noise: str | float | Noise | Callable[[Tensor], Tensor]) -> Noise:
    """Build a :class:`Noise` from ``"ode"``, ``"memoryless"``, a positive float
    (constant sigma; ``0`` means the ODE), a callable ``t -> sigma`` or an instance."""
    if isinstance(noise, Noise):
        return noise
    if isinstance(noise, str):
        if noise == "ode":
            return ODE()
        if noise == "memoryless":
            return Memoryless()

        raise unknown_name_error("noise", noise, ["ode", "memoryless"])
    if isinstance(noise, numbers.Real) and not isinstance(noise, bool) and type(noise).__name__ != "bool_":
        value = check_real("noise", noise, nonnegative=True)
        return ODE() if value == 0 else Constant(value)
    if callable(noise):
        return CallableNoise(noise)
    raise TypeError(f"noise: expected 'ode', 'memoryless', a float, a callable or a Noise, got {type(noise).__name__}")
