"""Base-model wrappers: turn a model's output into the SDE drift ``b(x, t)``.

Naming: a :class:`DiffusionEnvironment` is the *model wrapper* (network + scheduler + noise
schedule), the "environment" in the control-theoretic sense (the dynamics a control acts
on). It is not a Gymnasium environment: that is
:class:`~diffusiongym.envs.gym_env.DiffusionEnv` (and its vector twin), which simulates a
:class:`~diffusiongym.tasks.Task`; ``env.unwrapped.task.environment`` is the
``DiffusionEnvironment`` of a Gymnasium env ``env``.

A base model predicts one of velocity, epsilon (``x0``), endpoint (``x1``) or score.
:class:`VelocityEnvironment`, :class:`EpsilonEnvironment`,
:class:`EndpointEnvironment` and :class:`ScoreEnvironment` wrap it with a scheduler and
a diffusion coefficient ``sigma(t)`` and give

- ``drift(x, t)``: ``b = v + (sigma^2 / 2) score``, the drift of the SDE
  ``dX = b dt + sigma dB`` with the base model's marginals;
- ``pred_final(x, t)``: the Tweedie estimate ``x1_hat = E[x1 | x_t = x]``;
- ``velocity`` / ``score`` / ``epsilon`` likewise.

Model calling convention: ``model(x, t, **cond)`` with ``x`` of shape
``(n, *sample_shape)`` and ``t`` a tensor of shape ``(n,)`` in ``x``'s dtype (``t`` in
``[0, 1]``, 0 = noise). A model may expose ``sample_shape``. Conversions between the four
parameterisations and the drift: ``docs/maths.md``, "Paths and parameterisations" and "Drift
conversion and noise schedules".
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffusiongym.noise import Memoryless, Noise, make_noise
from diffusiongym.parameterization import PARAMETERIZATIONS, check_parameterization, conversion_coefficients, convert
from diffusiongym.schedulers import Scheduler, make_scheduler

__all__ = [
    "time_vector",
    "DiffusionEnvironment",
    "VelocityEnvironment",
    "EpsilonEnvironment",
    "EndpointEnvironment",
    "ScoreEnvironment",
    "make_environment",
]

Model = Callable[..., Tensor]


def time_vector(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a vector of shape ``(n,)`` in ``x``'s dtype and device (a scalar is expanded;
    ``(n, 1)``, the Gymnasium observation's shape, is flattened)."""
    tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if tt.ndim == 0:
        return tt.expand(x.shape[0])
    tt = tt.reshape(-1) if tt.ndim == 2 and tt.shape[1] == 1 else tt
    if tt.shape != (x.shape[0],):
        raise ValueError(f"t: expected a scalar, shape ({x.shape[0]},) or ({x.shape[0]}, 1), got {tuple(tt.shape)}")
    return tt


