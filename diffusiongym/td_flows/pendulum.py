"""Pendulum-v1 helpers: its reward as a function of (observation, action), reference policies, exact Monte-Carlo ``Q``.

Gymnasium's Pendulum-v1 (classic control, no rendering): observation ``(cos th, sin th, thdot)``,
torque ``u in [-2, 2]``, ``th = 0`` upright, ``dt = 0.05``, 200 steps, no termination. Its step
reward is a function of the state *before* the step and the action:
``r(s, u) = -(angle_normalize(th)^2 + 0.1 thdot^2 + 0.001 u^2)``. So a successor measure over next
observations gives ``Q(s, a) = r(s, a) + gamma (1 - gamma)^-1 E_{X ~ m(.|s,a)} r(X, pi(X))``
(:func:`~diffusiongym.td_flows.evaluation.q_value` with ``pi``); :func:`pendulum_reward` reads
``th = atan2(sin, cos)`` from the observation, so it is defined for model draws slightly off the
circle too. Actions here are normalised, ``u = 2 a``.

The dynamics are deterministic, so :func:`monte_carlo_q` is the exact ``Q`` of a deterministic
policy up to the truncation ``gamma^horizon``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

from diffusiongym.td_flows.data import to_env_action
from diffusiongym.utils.validation import check_positive_int

__all__ = ["pendulum_reward", "pendulum_policies", "monte_carlo_q", "MAX_TORQUE", "make_pendulum"]

MAX_TORQUE = 2.0
#: th'' = 3 g / (2 l) sin th + 3 / (m l^2) u with Pendulum-v1's g = 10, m = l = 1
GRAVITY_TERM = 15.0


def make_pendulum() -> object:
    """``gymnasium.make("Pendulum-v1")`` (no rendering)."""
    return gym.make("Pendulum-v1")


def _angle(obs: Tensor) -> tuple[Tensor, Tensor]:
    return torch.atan2(obs[..., 1], obs[..., 0]), obs[..., 2]


def pendulum_reward(obs: Tensor, a: Tensor) -> Tensor:
    """Pendulum-v1's reward of observation ``obs`` ``(n, 3)`` and normalised action ``a`` ``(n, 1)``, ``(n,)``."""
    th, thdot = _angle(obs)
    u = MAX_TORQUE * a.clamp(-1, 1).reshape(-1)
    return -(th**2 + 0.1 * thdot**2 + 0.001 * u**2)


def pendulum_policies() -> dict[str, Callable[[Tensor], Tensor]]:
    """Three deterministic policies (normalised actions), each good in part of the state space.

    - ``"balance"``: PD control ``u = -(10 th + 2 thdot)``: holds the pendulum up, but from low
      states it saturates and cannot swing up;
    - ``"pump"``: energy pumping ``u = 2 sign(thdot) (E* - E) / E*`` with
      ``E = thdot^2 / 2 + 15 cos th`` (``E* = 15`` upright at rest): swings up, does not stabilise;
    - ``"damp"``: ``u = -0.5 thdot``: brakes (safe near the bottom, useless above).
    """

    def balance(obs: Tensor) -> Tensor:
        th, thdot = _angle(obs)
        return (-(10.0 * th + 2.0 * thdot) / MAX_TORQUE).clamp(-1, 1)[:, None]

    def pump(obs: Tensor) -> Tensor:
        th, thdot = _angle(obs)
        energy = 0.5 * thdot**2 + GRAVITY_TERM * torch.cos(th)
        gain = (GRAVITY_TERM - energy) / GRAVITY_TERM
        return (torch.sign(thdot) * gain).clamp(-1, 1)[:, None]

    def damp(obs: Tensor) -> Tensor:
        _, thdot = _angle(obs)
        return (-0.5 * thdot / MAX_TORQUE).clamp(-1, 1)[:, None]

    return {"balance": balance, "pump": pump, "damp": damp}


def monte_carlo_q(
    obs: Tensor, a: Tensor, pi: Callable[[Tensor], Tensor], gamma: float, horizon: int | None = None
) -> Tensor:
    """``sum_{k < horizon} gamma^k r_k`` from ``(obs, a)``, then ``pi``, in Pendulum-v1 itself.

    Each env's state is set to ``(atan2(sin, cos), thdot)`` of ``obs`` ``(n, 3)``; the first action
    is ``a`` ``(n, 1)`` (normalised). ``horizon`` defaults to where ``gamma^horizon < 1e-6``.
    Returns float64 ``(n,)``.
    """
    n = obs.shape[0]
    if horizon is None:
        horizon = max(1, math.ceil(math.log(1e-6) / math.log(gamma)))
    horizon = check_positive_int("horizon", horizon)
    envs = [make_pendulum() for _ in range(n)]
    cur = obs.detach().cpu().numpy().astype(np.float64)
    for e, env in enumerate(envs):
        env.reset(seed=e)
        env.unwrapped.state = np.array([math.atan2(cur[e, 1], cur[e, 0]), cur[e, 2]])
    raw = [env.unwrapped for env in envs]  # no time limit: the horizon may exceed the 200-step episode
    total = np.zeros(n)
    act = a.detach().cpu().numpy()
    for k in range(horizon):
        for e, env in enumerate(raw):
            o2, r, _, _, _ = env.step(to_env_action(act[e], env.action_space))
            cur[e] = o2
            total[e] += gamma**k * r
        with torch.no_grad():
            act = pi(torch.as_tensor(cur, dtype=torch.float32)).numpy()
    for env in envs:
        env.close()
    return torch.as_tensor(total, dtype=torch.float64)
