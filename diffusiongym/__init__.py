"""diffusiongym: pretrained diffusion and flow models as Gymnasium environments for reward adaptation.

Conventions: ``t`` runs from 0 (noise) to 1 (data); ``x_t = alpha_t x1 + beta_t x0``;
controlled dynamics ``dX = (b + sigma u) dt + sigma dB``; step reward
``-1/2 |u|^2 dt`` plus ``reward_scale * r(x1)`` at the end (``docs/maths.md``).

What a user needs is importable from here, grouped below; everything else is reachable from
its module (e.g. :mod:`diffusiongym.trainers.adjoint_matching`, :mod:`diffusiongym.logprob`,
:mod:`diffusiongym.envs.simulator`). Importing the package registers the ``diffusiongym/``
Gymnasium ids.
"""

# Base-model environments: a model's output turned into the SDE drift
from diffusiongym.envs.environment import (
    DiffusionEnvironment,
    EndpointEnvironment,
    EpsilonEnvironment,
    ScoreEnvironment,
    VelocityEnvironment,
    make_environment,
)
from diffusiongym.noise import ODE, CallableNoise, Constant, Memoryless, Noise, make_noise
from diffusiongym.schedulers import CosineScheduler, DiscreteVPScheduler, LinearScheduler, Scheduler, make_scheduler

# Base models
from diffusiongym.models.diffusers_bridge import diffusers_environment
from diffusiongym.models.diffusers_loader import load_diffusers_environment
from diffusiongym.models.digits import digits_task, load_digits_model
from diffusiongym.models.gmm import GaussianMixture, GaussianMixtureModel, TrainableGaussianMixtureModel, gmm_preset
from diffusiongym.models.export import export_pipeline, merge_lora
from diffusiongym.models.lora import add_lora, load_lora, save_lora
from diffusiongym.models.lora_diffusers import load_lora_diffusers, save_lora_diffusers

