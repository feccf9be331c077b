"""GPU-batched Gymnasium vector environment: one torch tensor batch stepped in lockstep.

Observations are dicts of torch tensors on the chosen device (``"x"`` of shape
``(num_envs, *sample_shape)``, ``"t"`` of shape ``(num_envs, 1)``, plus conditioning);
actions are torch tensors of shape ``(num_envs, *sample_shape)`` in the env's dtype and
device, normalised so that ``u = action_scale * a`` (see
:mod:`diffusiongym.envs.simulator` for the three action modes). Rewards and
``terminated``/``truncated`` are torch tensors of shape ``(num_envs,)``.

All episodes end together at ``t = 1``. Autoreset is Gymnasium's next-step mode: the
terminating step returns the final observation (and ``info["final_x"]``); the following
``step`` resets every sub-env, ignores its action and returns the first observation with
zero reward. Observation tensors are fresh copies: modifying them does not affect the env.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor

from diffusiongym.envs.simulator import DiffusionSimulator
from diffusiongym.tasks import Task

__all__ = ["DiffusionVectorEnv", "NumpyVectorEnv"]


class DiffusionVectorEnv(VectorEnv):
    """Vector env over a :class:`~diffusiongym.tasks.Task`; kwargs as :class:`DiffusionSimulator`."""

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, task: Task, num_envs: int = 1, **kwargs: Any):
        self.sim = DiffusionSimulator(task, num_envs, **kwargs)
        self.task = task
        self.num_envs = self.sim.num_envs
        self.single_observation_space = self.sim.single_observation_space()
        self.single_action_space = self.sim.single_action_space()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.render_mode = None
        self._autoreset = False
        self._zeros = torch.zeros(self.num_envs, dtype=self.sim.dtype, device=self.sim.device)
        self._false = torch.zeros(self.num_envs, dtype=torch.bool, device=self.sim.device)
        self._true = torch.ones(self.num_envs, dtype=torch.bool, device=self.sim.device)

    @property
    def device(self) -> torch.device:
        return self.sim.device

    @property
    def action_scale(self) -> float:
        return self.sim.action_scale

    @property
    def oracle(self):
        """The task's exact oracle (``None`` where the task has none)."""
        return self.task.oracle

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Reset every sub-env (see :meth:`DiffusionSimulator.reset` for ``options``)."""
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self.sim.seed(seed)
        self._autoreset = False
        return self.sim.reset(options), {}

    def step(self, actions: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict[str, Any]]:
        if self._autoreset:
            self._autoreset = False
            return self.sim.reset(), self._zeros.clone(), self._false.clone(), self._false.clone(), {}
        obs, reward, terminated, info = self.sim.step(actions)
        if terminated:
            self._autoreset = True
            info = {**info, **{f"_{key}": self._true.clone() for key in info if key != "kl_defined"}}
        return obs, reward, (self._true if terminated else self._false).clone(), self._false.clone(), info

    def control_to_action(self, u: Tensor) -> Tensor:
        """Normalise a control ``u`` to this env's action (``a = u / action_scale``)."""
        return u / self.sim.action_scale


def _to_numpy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


class NumpyVectorEnv(gym.vector.VectorWrapper):
    """Numpy boundary for :class:`DiffusionVectorEnv`: numpy actions in, numpy arrays out.

    Actions are converted with ``torch.as_tensor`` to the env's dtype and device (a float64
    numpy action is cast, an int action is rejected); everything returned is a numpy array.
    """

    def __init__(self, env: DiffusionVectorEnv):
        super().__init__(env)
        self.metadata = env.metadata

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return _to_numpy(obs), _to_numpy(info)

    def step(self, actions: Any):
        arr = np.asarray(actions)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"actions: expected a floating-point array, got dtype {arr.dtype}")
        sim = self.env.unwrapped.sim
        tensor = torch.as_tensor(arr, device=sim.device).to(sim.dtype)
        return tuple(_to_numpy(v) for v in self.env.step(tensor))
