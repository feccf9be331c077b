"""Reward-adaptation tasks: a base model, a reward, a reward scale and a default grid.

A :class:`Task` is the plain description that the Gymnasium environments, the engine
and the adaptation methods share. ``make_task("GMM2D-v0", ...)`` builds one; users add
their own with :func:`register_task`. :class:`BaseTask` holds what every task has (``name``,
``reward``, ``reward_scale``, ``steps``, ``action_scale``, ``oracle``) and checks it; both
:class:`Task` (a diffusion/flow base model) and
:class:`~diffusiongym.discrete.tasks.DiscreteTask` (a CTMC base model) derive from it, and
``make_task`` builds either: ``make_task("DiscreteGrid-v0")`` dispatches to the discrete
factories, which :mod:`diffusiongym.discrete.tasks` registers with ``register_task(...,
discrete=True)``. A task knows nothing about how its base model is
built: the Gaussian-mixture tasks keep their mixture inside the oracle and the oracle
factory (:func:`gmm_task`).

Built-in tasks
--------------
``GMM1D-v0``
    Base: ``0.8 N(-1, 0.25^2) + 0.2 N(1.5, 0.2^2)``; reward ``-1/2 (x - 1.5)^2`` on the
    low-weight mode; ``reward_scale = 1``. Exact optimum: objective -1.439 (base -2.529);
    p* puts 0.83 of its mass on the right mode.
``GMM2D-v0``
    Base: 8 modes on a circle of radius 2 (std 0.25), the mode at 315 degrees has 1/7 of
    the others' weight; reward ``-1/2 |x - mu_7|^2``; ``reward_scale = 2``. Exact optimum:
    objective -3.016 (base -9.085).
``Digits-v0``
    The shipped class-conditional digits model; registered by
    :mod:`diffusiongym.models.digits` (see :func:`~diffusiongym.models.digits.digits_task`).

The GMM tasks default to the linear scheduler, memoryless noise, 100 steps from ``t_start = 1e-3``
and a velocity base model; ``action_scale = 5`` covers the optimal control
(``|u*|`` has 99th percentile 4.5 and 4.1 on sampled trajectories).

Where things live: the task types and their field checks in :mod:`diffusiongym.task_types`, the
GMM factories (:func:`gmm_task`) in :mod:`diffusiongym.gmm_tasks`; this module holds the registry,
``make_task`` / ``resolve_task`` (what every trainer and env resolves a task with) and re-exports
the rest.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.gmm_tasks import gmm_task, preset_factory
from diffusiongym.rewards.base import Reward
from diffusiongym.task_types import BaseTask, Task, check_reward, check_time_grid
from diffusiongym.utils.validation import (
    MAX_STEPS,
    check_positive_int,
    check_real,
    unexpected_keyword_error,
    unknown_name_error,
)

__all__ = [
    "resolve_task",
    "TASK_OPTIONS",
    "BaseTask",
    "Task",
    "make_task",
    "register_task",
    "TASKS",
    "DISCRETE_TASKS",
    "gmm_task",
    "with_reward",
    "check_reward",
    "check_time_grid",
]


TaskFactory = Callable[..., BaseTask]
# continuous tasks (a Task each; registered as Gymnasium ids by diffusiongym.envs.registry)
TASKS: dict[str, TaskFactory] = {}
# discrete (CTMC) tasks (a DiscreteTask each), filled by diffusiongym.discrete.tasks
DISCRETE_TASKS: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory, *, discrete: bool = False) -> None:
    """Register ``factory(**kwargs) -> Task`` under ``name`` (e.g. ``"MyTask-v0"``); with
    ``discrete=True`` a factory of :class:`~diffusiongym.discrete.tasks.DiscreteTask` instead."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name: expected a non-empty str such as 'MyTask-v0', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable (**kwargs) -> Task, got {type(factory).__name__}")
    if not isinstance(discrete, bool):
        raise TypeError(f"discrete: expected a bool, got {discrete!r}")
    (DISCRETE_TASKS if discrete else TASKS)[name] = factory
    (TASKS if discrete else DISCRETE_TASKS).pop(name, None)  # one name, one kind of task


