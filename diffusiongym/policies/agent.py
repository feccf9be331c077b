"""Adapter from the engine's control protocol ``u(x, t, **cond)`` to Gymnasium actions.

Every policy in :mod:`diffusiongym.policies` is a control ``u(x, t, **cond)`` usable inside
:func:`diffusiongym.sample`. :class:`ControlAgent` makes it act on the Gymnasium envs:
it reads the observation dict, calls the control and returns the normalised action
``a = u / action_scale`` (torch for the vector env, numpy for the single env).
:func:`control_action` is that one conversion as a function (policies such as
:class:`~diffusiongym.policies.value.ValuePolicy` use it for their ``act``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ControlAgent", "control_action"]


def control_action(
    control: Callable[..., Tensor],
    observation: dict[str, Any],
    action_scale: float,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    cond_names: tuple[str, ...] | None = None,
    sample_ndim: int | None = None,
) -> Tensor | np.ndarray:
    """Normalised Gymnasium action ``a = control(x, t, **cond) / action_scale``.

    Parameters
    ----------
    control : callable
        ``u(x, t, **cond)``, ``x`` of shape ``(n, *sample_shape)``, ``t`` of shape ``(n,)``.
    observation : dict
        ``"x"``: ``(n, *sample_shape)`` (torch or numpy), or ``sample_shape`` for one
        unbatched numpy observation; ``"t"``: ``(n, 1)``, ``(n,)``, ``(1,)`` or a scalar;
        the other keys are conditioning.
    action_scale : float
        ``u = action_scale * a``.
    device, dtype
        Where numpy observations go (default: CPU) and the dtype of ``x`` and ``t``
        (default: unchanged for tensors, float32 for numpy).
    cond_names : tuple of str, optional
        Observation keys passed to the control as conditioning (default: all but ``x``, ``t``).
    sample_ndim : int, optional
        ``len(sample_shape)``: a numpy ``x`` with that many dimensions is one unbatched
        observation (the single env); ``None``: numpy ``x`` is unbatched when ``t`` has
        shape ``(1,)`` and ``x`` does not start with a batch of one.

    Returns
    -------
    Tensor ``(n, *sample_shape)`` for tensor observations; numpy array (``sample_shape``
    when unbatched) for numpy ones.
    """
    if not isinstance(observation, dict) or "x" not in observation or "t" not in observation:
        got = sorted(observation) if isinstance(observation, dict) else type(observation).__name__
        raise ValueError(f"observation: expected a dict with keys 'x' and 't', got {got}")
    x = observation["x"]
    numpy_in = isinstance(x, np.ndarray)
    names = tuple(k for k in observation if k not in ("x", "t")) if cond_names is None else cond_names
    single = False
    if numpy_in:
        t_np = np.asarray(observation["t"])
        if sample_ndim is not None:
            single = x.ndim == sample_ndim
        else:
            single = t_np.shape == (1,) and not (x.ndim >= 1 and x.shape[0] == 1)
        obs = {
            k: torch.as_tensor(np.asarray(v), device=device)
            for k, v in observation.items()
            if k in names or k in ("x", "t")
        }
        if single:
            obs = {k: v[None] for k, v in obs.items()}
        dtype = dtype if dtype is not None else torch.float32
    elif isinstance(x, Tensor):
        obs = observation
    else:
        raise TypeError(f"observation['x']: expected a torch.Tensor or numpy array, got {type(x).__name__}")
    xt = obs["x"].to(dtype) if dtype is not None else obs["x"]
    t = torch.as_tensor(obs["t"], device=xt.device).reshape(-1).to(xt.dtype)
    n = xt.shape[0]
    if t.numel() == 1 and n != 1:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(
            f"observation['t']: expected a scalar, shape ({n},) or ({n}, 1), got {tuple(torch.as_tensor(observation['t']).shape)}"
        )
    cond = {k: obs[k] for k in names if k in obs}
    action = control(xt, t, **cond) / action_scale
    if numpy_in:
        out = action.detach().cpu().numpy().astype(np.float64 if dtype == torch.float64 else np.float32)
        return out[0] if single else out
    return action


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
        self.sample_ndim = len(sim.sample_shape)

    def __call__(self, observation: dict[str, Any]) -> Tensor | np.ndarray:
        return control_action(
            self.control,
            observation,
            self.action_scale,
            device=self.device,
            dtype=self.dtype,
            cond_names=self.cond_names,
            sample_ndim=self.sample_ndim,
        )
