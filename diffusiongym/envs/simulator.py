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
NaN/inf, wrong shapes, dtypes and devices raise. Actions may be torch tensors or numpy
arrays of exactly the env's dtype (numpy is wrapped without a copy on the CPU and never
cast: a float64 array for a float32 env raises).

Few steps: with a stiff start (memoryless noise near ``t_start``) the first step multiplies
the state by ``|1 + h b_x|`` (hundreds at ``steps < 5`` and ``t_start = 1e-3``) and injects
noise of standard deviation ``sqrt(h) sigma``; measured on ``GMM1D-v0``/``GMM2D-v0`` the
samples blow up (std of ``x1`` 20 to 1000 instead of 1.0-1.4) for ``steps`` 1 to 4 (factor 998
to 249), and on ``Digits-v0`` (``t_start = 0.01``) for 1 (std 100 instead of 0.75; factor 98),
with 2 and 3 inflating it to 1.4 and 1.0 (factors 48 and 32; 4 steps: 0.82, factor 24). Grids of
fewer than ``MIN_STABLE_STEPS`` steps whose first factor exceeds ``STIFF_FACTOR`` warn (the check is
:class:`~diffusiongym.sampling.StepSchedule`'s, so :func:`~diffusiongym.sample` warns too).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from diffusiongym.compiled import simulator_steps, step_table, time_rows
from diffusiongym.policies.control import output_control
from diffusiongym.sampling import MIN_STABLE_STEPS, StepSchedule
from diffusiongym.tasks import TASKS, Task, make_task
from diffusiongym.utils.validation import (
    check_device,
    check_positive_int,
    check_real,
    unexpected_keyword_error,
    unknown_name_error,
)

__all__ = ["DiffusionSimulator", "ACTION_MODES", "MIN_STABLE_STEPS", "resolve_task", "check_batch", "to_action_tensor"]

ACTION_MODES = ("control", "drift", "model")
DEFAULT_SCALES = {"drift": 10.0, "model": 10.0}


_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def to_action_tensor(argument: str, value: Any, dtype: torch.dtype, device: torch.device) -> Any:
    """Wrap a numpy action of exactly ``dtype`` as a tensor on ``device`` (no copy on the CPU).

    Tensors and other types pass through unchanged (the shape/dtype checks then name them).
    A numpy array of another dtype raises ``ValueError``: it is never cast silently.
    """
    if not isinstance(value, np.ndarray):
        return value
    want = _NUMPY_DTYPES.get(dtype)
    if want is None or value.dtype != want:
        raise ValueError(
            f"{argument}: expected dtype {dtype} ({want.__name__ if want else 'a torch tensor: numpy has no ' + str(dtype)}), got numpy {value.dtype}"
        )
    if not value.flags.writeable:
        value = value.copy()  # torch.from_numpy warns on read-only arrays
    return torch.from_numpy(value).to(device)


def resolve_task(
    task: Task | str, kwargs: dict[str, Any], env_keys: tuple[str, ...], where: str, also: tuple[str, ...] = ()
) -> tuple[Task, dict[str, Any]]:
    """Split ``kwargs`` between the task factory and the env; build the task from its name.

    A name both accept (e.g. ``device``) goes to both, so the model lives where the batch does.
    Unknown names raise ``TypeError`` listing the valid ones with close matches; with a
    :class:`Task` instance only ``env_keys`` are accepted. ``also``: the caller's own keyword
    names, listed in the error message.
    """
    context = ""
    if isinstance(task, Task):
        task_keys: set[str] = set()
    elif isinstance(task, str):
        name = task.removeprefix("diffusiongym/")
        if name not in TASKS:
            raise unknown_name_error("task", task, TASKS)
        params = inspect.signature(TASKS[name]).parameters
        task_keys = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        context = f"diffusiongym/{name}"
    else:
        raise TypeError(f"task: expected a registered task name or a Task, got {type(task).__name__}")
    task_kw, env_kw = {}, {}
    for key, value in kwargs.items():
        if key not in env_keys and key not in task_keys:
            raise unexpected_keyword_error(f"{where}.__init__", key, {*env_keys, *task_keys, *also}, context)
        if key in env_keys:
            env_kw[key] = value
        if key in task_keys:
            task_kw[key] = value
    if kwargs.get("device") is not None:
        check_device(kwargs["device"])  # before the task factory moves a model there
    if "reward_scale" in task_kw:
        task_kw["reward_scale"] = check_real("reward_scale", task_kw["reward_scale"])
    if kwargs.get("steps") is not None:
        steps = check_positive_int("steps", kwargs["steps"])
        env_kw["steps"] = steps
        if "steps" in task_kw:
            task_kw["steps"] = steps
    if isinstance(task, Task):
        return task, env_kw
    return make_task(name, **task_kw), env_kw


def check_batch(
    name: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, finite: bool = True
) -> Tensor:
    """A batched action or state: a torch tensor or numpy array of exactly ``shape``, ``dtype``
    (numpy wrapped without a copy, never cast) and ``device``; finite when ``finite``."""
    value = to_action_tensor(name, value, dtype, device)
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor or numpy.ndarray of shape {shape}, got {type(value).__name__}"
        )
    if tuple(value.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")
    if value.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {value.dtype}")
    if value.device.type != device.type:
        raise ValueError(f"{name}: expected a tensor on {device}, got {value.device}")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf")
    return value


class DiffusionSimulator:
    """Batched, lockstep episodes of a :class:`~diffusiongym.tasks.Task` (torch tensors).

    Parameters
    ----------
    task : Task
    num_envs : int
    steps : int, optional
        Euler–Maruyama steps per episode (default: the task's), on the task's grid
        (:meth:`~diffusiongym.tasks.Task.time_grid`: its fixed ``times`` or uniform from ``t_start``).
    action_mode : {"control", "drift", "model"}
    action_scale : float, optional
        Physical action = ``action_scale * a``. Default: the task's for ``"control"``,
        10 for ``"drift"`` and ``"model"``.
    device, dtype
        Where and in which precision the batch lives.
    check_actions : bool
        Validate every action (finiteness needs a device sync on GPUs).
    compile : bool
        Run the base model call and the step's update as ``torch.compile``d graphs with fixed shapes
        (:mod:`diffusiongym.compiled`; CUDA graphs on CUDA devices). The first episode pays the
        compilation; the noise is the eager env's for the same seed and the states agree to float32
        rounding.
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
        compile: bool = False,
    ):
        self.task = task
        self.num_envs = check_positive_int("num_envs", num_envs)
        if action_mode not in ACTION_MODES:
            raise unknown_name_error("action_mode", action_mode, ACTION_MODES)
        self.action_mode = action_mode
        self.device = check_device(device)
        if isinstance(dtype, str):
            if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
                raise ValueError(f"dtype: expected a torch dtype name such as 'float32', got {dtype!r}")
            dtype = getattr(torch, dtype)
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"dtype: expected a floating-point torch dtype, got {dtype}")
        self.dtype = dtype
        scale = action_scale if action_scale is not None else DEFAULT_SCALES.get(action_mode, task.action_scale)
        self.action_scale = check_real("action_scale", scale, positive=True)
        self.steps = check_positive_int("steps", steps if steps is not None else task.steps)
        self.schedule = StepSchedule.build(task.environment, task.time_grid(self.steps))
        self.deterministic = self.schedule.deterministic
        if self.deterministic and action_mode == "control":
            raise ValueError(
                "action_mode: 'control' needs sigma > 0 (with noise='ode' a control has no effect); use 'drift' or 'model'"
            )
        if not isinstance(check_actions, bool):
            raise TypeError(f"check_actions: expected a bool, got {check_actions!r}")
        self.check_actions = check_actions
        if not isinstance(compile, bool):
            raise TypeError(f"compile: expected a bool, got {compile!r}")
        self.compile = compile
        self.sample_shape = task.sample_shape
        self.times = self.schedule.times.to(device=self.device, dtype=self.dtype)
        self.beta0 = (
            task.init_std
            if task.init_std is not None
            else float(task.environment.scheduler.beta(torch.tensor(self.schedule.t[0], dtype=torch.float64)))
        )
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(int(np.random.SeedSequence().generate_state(1)[0]))
        self.x: Tensor | None = None
        self.k = 0
        self.cond: dict[str, Tensor] = {}
        self._noises: Tensor | None = None
        self._base_out: Tensor | None = None
        self._graphs: tuple | None = None  # compiled (base, update) once reset with compile=True
        if compile:
            self._rows = step_table(self.schedule, self.dtype, self.device)
            self._t_rows = time_rows(self.times)
            self._scale = torch.tensor(self.action_scale, dtype=self._rows[0].dtype, device=self.device)

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
            self.x = self.beta0 * torch.randn(
                (n, *shape), generator=self.generator, device=self.device, dtype=self.dtype
            )
        self._noises = (
            self._check("options['noise']", options["noise"], (self.steps, n, *shape)) if "noise" in options else None
        )
        self.cond = {}
        for name, (space, sampler) in self.task.conditioning.items():
            if name in options:
                self.cond[name] = self._check_condition(name, space, options[name])
            else:
                self.cond[name] = sampler(n, self.generator, self.device)
        self.k = 0
        self._base_out = None
        if self.compile:
            self._graphs = simulator_steps(
                self.task.environment.model, self.x, self.cond, self.action_mode, self.deterministic
            )
        return self.observation()

    def _check_condition(self, name: str, space: spaces.Space, value: Any) -> Tensor:
        """Validate a batch of conditioning values at reset (not at the first step)."""
        argument = f"options[{name!r}]"
        if isinstance(value, Tensor):
            arr = value.detach().cpu().numpy()
        else:
            arr = np.asarray(value)
        if arr.shape[:1] != (self.num_envs,):
            raise ValueError(f"{argument}: expected a batch of {self.num_envs}, got shape {arr.shape}")
        if isinstance(space, (spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)) and not np.issubdtype(
            arr.dtype, np.integer
        ):
            raise ValueError(f"{argument}: expected integer values in {space}, got dtype {arr.dtype}")
        bad = [
            i
            for i in range(arr.shape[0])
            if not space.contains(arr[i].astype(space.dtype) if space.dtype is not None else arr[i])
        ]
        if bad:
            raise ValueError(f"{argument}: expected values in {space}, got {arr[bad[0]].tolist()!r} at index {bad[0]}")
        tensor = torch.as_tensor(arr if not isinstance(value, Tensor) else value, device=self.device)
        return tensor.long() if isinstance(space, spaces.Discrete) else tensor

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
        if self._base_out is None and self._graphs is not None:
            with torch.no_grad():
                self._base_out = self._graphs[0](self.x, self._t_rows[self.k], self.cond)
        if self._base_out is None:
            with torch.no_grad():
                self._base_out = self.task.environment.model(
                    self.x, self.times[self.k].expand(self.num_envs), **self.cond
                )
        return self._base_out

    @property
    def done(self) -> bool:
        return self.k >= self.steps

    def _check(self, name: str, value: Any, shape: tuple[int, ...]) -> Tensor:
        return check_batch(name, value, shape, self.dtype, self.device, finite=self.check_actions)

    # -------------------------------------------------------------------- step
    def step(self, action: Tensor) -> tuple[dict[str, Tensor], Tensor, bool, dict[str, Any]]:
        """Advance every episode one Euler–Maruyama step.

        Returns ``(observation, reward (n,), terminated, info)``.
        """
        if self.x is None:
            raise RuntimeError("step: call reset() before step()")
        if self.done:
            raise RuntimeError("step: the episode has terminated; call reset() first")
        a = self.check_action(action)
        with torch.no_grad():  # the env's dynamics are not differentiated through
            return self._step(a) if self._graphs is None else self._step_compiled(a)

    def check_action(self, action: Any) -> Tensor:
        """Validate a batch of actions (shape, dtype, device, finiteness with ``check_actions``)."""
        if self.check_actions:
            return self._check("action", action, (self.num_envs, *self.sample_shape))
        return to_action_tensor("action", action, self.dtype, self.device)

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
            u = (
                None
                if self.deterministic
                else (drift - torch.add(x * s.coef_x[k], out_base, alpha=s.coef_out[k])) / sig
            )
        else:
            out = a * self.action_scale
            drift = torch.add(x * s.coef_x[k], out, alpha=s.coef_out[k])
            u = None if self.deterministic else output_control(out, out_base, s.coef_out[k] / sig)
        reward = (
            torch.zeros(n, dtype=self.dtype, device=self.device)
            if u is None
            else (u * u).sum(dim=sum_dims).mul_(-0.5 * h)
        )
        x_next = torch.add(x, drift, alpha=h)
        if not self.deterministic:
            z = (
                self._noises[k]
                if self._noises is not None
                else torch.randn(x.shape, generator=self.generator, device=self.device, dtype=self.dtype)
            )
            x_next.add_(z, alpha=s.step_sigma[k])
        return self._advance(x_next, reward)

    def _step_compiled(self, a: Tensor) -> tuple[dict[str, Tensor], Tensor, bool, dict[str, Any]]:
        """:meth:`_step` through the compiled update (same noise draw, same maths)."""
        k, z = self.k, None
        if not self.deterministic:
            z = (
                self._noises[k]
                if self._noises is not None
                else torch.randn(self.x.shape, generator=self.generator, device=self.device, dtype=self.dtype)
            )
        x_next, reward = self._graphs[1](self.x, self.base_output(), a, z, self._rows[k], self._scale)
        return self._advance(x_next, reward)

    def _advance(self, x_next: Tensor, reward: Tensor) -> tuple[dict[str, Tensor], Tensor, bool, dict[str, Any]]:
        """Move to ``x_next`` with the step's ``reward`` (the terminal reward added on the last step)."""
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
