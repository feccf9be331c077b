"""Temporal Difference Flows: generative models of a policy's future states (TD-CFM, TD²-CFM), and GPI.

Farebrother et al., "Temporal Difference Flows" (2025). See ``docs/td_flows.md``.

- :class:`SuccessorFlow`: the conditional flow ``v_theta(x, t | s, a)`` and its ODE sampler.
- :mod:`~diffusiongym.td_flows.losses`: TD-CFM, TD²-CFM, Polyak averaging, gradient variance.
- :class:`TDFlow` / :class:`TDFlowConfig`: the Trainer on a transitions dataset.
- :func:`q_value`, :class:`GPIPolicy`: policy evaluation for any reward, and GPI.
- :class:`LinearGaussianMDP`: a test bed whose successor measure is known exactly.
- :class:`TerminalFlow` / :class:`TerminalFlowConfig`: in the diffusion gym, the law of ``x1``
  given ``(x_t, t)`` under the base policy, and values ``V(x_t, t)`` for any terminal reward.
- :mod:`~diffusiongym.td_flows.data`: transitions from Gymnasium Box envs, rollouts, Pendulum helpers.
"""

from diffusiongym.td_flows.evaluation import GPIPolicy, q_value
from diffusiongym.td_flows.linear_gaussian import LinearGaussianMDP
from diffusiongym.td_flows.losses import gradient_variance, polyak_update, td2_cfm_loss, td_cfm_loss
from diffusiongym.td_flows.successor import SuccessorFlow
from diffusiongym.td_flows.terminal import TerminalFlow, TerminalFlowConfig
from diffusiongym.td_flows.trainer import TDFlow, TDFlowConfig

__all__ = [
    "SuccessorFlow",
    "TDFlow",
    "TDFlowConfig",
    "td_cfm_loss",
    "td2_cfm_loss",
    "polyak_update",
    "gradient_variance",
    "q_value",
    "GPIPolicy",
    "LinearGaussianMDP",
    "TerminalFlow",
    "TerminalFlowConfig",
]