class DiffusionEnvironment:
    """Base-model wrapper (model + scheduler + noise -> drift); not a Gymnasium env (that is ``DiffusionEnv``).

    Subclasses fix the parameterisation of the model's output (:class:`VelocityEnvironment`,
    :class:`EpsilonEnvironment`, :class:`EndpointEnvironment`, :class:`ScoreEnvironment`).

    Parameters
    ----------
    model : callable
        ``model(x, t, **cond) -> output`` in this class's ``parameterization``.
    scheduler : str or Scheduler
        ``"linear"``, ``"cosine"``, ``"vp"`` or an instance.
    noise : str, float, callable or Noise
        ``"memoryless"`` (default), ``"ode"``, a constant sigma or ``t -> sigma(t)``.
    sample_shape : tuple of int, optional
        Shape of one sample; defaults to ``model.sample_shape``.
    """

    parameterization: ClassVar[str] = ""

    def __init__(
        self,
        model: Model,
        scheduler: str | Scheduler = "linear",
        noise: str | float | Noise | Callable[[Tensor], Tensor] = "memoryless",
        sample_shape: tuple[int, ...] | None = None,
    ):
        check_parameterization(self.parameterization)
        if not callable(model):
            raise TypeError(f"model: expected a callable model(x, t, **cond), got {type(model).__name__}")
        self.model = model
        self.scheduler = make_scheduler(scheduler)
        self.noise = make_noise(noise)
        shape = sample_shape if sample_shape is not None else getattr(model, "sample_shape", None)
        self.sample_shape: tuple[int, ...] | None = None if shape is None else tuple(int(s) for s in shape)

    # ----------------------------------------------------------------- coefficients
    def sigma(self, t: Tensor | float) -> Tensor:
        """Diffusion coefficient ``sigma(t)`` (float64 for float input)."""
        tt = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
        return self.noise(tt, self.scheduler)

    def coefficients(self, t: Tensor, target: str) -> tuple[Tensor, Tensor]:
        """``(coef_x, coef_out)`` with ``target = coef_x * x + coef_out * model_output``.

        ``t`` of any shape; computed in float64. ``target`` is a parameterisation or
        ``"drift"``.
        """
        t64 = torch.as_tensor(t, dtype=torch.float64)
        sigma = self.noise(t64, self.scheduler) if target == "drift" else None
        return conversion_coefficients(self.parameterization, target, *self.scheduler(t64), sigma=sigma)

    # ------------------------------------------------------------------ evaluation
    def output(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """Raw model output at ``(x, t)``, shape of ``x``."""
        out = self.model(x, time_vector(t, x), **cond)
        if out.shape != x.shape:
            raise ValueError(f"model output: expected shape {tuple(x.shape)} (same as x), got {tuple(out.shape)}")
        return out

    def convert(self, output: Tensor, x: Tensor, t: Tensor | float, target: str) -> Tensor:
        """Convert a model ``output`` (this parameterisation) to ``target`` at ``(x, t)``."""
        sigma = self.sigma(torch.as_tensor(t, dtype=torch.float64)) if target == "drift" else None
        return convert(output, x, t, self.scheduler, self.parameterization, target, sigma=sigma)

    def drift(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """SDE drift ``b(x, t) = v + (sigma^2 / 2) score``."""
        return self.convert(self.output(x, t, **cond), x, t, "drift")

    def pred_final(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """Tweedie estimate ``E[x1 | x_t = x]``."""
        return self.convert(self.output(x, t, **cond), x, t, "endpoint")

    def velocity(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """Flow velocity ``v = d_alpha x1_hat + d_beta eps_hat``."""
        return self.convert(self.output(x, t, **cond), x, t, "velocity")

    def score(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """Score ``grad_x log p_t(x) = -eps_hat / beta``."""
        return self.convert(self.output(x, t, **cond), x, t, "score")

    def epsilon(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        """Noise estimate ``eps_hat = E[x0 | x_t = x]``."""
        return self.convert(self.output(x, t, **cond), x, t, "epsilon")

    # ------------------------------------------------------------------- variants
    def with_noise(self, noise: str | float | Noise | Callable[[Tensor], Tensor]) -> DiffusionEnvironment:
        """A shallow copy with another diffusion coefficient (same model object)."""
        new = copy.copy(self)
        new.noise = make_noise(noise)
        return new

    def as_memoryless(self) -> DiffusionEnvironment:
        """This environment if its noise is already the memoryless ``sigma^2 = 2 eta``, else a copy
        with it (the schedule under which the optimally controlled ``X1`` has law ``p*``)."""
        if isinstance(self.noise, Memoryless) and self.noise.is_memoryless:
            return self
        return self.with_noise(Memoryless())

    def with_model(self, model: Model) -> DiffusionEnvironment:
        """A shallow copy around another model in the same parameterisation (e.g. a fine-tuned copy)."""
        new = copy.copy(self)
        new.model = model
        return new

    def __repr__(self) -> str:
        model = type(self.model).__name__
        return f"{type(self).__name__}(model={model}, scheduler={self.scheduler!r}, noise={self.noise!r})"


class VelocityEnvironment(DiffusionEnvironment):
    """Base model predicts the flow velocity ``v = d_alpha x1_hat + d_beta eps_hat``."""

    parameterization = "velocity"


class EpsilonEnvironment(DiffusionEnvironment):
    """Base model predicts the noise ``eps_hat = E[x0 | x_t]``."""

    parameterization = "epsilon"


class EndpointEnvironment(DiffusionEnvironment):
    """Base model predicts the clean sample ``x1_hat = E[x1 | x_t]``."""

    parameterization = "endpoint"


class ScoreEnvironment(DiffusionEnvironment):
    """Base model predicts the score ``grad log p_t = -eps_hat / beta``."""

    parameterization = "score"


ENVIRONMENTS: dict[str, type[DiffusionEnvironment]] = {
    "velocity": VelocityEnvironment,
    "epsilon": EpsilonEnvironment,
    "endpoint": EndpointEnvironment,
    "score": ScoreEnvironment,
}
assert tuple(ENVIRONMENTS) == PARAMETERIZATIONS


def make_environment(model: Model, parameterization: str, **kwargs: Any) -> DiffusionEnvironment:
    """Wrap ``model`` in the environment class of its ``parameterization``."""
    return ENVIRONMENTS[check_parameterization(parameterization)](model, **kwargs)
