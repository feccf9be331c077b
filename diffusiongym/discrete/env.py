"""Gymnasium environments of the controlled discrete chain: jump steps are env steps.

Observation ``{"x": tokens (D,) in MultiDiscrete([num_states] * D), "t": (1,) float32 in [0, 1]}`` (with
``flat_obs=True`` on the single env: one float32 ``Box``, the one-hot tokens then ``t``, as
``gymnasium.spaces.flatten``). Action ``a`` in ``Box(-1, 1, (D, K))`` float32: the control logits are
``c = action_scale * a``, added to the log jump rates towards each data token (see
:mod:`diffusiongym.discrete.chain`; the entry at the current token is ignored). Actions outside the box are
applied exactly as given (never clipped); NaN/inf or a wrong shape raise ``ValueError``. Step reward:
``-h * KL rate`` (the exact KL rate of the controlled chain w.r.t. the base chain at the current state),
plus ``reward_scale * r(x1)`` on the last step (``r`` set to 0 where invalid, flagged by ``info["valid"]``),
so that the return is the KL-regularised objective.
Episodes last ``steps`` steps on the uniform grid of [0, 1] and terminate (never truncate); the last step
is exact (every coordinate jumps to a posterior draw). Reset takes no options (any key raises).

Rendering: ``render_mode="rgb_array"`` gives the token grid as a uint8 ``(H, W, 3)`` frame: ``D`` cells
(a square when ``D`` is a perfect square, e.g. 8 x 8 for ``DiscreteDigits-v0``, else one row), token
``v`` of ``K`` in grey from black (0) to white (``K - 1``; ink on the binarised digits, as the continuous
``Digits-v0`` frames show it), the mask token red.

- :class:`DiscreteFlowEnv`: a single numpy env (passes ``gymnasium.utils.env_checker.check_env``); stepping
  before ``reset`` or after termination raises :class:`gymnasium.error.ResetNeeded`.
- :class:`DiscreteFlowVectorEnv`: ``num_envs`` chains batched in torch, observations/rewards as tensors,
  ``metadata["autoreset_mode"] = AutoresetMode.NEXT_STEP``: the step after a termination validates the
  actions, resets those envs and ignores their actions (reward 0, not terminated).
"""

from __future__ import annotations

import inspect
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from torch import Tensor

from diffusiongym.discrete.chain import base_rates, controlled_step, draw_step, time_grid
from diffusiongym.discrete.tasks import DISCRETE_TASKS, DiscreteTask, make_discrete_task
from diffusiongym.envs.simulator import as_int, check_device, check_real, to_action_tensor, unexpected_kwarg
from diffusiongym.utils.validation import unknown_name_error

__all__ = ["DiscreteFlowEnv", "DiscreteFlowVectorEnv", "render_tokens"]

ENV_ARGS = ("steps", "reward_scale", "action_scale")
RENDER_FPS = 10


def _setup(task: str | DiscreteTask, steps: Any, reward_scale: Any, action_scale: Any, task_kwargs: dict, where: str) -> tuple[DiscreteTask, int, float, float]:
    if isinstance(task, str):
        factory = DISCRETE_TASKS.get(task.split("/")[-1])
        if factory is None:
            raise unknown_name_error("task", task, DISCRETE_TASKS)
        known = [n for n in inspect.signature(factory).parameters if n not in ENV_ARGS]
    elif isinstance(task, DiscreteTask):
        known = []
    else:
        raise TypeError(f"task: expected a discrete task name or a DiscreteTask, got {type(task).__name__}")
    for key in task_kwargs:
        if key not in known:
            raise unexpected_kwarg(where, key, [*ENV_ARGS, "render_mode", *known, *(["device"] if where.endswith("VectorEnv") else ["flat_obs"])])
    steps = None if steps is None else as_int("steps", steps)
    reward_scale = None if reward_scale is None else check_real("reward_scale", reward_scale)
    action_scale = None if action_scale is None else check_real("action_scale", action_scale, positive=True)
    task = make_discrete_task(task, **task_kwargs)
    steps = as_int("steps", task.steps if steps is None else steps)
    reward_scale = check_real("reward_scale", task.reward_scale if reward_scale is None else reward_scale)
    action_scale = check_real("action_scale", task.action_scale if action_scale is None else action_scale, positive=True)
    return task, steps, reward_scale, action_scale


def _spaces(task: DiscreteTask) -> tuple[spaces.Dict, spaces.Box]:
    path = task.path
    obs = spaces.Dict({"x": spaces.MultiDiscrete(np.full(path.length, path.num_states, dtype=np.int64)), "t": spaces.Box(0.0, 1.0, (1,), np.float32)})
    act = spaces.Box(-1.0, 1.0, (path.length, path.vocab_size), np.float32)
    return obs, act


