"""A linear-Gaussian MDP with a linear policy: the successor measure in closed form.

Dynamics ``S' = A s + B a + w``, ``w ~ N(0, Q)``; policy ``a = K s``. Write ``M = A + B K``.
From ``(s, a)``, ``S_1 = A s + B a + w_0`` and ``S_{k+1} = M S_k + w_k``, so ``S_{k+1} | s, a``
is Gaussian with mean ``M^k (A s + B a)`` and covariance ``sum_{j=0..k} M^j Q M^jT``. The
successor measure ``m(. | s, a) = (1 - gamma) sum_k gamma^k P(S_{k+1} in . | s, a)`` is the
mixture of these Gaussians with geometric weights ``(1 - gamma) gamma^k`` (draw
``k ~ Geometric(1 - gamma)`` on ``0, 1, ...``, then ``S_{k+1}``). :meth:`LinearGaussianMDP.successor`
returns it truncated after the first ``H`` components with ``gamma^H < tail`` (default
``1e-10``: the dropped mass), as a :class:`~diffusiongym.models.gmm.GaussianMixture`, so that
exact samples, :func:`~diffusiongym.utils.stats.null_energy_threshold` and closed-form
expectations (:func:`~diffusiongym.oracle.gaussian_expectation`) come for free.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffusiongym.models.gmm import GaussianMixture
from diffusiongym.oracle import gaussian_expectation
from diffusiongym.rewards.base import Reward
from diffusiongym.trainers.offline_data import OfflineDataset
from diffusiongym.utils.validation import check_positive_int, check_real

__all__ = ["LinearGaussianMDP"]


def _matrix(name: str, value: Any) -> Tensor:
    m = torch.as_tensor(value, dtype=torch.float64)
    if m.ndim != 2:
        raise ValueError(f"{name}: expected a matrix, got shape {tuple(m.shape)}")
    return m


class LinearGaussianMDP:
    """``S' = A s + B a + N(0, Q)`` with the linear policy ``a = K s`` (module docstring).

    Parameters
    ----------
    A : (ds, ds), B : (ds, da), Q : (ds, ds) positive definite, K : (da, ds)
        All stored in float64.
    """

    def __init__(self, A: Any, B: Any, Q: Any, K: Any):
        self.A, self.B, self.Q, self.K = (_matrix(n, v) for n, v in (("A", A), ("B", B), ("Q", Q), ("K", K)))
        ds, da = self.B.shape
        for name, m, shape in (("A", self.A, (ds, ds)), ("Q", self.Q, (ds, ds)), ("K", self.K, (da, ds))):
            if m.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(m.shape)}")
        self.M = self.A + self.B @ self.K
        self.state_dim, self.action_dim = ds, da
        self._noise_chol = torch.linalg.cholesky(self.Q)

    @classmethod
    def default(cls) -> LinearGaussianMDP:
        """A 2-D state, 1-D action example: ``M = A + B K`` has spectral radius 0.8 (lightly rotating)."""
        A = [[0.9, 0.3], [-0.2, 0.8]]
        B = [[0.0], [0.5]]
        K = [[0.1, -0.4]]
        Q = [[0.05, 0.01], [0.01, 0.04]]
        return cls(A, B, Q, K)

    # --------------------------------------------------------------------- dynamics
    def policy(self, s: Tensor) -> Tensor:
        """``a = K s``, shape ``(n, da)``, in ``s``'s dtype."""
        return s @ self.K.T.to(s)

    def step(self, s: Tensor, a: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One transition ``A s + B a + w``, shape ``(n, ds)``."""
        w = torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device) @ self._noise_chol.T.to(s)
        return s @ self.A.T.to(s) + a @ self.B.T.to(s) + w

    def dataset(
        self,
        n: int,
        state_std: float = 1.0,
        action_std: float = 0.5,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> OfflineDataset:
        """``n`` off-policy transitions: ``s ~ N(0, state_std^2 I)``, ``a = K s + N(0, action_std^2 I)``.

        The exploration noise covers actions away from ``pi`` (to evaluate ``Q(s, a)`` for any
        ``a``); rewards are zero (a successor measure needs none), ``done = 0``.
        """
        n = check_positive_int("n", n)
        s = check_real("state_std", state_std) * torch.randn(n, self.state_dim, generator=generator, dtype=dtype)
        noise = torch.randn(n, self.action_dim, generator=generator, dtype=dtype)
        a = self.policy(s) + check_real("action_std", action_std) * noise
        s2 = self.step(s, a, generator)
        return OfflineDataset(s, a, torch.zeros(n, dtype=dtype), s2, torch.zeros(n, dtype=dtype))

    # --------------------------------------------------------------------- the truth
    def successor(self, s: Any, a: Any, gamma: float, tail: float = 1e-10) -> GaussianMixture:
        """``m(. | s, a)`` for one state ``s`` ``(ds,)`` and action ``a`` ``(da,)``, truncated where
        the geometric tail ``gamma^H`` drops below ``tail``."""
        gamma = check_real("gamma", gamma)
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"gamma: expected a discount in [0, 1), got {gamma}")
        s = torch.as_tensor(s, dtype=torch.float64).reshape(self.state_dim)
        a = torch.as_tensor(a, dtype=torch.float64).reshape(self.action_dim)
        horizon = 1 if gamma == 0 else max(1, math.ceil(math.log(tail) / math.log(gamma)))
        mean = self.A @ s + self.B @ a
        cov = self.Q.clone()
        means, covs = [], []
        for _ in range(horizon):
            means.append(mean)
            covs.append(cov)
            mean = self.M @ mean
            cov = self.M @ cov @ self.M.T + self.Q
        weights = (1 - gamma) * gamma ** torch.arange(horizon, dtype=torch.float64)
        return GaussianMixture(weights, torch.stack(means), torch.stack(covs))

    def q_value(self, s: Any, a: Any, reward: Reward, gamma: float) -> float:
        """Exact ``Q(s, a) = sum_k gamma^k E[r(S_{k+1})] = (1 - gamma)^-1 E_m[r]`` for a reward with a
        closed-form Gaussian expectation (linear, quadratic, constant;
        :func:`~diffusiongym.oracle.gaussian_expectation`)."""
        m = self.successor(s, a, gamma)
        return float(m.weights @ gaussian_expectation(reward, m.means, m.covs)) / (1 - gamma)
