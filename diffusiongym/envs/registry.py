"""Gymnasium registration under the ``diffusiongym/`` namespace, and factories for users' own tasks.

Every task in :data:`diffusiongym.tasks.TASKS` is registered as ``diffusiongym/<name>`` with
an ``entry_point`` (single numpy env) and a ``vector_entry_point`` (torch vector env)::

    gym.make("diffusiongym/GMM2D-v0", steps=50, noise="memoryless")
    gym.make_vec("diffusiongym/GMM2D-v0", num_envs=4096, vectorization_mode="vector_entry_point", device="cpu")

Keyword arguments are split between the task (``parameterization``, ``scheduler``,
``noise``, ``reward``, ``reward_scale``, ``t_start`` and anything else the task factory
accepts) and the environment (``steps``, ``action_mode``, ``action_scale``, ``device``,
``dtype``, and ``check_actions`` for the vector env). Unknown ones fail with the list of
valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import gymnasium as gym

from diffusiongym.envs.environment import DiffusionEnvironment, make_environment
from diffusiongym.envs.gym_env import DiffusionEnv
from diffusiongym.envs.vector_env import DiffusionVectorEnv
from diffusiongym.rewards.base import Reward
from diffusiongym.tasks import TASKS, Task, make_task, register_task
from diffusiongym.timegrid import DEFAULT_T_START
from diffusiongym.utils.validation import unknown_name_error

__all__ = ["NAMESPACE", "register_envs", "register_env", "make_env", "make_single_env", "make_vector_env"]

NAMESPACE = "diffusiongym"
ENV_KWARGS = ("steps", "action_mode", "action_scale", "device", "dtype", "check_actions")


def _task_kwargs(task_name: str) -> set[str]:
    params = inspect.signature(TASKS[task_name]).parameters
    return {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _split(task_name: str, kwargs: dict[str, Any], env_kwargs: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    if task_name not in TASKS:
        raise unknown_name_error("task", task_name, TASKS)
    task_keys = _task_kwargs(task_name)
    task_kw, env_kw = {}, {}
    for key, value in kwargs.items():
        if key not in env_kwargs and key not in task_keys:
            raise unknown_name_error(f"{NAMESPACE}/{task_name} keyword argument", key, [*env_kwargs, *task_keys])
        # a name both accept (e.g. device, steps) goes to both: the model then lives where the batch does
        if key in env_kwargs:
            env_kw[key] = value
        if key in task_keys:
            task_kw[key] = value
    return task_kw, env_kw


def make_single_env(task: str, render_mode: str | None = None, **kwargs: Any) -> DiffusionEnv:
    """``entry_point``: a single numpy :class:`DiffusionEnv` for a registered task name."""
    task_kw, env_kw = _split(task, kwargs, tuple(k for k in ENV_KWARGS if k != "check_actions"))
    return DiffusionEnv(make_task(task, **task_kw), render_mode=render_mode, **env_kw)


def make_vector_env(task: str, num_envs: int = 1, render_mode: str | None = None, **kwargs: Any) -> DiffusionVectorEnv:
    """``vector_entry_point``: a torch :class:`DiffusionVectorEnv` for a registered task name."""
    if render_mode is not None:
        raise ValueError(f"render_mode: expected None (no rendering), got {render_mode!r}")
    task_kw, env_kw = _split(task, kwargs, ENV_KWARGS)
    return DiffusionVectorEnv(make_task(task, **task_kw), num_envs, **env_kw)


def _register_id(name: str) -> None:
    env_id = f"{NAMESPACE}/{name}"
    if env_id in gym.registry:
        return
    gym.register(
        id=env_id,
        entry_point=make_single_env,
        vector_entry_point=make_vector_env,
        kwargs={"task": name},
    )


def register_envs() -> None:
    """Register every known task as ``diffusiongym/<name>`` (idempotent)."""
    for name in TASKS:
        _register_id(name)


def register_env(name: str, task_factory: Callable[..., Task]) -> str:
    """Register a user task factory ``factory(**kwargs) -> Task`` as ``diffusiongym/<name>``.

    Returns the Gymnasium id. ``name`` must look like ``"MyTask-v0"``.
    """
    if "/" in name:
        raise ValueError(f"name: expected a bare name such as 'MyTask-v0' (the namespace is added), got {name!r}")
    register_task(name, task_factory)
    _register_id(name)
    return f"{NAMESPACE}/{name}"


def make_env(
    base: DiffusionEnvironment | Any,
    reward: Reward,
    *,
    parameterization: str | None = None,
    scheduler: Any = "linear",
    noise: Any = "memoryless",
    reward_scale: float = 1.0,
    steps: int = 100,
    t_start: float = DEFAULT_T_START,
    action_scale: float = 5.0,
    num_envs: int | None = None,
    conditioning: dict[str, Any] | None = None,
    **env_kwargs: Any,
) -> DiffusionEnv | DiffusionVectorEnv:
    """Build an env from your own base model and reward.

    Parameters
    ----------
    base : DiffusionEnvironment or model
        An environment (``VelocityEnvironment(model, ...)`` etc.), or a raw model with its
        ``parameterization`` (then ``scheduler`` and ``noise`` apply).
    reward : Reward
    num_envs : int, optional
        ``None`` gives the single numpy env, an int the torch vector env.
    conditioning : dict, optional
        ``name -> (gymnasium space, sampler(n, generator, device))``.
    env_kwargs
        ``action_mode``, ``device``, ``dtype``, ``check_actions``.
    """
    if not isinstance(reward, Reward):
        raise TypeError(f"reward: expected a diffusiongym Reward (wrap a function with CallableReward), got {type(reward).__name__}")
    if isinstance(base, DiffusionEnvironment):
        env = base
    else:
        if parameterization is None:
            raise ValueError("parameterization: required when base is a model ('velocity', 'epsilon', 'endpoint' or 'score')")
        env = make_environment(base, parameterization, scheduler=scheduler, noise=noise)
    if env.sample_shape is None:
        raise ValueError("base: the model has no sample_shape; pass sample_shape= to the environment")
    task = Task("custom", env, reward, float(reward_scale), steps, t_start, float(action_scale), None, dict(conditioning or {}))
    if num_envs is None:
        return DiffusionEnv(task, **env_kwargs)
    return DiffusionVectorEnv(task, num_envs, **env_kwargs)
