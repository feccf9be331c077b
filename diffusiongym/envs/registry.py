"""Gymnasium registration under the ``diffusiongym/`` namespace, and factories for users' own tasks.

Every task in :data:`diffusiongym.tasks.TASKS` is registered as ``diffusiongym/<name>`` with
an ``entry_point`` (single numpy env) and a ``vector_entry_point`` (torch vector env)::

    gym.make("diffusiongym/GMM2D-v0", steps=50, noise="memoryless")
    gym.make_vec("diffusiongym/GMM2D-v0", num_envs=4096, vectorization_mode="vector_entry_point", device="cpu")

Keyword arguments are split between the task (``parameterization``, ``scheduler``,
``noise``, ``reward``, ``reward_scale``, ``t_start`` and anything else the task factory
accepts) and the environment (``steps``, ``action_mode``, ``action_scale``, ``device``,
``dtype``, ``render_mode`` (``None`` or ``"rgb_array"``), ``flat_obs`` for the single env and
``check_actions`` and ``compile`` (``torch.compile``d steps, :mod:`diffusiongym.compiled`) for the
vector env). Unknown ones raise ``TypeError`` with the list of valid
ones and close matches (so clients that retry without ``render_mode`` on ``TypeError``, such
as stable-baselines3's ``make_vec_env``, behave). Entry points are strings, so
``gym.spec(id).to_json()`` round-trips.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym

from diffusiongym.envs.environment import DiffusionEnvironment, make_environment
from diffusiongym.envs.gym_env import DiffusionEnv
from diffusiongym.utils.validation import check_real
from diffusiongym.envs.vector_env import VECTOR_ENV_KWARGS, DiffusionVectorEnv
from diffusiongym.rewards.base import Reward
from diffusiongym.tasks import TASKS, Task, register_task
from diffusiongym.timegrid import DEFAULT_T_START

__all__ = [
    "NAMESPACE",
    "register_envs",
    "register_env",
    "register_ids",
    "make_env",
    "make_single_env",
    "make_vector_env",
]

NAMESPACE = "diffusiongym"
ENV_KWARGS = VECTOR_ENV_KWARGS
# string entry points: gym.spec(id).to_json() round-trips and gym.make reads the classes' metadata
ENTRY_POINT = "diffusiongym.envs.gym_env:DiffusionEnv"
VECTOR_ENTRY_POINT = "diffusiongym.envs.vector_env:DiffusionVectorEnv"


def make_single_env(task: str, render_mode: str | None = None, **kwargs: Any) -> DiffusionEnv:
    """A single numpy :class:`DiffusionEnv` for a registered task name (what ``gym.make`` builds)."""
    return DiffusionEnv(task, render_mode=render_mode, **kwargs)


def make_vector_env(task: str, num_envs: int = 1, render_mode: str | None = None, **kwargs: Any) -> DiffusionVectorEnv:
    """A torch :class:`DiffusionVectorEnv` for a registered task name (what ``gym.make_vec`` builds)."""
    return DiffusionVectorEnv(task, num_envs, render_mode=render_mode, **kwargs)


def register_ids(ids: dict[str, str], entry_point: str, vector_entry_point: str) -> list[str]:
    """Register each Gymnasium id of ``ids`` (id -> task name, passed as the env's ``task``) with a
    single-env ``entry_point`` and a ``vector_entry_point`` (``"module:Class"`` strings, so
    ``gym.spec(id).to_json()`` round-trips). Ids already registered are left as they are. Returns the ids.
    """
    if not isinstance(ids, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ids.items()):
        raise TypeError(f"ids: expected a dict Gymnasium id -> task name (both str), got {ids!r}")
    for name, value in (("entry_point", entry_point), ("vector_entry_point", vector_entry_point)):
        if not isinstance(value, str) or ":" not in value:
            raise TypeError(f"{name}: expected a 'module:Class' string, got {value!r}")
    for env_id, task in ids.items():
        if env_id not in gym.registry:
            gym.register(
                id=env_id, entry_point=entry_point, vector_entry_point=vector_entry_point, kwargs={"task": task}
            )
    return list(ids)


def _register_id(name: str) -> None:
    register_ids({f"{NAMESPACE}/{name}": name}, ENTRY_POINT, VECTOR_ENTRY_POINT)


def register_envs() -> None:
    """Register every known task as ``diffusiongym/<name>`` (idempotent)."""
    register_ids({f"{NAMESPACE}/{name}": name for name in TASKS}, ENTRY_POINT, VECTOR_ENTRY_POINT)


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
        ``action_mode``, ``device``, ``dtype``, ``render_mode``; ``flat_obs`` (single env) or
        ``check_actions`` (vector env). Unknown names raise ``TypeError``.
    """
    if not isinstance(reward, Reward):
        raise TypeError(
            f"reward: expected a diffusiongym Reward (wrap a function with CallableReward), got {type(reward).__name__}"
        )
    if isinstance(base, DiffusionEnvironment):
        env = base
    else:
        if parameterization is None:
            raise ValueError(
                "parameterization: required when base is a model ('velocity', 'epsilon', 'endpoint' or 'score')"
            )
        env = make_environment(base, parameterization, scheduler=scheduler, noise=noise)
    if env.sample_shape is None:
        raise ValueError("base: the model has no sample_shape; pass sample_shape= to the environment")
    scale = check_real("reward_scale", reward_scale)
    action_scale = check_real("action_scale", action_scale, positive=True)
    task = Task("custom", env, reward, scale, steps, t_start, action_scale, None, dict(conditioning or {}))
    if num_envs is None:
        return DiffusionEnv(task, **env_kwargs)
    return DiffusionVectorEnv(task, num_envs, **env_kwargs)
