"""Flow policies in the diffusion gym: the base model as a flow, its data, its drift, its exact KL.

- :func:`diffusion_policy`: a :class:`~diffusiongym.trainers.flow_policy.FlowPolicy` that is
  exactly the task's probability-flow ODE on its grid (zero-initialised residual);
- :func:`diffusion_dataset`: one-step transitions ``([], x1, reward_scale * r(x1), done = 1)``
  from the base model;
- :class:`FlowDrift` / :func:`drift_agent`: the flow's velocity as the *whole* drift of an
  ``action_mode="drift"``, ``noise="ode"`` env (a deterministic flow has no control);
- :func:`flow_kl_to_density` / :func:`terminal_metrics`: ``KL(q || p_base)`` of the terminal
  laws, exact through the Euler map's change of variables, and the evaluation keys from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from diffusiongym.policies.agent import ControlAgent
from diffusiongym.sampling import sample
from diffusiongym.trainers.flow_policy import BaseVelocity, FlowPolicy
from diffusiongym.trainers.offline_data import OfflineDataset
from diffusiongym.utils.runtime import flush_denormals
from diffusiongym.utils.validation import check_positive_int

__all__ = [
    "FlowDrift",
    "diffusion_base",
    "diffusion_dataset",
    "diffusion_policy",
    "drift_agent",
    "flow_kl_to_density",
    "terminal_metrics",
]


class FlowDrift(nn.Module):
    """A flow policy's velocity as a drift ``v(x, t, state=None)`` (shape of ``x``).

    This is the *whole* drift, not a control: a deterministic flow has no control
    ``u = (v - b) / sigma`` (``sigma = 0``). On a diffusiongym env made with
    ``noise="ode"``, ``action_mode="drift"`` and the policy's grid, a
    :class:`~diffusiongym.policies.agent.ControlAgent` of it takes exactly the policy's
    Euler steps (:func:`drift_agent` checks the env first). ``state`` ``(n, ds)`` is the
    MDP state of a conditional policy (``None`` for unconditional ones).
    """

    def __init__(self, policy: FlowPolicy):
        super().__init__()
        if not isinstance(policy, FlowPolicy):
            raise TypeError(f"policy: expected a FlowPolicy, got {type(policy).__name__}")
        self.policy = policy

    def forward(self, x: Tensor, t: Tensor | float, state: Tensor | None = None) -> Tensor:
        ref = self.policy.times
        return self.policy(None if state is None else state.to(ref), x.to(ref), torch.as_tensor(t).to(ref)).to(x.dtype)


def diffusion_base(task: Any) -> tuple[int, float, BaseVelocity]:
    """``(d, beta(t_start), base velocity)`` of a diffusion task RQL supports (unconditional,
    vector samples ``(d,)``); raises ``ValueError`` naming ``task`` otherwise."""
    env = getattr(task, "environment", None)
    if env is None:
        raise ValueError(f"task: expected a diffusion task (with an environment), got {type(task).__name__}")
    if env.sample_shape is None or len(env.sample_shape) != 1:
        raise ValueError(f"task: expected a model with vector samples (d,), got sample_shape {env.sample_shape}")
    if getattr(task, "conditioning", None):
        raise ValueError(f"task: expected an unconditional model, got conditioning {sorted(task.conditioning)}")
    beta0 = float(env.scheduler.beta(torch.tensor(task.t_start, dtype=torch.float64)))

    def base(x: Tensor, t: Tensor) -> Tensor:
        return env.velocity(x, t)

    return env.sample_shape[0], beta0, base


def diffusion_policy(task: Any, flow_steps: int | None = None, hidden: int = 128, layers: int = 3) -> FlowPolicy:
    """A :class:`FlowPolicy` initialised at the task's base model (exactly its probability-flow ODE).

    Flow step ``f`` runs at diffusion time ``t_f = t_start + f (1 - t_start) / F`` (``F``
    defaults to ``task.steps``: the task's own grid); the base velocity is
    ``task.environment.velocity(x, t)``; ``x^0 ~ N(0, beta(t_start)^2 I)`` as in
    :func:`diffusiongym.sample`. Unconditional vector models only (``state_dim = 0``).
    The residual's hidden layers draw from the global RNG (wrap the call in
    :func:`~diffusiongym.utils.runtime.seeded` for a reproducible one).
    """
    d, beta0, base = diffusion_base(task)
    steps = task.steps if flow_steps is None else flow_steps
    return FlowPolicy(d, 0, steps, task.t_start, 1.0, beta0, base, hidden, layers)


def drift_agent(policy: FlowPolicy | FlowDrift, env: Any) -> ControlAgent:
    """Make a diffusion :class:`FlowPolicy` act on a diffusiongym env with ``action_mode="drift"``.

    In drift mode the agent gives the *whole* drift and the env's action is
    ``a = drift / action_scale``; with ``noise="ode"`` (sigma = 0) the env step is exactly
    the policy's Euler step ``x^{f+1} = x^f + h_f v(x^f, t_f)``, so the episode's ``x1``
    is the policy's own sample from the same ``x^0`` (the env then reports no KL:
    ``info["kl_defined"]`` is False). The policy reads ``t_f`` from ``obs["t"]``; its grid
    must be the env's (``steps == F``, same ``t_start``).

    Parameters
    ----------
    policy : FlowPolicy or FlowDrift
        Unconditional (``state_dim = 0``), e.g. ``RQL(...).model`` or ``RQL(...).policy``.
    env : DiffusionEnv or DiffusionVectorEnv (or a wrapper of one)

    Returns
    -------
    :class:`~diffusiongym.policies.agent.ControlAgent` mapping observations
    ``{"x": (n, d), "t": (n, 1)}`` to actions ``(n, d)`` (torch for the vector env, numpy
    for the single env).
    """
    if isinstance(policy, FlowDrift):
        policy = policy.policy
    if not isinstance(policy, FlowPolicy):
        raise TypeError(f"policy: expected a FlowPolicy or FlowDrift, got {type(policy).__name__}")
    if policy.state_dim != 0:
        raise ValueError(f"policy: expected an unconditional policy (state_dim 0), got state_dim {policy.state_dim}")
    sim = env.unwrapped.sim
    if sim.action_mode != "drift":
        raise ValueError(f"env: expected action_mode 'drift', got {sim.action_mode!r}")
    times = sim.times.detach().cpu().double()
    if times.shape != policy.times.shape or not torch.allclose(times, policy.times.detach().cpu().double(), atol=1e-6):
        raise ValueError(
            f"env: expected the policy's time grid ({policy.flow_steps} steps from {float(policy.times[0]):.4g} to 1), got {times.numel() - 1} steps from {float(times[0]):.4g}"
        )
    drift = FlowDrift(policy)

    def act(x: Tensor, t: Tensor) -> Tensor:
        with torch.no_grad():
            return drift(x, t)

    return ControlAgent(act, env)


def diffusion_dataset(task: Any, n: int, seed: int = 0, noise: str = "ode", steps: int | None = None) -> OfflineDataset:
    """``n`` one-step transitions ``(s = [], a = x1, r = reward_scale * r(x1), done = 1)``
    from the base model, sampled with :func:`diffusiongym.sample` (``noise`` ``"ode"`` or
    ``"memoryless"``; ``steps`` defaults to the task's). Invalid samples are dropped."""
    check_positive_int("n", n)
    env = task.environment.with_noise(noise)
    traj = sample(env, n, steps=steps or task.steps, t_start=task.t_start, reward=task.reward, seed=seed)
    keep = traj.valid
    if not bool(keep.any()):
        raise ValueError(f"task: the reward flagged all {n} base samples invalid; no dataset")
    x1 = traj.x1[keep].float()
    m = x1.shape[0]
    empty = x1.new_zeros(m, 0)
    return OfflineDataset(empty, x1, task.reward_scale * traj.reward[keep].float(), empty, torch.ones(m))


def flow_kl_to_density(
    policy: FlowPolicy, log_density: Callable[[Tensor], Tensor], n: int = 4096, seed: int = 0
) -> tuple[float, Tensor]:
    """Monte-Carlo ``KL(q || p) = E_q[log q(x) - log p(x)]`` of the policy's action law ``q``
    (exact change of variables through the Euler map) to a density ``p`` (e.g. the exact base
    mixture, ``log_density(x float64 (n, d)) -> (n,)``). Returns ``(kl, samples (n, d))``;
    ``kl`` lower-bounds the path KL (data processing) and is the KL that enters
    ``max E[lambda r] - KL(q || p_base) = log E_base[exp(lambda r)]``.
    """
    gen = torch.Generator(device=policy.times.device).manual_seed(seed)
    x, logq = policy.sample_with_log_prob(n, generator=gen)
    logp = log_density(x.double())
    return float((logq - logp).mean()), x


def terminal_metrics(policy: FlowPolicy, task: Any, num_samples: int = 4096, seed: int = 0) -> dict[str, float]:
    """``objective``, ``kl``, ``reward``, ``valid_fraction``, ``gap_closed`` of fresh flow samples.

    ``kl`` is ``KL(q || p_base)`` of the terminal laws, the mean over valid samples of
    ``log q(x1) - log p_base(x1)``: ``log q`` exact through the Euler map
    (:meth:`FlowPolicy.sample_with_log_prob`), ``log p_base`` the task's exact mixture density
    (``task.mixture``). It is the KL of ``max_q E_q[lambda r] - KL(q || p_base) =
    log E_base[exp(lambda r)]`` (the oracle's optimum), so ``gap_closed`` compares with the SDE
    methods' (whose path KL upper-bounds it). Without a mixture base ``kl``, ``objective`` and
    ``gap_closed`` are NaN. The draws are ``policy.sample(n=num_samples, generator=g)`` with
    ``g`` seeded by ``seed`` (on the policy's device).
    """
    n = check_positive_int("num_samples", num_samples)
    gen = torch.Generator(device=policy.times.device).manual_seed(int(seed))
    mixture = getattr(task, "mixture", None)
    with flush_denormals():
        if mixture is not None:
            x1, log_q = policy.sample_with_log_prob(n, generator=gen)
            log_ratio = log_q.cpu() - mixture.log_prob(x1.detach().cpu().double())
        else:
            with torch.no_grad():
                x1 = policy.sample(n=n, generator=gen)
            log_ratio = None
        r, valid = task.reward(x1.detach())
    valid = (valid & torch.isfinite(x1).all(1)).cpu()
    r = r.detach().cpu().double()
    nan = float("nan")
    out = {
        "objective": nan,
        "kl": nan,
        "reward": nan,
        "valid_fraction": float(valid.double().mean()),
        "gap_closed": nan,
    }
    if not bool(valid.any()):
        return out
    out["reward"] = float(r[valid].mean())
    if log_ratio is not None:
        out["kl"] = float(log_ratio[valid].mean())
        out["objective"] = float((task.reward_scale * r - log_ratio)[valid].mean())
        oracle = getattr(task, "oracle", None)
        if (
            oracle is not None
            and abs(oracle.optimal_objective - oracle.base_objective) > 1e-12
            and math.isfinite(out["objective"])
        ):
            out["gap_closed"] = float(oracle.gap_closed(out["objective"]))
    return out
