"""Value Matching's regression targets, losses and per-time weights.

- :func:`time_weights`: the per-grid-point loss weights (``"variance"``, ``"uniform"``).
- ``target="cost_to_go"``: the squared loss onto ``C_k`` (:attr:`~diffusiongym.sampling.Trajectory.cost_to_go`).
- ``target="soft"``: :func:`soft_targets` ``T_k`` and :func:`soft_loss`, whose minimiser is
  ``V* = -log E_base[exp(lambda r) | x_k]`` from the samples of any control, and the centre
  :func:`soft_center` (``docs/maths.md``, Value Matching).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.logprob import step_log_ratios
from diffusiongym.distributed.collectives import gather_cat
from diffusiongym.utils.validation import unknown_name_error

__all__ = ["TARGETS", "TIME_WEIGHTINGS", "SOFT_LINEAR_FROM", "soft_center", "soft_loss", "soft_targets", "time_weights"]

TIME_WEIGHTINGS = ("variance", "uniform")
TARGETS = ("cost_to_go", "soft")
#: ``f(d) = exp(d) - d - 1`` continues linearly beyond ``d = SOFT_LINEAR_FROM`` (same value and
#: slope there): a target far below ``V`` cannot overflow the loss
SOFT_LINEAR_FROM = 10.0


def time_weights(env: DiffusionEnvironment, times: Tensor, kind: str = "variance") -> Tensor:
    """Per-grid-point loss weights, float64 of shape ``(m + 1,)``, mean 1.

    ``"variance"``: ``w_k ∝ 1 / (1 + 1/2 sum_{i >= k} sigma(t_i)^2 h_i)`` (left-point rule
    for ``int_{t_k}^1 sigma^2 dt``); ``"uniform"``: all ones.
    """
    if kind not in TIME_WEIGHTINGS:
        raise unknown_name_error("time_weighting", kind, TIME_WEIGHTINGS)
    times = torch.as_tensor(times, dtype=torch.float64)
    if kind == "uniform":
        return torch.ones_like(times)
    h = times[1:] - times[:-1]
    sig2h = env.sigma(times[:-1]).to(torch.float64) ** 2 * h
    remaining = torch.cat([sig2h.flip(0).cumsum(0).flip(0), sig2h.new_zeros(1)])
    w = 1.0 / (1.0 + 0.5 * remaining)
    return w / w.mean()


def soft_targets(traj: Any) -> Tensor:
    """``T_k = sum_{i >= k} -log(dP_base / dP_u)_i - lambda r(x_m)``, shape ``(m + 1, n)``
    (``T_m`` the terminal cost): the targets of ``target="soft"`` from a trajectory sampled
    with ``store=("controls", "noises")``."""
    steps = -step_log_ratios(traj)  # (m, n): 1/2 h |u|^2 + sqrt(h) u . z
    tail = torch.cat([steps.flip(0).cumsum(0).flip(0), torch.zeros_like(steps[:1])])
    return tail + traj.terminal_cost


def soft_loss(d: Tensor) -> Tensor:
    """``f(d) = exp(d) - d - 1`` (elementwise, ``>= 0``, minimum 0 at ``d = 0``), continued
    linearly from ``d = SOFT_LINEAR_FROM``. ``E[f(V - T)]`` is minimised by ``V = -log E exp(-T)``."""
    c = SOFT_LINEAR_FROM
    return torch.exp(d.clamp(max=c)) * (1 + (d - c).clamp(min=0)) - d - 1


def soft_center(shards: list[tuple[Tensor, dict[str, Tensor], Tensor]], total: int) -> Tensor:
    """``c_k = -log mean exp(-T_k)`` over every shard's buffered targets, shape ``(m + 1,)``."""
    local = torch.logsumexp(torch.cat([d[2] for d in shards], 1).neg(), 1)  # (m + 1,)
    return -(torch.logsumexp(gather_cat(local[None]), 0) - math.log(total))
