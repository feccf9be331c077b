"""Mixup restarts (``AdjointMatchingConfig(restarts=..., restart_after=...)``).

Extra paths per iteration start at one random grid time ``t_k >= restart_after`` from
*mixup* states ``x_i + c (x_j - x_i)`` (``c ~ U(0, 1)``, ``i, j`` random paths of the batch)
and run to ``t = 1`` with the fine-tuned model; their lean adjoints join the regression.

The minimiser is unchanged: the target's conditional mean given ``x_k`` involves only the
on-policy dynamics after ``t_k``, so any state distribution with enough support will do.
But the regression now sees the low-density region *between* modes, which is where the lean
adjoint carries the information on how much mass each mode should get (on-policy, that
region is almost never visited late in the path, and the pathwise estimate of the mode
weights is a rare-event one).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["first_restart_index", "mixup_states"]


def first_restart_index(step_times: list[float], restart_after: float) -> int:
    """The first step ``k`` with ``t_k >= restart_after`` (the last step if none);
    ``step_times`` are the ``m`` left ends ``t_0 .. t_{m-1}`` of the grid's steps."""
    return next((k for k, t in enumerate(step_times) if t >= restart_after), len(step_times) - 1)


def mixup_states(
    states: Tensor, first: int, count: int, generator: torch.Generator | None = None
) -> tuple[int, Tensor, Tensor]:
    """Draw a restart grid index ``k`` in ``[first, m)`` and ``count`` mixup states at it.

    Parameters
    ----------
    states : Tensor, (m + 1, n, *sample_shape)
        The batch's paths.
    first : int
        Earliest restart index (:func:`first_restart_index`).
    count : int
        Number of restarted paths.
    generator : torch.Generator, optional

    Returns
    -------
    k : int
        The restart index.
    x : Tensor, (count, *sample_shape)
        ``x_i + c (x_j - x_i)`` at ``t_k``.
    rows : Tensor, (count,)
        The ``i`` of each restart (to pick its conditioning).
    """
    m, n = states.shape[0] - 1, states.shape[1]
    device = states.device
    k = first + int(torch.randint(0, m - first, (1,), generator=generator, device=device))
    i = torch.randint(0, n, (count,), generator=generator, device=device)
    j = torch.randint(0, n, (count,), generator=generator, device=device)
    mix = torch.rand((count,) + (1,) * (states.ndim - 2), generator=generator, device=device, dtype=states.dtype)
    return k, states[k, i] + mix * (states[k, j] - states[k, i]), i
