"""The scheduler's own update as an integrator on its own time grid (``integrator="scheduler"``).

The deterministic diffusers samplers step from one point ``(alpha, beta)`` of the noising path to
the next ``(alpha', beta')`` by re-noising the Tweedie estimates::

    x' = alpha' x1_hat + beta' eps_hat,      (x1_hat, eps_hat) from (x, model output) at t_k

- ``DDIMScheduler`` (``eta = 0``): ``alpha = sqrt(abar_tau)``, ``alpha' = sqrt(abar_{tau - T // n})`` or
  ``sqrt(final_alpha_cumprod)`` on the last step;
- ``EulerDiscreteScheduler`` (no churn): Euler in ``(x / alpha, sigma = beta / alpha)`` is the same
  update with ``alpha = 1 / sqrt(1 + sigma^2)`` from the scheduler's ``sigmas`` (the last is 0:
  the final state is ``x1_hat``); our state is the model input ``x_e / sqrt(sigma^2 + 1)``;
- ``FlowMatchEulerDiscreteScheduler``: ``alpha = 1 - sigma``, ``beta = sigma``; on the linear path
  the update is exactly Euler's step ``x + (sigma' - sigma) output``.

Not an Euler step in ``t``: same step count, an ``O(h)`` different discretisation of the same
probability-flow ODE (``docs/text_to_image.md``). To run it through the engine, each step
``x' = A_k x + B_k out`` is written as an Euler step on the grid ``t_k = 1 - tau_k / (T - 1)``
with the drift ``((A_k - 1) / h_k) x + (B_k / h_k) out`` (:meth:`SchedulerGrid.drift_coefficients`).
Multistep (PNDM, DPM-Solver, UniPC) and ancestral (DDPM, Euler ancestral) samplers are not
one-step deterministic updates and are refused.

The grid alone (``update=False``: ``A = B = None``) is the default time grid of every environment
(``time_grid="scheduler"``), for any scheduler with ``set_timesteps``: the integrator is then our
Euler(-Maruyama) step in ``t`` at the pipeline's evaluation times (a repeated timestep, as PNDM's
first PLMS step, counted once).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusiongym.parameterization import conversion_coefficients
from diffusiongym.schedulers import Scheduler
from diffusiongym.utils.validation import check_positive_int

__all__ = ["SchedulerGrid", "scheduler_grid", "STEP_SCHEDULERS"]

STEP_SCHEDULERS = ("DDIMScheduler", "EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler")
"""diffusers schedulers whose update ``integrator="scheduler"`` reproduces."""
_GRID_TOLERANCE = 1e-9


@dataclass
class SchedulerGrid:
    """A diffusers scheduler's grid and per-step update for ``n`` steps.

    Attributes
    ----------
    times : Tensor, (n + 1,) float64
        ``t_k = 1 - tau_k / (T - 1)`` (VP) or ``1 - sigma_k`` (flow), then 1.
    timesteps : Tensor, (n,) float64
        The scheduler's timesteps ``tau_k`` (the denoiser's input).
    A, B : Tensor, (n,) float64, or None
        ``x_{k+1} = A_k x_k + B_k out_k`` with ``out`` in the environment's parameterisation
        (``None`` for the grid alone).
    init_scale : float
        The environment's first state is ``init_scale * z`` for the pipeline's ``latents=z``
        (``init_noise_sigma`` times the input scaling at ``tau_0``).
    """

    times: Tensor
    timesteps: Tensor
    A: Tensor | None
    B: Tensor | None
    init_scale: float

    def __len__(self) -> int:
        return self.times.numel() - 1

    def drift_coefficients(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(coef_x, coef_out)`` of the effective drift at grid points ``t`` (any shape).

        ``ValueError`` for a ``t`` that is not a left point of the grid (the update is only
        defined there)."""
        if self.A is None or self.B is None:
            raise ValueError("integrator: this grid has no scheduler update (built with update=False)")
        t64 = torch.as_tensor(t, dtype=torch.float64)
        left = self.times[:-1].to(t64.device)
        flat = t64.reshape(-1)
        pos = torch.searchsorted(left, flat).clamp(max=left.numel() - 1)
        lower = (pos - 1).clamp(min=0)
        pos = torch.where((left[lower] - flat).abs() < (left[pos] - flat).abs(), lower, pos)
        off = (left[pos] - flat).abs() > _GRID_TOLERANCE
        if bool(off.any()):
            raise ValueError(
                f"integrator: the scheduler's update is defined on its own grid only (env.step_grid.times, "
                f"{left.numel()} steps); got t = {flat[off].tolist()[:3]}. Pass grid=env.step_grid.times"
            )
        h = (self.times[1:] - self.times[:-1]).to(t64.device)[pos]
        coef_x = (self.A.to(t64.device)[pos] - 1.0) / h
        coef_out = self.B.to(t64.device)[pos] / h
        return coef_x.reshape(t64.shape), coef_out.reshape(t64.shape)


