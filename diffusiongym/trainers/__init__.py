"""Adaptation methods, each a :class:`~diffusiongym.trainers.base.Trainer` (one contract:
``step``, ``train``, ``evaluate``, ``history``, ``policy``, ``save``, ``load``).

- Value Matching: :class:`ValueMatching`.
- Adjoint Matching: :class:`AdjointMatching`.
- Energy-weighted flow matching: :class:`EFMTrainer`.
- Policy gradient (GRPO/PPO) on the denoising MDP: :class:`PolicyGradientAgent`.
- Reversal Q-learning: :class:`RQL`.
"""

from diffusiongym.trainers.adjoint_matching import AdjointMatching, AdjointMatchingConfig, lean_adjoint
from diffusiongym.trainers.efm import EFMConfig, EFMTrainer, efm_weights
from diffusiongym.trainers.policy_gradient import PGConfig, PolicyGradientAgent, group_advantages
from diffusiongym.trainers.rql import RQL, FlowPolicy, FlowValue, OfflineDataset, RQLConfig
from diffusiongym.trainers.value_matching import ValueMatching, ValueMatchingConfig, load_value_policy

__all__ = [
    "ValueMatching",
    "ValueMatchingConfig",
    "load_value_policy",
    "AdjointMatching",
    "AdjointMatchingConfig",
    "lean_adjoint",
    "EFMConfig",
    "EFMTrainer",
    "efm_weights",
    "PGConfig",
    "PolicyGradientAgent",
    "group_advantages",
    "RQL",
    "RQLConfig",
    "FlowPolicy",
    "FlowValue",
    "OfflineDataset",
]
