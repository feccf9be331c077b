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

Both envs run a :class:`~diffusiongym.discrete.simulator.DiscreteSimulator` (the batched state, grid,
generator and step logic), as the continuous envs share a
:class:`~diffusiongym.envs.simulator.DiffusionSimulator`; all randomness comes from its ``torch.Generator``
(seeded by ``reset(seed=...)``).

- :class:`DiscreteFlowEnv`: a single numpy env (a simulator of one chain; passes
  ``gymnasium.utils.env_checker.check_env``); stepping before ``reset`` or after termination raises
  :class:`gymnasium.error.ResetNeeded`.
- :class:`DiscreteFlowVectorEnv(task, num_envs, ...) <DiscreteFlowVectorEnv>`: ``num_envs`` chains batched in
  torch, observations/rewards as tensors,
  ``metadata["autoreset_mode"] = AutoresetMode.NEXT_STEP``: the step after a termination validates the
  actions, resets those envs and ignores their actions (reward 0, not terminated).
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.error import ResetNeeded
from gymnasium.vector import AutoresetMode
from gymnasium.vector.utils import batch_space
from torch import Tensor

from diffusiongym.discrete.simulator import DiscreteSimulator, resolve_discrete_task
from diffusiongym.discrete.tasks import DiscreteTask
from diffusiongym.envs.gym_env import render_frame
from diffusiongym.utils.validation import check_device, check_positive_int

__all__ = ["DiscreteFlowEnv", "DiscreteFlowVectorEnv", "render_tokens"]

