"""Base-model environments (model output -> SDE drift) and the Gymnasium environments."""

from diffusiongym.envs.environment import (
    DiffusionEnvironment,
    EndpointEnvironment,
    EpsilonEnvironment,
    ScoreEnvironment,
    VelocityEnvironment,
    make_environment,
)

__all__ = [
    "DiffusionEnvironment",
    "VelocityEnvironment",
    "EpsilonEnvironment",
    "EndpointEnvironment",
    "ScoreEnvironment",
    "make_environment",
]
