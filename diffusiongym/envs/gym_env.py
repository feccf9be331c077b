"""Single Gymnasium environment with numpy observations and actions (float32 by default).

For classic agents (stable-baselines3, CleanRL scripts). Observation: a ``Dict`` with
``"x"`` (the state, unbounded ``Box``), ``"t"`` (shape ``(1,)`` in ``[0, 1]``) and the
conditioning where the task has one. Action: ``Box(-1, 1, sample_shape)``, the control
normalised by ``action_scale`` (``u = action_scale * a``; out-of-box actions are applied
as given, never clipped; NaN/inf and wrong shapes raise). Step reward
``-1/2 |u|^2 dt``; the last step adds ``reward_scale * r(x1)``, is ``terminated`` and
carries ``info["reward"]``, ``info["valid"]`` and ``info["final_x"]``. Stepping a
terminated episode raises :class:`gymnasium.error.ResetNeeded`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.error import ResetNeeded

from diffusiongym.envs.simulator import DiffusionSimulator
from diffusiongym.tasks import Task

__all__ = ["DiffusionEnv"]


class DiffusionEnv(gym.Env):
    """One reward-adaptation episode at a time; kwargs as :class:`DiffusionSimulator`."""

    metadata = {"render_modes": []}

    def __init__(self, task: Task, render_mode: str | None = None, **kwargs: Any):
        if render_mode is not None:
            raise ValueError(f"render_mode: expected None (no rendering), got {render_mode!r}")
        kwargs.setdefault("device", "cpu")
        self.sim = DiffusionSimulator(task, 1, **kwargs)
        self.task = task
        self.observation_space = self.sim.single_observation_space()
        self.action_space = self.sim.single_action_space()
        self._np_dtype = np.dtype(str(self.sim.dtype).removeprefix("torch."))

    @property
    def action_scale(self) -> float:
        return self.sim.action_scale

    @property
    def oracle(self):
        """The task's exact oracle (``None`` where the task has none)."""
        return self.task.oracle

    def _obs(self, obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        out: dict[str, Any] = {}
        for key, value in obs.items():
            space = self.observation_space[key]
            arr = value[0].detach().cpu().numpy()
            if isinstance(space, gym.spaces.Discrete):
                out[key] = np.int64(arr)
            else:
                out[key] = np.asarray(arr).astype(space.dtype).reshape(space.shape)
        return out

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.sim.seed(seed)
        opts = None
        if options:
            opts = {}
            for key, value in options.items():
                v = torch.as_tensor(np.asarray(value), device=self.sim.device)
                opts[key] = (v.to(self.sim.dtype) if v.is_floating_point() else v)[None] if key != "noise" else v.to(self.sim.dtype)[:, None]
        return self._obs(self.sim.reset(opts)), {}

    def step(self, action: Any):
        if self.sim.x is None:
            raise ResetNeeded("step: call reset() before step()")
        if self.sim.done:
            raise ResetNeeded("step: the episode has terminated; call reset() before stepping again")
        arr = np.asarray(action)
        if arr.shape != self.action_space.shape:
            raise ValueError(f"action: expected shape {self.action_space.shape}, got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"action: expected a floating-point array, got dtype {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("action: expected finite values, got NaN or inf")
        tensor = torch.as_tensor(arr, device=self.sim.device).to(self.sim.dtype)[None]
        obs, reward, terminated, info = self.sim.step(tensor)
        info = {k: (v[0].item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v[0].cpu().numpy() if isinstance(v, torch.Tensor) else v) for k, v in info.items()}
        return self._obs(obs), float(reward[0]), bool(terminated), False, info
