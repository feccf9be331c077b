"""Baselines for inference-time reward guidance: best-of-n, importance resampling, gradient guidance.

- :func:`best_of_n`: per output sample, the highest-reward of ``n`` base samples. Targets
  high reward, not ``p*``: as ``n`` grows it concentrates on the reward's maximisers within the
  base support.
- :func:`importance_resampling`: ``N`` base samples weighted by ``exp(lambda r)`` and
  resampled (sampling-importance-resampling); consistent for ``p*`` (the tilt of the base
  chain's law) as ``N -> inf``, and ``log mean exp(lambda r)`` is the plain Monte Carlo
  estimate of ``log Z``. It is SMC with the twist ``psi = 1``.
- :func:`gradient_guidance` (DPS-style): the controlled chain with
  ``u(x, t) = sigma(t) g a(t) lambda grad_x r(x1_hat(x, t))``, i.e. ``u = -sigma grad V`` for
  the guess ``V ~ -lambda r(E[x1 | x_t = x])`` (Jensen-optimistic; exact only for linear ``r``
  with a Gaussian posterior whose covariance does not depend on ``x``). The samples come from
  a controlled chain, so ``E[lambda r] - KL`` (Girsanov) is defined and reported, but the law
  is biased away from ``p*`` in general. Needs a differentiable reward; each step costs one
  forward for the drift and one forward + one backward through the model for the gradient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment, time_vector
from diffusiongym.guidance.resampling import RESAMPLING_SCHEMES, effective_sample_size, resample_indices
from diffusiongym.guidance.result import CountingModel, GuidanceResult, counting_environment
from diffusiongym.guidance.smc import reindex_cond
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import resolve_generator, sample
from diffusiongym.tasks import check_reward
from diffusiongym.timegrid import DEFAULT_T_START
from diffusiongym.utils.validation import check_positive_int, check_real, unknown_name_error

__all__ = ["RewardGradientControl", "best_of_n", "importance_resampling", "gradient_guidance"]


class RewardGradientControl:
    """``u(x, t) = sigma(t) * guidance_scale * a(t) * lambda * grad_x r(x1_hat(x, t))`` (DPS-style).

    Parameters
    ----------
    env : DiffusionEnvironment
        The base model (its ``pred_final`` and ``sigma``); ``sigma > 0``.
    reward : Reward
        Differentiable (``reward.differentiable``), evaluated on ``x1_hat``.
    reward_scale : float
        ``lambda``.
    guidance_scale : float
        ``g``; 1 is the plain ``u = -sigma grad V`` with ``V = -lambda r(x1_hat)``.
    anneal : callable, optional
        ``a(t)`` for ``t`` of shape ``(n,)``; default 1.
    """

    def __init__(
        self,
        env: DiffusionEnvironment,
        reward: Reward,
        reward_scale: float = 1.0,
        guidance_scale: float = 1.0,
        anneal: Callable[[Tensor], Tensor] | None = None,
    ):
        if not isinstance(env, DiffusionEnvironment):
            raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
        if env.noise.is_deterministic:
            raise ValueError("env: sigma = 0 (noise='ode') admits no control; use a stochastic noise")
        self.reward = check_reward(reward)
        if not getattr(self.reward, "differentiable", False):
            raise ValueError(f"reward: gradient guidance needs a differentiable reward, got {self.reward!r}")
        self.reward_scale = check_real("reward_scale", reward_scale)
        self.guidance_scale = check_real("guidance_scale", guidance_scale)
        if anneal is not None and not callable(anneal):
            raise TypeError(f"anneal: expected a callable t -> factor, got {type(anneal).__name__}")
        self.anneal = anneal
        self.env = env

    def with_env(self, env: DiffusionEnvironment) -> RewardGradientControl:
        """The same control on another environment (e.g. one that counts model calls)."""
        new = copy.copy(self)
        new.env = env
        return new

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t_vec = time_vector(t, x).detach()
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            values = self.reward.evaluate(self.env.pred_final(xg, t_vec, **cond), **cond)
            (grad,) = torch.autograd.grad(values.sum(), xg)
        if isinstance(self.env.model, CountingModel):
            self.env.model.add_backward(x.shape[0])
        factor = self.env.sigma(t_vec.to(torch.float64)).to(x.dtype) * (self.reward_scale * self.guidance_scale)
        if self.anneal is not None:
            factor = factor * self.anneal(t_vec).to(x.dtype)
        return torch.nan_to_num(factor.reshape(-1, *([1] * (x.ndim - 1))) * grad.detach(), nan=0.0)

    def __repr__(self) -> str:
        return f"RewardGradientControl({self.reward!r}, reward_scale={self.reward_scale}, guidance_scale={self.guidance_scale})"


def _grid_kwargs(steps: int, t_start: float, t_end: float, grid: Any) -> dict[str, Any]:
    return {"steps": steps, "t_start": t_start, "t_end": t_end, "grid": grid}


def _checked_cond(cond: Any) -> dict[str, Any]:
    if cond is not None and not isinstance(cond, dict):
        raise TypeError(f"cond: expected a dict of conditioning keyword arguments, got {type(cond).__name__}")
    return dict(cond or {})


def best_of_n(
    env: DiffusionEnvironment,
    reward: Reward,
    num_samples: int,
    n: int,
    *,
    steps: int = 100,
    t_start: float = DEFAULT_T_START,
    t_end: float = 1.0,
    grid: Tensor | Sequence[float] | None = None,
    cond: dict[str, Any] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> GuidanceResult:
    """``num_samples`` outputs, each the best (highest valid ``r``) of ``n`` base samples.

    ``cond`` tensors with first dimension ``num_samples`` are per output sample (each candidate
    of output ``i`` gets row ``i``). Costs ``num_samples * n * steps`` model evaluations; all
    ``num_samples * n`` candidates are sampled in one batch.
    """
    reward = check_reward(reward)
    num_samples = check_positive_int("num_samples", num_samples)
    n = check_positive_int("n", n)
    cond = _checked_cond(cond)
    total = num_samples * n
    rows = torch.arange(num_samples).repeat_interleave(n)
    cand_cond = reindex_cond(cond, rows.to(device if device is not None else "cpu"), num_samples)
    counted, counter = counting_environment(env)
    traj = sample(
        counted,
        total,
        reward=reward,
        cond=cand_cond,
        seed=seed,
        generator=generator,
        device=device,
        dtype=dtype,
        **_grid_kwargs(steps, t_start, t_end, grid),
    )
    r = torch.where(traj.valid, traj.reward, torch.full_like(traj.reward, -math.inf)).view(num_samples, n)
    best = r.argmax(1) + torch.arange(num_samples, device=r.device) * n
    return GuidanceResult(
        x1=traj.x1[best],
        reward=traj.reward[best],
        model_evals=counter.evals,
        cond=reindex_cond(cand_cond, best, total),
        info={"n": n, "valid": traj.valid[best]},
    )


def importance_resampling(
    env: DiffusionEnvironment,
    reward: Reward,
    reward_scale: float,
    num_samples: int,
    *,
    num_proposals: int | None = None,
    resampling: str = "systematic",
    steps: int = 100,
    t_start: float = DEFAULT_T_START,
    t_end: float = 1.0,
    grid: Tensor | Sequence[float] | None = None,
    cond: dict[str, Any] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> GuidanceResult:
    """Sampling-importance-resampling: ``num_proposals`` (default ``num_samples``) base samples,
    weights ``exp(lambda r)`` (0 where invalid), ``num_samples`` draws by ``resampling``.

    ``log_normalizer`` is ``log mean exp(lambda r)``; its standard error
    ``std(w) / (sqrt(N) mean(w))`` (delta method, i.i.d. proposals). ``info["ess"]`` is the
    effective sample size of the weights. ``cond`` tensors with first dimension
    ``num_proposals`` are per proposal.
    """
    reward = check_reward(reward)
    reward_scale = check_real("reward_scale", reward_scale)
    num_samples = check_positive_int("num_samples", num_samples)
    num_proposals = num_samples if num_proposals is None else check_positive_int("num_proposals", num_proposals)
    if not isinstance(resampling, str) or resampling not in RESAMPLING_SCHEMES:
        raise unknown_name_error("resampling", resampling, RESAMPLING_SCHEMES)
    cond = _checked_cond(cond)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    gen = resolve_generator(seed, generator, dev)
    counted, counter = counting_environment(env)
    traj = sample(
        counted,
        num_proposals,
        reward=reward,
        cond=cond,
        generator=gen,
        device=device,
        dtype=dtype,
        **_grid_kwargs(steps, t_start, t_end, grid),
    )
    log_w = torch.where(
        traj.valid,
        reward_scale * traj.reward.to(torch.float64),
        torch.full_like(traj.reward, -math.inf, dtype=torch.float64),
    )
    if bool((log_w == -math.inf).all()):
        raise RuntimeError("importance_resampling: every proposal has an invalid reward (zero weight)")
    log_z = float(torch.logsumexp(log_w, 0) - math.log(num_proposals))
    ratio = torch.exp(log_w - log_w.max())
    se = float(ratio.std() / (math.sqrt(num_proposals) * ratio.mean())) if num_proposals > 1 else math.nan
    index = resample_indices(log_w, resampling, num=num_samples, generator=gen)
    return GuidanceResult(
        x1=traj.x1[index],
        reward=traj.reward[index],
        model_evals=counter.evals,
        cond=reindex_cond(cond, index, num_proposals),
        log_normalizer=log_z,
        log_normalizer_se=se,
        info={"ess": float(effective_sample_size(log_w)), "num_proposals": num_proposals, "valid": traj.valid[index]},
    )


def gradient_guidance(
    env: DiffusionEnvironment,
    reward: Reward,
    reward_scale: float,
    num_samples: int,
    *,
    guidance_scale: float = 1.0,
    anneal: Callable[[Tensor], Tensor] | None = None,
    steps: int = 100,
    t_start: float = DEFAULT_T_START,
    t_end: float = 1.0,
    grid: Tensor | Sequence[float] | None = None,
    cond: dict[str, Any] | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> GuidanceResult:
    """Sample the chain controlled by :class:`RewardGradientControl` (DPS-style guidance).

    Returns ``objective`` (``lambda r - KL`` per sample) and ``kl`` besides the samples;
    ``model_evals`` counts the drift's forward, the gradient's forward and its backward
    (3 per sample and step).
    """
    counted, counter = counting_environment(env)
    control = RewardGradientControl(counted, reward, reward_scale, guidance_scale, anneal)
    traj = sample(
        counted,
        check_positive_int("num_samples", num_samples),
        control=control,
        reward=control.reward,
        reward_scale=control.reward_scale,
        cond=_checked_cond(cond),
        seed=seed,
        generator=generator,
        device=device,
        dtype=dtype,
        **_grid_kwargs(steps, t_start, t_end, grid),
    )
    return GuidanceResult(
        x1=traj.x1,
        reward=traj.reward,
        model_evals=counter.evals,
        cond=_checked_cond(cond),
        objective=traj.objective,
        kl=traj.kl,
        info={"valid": traj.valid, "guidance_scale": control.guidance_scale},
    )
