"""Exact Gaussian log-probabilities of Euler–Maruyama transitions.

One Euler–Maruyama step of the controlled SDE ``dX = (b + sigma u) dt + sigma dB`` from
``x_k`` at ``t_k`` with step ``h_k`` is the Gaussian transition::

    x_{k+1} ~ N(x_k + h_k (b + sigma u)(x_k, t_k), h_k sigma(t_k)^2 I).

So policy-gradient methods (DDPO / GRPO) get exact per-step log-likelihoods, ratios
between two policies, and the per-step KL to the base model,
``KL(N(m_u, s^2 I) || N(m_0, s^2 I)) = |m_u - m_0|^2 / (2 s^2) = 1/2 h |u|^2`` — the
engine's running cost. A policy is either a model in the base parameterisation (its
drift is ``coef_x x + coef_out * policy(x, t)``) or a control ``u(x, t, **cond)``.

Shapes: ``x`` and ``x_next`` are ``(n, *sample_shape)``; ``t`` is a float or a tensor
of shape ``(n,)``; ``h`` a float or a tensor of shape ``(n,)``. Log-probabilities and
KLs have shape ``(n,)`` (summed over the sample dimensions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.sampling import Trajectory
from diffusiongym.utils.validation import check_tensor

__all__ = [
    "gaussian_log_prob",
    "euler_step_log_prob",
    "transition_mean",
    "step_log_prob",
    "step_kl",
    "trajectory_log_probs",
    "path_log_ratio",
    "step_log_ratios",
]


def _per_sample(argument: str, value: Tensor | float, x: Tensor) -> Tensor:
    """A float or ``(n,)`` tensor as ``(n, 1, ..., 1)`` in ``x``'s dtype (broadcasts over x)."""
    try:
        v = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{argument}: expected a number or a tensor of shape ({x.shape[0]},), got {type(value).__name__}"
        ) from err
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    if v.shape != (x.shape[0],):
        raise ValueError(f"{argument}: expected a scalar or a tensor of shape ({x.shape[0]},), got {tuple(v.shape)}")
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def _check_env_and_policy(env: Any, policy: Any, control: Any) -> None:
    if not isinstance(env, DiffusionEnvironment):
        raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
    if policy is not None and control is not None:
        raise ValueError("policy, control: give at most one")
    for name, fn in (("policy", policy), ("control", control)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name}: expected a callable (x, t, **cond) -> tensor, got {type(fn).__name__}")


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor | float) -> Tensor:
    """``log N(x; mean, std^2 I)`` summed over all but the batch dimension, shape ``(n,)``.

    ``std`` is a float or a tensor of shape ``(n,)`` (one isotropic std per sample).
    """
    check_tensor("x", x)
    check_tensor("mean", mean)
    if x.shape != mean.shape:
        raise ValueError(f"mean: expected shape {tuple(x.shape)} (same as x), got {tuple(mean.shape)}")
    s = _per_sample("std", std, x)
    d = x[0].numel()
    z2 = (((x - mean) / s) ** 2).reshape(x.shape[0], -1).sum(1)
    return -0.5 * z2 - d * torch.log(s.reshape(-1)) - 0.5 * d * math.log(2 * math.pi)


