"""Kappa schedulers of the factorised mixture path (``docs/maths.md``, "Discrete chains").

Each coordinate of ``x_t`` equals the data token ``x1_i`` with probability ``kappa(t)`` and
the source token ``x0_i`` otherwise; ``kappa(0) = 0`` (pure source), ``kappa(1) = 1`` (data).
The base chain jumps at rate ``d_kappa(t) / (1 - kappa(t))`` towards a draw of the posterior.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from diffusiongym.utils.validation import unknown_name_error

__all__ = [
    "KappaScheduler",
    "LinearKappa",
    "PolynomialKappa",
    "CosineKappa",
    "make_kappa_scheduler",
    "KAPPA_SCHEDULERS",
]


class KappaScheduler(ABC):
    """``kappa(t)`` increasing from 0 at ``t = 0`` to 1 at ``t = 1``; ``t`` is a tensor of any shape."""

    name: str = "kappa"

    @abstractmethod
    def kappa(self, t: Tensor) -> Tensor:
        """``kappa(t)``, same shape as ``t``."""

    @abstractmethod
    def d_kappa(self, t: Tensor) -> Tensor:
        """``d kappa / dt``, same shape as ``t``."""

    def jump_rate(self, t: Tensor) -> Tensor:
        """Total base jump intensity ``d_kappa / (1 - kappa)`` (infinite at ``t = 1``)."""
        return self.d_kappa(t) / (1 - self.kappa(t))

    def config(self) -> dict:
        return {"name": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LinearKappa(KappaScheduler):
    """``kappa = t`` (the default); the jump rate is ``1 / (1 - t)``."""

    name = "linear"

    def kappa(self, t: Tensor) -> Tensor:
        return t

    def d_kappa(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)


class PolynomialKappa(KappaScheduler):
    """``kappa = t ** power`` (``power > 0``)."""

    name = "polynomial"

    def __init__(self, power: float = 2.0):
        if not power > 0:
            raise ValueError(f"power: expected a positive number, got {power!r}")
        self.power = float(power)

    def kappa(self, t: Tensor) -> Tensor:
        return t.clamp(min=0) ** self.power

    def d_kappa(self, t: Tensor) -> Tensor:
        return self.power * t.clamp(min=0) ** (self.power - 1)

    def config(self) -> dict:
        return {"name": self.name, "power": self.power}

    def __repr__(self) -> str:
        return f"PolynomialKappa(power={self.power})"


class CosineKappa(KappaScheduler):
    """``kappa = sin^2(pi t / 2)``."""

    name = "cosine"

    def kappa(self, t: Tensor) -> Tensor:
        return torch.sin(0.5 * math.pi * t) ** 2

    def d_kappa(self, t: Tensor) -> Tensor:
        return 0.5 * math.pi * torch.sin(math.pi * t)


KAPPA_SCHEDULERS = {"linear": LinearKappa, "polynomial": PolynomialKappa, "cosine": CosineKappa}


def make_kappa_scheduler(spec: str | dict | KappaScheduler = "linear") -> KappaScheduler:
    """Build a scheduler from a name, a config dict ``{"name": ..., **kwargs}`` or an instance."""
    if isinstance(spec, KappaScheduler):
        return spec
    if isinstance(spec, dict):
        kwargs = dict(spec)
        name = kwargs.pop("name", "linear")
    elif isinstance(spec, str):
        name, kwargs = spec, {}
    else:
        raise TypeError(f"scheduler: expected a name, a config dict or a KappaScheduler, got {type(spec).__name__}")
    if name not in KAPPA_SCHEDULERS:
        raise unknown_name_error("scheduler", name, KAPPA_SCHEDULERS)
    return KAPPA_SCHEDULERS[name](**kwargs)
