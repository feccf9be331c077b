"""Single Gymnasium environment with numpy observations and actions (float32 by default).

For classic agents (stable-baselines3, CleanRL scripts, TorchRL's ``GymEnv``). Observation: a
``Dict`` with ``"x"`` (the state, unbounded ``Box``), ``"t"`` (shape ``(1,)`` in ``[0, 1]``)
and the conditioning where the task has one; with ``flat_obs=True`` one float32 ``Box``
instead (``gymnasium.spaces.flatten`` of that dict, whose keys Gymnasium sorts: e.g. the
one-hot ``label``, then ``t``, then ``x`` flattened), for agents that need ``Box``
observations (e.g. SAC).
``gymnasium.wrappers.FlattenObservation(env)`` gives the same values (as float64 when the
task has a ``Discrete`` conditioning).

Action: ``Box(-1, 1, sample_shape)``, the control normalised by ``action_scale``
(``u = action_scale * a``; out-of-box actions are applied as given, never clipped; NaN/inf and
wrong shapes raise). Step reward ``-1/2 |u|^2 dt``; the last step adds ``reward_scale * r(x1)``,
is ``terminated`` and carries ``info["reward"]``, ``info["valid"]``, ``info["final_x"]`` and
``info["kl_defined"]``. Stepping before ``reset`` or after termination raises
:class:`gymnasium.error.ResetNeeded`.

Rendering: ``render_mode="rgb_array"`` makes :meth:`DiffusionEnv.render` return a uint8
``(H, W, 3)`` frame: images (``(C, H, W)`` states with ``C`` in 1 or 3, in ``[-1, 1]``) as
themselves (-1 black, 1 white: on ``Digits-v0`` light ink on a dark background), enlarged; 1-D and 2-D states as a red marker over the base density ``p_t`` at the
current time (Gaussian-mixture tasks; a blank background otherwise); other states as a grey
grid of their values. Drawn with numpy only.
"""

from __future__ import annotations

from collections.abc import Callable

from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.error import ResetNeeded

from diffusiongym.envs.simulator import DiffusionSimulator, resolve_task
from diffusiongym.tasks import Task

__all__ = ["DiffusionEnv", "SINGLE_ENV_KWARGS", "render_state"]

SINGLE_ENV_KWARGS = ("steps", "action_mode", "action_scale", "device", "dtype")
RENDER_FPS = 10
_VIEW = 4.0  # half-width of the plotted window for 1-D/2-D states
_RED = np.array([220, 30, 30], np.uint8)


