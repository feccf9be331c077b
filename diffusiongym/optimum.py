"""Monte-Carlo estimates of a task's base and optimal objectives, for tasks with no closed form.

For the KL-regularised objective ``J(q) = E_q[lambda r(X1)] - KL(q || p)`` the base model
scores ``J(p) = lambda E_p[r]`` and the optimum is ``J* = log E_p[exp(lambda r(X1))]``, attained by
the tilt ``p* ∝ p exp(lambda r)`` (``docs/maths.md``). Both are expectations under the base, so
``n`` base samples estimate them: ``J(p)`` by the sample mean, ``J*`` by the log of the mean of
the importance weights ``w_i = exp(lambda r_i)`` (base as the proposal for ``p*``), with the
delta-method standard error ``sd(w) / (sqrt(n) mean(w))``. The same weights, self-normalised,
give ``E_{p*}[r]``, ``KL(p* || p) = lambda E_{p*}[r] - J*`` and the effective sample size
``(sum w)^2 / sum w^2``, which says how far the estimate can be trusted (the tilt must not put
its mass where the base sample has no draws).

The estimate is of the optimum *of the task's sampling chain*: the base samples come from the
Euler–Maruyama chain on the task's own grid, the chain every method is evaluated on. For that
chain with Gaussian steps the KL of a controlled chain is exactly ``sum 1/2 |u|^2 h``, and
``J*`` bounds every control's objective (the oracle's ``u*`` on the GMM tasks reaches
0.98-1.00 of the gap on 100 steps).

:class:`OptimumEstimate` has the ``base_objective`` / ``optimal_objective`` / ``gap_closed``
of :class:`~diffusiongym.oracle.TiltOracle`, so a task given one as its ``oracle`` gets
``gap_closed`` from every trainer's ``evaluate``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from diffusiongym.sampling import sample
from diffusiongym.utils.validation import check_positive_int, check_real, check_tensor

__all__ = ["OptimumEstimate", "estimate_optimum", "optimum_from_rewards"]


@dataclass(frozen=True)
class OptimumEstimate:
    """Estimates of the base objective and of the optimal objective, with standard errors.

    Attributes
    ----------
    num_samples : int
        Base samples used.
    reward_scale : float
        ``lambda``.
    base_objective, base_objective_se : float
        ``lambda E_p[r]`` and its standard error.
    optimal_objective, optimal_objective_se : float
        ``log E_p[exp(lambda r)]`` and its delta-method standard error.
    optimal_reward : float
        ``E_{p*}[r]`` (self-normalised importance sampling).
    optimal_kl : float
        ``KL(p* || p) = lambda E_{p*}[r] - J*``.
    effective_sample_size : float
        ``(sum w)^2 / sum w^2`` of the weights ``w = exp(lambda r)``.
    base_statistics, optimal_statistics : dict of str to float
        ``E_p[f]`` and ``E_{p*}[f]`` (self-normalised) of each statistic ``f`` asked for
        (:func:`estimate_optimum`'s ``statistics``); empty by default.
    """

    num_samples: int
    reward_scale: float
    base_objective: float
    base_objective_se: float
    optimal_objective: float
    optimal_objective_se: float
    optimal_reward: float
    optimal_kl: float
    effective_sample_size: float
    base_statistics: dict[str, float] = field(default_factory=dict)
    optimal_statistics: dict[str, float] = field(default_factory=dict)

    @property
    def gap(self) -> float:
        """``J* - J(p)``."""
        return self.optimal_objective - self.base_objective

    @property
    def gap_se(self) -> float:
        """Standard error of :attr:`gap` (the two estimates share their samples; the bound
        ``se_base + se_opt`` holds whatever their correlation)."""
        return self.base_objective_se + self.optimal_objective_se

    def gap_closed(self, objective: float) -> float:
        """``(objective - J(p)) / (J* - J(p))``; ``ValueError`` when the estimated gap is not
        above its own standard error (the fraction would be noise)."""
        objective = check_real("objective", objective)
        if not self.gap > self.gap_se:
            raise ValueError(
                f"objective: the estimated gap {self.gap:.4g} is within its standard error {self.gap_se:.3g}; "
                "gap_closed is undefined"
            )
        return (objective - self.base_objective) / self.gap

    def __str__(self) -> str:
        return (
            f"base objective {self.base_objective:.4f} ± {self.base_objective_se:.4f}, optimal objective "
            f"{self.optimal_objective:.4f} ± {self.optimal_objective_se:.4f} (KL(p*||p) {self.optimal_kl:.3f}, "
            f"E_p* r {self.optimal_reward:.4f}, ESS {self.effective_sample_size:.0f} of {self.num_samples})"
        )


def optimum_from_rewards(
    rewards: Tensor, reward_scale: float, statistics: Mapping[str, Tensor] | None = None
) -> OptimumEstimate:
    """:class:`OptimumEstimate` from the rewards ``r(X1_i)`` of ``n >= 2`` independent base samples.

    Parameters
    ----------
    rewards : Tensor, (n,)
        Finite rewards of base samples (computed in float64 here).
    reward_scale : float
        ``lambda``.
    statistics : mapping of str to Tensor (n,), optional
        Per-sample values ``f(X1_i)`` whose base and tilted means are reported.
    """
    lam = check_real("reward_scale", reward_scale)
    r = check_tensor("rewards", rewards).detach().to(torch.float64).flatten()
    n = r.numel()
    if n < 2:
        raise ValueError(f"rewards: expected at least 2 samples, got {n}")
    if not torch.isfinite(r).all():
        raise ValueError(f"rewards: expected finite values, got {int((~torch.isfinite(r)).sum())} non-finite of {n}")
    scaled = lam * r
    shift = scaled.max()
    w = torch.exp(scaled - shift)  # weights up to the factor exp(shift); in (0, 1]
    mean_w = w.mean()
    optimal = float(torch.log(mean_w) + shift)
    optimal_se = float(w.std() / (math.sqrt(n) * mean_w))
    normalized = w / w.sum()
    optimal_reward = float((normalized * r).sum())
    base_stats, optimal_stats = {}, {}
    for name, values in (statistics or {}).items():
        f = check_tensor(f"statistics[{name!r}]", values).detach().to(torch.float64).flatten()
        if f.shape != r.shape:
            raise ValueError(
                f"statistics[{name!r}]: expected shape {tuple(r.shape)} like rewards, got {tuple(f.shape)}"
            )
        base_stats[name], optimal_stats[name] = float(f.mean()), float((normalized * f).sum())
    return OptimumEstimate(
        num_samples=n,
        reward_scale=lam,
        base_objective=float(scaled.mean()),
        base_objective_se=float(scaled.std() / math.sqrt(n)),
        optimal_objective=optimal,
        optimal_objective_se=optimal_se,
        optimal_reward=optimal_reward,
        optimal_kl=lam * optimal_reward - optimal,
        effective_sample_size=float(1.0 / (normalized**2).sum()),
        base_statistics=base_stats,
        optimal_statistics=optimal_stats,
    )


def estimate_optimum(
    task: Any,
    num_samples: int = 100_000,
    *,
    seed: int = 0,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    statistics: Mapping[str, Callable[[Tensor], Tensor]] | None = None,
    progress: bool = True,
) -> OptimumEstimate:
    """Estimate ``task``'s base and optimal objectives from ``num_samples`` base samples.

    The samples are drawn by :func:`diffusiongym.sample` on the task's grid
    (``task.time_grid()``), with the task's conditioning drawn per sample, in batches of
    ``batch_size`` from one generator seeded with ``seed`` (the result does not depend on
    the batch size only up to the order of the random draws: keep it fixed to reproduce).

    Parameters
    ----------
    task : diffusiongym.tasks.Task
        A diffusion/flow task (``environment``, ``reward``, ``reward_scale``, ``time_grid``).
    num_samples : int
        At least 2; the issue-grade estimate uses 100 000 or more.
    seed, batch_size, device, progress
        Randomness, memory, placement and a tqdm bar over batches.
    statistics : mapping of str to callable, optional
        ``f(x1) -> (n,)`` per batch of samples ``x1`` (e.g. a class indicator): their means
        under the base and under ``p*`` are reported (``base_statistics``,
        ``optimal_statistics``).

    Returns
    -------
    OptimumEstimate
    """
    n = check_positive_int("num_samples", num_samples)
    if n < 2:
        raise ValueError(f"num_samples: expected at least 2, got {n}")
    batch = check_positive_int("batch_size", batch_size)
    for name in ("environment", "reward", "reward_scale", "time_grid"):
        if not hasattr(task, name):
            raise TypeError(f"task: expected a diffusion Task (with {name!r}), got {type(task).__name__}")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    grid = task.time_grid()
    statistics = dict(statistics or {})
    for name, f in statistics.items():
        if not callable(f):
            raise TypeError(f"statistics[{name!r}]: expected a callable f(x1) -> (n,), got {type(f).__name__}")
    rewards: list[Tensor] = []
    values: dict[str, list[Tensor]] = {name: [] for name in statistics}
    with torch.no_grad():
        for start in tqdm(range(0, n, batch), desc="base samples", disable=not progress):
            m = min(batch, n - start)
            cond = {name: spec[1](m, gen, device) for name, spec in getattr(task, "conditioning", {}).items()}
            traj = sample(task.environment, m, grid=grid, reward=task.reward, cond=cond, generator=gen, device=device)
            rewards.append(traj.reward.detach().to("cpu", torch.float64))
            for name, f in statistics.items():
                values[name].append(torch.as_tensor(f(traj.x1)).detach().to("cpu", torch.float64).flatten())
    stats = {name: torch.cat(v) for name, v in values.items()}
    return optimum_from_rewards(torch.cat(rewards), task.reward_scale, stats)
