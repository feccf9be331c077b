"""Exact Gaussian-mixture base models (the oracle's ground truth).

Base ``p1 = sum_k w_k N(mu_k, S_k)`` and path ``x_t = alpha x1 + beta x0``. Then
``p_t = sum_k w_k N(alpha mu_k, C_k)`` with ``C_k = alpha^2 S_k + beta^2 I`` and the
posterior of ``x1`` given ``x_t = x`` is the mixture with responsibilities
``rho_k(x) ∝ w_k N(x; alpha mu_k, C_k)``, means
``mu_k + alpha S_k C_k^{-1} (x - alpha mu_k)`` and covariances
``S_k - alpha^2 S_k C_k^{-1} S_k`` (``docs/maths.md``, "The Gaussian-mixture oracle"). Tilting
a mixture by a reward is the oracle's business (:func:`diffusiongym.oracle.tilt_mixture`).

Everything is computed in each component's eigenbasis ``S_k = Q_k diag(lam_k) Q_k^T``
(``C_k`` shares it: eigenvalues ``alpha^2 lam + beta^2``), so a per-sample time costs
element-wise work only and no batched matrix inverse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.parameterization import check_parameterization
from diffusiongym.schedulers import Scheduler, make_scheduler
from diffusiongym.utils.validation import ArgumentTypeError, check_positive_int, unknown_name_error


def _float64(argument: str, value: Any) -> Tensor:
    try:
        out = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ArgumentTypeError(f"{argument}: expected numbers (array or tensor), got {type(value).__name__}") from err
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{argument}: expected finite numbers, got NaN or inf")
    return out


__all__ = [
    "GaussianMixture",
    "GaussianMixtureModel",
    "TrainableGaussianMixtureModel",
    "Posterior",
    "gmm_preset",
    "GMM_PRESETS",
]


@dataclass
class Posterior:
    """Posterior of ``x1`` given ``x_t = x`` (batch of ``n`` points, ``K`` components).

    Attributes
    ----------
    log_rho : (n, K) log responsibilities.
    means : (n, K, d) component posterior means ``E[x1 | x, k]``.
    cov_eigvals : (n, K, d) posterior covariance eigenvalues in the basis ``Q_k``.
    basis : (K, d, d) the eigenbases ``Q_k`` (columns).
    score : (n, d) ``grad_x log p_t(x)``.
    x1_hat : (n, d) ``E[x1 | x]``.
    """

    log_rho: Tensor
    means: Tensor
    cov_eigvals: Tensor
    basis: Tensor
    score: Tensor
    x1_hat: Tensor

    def covariances(self) -> Tensor:
        """Full component posterior covariances, shape ``(n, K, d, d)``."""
        q = self.basis
        return torch.einsum("kij,nkj,klj->nkil", q, self.cov_eigvals, q)


class GaussianMixture:
    """A Gaussian mixture distribution in ``d`` dimensions (stored in float64).

    Parameters
    ----------
    weights : array, shape (K,)
        Positive; normalised here.
    means : array, shape (K, d)
    covs : array, shape (K, d, d) positive definite, or (K, d) diagonal, or (K,) isotropic.
    """

    def __init__(self, weights: Any, means: Any, covs: Any):
        w = _float64("weights", weights).flatten()
        mu = _float64("means", means)
        if mu.ndim != 2 or mu.shape[0] != w.numel():
            raise ValueError(f"means: expected shape ({w.numel()}, d), got {tuple(mu.shape)}")
        k, d = mu.shape
        s = _float64("covs", covs)
        if s.shape == (k,):
            s = s[:, None, None] * torch.eye(d, dtype=torch.float64)
        elif s.shape == (k, d):
            s = torch.diag_embed(s)
        if s.shape != (k, d, d):
            raise ValueError(f"covs: expected shape ({k}, {d}, {d}), ({k}, {d}) or ({k},), got {tuple(s.shape)}")
        if not torch.all(w > 0):
            raise ValueError("weights: expected positive entries")
        s = 0.5 * (s + s.mT)
        lam, q = torch.linalg.eigh(s)
        if not torch.all(lam > 0):
            raise ValueError("covs: expected positive definite covariances")
        self.weights = w / w.sum()
        self.means = mu
        self.covs = s
        self.eigvals = lam
        self.eigvecs = q
        self._cast: dict[tuple, tuple[Tensor, ...]] = {}

    def _constants(self, x: Tensor) -> tuple[Tensor, ...]:
        """``(weights, means, eigvecs, eigvals)`` in ``x``'s dtype and device, cast once (eagerly):
        a cast inside a compiled graph costs every call and spoils inductor's loop tiling."""
        key = (x.dtype, x.device)
        got = self._cast.get(key)
        if got is None:
            got = tuple(v.to(x) for v in (self.weights, self.means, self.eigvecs, self.eigvals))
            # cached only for constants: a cast of a tensor that requires grad belongs to one graph
            if not torch.compiler.is_compiling() and not any(v.requires_grad for v in got):
                self._cast[key] = got
        return got

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def mean(self) -> Tensor:
        """Overall mean, shape ``(d,)``."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Overall covariance, shape ``(d, d)``."""
        m = self.mean()
        diff = self.means - m
        return torch.einsum("k,kij->ij", self.weights, self.covs) + torch.einsum(
            "k,ki,kj->ij", self.weights, diff, diff
        )

    def sample(
        self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64, device: Any = None
    ) -> Tensor:
        """Exact samples, shape ``(n, d)`` (drawn on the CPU in float64, then moved)."""
        n = check_positive_int("n", n)
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        x = self.means[comp] + (chol[comp] @ z.unsqueeze(-1)).squeeze(-1)
        return x.to(dtype=dtype, device=device)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log density at ``x`` of shape ``(n, d)``, shape ``(n,)``."""
        return self.marginal(1.0, 0.0)._log_prob(x)

    def _log_prob(self, x: Tensor) -> Tensor:
        w, mu, q, lam = (v.to(x) for v in (self.weights, self.means, self.eigvecs, self.eigvals))
        y = torch.einsum("nki,kij->nkj", x[:, None, :] - mu, q)
        logn = -0.5 * ((y**2 / lam) + torch.log(lam) + math.log(2 * math.pi)).sum(-1)
        return torch.logsumexp(torch.log(w) + logn, dim=1)

    def marginal(self, alpha: float, beta: float) -> GaussianMixture:
        """The law of ``alpha X1 + beta X0`` (``p_t`` for scalars alpha, beta)."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        return GaussianMixture(self.weights, alpha * self.means, alpha**2 * self.covs + beta**2 * eye)

    def posterior(self, x: Tensor, alpha: Tensor | float, beta: Tensor | float) -> Posterior:
        """Posterior of ``x1`` given ``alpha x1 + beta x0 = x``.

        ``x`` has shape ``(n, d)``; ``alpha``, ``beta`` are scalars or shape ``(n,)``.
        Computed in ``x``'s dtype.
        """
        if torch.compiler.is_compiling():
            return self._posterior_batch_last(x, alpha, beta)
        w, mu, q, lam = self._constants(x)
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        b = torch.as_tensor(beta, dtype=x.dtype, device=x.device).reshape(-1, 1, 1)
        y = torch.einsum("nki,kij->nkj", x[:, None, :] - a * mu, q)  # coordinates in Q_k
        c = a**2 * lam + b**2  # eigenvalues of C_k
        log_rho = torch.log(w) - 0.5 * ((y**2 / c) + torch.log(c)).sum(-1)
        log_rho = log_rho - torch.logsumexp(log_rho, dim=1, keepdim=True)
        rho = log_rho.exp()
        y_over_c = y / c
        score = -torch.einsum("nk,kij,nkj->ni", rho, q, y_over_c)
        means = mu + torch.einsum("kij,nkj->nki", q, a * lam * y_over_c)
        x1_hat = torch.einsum("nk,nki->ni", rho, means)
        cov_eigvals = lam * b**2 / c
        return Posterior(log_rho, means, cov_eigvals.expand(x.shape[0], -1, -1), q, score, x1_hat)

    def _posterior_batch_last(self, x: Tensor, alpha: Tensor | float, beta: Tensor | float) -> Posterior:
        """:meth:`posterior` as traced by ``torch.compile``: the same maths on ``(K, d, n)`` tensors,
        the batch axis last and ``K``, ``d`` reduced by broadcast-and-sum.

        Inductor vectorises a fused loop's innermost axis. With the batch first (the eager layout)
        the innermost axes are the tiny ``K`` and ``d`` (masked 16-lane vectors for 1 or 2 useful
        lanes), einsums become extern ``bmm`` calls, and the log-sum-exp and the sums over ``K``
        run as scalar loops with scalar ``exp``/``log``; with the batch last every loop is
        vectorised over the batch (GMM1D's model call 4x faster, GMM2D's 10x at ``n = 16384``)."""
        w, mu, q, lam = self._constants(x)
        a = torch.as_tensor(alpha, dtype=x.dtype, device=x.device).reshape(1, 1, -1)
        b = torch.as_tensor(beta, dtype=x.dtype, device=x.device).reshape(1, 1, -1)
        r = x.T[None] - a * mu[:, :, None]  # (K, d, n)
        y = (r[:, :, None, :] * q[:, :, :, None]).sum(1)  # coordinates in Q_k, (K, d, n)
        c = a * a * lam[:, :, None] + b * b  # eigenvalues of C_k
        log_rho = torch.log(w)[:, None] - 0.5 * ((y * y / c) + torch.log(c)).sum(1)  # (K, n)
        top = log_rho.amax(0, keepdim=True)
        log_rho = log_rho - (top + torch.log(torch.exp(log_rho - top).sum(0, keepdim=True)))
        rho = torch.exp(log_rho)
        y_over_c = y / c
        back = (q[:, :, :, None] * y_over_c[:, None, :, :]).sum(2)  # Q_k y_k / c_k in x-coordinates
        score = -(rho[:, None, :] * back).sum(0).T
        means = mu[:, :, None] + (q[:, :, :, None] * (a * lam[:, :, None] * y_over_c)[:, None, :, :]).sum(2)
        x1_hat = (rho[:, None, :] * means).sum(0).T
        cov_eigvals = (lam[:, :, None] * (b * b) / c).permute(2, 0, 1)
        n = x.shape[0]
        return Posterior(log_rho.T, means.permute(2, 0, 1), cov_eigvals.expand(n, -1, -1), q, score, x1_hat)

    def to_config(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "means": self.means.tolist(), "covs": self.covs.tolist()}

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.num_components}, d={self.dim})"


