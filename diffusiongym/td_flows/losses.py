"""TD-CFM and TD²-CFM: temporal-difference conditional flow matching of a successor measure.

The successor measure of a policy ``pi`` is the fixed point of the Bellman equation
``m(. | s, a) = (1 - gamma) P(. | s, a) + gamma E_{S' ~ P(.|s,a)} m(. | S', pi(S'))``
(Farebrother et al., "Temporal Difference Flows", 2025). Both losses regress the velocity
``v_theta(x_t, t | s, a)`` of the model on a right-hand side built from a transition
``(s, a, s')`` and a *target* model ``v_bar`` (a Polyak average of the model), with
``t ~ U[0, 1)`` and the package's path ``x_t = alpha_t x1 + beta_t x0`` (``t = 0`` noise):

- **TD-CFM**: ``X1 = S'`` with probability ``1 - gamma``, else a draw of the target model at
  ``(S', pi(S'))`` (its ODE integrated from noise); ordinary conditional flow matching
  towards ``X1``. The draw is a single sample of a whole distribution: a noisy target.
- **TD²-CFM**: ``(1 - gamma) L_COS + gamma L_CGHM``. ``L_COS`` is conditional flow matching
  towards ``S'``; ``L_CGHM`` regresses ``v_theta(X_t | s, a)`` on the target's own velocity
  ``v_bar(X_t | S', pi(S'))`` at a point ``X_t`` of the target's flow (integrated from noise to
  ``t``). The regression target is a velocity, not a random endpoint: the noise of the
  endpoint draw is gone, hence a lower-variance gradient.

With the target's ODE integrated exactly, both have the same expected gradient and minimiser
(the velocity field of the mixture ``(1 - gamma) P + gamma P^pi m_bar``: ``L_COS`` and
``L_CGHM`` are the two parts of the mixture's marginal flow-matching loss). With a few Euler
steps they differ: TD-CFM's endpoints carry the Euler error of the whole path, TD²-CFM regresses
on the target's velocity at the points its Euler path visits. A terminal transition (``done = 1``) makes ``S'`` absorbing: the target is ``S'`` alone.

All states are in the model's standardised units (``SuccessorFlow.normalize``); the target
network shares the model's normaliser.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffusiongym.td_flows.successor import SuccessorFlow, integrate
from diffusiongym.trainers.flow_matching import weighted_flow_matching_loss
from diffusiongym.utils.validation import unknown_name_error

__all__ = ["LOSSES", "td_cfm_loss", "td2_cfm_loss", "td_loss", "polyak_update", "gradient_variance"]

LOSSES = ("td2", "td")

Policy = Callable[[Tensor], Tensor]


def _next_actions(pi: Policy | None, s2: Tensor, action_dim: int) -> Tensor | None:
    if action_dim == 0:
        return None
    a2 = pi(s2)
    if not isinstance(a2, Tensor) or a2.shape != (s2.shape[0], action_dim):
        got = tuple(a2.shape) if isinstance(a2, Tensor) else type(a2).__name__
        raise ValueError(f"pi: expected actions of shape ({s2.shape[0]}, {action_dim}), got {got}")
    return a2.to(s2)


def td_cfm_loss(
    model: SuccessorFlow,
    target: SuccessorFlow,
    batch: dict[str, Tensor],
    pi: Policy | None,
    *,
    gamma: float,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TD-CFM loss on ``batch`` (keys ``s``, ``a``, ``s2``, ``done``; raw units); scalar.

    ``steps`` Euler steps integrate the target model for the bootstrapped endpoints.
    """
    s, a, s2 = batch["s"], batch.get("a"), batch["s2"]
    n = s.shape[0]
    with torch.no_grad():
        x1 = model.normalize(s2).clone()
        boot = (torch.rand(n, generator=generator, device=s.device, dtype=s.dtype) < gamma) & (batch["done"] <= 0)
        if bool(boot.any()):
            s2b = s2[boot]
            a2b = _next_actions(pi, s2b, model.action_dim)
            x1[boot] = integrate(target, s2b, a2b, steps=steps, generator=generator).x1
    cond = {"s": s} if model.action_dim == 0 else {"s": s, "a": a}
    return weighted_flow_matching_loss(
        model, "velocity", model.scheduler, x1, t_range=(0.0, 1.0), generator=generator, cond=cond
    )


