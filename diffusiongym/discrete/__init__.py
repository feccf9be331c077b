"""Discrete flow matching: CTMC jump chains on token sequences as reward-adaptation environments.

See ``docs/maths.md``, "Discrete chains". Mixture path (:mod:`.path`, :mod:`.schedulers`), posterior models (:mod:`.models`),
the controlled chain and its Euler jump sampler with the exact KL rate (:mod:`.chain`), the exact tilt
oracle (:mod:`.oracle`), training (:mod:`.train`), tasks (:mod:`.tasks`), Gymnasium envs (:mod:`.env`)
and their registration (:mod:`.registry`).
"""

from diffusiongym.discrete.chain import (
    DiscreteTrajectory,
    base_rates,
    control_from_model,
    controlled_step,
    draw_step,
    sample_chain,
    time_grid,
)
from diffusiongym.discrete.models import ExactPosterior, MLPPosterior, PosteriorModel, ResidualPosterior
from diffusiongym.discrete.oracle import DiscreteTiltOracle, empirical_probs, total_variation
from diffusiongym.discrete.path import MixturePath
from diffusiongym.discrete.rewards import LogisticClassReward, PixelFeatureReward, TableReward
from diffusiongym.discrete.schedulers import (
    CosineKappa,
    KappaScheduler,
    LinearKappa,
    PolynomialKappa,
    make_kappa_scheduler,
)
from diffusiongym.discrete.tasks import DiscreteTask, make_discrete_task

__all__ = [
    "KappaScheduler",
    "LinearKappa",
    "PolynomialKappa",
    "CosineKappa",
    "make_kappa_scheduler",
    "MixturePath",
    "PosteriorModel",
    "ExactPosterior",
    "MLPPosterior",
    "ResidualPosterior",
    "DiscreteTrajectory",
    "sample_chain",
    "base_rates",
    "controlled_step",
    "draw_step",
    "control_from_model",
    "time_grid",
    "DiscreteTiltOracle",
    "empirical_probs",
    "total_variation",
    "TableReward",
    "LogisticClassReward",
    "PixelFeatureReward",
    "DiscreteTask",
    "make_discrete_task",
]
