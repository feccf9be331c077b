"""Exact conversions between the four model parameterisations at ``(x, t)``.

Every quantity the SDE needs is linear in the pair ``(x1_hat, eps_hat)`` of posterior
means (``x1_hat = E[x1 | x_t = x]``, ``eps_hat = E[x0 | x_t = x]``):

==============  ======================  ===========================
quantity        coefficient of x1_hat   coefficient of eps_hat
==============  ======================  ===========================
state ``x``     ``alpha``               ``beta``
``endpoint``    ``1``                   ``0``
``epsilon``     ``0``                   ``1``
``velocity``    ``d_alpha``             ``d_beta``
``score``       ``0``                   ``-1 / beta``
``drift``       ``d_alpha``             ``d_beta - sigma^2 / (2 beta)``
==============  ======================  ===========================

(``drift`` is ``b = v + (sigma^2 / 2) score``.) Given ``x`` and a model output in one
parameterisation, the 2x2 system ``[x; out] = M [x1_hat; eps_hat]`` is solved in closed
form, so any target is ``coef_x * x + coef_out * out`` with scalar (per-time)
coefficients. This module is the one place where those coefficients are computed.
"""

from __future__ import annotations

from torch import Tensor

from diffusiongym.schedulers import Scheduler
from diffusiongym.utils.validation import unknown_name_error

__all__ = [
    "PARAMETERIZATIONS",
    "TARGETS",
    "basis_coordinates",
    "conversion_coefficients",
    "convert",
    "check_parameterization",
]

PARAMETERIZATIONS = ("velocity", "epsilon", "endpoint", "score")
TARGETS = (*PARAMETERIZATIONS, "drift")


def check_parameterization(name: str) -> str:
    """Return ``name`` if it is a known parameterisation, else raise a clear ``ValueError``
    (``TypeError`` for a non-string)."""
    if not isinstance(name, str):
        raise TypeError(f"parameterization: expected one of {list(PARAMETERIZATIONS)}, got {type(name).__name__}")
    if name not in PARAMETERIZATIONS:
        raise unknown_name_error("parameterization", name, PARAMETERIZATIONS)
    return name


def basis_coordinates(
    name: str, alpha: Tensor, beta: Tensor, d_alpha: Tensor, d_beta: Tensor, sigma: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Coordinates ``(c1, c0)`` of a quantity: ``quantity = c1 * x1_hat + c0 * eps_hat``."""
    if name == "endpoint":
        return alpha * 0 + 1, alpha * 0
    if name == "epsilon":
        return alpha * 0, alpha * 0 + 1
    if name == "velocity":
        return d_alpha, d_beta
    if name == "score":
        return alpha * 0, -1.0 / beta
    if name == "drift":
        if sigma is None:
            raise ValueError("sigma: required for the 'drift' target")
        return d_alpha, d_beta - sigma**2 / (2.0 * beta)
    if name == "state":
        return alpha, beta

    raise unknown_name_error("target", name, (*TARGETS, "state"))


def conversion_coefficients(
    source: str, target: str, alpha: Tensor, beta: Tensor, d_alpha: Tensor, d_beta: Tensor, sigma: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Coefficients ``(coef_x, coef_out)`` with ``target = coef_x * x + coef_out * out``.

    ``out`` is the model output in the ``source`` parameterisation. All arguments are
    tensors of one shape (the times); the result has that shape. Singular where the
    source does not determine the posterior (``epsilon`` at ``alpha = 0``, ``endpoint``
    and ``score`` at ``beta = 0``).
    """
    check_parameterization(source)
    p1, p0 = basis_coordinates(source, alpha, beta, d_alpha, d_beta)
    q1, q0 = basis_coordinates(target, alpha, beta, d_alpha, d_beta, sigma)
    det = alpha * p0 - beta * p1
    # [x1; eps] = [[p0, -beta], [-p1, alpha]] [x; out] / det
    return (q1 * p0 - q0 * p1) / det, (q0 * alpha - q1 * beta) / det


def convert(
    output: Tensor,
    x: Tensor,
    t: Tensor | float,
    scheduler: Scheduler,
    source: str,
    target: str,
    sigma: Tensor | None = None,
) -> Tensor:
    """Convert a model ``output`` at ``(x, t)`` from ``source`` to ``target``.

    Parameters
    ----------
    output, x : Tensor, shape (n, *sample_shape)
    t : float or Tensor of shape () or (n,)
    scheduler : Scheduler
    source, target : str
        ``target`` may also be ``"drift"`` (then ``sigma`` at ``t`` is required).
    """
    import torch

    for argument, value in (("output", output), ("x", x)):
        if not isinstance(value, Tensor):
            raise TypeError(f"{argument}: expected a torch.Tensor, got {type(value).__name__}")
    if output.shape != x.shape:
        raise ValueError(f"output: expected shape {tuple(x.shape)} (same as x), got {tuple(output.shape)}")
    if not isinstance(source, str) or not isinstance(target, str):
        raise TypeError(
            f"source, target: expected names such as 'velocity', got {type(source).__name__}, {type(target).__name__}"
        )
    if source not in PARAMETERIZATIONS:
        raise unknown_name_error("source", source, PARAMETERIZATIONS)
    if target not in (*TARGETS, "state"):
        raise unknown_name_error("target", target, TARGETS)
    if target == "drift" and sigma is None:
        raise ValueError("sigma: required for the 'drift' target")
    if not isinstance(scheduler, Scheduler):
        raise TypeError(f"scheduler: expected a Scheduler, got {type(scheduler).__name__}")
    tt = torch.as_tensor(t, dtype=torch.float64, device=x.device)
    if tt.ndim > 1 or (tt.ndim == 1 and tt.shape[0] != x.shape[0]):
        raise ValueError(f"t: expected a scalar or shape ({x.shape[0]},), got {tuple(tt.shape)}")
    if sigma is not None:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    coef_x, coef_out = conversion_coefficients(source, target, *scheduler(tt), sigma=sigma)
    shape = (-1,) + (1,) * (x.ndim - 1) if tt.ndim == 1 else ()
    coef_x = coef_x.to(x.dtype).reshape(shape)
    coef_out = coef_out.to(x.dtype).reshape(shape)
    return coef_x * x + coef_out * output
