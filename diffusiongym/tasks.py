"""Reward-adaptation tasks: a base model, a reward, a reward scale and a default grid.

A :class:`Task` is the plain description that the Gymnasium environments, the engine
and the adaptation methods share. ``make_task("GMM2D-v0", ...)`` builds one; users add
their own with :func:`register_task`.

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

Both default to the linear scheduler, memoryless noise, 100 steps from ``t_start = 1e-3``
and a velocity base model; ``action_scale = 5`` covers the optimal control
(``|u*|`` has 99th percentile 4.5 and 4.1 on sampled trajectories).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from diffusiongym.envs.environment import DiffusionEnvironment, make_environment
from diffusiongym.models.gmm import GaussianMixture, GaussianMixtureModel, gmm_preset
from diffusiongym.oracle import TiltOracle
import torch

from diffusiongym.rewards.analytic import LinearReward, QuadraticReward
from diffusiongym.rewards.base import ConstantReward, Reward
from diffusiongym.timegrid import DEFAULT_T_START

__all__ = ["Task", "make_task", "register_task", "TASKS", "gmm_task", "with_reward"]


@dataclass
class Task:
    """Everything that defines a reward-adaptation problem.

    Attributes
    ----------
    name : str
    environment : DiffusionEnvironment
        Base model + scheduler + noise.
    reward : Reward
    reward_scale : float
        ``lambda`` in ``max E[lambda r(x1)] - KL``.
    steps : int
        Default number of Euler–Maruyama steps.
    t_start : float
        Start of the time grid.
    action_scale : float
        Gymnasium action ``a`` maps to the control ``u = action_scale * a``.
    oracle : TiltOracle or None
        The exact optimum, where one exists.
    conditioning : dict
        Name -> ``(gymnasium space, sampler(n, generator, device) -> tensor)`` for
        conditioned models (e.g. a class label); empty when unconditional.
    """

    name: str
    environment: DiffusionEnvironment
    reward: Reward
    reward_scale: float = 1.0
    steps: int = 100
    t_start: float = DEFAULT_T_START
    action_scale: float = 5.0
    oracle: TiltOracle | None = None
    conditioning: dict[str, Any] = field(default_factory=dict)
    mixture: GaussianMixture | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        assert self.environment.sample_shape is not None
        return self.environment.sample_shape


TaskFactory = Callable[..., Task]
TASKS: dict[str, TaskFactory] = {}


def register_task(name: str, factory: TaskFactory) -> None:
    """Register ``factory(**kwargs) -> Task`` under ``name`` (e.g. ``"MyTask-v0"``)."""
    TASKS[name] = factory


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a registered task; ``kwargs`` are the factory's (see :func:`gmm_task`)."""
    if name not in TASKS:
        from diffusiongym.utils.validation import unknown_name_error

        raise unknown_name_error("task", name, TASKS)
    return TASKS[name](**kwargs)


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
    """A task on an exact Gaussian-mixture base model (with its oracle)."""
    model = GaussianMixtureModel(mixture, scheduler, parameterization)
    env = make_environment(model, parameterization, scheduler=model.scheduler, noise=noise)
    try:
        oracle: TiltOracle | None = TiltOracle(mixture, reward, reward_scale, scheduler=model.scheduler)
    except NotImplementedError:
        oracle = None  # the reward has no closed-form Gaussian tilt
    return Task(name, env, reward, float(reward_scale), steps, t_start, float(action_scale), oracle, {}, mixture)


def _gmm_reward(reward: str | Reward, target: Any) -> Reward:
    """Named rewards of the GMM tasks: ``"bump"`` (default; quadratic on the target mode),
    ``"linear"`` (towards the target mode) or ``"constant"`` (zero)."""
    if isinstance(reward, Reward):
        return reward
    target = torch.as_tensor(target, dtype=torch.float64)
    named = {
        "bump": lambda: QuadraticReward(target, 1.0),
        "linear": lambda: LinearReward(target / target.norm()),
        "constant": lambda: ConstantReward(0.0),
    }
    if reward not in named:
        from diffusiongym.utils.validation import unknown_name_error

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
    """A copy of ``task`` with another reward (the oracle is rebuilt where possible)."""
    scale = task.reward_scale if reward_scale is None else float(reward_scale)
    oracle = None
    if task.mixture is not None:
        try:
            oracle = TiltOracle(task.mixture, reward, scale, scheduler=task.environment.scheduler)
        except NotImplementedError:
            oracle = None
    return replace(task, reward=reward, reward_scale=scale, oracle=oracle)


def _register_shipped_tasks() -> None:
    # The digits model ships inside the package (weights/digits_unet.safetensors); the import
    # costs nothing until the factory runs (weights load then).
    from diffusiongym.models.digits import digits_task

    register_task("Digits-v0", digits_task)


_register_shipped_tasks()
