"""Rewards with closed-form Gaussian tilts: linear and quadratic (Gaussian bump).

For these, tilting a Gaussian mixture by ``exp(scale * r)`` gives a Gaussian mixture
again, which is what makes the reward-tilt oracle exact (``shared/DESIGN.md`` s. 2).
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
    """``r(x) = a . x``.

    Tilt of ``N(m, P)``: mean ``m + scale P a``, same covariance, log-normaliser
    ``scale a.m + scale^2 / 2 a^T P a``.
    """

    differentiable = True

    def __init__(self, direction: Any):
        self.direction = _vector("direction", direction)

    def evaluate(self, x: Tensor, **cond: Any) -> Tensor:
        _check_x(x, self.direction.numel())
        return x @ self.direction.to(x)

    def gaussian_tilt(self, mean: Tensor, cov: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        a = self.direction.to(mean)
        pa = cov @ a
        log_z = scale * (mean @ a) + 0.5 * scale**2 * (pa @ a)
        return log_z, mean + scale * pa, cov

    def gaussian_expectation(self, mean: Tensor, cov: Tensor) -> Tensor:
        return mean @ self.direction.to(mean)

    def __repr__(self) -> str:
        return f"LinearReward(direction={self.direction.tolist()})"


class QuadraticReward(Reward):
    """Gaussian-bump reward ``r(x) = -1/2 (x - c)^T A (x - c)`` (``A`` positive semi-definite).

    Parameters
    ----------
    center : array, shape (d,)
    precision : float or array (d,) or (d, d)
        ``A``; a float means ``A = precision * I``, a vector a diagonal ``A``.

    Tilt of ``N(m, P)`` by ``exp(scale r)``, in the numerically stable form (no inverse
    of ``P``, so it holds for singular posterior covariances): with
    ``K = (I + scale A P)^{-1} A``, log-normaliser
    ``-1/2 log det(I + scale A P) - scale/2 (m - c)^T K (m - c)``, mean
    ``m - scale P K (m - c)``, covariance ``P - scale P K P``.
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

    def gaussian_tilt(self, mean: Tensor, cov: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        d = mean.shape[-1]
        a = self.precision.to(mean)
        eye = torch.eye(d, dtype=mean.dtype, device=mean.device)
        m_mat = eye + scale * (a @ cov)
        k = torch.linalg.solve(m_mat, a.expand(m_mat.shape))
        diff = (mean - self.center.to(mean)).unsqueeze(-1)
        log_z = -0.5 * torch.linalg.slogdet(m_mat)[1] - 0.5 * scale * (diff.mT @ k @ diff)[..., 0, 0]
        pk = cov @ k
        new_mean = mean - scale * (pk @ diff)[..., 0]
        new_cov = cov - scale * pk @ cov
        return log_z, new_mean, 0.5 * (new_cov + new_cov.mT)

    def gaussian_expectation(self, mean: Tensor, cov: Tensor) -> Tensor:
        a = self.precision.to(mean)
        diff = mean - self.center.to(mean)
        return -0.5 * (torch.einsum("ij,...ji->...", a, cov) + ((diff @ a) * diff).sum(-1))

    def __repr__(self) -> str:
        return f"QuadraticReward(center={self.center.tolist()})"
