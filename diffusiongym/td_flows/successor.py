"""The conditional flow ``v_theta(x, t | s, a)`` that generates a successor measure, and its sampler.

A :class:`SuccessorFlow` is a velocity field on the package's interpolation path (default
``"linear"``): ``x_t = alpha_t x1 + beta_t x0`` with ``x0 ~ N(0, I)`` at ``t = 0`` (noise) and
``x1 ~ m(. | s, a)`` at ``t = 1`` (data). Integrating its probability-flow ODE
(:func:`diffusiongym.sample` with ``noise="ode"`` on a uniform grid from ``t = 0``) turns
noise into draws of ``m``. The conditioning ``(s, a)`` is concatenated to ``x`` and fed to a
:class:`~diffusiongym.policies.networks.TimeMLP`.

States are standardised inside the model: ``x``, ``s`` and the generated states live in
``z = (state - loc) / scale`` (``loc``, ``scale`` are buffers, e.g. fitted on a dataset's
states with :meth:`SuccessorFlow.fit_normalizer`); :meth:`SuccessorFlow.sample` returns raw
states. Actions are used as given (datasets of
:func:`~diffusiongym.trainers.offline_data.collect_dataset` store them in ``[-1, 1]``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.envs.environment import VelocityEnvironment
from diffusiongym.policies.networks import TimeMLP
from diffusiongym.sampling import Trajectory, sample
from diffusiongym.schedulers import Scheduler, make_scheduler
from diffusiongym.timegrid import make_time_grid
from diffusiongym.utils.validation import check_positive_int, check_real, check_tensor

__all__ = ["SuccessorFlow", "flow_environment", "integrate"]


class SuccessorFlow(nn.Module):
    """Velocity ``v_theta(z, t | s, a)`` of a flow from ``N(0, I)`` to the successor measure ``m(. | s, a)``.

    Parameters
    ----------
    state_dim : int
        ``ds``: the generated states and the conditioning state have this dimension (the
        generated space is the state space), unless ``out_dim`` is given.
    action_dim : int
        ``da`` (0: no action, e.g. a model of a fixed policy's future given the state alone).
    gamma : float
        Discount in ``[0, 1]`` of the measure the model is trained for (kept with the model so
        that :func:`~diffusiongym.td_flows.evaluation.q_value` scales by the right ``1 / (1 - gamma)``).
    hidden, layers, num_frequencies
        Size of the :class:`TimeMLP`.
    out_dim : int, optional
        Dimension of the generated states when it differs from ``state_dim`` (the terminal
        model of the diffusion gym generates ``x1`` of dim ``d`` from ``s = (x_t, t)``).
    scheduler : str or Scheduler
        The interpolation path of the flow (``"linear"``: ``alpha = t``, ``beta = 1 - t``).

    Call convention: ``model(z, t, s=s, a=a)`` with ``z`` standardised ``(n, out_dim)``, ``t``
    ``(n,)``, ``s`` raw ``(n, ds)``, ``a`` ``(n, da)``; returns the velocity ``(n, out_dim)``.
    """

    def __init__(
        self,
        state_dim: int,
        action_dim: int,
        gamma: float = 0.9,
        hidden: int = 128,
        layers: int = 3,
        num_frequencies: int = 8,
        out_dim: int | None = None,
        scheduler: str | Scheduler = "linear",
    ):
        super().__init__()
        state_dim = check_positive_int("state_dim", state_dim)
        if isinstance(action_dim, bool) or not isinstance(action_dim, int) or action_dim < 0:
            raise ValueError(f"action_dim: expected a non-negative integer, got {action_dim!r}")
        gamma = check_real("gamma", gamma)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma: expected a discount in [0, 1], got {gamma}")
        out_dim = state_dim if out_dim is None else check_positive_int("out_dim", out_dim)
        self.scheduler = make_scheduler(scheduler)
        self.config = {
            "state_dim": state_dim,
            "action_dim": action_dim,
            "gamma": gamma,
            "hidden": hidden,
            "layers": layers,
            "num_frequencies": num_frequencies,
            "out_dim": out_dim,
            "scheduler": type(self.scheduler).__name__,
        }
        self.state_dim, self.action_dim, self.out_dim, self.gamma = state_dim, action_dim, out_dim, gamma
        self.sample_shape = (out_dim,)
        self.net = TimeMLP(out_dim + state_dim + action_dim, out_dim, hidden, layers, num_frequencies)
        self.register_buffer("state_loc", torch.zeros(state_dim))
        self.register_buffer("state_scale", torch.ones(state_dim))
        self.register_buffer("out_loc", torch.zeros(out_dim))
        self.register_buffer("out_scale", torch.ones(out_dim))

    # ------------------------------------------------------------ normalisation
    @torch.no_grad()
    def fit_normalizer(self, states: Tensor, outputs: Tensor | None = None, min_scale: float = 1e-3) -> None:
        """Set ``loc``/``scale`` to the mean and standard deviation of ``states`` ``(N, ds)``
        (and of ``outputs`` ``(N, out_dim)`` for the generated space; default ``states`` when
        ``out_dim == state_dim``). Scales below ``min_scale`` are raised to it."""
        check_tensor("states", states, (-1, self.state_dim))
        if outputs is None:
            if self.out_dim != self.state_dim:
                raise ValueError("outputs: required when out_dim differs from state_dim")
            outputs = states
        check_tensor("outputs", outputs, (-1, self.out_dim))
        for data, loc, scale in ((states, self.state_loc, self.state_scale), (outputs, self.out_loc, self.out_scale)):
            loc.copy_(data.mean(0).to(loc))
            scale.copy_(data.std(0).clamp_min(min_scale).to(scale))

    def normalize(self, x: Tensor) -> Tensor:
        """Generated-space states to the model's standardised ``z``."""
        return (x - self.out_loc.to(x)) / self.out_scale.to(x)

    def denormalize(self, z: Tensor) -> Tensor:
        return z * self.out_scale.to(z) + self.out_loc.to(z)

    # ------------------------------------------------------------------- field
    def forward(self, z: Tensor, t: Tensor, *, s: Tensor, a: Tensor | None = None, **cond: Any) -> Tensor:
        if self.action_dim > 0 and a is None:
            raise ValueError(f"a: expected actions of shape (n, {self.action_dim}), got None")
        s_n = (s - self.state_loc.to(s)) / self.state_scale.to(s)
        parts = [z, s_n] if self.action_dim == 0 else [z, s_n, a.to(z)]
        return self.net(torch.cat(parts, dim=1), t)

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        s: Tensor,
        a: Tensor | None = None,
        num_samples: int = 1,
        *,
        steps: int = 16,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draws of ``m(. | s, a)`` in raw units, shape ``(n, num_samples, out_dim)``.

        ``s`` ``(n, ds)``, ``a`` ``(n, da)`` (``None`` when ``action_dim == 0``); each row is
        repeated ``num_samples`` times and integrated with ``steps`` Euler steps of the ODE.
        """
        n = check_tensor("s", s, (-1, self.state_dim)).shape[0]
        k = check_positive_int("num_samples", num_samples)
        s_rep = s.repeat_interleave(k, 0)
        a_rep = None if a is None else check_tensor("a", a, (n, self.action_dim)).repeat_interleave(k, 0)
        z = integrate(self, s_rep, a_rep, steps=steps, generator=generator).x1
        return self.denormalize(z).reshape(n, k, self.out_dim)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


def flow_environment(model: SuccessorFlow) -> VelocityEnvironment:
    """The model as a deterministic (``noise="ode"``) velocity environment of the package's engine."""
    return VelocityEnvironment(model, scheduler=model.scheduler, noise="ode", sample_shape=(model.out_dim,))


def integrate(
    model: SuccessorFlow,
    s: Tensor,
    a: Tensor | None,
    *,
    steps: int = 16,
    grid: Tensor | None = None,
    x0: Tensor | None = None,
    generator: torch.Generator | None = None,
    store: tuple[str, ...] = (),
) -> Trajectory:
    """Euler integration of the model's ODE from ``z0 ~ N(0, I)`` at ``t = 0`` (standardised units).

    ``grid`` defaults to ``steps`` uniform steps on ``[0, 1]``; ``store`` as in
    :func:`diffusiongym.sample` (``"states"`` and ``"drifts"``: the flow's points and its
    velocity there, which TD²-CFM regresses on).
    """
    grid = make_time_grid(steps, 0.0) if grid is None else grid
    if x0 is None:
        x0 = torch.randn((s.shape[0], model.out_dim), generator=generator, device=s.device, dtype=s.dtype)
    cond = {"s": s} if a is None else {"s": s, "a": a}
    return sample(flow_environment(model), x=x0, grid=grid, cond=cond, store=store, generator=generator)
