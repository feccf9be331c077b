"""Weighted conditional flow matching: the regression that EFM and the reward-weighted trainers share.

``flow_matching_target`` gives the noisy point and the conditional target of each
parameterisation, ``weighted_flow_matching_loss`` the self-normalised weighted loss, and
``efm_weights`` the weights ``softmax(log_w)`` with their effective sample size
(``docs/maths.md``, "Energy-weighted flow matching").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.schedulers import Scheduler
from diffusiongym.timegrid import DEFAULT_T_START
from diffusiongym.utils.validation import unknown_name_error

__all__ = ["efm_weights", "flow_matching_target", "weighted_flow_matching_loss", "check_weighted_data"]


def efm_weights(log_weights: Tensor, valid: Tensor | None = None) -> tuple[Tensor, float]:
    """Self-normalised weights ``softmax(log_weights)`` and their effective sample size.

    Parameters
    ----------
    log_weights : Tensor, (n,)
        E.g. ``beta * r``; invalid or non-finite entries get weight 0.
    valid : Tensor, (n,) bool, optional

    Returns
    -------
    weights : Tensor, (n,), summing to 1 (float64)
    ess : float
        ``1 / sum_i g_i^2``, between 1 and ``n``.
    """
    lw = log_weights.detach().to(torch.float64).flatten()
    ok = torch.isfinite(lw)
    if valid is not None:
        ok = ok & valid.flatten().to(ok.device)
    if not bool(ok.any()):
        raise ValueError("log_weights: expected at least one finite, valid entry")
    lw = torch.where(ok, lw, torch.full_like(lw, -math.inf))
    g = torch.softmax(lw, 0)
    return g, float(1.0 / (g**2).sum())


def flow_matching_target(
    parameterization: str, scheduler: Scheduler, x1: Tensor, x0: Tensor, t: Tensor
) -> tuple[Tensor, Tensor]:
    """The noisy point ``x_t`` and the conditional regression target of ``parameterization``.

    Parameters
    ----------
    x1, x0 : Tensor, (n, *sample_shape)
        Data and standard normal noise.
    t : Tensor, (n,)

    Returns
    -------
    x_t : Tensor, ``alpha x1 + beta x0``
    target : Tensor
        velocity ``d_alpha x1 + d_beta x0``, epsilon ``x0``, endpoint ``x1`` or score ``-x0 / beta``.
    """
    alpha, beta, d_alpha, d_beta = (
        c.to(x1.dtype).reshape(-1, *([1] * (x1.ndim - 1))) for c in scheduler(t.to(torch.float64))
    )
    x_t = alpha * x1 + beta * x0
    if parameterization == "velocity":
        target = d_alpha * x1 + d_beta * x0
    elif parameterization == "epsilon":
        target = x0
    elif parameterization == "endpoint":
        target = x1
    elif parameterization == "score":
        target = -x0 / beta
    else:
        raise unknown_name_error("parameterization", parameterization, ("velocity", "epsilon", "endpoint", "score"))
    return x_t, target


def _loss_weight(parameterization: str, scheduler: Scheduler, t: Tensor) -> Tensor:
    # The score target -x0/beta has variance 1/beta^2 (unbounded as t -> 1): weight by beta^2,
    # i.e. the epsilon loss, so every parameterisation has an O(1) per-time scale.
    if parameterization == "score":
        return scheduler.beta(t.to(torch.float64)) ** 2
    return torch.ones_like(t, dtype=torch.float64)


def weighted_flow_matching_loss(
    model: Callable[..., Tensor],
    parameterization: str,
    scheduler: Scheduler,
    x1: Tensor,
    weights: Tensor | None = None,
    *,
    t_range: tuple[float, float] = (DEFAULT_T_START, 1.0),
    time_power: float = 1.0,
    generator: torch.Generator | None = None,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """``sum_i g_i |model(x_t, t) - target|^2`` (mean over dimensions), ``t`` drawn in ``t_range``.

    ``weights`` of shape ``(n,)`` summing to one (uniform when ``None``). ``t = t0 + (t1 - t0)
    (1 - (1 - U)^time_power)``: ``time_power = 1`` is uniform, larger values put more draws near
    ``t1`` (the data end). The per-time minimiser (the conditional expectation) does not depend
    on the time distribution, only how the network's capacity is spread. Scalar, differentiable.
    """
    n = x1.shape[0]
    x0 = torch.randn(x1.shape, generator=generator, dtype=x1.dtype, device=x1.device)
    u = torch.rand(n, generator=generator, dtype=x1.dtype, device=x1.device)
    t = t_range[0] + (t_range[1] - t_range[0]) * (1 - (1 - u) ** time_power)
    x_t, target = flow_matching_target(parameterization, scheduler, x1, x0, t)
    err = ((model(x_t, t, **(cond or {})) - target) ** 2).reshape(n, -1).mean(1)
    err = err * _loss_weight(parameterization, scheduler, t).to(err.dtype)
    if weights is None:
        return err.mean()
    return (weights.to(err.dtype) * err).sum()


def check_weighted_data(data: object) -> tuple[Tensor, Tensor, Tensor]:
    """A fixed data set ``(x1, rewards)`` or ``(x1, rewards, valid)``: tensors with one row per
    sample, ``rewards`` of shape ``(n,)`` and ``valid`` bool ``(n,)`` (default: finite rewards).
    Returns ``(x1, rewards, valid)``; the caller checks ``x1``'s sample shape."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3) or not all(isinstance(d, Tensor) for d in data):
        raise ValueError("data: expected a tuple (x1, rewards) or (x1, rewards, valid) of tensors")
    x1, r = data[0], data[1]
    if r.shape != (x1.shape[0],):
        raise ValueError(f"data: rewards: expected shape ({x1.shape[0]},), got {tuple(r.shape)}")
    valid = data[2] if len(data) == 3 else torch.isfinite(r)
    if valid.shape != (x1.shape[0],) or valid.dtype != torch.bool:
        raise ValueError(
            f"data: valid: expected a bool tensor of shape ({x1.shape[0]},), got {valid.dtype} {tuple(valid.shape)}"
        )
    return x1, r, valid