RENDER_FPS = 10


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
    """Single discrete-chain environment (numpy observations): a :class:`DiscreteSimulator` of one chain;
    see the module docstring.

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

    def __init__(
        self,
        task: str | DiscreteTask = "DiscreteGrid-v0",
        steps: int | None = None,
        reward_scale: float | None = None,
        action_scale: float | None = None,
        render_mode: str | None = None,
        *,
        flat_obs: bool = False,
        **task_kwargs: Any,
    ):
        self.render_mode = _check_render_mode(render_mode)
        if not isinstance(flat_obs, bool):
            raise TypeError(f"flat_obs: expected a bool, got {flat_obs!r}")
        task, steps, reward_scale, action_scale = resolve_discrete_task(
            task, steps, reward_scale, action_scale, task_kwargs, "DiscreteFlowEnv", ("render_mode", "flat_obs")
        )
        self.sim = DiscreteSimulator(task, 1, steps=steps, reward_scale=reward_scale, action_scale=action_scale)
        self.task = task
        self.dict_observation_space = self.sim.single_observation_space()
        self.action_space = self.sim.single_action_space()
        self.flat_obs = flat_obs
        if flat_obs:
            flat = spaces.flatten_space(self.dict_observation_space)
            self.observation_space = spaces.Box(
                flat.low.astype(np.float32), flat.high.astype(np.float32), flat.shape, np.float32
            )
        else:
            self.observation_space = self.dict_observation_space

    steps = property(lambda self: self.sim.steps, doc="Jump steps per episode.")
    reward_scale = property(lambda self: self.sim.reward_scale, doc="``lambda`` of the objective.")
    action_scale = property(lambda self: self.sim.action_scale, doc="Control logits ``c = action_scale * a``.")
    times = property(lambda self: self.sim.times, doc="The time grid, ``(steps + 1,)`` float64.")

    def _obs(self, obs: dict[str, Tensor]) -> dict[str, np.ndarray] | np.ndarray:
        out = {"x": obs["x"][0].cpu().numpy().astype(np.int64), "t": obs["t"][0].cpu().numpy().astype(np.float32)}
        if self.flat_obs:
            return spaces.flatten(self.dict_observation_space, out).astype(np.float32)
        return out

    def reset(
        self, *, seed: int | None = None, options: dict | None = None
    ) -> tuple[dict[str, np.ndarray] | np.ndarray, dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.sim.seed(seed)
        return self._obs(self.sim.reset(options=options)), {}

    def step(self, action: Any) -> tuple[dict[str, np.ndarray] | np.ndarray, float, bool, bool, dict]:
        if self.sim.x is None:
            raise ResetNeeded("step: call reset() before step()")
        if bool(self.sim.done[0]):
            raise ResetNeeded("step: the episode has terminated; call reset() before stepping again")
        a = np.asarray(action)
        if a.shape != self.action_space.shape:
            raise ValueError(f"action: expected shape {self.action_space.shape}, got {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"action: expected a floating-point array, got dtype {a.dtype}")
        if not np.isfinite(a).all():
            raise ValueError("action: expected finite values, got NaN or inf")
        obs, reward, terminated, info = self.sim.step(torch.as_tensor(a.astype(np.float64)).unsqueeze(0))
        out: dict[str, Any] = {"kl": float(info["kl"][0])}
        if "reward" in info:
            out["reward"], out["valid"] = float(info["reward"][0]), bool(info["valid"][0])
        return self._obs(obs), float(reward[0]), bool(terminated[0]), False, out

    def render(self) -> np.ndarray | None:
        """The current tokens as a uint8 ``(H, W, 3)`` frame (``render_mode="rgb_array"``), else ``None``."""
        path, sim = self.task.path, self.sim
        return render_frame(
            self.render_mode,
            sim.x is not None,
            lambda: render_tokens(sim.x[0].cpu().numpy(), path.vocab_size, path.mask_token),
        )


class DiscreteFlowVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` discrete chains batched in torch (a :class:`DiscreteSimulator`, next-step autoreset);
    see the module docstring. Arguments as :class:`~diffusiongym.envs.vector_env.DiffusionVectorEnv`:
    ``DiscreteFlowVectorEnv(task, num_envs, ...)``.

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

    def __init__(
        self,
        task: str | DiscreteTask = "DiscreteGrid-v0",
        num_envs: int = 1,
        steps: int | None = None,
        reward_scale: float | None = None,
        action_scale: float | None = None,
        device: str | torch.device = "cpu",
        render_mode: str | None = None,
        **task_kwargs: Any,
    ):
        self.render_mode = _check_render_mode(render_mode)
        check_positive_int("num_envs", num_envs)
        check_device(device)  # both before the task factory builds a model
        task, steps, reward_scale, action_scale = resolve_discrete_task(
            task,
            steps,
            reward_scale,
            action_scale,
            task_kwargs,
            "DiscreteFlowVectorEnv",
            ("num_envs", "device", "render_mode"),
        )
        self.sim = DiscreteSimulator(
            task, num_envs, steps=steps, reward_scale=reward_scale, action_scale=action_scale, device=device
        )
        self.task = task
        self.num_envs = self.sim.num_envs
        self.single_observation_space = self.sim.single_observation_space()
        self.single_action_space = self.sim.single_action_space()
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.sim.reset()
        self._autoreset = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)

    device = property(lambda self: self.sim.device, doc="Where the batch lives.")
    steps = property(lambda self: self.sim.steps, doc="Jump steps per episode.")
    reward_scale = property(lambda self: self.sim.reward_scale, doc="``lambda`` of the objective.")
    action_scale = property(lambda self: self.sim.action_scale, doc="Control logits ``c = action_scale * a``.")
    times = property(lambda self: self.sim.times, doc="The time grid, ``(steps + 1,)`` float64.")

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict | None = None
    ) -> tuple[dict[str, Tensor], dict]:
        if isinstance(seed, list):
            seed = seed[0]
        if seed is not None:
            self.sim.seed(int(seed))
            self._np_random, self._np_random_seed = gym.utils.seeding.np_random(int(seed))
        obs = self.sim.reset(options=options)
        self._autoreset[:] = False
        return obs, {}

    def step(self, actions: Any) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict]:
        a = self.sim.check_action(actions)
        resetting = self._autoreset.clone()
        if bool(resetting.any()):
            self.sim.reset(resetting)  # these envs ignore their actions this step
        obs, rewards, terminated, info = self.sim.step(a, ~resetting)
        self._autoreset = terminated.clone()
        truncated = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        return obs, rewards.float(), terminated, truncated, info

    def render(self) -> tuple[np.ndarray, ...] | None:
        """One uint8 frame per sub-env (``render_mode="rgb_array"``), else ``None``."""
        if self.render_mode is None:
            return None
        path = self.task.path
        return tuple(render_tokens(x, path.vocab_size, path.mask_token) for x in self.sim.x.cpu().numpy())
