"""GPU-batched Gymnasium vector environment: one torch tensor batch stepped in lockstep.

Observations are dicts of torch tensors on the chosen device (``"x"`` of shape
``(num_envs, *sample_shape)``, ``"t"`` of shape ``(num_envs, 1)``, plus conditioning).
Rewards and ``terminated``/``truncated`` are torch tensors of shape ``(num_envs,)``.

Actions (the rule shared with :class:`~diffusiongym.discrete.env.DiscreteFlowVectorEnv`): a
``torch.Tensor`` or a ``numpy.ndarray`` of shape ``(num_envs, *sample_shape)`` whose dtype is
exactly the env's ``dtype`` (float32 by default). Numpy arrays are wrapped without a copy on the
CPU (moved once to another device) and never cast: a float64 array for a float32 env raises
``ValueError``, as do wrong shapes, devices and NaN/inf. Actions are normalised so that
``u = action_scale * a`` (see :mod:`diffusiongym.envs.simulator` for the three action modes).
:class:`NumpyVectorEnv` is the numpy boundary that does cast floating arrays for you.

All episodes end together at ``t = 1``. Autoreset is Gymnasium's next-step mode: the
terminating step returns the final observation; the following ``step`` validates its action
like any other, then resets every sub-env, ignores the action and returns the first observation
with zero reward and an empty ``info``. Observation tensors are fresh copies.

``info`` follows Gymnasium's vector convention: every key ``k`` comes with a bool mask
``info["_k"]`` of shape ``(num_envs,)``; on the terminating step ``"reward"`` (``r(x1)``, 0
where invalid), ``"valid"``, ``"final_x"`` and ``"kl_defined"`` (bool per env: ``False`` when
``sigma = 0``), all with masks of ones. So ``gymnasium.wrappers.vector.DictInfoToList`` works
(on :class:`NumpyVectorEnv`).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor

from diffusiongym.envs.gym_env import RENDER_FPS, render_state
from diffusiongym.envs.simulator import DiffusionSimulator, resolve_task
from diffusiongym.tasks import Task

__all__ = ["DiffusionVectorEnv", "NumpyVectorEnv", "VECTOR_ENV_KWARGS"]

VECTOR_ENV_KWARGS = ("steps", "action_mode", "action_scale", "device", "dtype", "check_actions", "compile")


class DiffusionVectorEnv(VectorEnv):
    """Vector env over a task; see the module docstring for actions, autoreset and ``info``.

    Parameters
    ----------
    task : Task or str
        A task, or a registered task name (then the task factory's keyword arguments too).
    num_envs : int
    render_mode : {None, "rgb_array"}
        ``render()`` then returns a tuple of ``num_envs`` uint8 ``(H, W, 3)`` frames.
    **kwargs
        ``steps``, ``action_mode``, ``action_scale``, ``device``, ``dtype``, ``check_actions``,
        ``compile`` (as :class:`DiffusionSimulator`); unknown names raise ``TypeError``.
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["rgb_array"], "render_fps": RENDER_FPS}

    def __init__(self, task: Task | str, num_envs: int = 1, render_mode: str | None = None, **kwargs: Any):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"render_mode: expected None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        task, env_kw = resolve_task(task, kwargs, VECTOR_ENV_KWARGS, "DiffusionVectorEnv", ("num_envs", "render_mode"))
        self.sim = DiffusionSimulator(task, num_envs, **env_kw)
        self.task = task
        self.num_envs = self.sim.num_envs
        self.single_observation_space = self.sim.single_observation_space()
        self.single_action_space = self.sim.single_action_space()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.render_mode = render_mode
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

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Reset every sub-env (see :meth:`DiffusionSimulator.reset` for ``options``)."""
        if seed is not None:
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(seed)
            self.sim.seed(seed)
        self._autoreset = False
        return self.sim.reset(options), {}

    def step(self, actions: Tensor | np.ndarray) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict[str, Any]]:
        if self._autoreset:
            self.sim.check_action(actions)  # validated, then ignored
            self._autoreset = False
            return self.sim.reset(), self._zeros.clone(), self._false.clone(), self._false.clone(), {}
        obs, reward, terminated, info = self.sim.step(actions)
        if terminated:
            self._autoreset = True
            info = {**info, "kl_defined": torch.full_like(self._true, bool(info["kl_defined"]))}
            info.update({f"_{key}": self._true.clone() for key in list(info)})
        return obs, reward, (self._true if terminated else self._false).clone(), self._false.clone(), info

    def control_to_action(self, u: Tensor) -> Tensor:
        """Normalise a control ``u`` to this env's action (``a = u / action_scale``)."""
        return u / self.sim.action_scale

    def render(self) -> tuple[np.ndarray, ...] | None:
        """One uint8 frame per sub-env (``render_mode="rgb_array"``), else ``None``."""
        if self.render_mode is None or self.sim.x is None:
            return None
        xs = self.sim.x.detach().cpu().float().numpy()
        t = float(self.sim.times[self.sim.k])
        return tuple(render_state(self.task, x, t) for x in xs)


def _to_numpy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    return value


class NumpyVectorEnv(gym.vector.VectorWrapper):
    """Numpy boundary for a torch vector env (:class:`DiffusionVectorEnv` or the discrete one).

    Floating-point numpy actions are cast to the env's action dtype and moved to its device
    (an integer action is rejected); everything returned is a numpy array, so Gymnasium's
    numpy wrappers (e.g. ``gymnasium.wrappers.vector.DictInfoToList``) apply.
    """

    def __init__(self, env: VectorEnv):
        super().__init__(env)
        self.metadata = env.metadata

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return _to_numpy(obs), _to_numpy(info)

    def step(self, actions: Any):
        arr = np.asarray(actions.detach().cpu() if isinstance(actions, Tensor) else actions)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"actions: expected a floating-point array, got dtype {arr.dtype}")
        base = self.env.unwrapped
        dtype = base.sim.dtype if hasattr(base, "sim") else torch.float32
        tensor = torch.as_tensor(arr).to(device=base.device, dtype=dtype)
        return tuple(_to_numpy(v) for v in self.env.step(tensor))
