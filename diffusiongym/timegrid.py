"""Time grids ``t_0 < t_1 < ... < t_m`` for Euler–Maruyama.

The first state is drawn at ``t_0 = t_start`` as ``x ~ N(0, beta(t_start)^2 I)``: this is
the exact marginal ``p_{t_start}`` up to the ``alpha(t_start) x1`` part, an
``O(alpha(t_start))`` error that the memoryless SDE forgets and the ODE carries. A small
positive ``t_start`` avoids the ``1/alpha`` singularity of ``kappa`` at ``t = 0`` (linear
and cosine schedules). ``t_end = 1`` is the data end; the model is never evaluated at
``t_end`` (Euler uses the left end point of each step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from diffusiongym.utils.validation import MAX_STEPS, as_float64_vector, check_positive_int, check_real

__all__ = ["make_time_grid", "DEFAULT_T_START"]

DEFAULT_T_START = 1e-3


def make_time_grid(
    steps: int | None = None,
    t_start: float = DEFAULT_T_START,
    t_end: float = 1.0,
    grid: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """Return the grid as a float64 tensor of shape ``(steps + 1,)``.

    Parameters
    ----------
    steps : int, optional
        Number of uniform Euler steps, ``1 <= steps <= MAX_STEPS`` (100,000); numpy integers
        are accepted. Ignored when ``grid`` is given.
    t_start, t_end : float
        End points, ``0 <= t_start < t_end <= 1``.
    grid : 1-D tensor or sequence, optional
        A user grid; must be strictly increasing inside ``[0, 1]``, at most ``MAX_STEPS + 1`` points.

    Raises
    ------
    TypeError
        ``steps`` not an integer, ``t_start`` / ``t_end`` not real numbers, ``grid`` not numeric.
    ValueError
        Out-of-range values (naming the argument).
    """
    if grid is not None:
        g = as_float64_vector("grid", grid, "time points")
        if g.numel() > MAX_STEPS + 1:
            raise ValueError(f"grid: expected at most {MAX_STEPS + 1} time points, got {g.numel()}")
        if not bool(torch.isfinite(g).all()):
            raise ValueError("grid: expected finite times, got NaN or inf")
        if not torch.all(g[1:] > g[:-1]):
            raise ValueError("grid: expected strictly increasing times")
        if g[0] < 0 or g[-1] > 1:
            raise ValueError(f"grid: expected times inside [0, 1], got [{float(g[0])}, {float(g[-1])}]")
        return g
    steps = check_positive_int("steps", steps, maximum=MAX_STEPS)
    t_start = check_real("t_start", t_start)
    t_end = check_real("t_end", t_end)
    if not 0.0 <= t_start < t_end <= 1.0:
        raise ValueError(f"t_start, t_end: expected 0 <= t_start < t_end <= 1, got t_start={t_start}, t_end={t_end}")
    return torch.linspace(t_start, t_end, steps + 1, dtype=torch.float64)