class GaussianMixtureModel(nn.Module):
    """Exact predictor of a Gaussian mixture in any parameterisation and scheduler.

    ``forward(x, t)`` returns the exact ``velocity``, ``epsilon``, ``endpoint`` or
    ``score`` at ``(x, t)`` for the mixture under ``scheduler``; ``t`` has shape
    ``(n,)`` or is a scalar. ``eps_hat`` is computed as ``-beta * score`` (no
    ``1/beta`` singularity at ``t = 1``).
    """

    def __init__(
        self, mixture: GaussianMixture, scheduler: str | Scheduler = "linear", parameterization: str = "velocity"
    ):
        super().__init__()
        if not isinstance(mixture, GaussianMixture):
            raise TypeError(f"mixture: expected a GaussianMixture, got {type(mixture).__name__}")
        self.mixture = mixture
        self.scheduler = make_scheduler(scheduler)
        self.parameterization = check_parameterization(parameterization)
        self.sample_shape = (mixture.dim,)

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.mixture.dim:
            raise ValueError(f"x: expected shape (n, {self.mixture.dim}), got {tuple(x.shape)}")
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        alpha, beta, d_alpha, d_beta = self.scheduler(tt)
        post = self.mixture.posterior(x, alpha, beta)
        return _prediction(self.parameterization, post.score, post.x1_hat, tt, beta, d_alpha, d_beta)

    def trainable_copy(self) -> TrainableGaussianMixtureModel:
        """A copy whose mixture parameters are trainable (:class:`TrainableGaussianMixtureModel`)."""
        return TrainableGaussianMixtureModel(self.mixture, self.scheduler, self.parameterization)


