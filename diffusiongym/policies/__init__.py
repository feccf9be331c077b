"""Policies: controls ``u(x, t, **cond)`` usable by :func:`diffusiongym.sample`, by
:class:`ControlAgent` on the Gymnasium envs, and as what every trainer exposes as ``policy``.

- :class:`ValuePolicy`: ``u = -sigma grad_x V`` from a cost-to-go network.
- :class:`ControlPolicy`: a network that outputs ``u``.
- :class:`ModelControl`: the control of a fine-tuned model (``u = coef_out (out - out_base) / sigma``).
- :class:`DeltaModel`: ``base + scale (model - reference)``, a fine-tuned model from two fits.
- :class:`ControlAgent` / :func:`control_action`: observation in, normalised action out.
- :mod:`diffusiongym.policies.networks`: the small time-conditioned networks.
"""

from diffusiongym.policies.agent import ControlAgent, control_action
from diffusiongym.policies.control import ModelControl, control_factor, output_control
from diffusiongym.policies.delta import DeltaModel
from diffusiongym.policies.networks import FourierTimeEmbedding, ResidualModel, TimeMLP
from diffusiongym.policies.networks import SignalScaled, TimeCNN
from diffusiongym.policies.value import ControlPolicy, ValuePolicy

__all__ = [
    "ControlAgent",
    "control_action",
    "ModelControl",
    "control_factor",
    "output_control",
    "TimeMLP",
    "FourierTimeEmbedding",
    "ResidualModel",
    "DeltaModel",
    "ValuePolicy",
    "ControlPolicy",
    "TimeCNN",
    "SignalScaled",
]
