"""Adaptation methods, each a :class:`~diffusiongym.trainers.base.Trainer` on one contract:
``Method(task, reward=None, reward_scale=None, model=None, config=None)``, ``step``, ``train``,
``evaluate``, ``history``, ``policy``, ``save`` / ``load`` (``docs/adding_a_method.md``).

- Value Matching: :class:`ValueMatching` (learn the cost-to-go, ``u = -sigma grad V``).
- Adjoint Matching: :class:`AdjointMatching` (regress the control on the lean adjoint).
- Energy-weighted flow matching: :class:`EFMTrainer`.
- Policy gradient (GRPO/PPO) on the denoising MDP: :class:`PolicyGradient`.
- Reversal Q-learning: :class:`RQL`.
- Discrete (CTMC) tasks: reward-weighted cross-entropy :class:`RewardWeightedTrainer` and policy
  gradient :class:`DiscretePolicyGradient` (both on :class:`~diffusiongym.trainers.discrete_trainer.DiscreteTrainer`).

Method internals (``lean_adjoint``, ``group_advantages``, ``efm_weights``, ...) are
reachable from their modules.
"""

from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig
from diffusiongym.trainers.base import Trainer
from diffusiongym.trainers.config import TrainerConfig
from diffusiongym.trainers.efm import EFMConfig, EFMTrainer
from diffusiongym.trainers.policy_gradient import PolicyGradient, PolicyGradientConfig
from diffusiongym.trainers.policy_gradient_discrete import DiscretePolicyGradient
from diffusiongym.trainers.reward_weighted import RewardWeightedConfig, RewardWeightedTrainer
from diffusiongym.trainers.rql import RQL, RQLConfig
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig, load_value_policy

__all__ = [
    "Trainer",
    "TrainerConfig",
    "ValueMatching",
    "ValueMatchingConfig",
    "load_value_policy",
    "AdjointMatching",
    "AdjointMatchingConfig",
    "EFMTrainer",
    "EFMConfig",
    "PolicyGradient",
    "PolicyGradientConfig",
    "DiscretePolicyGradient",
    "RQL",
    "RQLConfig",
    "RewardWeightedTrainer",
    "RewardWeightedConfig",
]
