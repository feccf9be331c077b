"""Adapter from the engine's control protocol ``u(x, t, **cond)`` to Gymnasium actions.

Every policy in :mod:`diffusiongym.policies` is a control ``u(x, t, **cond)`` usable inside
:func:`diffusiongym.sample`. :class:`ControlAgent` makes it act on the Gymnasium envs:
it reads the observation dict, calls the control and returns the normalised action
``a = u / action_scale`` (torch for the vector env, numpy for the single env).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ControlAgent"]


class ControlAgent:
    """Act on a diffusiongym env with a control ``u(x, t, **cond)``.

    Parameters
    ----------
    control : callable
        ``u(x, t, **cond)``, ``x`` of shape ``(n, *sample_shape)``, ``t`` of shape ``(n,)``.
    env : DiffusionEnv or DiffusionVectorEnv (or a wrapper of one)
        Supplies ``action_scale``, device and dtype.
    """

    def __init__(self, control: Callable[..., Tensor], env: Any):
        self.control = control
        sim = env.unwrapped.sim
        self.action_scale = sim.action_scale
        self.device, self.dtype = sim.device, sim.dtype
        self.cond_names = tuple(sim.task.conditioning)

    def __call__(self, observation: dict[str, Any]) -> Tensor | np.ndarray:
        x = observation["x"]
        numpy_in = isinstance(x, np.ndarray)
        if numpy_in:
            single = x.ndim == len(observation["x"].shape) and observation["t"].ndim == 1
            obs = {k: torch.as_tensor(np.asarray(v), device=self.device) for k, v in observation.items()}
            if single:
                obs = {k: v[None] for k, v in obs.items()}
        else:
            single, obs = False, observation
        xt = obs["x"].to(self.dtype)
        t = obs["t"].reshape(-1).to(self.dtype)
        cond = {k: obs[k] for k in self.cond_names if k in obs}
        action = self.control(xt, t, **cond) / self.action_scale
        if numpy_in:
            out = action.detach().cpu().numpy().astype(np.float32 if self.dtype == torch.float32 else np.float64)
            return out[0] if single else out
        return action