def _check_render_mode(render_mode: Any) -> str | None:
    if render_mode not in (None, "rgb_array"):
        raise ValueError(f"render_mode: expected None or 'rgb_array', got {render_mode!r}")
    return render_mode


def render_tokens(tokens: np.ndarray, vocab_size: int, mask_token: int | None, min_size: int = 64) -> np.ndarray:
    """The token grid of one state ``tokens (D,)`` as a uint8 ``(H, W, 3)`` frame (module docstring)."""
    tokens = np.asarray(tokens).ravel()
    d = tokens.size
    side = int(round(np.sqrt(d)))
    rows, cols = (side, side) if side * side == d else (1, d)
    level = np.round(255 * np.clip(tokens, 0, vocab_size - 1) / max(vocab_size - 1, 1)).astype(np.uint8)
    img = np.repeat(level.reshape(rows, cols, 1), 3, axis=2).astype(np.uint8)
    if mask_token is not None:
        img[(tokens == mask_token).reshape(rows, cols)] = (220, 30, 30)
    factor = max(1, -(-min_size // min(rows, cols)))
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


class DiscreteFlowEnv(gym.Env):
    """Single discrete-chain environment (numpy observations); see the module docstring.

    Parameters
    ----------
    task : str or DiscreteTask
        ``"DiscreteGrid-v0"`` or ``"DiscreteDigits-v0"`` (or an instance).
    steps, reward_scale, action_scale : optional
        Override the task's defaults.
    render_mode : {None, "rgb_array"}
    flat_obs : bool
        One float32 ``Box`` observation instead of the ``Dict``.
    **task_kwargs
        Passed to the task factory (e.g. ``source="uniform"`` for the grid task); unknown names raise
        ``TypeError``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS}

    def __init__(self, task: str | DiscreteTask = "DiscreteGrid-v0", steps: int | None = None, reward_scale: float | None = None, action_scale: float | None = None, render_mode: str | None = None, *, flat_obs: bool = False, **task_kwargs: Any):
        self.render_mode = _check_render_mode(render_mode)
        if not isinstance(flat_obs, bool):
            raise TypeError(f"flat_obs: expected a bool, got {flat_obs!r}")
        self.task, self.steps, self.reward_scale, self.action_scale = _setup(task, steps, reward_scale, action_scale, task_kwargs, "DiscreteFlowEnv")
        self.dict_observation_space, self.action_space = _spaces(self.task)
        self.flat_obs = flat_obs
        if flat_obs:
            flat = spaces.flatten_space(self.dict_observation_space)
            self.observation_space = spaces.Box(flat.low.astype(np.float32), flat.high.astype(np.float32), flat.shape, np.float32)
        else:
            self.observation_space = self.dict_observation_space
        self.times = time_grid(self.steps)
        self._x: Tensor | None = None
        self._k = 0

    def _obs(self) -> dict[str, np.ndarray] | np.ndarray:
        assert self._x is not None
        obs = {"x": self._x[0].numpy().astype(np.int64), "t": np.array([self.times[self._k]], dtype=np.float32)}
        if self.flat_obs:
            return spaces.flatten(self.dict_observation_space, obs).astype(np.float32)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, np.ndarray] | np.ndarray, dict]:
        super().reset(seed=seed)
        if options:
            raise unknown_name_error("options", next(iter(options)), [])
        path = self.task.path
        if path.mask_token is not None:
            self._x = torch.full((1, path.length), path.mask_token, dtype=torch.long)
        else:
            self._x = torch.as_tensor(self.np_random.integers(0, path.vocab_size, size=(1, path.length)), dtype=torch.long)
        self._k = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray] | np.ndarray, float, bool, bool, dict]:
        if self._x is None:
            raise ResetNeeded("step: call reset() before step()")
        if self._k >= self.steps:
            raise ResetNeeded("step: the episode has terminated; call reset() before stepping again")
        a = np.asarray(action)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action: expected shape {self.action_space.shape}, got {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"action: expected a floating-point array, got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError("action: expected finite values, got NaN or inf")
        c = torch.as_tensor(self.action_scale * a.astype(np.float64)).unsqueeze(0)
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
            r = torch.where(valid, r, torch.zeros_like(r))  # 0 where invalid, as the continuous envs
            info["reward"], info["valid"] = float(r[0]), bool(valid[0])
            reward += self.reward_scale * float(r[0])
        return self._obs(), reward, last, False, info

    def render(self) -> np.ndarray | None:
        """The current tokens as a uint8 ``(H, W, 3)`` frame (``render_mode="rgb_array"``), else ``None``."""
        if self.render_mode is None:
            gym.logger.warn("render: called with render_mode=None; pass render_mode='rgb_array' to gym.make")
            return None
        if self._x is None:
            raise ResetNeeded("render: call reset() before render()")
        path = self.task.path
        return render_tokens(self._x[0].numpy(), path.vocab_size, path.mask_token)


class DiscreteFlowVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` discrete chains batched in torch (next-step autoreset); see the module docstring.

    ``reset``/``step`` return observations ``{"x": (n, D) long, "t": (n, 1) float32}`` and rewards ``(n,)``
    float32, terminations/truncations ``(n,)`` bool tensors.

    Actions follow the rule of :class:`~diffusiongym.envs.vector_env.DiffusionVectorEnv`: a ``torch.Tensor``
    or ``numpy.ndarray`` of shape ``(n, D, K)`` and dtype exactly float32 (the action space's; numpy wrapped
    without a copy, never cast: float64 raises), finite, on the env's device.

    ``info`` follows Gymnasium's vector convention (every key ``k`` has a bool mask ``"_k"``): ``"kl"``
    (n,) float64, masked to the envs that stepped (not those autoresetting); on terminating steps
    ``"reward"`` ``r(x1)`` and ``"valid"`` (n,), masked to the terminating envs (0 / False elsewhere, no NaN).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": ["rgb_array"], "render_fps": RENDER_FPS}

    def __init__(self, num_envs: int = 1, task: str | DiscreteTask = "DiscreteGrid-v0", steps: int | None = None, reward_scale: float | None = None, action_scale: float | None = None, device: str | torch.device = "cpu", render_mode: str | None = None, **task_kwargs: Any):
        self.render_mode = _check_render_mode(render_mode)
        self.num_envs = as_int("num_envs", num_envs)
        self.device = check_device(device)
        self.task, self.steps, self.reward_scale, self.action_scale = _setup(task, steps, reward_scale, action_scale, task_kwargs, "DiscreteFlowVectorEnv")
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
        if options:
            raise unknown_name_error("options", next(iter(options)), [])
        if isinstance(seed, list):
            seed = seed[0]
        if seed is not None:
            self._gen.manual_seed(int(seed))
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(int(seed))
        self._reset_rows(torch.ones(self.num_envs, dtype=torch.bool, device=self.device))
        self._autoreset[:] = False
        return self._obs(), {}

    def _check_actions(self, actions: Any) -> Tensor:
        path = self.task.path
        want = (self.num_envs, path.length, path.vocab_size)
        a = to_action_tensor("actions", actions, torch.float32, self.device)
        if not isinstance(a, Tensor):
            raise TypeError(f"actions: expected a torch.Tensor or numpy.ndarray of shape {want}, got {type(actions).__name__}")
        if tuple(a.shape) != want:
            raise ValueError(f"actions: expected shape {want}, got {tuple(a.shape)}")
        if a.dtype != torch.float32:
            raise ValueError(f"actions: expected dtype torch.float32, got {a.dtype}")
        if a.device.type != self.device.type:
            raise ValueError(f"actions: expected a tensor on {self.device}, got {a.device}")
        if not bool(torch.isfinite(a).all()):
            raise ValueError("actions: expected finite values, got NaN or inf")
        return a.double()

    def step(self, actions: Any) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict]:
        path = self.task.path
        a = self._check_actions(actions)
        n = self.num_envs
        rewards = torch.zeros(n, dtype=torch.float64, device=self.device)
        terminated = torch.zeros(n, dtype=torch.bool, device=self.device)
        kl = torch.zeros(n, dtype=torch.float64, device=self.device)
        resetting = self._autoreset.clone()
        if bool(resetting.any()):
            self._reset_rows(resetting)
        act = ~resetting
        info: dict[str, Any] = {"kl": kl, "_kl": act}
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
                r, valid = self.task.reward(self._x[done])
                r = torch.where(valid, r, torch.zeros_like(r))  # 0 where invalid, flagged by "valid"
                final_reward = torch.zeros(n, dtype=torch.float64, device=self.device)
                final_valid = torch.zeros(n, dtype=torch.bool, device=self.device)
                final_reward[done] = r.double()
                final_valid[done] = valid.to(device=self.device, dtype=torch.bool)
                rewards[done] += self.reward_scale * r.double()
                info.update({"reward": final_reward, "_reward": done.clone(), "valid": final_valid, "_valid": done.clone()})
            terminated = done
        self._autoreset = terminated.clone()
        truncated = torch.zeros(n, dtype=torch.bool, device=self.device)
        return self._obs(), rewards.float(), terminated, truncated, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        """One uint8 frame per sub-env (``render_mode="rgb_array"``), else ``None``."""
        if self.render_mode is None:
            return None
        path = self.task.path
        return tuple(render_tokens(x, path.vocab_size, path.mask_token) for x in self._x.cpu().numpy())