def _prediction(
    parameterization: str, score: Tensor, x1_hat: Tensor, t: Tensor, beta: Tensor, d_alpha: Tensor, d_beta: Tensor
) -> Tensor:
    """The model output in ``parameterization`` from the exact score and ``E[x1 | x]``."""
    if parameterization == "score":
        return score
    if parameterization == "endpoint":
        return x1_hat
    shape = (-1, 1) if t.ndim == 1 else ()
    eps_hat = -beta.reshape(shape) * score
    if parameterization == "epsilon":
        return eps_hat
    return d_alpha.reshape(shape) * x1_hat + d_beta.reshape(shape) * eps_hat


class TrainableGaussianMixtureModel(nn.Module):
    """A Gaussian-mixture predictor whose weights, means and covariances are parameters.

    The same exact predictor as :class:`GaussianMixtureModel` (it starts equal to it), with
    ``logits`` ``(K,)`` (weights ``softmax(logits)``), ``means`` ``(K, d)`` and the Cholesky
    factors ``L_k`` of ``S_k = L_k L_k^T`` (strictly lower part ``chol_lower`` ``(K, d, d)``
    and ``log_diag`` ``(K, d)``), all float64 and trainable. The posterior is computed with
    batched Cholesky solves of ``C_k = alpha^2 S_k + beta^2 I`` (differentiable also where
    eigenvalues repeat, e.g. isotropic components), in ``x``'s dtype.

    It is the natural "copy of the base model" to fine-tune for the Gaussian-mixture tasks:
    with a quadratic (or linear) reward the tilted target ``p*`` is again a mixture of the
    same size, so the optimal fine-tune lies in this family, and :meth:`mixture` returns
    the learnt distribution for comparison with the oracle's ``p*``.
    """

    def __init__(
        self, mixture: GaussianMixture, scheduler: str | Scheduler = "linear", parameterization: str = "velocity"
    ):
        super().__init__()
        self.scheduler = make_scheduler(scheduler)
        self.parameterization = check_parameterization(parameterization)
        self.sample_shape = (mixture.dim,)
        chol = torch.linalg.cholesky(mixture.covs)
        self.logits = nn.Parameter(torch.log(mixture.weights).clone())
        self.means = nn.Parameter(mixture.means.clone())
        self.chol_lower = nn.Parameter(torch.tril(chol, -1).clone())
        self.log_diag = nn.Parameter(torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).clone())

    def cholesky(self) -> Tensor:
        """``L_k``, shape ``(K, d, d)``, lower triangular with a positive diagonal."""
        return torch.tril(self.chol_lower, -1) + torch.diag_embed(self.log_diag.exp())

    def mixture(self) -> GaussianMixture:
        """The current distribution as a (detached) :class:`GaussianMixture`."""
        with torch.no_grad():
            chol = self.cholesky().detach().cpu()
            return GaussianMixture(
                torch.softmax(self.logits, 0).detach().cpu(), self.means.detach().cpu().clone(), chol @ chol.mT
            )

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        d = self.sample_shape[0]
        if x.ndim != 2 or x.shape[1] != d:
            raise ValueError(f"x: expected shape (n, {d}), got {tuple(x.shape)}")
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        alpha, beta, d_alpha, d_beta = self.scheduler(tt)
        chol = self.cholesky().to(x)
        cov = chol @ chol.mT  # (K, d, d)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        # factor C_k = alpha^2 S_k + beta^2 I once per distinct time (a batch holds few), then gather;
        # a scalar or an expanded one (the samplers' t_k.expand(n)) needs no torch.unique (a device sync)
        flat = tt.detach().reshape(-1)
        if flat.numel() == 1 or tt.stride(0) == 0:
            times, index = flat[:1], None
        else:
            times, index = torch.unique(flat, return_inverse=True)
        a_u, b_u, _, _ = self.scheduler(times)
        c_chol = torch.linalg.cholesky(
            a_u.reshape(-1, 1, 1, 1) ** 2 * cov + b_u.reshape(-1, 1, 1, 1) ** 2 * eye
        )  # (U, K, d, d)
        l_inv = torch.linalg.solve_triangular(c_chol, eye.expand_as(c_chol), upper=False)  # L_k^{-1}
        log_det = torch.log(torch.diagonal(c_chol, dim1=-2, dim2=-1)).sum(-1)  # (U, K)
        if index is not None and times.numel() > 1:
            l_inv, log_det = l_inv[index], log_det[index]
        resid = x[:, None, :] - alpha.reshape(-1, 1, 1) * self.means.to(x)  # (n, K, d)
        l_inv = l_inv.expand(resid.shape[0], -1, -1, -1)
        white = torch.einsum("nkij,nkj->nki", l_inv, resid)
        c_inv_r = torch.einsum("nkji,nkj->nki", l_inv, white)  # C_k^{-1} (x - alpha mu_k)
        log_rho = torch.log_softmax(self.logits.to(x), 0) - 0.5 * white.pow(2).sum(-1) - log_det
        rho = torch.softmax(log_rho, dim=1)  # (n, K)
        score = -torch.einsum("nk,nki->ni", rho, c_inv_r)
        comp_means = self.means.to(x) + alpha.reshape(-1, 1, 1) * torch.einsum("kij,nkj->nki", cov, c_inv_r)
        x1_hat = torch.einsum("nk,nki->ni", rho, comp_means)
        return _prediction(self.parameterization, score, x1_hat, tt, beta, d_alpha, d_beta)


def _ring(n: int, radius: float, std: float, weights: list[float]) -> GaussianMixture:
    angles = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    return GaussianMixture(weights, means, torch.full((n,), std**2, dtype=torch.float64))


GMM_PRESETS: dict[str, Any] = {
    # Two modes; the right one has a fifth of the mass (the reward's target).
    "1d": lambda: GaussianMixture([0.8, 0.2], [[-1.0], [1.5]], [0.25**2, 0.2**2]),
    # Eight modes on a ring; the last (angle 315 degrees) has a seventh of the others' mass.
    "2d": lambda: _ring(8, 2.0, 0.25, [7, 7, 7, 7, 7, 7, 7, 1]),
    # The uniform 8-Gaussian ring used by the engine benchmark.
    "8gaussians": lambda: _ring(8, 2.0, 0.25, [1] * 8),
}


def gmm_preset(name: str) -> GaussianMixture:
    """A preset mixture: ``"1d"``, ``"2d"`` or ``"8gaussians"``."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a preset name in {sorted(GMM_PRESETS)}, got {type(name).__name__}")
    if name not in GMM_PRESETS:
        raise unknown_name_error("name", name, GMM_PRESETS)
    return GMM_PRESETS[name]()
