"""The reward-tilt oracle for Gaussian-mixture base models (exact, closed form).

With base ``p1`` a Gaussian mixture and a reward with a closed-form Gaussian tilt
(linear, quadratic, constant), the KL-regularised problem
``max E[lambda r(X1)] - KL`` has

- optimal law ``p*(x1) ∝ p1(x1) exp(lambda r(x1))`` (a Gaussian mixture again);
- optimal objective ``log E_p1[exp(lambda r(X1))]``;
- under the *memoryless* schedule, value function
  ``V*(x, t) = -log E[exp(lambda r(X1)) | X_t = x]`` where ``X1 | X_t = x`` is the
  interpolant's posterior mixture, and optimal control ``u* = -sigma grad_x V*``;
- the exact reward-KL frontier ``(KL(p*_s || p), E_{p*_s}[r])`` over tilts ``s >= 0``
  (:func:`tilt_frontier`, :meth:`TiltOracle.frontier`, :meth:`TiltOracle.frontier_at_kl`): the best
  reward at each KL, against which methods that do not optimise the KL objective (RQL) are judged.

This is how every adaptation method in the package is judged (``docs/maths.md``,
"The Gaussian-mixture oracle").

Gaussian tilts
--------------
That ``N(m, P) exp(lambda r)`` is again Gaussian is a property of the pair (reward,
Gaussian) that only the oracle needs, so it lives here and not on :class:`Reward`: a
registry maps a reward *type* to two functions,

- ``tilt(reward, mean, cov, scale) -> (log_normaliser, tilted_mean, tilted_cov)`` with shapes
  ``(...,)``, ``(..., d)``, ``(..., d, d)`` for ``mean`` ``(..., d)`` and ``cov`` ``(..., d, d)``;
- ``expectation(reward, mean, cov) -> E[r(X)]``, shape ``(...,)``, for ``X ~ N(mean, cov)``.

:class:`LinearReward`, :class:`QuadraticReward` and :class:`ConstantReward` are registered;
add your own with :func:`register_gaussian_tilt`. The lookup is by exact type: a subclass
may change ``evaluate``, so it does not inherit its parent's closed form.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.models.gmm import GaussianMixture
from diffusiongym.noise import Memoryless
from diffusiongym.rewards.analytic import LinearReward, QuadraticReward
from diffusiongym.rewards.base import ConstantReward, Reward
from diffusiongym.schedulers import Scheduler, make_scheduler
from diffusiongym.utils.validation import as_float64_vector, check_real

__all__ = [
    "TiltOracle",
    "OracleControl",
    "mixture_oracle",
    "tilt_mixture",
    "tilt_frontier",
    "gaussian_tilt",
    "gaussian_expectation",
    "has_gaussian_tilt",
    "register_gaussian_tilt",
]

GaussianTilt = Callable[[Any, Tensor, Tensor, float], tuple[Tensor, Tensor, Tensor]]
GaussianExpectation = Callable[[Any, Tensor, Tensor], Tensor]

_TILTS: dict[type, tuple[GaussianTilt, GaussianExpectation]] = {}


def register_gaussian_tilt(reward_type: type, tilt: GaussianTilt, expectation: GaussianExpectation) -> None:
    """Declare the closed-form Gaussian tilt and expectation of rewards of type ``reward_type``.

    Parameters
    ----------
    reward_type : type
        A :class:`~diffusiongym.rewards.base.Reward` subclass (matched exactly, not by subclass).
    tilt : callable
        ``tilt(reward, mean (..., d), cov (..., d, d), scale) -> (log_z (...,), mean (..., d), cov (..., d, d))``:
        ``N(mean, cov) exp(scale r) = exp(log_z) N(mean', cov')``.
    expectation : callable
        ``expectation(reward, mean, cov) -> E[r(X)]`` of shape ``(...,)``.
    """
    if not (isinstance(reward_type, type) and issubclass(reward_type, Reward)):
        raise TypeError(f"reward_type: expected a Reward subclass, got {reward_type!r}")
    if not callable(tilt) or not callable(expectation):
        raise TypeError("tilt, expectation: expected callables")
    _TILTS[reward_type] = (tilt, expectation)


def has_gaussian_tilt(reward: Reward) -> bool:
    """Whether ``reward``'s type has a registered closed-form Gaussian tilt."""
    return type(reward) in _TILTS


