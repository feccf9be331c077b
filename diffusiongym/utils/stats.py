"""Two-sample statistics used to compare sample sets with exact distributions."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["energy_distance", "null_energy_threshold"]


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


def null_energy_threshold(distribution: Any, n: int, draws: int = 10, factor: float = 1.5, seed: int = 0) -> float:
    """Two-sample threshold for :func:`energy_distance` at sample size ``n``, calibrated on exact draws.

    ``factor`` times the largest of ``draws`` energy distances between two independent samples
    of size ``n`` from ``distribution`` (anything with ``sample(n, generator=...)``, e.g. a
    :class:`~diffusiongym.models.gmm.GaussianMixture`); pair ``i`` uses the seeds
    ``seed + 2 i`` and ``seed + 2 i + 1``. A sample set of size ``n`` "matches" the
    distribution when its distance to a fresh exact sample of size ``n`` stays below this.
    """
    if not (isinstance(n, int) and n > 1):
        raise ValueError(f"n: expected a sample size > 1, got {n!r}")
    if not (isinstance(draws, int) and draws > 0):
        raise ValueError(f"draws: expected a positive integer, got {draws!r}")

    def draw(s: int) -> Tensor:
        return distribution.sample(n, generator=torch.Generator().manual_seed(s))

    return float(factor) * max(energy_distance(draw(seed + 2 * i), draw(seed + 2 * i + 1)) for i in range(draws))
