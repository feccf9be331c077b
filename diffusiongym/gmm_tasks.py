"""Tasks on an exact Gaussian-mixture base model: :func:`gmm_task` (any mixture, with its exact
oracle :func:`~diffusiongym.oracle.mixture_oracle`) and the factories of the built-in
``GMM1D-v0`` / ``GMM2D-v0``, which :mod:`diffusiongym.tasks` registers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from diffusiongym.envs.environment import make_environment
from diffusiongym.models.gmm import GaussianMixture, GaussianMixtureModel, gmm_preset
from diffusiongym.oracle import mixture_oracle
from diffusiongym.rewards.analytic import LinearReward, QuadraticReward
from diffusiongym.rewards.base import ConstantReward, Reward
from diffusiongym.task_types import Task, check_reward
from diffusiongym.timegrid import DEFAULT_T_START
from diffusiongym.utils.validation import MAX_STEPS, check_positive_int, check_real, unknown_name_error

__all__ = ["gmm_task", "preset_factory"]


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


def preset_factory(name: str, preset: str, default_scale: float) -> Callable[..., Task]:
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
