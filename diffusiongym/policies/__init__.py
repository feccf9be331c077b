"""Adaptation methods and policies: agents on the engine (control ``u(x, t, **cond)`` or a
fine-tuned model) and on the Gymnasium API (through :class:`ControlAgent`).

- Value-function control: :class:`ValuePolicy`, :class:`ValueMatching`.
- SOC fine-tuning: :class:`AdjointMatching`.
- Energy-weighted flow matching: :class:`EFMTrainer`.
- Policy gradient on the denoising MDP: :class:`PolicyGradientAgent`.
- Denoise-as-action offline RL: :class:`RQL`.
"""

from diffusiongym.policies.adjoint_matching import AdjointMatching, AdjointMatchingConfig, lean_adjoint
from diffusiongym.policies.agent import ControlAgent, control_action
from diffusiongym.policies.efm import EFMConfig, EFMTrainer, efm_weights
from diffusiongym.policies.networks import FourierTimeEmbedding, ResidualModel, TimeMLP
from diffusiongym.policies.policy_gradient import PGConfig, PolicyGradientAgent, group_advantages
from diffusiongym.policies.rql import RQL, FlowPolicy, FlowValue, OfflineDataset, RQLConfig
from diffusiongym.policies.value import ControlPolicy, SignalScaled, TimeCNN, ValuePolicy
from diffusiongym.policies.value_matching import ValueMatching, ValueMatchingConfig, load_value_policy

__all__ = [
    "ControlAgent",
    "control_action",
    "TimeMLP",
    "FourierTimeEmbedding",
    "ResidualModel",
    "ValuePolicy",
    "ControlPolicy",
    "TimeCNN",
    "SignalScaled",
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