# Rewards
from diffusiongym.rewards import (
    AestheticReward,
    BrightnessReward,
    CLIPScore,
    OCRReward,
    PickScore,
    load_clip,
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

# Gymnasium environments and their registry
from diffusiongym.envs.gym_env import DiffusionEnv
from diffusiongym.envs.registry import NAMESPACE, make_env, register_env, register_envs
from diffusiongym.envs.vector_env import DiffusionVectorEnv, NumpyVectorEnv
from diffusiongym.discrete.registry import register_discrete_envs

# Tasks: a base model, a reward, a reward scale and a grid
from diffusiongym.tasks import TASKS, Task, make_task, register_task

# The engine
from diffusiongym.logprob import path_log_ratio, step_log_prob, step_log_ratios
from diffusiongym.compiled import CompileError
from diffusiongym.sampling import Trajectory, sample
from diffusiongym.timegrid import make_time_grid

# Policies (controls u(x, t, **cond)) and the networks they are built from
from diffusiongym.policies import ControlAgent, ControlPolicy, ModelControl, ValuePolicy
from diffusiongym.policies.delta import DeltaModel
from diffusiongym.policies.networks import ResidualModel, SignalScaled, TimeCNN, TimeMLP, TimeWindow

# Adaptation methods, one Trainer contract
from diffusiongym.trainers import *  # noqa: F403  (the names of diffusiongym.trainers.__all__, listed once there)

# Temporal Difference Flows: generative models of a policy's future states, policy evaluation, GPI
from diffusiongym.td_flows import (
    GPIPolicy,
    LinearGaussianMDP,
    SuccessorFlow,
    TDFlow,
    TDFlowConfig,
    TerminalFlow,
    TerminalFlowConfig,
    q_value,
)

# Multi-process training and sampling (torchrun / accelerate launch)
from diffusiongym.distributed import sample_sharded

# Training logs: one Logger interface, CSV / TensorBoard / Weights & Biases back-ends
from diffusiongym.loggers import CSVLogger, Logger, MultiLogger, TensorBoardLogger, WandbLogger, make_grid, read_metrics

# Text-to-image latent pipelines (Stable Diffusion, SDXL) as environments
from diffusiongym.text_to_image import (
    DecodedReward,
    LatentDecoder,
    PipelineComponents,
    PromptSet,
    TextToImageEnvironment,
    generate,
    load_components,
    text_to_image_environment,
    text_to_image_task,
)

# Inference-time guidance: SMC, best-of-n, importance resampling, gradient guidance
from diffusiongym.guidance import (
    OracleTwist,
    PredFinalTwist,
    ResamplingVectorEnv,
    SMCResult,
    ValueTwist,
    ZeroTwist,
    best_of_n,
    gradient_guidance,
    importance_resampling,
    smc,
)

# Exact optima, Monte-Carlo optima and statistics
from diffusiongym.optimum import OptimumEstimate, estimate_optimum
from diffusiongym.oracle import TiltOracle, tilt_frontier
from diffusiongym.utils.stats import energy_distance, null_energy_threshold

from diffusiongym import discrete, distributed, guidance, td_flows
from diffusiongym import trainers as _trainers

__version__ = "0.1.0"

__all__ = [
    # Gymnasium
    "DiffusionEnv",
    "DiffusionVectorEnv",
    "NumpyVectorEnv",
    "NAMESPACE",
    "make_env",
    "register_env",
    "register_envs",
    "register_discrete_envs",
    # tasks
    "Task",
    "TASKS",
    "make_task",
    "register_task",
    # base-model environments
    "DiffusionEnvironment",
    "VelocityEnvironment",
    "EpsilonEnvironment",
    "EndpointEnvironment",
    "ScoreEnvironment",
    "make_environment",
    "Noise",
    "ODE",
    "Memoryless",
    "Constant",
    "CallableNoise",
    "make_noise",
    "Scheduler",
    "LinearScheduler",
    "CosineScheduler",
    "DiscreteVPScheduler",
    "make_scheduler",
    # base models
    "GaussianMixture",
    "GaussianMixtureModel",
    "TrainableGaussianMixtureModel",
    "gmm_preset",
    "digits_task",
    "load_digits_model",
    "diffusers_environment",
    "load_diffusers_environment",
    "add_lora",
    "save_lora",
    "save_lora_diffusers",
    "load_lora_diffusers",
    "merge_lora",
    "export_pipeline",
    "load_lora",
    # rewards
    "Reward",
    "CLIPScore",
    "PickScore",
    "AestheticReward",
    "OCRReward",
    "load_clip",
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
    # engine
    "Trajectory",
    "sample",
    "CompileError",
    "make_time_grid",
    "step_log_prob",
    "path_log_ratio",
    "step_log_ratios",
    # policies and networks
    "ControlAgent",
    "ValuePolicy",
    "ControlPolicy",
    "ModelControl",
    "TimeMLP",
    "TimeCNN",
    "SignalScaled",
    "ResidualModel",
    "TimeWindow",
    "DeltaModel",
    # TD flows
    "TDFlow",
    "TDFlowConfig",
    "SuccessorFlow",
    "TerminalFlow",
    "TerminalFlowConfig",
    "q_value",
    "GPIPolicy",
    "LinearGaussianMDP",
    # multi-process
    "sample_sharded",
    # training logs
    "Logger",
    "MultiLogger",
    "CSVLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "make_grid",
    "read_metrics",
    # text-to-image
    "TextToImageEnvironment",
    "text_to_image_environment",
    "text_to_image_task",
    "load_components",
    "PipelineComponents",
    "PromptSet",
    "LatentDecoder",
    "DecodedReward",
    "generate",
    # inference-time guidance
    "smc",
    "SMCResult",
    "OracleTwist",
    "ValueTwist",
    "PredFinalTwist",
    "ZeroTwist",
    "best_of_n",
    "importance_resampling",
    "gradient_guidance",
    "ResamplingVectorEnv",
    # oracle, Monte-Carlo optimum and statistics
    "TiltOracle",
    "tilt_frontier",
    "OptimumEstimate",
    "estimate_optimum",
    "energy_distance",
    "null_energy_threshold",
    # submodules
    "discrete",
    "distributed",
    "guidance",
    "td_flows",
]

__all__ += _trainers.__all__  # the trainers, on one contract

register_envs()
register_discrete_envs()
