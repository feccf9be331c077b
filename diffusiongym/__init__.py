"""diffusiongym: pretrained diffusion and flow models as Gymnasium environments for reward adaptation.

Conventions: ``t`` runs from 0 (noise) to 1 (data); ``x_t = alpha_t x1 + beta_t x0``;
controlled dynamics ``dX = (b + sigma u) dt + sigma dB``; step reward
``-1/2 |u|^2 dt`` plus ``reward_scale * r(x1)`` at the end.
"""

from diffusiongym.envs.environment import (
    DiffusionEnvironment,
    EndpointEnvironment,
    EpsilonEnvironment,
    ScoreEnvironment,
    VelocityEnvironment,
    make_environment,
)
from diffusiongym.models.gmm import GaussianMixture, GaussianMixtureModel, TrainableGaussianMixtureModel, gmm_preset
from diffusiongym.noise import ODE, CallableNoise, Constant, Memoryless, Noise, make_noise
from diffusiongym.oracle import TiltOracle
from diffusiongym.parameterization import PARAMETERIZATIONS, conversion_coefficients, convert
from diffusiongym.models.diffusers_bridge import diffusers_environment, load_diffusers_environment
from diffusiongym.models.digits import digits_task, load_digits_model
from diffusiongym.models.lora import add_lora, load_lora, save_lora
from diffusiongym.rewards import (
    BrightnessReward,
    CallableReward,
    ConstantReward,
    ContrastReward,
    DigitClassifierReward,
    ImageReward,
    JPEGCompressibility,
    JPEGIncompressibility,
    LinearReward,
    QuadraticReward,
    Reward,
)
from diffusiongym.sampling import Trajectory, sample
from diffusiongym.schedulers import CosineScheduler, DiscreteVPScheduler, LinearScheduler, Scheduler, make_scheduler
from diffusiongym.timegrid import make_time_grid
from diffusiongym.utils.stats import energy_distance, null_energy_threshold

__version__ = "0.1.0"

__all__ = [
    "DiffusionEnvironment",
    "VelocityEnvironment",
    "EpsilonEnvironment",
    "EndpointEnvironment",
    "ScoreEnvironment",
    "make_environment",
    "GaussianMixture",
    "GaussianMixtureModel",
    "TrainableGaussianMixtureModel",
    "gmm_preset",
    "Noise",
    "ODE",
    "Memoryless",
    "Constant",
    "CallableNoise",
    "make_noise",
    "TiltOracle",
    "PARAMETERIZATIONS",
    "conversion_coefficients",
    "convert",
    "Reward",
    "CallableReward",
    "ConstantReward",
    "LinearReward",
    "QuadraticReward",
    "ImageReward",
    "DigitClassifierReward",
    "JPEGCompressibility",
    "JPEGIncompressibility",
    "BrightnessReward",
    "ContrastReward",
    "digits_task",
    "load_digits_model",
    "diffusers_environment",
    "load_diffusers_environment",
    "add_lora",
    "save_lora",
    "load_lora",
    "Trajectory",
    "sample",
    "Scheduler",
    "LinearScheduler",
    "CosineScheduler",
    "DiscreteVPScheduler",
    "make_scheduler",
    "make_time_grid",
    "energy_distance",
    "null_energy_threshold",
]

from diffusiongym.envs.gym_env import DiffusionEnv  # noqa: E402
from diffusiongym.envs.registry import NAMESPACE, make_env, register_env, register_envs  # noqa: E402
from diffusiongym.envs.simulator import ACTION_MODES, DiffusionSimulator  # noqa: E402
from diffusiongym.envs.vector_env import DiffusionVectorEnv, NumpyVectorEnv  # noqa: E402
from diffusiongym.tasks import TASKS, Task, make_task, register_task  # noqa: E402

from diffusiongym.discrete.registry import register_discrete_envs  # noqa: E402

from diffusiongym import discrete  # noqa: E402
from diffusiongym.logprob import euler_step_log_prob, path_log_ratio, step_kl, step_log_prob  # noqa: E402
from diffusiongym.policies import *  # noqa: E402,F403
from diffusiongym.policies import __all__ as _policy_names  # noqa: E402
from diffusiongym.trainers import *  # noqa: E402,F403
from diffusiongym.trainers import __all__ as _trainer_names  # noqa: E402

register_envs()
register_discrete_envs()

__all__ += [
    "DiffusionEnv",
    "DiffusionVectorEnv",
    "NumpyVectorEnv",
    "DiffusionSimulator",
    "ACTION_MODES",
    "NAMESPACE",
    "make_env",
    "register_env",
    "register_envs",
    "Task",
    "TASKS",
    "make_task",
    "register_task",
    "discrete",
    "step_log_prob",
    "euler_step_log_prob",
    "step_kl",
    "path_log_ratio",
    *_policy_names,
    *_trainer_names,
]
