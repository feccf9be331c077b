"""Likelihood-ratio steps of the lean adjoint (``AdjointMatchingConfig(likelihood_ratio=theta)``).

Why (``docs/maths.md``, "Adjoint Matching: likelihood-ratio steps"): where the base drift
separates narrow modes, noise-fixed flows jump between modes, so the product of Jacobians
``prod (I + h db/dx)`` explodes on the rare paths that linger between them. The information
on how much mass each mode should get is then carried by rare, huge adjoints and the sample
mean of ``-sigma a`` is biased low at any affordable batch (GMM1D-v0: from one state at
``t = 0.6``, 1.1-1.5 against ``u* = 4.49`` at 2e4 paths).

The Euler–Maruyama step is Gaussian, ``x_{k+1} ~ N(x_k + h_k (b + sigma u), s_k^2 I)`` with
``s_k = sigma_k sqrt(h_k)`` and ``x_{k+1} = .. + s_k z_k``, so for any ``f``::

    grad_{x_k} E[f(x_{k+1}) | x_k] = E[(I + h_k db/dx)^T z_k f(x_{k+1}) / s_k]

(the ``du/dx`` terms dropped, as in the lean adjoint: they vanish in expectation at the
optimum). With ``f`` the cost-to-go ``C_{k+1}``::

    a_k = (I + h_k db/dx (x_k, t_k))^T [z_k (C_{k+1} - c_k) / s_k + g_k],

where ``c_k`` is the leave-one-out batch mean of ``C_{k+1} - s_k z_k . g_k`` (a baseline
independent of ``z_k``) and ``g_k = -u_k / sigma_k`` (a function of ``x_k``) is a linear
control variate: since ``E[z z^T] = I``, subtracting ``s_k z_k . g_k`` from the cost and
adding ``g_k`` back keeps the mean while the part of ``C_{k+1}`` linear in ``z_k`` no
longer adds noise (without ``controls``, ``g_k = 0``).

This ``a_k`` has the conditional mean of the lean adjoint at the optimum but no Jacobian
product after step ``k``. It is used only where the step *expands*: where
``(I + h_k db/dx)^T`` stretches a random probe direction by more than ``1 + theta``. The
choice depends on ``x_k`` and an independent probe only, so every mix keeps the fixed
point. Cost: two more vector-Jacobian products per step; in high dimension its noise
grows with ``d``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffusiongym.sampling import StepSchedule

__all__ = ["centred_costs", "check_path_inputs", "expands", "likelihood_ratio_adjoint", "likelihood_ratio_vector"]


def check_path_inputs(
    states: Tensor, theta: float, noises: Tensor | None, cost_to_go: Tensor | None, controls: Tensor | None
) -> None:
    """Validate ``theta >= 0`` and the path tensors against ``states`` ``(m + 1, n, *shape)``."""
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta >= 0:
        raise ValueError(f"likelihood_ratio: expected a non-negative expansion threshold or None, got {theta!r}")
    if noises is None or cost_to_go is None:
        raise ValueError("likelihood_ratio: needs the paths' noises (m, n, *shape) and cost_to_go (m + 1, n) as well")
    m, n = states.shape[0] - 1, states.shape[1]
    if tuple(noises.shape) != (m, *states.shape[1:]):
        raise ValueError(
            f"noises: expected shape {(m, *states.shape[1:])} (one z_k per step), got {tuple(noises.shape)}"
        )
    if tuple(cost_to_go.shape) != (m + 1, n):
        raise ValueError(f"cost_to_go: expected shape {(m + 1, n)}, got {tuple(cost_to_go.shape)}")
    if controls is not None and tuple(controls.shape) != tuple(noises.shape):
        raise ValueError(
            f"controls: expected shape {tuple(noises.shape)} (one u_k per step), got {tuple(controls.shape)}"
        )


def centred_costs(
    cost_to_go: Tensor, noises: Tensor, valid: Tensor, step_sigma: Tensor, sigma: Tensor, controls: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """``C_{k+1} - s_k z_k . g_k - c_k`` per step and path, ``(m, n)``, and the control
    variate ``g_k = -u_k / sigma_k`` ``(m, n, *shape)`` (``None`` without ``controls``).

    ``step_sigma`` is ``s_k`` shaped ``(m, 1)``, ``sigma`` is ``sigma_k`` shaped
    ``(m, 1, ..., 1)``; ``c_k`` is the leave-one-out mean over the valid paths.
    """
    m, n = noises.shape[:2]
    cost = cost_to_go[1:]  # C_{k+1}
    guess = None
    if controls is not None:
        guess = -controls / sigma
        cost = cost - step_sigma * (noises * guess).reshape(m, n, -1).sum(-1)
    cost = torch.where(valid, cost, torch.zeros_like(cost))
    others = (valid.sum().to(cost) - valid.to(cost)).clamp_min(1.0)
    return cost - (cost.sum(1, keepdim=True) - cost) / others, guess


def likelihood_ratio_vector(
    z_k: Tensor, centred_k: Tensor, step_sigma_k: Tensor, guess_k: Tensor | None, valid: Tensor
) -> Tensor:
    """``z_k (C_{k+1} - c_k) / s_k + g_k`` (before the transpose Jacobian), zero on invalid
    paths; shape of ``z_k`` ``(n, *shape)``."""
    per_sample = (z_k.shape[0],) + (1,) * (z_k.ndim - 1)
    vec = z_k * (centred_k / step_sigma_k).reshape(per_sample)
    if guess_k is not None:
        vec = vec + guess_k
    return torch.where(valid.reshape(per_sample), vec, torch.zeros_like(vec))


def expands(probe: Tensor, moved: Tensor, theta: float) -> Tensor:
    """Paths ``(n,)`` where the step stretched ``probe`` into ``moved`` by more than ``1 + theta``."""
    n = probe.shape[0]
    growth = moved.reshape(n, -1).norm(dim=1) / probe.reshape(n, -1).norm(dim=1).clamp_min(
        torch.finfo(probe.dtype).tiny
    )
    return growth > 1.0 + theta


def likelihood_ratio_adjoint(
    a_m: Tensor,
    valid: Tensor,
    transport: Callable[[int, list[Tensor]], list[Tensor]],
    schedule: StepSchedule,
    noises: Tensor,
    cost_to_go: Tensor,
    controls: Tensor | None,
    theta: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The lean adjoint ``(m + 1, n, *shape)`` from ``a_m`` with likelihood-ratio steps
    wherever the base drift expands (see the module docstring).

    ``transport(k, vectors)`` applies ``(I + h_k db/dx (x_k, t_k))^T`` (see
    :func:`~diffusiongym.trainers.adjoint_matching.lean_adjoint.base_transport`); the probe
    directions come from ``generator``.
    """
    m = len(schedule)
    per_sample = (a_m.shape[0],) + (1,) * (a_m.ndim - 1)
    step_sigma = torch.tensor(schedule.step_sigma, dtype=a_m.dtype, device=a_m.device).reshape(m, 1)
    sigma = torch.tensor(schedule.sigma, dtype=a_m.dtype, device=a_m.device).reshape(m, *([1] * a_m.ndim))
    z = noises.to(a_m)
    centred, guess = centred_costs(
        cost_to_go.to(a_m), z, valid, step_sigma, sigma, None if controls is None else controls.to(a_m)
    )
    out, a = [a_m], a_m
    for k in reversed(range(m)):
        probe = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype)
        lr_vec = likelihood_ratio_vector(z[k], centred[k], step_sigma[k], None if guess is None else guess[k], valid)
        propagated, moved, estimated = transport(k, [a, probe, lr_vec])
        a = torch.where(expands(probe, moved, theta).reshape(per_sample), estimated, propagated)
        out.append(a)
    return torch.stack(out[::-1])
