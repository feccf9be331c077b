"""Controls from value functions and from control networks.

A *control* is a callable ``u(x, t, **cond)`` with ``x`` of shape ``(n, *sample_shape)``
and ``t`` of shape ``(n,)``; the engine (:func:`diffusiongym.sample`) adds ``sigma u`` to
the base drift. This module gives two agents that implement it:

- :class:`ValuePolicy`: ``u = -sigma(t) grad_x V(x, t, **cond)`` for a learned cost-to-go
  ``V`` (the optimal control when ``V = V*``, ``docs/maths.md``, "The objective and the tilted optimum");
- :class:`ControlPolicy`: a network that outputs ``u`` directly.

Both also act on Gymnasium observations ``{"x": (n, *shape), "t": (n, 1), **cond}``
through :meth:`act`, returning the normalised action ``a = u / action_scale`` (an
unbatched numpy observation gives an unbatched numpy action).

Value networks live in :mod:`diffusiongym.policies.networks`: ``TimeMLP`` (``out_dim = 1``)
for vectors, ``TimeCNN`` for images, each best wrapped in ``SignalScaled`` (input
``alpha_t x``), which keeps ``sigma grad V`` bounded near ``t = 0`` where ``sigma`` blows up.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.policies.agent import control_action
from diffusiongym.envs.environment import time_vector as _time_vector

__all__ = ["ValuePolicy", "ControlPolicy"]


class _Agent(nn.Module):
    """Shared Gymnasium-side behaviour: observation in, normalised action out."""

    def __init__(self, env: DiffusionEnvironment | None, action_scale: float, requires_noise: bool = False):
        super().__init__()
        if (env is not None or requires_noise) and not isinstance(env, DiffusionEnvironment):
            raise TypeError(f"env: expected a DiffusionEnvironment, got {type(env).__name__}")
        if requires_noise and env.noise.is_deterministic:
            raise ValueError(
                "env: sigma = 0 (noise='ode') admits no control u (dX = (b + sigma u) dt); use a stochastic noise"
            )
        if not (isinstance(action_scale, (int, float)) and not isinstance(action_scale, bool) and action_scale > 0):
            raise ValueError(f"action_scale: expected a positive number, got {action_scale!r}")
        self.env = env
        self.action_scale = float(action_scale)

    def _reference(self) -> Tensor | None:
        return next(iter(self.parameters()), None)

    @torch.no_grad()
    def act(self, observation: dict[str, Any]) -> Tensor | np.ndarray:
        """Normalised Gymnasium action ``a = u(x, t) / action_scale``.

        The conversion is :func:`diffusiongym.policies.agent.control_action` (the one
        :class:`~diffusiongym.policies.agent.ControlAgent` uses), with numpy observations
        moved to this network's device and dtype.

        Parameters
        ----------
        observation : dict
            ``"x"``: ``(n, *shape)`` (or ``shape`` for one unbatched numpy observation),
            ``"t"``: ``(n, 1)``, ``(n,)`` or a scalar; every other key is passed to the
            control as conditioning.

        Returns
        -------
        Tensor ``(n, *shape)`` on ``x``'s device, or a numpy array when ``x`` was numpy.
        """
        ref = self._reference()
        numpy_in = isinstance(observation, dict) and isinstance(observation.get("x"), np.ndarray)
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.float32
        device = ref.device if ref is not None else torch.device("cpu")
        shape = self.env.sample_shape if self.env is not None else None
        return control_action(
            self,
            observation,
            self.action_scale,
            device=device if numpy_in else None,
            dtype=dtype if numpy_in else None,
            sample_ndim=len(shape) if shape is not None else None,
        )


class ValuePolicy(_Agent):
    """Control ``u(x, t) = -sigma(t) grad_x V(x, t, **cond)`` from a value network.

    Parameters
    ----------
    value_net : nn.Module
        ``value_net(x, t, **cond)`` returning ``(n,)`` or ``(n, 1)``: the cost-to-go
        ``V(x, t) ~ E[sum of 1/2 |u|^2 dt - reward_scale * r(X1) | X_t = x]``.
    env : DiffusionEnvironment
        Supplies ``sigma(t)`` (the diffusion coefficient used for sampling).
    action_scale : float
        Gymnasium action ``a = u / action_scale`` (see :meth:`act`).

    Notes
    -----
    The gradient is taken on a detached copy of ``x`` under ``torch.enable_grad()``, so
    it works inside the engine's ``no_grad`` sampling, never modifies or attaches a graph
    to the caller's tensors, and returns a tensor without a graph (the value network's
    parameters get no ``.grad``).
    """

    def __init__(self, value_net: nn.Module, env: DiffusionEnvironment, action_scale: float = 1.0):
        if not isinstance(value_net, nn.Module):
            raise TypeError(
                f"value_net: expected an nn.Module value_net(x, t, **cond) -> (n,), got {type(value_net).__name__}"
            )
        super().__init__(env, action_scale, requires_noise=True)
        self.value_net = value_net

    def value(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``V(x, t)``, shape ``(n,)`` (differentiable; used by training)."""
        v = self.value_net(x, _time_vector(t, x), **cond)
        if v.shape not in ((x.shape[0],), (x.shape[0], 1)):
            raise ValueError(
                f"value_net output: expected shape ({x.shape[0]},) or ({x.shape[0]}, 1), got {tuple(v.shape)}"
            )
        return v.reshape(x.shape[0])

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``u = -sigma(t) grad_x V(x, t)``, shape of ``x``, no autograd graph."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        t_vec = _time_vector(t, x).detach()
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.value(xg, t_vec, **cond).sum(), xg)
        sigma = self.env.sigma(t_vec).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return (-sigma * grad).detach()


class ControlPolicy(_Agent):
    """Control given directly by a network: ``u = net(x, t, **cond)`` reshaped to ``x``.

    Parameters
    ----------
    net : nn.Module
        ``net(x, t, **cond)`` with ``x.numel() / n`` outputs per sample (e.g.
        ``TimeMLP(d, out_dim=d)`` or ``TimeCNN(..., output="field")``).
    env : DiffusionEnvironment, optional
        Only used to recognise unbatched numpy observations in :meth:`act`.
    action_scale : float
        Gymnasium action ``a = u / action_scale``.
    """

    def __init__(self, net: nn.Module, env: DiffusionEnvironment | None = None, action_scale: float = 1.0):
        if not isinstance(net, nn.Module):
            raise TypeError(f"net: expected an nn.Module net(x, t, **cond) -> u, got {type(net).__name__}")
        super().__init__(env, action_scale)
        self.net = net

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``u(x, t)``, shape of ``x``."""
        u = self.net(x, _time_vector(t, x), **cond)
        if u.numel() != x.numel():
            raise ValueError(
                f"net output: expected {x.numel()} values (shape {tuple(x.shape)}), got shape {tuple(u.shape)}"
            )
        return u.reshape(x.shape)
