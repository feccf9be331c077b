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

Module size: the task types, their field checks, the registry and ``make_task`` / ``resolve_task``
(what every trainer and env resolves a task with), plus the built-in GMM factories.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment, make_environment
from diffusiongym.models.gmm import GaussianMixture, GaussianMixtureModel, gmm_preset
from diffusiongym.oracle import mixture_oracle
from diffusiongym.rewards.analytic import LinearReward, QuadraticReward
from diffusiongym.rewards.base import ConstantReward, Reward
from diffusiongym.timegrid import DEFAULT_T_START, make_time_grid
from diffusiongym.utils.validation import (
    MAX_STEPS,
    as_float64_vector,
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

OracleFactory = Callable[[Reward, float], Any]


class BaseTask:
    """What every reward-adaptation task has, continuous or discrete; the trainers and envs type against it.

    Not a dataclass itself (so each subclass keeps its own positional field order): the
    dataclass subclasses :class:`Task` and :class:`~diffusiongym.discrete.tasks.DiscreteTask`
    declare these fields; :meth:`__post_init__` checks them, with the base model checked by the
    subclass hook ``_check_base_model`` (right after ``name``).

    Attributes
    ----------
    name : str
    reward : Reward
        ``r(x1)`` on a batch of final states.
    reward_scale : float
        ``lambda`` in ``max E[lambda r(x1)] - KL``.
    steps : int
        Default number of simulation steps (at most 100,000).
    action_scale : float
        Gymnasium action ``a`` maps to the physical control ``action_scale * a``.
    oracle : object or None
        The exact optimum where one exists: ``optimal_objective``, ``base_objective``,
        ``gap_closed(objective)``.
    """

    name: str
    reward: Reward
    reward_scale: float
    steps: int
    action_scale: float
    oracle: Any

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a str, got {type(self.name).__name__}")
        self._check_base_model()
        self.reward = check_reward(self.reward)
        self.reward_scale = check_real("reward_scale", self.reward_scale)
        self.steps = check_positive_int("steps", self.steps, maximum=MAX_STEPS)
        self.action_scale = check_real("action_scale", self.action_scale, positive=True)

    def _check_base_model(self) -> None:
        """Raise ``TypeError`` naming the field when the base model has the wrong type (subclasses)."""


@dataclass
class Task(BaseTask):
    """Everything that defines a reward-adaptation problem.

    Attributes
    ----------
    name : str
    environment : DiffusionEnvironment
        The *base model*: the pretrained network with its scheduler and noise schedule,
        which gives the SDE drift ``b(x, t)``. Not a Gymnasium environment: for a Gymnasium
        env ``env`` (:class:`~diffusiongym.envs.gym_env.DiffusionEnv`),
        ``env.unwrapped.task.environment`` is the base model that env simulates.
    reward : Reward
    reward_scale : float
        ``lambda`` in ``max E[lambda r(x1)] - KL``.
    steps : int
        Default number of Euler–Maruyama steps.
    t_start : float
        Start of the time grid.
    action_scale : float
        Gymnasium action ``a`` maps to the control ``u = action_scale * a``.
    oracle : object or None
        The exact optimum where one exists (e.g. a :class:`~diffusiongym.oracle.TiltOracle`):
        ``optimal_objective``, ``base_objective``, ``gap_closed(objective)``.
    conditioning : dict
        Name -> ``(gymnasium space, sampler(n, generator, device) -> tensor)`` for
        conditioned models (e.g. a class label); empty when unconditional.
    oracle_factory : callable or None
        ``oracle_factory(reward, reward_scale) -> oracle or None``: how :func:`with_reward`
        rebuilds the oracle for another reward (``None``: the new task has no oracle).
    times : Tensor or None, (steps + 1,) float64
        A fixed time grid (e.g. a diffusers scheduler's): strictly increasing in ``[0, 1]``, with
        ``times[0] == t_start``. ``None`` (default): ``steps`` uniform steps from ``t_start`` to 1.
    init_std : float or None
        Standard deviation of the initial states ``x ~ N(0, init_std^2 I)`` at ``times[0]``
        (e.g. a pipeline's ``init_noise_sigma``); ``None``: ``beta(t_start)``.

    Every field is checked on construction (and by ``dataclasses.replace``): a wrong type
    raises ``TypeError``, a bad value ``ValueError``, both naming the field. ``steps`` is at
    most 100,000; numpy numbers are accepted and stored as Python ``int`` / ``float``.
    """

    name: str
    environment: DiffusionEnvironment
    reward: Reward
    reward_scale: float = 1.0
    steps: int = 100
    t_start: float = DEFAULT_T_START
    action_scale: float = 5.0
    oracle: Any = None
    conditioning: dict[str, Any] = field(default_factory=dict)
    oracle_factory: OracleFactory | None = None
    times: Tensor | None = None
    init_std: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.t_start = check_real("t_start", self.t_start, low=0.0)
        if self.t_start >= 1.0:
            raise ValueError(f"t_start: expected a number in [0, 1), got {self.t_start!r}")
        if self.times is not None:
            self.times = check_time_grid("times", self.times, self.steps)
            if abs(float(self.times[0]) - self.t_start) > 1e-12:
                raise ValueError(
                    f"t_start: expected the grid's first time times[0] = {float(self.times[0])}, got {self.t_start}"
                )
        if self.init_std is not None:
            self.init_std = check_real("init_std", self.init_std, positive=True)
        if not isinstance(self.conditioning, dict):
            raise TypeError(
                f"conditioning: expected a dict name -> (space, sampler), got {type(self.conditioning).__name__}"
            )
        if self.oracle_factory is not None and not callable(self.oracle_factory):
            raise TypeError(
                f"oracle_factory: expected a callable (reward, reward_scale) -> oracle, got {type(self.oracle_factory).__name__}"
            )

    def _check_base_model(self) -> None:
        if not isinstance(self.environment, DiffusionEnvironment):
            raise TypeError(
                f"environment: expected a DiffusionEnvironment (the base model), got {type(self.environment).__name__}"
            )

    def time_grid(self, steps: int | None = None) -> Tensor:
        """The grid of ``steps`` steps (default: the task's), float64 ``(steps + 1,)``: :attr:`times`
        when set (``ValueError`` for another step count), else uniform from ``t_start`` to 1."""
        steps = self.steps if steps is None else steps
        if self.times is None:
            return make_time_grid(steps, self.t_start)
        if steps != self.steps:
            raise ValueError(
                f"steps: task {self.name!r} has a fixed time grid of {self.steps} steps, got steps={steps}; "
                "rebuild the task for that step count"
            )
        return self.times

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample ``x1`` (the environment's)."""
        if self.environment.sample_shape is None:
            raise ValueError(f"environment: task {self.name!r} needs a sample_shape (the model has none)")
        return self.environment.sample_shape

    @property
    def mixture(self) -> GaussianMixture | None:
        """The exact base law ``p1`` where it is a known Gaussian mixture (the oracle's, else the
        base model's :class:`~diffusiongym.models.gmm.GaussianMixtureModel`), ``None`` otherwise.
        Rendering and the exact-density checks read it here."""
        for owner in (self.oracle, self.environment.model):
            mixture = getattr(owner, "mixture", None)
            if isinstance(mixture, GaussianMixture):
                return mixture
        return None


def check_time_grid(argument: str, times: Any, steps: int) -> Tensor:
    """``times`` as a float64 grid of ``steps + 1`` finite, strictly increasing points in ``[0, 1]``;
    ``TypeError`` / ``ValueError`` naming ``argument`` otherwise."""
    g = as_float64_vector(argument, times, "time points").clone()
    if g.numel() != steps + 1:
        raise ValueError(f"{argument}: expected steps + 1 = {steps + 1} time points, got {g.numel()}")
    if not bool(torch.isfinite(g).all()):
        raise ValueError(f"{argument}: expected finite times, got NaN or inf")
    if not bool((g[1:] > g[:-1]).all()):
        raise ValueError(f"{argument}: expected strictly increasing times, got {g.tolist()[:6]}")
    if float(g[0]) < 0.0 or float(g[-1]) > 1.0:
        raise ValueError(f"{argument}: expected times inside [0, 1], got [{float(g[0])}, {float(g[-1])}]")
    return g


def check_reward(reward: Any, argument: str = "reward") -> Reward:
    """``reward`` if it is a :class:`Reward`; a ``TypeError`` naming ``argument`` otherwise
    (a plain function must be wrapped: ``CallableReward(fn)``)."""
    if isinstance(reward, Reward):
        return reward
    if callable(reward):
        raise TypeError(
            f"{argument}: expected a diffusiongym Reward, got the plain callable {getattr(reward, '__name__', type(reward).__name__)!r}; "
            "wrap it: CallableReward(fn) with fn(x, **cond) -> (n,) tensor"
        )
    raise TypeError(f"{argument}: expected a diffusiongym Reward, got {type(reward).__name__}")


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


def gmm_task(
    name: str,
    mixture: GaussianMixture,
    reward: Reward,
    reward_scale: float,
    *,
    parameterization: str = "velocity",
    scheduler: str = "linear",
    noise: Any = "memoryless",
    steps: int = 100,
    t_start: float = DEFAULT_T_START,
    action_scale: float = 5.0,
) -> Task:
    """A task on an exact Gaussian-mixture base model.

    Its oracle is :func:`~diffusiongym.oracle.mixture_oracle` of the mixture (``None`` when the
    reward has no closed-form Gaussian tilt); the mixture stays with the oracle factory, so
    :func:`with_reward` rebuilds the oracle for any other reward.
    """
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture: expected a GaussianMixture, got {type(mixture).__name__}")
    reward = check_reward(reward)
    reward_scale = check_real("reward_scale", reward_scale)
    steps = check_positive_int("steps", steps, maximum=MAX_STEPS)
    action_scale = check_real("action_scale", action_scale, positive=True)
    model = GaussianMixtureModel(mixture, scheduler, parameterization)
    env = make_environment(model, parameterization, scheduler=model.scheduler, noise=noise)
    factory = functools.partial(mixture_oracle, mixture, scheduler=model.scheduler)
    return Task(
        name,
        env,
        reward,
        float(reward_scale),
        steps,
        t_start,
        float(action_scale),
        factory(reward, float(reward_scale)),
        {},
        factory,
    )


def _gmm_reward(reward: str | Reward, target: Any) -> Reward:
    """Named rewards of the GMM tasks: ``"bump"`` (default; quadratic on the target mode),
    ``"linear"`` (towards the target mode) or ``"constant"`` (zero)."""
    if isinstance(reward, Reward):
        return reward
    if not isinstance(reward, str):
        return check_reward(reward)  # raises: a plain function or another type
    target = torch.as_tensor(target, dtype=torch.float64)
    named = {
        "bump": lambda: QuadraticReward(target, 1.0),
        "linear": lambda: LinearReward(target / target.norm()),
        "constant": lambda: ConstantReward(0.0),
    }
    if reward not in named:
        raise unknown_name_error("reward", reward, named)
    return named[reward]()


def _preset_factory(name: str, preset: str, default_scale: float) -> TaskFactory:
    """Factory of a built-in GMM task: the preset mixture, its last (light) mode as target."""

    def factory(
        *,
        reward: str | Reward = "bump",
        reward_scale: float = default_scale,
        parameterization: str = "velocity",
        scheduler: str = "linear",
        noise: Any = "memoryless",
        t_start: float = DEFAULT_T_START,
        steps: int = 100,
    ) -> Task:
        mixture = gmm_preset(preset)
        return gmm_task(
            name,
            mixture,
            _gmm_reward(reward, mixture.means[-1]),
            reward_scale,
            parameterization=parameterization,
            scheduler=scheduler,
            noise=noise,
            t_start=t_start,
            steps=steps,
        )

    return factory


register_task("GMM1D-v0", _preset_factory("GMM1D-v0", "1d", 1.0))
register_task("GMM2D-v0", _preset_factory("GMM2D-v0", "2d", 2.0))


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
