"""Analytic rewards on vectors: linear and quadratic (Gaussian bump).

Tilting a Gaussian mixture by ``exp(scale * r)`` with one of these gives a Gaussian mixture
again, which is what makes the reward-tilt oracle exact; the closed forms are registered in
:mod:`diffusiongym.oracle` (``docs/maths.md``, "The Gaussian-mixture oracle").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusiongym.rewards.base import Reward

__all__ = ["LinearReward", "QuadraticReward"]


def _vector(name: str, value: Any) -> Tensor:
    v = torch.as_tensor(value, dtype=torch.float64)
    if v.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D vector, got shape {tuple(v.shape)}")
    return v


def _check_x(x: Tensor, dim: int) -> None:
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"x: expected shape (n, {dim}), got {tuple(x.shape)}")


class LinearReward(Reward):
    """``r(x) = a . x`` for ``x`` of shape ``(n, d)``.

    Parameters
    ----------
    direction : array, shape (d,)
        ``a``.
    """

    differentiable = True

    def __init__(self, direction: Any):
        self.direction = _vector("direction", direction)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        _check_x(x, self.direction.numel())
        return x @ self.direction.to(x)

    def __repr__(self) -> str:
        return f"LinearReward(direction={self.direction.tolist()})"


class QuadraticReward(Reward):
    """Gaussian-bump reward ``r(x) = -1/2 (x - c)^T A (x - c)`` (``A`` positive semi-definite).

    Parameters
    ----------
    center : array, shape (d,)
    precision : float or array (d,) or (d, d)
        ``A``; a float means ``A = precision * I``, a vector a diagonal ``A``.
    """

    differentiable = True

    def __init__(self, center: Any, precision: Any = 1.0):
        self.center = _vector("center", center)
        d = self.center.numel()
        a = torch.as_tensor(precision, dtype=torch.float64)
        if a.ndim == 0:
            a = a * torch.eye(d, dtype=torch.float64)
        elif a.ndim == 1:
            a = torch.diag(a)
        if a.shape != (d, d):
            raise ValueError(f"precision: expected a float, shape ({d},) or ({d}, {d}), got {tuple(a.shape)}")
        if not torch.allclose(a, a.T) or torch.linalg.eigvalsh(a).min() < -1e-12:
            raise ValueError("precision: expected a symmetric positive semi-definite matrix")
        self.precision = a
        self.range = (float("-inf"), 0.0)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        _check_x(x, self.center.numel())
        diff = x - self.center.to(x)
        return -0.5 * ((diff @ self.precision.to(x)) * diff).sum(-1)

    def __repr__(self) -> str:
        return f"QuadraticReward(center={self.center.tolist()})"
