"""The reward-tilt oracle for Gaussian-mixture base models (exact, closed form).

With base ``p1`` a Gaussian mixture and a reward with a closed-form Gaussian tilt
(linear, quadratic, constant), the KL-regularised problem
``max E[lambda r(X1)] - KL`` has

- optimal law ``p*(x1) ∝ p1(x1) exp(lambda r(x1))`` (a Gaussian mixture again);
- optimal objective ``log E_p1[exp(lambda r(X1))]``;
- under the *memoryless* schedule, value function
  ``V*(x, t) = -log E[exp(lambda r(X1)) | X_t = x]`` where ``X1 | X_t = x`` is the
  interpolant's posterior mixture, and optimal control ``u* = -sigma grad_x V*``.

This is how every adaptation method in the package is judged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusiongym.models.gmm import GaussianMixture
from diffusiongym.noise import Memoryless
from diffusiongym.rewards.base import Reward
from diffusiongym.schedulers import Scheduler, make_scheduler

__all__ = ["TiltOracle"]


class TiltOracle:
    """Exact optimum of reward adaptation for a Gaussian-mixture base.

    Parameters
    ----------
    mixture : GaussianMixture
        The base distribution of ``x1``.
    reward : Reward
        Must implement ``gaussian_tilt``.
    reward_scale : float
        ``lambda``.
    scheduler : str or Scheduler
        The interpolation path (needed for ``value`` and ``control``).
    """

    def __init__(self, mixture: GaussianMixture, reward: Reward, reward_scale: float = 1.0, scheduler: str | Scheduler = "linear"):
        self.mixture = mixture
        self.reward = reward
        self.reward_scale = float(reward_scale)
        self.scheduler = make_scheduler(scheduler)
        self.target, self.optimal_objective = mixture.tilt(reward, self.reward_scale)

    @property
    def base_objective(self) -> float:
        """``lambda E_base[r(X1)]`` (the base model has zero KL), exact where the reward has a
        closed-form Gaussian expectation."""
        values = self.reward.gaussian_expectation(self.mixture.means, self.mixture.covs)
        return self.reward_scale * float(self.mixture.weights @ values)

    def gap_closed(self, objective: float) -> float:
        """Fraction of the gap between the base and the optimal objective closed by ``objective``.

        Raises ``ValueError`` when the gap is (numerically) zero, e.g. for a constant reward:
        then every policy with zero KL is optimal and the fraction is undefined.
        """
        gap = self.optimal_objective - self.base_objective
        if abs(gap) < 1e-12:
            raise ValueError("objective: the base model is already optimal (zero gap); gap_closed is undefined")
        return (objective - self.base_objective) / gap

    def value(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``V*(x, t)`` for the memoryless schedule, shape ``(n,)``; differentiable in ``x``."""
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        alpha, beta = self.scheduler.alpha(tt), self.scheduler.beta(tt)
        post = self.mixture.posterior(x, alpha, beta)
        log_z, _, _ = self.reward.gaussian_tilt(post.means, post.covariances(), self.reward_scale)
        return -torch.logsumexp(post.log_rho + log_z, dim=1)

    def control(self, noise: Any = None) -> "OracleControl":
        """The optimal control ``u*(x, t) = -sigma(t) grad_x V*(x, t)`` as a callable
        ``u(x, t, **cond)`` for :func:`diffusiongym.sample` (memoryless noise only)."""
        return OracleControl(self, noise if noise is not None else Memoryless())


class OracleControl:
    """``u*(x, t) = -sigma(t) grad_x V*(x, t)``; see :meth:`TiltOracle.control`."""

    def __init__(self, oracle: TiltOracle, noise: Any):
        if not (isinstance(noise, Memoryless) and noise.is_memoryless):
            raise ValueError(f"noise: the oracle's V* holds for the memoryless schedule only, got {noise!r}")
        self.oracle = oracle
        self.noise = noise

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.oracle.value(xg, t).sum(), xg)
        sigma = self.noise(torch.as_tensor(t, dtype=x.dtype, device=x.device), self.oracle.scheduler)
        return -sigma.reshape(-1, *([1] * (x.ndim - 1))) * grad
