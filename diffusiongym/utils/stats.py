"""Two-sample statistics used to compare sample sets with exact distributions."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["energy_distance"]


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic).

    ``x`` of shape ``(n, d)`` and ``y`` of shape ``(m, d)`` (flattened beyond dim 1);
    computed in float64. Zero iff the distributions agree (for large samples); its
    null distribution depends on ``n``, so tests calibrate thresholds on exact-vs-exact
    draws of the same sizes.
    """
    x = x.reshape(x.shape[0], -1).to(torch.float64)
    y = y.reshape(y.shape[0], -1).to(torch.float64)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"y: expected {x.shape[1]} features (as x), got {y.shape[1]}")
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())
