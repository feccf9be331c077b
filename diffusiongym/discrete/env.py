"""Gymnasium environments of the controlled discrete chain: jump steps are env steps.

Observation ``{"x": tokens (D,) in MultiDiscrete([num_states] * D), "t": (1,) float32 in [0, 1]}``.
Action ``a`` in ``Box(-1, 1, (D, K))``: the control logits are ``c = action_scale * a``, added to the log jump
rates towards each data token (see :mod:`diffusiongym.discrete.chain`; the entry at the current token is
ignored). Actions outside the box are applied exactly as given (never clipped); NaN/inf or a wrong shape
raise ``ValueError``. Step reward: ``-h * KL rate`` (the exact KL rate of the controlled chain w.r.t. the
base chain at the current state), plus ``reward_scale * r(x1)`` on the last step, so that the return is
the KL-regularised objective. Episodes last ``steps`` steps on the uniform grid of [0, 1] and terminate
(never truncate); the last step is exact (every coordinate jumps to a posterior draw).

- :class:`DiscreteFlowEnv`: a single numpy env (passes ``gymnasium.utils.env_checker.check_env``).
- :class:`DiscreteFlowVectorEnv`: ``num_envs`` chains batched in torch, observations/rewards as tensors,
  ``metadata["autoreset_mode"] = AutoresetMode.NEXT_STEP``: the step after a termination resets those
  envs and ignores their actions (reward 0, not terminated).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from torch import Tensor

from diffusiongym.discrete.chain import base_rates, controlled_step, draw_step, time_grid
from diffusiongym.discrete.tasks import DiscreteTask, make_discrete_task
from diffusiongym.utils.validation import check_positive_int

__all__ = ["DiscreteFlowEnv", "DiscreteFlowVectorEnv"]


def _setup(task: str | DiscreteTask, steps: int | None, reward_scale: float | None, action_scale: float | None, task_kwargs: dict) -> tuple[DiscreteTask, int, float, float]:
    task = make_discrete_task(task, **task_kwargs)
    steps = check_positive_int("steps", task.steps if steps is None else steps)
    reward_scale = float(task.reward_scale if reward_scale is None else reward_scale)
    action_scale = float(task.action_scale if action_scale is None else action_scale)
    if not action_scale > 0:
        raise ValueError(f"action_scale: expected a positive number, got {action_scale!r}")
    return task, steps, reward_scale, action_scale


def _spaces(task: DiscreteTask) -> tuple[spaces.Dict, spaces.Box]:
    path = task.path
    obs = spaces.Dict({"x": spaces.MultiDiscrete(np.full(path.length, path.num_states, dtype=np.int64)), "t": spaces.Box(0.0, 1.0, (1,), np.float32)})
    act = spaces.Box(-1.0, 1.0, (path.length, path.vocab_size), np.float32)
    return obs, act


class DiscreteFlowEnv(gym.Env):
    """Single discrete-chain environment (numpy observations); see the module docstring.

    Parameters
    ----------
    task : str or DiscreteTask
        ``"DiscreteGrid-v0"`` or ``"DiscreteDigits-v0"`` (or an instance).
    steps, reward_scale, action_scale : optional
        Override the task's defaults.
    **task_kwargs
        Passed to the task factory (e.g. ``source="uniform"`` for the grid task).
    """

    metadata = {"render_modes": []}

    def __init__(self, task: str | DiscreteTask = "DiscreteGrid-v0", steps: int | None = None, reward_scale: float | None = None, action_scale: float | None = None, **task_kwargs: Any):
        self.task, self.steps, self.reward_scale, self.action_scale = _setup(task, steps, reward_scale, action_scale, task_kwargs)
        self.observation_space, self.action_space = _spaces(self.task)
        self.times = time_grid(self.steps)
        self._x: Tensor | None = None
        self._k = 0

    def _obs(self) -> dict[str, np.ndarray]:
        assert self._x is not None
        return {"x": self._x[0].numpy().astype(np.int64), "t": np.array([self.times[self._k]], dtype=np.float32)}

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
        super().reset(seed=seed)
        path = self.task.path
        if path.mask_token is not None:
            self._x = torch.full((1, path.length), path.mask_token, dtype=torch.long)
        else:
            self._x = torch.as_tensor(self.np_random.integers(0, path.vocab_size, size=(1, path.length)), dtype=torch.long)
        self._k = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        if self._x is None:
            raise RuntimeError("step: call reset() before step()")
        if self._k >= self.steps:
            raise RuntimeError("step: the episode has terminated; call reset()")
        a = np.asarray(action, dtype=np.float64)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action: expected shape {self.action_space.shape}, got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("action: expected finite values, got NaN or inf")
        c = torch.as_tensor(self.action_scale * a).unsqueeze(0)
        t, h = self.times[self._k].reshape(1), (self.times[self._k + 1] - self.times[self._k]).reshape(1)
        last = self._k == self.steps - 1
        with torch.no_grad():
            rates = base_rates(self.task.model, self._x, t, h, last)
            probs, cost = controlled_step(rates, h, self._x, self.task.path.num_states, c)
        u = torch.as_tensor(self.np_random.random(self._x.shape))
        self._x = draw_step(probs, u)
        self._k += 1
        reward = -float(cost[0])
        info: dict[str, Any] = {"kl": float(cost[0])}
        if last:
            r, valid = self.task.reward(self._x)
            info["reward"], info["valid"] = float(r[0]), bool(valid[0])
            reward += self.reward_scale * float(r[0])
        return self._obs(), reward, last, False, info


class DiscreteFlowVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` discrete chains batched in torch (next-step autoreset); see the module docstring.

    ``reset``/``step`` return observations ``{"x": (n, D) long, "t": (n, 1) float32}`` and rewards ``(n,)``
    float32, terminations/truncations ``(n,)`` bool tensors; ``step`` takes actions ``(n, D, K)`` (tensor or
    array). ``info`` holds ``"kl"`` (n,) and, on terminating steps, ``"reward"`` (n,) (``nan`` for rows
    that did not terminate).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, task: str | DiscreteTask = "DiscreteGrid-v0", steps: int | None = None, reward_scale: float | None = None, action_scale: float | None = None, device: str | torch.device = "cpu", **task_kwargs: Any):
        self.num_envs = check_positive_int("num_envs", num_envs)
        self.task, self.steps, self.reward_scale, self.action_scale = _setup(task, steps, reward_scale, action_scale, task_kwargs)
        self.device = torch.device(device)
        self.task.model.to(self.device)
        self.single_observation_space, self.single_action_space = _spaces(self.task)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.times = time_grid(self.steps).to(self.device)
        self._gen = torch.Generator(device=self.device)
        self._gen.manual_seed(int(np.random.SeedSequence().generate_state(1)[0]))
        path = self.task.path
        self._x = path.sample_source(self.num_envs, generator=self._gen, device=self.device)
        self._k = torch.zeros(self.num_envs, dtype=torch.long, device=self.device)
        self._autoreset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    def _obs(self) -> dict[str, Tensor]:
        return {"x": self._x.clone(), "t": self.times[self._k].float().reshape(-1, 1)}

    def _reset_rows(self, rows: Tensor) -> None:
        new = self.task.path.sample_source(int(rows.sum()), generator=self._gen, device=self.device)
        self._x[rows] = new
        self._k[rows] = 0

    def reset(self, *, seed: int | list[int] | None = None, options: dict | None = None) -> tuple[dict[str, Tensor], dict]:
        if isinstance(seed, list):
            seed = seed[0]
        if seed is not None:
            self._gen.manual_seed(int(seed))
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(int(seed))
        self._reset_rows(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        self._autoreset[:] = False
        return self._obs(), {}

    def step(self, actions: Any) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict]:
        path = self.task.path
        a = torch.as_tensor(actions, device=self.device, dtype=torch.float64)
        want = (self.num_envs, path.length, path.vocab_size)
        if tuple(a.shape) != want:
            raise ValueError(f"actions: expected shape {want}, got {tuple(a.shape)}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError("actions: expected finite values, got NaN or inf")
        n = self.num_envs
        rewards = torch.zeros(n, dtype=torch.float64, device=self.device)
        terminated = torch.zeros(n, dtype=torch.bool, device=self.device)
        kl = torch.zeros(n, dtype=torch.float64, device=self.device)
        final_reward = torch.full((n,), float("nan"), dtype=torch.float64, device=self.device)
        resetting = self._autoreset.clone()
        if bool(resetting.any()):
            self._reset_rows(resetting)
        act = ~resetting
        if bool(act.any()):
            x, k = self._x[act], self._k[act]
            t, h = self.times[k], self.times[k + 1] - self.times[k]
            last = k == self.steps - 1
            with torch.no_grad():
                rates = base_rates(self.task.model, x, t, h, last)
                probs, cost = controlled_step(rates, h, x, path.num_states, self.action_scale * a[act])
            u = torch.rand(x.shape, generator=self._gen, device=self.device, dtype=torch.float64)
            x = draw_step(probs, u)
            self._x[act], self._k[act] = x, k + 1
            kl[act] = cost
            rewards[act] = -cost
            done = torch.zeros(n, dtype=torch.bool, device=self.device)
            done[act] = last
            if bool(done.any()):
                r, _ = self.task.reward(self._x[done])
                final_reward[done] = r.double()
                rewards[done] += self.reward_scale * r.double()
            terminated = done
        self._autoreset = terminated.clone()
        info = {"kl": kl, "reward": final_reward}
        truncated = torch.zeros(n, dtype=torch.bool, device=self.device)
        return self._obs(), rewards.float(), terminated, truncated, info
