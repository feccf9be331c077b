"""Resampling schemes and the effective sample size of weighted particle systems.

Particles come in ``R`` independent groups (the replicates of :func:`~diffusiongym.guidance.smc`)
of ``N`` particles each; weights are given as unnormalised log weights of shape ``(R, N)``.
Both schemes are *unbiased*: the number of offspring ``c_i`` of particle ``i`` has
``E[c_i] = N W_i`` with ``W_i`` the normalised weight.

- ``"multinomial"``: ``N`` independent draws from ``Categorical(W)``.
- ``"systematic"``: one uniform ``U`` per group, offspring of the points ``(j + U) / N``,
  ``j = 0..N-1``, in the cumulative weights; ``c_i`` is then ``floor(N W_i)`` or
  ``ceil(N W_i)`` (lower variance, the usual default).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusiongym.utils.validation import check_positive_int, unknown_name_error

__all__ = ["RESAMPLING_SCHEMES", "resample_indices", "effective_sample_size", "normalized_log_weights"]

RESAMPLING_SCHEMES = ("systematic", "multinomial")


def _check_log_weights(log_weights: Tensor) -> Tensor:
    if not isinstance(log_weights, Tensor):
        raise TypeError(
            f"log_weights: expected a torch.Tensor of shape (R, N) or (N,), got {type(log_weights).__name__}"
        )
    if log_weights.ndim not in (1, 2) or log_weights.shape[-1] == 0:
        raise ValueError(f"log_weights: expected shape (R, N) or (N,) with N >= 1, got {tuple(log_weights.shape)}")
    if not log_weights.is_floating_point():
        raise TypeError(f"log_weights: expected a floating-point tensor, got {log_weights.dtype}")
    if bool(torch.isnan(log_weights).any()) or bool((log_weights == math.inf).any()):
        raise ValueError("log_weights: expected finite values or -inf, got NaN or +inf")
    if bool((log_weights == -math.inf).all(-1).any()):
        raise ValueError("log_weights: every weight of a group is zero (all -inf); nothing to resample")
    return log_weights


def normalized_log_weights(log_weights: Tensor) -> Tensor:
    """``log W`` with ``W`` summing to one along the last dimension (same shape)."""
    lw = _check_log_weights(log_weights)
    return lw - torch.logsumexp(lw, dim=-1, keepdim=True)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """``ESS = (sum_i w_i)^2 / sum_i w_i^2`` along the last dimension, in ``[1, N]``.

    ``log_weights`` ``(R, N)`` or ``(N,)`` gives ``(R,)`` or a 0-d tensor; computed stably
    in log space as ``exp(2 logsumexp(lw) - logsumexp(2 lw))``.
    """
    lw = _check_log_weights(log_weights)
    return torch.exp(2 * torch.logsumexp(lw, dim=-1) - torch.logsumexp(2 * lw, dim=-1))


def resample_indices(
    log_weights: Tensor, scheme: str = "systematic", *, num: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Ancestor indices drawn within each group, shape ``(R, num)`` (or ``(num,)`` for 1-D input).

    Parameters
    ----------
    log_weights : Tensor, (R, N) or (N,)
        Unnormalised log weights (``-inf`` for zero weight; not all of a group).
    scheme : {"systematic", "multinomial"}
    num : int, optional
        Offspring per group (default ``N``); expected counts are ``num * W_i``.
    generator : torch.Generator, optional
        The randomness (on ``log_weights``' device).

    Returns
    -------
    LongTensor of indices into the last dimension (``0..N-1``), sorted for ``"systematic"``.
    """
    if not isinstance(scheme, str) or scheme not in RESAMPLING_SCHEMES:
        raise unknown_name_error("scheme", scheme, RESAMPLING_SCHEMES)
    lw = normalized_log_weights(log_weights)
    flat = lw.ndim == 1
    lw = lw[None] if flat else lw
    groups, n = lw.shape
    num = n if num is None else check_positive_int("num", num)
    w = lw.to(torch.float64).exp()
    if scheme == "multinomial":
        idx = torch.multinomial(w, num, replacement=True, generator=generator)
    else:
        u = torch.rand(groups, 1, generator=generator, dtype=torch.float64, device=w.device)
        points = (torch.arange(num, dtype=torch.float64, device=w.device) + u) / num
        cdf = w.cumsum(-1)
        cdf = cdf / cdf[:, -1:]  # exact 1 at the end: no index N from rounding
        idx = torch.searchsorted(cdf, points, right=True).clamp_(max=n - 1)
    return idx[0] if flat else idx
