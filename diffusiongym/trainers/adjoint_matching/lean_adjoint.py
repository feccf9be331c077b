"""The lean adjoint of Adjoint Matching (Domingo-Enrich et al. 2024; ``docs/maths.md``, "Adjoint Matching").

Along sampled states ``x_0 .. x_m`` on a grid ``t_0 < .. < t_m`` (``h_k = t_{k+1} - t_k``),
the lean adjoint is solved backwards with vector-Jacobian products of the **base** drift
``b = coef_x x + coef_out model(x, t)``::

    a_m = -lambda grad r(x_m),    a_k = (I + h_k d b/dx (x_k, t_k))^T a_{k+1}.

For states sampled from the base model, ``a_k`` is the pathwise gradient ``d g(x_m) / d x_k``
of the terminal cost ``g = -lambda r`` with the noise held fixed; along states of any control
it is that of the base chain driven by the shifted noises that retrace the same states. At
the optimum ``E[a_k | x_k] = grad V*(x_k, t_k)``, so the control is regressed onto
``-sigma a_k``.

Shapes: states and adjoints ``(m + 1, n, *sample_shape)``; ``times`` ``(m + 1,)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.rewards.base import Reward
from diffusiongym.sampling import StepSchedule
from diffusiongym.trainers.adjoint_matching.likelihood_ratio import check_path_inputs, likelihood_ratio_adjoint

__all__ = ["Transport", "base_transport", "check_differentiable_reward", "lean_adjoint", "terminal_adjoint"]

#: ``transport(k, [v, ...]) -> [(I + h_k d b/dx (x_k, t_k))^T v, ...]``
Transport = Callable[[int, list[Tensor]], list[Tensor]]


def check_differentiable_reward(reward: Reward) -> Reward:
    """Raise unless ``reward`` is a :class:`Reward` declaring ``differentiable = True``."""
    if not isinstance(reward, Reward):
        raise TypeError(f"reward: expected a diffusiongym Reward, got {type(reward).__name__}")
    if not getattr(reward, "differentiable", False):
        raise ValueError(
            f"reward: adjoint matching needs grad r, but {reward!r} declares differentiable=False; "
            "use a differentiable reward (e.g. CallableReward(fn, differentiable=True)) or a "
            "gradient-free method such as value matching"
        )
    return reward


def terminal_adjoint(reward: Reward, reward_scale: float, x1: Tensor, cond: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """``a_m = -lambda grad r(x_m)``, shape of ``x1`` ``(n, *sample_shape)``, and the paths
    ``(n,)`` whose reward and gradient are valid and finite (the others' rows are zero)."""
    n = x1.shape[0]
    with torch.enable_grad():
        x = x1.detach().requires_grad_(True)
        values, valid = reward(x, **cond)
        if not values.requires_grad:
            raise ValueError(f"reward: {reward!r} declares differentiable=True but its values carry no gradient to x")
        (grad_r,) = torch.autograd.grad(values.masked_fill(~valid, 0.0).sum(), x, allow_unused=True)
    if grad_r is None:
        grad_r = torch.zeros_like(x1)
    valid = valid & torch.isfinite(grad_r.reshape(n, -1)).all(1)
    a = torch.where(valid.reshape(n, *([1] * (x1.ndim - 1))), -float(reward_scale) * grad_r, torch.zeros_like(grad_r))
    return a.detach(), valid


def base_transport(
    env: DiffusionEnvironment, schedule: StepSchedule, states: Tensor, cond: dict[str, Any]
) -> Transport:
    """The step ``v -> (I + h_k d b/dx (x_k, t_k))^T v`` of the base drift along ``states``;
    several vectors share one model evaluation (one vector-Jacobian product each)."""
    n = states.shape[1]

    def transport(k: int, vectors: list[Tensor]) -> list[Tensor]:
        xk = states[k].detach().requires_grad_(True)
        t_vec = torch.full((n,), schedule.t[k], dtype=xk.dtype, device=xk.device)
        result = []
        with torch.enable_grad():
            out = env.model(xk, t_vec, **cond)
            for i, v in enumerate(vectors):
                (vjp,) = torch.autograd.grad(
                    out, xk, grad_outputs=v, retain_graph=i + 1 < len(vectors), allow_unused=True
                )
                # b = coef_x x + coef_out model(x, t), so v^T db/dx = coef_x v + coef_out v^T d model/dx
                step = schedule.coef_x[k] * v
                if vjp is not None:
                    step = step + schedule.coef_out[k] * vjp
                result.append((v + schedule.h[k] * step).detach())
        return result

    return transport


def lean_adjoint(
    env: DiffusionEnvironment,
    states: Tensor,
    times: Tensor,
    reward: Reward,
    reward_scale: float,
    cond: dict[str, Any] | None = None,
    *,
    likelihood_ratio: float | None = None,
    noises: Tensor | None = None,
    cost_to_go: Tensor | None = None,
    controls: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Lean adjoint along sampled states (see the module docstring).

    Parameters
    ----------
    env : DiffusionEnvironment
        The *base* model and its noise (the drift whose Jacobian is used).
    states : Tensor, (m + 1, n, *sample_shape)
        States ``x_0 .. x_m`` on the grid ``times`` (any control may have produced them).
    times : Tensor, (m + 1,)
        The grid.
    reward : Reward
        Differentiable terminal reward ``r``.
    reward_scale : float
        ``lambda``; the terminal cost is ``g = -lambda r``.
    cond : dict, optional
        Conditioning passed to the model and the reward.
    likelihood_ratio : float, optional
        ``theta``: steps where the base drift stretches a random probe by more than
        ``1 + theta`` use the likelihood-ratio estimate instead of the propagated adjoint
        (:func:`~diffusiongym.trainers.adjoint_matching.likelihood_ratio.likelihood_ratio_adjoint`;
        same conditional mean). Needs ``noises`` and ``cost_to_go``. ``None``: the plain
        lean adjoint everywhere.
    noises : Tensor, (m, n, *sample_shape), optional
        The standard normals ``z_k`` that produced ``states``.
    cost_to_go : Tensor, (m + 1, n), optional
        ``C_k = sum_{i >= k} 1/2 |u_i|^2 h_i - lambda r(x_m)`` along the same paths
        (:attr:`diffusiongym.sampling.Trajectory.cost_to_go`).
    controls : Tensor, (m, n, *sample_shape), optional
        The controls ``u_k`` of the paths (a control variate of the likelihood-ratio steps).
    generator : torch.Generator, optional
        Draws the likelihood-ratio steps' probe directions.

    Returns
    -------
    adjoint : Tensor, (m + 1, n, *sample_shape)
        ``a_0 .. a_m``; rows of invalid paths are zero.
    valid : Tensor, (n,) bool
        Paths whose terminal reward and whole adjoint are finite.
    """
    check_differentiable_reward(reward)
    cond = dict(cond or {})
    m = states.shape[0] - 1
    if times.shape != (m + 1,):
        raise ValueError(f"times: expected shape ({m + 1},) to match states, got {tuple(times.shape)}")
    if likelihood_ratio is not None:
        check_path_inputs(states, likelihood_ratio, noises, cost_to_go, controls)
    schedule = StepSchedule.build(env, times.to(torch.float64))
    a, valid = terminal_adjoint(reward, reward_scale, states[-1], cond)
    transport = base_transport(env, schedule, states, cond)
    if likelihood_ratio is None:
        adjoint = propagate(a, transport, m)
    else:
        assert noises is not None and cost_to_go is not None  # checked above
        adjoint = likelihood_ratio_adjoint(
            a, valid, transport, schedule, noises, cost_to_go, controls, likelihood_ratio, generator
        )
    n = states.shape[1]
    valid = valid & torch.isfinite(adjoint.reshape(m + 1, n, -1)).all(-1).all(0)
    adjoint = torch.where(valid.reshape(1, n, *([1] * (adjoint.ndim - 2))), adjoint, torch.zeros_like(adjoint))
    return adjoint, valid


def propagate(a_m: Tensor, transport: Transport, m: int) -> Tensor:
    """The plain recursion ``a_k = (I + h_k db/dx)^T a_{k+1}`` from ``a_m``; ``(m + 1, n, *shape)``."""
    out, a = [a_m], a_m
    for k in reversed(range(m)):
        (a,) = transport(k, [a])
        out.append(a)
    return torch.stack(out[::-1])
