"""The batched episode state machine shared by the single and the vector Gymnasium envs.

One Euler–Maruyama step is one ``step``. For step ``k`` with ``h = t_{k+1} - t_k``:

``action_mode="control"`` (default)
    ``u = action_scale * a``; ``x' = x + h (b + sigma u) + sqrt(h) sigma z``.
``action_mode="drift"``
    the agent gives the whole drift ``action_scale * a``; the control is derived from the
    base drift, ``u = (action_scale * a - b) / sigma``.
``action_mode="model"``
    the agent outputs ``out = action_scale * a`` in the base model's own parameterisation
    (as a fine-tuned copy would); the drift is ``coef_x x + coef_out out`` and
    ``u = coef_out (out - out_base) / sigma``.

Step reward ``-1/2 |u|^2 h`` (0 when ``sigma = 0``: then no KL is defined, and
``info["kl_defined"]`` says so); the last step adds ``reward_scale * r(x1)`` (``r`` set to 0
where invalid, flagged by ``info["valid"]``). So the undiscounted return is exactly
``lambda r(x1) - KL``. Actions outside ``[-1, 1]`` are applied as given (never clipped);
NaN/inf, wrong shapes, dtypes and devices raise.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from diffusiongym.sampling import StepSchedule
from diffusiongym.tasks import Task
from diffusiongym.timegrid import make_time_grid
from diffusiongym.utils.validation import check_positive_int, unknown_name_error

__all__ = ["DiffusionSimulator", "ACTION_MODES"]

ACTION_MODES = ("control", "drift", "model")
DEFAULT_SCALES = {"drift": 10.0, "model": 10.0}


class DiffusionSimulator:
    """Batched, lockstep episodes of a :class:`~diffusiongym.tasks.Task` (torch tensors).

    Parameters
    ----------
    task : Task
    num_envs : int
    steps : int, optional
        Euler–Maruyama steps per episode (default: the task's).
    action_mode : {"control", "drift", "model"}
    action_scale : float, optional
        Physical action = ``action_scale * a``. Default: the task's for ``"control"``,
        10 for ``"drift"`` and ``"model"``.
    device, dtype
        Where and in which precision the batch lives.
    check_actions : bool
        Validate every action (finiteness needs a device sync on GPUs).
    """

    def __init__(
        self,
        task: Task,
        num_envs: int = 1,
        *,
        steps: int | None = None,
        action_mode: str = "control",
        action_scale: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str = torch.float32,
        check_actions: bool = True,
    ):
        self.task = task
        self.num_envs = check_positive_int("num_envs", num_envs)
        if action_mode not in ACTION_MODES:
            raise unknown_name_error("action_mode", action_mode, ACTION_MODES)
        self.action_mode = action_mode
        self.device = torch.device(device)
        if isinstance(dtype, str):
            if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
                raise ValueError(f"dtype: expected a torch dtype name such as 'float32', got {dtype!r}")
            dtype = getattr(torch, dtype)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype: expected a floating-point torch dtype, got {dtype}")
        self.dtype = dtype
        scale = action_scale if action_scale is not None else DEFAULT_SCALES.get(action_mode, task.action_scale)
        if not (isinstance(scale, (int, float)) and scale > 0 and np.isfinite(scale)):
            raise ValueError(f"action_scale: expected a positive finite number, got {scale!r}")
        self.action_scale = float(scale)
        self.steps = check_positive_int("steps", steps if steps is not None else task.steps)
        self.schedule = StepSchedule.build(task.environment, make_time_grid(self.steps, task.t_start))
        self.deterministic = self.schedule.deterministic
        if self.deterministic and action_mode == "control":
            raise ValueError("action_mode: 'control' needs sigma > 0 (with noise='ode' a control has no effect); use 'drift' or 'model'")
        self.check_actions = check_actions
        self.sample_shape = task.sample_shape
        self.times = self.schedule.times.to(device=self.device, dtype=self.dtype)
        self.beta0 = float(task.environment.scheduler.beta(torch.tensor(self.schedule.t[0], dtype=torch.float64)))
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(np.random.SeedSequence().generate_state(1)[0]))
        self.x: Tensor | None = None
        self.k = 0
        self.cond: dict[str, Tensor] = {}
        self._noises: Tensor | None = None
        self._base_out: Tensor | None = None

    # ------------------------------------------------------------------ spaces
    def single_observation_space(self) -> spaces.Dict:
        obs: dict[str, spaces.Space] = {
            "x": spaces.Box(-np.inf, np.inf, self.sample_shape, np.float32),
            "t": spaces.Box(0.0, 1.0, (1,), np.float32),
        }
        for name, (space, _) in self.task.conditioning.items():
            obs[name] = space
        return spaces.Dict(obs)

    def single_action_space(self) -> spaces.Box:
        return spaces.Box(-1.0, 1.0, self.sample_shape, np.float32)

    # ------------------------------------------------------------------- state
    def seed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    def reset(self, options: dict[str, Any] | None = None) -> dict[str, Tensor]:
        """Start new episodes. ``options``: ``"x"`` initial states ``(n, *shape)``, ``"noise"``
        the standard normals of the whole episode ``(steps, n, *shape)``, and any
        conditioning name (e.g. ``"label"``)."""
        options = dict(options or {})
        n, shape = self.num_envs, self.sample_shape
        known = {"x", "noise", *self.task.conditioning}
        for key in options:
            if key not in known:
                raise unknown_name_error("options", key, known)
        if "x" in options:
            self.x = self._check("options['x']", options["x"], (n, *shape)).clone()
        else:
            self.x = self.beta0 * torch.randn((n, *shape), generator=self.generator, device=self.device, dtype=self.dtype)
        self._noises = self._check("options['noise']", options["noise"], (self.steps, n, *shape)) if "noise" in options else None
        self.cond = {}
        for name, (space, sampler) in self.task.conditioning.items():
            if name in options:
                value = torch.as_tensor(options[name], device=self.device)
                if value.shape[:1] != (n,):
                    raise ValueError(f"options['{name}']: expected a batch of {n}, got shape {tuple(value.shape)}")
                self.cond[name] = value
            else:
                self.cond[name] = sampler(n, self.generator, self.device)
        self.k = 0
        self._base_out = None
        return self.observation()

    def observation(self) -> dict[str, Tensor]:
        assert self.x is not None
        t = self.times[self.k].expand(self.num_envs, 1).clone()
        return {"x": self.x.clone(), "t": t, **{k: v.clone() for k, v in self.cond.items()}}

    def base_output(self) -> Tensor:
        """The base model's output at the current states and time, ``(n, *sample_shape)``.

        Computed once per step (without autograd) and shared with :meth:`step`, so an agent
        that needs it to act (e.g. a fine-tuned-copy policy) costs no second model call.
        """
        if self.x is None:
            raise RuntimeError("base_output: call reset() first")
        if self._base_out is None:
            with torch.no_grad():
                self._base_out = self.task.environment.model(self.x, self.times[self.k].expand(self.num_envs), **self.cond)
        return self._base_out

    @property
    def done(self) -> bool:
        return self.k >= self.steps

    def _check(self, name: str, value: Any, shape: tuple[int, ...]) -> Tensor:
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(value).__name__}")
        if tuple(value.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")
        if value.dtype != self.dtype:
            raise ValueError(f"{name}: expected dtype {self.dtype}, got {value.dtype}")
        if value.device.type != self.device.type:
            raise ValueError(f"{name}: expected a tensor on {self.device}, got {value.device}")
        if self.check_actions and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}: expected finite values, got NaN or inf")
        return value

    # -------------------------------------------------------------------- step
    def step(self, action: Tensor) -> tuple[dict[str, Tensor], Tensor, bool, dict[str, Any]]:
        """Advance every episode one Euler–Maruyama step.

        Returns ``(observation, reward (n,), terminated, info)``.
        """
        if self.x is None:
            raise RuntimeError("step: call reset() before step()")
        if self.done:
            raise RuntimeError("step: the episode has terminated; call reset() first")
        n = self.num_envs
        if self.check_actions:
            a = self._check("action", action, (n, *self.sample_shape))
        else:
            a = action
        with torch.no_grad():  # the env's dynamics are not differentiated through
            return self._step(a)

    def _step(self, a: Tensor) -> tuple[dict[str, Tensor], Tensor, bool, dict[str, Any]]:
        n, k, s = self.num_envs, self.k, self.schedule
        x = self.x
        h, sig = s.h[k], s.sigma[k]
        out_base = self.base_output()
        sum_dims = tuple(range(1, x.ndim))
        if self.action_mode == "control":
            u = a * self.action_scale
            drift = torch.add(x * s.coef_x[k], out_base, alpha=s.coef_out[k]).add_(u, alpha=sig)
        elif self.action_mode == "drift":
            drift = a * self.action_scale
            u = None if self.deterministic else (drift - torch.add(x * s.coef_x[k], out_base, alpha=s.coef_out[k])) / sig
        else:
            out = a * self.action_scale
            drift = torch.add(x * s.coef_x[k], out, alpha=s.coef_out[k])
            u = None if self.deterministic else (out - out_base) * (s.coef_out[k] / sig)
        reward = torch.zeros(n, dtype=self.dtype, device=self.device) if u is None else (u * u).sum(dim=sum_dims).mul_(-0.5 * h)
        x_next = torch.add(x, drift, alpha=h)
        if not self.deterministic:
            z = self._noises[k] if self._noises is not None else torch.randn(x.shape, generator=self.generator, device=self.device, dtype=self.dtype)
            x_next.add_(z, alpha=s.step_sigma[k])
        self.x = x_next
        self.k += 1
        self._base_out = None
        info: dict[str, Any] = {}
        terminated = self.done
        if terminated:
            r, valid = self.task.reward(x_next, **self.cond)
            r = torch.where(valid, r.to(self.dtype), torch.zeros_like(reward))
            reward = reward + self.task.reward_scale * r
            info = {"reward": r, "valid": valid, "final_x": x_next.clone(), "kl_defined": not self.deterministic}
        return self.observation(), reward, terminated, info