def euler_step_log_prob(
    x_next: Tensor, x: Tensor, drift: Tensor, h: Tensor | float, sigma: Tensor | float, control: Tensor | None = None
) -> Tensor:
    """``log N(x_next; x + h (b + sigma u), h sigma^2 I)`` from a known base drift, shape ``(n,)``.

    The form policy-gradient agents need: the base drift ``b`` of each visited state is
    computed once (no grad) while collecting data, and only the control ``u`` carries
    gradients when the ratio is recomputed. :func:`step_log_prob` is the same density with
    the drift evaluated from the environment.

    Parameters
    ----------
    x_next, x, drift : Tensor, (n, *sample_shape)
        The next state, the state and the base drift ``b(x, t)``.
    h, sigma : float or Tensor (n,)
        Step size and diffusion coefficient ``sigma(t)`` (``sigma > 0``).
    control : Tensor, (n, *sample_shape), optional
        ``u(x, t)``; the base transition without it.
    """
    for argument, value in (("x_next", x_next), ("x", x), ("drift", drift)):
        check_tensor(argument, value)
    if drift.shape != x.shape or x_next.shape != x.shape:
        raise ValueError(
            f"x_next, drift: expected shape {tuple(x.shape)} (same as x), got {tuple(x_next.shape)}, {tuple(drift.shape)}"
        )
    hh, ss = _per_sample("h", h, x), _per_sample("sigma", sigma, x)
    if control is not None:
        if not isinstance(control, Tensor) or control.shape != x.shape:
            raise ValueError(
                f"control: expected shape {tuple(x.shape)} (same as x), got {tuple(control.shape) if isinstance(control, Tensor) else type(control).__name__}"
            )
        drift = drift + ss * control
    std = (hh * ss**2).sqrt().reshape(-1)
    return gaussian_log_prob(x_next, x + hh * drift, std)


