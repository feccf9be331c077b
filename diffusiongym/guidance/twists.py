"""Twist potentials ``psi_k(x) = exp(-V(x, t_k))`` for twisted SMC over the denoising chain.

A twist guesses the cost-to-go ``V(x, t) = -log E_base[exp(lambda r(X1)) | X_t = x]``; SMC is
exact for *any* twist (the final reweighting by ``exp(lambda r)`` makes the target ``p*``), and
the closer the guess, the more even the weights. :meth:`Twist.log_potential` returns
``log psi = -V`` of a batch, shape ``(n,)``.

- :class:`OracleTwist`: the exact ``V*`` of a :class:`~diffusiongym.oracle.TiltOracle`
  (Gaussian-mixture tasks, memoryless noise).
- :class:`ValueTwist`: a learned cost-to-go, e.g. the value network of
  :class:`~diffusiongym.trainers.value_matching.ValueMatching` (pass ``trainer.policy``).
- :class:`PredFinalTwist`: ``lambda a(t) r(x1_hat(x, t))`` with the Tweedie estimate
  ``x1_hat = E[x1 | x_t = x]`` of the base model (the "DPS" guess ``V ~ -lambda r(x1_hat)``,
  optimistic by Jensen's inequality for concave ``exp(lambda r)``); ``a(t)`` an optional
  annealing factor.
- :class:`ZeroTwist`: ``psi = 1`` (SMC then only reweights at the end: importance resampling).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment, time_vector
from diffusiongym.oracle import TiltOracle
from diffusiongym.rewards.base import Reward
from diffusiongym.tasks import check_reward
from diffusiongym.utils.validation import check_real

__all__ = ["Twist", "OracleTwist", "ValueTwist", "PredFinalTwist", "ZeroTwist"]


class Twist(ABC):
    """A twist potential; subclasses implement :meth:`log_potential`."""

    @abstractmethod
    def log_potential(self, x: Tensor, t: Tensor, env: DiffusionEnvironment, **cond: Any) -> Tensor:
        """``log psi(x, t) = -V(x, t)``, shape ``(n,)``.

        ``x`` ``(n, *sample_shape)``, ``t`` ``(n,)``; ``env`` is the base model the sampler uses
        (twists that need the base network call it, so its evaluations are counted and shared
        with the next step); ``cond`` the batch's conditioning.
        """

    def __call__(self, x: Tensor, t: Tensor | float, env: DiffusionEnvironment, **cond: Any) -> Tensor:
        t_vec = time_vector(t, x)
        with torch.no_grad():
            out = self.log_potential(x, t_vec, env, **cond)
        if not isinstance(out, Tensor) or out.shape not in ((x.shape[0],), (x.shape[0], 1)):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"twist output: expected shape ({x.shape[0]},), got {got}")
        out = out.reshape(x.shape[0])
        return torch.where(torch.isnan(out), torch.full_like(out, -math.inf), out)


class ZeroTwist(Twist):
    """``psi = 1``: no intermediate information (SMC reduces to importance resampling)."""

    def log_potential(self, x: Tensor, t: Tensor, env: DiffusionEnvironment, **cond: Any) -> Tensor:
        return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)

    def __repr__(self) -> str:
        return "ZeroTwist()"


class OracleTwist(Twist):
    """The exact ``log psi = -V*(x, t)`` of ``oracle`` (needs no model evaluation).

    Parameters
    ----------
    oracle : TiltOracle
        Its scheduler must be the environment's and the noise memoryless (``V*`` is the
        cost-to-go of the memoryless base process).
    """

    def __init__(self, oracle: TiltOracle):
        if not isinstance(oracle, TiltOracle):
            raise TypeError(f"oracle: expected a TiltOracle, got {type(oracle).__name__}")
        self.oracle = oracle

    def log_potential(self, x: Tensor, t: Tensor, env: DiffusionEnvironment, **cond: Any) -> Tensor:
        return -self.oracle.value(x, t)

    def __repr__(self) -> str:
        return f"OracleTwist({self.oracle!r})"


class ValueTwist(Twist):
    """A learned cost-to-go: ``log psi = -V_theta(x, t, **cond)``.

    Parameters
    ----------
    value : ValuePolicy, nn.Module or callable
        An object with a ``value(x, t, **cond)`` method (e.g. ``ValueMatching(...).policy``), or
        the value network ``V(x, t, **cond) -> (n,)`` or ``(n, 1)`` itself.
    """

    def __init__(self, value: Any):
        fn = getattr(value, "value", None)
        if fn is None or not callable(fn):
            fn = value
        if not callable(fn):
            raise TypeError(
                f"value: expected a ValuePolicy or a value network V(x, t, **cond) -> (n,), got {type(value).__name__}"
            )
        self.value_fn: Callable[..., Tensor] = fn

    def log_potential(self, x: Tensor, t: Tensor, env: DiffusionEnvironment, **cond: Any) -> Tensor:
        return -self.value_fn(x, t, **cond).reshape(-1)

    def __repr__(self) -> str:
        return f"ValueTwist({getattr(self.value_fn, '__qualname__', type(self.value_fn).__name__)})"


class PredFinalTwist(Twist):
    """``log psi = lambda a(t) r(x1_hat(x, t))`` with the base model's Tweedie estimate.

    Parameters
    ----------
    reward : Reward
        Evaluated on ``x1_hat`` (raw values; a non-finite value gives ``psi = 0``).
    reward_scale : float
        ``lambda``.
    anneal : callable, optional
        ``a(t)`` for ``t`` of shape ``(n,)``, e.g. ``lambda t: t`` (trust the estimate more as
        ``t -> 1``); default ``a = 1``.

    Notes
    -----
    One base-model evaluation at ``(x_{k+1}, t_{k+1})``; :func:`~diffusiongym.guidance.smc`
    reuses it for the next Euler–Maruyama step, so the twist adds no evaluations there.
    """

    def __init__(self, reward: Reward, reward_scale: float = 1.0, anneal: Callable[[Tensor], Tensor] | None = None):
        self.reward = check_reward(reward)
        self.reward_scale = check_real("reward_scale", reward_scale)
        if anneal is not None and not callable(anneal):
            raise TypeError(f"anneal: expected a callable t -> factor, got {type(anneal).__name__}")
        self.anneal = anneal

    def log_potential(self, x: Tensor, t: Tensor, env: DiffusionEnvironment, **cond: Any) -> Tensor:
        values = self.reward.evaluate(env.pred_final(x, t, **cond), **cond).to(x.dtype)
        factor = self.reward_scale if self.anneal is None else self.reward_scale * self.anneal(t).to(x.dtype)
        values = factor * values
        return torch.where(torch.isfinite(values), values, torch.full_like(values, -math.inf))

    def __repr__(self) -> str:
        return f"PredFinalTwist({self.reward!r}, reward_scale={self.reward_scale})"