def make_task(name: str, **kwargs: Any) -> BaseTask:
    """Build a registered task, continuous (a :class:`Task`) or discrete (a
    :class:`~diffusiongym.discrete.tasks.DiscreteTask`, e.g. ``"DiscreteGrid-v0"``); ``kwargs``
    are the factory's (see :func:`gmm_task`). A ``"diffusiongym/"`` prefix is accepted.

    An unknown keyword raises ``TypeError`` naming it, with the factory's keywords and close
    matches; ``reward_scale`` must be finite and ``steps`` an integer in ``1..100000``.
    """
    if not isinstance(name, str):
        raise TypeError(f"task: expected a registered task name (str), got {type(name).__name__}")
    name = name.removeprefix("diffusiongym/")
    factory = TASKS.get(name) or DISCRETE_TASKS.get(name)
    if factory is None:
        raise unknown_name_error("task", name, [*TASKS, *DISCRETE_TASKS])
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: let the call check
        params = {}
    if params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        known = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for key in kwargs:
            if key not in known:
                raise unexpected_keyword_error(f"make_task({name!r})", key, known)
    if "reward_scale" in kwargs:
        kwargs["reward_scale"] = check_real("reward_scale", kwargs["reward_scale"])
    if kwargs.get("steps") is not None:
        kwargs["steps"] = check_positive_int("steps", kwargs["steps"], maximum=MAX_STEPS)
    return factory(**kwargs)


register_task("GMM1D-v0", preset_factory("GMM1D-v0", "1d", 1.0))
register_task("GMM2D-v0", preset_factory("GMM2D-v0", "2d", 2.0))


def with_reward(task: Task, reward: Reward, reward_scale: float | None = None) -> Task:
    """A copy of ``task`` with another reward (and scale); the oracle is rebuilt by
    ``task.oracle_factory`` where the task has one, else dropped."""
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a Task, got {type(task).__name__}")
    reward = check_reward(reward)
    scale = task.reward_scale if reward_scale is None else check_real("reward_scale", reward_scale)
    oracle = task.oracle_factory(reward, scale) if task.oracle_factory is not None else None
    return replace(task, reward=reward, reward_scale=scale, oracle=oracle)


#: fields of a task that a trainer's keyword arguments may override
TASK_OPTIONS = ("name", "steps", "t_start", "action_scale", "oracle", "conditioning")


def resolve_task(
    task: Any, reward: Reward | None = None, reward_scale: float | None = None, **options: Any
) -> BaseTask:
    """The task a trainer works on, from a :class:`Task`, a registered id or an environment.

    ``options`` (``steps``, ``t_start``, ``action_scale``, ``oracle``, ``conditioning``,
    ``name``) override the task's fields, or describe the problem built around a bare
    environment (then ``reward`` is required).
    """
    unknown = sorted(set(options) - set(TASK_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword arguments {unknown}; the task options are {list(TASK_OPTIONS)}")
    if reward_scale is not None:
        reward_scale = check_real("reward_scale", reward_scale)
    if reward is not None:
        check_reward(reward)
    if isinstance(task, str):
        task = make_task(task)
    if isinstance(task, DiffusionEnvironment):
        if reward is None:
            raise TypeError("reward: required when the first argument is an environment (or pass a Task)")
        return Task(
            options.pop("name", "custom"), task, reward, 1.0 if reward_scale is None else float(reward_scale), **options
        )
    if not all(hasattr(task, a) for a in ("reward", "reward_scale", "steps")):
        raise TypeError(
            f"task: expected a Task, a registered task id or a DiffusionEnvironment, got {type(task).__name__}"
        )
    if reward is not None or reward_scale is not None:
        if isinstance(task, Task):
            task = with_reward(task, reward if reward is not None else task.reward, reward_scale)
        else:  # an oracle solves the task's own problem: another reward or scale drops it
            scale = task.reward_scale if reward_scale is None else float(reward_scale)
            changed = reward is not None or scale != task.reward_scale
            oracle = None if changed else getattr(task, "oracle", None)
            task = dataclasses.replace(
                task, reward=reward if reward is not None else task.reward, reward_scale=scale, oracle=oracle
            )
    return dataclasses.replace(task, **options) if options else task