def transition_mean(
    env: DiffusionEnvironment,
    x: Tensor,
    t: Tensor | float,
    h: Tensor | float,
    *,
    policy: Callable[..., Tensor] | None = None,
    control: Callable[..., Tensor] | None = None,
    cond: dict[str, Any] | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean and std of the Euler–Maruyama transition from ``(x, t)`` over a step ``h``.

    Returns
    -------
    mean : Tensor, (n, *sample_shape)
        ``x + h (b + sigma u)``; with ``policy``, ``x + h b_policy`` where ``b_policy`` is the
        drift of the policy model (same scheduler and noise as ``env``); with neither, the base
        mean ``x + h b``. Differentiable in the policy's / control's parameters.
    std : Tensor, (n,)
        ``sqrt(h) sigma(t)`` (independent of the policy).
    """
    _check_env_and_policy(env, policy, control)
    check_tensor("x", x)
    if cond is not None and not isinstance(cond, dict):
        raise TypeError(f"cond: expected a dict of conditioning keyword arguments, got {type(cond).__name__}")
    cond = dict(cond or {})
    tt = _per_sample("t", t, x).reshape(-1)
    hh = _per_sample("h", h, x)
    sigma = env.sigma(tt.to(torch.float64)).to(x.dtype)
    std = (hh.reshape(-1) * sigma**2).sqrt()
    if policy is not None:
        out = policy(x, tt, **cond)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"policy output: expected shape {tuple(x.shape)} (same as x, the base model's output), got {got}"
            )
        drift = env.convert(out, x, tt, "drift")  # the policy's drift: same scheduler and noise as the base
    else:
        drift = env.drift(x, tt, **cond)
        if control is not None:
            u = control(x, tt, **cond)
            if not isinstance(u, Tensor) or u.shape != x.shape:
                raise ValueError(
                    f"control output: expected shape {tuple(x.shape)} (same as x), got {tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__}"
                )
            drift = drift + sigma.reshape(-1, *([1] * (x.ndim - 1))) * u
    return x + hh * drift, std


def step_log_prob(
    env: DiffusionEnvironment,
    x: Tensor,
    x_next: Tensor,
    t: Tensor | float,
    h: Tensor | float,
    *,
    policy: Callable[..., Tensor] | None = None,
    control: Callable[..., Tensor] | None = None,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """``log N(x_next; x + h (b + sigma u), h sigma^2 I)``, shape ``(n,)``.

    Under the base model when neither ``policy`` nor ``control`` is given. Undefined for
    ``sigma = 0`` (raises).
    """
    _check_env_and_policy(env, policy, control)
    if env.noise.is_deterministic:
        raise ValueError("env: sigma = 0 (noise='ode') makes every transition a point mass; no log-probability")
    mean, std = transition_mean(env, x, t, h, policy=policy, control=control, cond=cond)
    return gaussian_log_prob(x_next, mean, std)


def step_kl(
    env: DiffusionEnvironment,
    x: Tensor,
    t: Tensor | float,
    h: Tensor | float,
    *,
    policy: Callable[..., Tensor] | None = None,
    control: Callable[..., Tensor] | None = None,
    cond: dict[str, Any] | None = None,
    base_mean: Tensor | None = None,
) -> Tensor:
    """Per-step Gaussian KL of the controlled transition to the base one, shape ``(n,)``.

    ``KL(N(m_u, s^2 I) || N(m_0, s^2 I)) = |m_u - m_0|^2 / (2 s^2)``, which equals the
    running cost ``1/2 h |u|^2``. ``base_mean`` (``x + h b``, e.g. from stored drifts) saves
    one base-model call.
    """
    _check_env_and_policy(env, policy, control)
    if env.noise.is_deterministic:
        raise ValueError("env: sigma = 0 (noise='ode') defines no KL")
    mean, std = transition_mean(env, x, t, h, policy=policy, control=control, cond=cond)
    if base_mean is None:
        with torch.no_grad():
            base_mean, _ = transition_mean(env, x, t, h, cond=cond)
    diff2 = ((mean - base_mean) ** 2).reshape(x.shape[0], -1).sum(1)
    return 0.5 * diff2 / std**2


def trajectory_log_probs(
    env: DiffusionEnvironment,
    traj: Trajectory,
    *,
    policy: Callable[..., Tensor] | None = None,
    control: Callable[..., Tensor] | None = None,
    cond: dict[str, Any] | None = None,
) -> Tensor:
    """Log-probabilities of every stored transition, shape ``(m, n)``.

    ``traj`` must have been sampled with ``store=("states", ...)``. Row ``k`` is
    ``log p(x_{k+1} | x_k)`` under ``policy`` / ``control`` (the base without either).
    """
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj: expected a Trajectory, got {type(traj).__name__}")
    if traj.states is None:
        raise ValueError("traj: expected a trajectory sampled with store=('states', ...)")
    times = traj.times.to(dtype=traj.states.dtype, device=traj.states.device)
    rows = []
    for k in range(len(times) - 1):
        h = float(times[k + 1] - times[k])
        rows.append(
            step_log_prob(
                env, traj.states[k], traj.states[k + 1], float(times[k]), h, policy=policy, control=control, cond=cond
            )
        )
    return torch.stack(rows)


def step_log_ratios(traj: Trajectory) -> Tensor:
    """``log N_base(x_{k+1} | x_k) - log N_u(x_{k+1} | x_k)`` of every step, shape ``(m, n)``.

    For the Euler–Maruyama chain sampled with control ``u`` and standard normals ``z``, step
    ``k``'s term is ``-(1/2 h_k |u_k|^2 + sqrt(h_k) u_k . z_k)`` exactly (Girsanov, discrete).
    Needs ``store=("controls", "noises")``. Its sum is :func:`path_log_ratio`; its tail sums
    from step ``k`` on turn controlled samples into base ones from ``x_k`` on (Value Matching's
    ``target="soft"``).
    """
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj: expected a Trajectory, got {type(traj).__name__}")
    if traj.controls is None or traj.noises is None or traj.running_cost is None:
        raise ValueError("traj: expected a stochastic trajectory sampled with store=('controls', 'noises')")
    h = (traj.times[1:] - traj.times[:-1]).to(traj.controls.dtype).to(traj.controls.device)
    m, n = traj.controls.shape[:2]
    cross = (traj.controls * traj.noises).reshape(m, n, -1).sum(-1)
    return -(traj.running_cost + h.sqrt()[:, None] * cross)


def path_log_ratio(traj: Trajectory) -> Tensor:
    """``log dP_base / dP_control`` of each sampled path, shape ``(n,)``: the sum of
    :func:`step_log_ratios` (needs ``store=("controls", "noises")``). Its expectation under
    the control is minus the KL; it is the importance weight that turns controlled samples
    into base ones."""
    return step_log_ratios(traj).sum(0)