def _upscale(img: np.ndarray, min_size: int = 64) -> np.ndarray:
    """Nearest-neighbour enlargement of an ``(H, W, 3)`` frame to at least ``min_size`` pixels a side."""
    factor = max(1, -(-min_size // min(img.shape[:2])))
    return np.repeat(np.repeat(img, factor, axis=0), factor, axis=1)


def _density(task: Task, t: float, points: np.ndarray) -> np.ndarray | None:
    """Base marginal density ``p_t`` at ``points (m, d)``, or ``None`` without a mixture."""
    if task.mixture is None:
        return None
    sched = task.environment.scheduler
    tt = torch.tensor(t, dtype=torch.float64)
    marginal = task.mixture.marginal(float(sched.alpha(tt)), float(sched.beta(tt)))
    logp = marginal.log_prob(torch.as_tensor(points, dtype=marginal.means.dtype)).double().numpy()
    return np.exp(logp - logp.max())


def render_frame(render_mode: str | None, ready: bool, draw: Callable[[], np.ndarray]) -> np.ndarray | None:
    """Gymnasium's render protocol, shared by the envs: ``None`` (with a warning) without a render
    mode, ``ResetNeeded`` before the first reset, else the frame ``draw()``."""
    if render_mode is None:
        gym.logger.warn("render: called with render_mode=None; pass render_mode='rgb_array' to gym.make")
        return None
    if not ready:
        raise ResetNeeded("render: call reset() before render()")
    return draw()


def render_state(task: Task, x: np.ndarray, t: float) -> np.ndarray:
    """One uint8 ``(H, W, 3)`` frame of a state ``x`` (``sample_shape``) at time ``t`` (see the module docstring)."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 3 and x.shape[0] in (1, 3):  # an image in [-1, 1]
        img = np.clip((x + 1.0) * 127.5, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
        return _upscale(np.repeat(img, 3 // img.shape[2], axis=2))
    if x.shape in ((1,), (2,)):
        size = 128
        grid = np.linspace(-_VIEW, _VIEW, size)
        pix = np.clip(np.round((x + _VIEW) / (2 * _VIEW) * (size - 1)), -1, size).astype(int)
        if x.shape == (1,):
            height = 96
            dens = _density(task, t, grid[:, None])
            frame = np.full((height, size, 3), 255, np.uint8)
            if dens is not None:
                tops = height - 1 - np.round(dens * (height - 8)).astype(int)
                rows = np.arange(height)[:, None]
                frame[rows >= tops[None, :]] = 160
            if 0 <= pix[0] < size:
                frame[:, max(pix[0] - 1, 0) : pix[0] + 2] = _RED
            return frame
        xx, yy = np.meshgrid(grid, grid[::-1], indexing="xy")  # row 0 is the top (largest y)
        dens = _density(task, t, np.stack([xx.ravel(), yy.ravel()], 1))
        grey = np.full(size * size, 255.0) if dens is None else 255.0 - 200.0 * dens
        frame = np.repeat(grey.reshape(size, size, 1), 3, axis=2).round().astype(np.uint8)
        col, row = pix[0], size - 1 - pix[1]
        if 0 <= col < size and 0 <= row < size:
            frame[max(row - 2, 0) : row + 3, max(col - 2, 0) : col + 3] = _RED
        return frame
    flat = x.ravel()
    side = int(np.ceil(np.sqrt(flat.size)))
    cells = np.full(side * side, np.nan)
    cells[: flat.size] = flat
    lo, hi = np.nanmin(flat), np.nanmax(flat)
    grey = np.where(np.isnan(cells), 0.0, (cells - lo) / (hi - lo) if hi > lo else 0.5)
    img = np.repeat((grey * 255).round().astype(np.uint8).reshape(side, side, 1), 3, axis=2)
    return _upscale(img)


class DiffusionEnv(gym.Env):
    """One reward-adaptation episode at a time.

    Parameters
    ----------
    task : Task or str
        A task, or a registered task name (``"GMM2D-v0"``; then the task factory's keyword
        arguments, e.g. ``reward_scale``, ``noise``, are accepted too).
    render_mode : {None, "rgb_array"}
    flat_obs : bool
        One float32 ``Box`` observation instead of the ``Dict`` (see the module docstring).
    **kwargs
        ``steps``, ``action_mode``, ``action_scale``, ``device``, ``dtype`` (as
        :class:`DiffusionSimulator`); unknown names raise ``TypeError``.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": RENDER_FPS}

    def __init__(self, task: Task | str, render_mode: str | None = None, *, flat_obs: bool = False, **kwargs: Any):
        if render_mode not in (None, *self.metadata["render_modes"]):
            raise ValueError(
                f"render_mode: expected None or one of {self.metadata['render_modes']}, got {render_mode!r}"
            )
        if not isinstance(flat_obs, bool):
            raise TypeError(f"flat_obs: expected a bool, got {flat_obs!r}")
        task, env_kw = resolve_task(task, kwargs, SINGLE_ENV_KWARGS, "DiffusionEnv", ("render_mode", "flat_obs"))
        env_kw.setdefault("device", "cpu")
        self.render_mode = render_mode
        self.flat_obs = flat_obs
        self.sim = DiffusionSimulator(task, 1, **env_kw)
        self.task = task
        self.dict_observation_space = self.sim.single_observation_space()
        if flat_obs:
            flat = gym.spaces.flatten_space(self.dict_observation_space)
            self.observation_space = gym.spaces.Box(
                flat.low.astype(np.float32), flat.high.astype(np.float32), flat.shape, np.float32
            )
        else:
            self.observation_space = self.dict_observation_space
        self.action_space = self.sim.single_action_space()

    @property
    def action_scale(self) -> float:
        return self.sim.action_scale

    @property
    def oracle(self):
        """The task's exact oracle (``None`` where the task has none)."""
        return self.task.oracle

    def _obs(self, obs: dict[str, torch.Tensor]) -> dict[str, np.ndarray] | np.ndarray:
        out: dict[str, Any] = {}
        for key, value in obs.items():
            space = self.dict_observation_space[key]
            arr = value[0].detach().cpu().numpy()
            if isinstance(space, gym.spaces.Discrete):
                out[key] = np.int64(arr)
            else:
                out[key] = np.asarray(arr).astype(space.dtype).reshape(space.shape)
        if self.flat_obs:
            return gym.spaces.flatten(self.dict_observation_space, out).astype(np.float32)
        return out

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        """Start an episode; ``options`` as :meth:`DiffusionSimulator.reset` for one sample
        (``"x"`` of ``sample_shape``, ``"noise"`` of ``(steps, *sample_shape)``, a conditioning value)."""
        super().reset(seed=seed)
        if seed is not None:
            self.sim.seed(seed)
        if options is not None and not isinstance(options, dict):
            raise TypeError(f"options: expected a dict or None, got {type(options).__name__}")
        opts = None
        if options:
            opts = {}
            for key, value in options.items():
                if key in ("x", "noise"):
                    v = torch.as_tensor(np.asarray(value), device=self.sim.device)
                    if not v.is_floating_point():
                        raise ValueError(f"options[{key!r}]: expected floating-point values, got dtype {v.dtype}")
                    v = v.to(self.sim.dtype)
                    opts[key] = v[None] if key == "x" else v[:, None]
                else:  # conditioning (or an unknown key: the simulator names it)
                    opts[key] = np.asarray(value)[None]
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
        info = {
            k: (
                v[0].item()
                if isinstance(v, torch.Tensor) and v.numel() == 1
                else v[0].cpu().numpy()
                if isinstance(v, torch.Tensor)
                else v
            )
            for k, v in info.items()
        }
        return self._obs(obs), float(reward[0]), bool(terminated), False, info

    def render(self) -> np.ndarray | None:
        """The current state as a uint8 ``(H, W, 3)`` frame (``render_mode="rgb_array"``), else ``None``."""
        sim = self.sim
        return render_frame(
            self.render_mode,
            sim.x is not None,
            lambda: render_state(self.task, sim.x[0].detach().cpu().float().numpy(), float(sim.times[sim.k])),
        )