def _rules(reward: Reward) -> tuple[GaussianTilt, GaussianExpectation]:
    if type(reward) not in _TILTS:
        known = ", ".join(sorted(t.__name__ for t in _TILTS))
        raise TypeError(
            f"reward: {type(reward).__name__} has no closed-form Gaussian tilt (registered: {known}); "
            "see diffusiongym.oracle.register_gaussian_tilt"
        )
    return _TILTS[type(reward)]


def gaussian_tilt(reward: Reward, mean: Tensor, cov: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Exact tilt of ``N(mean, cov)`` by ``exp(scale * r)``: ``(log_normaliser, mean', cov')``.

    Shapes ``(...,)``, ``(..., d)``, ``(..., d, d)`` for ``mean`` ``(..., d)``. Raises
    ``TypeError`` for a reward without a registered closed form.
    """
    return _rules(reward)[0](reward, mean, cov, check_real("scale", scale))


def gaussian_expectation(reward: Reward, mean: Tensor, cov: Tensor) -> Tensor:
    """``E[r(X)]`` for ``X ~ N(mean, cov)``, shape ``(...,)``."""
    return _rules(reward)[1](reward, mean, cov)


def tilt_mixture(mixture: GaussianMixture, reward: Reward, scale: float) -> tuple[GaussianMixture, float]:
    """Exact ``p* ∝ p exp(scale * r)`` for a mixture ``p`` and ``log E_p[exp(scale * r)]``.

    Each component is tilted in closed form; the weights become ``∝ w_k exp(log_z_k)``.
    """
    log_z, means, covs = gaussian_tilt(reward, mixture.means, mixture.covs, scale)
    log_w = torch.log(mixture.weights) + log_z
    log_norm = torch.logsumexp(log_w, 0)
    return GaussianMixture(torch.exp(log_w - log_norm), means, covs), float(log_norm)


def tilt_frontier(mixture: GaussianMixture, reward: Reward, scales: Any) -> tuple[Tensor, Tensor]:
    """The exact reward-KL frontier ``(KL(p*_s || p), E_{p*_s}[r])`` at each tilt ``s`` in ``scales``.

    ``p*_s ∝ p exp(s r)`` maximises ``E_q[r]`` among laws with ``KL(q || p) <= KL(p*_s || p)``
    (Lagrangian duality; ``s >= 0`` is the multiplier's inverse), so these points are the best
    reward any method can reach at each KL. Closed form: ``E_{p*_s}[r]`` is the tilted mixture's
    expectation and ``KL(p*_s || p) = s E_{p*_s}[r] - log E_p[exp(s r)]``. Both increase with ``s``
    (``dKL/ds = s Var_{p*_s}(r)``, ``dE/ds = Var_{p*_s}(r)``), and ``dKL/dE = s``.

    Parameters
    ----------
    mixture : GaussianMixture
        The base ``p``.
    reward : Reward
        With a registered Gaussian tilt (else ``TypeError``).
    scales : float or sequence of float
        Tilts ``s >= 0``, any number of them; ``ValueError`` naming ``scales`` otherwise.

    Returns
    -------
    kl, expected_reward : Tensor
        float64, shape ``(len(scales),)``.
    """
    values = as_float64_vector("scales", scales, "tilt scales", min_length=1)
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise ValueError(f"scales: expected finite tilt scales >= 0, got {values.tolist()[:8]}")
    kls, rewards = [], []
    for s in values.tolist():
        tilted, log_norm = tilt_mixture(mixture, reward, s)
        expected = float(tilted.weights.double() @ gaussian_expectation(reward, tilted.means, tilted.covs).double())
        kl = s * expected - log_norm
        kls.append(kl if kl > 0 else 0.0)  # >= 0 exactly; clamps rounding at s ~ 0
        rewards.append(expected)
    return torch.tensor(kls, dtype=torch.float64), torch.tensor(rewards, dtype=torch.float64)


# ------------------------------------------------------------------ built-in closed forms
def _linear_tilt(reward: LinearReward, mean: Tensor, cov: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    # r = a.x: mean m + scale P a, same covariance, log_z = scale a.m + scale^2 / 2 a^T P a
    a = reward.direction.to(mean)
    pa = cov @ a
    log_z = scale * (mean @ a) + 0.5 * scale**2 * (pa @ a)
    return log_z, mean + scale * pa, cov


def _linear_expectation(reward: LinearReward, mean: Tensor, cov: Tensor) -> Tensor:
    return mean @ reward.direction.to(mean)


def _quadratic_tilt(reward: QuadraticReward, mean: Tensor, cov: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    # r = -1/2 (x - c)^T A (x - c). Stable form, no inverse of P (posterior covariances may be
    # singular): K = (I + scale A P)^{-1} A, log_z = -1/2 log det(I + scale A P) - scale/2 (m - c)^T K (m - c),
    # mean m - scale P K (m - c), covariance P - scale P K P.
    d = mean.shape[-1]
    a = reward.precision.to(mean)
    eye = torch.eye(d, dtype=mean.dtype, device=mean.device)
    m_mat = eye + scale * (a @ cov)
    k = torch.linalg.solve(m_mat, a.expand(m_mat.shape))
    diff = (mean - reward.center.to(mean)).unsqueeze(-1)
    log_z = -0.5 * torch.linalg.slogdet(m_mat)[1] - 0.5 * scale * (diff.mT @ k @ diff)[..., 0, 0]
    pk = cov @ k
    new_mean = mean - scale * (pk @ diff)[..., 0]
    new_cov = cov - scale * pk @ cov
    return log_z, new_mean, 0.5 * (new_cov + new_cov.mT)


def _quadratic_expectation(reward: QuadraticReward, mean: Tensor, cov: Tensor) -> Tensor:
    a = reward.precision.to(mean)
    diff = mean - reward.center.to(mean)
    return -0.5 * (torch.einsum("ij,...ji->...", a, cov) + ((diff @ a) * diff).sum(-1))


def _constant_tilt(reward: ConstantReward, mean: Tensor, cov: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.full(mean.shape[:-1], scale * reward.value, dtype=mean.dtype, device=mean.device), mean, cov


def _constant_expectation(reward: ConstantReward, mean: Tensor, cov: Tensor) -> Tensor:
    return torch.full(mean.shape[:-1], reward.value, dtype=mean.dtype, device=mean.device)


register_gaussian_tilt(LinearReward, _linear_tilt, _linear_expectation)
register_gaussian_tilt(QuadraticReward, _quadratic_tilt, _quadratic_expectation)
register_gaussian_tilt(ConstantReward, _constant_tilt, _constant_expectation)


# --------------------------------------------------------------------------- the oracle
class TiltOracle:
    """Exact optimum of reward adaptation for a Gaussian-mixture base.

    Parameters
    ----------
    mixture : GaussianMixture
        The base distribution of ``x1``.
    reward : Reward
        Its type must have a registered Gaussian tilt (:func:`register_gaussian_tilt`);
        otherwise ``TypeError``.
    reward_scale : float
        ``lambda``.
    scheduler : str or Scheduler
        The interpolation path (needed for ``value`` and ``control``).

    Attributes
    ----------
    target : GaussianMixture
        ``p*``.
    optimal_objective : float
        ``log E_base[exp(lambda r(X1))]``.
    """

    def __init__(
        self, mixture: GaussianMixture, reward: Reward, reward_scale: float = 1.0, scheduler: str | Scheduler = "linear"
    ):
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture: expected a GaussianMixture, got {type(mixture).__name__}")
        if not isinstance(reward, Reward):
            raise TypeError(f"reward: expected a diffusiongym Reward, got {type(reward).__name__}")
        self.mixture = mixture
        self.reward = reward
        self.reward_scale = check_real("reward_scale", reward_scale)
        self.scheduler = make_scheduler(scheduler)
        self.target, self.optimal_objective = tilt_mixture(mixture, reward, self.reward_scale)

    @property
    def base_objective(self) -> float:
        """``lambda E_base[r(X1)]`` (the base model has zero KL), exact."""
        values = gaussian_expectation(self.reward, self.mixture.means, self.mixture.covs)
        return self.reward_scale * float(self.mixture.weights @ values)

    def gap_closed(self, objective: float) -> float:
        """Fraction of the gap between the base and the optimal objective closed by ``objective``.

        Raises ``ValueError`` when the gap is (numerically) zero, e.g. for a constant reward:
        then every policy with zero KL is optimal and the fraction is undefined.
        """
        objective = check_real("objective", objective)
        gap = self.optimal_objective - self.base_objective
        if abs(gap) < 1e-12:
            raise ValueError("objective: the base model is already optimal (zero gap); gap_closed is undefined")
        return (objective - self.base_objective) / gap

    def frontier(self, scales: Any) -> tuple[Tensor, Tensor]:
        """The exact reward-KL frontier ``(KL(p*_s || p), E_{p*_s}[r])`` at tilts ``scales``
        (:func:`tilt_frontier`); at ``s = reward_scale`` it passes through ``target``, where
        ``s E[r] - KL`` is ``optimal_objective``."""
        return tilt_frontier(self.mixture, self.reward, scales)

    def frontier_at_kl(self, kl: Any, tol: float = 1e-10) -> tuple[Tensor, Tensor]:
        """The frontier at given KLs: ``(scale, E_{p*_scale}[r])`` with ``KL(p*_scale || p) = kl``.

        The best expected reward of any law within KL ``kl`` of the base. ``KL(p*_s || p)`` increases
        with ``s``, so each ``s`` is found by bisection (bracket doubled from 1, to ``tol`` relative in
        ``s``). ``kl``: a float or sequence of floats ``>= 0`` (``ValueError`` naming ``kl``; also for a
        KL no tilt reaches, e.g. any ``kl > 0`` for a constant reward). Shapes ``(len(kl),)``, float64.
        """
        values = as_float64_vector("kl", kl, "KL values", min_length=1)
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ValueError(f"kl: expected finite KL values >= 0, got {values.tolist()[:8]}")
        tol = check_real("tol", tol, positive=True)

        def kl_at(s: float) -> float:
            return float(self.frontier([s])[0][0])

        scales = []
        for target in values.tolist():
            if target == 0.0:
                scales.append(0.0)
                continue
            high = 1.0
            while kl_at(high) < target:
                high *= 2.0
                if high > 1e8:
                    raise ValueError(
                        f"kl: {target} is beyond the frontier (KL of the tilt at scale 1e8 is {kl_at(1e8):.4g})"
                    )
            low = 0.0
            while high - low > tol * high:
                mid = 0.5 * (low + high)
                low, high = (mid, high) if kl_at(mid) < target else (low, mid)
            scales.append(0.5 * (low + high))
        scale_tensor = torch.tensor(scales, dtype=torch.float64)
        return scale_tensor, self.frontier(scale_tensor)[1]

    def value(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``V*(x, t)`` for the memoryless schedule, shape ``(n,)``; differentiable in ``x``."""
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        alpha, beta = self.scheduler.alpha(tt), self.scheduler.beta(tt)
        post = self.mixture.posterior(x, alpha, beta)
        log_z, _, _ = gaussian_tilt(self.reward, post.means, post.covariances(), self.reward_scale)
        return -torch.logsumexp(post.log_rho + log_z, dim=1)

    def control(self, noise: Any = None) -> OracleControl:
        """The optimal control ``u*(x, t) = -sigma(t) grad_x V*(x, t)`` as a callable
        ``u(x, t, **cond)`` for :func:`diffusiongym.sample` (memoryless noise only)."""
        return OracleControl(self, noise if noise is not None else Memoryless())

    def __repr__(self) -> str:
        return f"TiltOracle(reward={self.reward!r}, reward_scale={self.reward_scale}, optimal_objective={self.optimal_objective:.4f})"


def mixture_oracle(
    mixture: GaussianMixture, reward: Reward, reward_scale: float, scheduler: str | Scheduler = "linear"
) -> TiltOracle | None:
    """The :class:`TiltOracle` of ``(mixture, reward, reward_scale)``, or ``None`` when the
    reward has no closed-form Gaussian tilt (the task factories' oracle rule)."""
    reward_scale = check_real("reward_scale", reward_scale)
    if not has_gaussian_tilt(reward):
        return None
    return TiltOracle(mixture, reward, reward_scale, scheduler=scheduler)


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
