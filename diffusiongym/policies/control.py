"""The control of a fine-tuned model: the one place where ``u = coef_out (out_policy - out_base) / sigma`` lives.

A fine-tuned copy of the base model outputs in the base model's parameterisation; with the
same scheduler and noise its drift is ``b_policy = coef_x x + coef_out out_policy`` against
the base's ``b = coef_x x + coef_out out_base``, so the control it applies in
``dX = (b + sigma u) dt + sigma dB`` is

    u = (b_policy - b) / sigma = coef_out(t) (out_policy - out_base) / sigma(t).

(``docs/maths.md``, "Controls from fine-tuned models".) :func:`output_control` is that formula on
given outputs (the engine, the simulator and the trainers call it with precomputed
coefficients); :func:`control_factor` gives ``coef_out / sigma`` at times ``t``;
:class:`ModelControl` turns a fine-tuned model into a control ``u(x, t, **cond)`` that
:func:`diffusiongym.sample`, :class:`~diffusiongym.policies.agent.ControlAgent` and the
Gymnasium envs accept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.envs.environment import DiffusionEnvironment
from diffusiongym.envs.environment import time_vector as _time_vector
from diffusiongym.policies.value import _Agent

__all__ = ["output_control", "control_factor", "ModelControl"]


def output_control(out_policy: Tensor, out_base: Tensor, factor: Tensor | float) -> Tensor:
    """``u = factor (out_policy - out_base)`` with ``factor = coef_out / sigma`` (a float, or a
    tensor broadcastable to the outputs, e.g. shape ``(n, 1, ..., 1)``)."""
    return (out_policy - out_base) * factor


def control_factor(env: DiffusionEnvironment, t: Tensor, like: Tensor) -> Tensor:
    """``coef_out(t) / sigma(t)`` in float64 maths, cast to ``like``'s dtype and shaped
    ``(n, 1, ..., 1)`` to broadcast against ``like`` ``(n, *sample_shape)``."""
    t64 = t.detach().to(torch.float64)
    _, coef_out = env.coefficients(t64, "drift")
    return (coef_out / env.sigma(t64)).to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class ModelControl(_Agent):
    """The control ``u(x, t, **cond)`` of a fine-tuned ``model`` against ``env``'s base model.

    Parameters
    ----------
    model : nn.Module
        In ``env``'s parameterisation (e.g. a trainable copy, a LoRA copy, a
        :class:`~diffusiongym.policies.networks.ResidualModel`).
    env : DiffusionEnvironment
        The base model, scheduler and noise (``sigma > 0``).
    action_scale : float
        Gymnasium action ``a = u / action_scale`` (see :meth:`act`).

    Notes
    -----
    The base output carries no graph to parameters (it is built only when ``x`` requires grad,
    for ``d u / d x``); training gradients flow into ``model``.
    :func:`diffusiongym.sample` recognises a ``ModelControl`` of its own ``env`` and shares
    the base-model call it makes for the drift (one base call per step, as with ``policy=``).
    """

    def __init__(self, model: nn.Module, env: DiffusionEnvironment, action_scale: float = 1.0):
        if not callable(model):
            raise TypeError(
                f"model: expected a callable model(x, t, **cond) in the base parameterisation, got {type(model).__name__}"
            )
        super().__init__(env, action_scale, requires_noise=True)
        self.model = model

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """``u = coef_out (model(x, t) - base(x, t)) / sigma``, shape of ``x``."""
        t_vec = _time_vector(t, x)
        # the base is the fixed reference: no graph to its parameters, but one through x when x
        # carries one (so u's x-derivative is the same as in sample(policy=model))
        with torch.set_grad_enabled(torch.is_grad_enabled() and x.requires_grad):
            base = self.env.model(x, t_vec, **cond)
        return output_control(self.model(x, t_vec, **cond), base, control_factor(self.env, t_vec, x))