def td2_cfm_loss(
    model: SuccessorFlow,
    target: SuccessorFlow,
    batch: dict[str, Tensor],
    pi: Policy | None,
    *,
    gamma: float,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """TD²-CFM loss ``mean_i [(1 - g_i) L_COS,i + g_i L_CGHM,i]``, ``g_i = gamma (1 - done_i)``; scalar.

    The target flow is integrated on the grid ``0, u/K, (1 + u)/K, ..., (K - 1 + u)/K, 1``
    (``K = steps``, one ``u ~ U(0, 1)`` per batch) and each row takes one of its ``K`` interior
    points at random, so the times of ``L_CGHM`` are uniform on ``(0, 1)`` over batches.
    """
    s, a, s2 = batch["s"], batch.get("a"), batch["s2"]
    n = s.shape[0]
    g = gamma * (batch["done"] <= 0).to(s.dtype)
    cond = {"s": s} if model.action_dim == 0 else {"s": s, "a": a}
    cos = weighted_flow_matching_loss(
        model,
        "velocity",
        model.scheduler,
        model.normalize(s2),
        (1.0 - g) / n,
        t_range=(0.0, 1.0),
        generator=generator,
        cond=cond,
    )
    with torch.no_grad():
        a2 = _next_actions(pi, s2, model.action_dim)
        u = float(torch.rand((), generator=generator, device=s.device, dtype=torch.float64).clamp(1e-6, 1 - 1e-6))
        inner = (torch.arange(steps, dtype=torch.float64) + u) / steps
        grid = torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])
        traj = integrate(target, s2, a2, grid=grid, generator=generator, store=("states", "drifts"))
        idx = torch.randint(1, steps + 1, (n,), generator=generator, device=s.device)
        rows = torch.arange(n, device=s.device)
        x_t = traj.states[idx, rows]
        v_bar = traj.drifts[idx, rows]  # velocity environment with sigma = 0: the drift is v_bar itself
        t = grid.to(device=s.device, dtype=s.dtype)[idx]
    ghm = ((model(x_t, t, **cond) - v_bar) ** 2).mean(1)
    return cos + (g * ghm).mean()


def td_loss(
    kind: str,
    model: SuccessorFlow,
    target: SuccessorFlow,
    batch: dict[str, Tensor],
    pi: Policy | None,
    *,
    gamma: float,
    steps: int = 10,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``td2_cfm_loss`` (``kind="td2"``) or ``td_cfm_loss`` (``kind="td"``)."""
    if kind == "td2":
        return td2_cfm_loss(model, target, batch, pi, gamma=gamma, steps=steps, generator=generator)
    if kind == "td":
        return td_cfm_loss(model, target, batch, pi, gamma=gamma, steps=steps, generator=generator)
    raise unknown_name_error("loss", kind, LOSSES)


@torch.no_grad()
def polyak_update(target: nn.Module, model: nn.Module, tau: float) -> None:
    """``theta_bar <- (1 - tau) theta_bar + tau theta`` (buffers copied)."""
    for pt, p in zip(target.parameters(), model.parameters()):
        pt.lerp_(p, tau)
    for bt, b in zip(target.buffers(), model.buffers()):
        bt.copy_(b)


def gradient_variance(model: nn.Module, loss_fn: Callable[[], Tensor], repeats: int = 32) -> dict[str, float]:
    """Spread of the stochastic gradient of ``loss_fn()`` at the model's current parameters.

    ``loss_fn`` draws a fresh minibatch (and fresh noise) on every call. Returns
    ``variance`` ``E|g - E g|^2`` (trace of the covariance, unbiased over ``repeats`` draws),
    ``mean_sq_norm`` ``|E g|^2`` and ``snr`` their ratio ``|E g|^2 / variance``.
    """
    grads = []
    params = [p for p in model.parameters() if p.requires_grad]
    for _ in range(repeats):
        model.zero_grad(set_to_none=True)
        loss_fn().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]).double())
    model.zero_grad(set_to_none=True)
    g = torch.stack(grads)
    mean = g.mean(0)
    var = float(((g - mean) ** 2).sum(1).sum() / (repeats - 1))
    sq = float((mean**2).sum())
    return {"variance": var, "mean_sq_norm": sq, "snr": sq / var if var > 0 else float("inf")}