def _pairs_to_update(
    parameterization: str, scheduler: Scheduler, t: Tensor, ab: tuple[Tensor, Tensor], ab_next: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of ``x' = alpha' x1_hat + beta' eps_hat`` with the estimates read at ``(alpha, beta)``."""
    alpha, beta = ab
    _, _, d_alpha, d_beta = scheduler(t)
    ex, eo = conversion_coefficients(parameterization, "endpoint", alpha, beta, d_alpha, d_beta)
    px, po = conversion_coefficients(parameterization, "epsilon", alpha, beta, d_alpha, d_beta)
    a1, b1 = ab_next
    return a1 * ex + b1 * px, a1 * eo + b1 * po


def scheduler_grid(
    diffusers_scheduler: Any,
    steps: int,
    scheduler: Scheduler,
    kind: str,
    parameterization: str,
    *,
    update: bool = True,
    **set_timesteps: Any,
) -> SchedulerGrid:
    """The :class:`SchedulerGrid` of ``diffusers_scheduler`` for ``steps`` steps.

    Parameters
    ----------
    diffusers_scheduler : diffusers scheduler
        Copied; its ``set_timesteps(steps, **set_timesteps)`` gives the grid.
    scheduler : Scheduler
        Ours (the bridge's, from the same config).
    kind : {"vp", "flow"}
    parameterization : str
        Of the environment's model output (``"epsilon"`` for VP, ``"velocity"`` for flow).
    update : bool
        Also the per-step update ``(A, B)`` (:data:`STEP_SCHEDULERS` only); ``False``: the grid
        and ``init_scale`` alone, for any scheduler.
    """
    steps = check_positive_int("steps", steps)
    name = type(diffusers_scheduler).__name__
    if not update:
        return _grid_only(diffusers_scheduler, steps, kind, set_timesteps)
    if name not in STEP_SCHEDULERS:
        raise ValueError(
            f"integrator: 'scheduler' reproduces {list(STEP_SCHEDULERS)}; {name} is a multistep or ancestral "
            "sampler: use integrator='euler'"
        )
    sched = copy.deepcopy(diffusers_scheduler)
    sched.set_timesteps(steps, device="cpu", **set_timesteps)
    taus = sched.timesteps.to(torch.float64)
    T = int(sched.config.num_train_timesteps)
    if kind == "flow":
        sig = sched.sigmas.to(torch.float64)
        times = torch.cat([1.0 - sig[:-1], torch.ones(1, dtype=torch.float64)])
        ab, ab_next = (1.0 - sig[:-1], sig[:-1]), (1.0 - sig[1:], sig[1:])
        init = 1.0  # the flow pipelines use latents=z as is (FlowMatchEuler has no init_noise_sigma)
    elif name == "EulerDiscreteScheduler":
        sig = sched.sigmas.to(torch.float64)
        c = 1.0 / torch.sqrt(1.0 + sig**2)
        ab, ab_next = (c[:-1], sig[:-1] * c[:-1]), (c[1:], sig[1:] * c[1:])
        times = torch.cat([1.0 - taus / (T - 1), torch.ones(1, dtype=torch.float64)])
        init = float(sched.init_noise_sigma) * float(c[0])
    else:  # DDIM
        abar = sched.alphas_cumprod.to(torch.float64)
        idx = taus.long()
        prev = idx - T // sched.num_inference_steps
        final = torch.as_tensor(float(sched.final_alpha_cumprod), dtype=torch.float64)
        abar_next = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)
        ab = (abar[idx].sqrt(), (1.0 - abar[idx]).sqrt())
        ab_next = (abar_next.sqrt(), (1.0 - abar_next).sqrt())
        times = torch.cat([1.0 - taus / (T - 1), torch.ones(1, dtype=torch.float64)])
        init = float(sched.init_noise_sigma)
    if not bool((times[1:] > times[:-1]).all()):
        raise ValueError(
            f"integrator: {name}'s timesteps {taus.tolist()[-2:]} end at the data end (t = 1) before its last "
            "update; use timestep_spacing='leading' or 'trailing' (SD/SDXL configs use 'leading')"
        )
    A, B = _pairs_to_update(parameterization, scheduler, times[:-1], ab, ab_next)
    return SchedulerGrid(times=times, timesteps=taus, A=A, B=B, init_scale=init)


def _grid_only(diffusers_scheduler: Any, steps: int, kind: str, set_timesteps: dict[str, Any]) -> SchedulerGrid:
    """The scheduler's evaluation times for ``steps`` steps (no update): ``1 - sigma_k`` (flow) or
    ``1 - tau_k / (T - 1)`` (VP, repeated timesteps once), then 1."""
    name = type(diffusers_scheduler).__name__
    sched = copy.deepcopy(diffusers_scheduler)
    sched.set_timesteps(steps, device="cpu", **set_timesteps)
    taus = sched.timesteps.to(torch.float64)
    init = float(getattr(sched, "init_noise_sigma", 1.0))
    if kind == "flow":
        sig = sched.sigmas.to(torch.float64)
        times = torch.cat([1.0 - sig[:-1], torch.ones(1, dtype=torch.float64)])
        init = 1.0
    else:
        T = int(sched.config.num_train_timesteps)
        taus = torch.unique(taus).flip(0)
        times = torch.cat([1.0 - taus / (T - 1), torch.ones(1, dtype=torch.float64)])
        if hasattr(sched, "scale_model_input"):  # the state is the denoiser's input (Euler-type: / sqrt(sigma^2 + 1))
            init *= float(sched.scale_model_input(torch.ones(()), sched.timesteps[0]))
    if times.numel() != steps + 1 or not bool((times[1:] > times[:-1]).all()):
        raise ValueError(
            f"time_grid: {name}'s {steps}-step timesteps {taus.tolist()[-2:]} do not give {steps} steps before the "
            "data end (t = 1); use timestep_spacing='leading' or 'trailing', or time_grid='uniform'"
        )
    return SchedulerGrid(times=times, timesteps=taus, A=None, B=None, init_scale=init)
