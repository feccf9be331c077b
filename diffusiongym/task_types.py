"""The task types: :class:`BaseTask` (what every task has, continuous or discrete) and
:class:`Task` (a diffusion/flow base model), with the checks of their fields.

Build tasks with :func:`diffusiongym.tasks.make_task`; this module holds only the types
(re-exported by :mod:`diffusiongym.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.models.gmm import GaussianMixture
from diffusiongym.rewards.base import Reward
from diffusiongym.timegrid import DEFAULT_T_START, make_time_grid
from diffusiongym.utils.validation import MAX_STEPS, as_float64_vector, check_positive_int, check_real

__all__ = ["BaseTask", "Task", "check_reward", "check_time_grid"]

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
